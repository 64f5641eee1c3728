"""Corpora as lists of named documents, and the stable train/val split.

A document is the unit of everything downstream: it gets one BOS prefix, its start is a ``boundary``
for the n-gram hashing (no n-gram spans two documents), it never straddles a shard, and its *name*
alone decides its split, so adding or removing other documents never moves it between train and val.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from engram.data.config import DataConfig

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".jsonl")
_TEST_DIRS = {"test", "tests", "idle_test"}
_NEVER_DIRS = {"site-packages", "dist-packages", "__pycache__"}
SPLITS = ("train", "val")
MAX_PARAGRAPH_CHARS = 16_384  # a single-file corpus is cut into documents no longer than this (at line ends)


@dataclass(frozen=True)
class Document:
    name: str  # stable identifier ("os.py", "notes/a.md", "wikitext/train/17"): decides the split
    text: str


# -- sources --------------------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    # errors="replace": one stray Latin-1 byte must not abort a multi-hour preparation.
    return path.read_text(encoding="utf-8", errors="replace")


def _walk(root: Path, skip_dirs: set[str], suffixes: tuple[str, ...]) -> list[Path]:
    """Files under root with one of ``suffixes``, pruning directories named in ``skip_dirs`` and hidden ones."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(suffixes) and not f.startswith("."))
    return found


def _relative_name(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def stdlib_documents(include_tests: bool = False) -> list[Document]:
    """Every non-empty ``.py`` file of the running interpreter's standard library, sorted by name.

    Always present and download-free, so tests and quick experiments need no network. The test suites
    (``test/``, ``tests/``, ``idlelib/idle_test/``) are a fifth of the stdlib and mostly boilerplate,
    so they are left out unless asked for. The text depends on the interpreter version: the cache key
    of a prepared stdlib corpus includes it.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"the standard library directory {root} does not exist")
    skip = _NEVER_DIRS | (set() if include_tests else _TEST_DIRS)
    docs = []
    for path in sorted(_walk(root, skip, (".py",)), key=lambda p: _relative_name(p, root)):
        text = _read_text(path)
        if text:
            docs.append(Document(_relative_name(path, root), text))
    return docs


def _jsonl_documents(path: Path, name: str, text_field: str) -> list[Document]:
    docs = []
    with path.open(encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno} is not valid JSON ({err})") from err
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{path}:{lineno} has no field {text_field!r} (found {keys}); "
                                 f"set DataConfig.text_field")
            text = record[text_field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno} field {text_field!r} is {type(text).__name__}, not a string")
            if text:
                docs.append(Document(f"{name}:{lineno}", text))
    return docs


def _file_documents(path: Path, name: str, text_field: str) -> list[Document]:
    if path.suffix == ".jsonl":
        return _jsonl_documents(path, name, text_field)
    text = _read_text(path)
    return [Document(name, text)] if text else []


def paragraph_documents(text: str, name: str, max_chars: int = MAX_PARAGRAPH_CHARS) -> list[Document]:
    """One text cut into documents, in order: at blank lines (lines of only whitespace), and a paragraph
    longer than ``max_chars`` further at line ends into pieces of at most ``max_chars`` (a single line
    longer than that stays whole). Each piece keeps its lines as they were, newlines included, and is
    named ``"<name>#<first 16 hex digits of its sha256>"``: the name follows the text, not its position,
    so editing one paragraph moves no other between splits, and repeated paragraphs share a split."""
    paragraphs: list[list[str]] = [[]]
    for line in text.splitlines(keepends=True):
        if line.strip():
            paragraphs[-1].append(line)
        elif paragraphs[-1]:
            paragraphs.append([])
    docs = []
    for lines in paragraphs:
        piece: list[str] = []
        size = 0
        for line in lines + [None]:
            if line is None or (piece and size + len(line) > max_chars):
                if piece:
                    body = "".join(piece)
                    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()[:16]
                    docs.append(Document(f"{name}#{digest}", body))
                piece, size = [], 0
            if line is not None:
                piece.append(line)
                size += len(line)
    return docs


def text_documents(path: str | os.PathLike, text_field: str = "text") -> list[Document]:
    """Documents from a local file, or from every text file under a directory.

    A directory contributes files ending in one of ``TEXT_SUFFIXES`` (hidden files and directories are
    skipped), one document per file, sorted by name; each ``.jsonl`` line is its own document,
    ``record[text_field]``, named ``"<file>:<line number>"``. Names are relative to the directory, so
    moving the corpus keeps every document's split.

    A single file given directly (read whatever its suffix) is one corpus, not one document: a
    ``.jsonl`` gives its lines as above; any other file is cut into paragraphs by
    ``paragraph_documents`` (blank lines; pieces of at most 16,384 characters), in file order.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"corpus path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix == ".jsonl":
            return _jsonl_documents(path, path.name, text_field)
        return paragraph_documents(_read_text(path), path.name)
    files = _walk(path, set(), TEXT_SUFFIXES)
    if not files:
        others = sorted({f.suffix or f.name for f in _walk(path, set(), ("",))})[:10]
        raise ValueError(f"corpus directory {str(path)!r} has no file ending in {', '.join(TEXT_SUFFIXES)} (the "
                         f"ones read; found: {', '.join(others) or 'no files'}); rename the files or give one "
                         "file directly as data.source")
    docs = []
    for file in files:
        docs.extend(_file_documents(file, _relative_name(file, path), text_field))
    return sorted(docs, key=lambda d: d.name)


def parse_hf_spec(spec: str) -> tuple[str, str | None]:
    """'hf:NAME[:CONFIG]' -> (NAME, CONFIG or None)."""
    if not spec.startswith("hf:") or spec == "hf:":
        raise ValueError(f"expected 'hf:NAME[:CONFIG]', got {spec!r}")
    name, _, config = spec[3:].partition(":")
    return name, (config or None)


def hf_documents(spec: str, text_field: str = "text") -> list[Document]:
    """Rows of a Hugging Face dataset ("hf:NAME[:CONFIG]"), every split, named "NAME/split/i".

    The dataset's own splits are merged and re-split by name like any other corpus, so val_fraction
    means the same thing for every source.
    """
    name, config = parse_hf_spec(spec)
    try:
        import datasets
    except ImportError as err:
        raise ImportError(f"source {spec!r} needs the optional 'datasets' package: pip install datasets") from err
    loaded = datasets.load_dataset(name, config)
    splits = loaded if hasattr(loaded, "keys") else {"train": loaded}  # DatasetDict or one Dataset
    docs = []
    for split in sorted(splits.keys()):
        table = splits[split]
        if text_field not in table.column_names:
            raise ValueError(f"dataset {name!r} split {split!r} has no column {text_field!r} "
                             f"(columns: {table.column_names}); set DataConfig.text_field")
        for i, text in enumerate(table[text_field]):
            if isinstance(text, str) and text:
                docs.append(Document(f"{name}/{split}/{i}", text))
    return docs


# -- split ----------------------------------------------------------------------------------------
def split_of(name: str, val_fraction: float) -> str:
    """'val' for about ``val_fraction`` of names, else 'train'; the same on every machine and run.

    sha256, not ``hash()``: Python salts str hashes per process (PYTHONHASHSEED), which would reshuffle
    the split on every run and leak validation documents into training.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    u = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64  # uniform [0, 1)
    return "val" if u < val_fraction else "train"


def split_documents(docs: Iterable[Document], val_fraction: float) -> dict[str, list[Document]]:
    out: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for doc in docs:
        out[split_of(doc.name, val_fraction)].append(doc)
    return out


def source_documents(config: "DataConfig") -> list[Document]:
    """All documents of ``config.source`` ("stdlib", "hf:NAME[:CONFIG]" or a local path), plus
    ``config.retrieval_docs`` synthetic retrieval documents and ``config.recall_docs`` recall documents."""
    if config.source == "stdlib":
        docs = stdlib_documents(config.include_tests)
    elif config.source.startswith("hf:"):
        docs = hf_documents(config.source, config.text_field)
    else:
        docs = text_documents(config.source, config.text_field)
    if config.retrieval_docs:
        from engram.data.retrieval import retrieval_documents

        filler = [d.text for d in docs if split_of(d.name, config.val_fraction) == "train"]  # no held-out text
        docs = docs + [Document(name, text) for name, text in retrieval_documents(filler, config.retrieval_docs)]
    if config.recall_docs:
        from engram.data.recall import recall_documents

        docs = docs + [Document(name, text) for name, text in recall_documents(config.recall_docs)]
    return docs


def load_documents(config: "DataConfig") -> dict[str, list[Document]]:
    """{"train": [...], "val": [...]} for ``config``; an empty split raises ValueError saying why."""
    docs = source_documents(config)
    splits = split_documents(docs, config.val_fraction)
    for split in SPLITS:
        if not splits[split]:
            raise ValueError(
                f"source {config.source!r} gave {len(docs)} non-empty document(s), none in the {split!r} split "
                f"(val_fraction={config.val_fraction}); the split is by document name, so use more "
                f"documents (one file per document, a .jsonl with one document per line, or a single text file "
                f"with blank lines between its paragraphs)")
    return splits

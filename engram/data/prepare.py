"""``prepare_data``: corpus -> tokenizer -> compressed tokenizer -> token shards, cached by a content key.

The cache directory ``config.cache_dir/<key>/`` holds::

    tokenizer.json                      the raw tokenizer (trained BPE or a copy of the given one)
    compressed_tokenizer.safetensors    CompressedTokenizer (what the Engram hashing uses)
    train_*.bin, val_*.bin, ...         token shards (see engram.data.shards)
    prepared.json                       written LAST: its presence means everything above is complete

The key hashes everything that changes those files, computed without reading the corpus text, so a
second run with the same config opens the cache in milliseconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from engram.data.config import DataConfig
from engram.data.bpe import load_tokenizer, special_ids, tokenizer_sha256, train_bpe
from engram.data.corpus import TEXT_SUFFIXES, load_documents, source_documents
from engram.data.recall import RECALL_FORMAT
from engram.data.retrieval import RETRIEVAL_FORMAT
from engram.data.shards import TokenShards, write_split
from engram.fileio import FileLock, atomic_write_json
from engram.tokenizer import CompressedTokenizer, read_tokenizer_file

FORMAT_VERSION = 1  # bump when shard layout, splitting or BPE settings change: old caches then miss
PREPARED = "prepared.json"


def _log(message: str) -> None:
    print(f"[engram.data] {message}", file=sys.stderr, flush=True)


def _sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode("utf-8")).hexdigest()


def _path_fingerprint(path: Path) -> str:
    """sha256 of (name, size, mtime) of every corpus file: edits invalidate the cache, no text is read."""
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES)
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
    stats = [(p.relative_to(path).as_posix() if p != path else p.name, p.stat().st_size, p.stat().st_mtime_ns)
             for p in files]
    return _sha256_json(stats)


def source_identity(config: DataConfig) -> dict[str, Any]:
    if config.source == "stdlib":
        # The stdlib's text changes with the interpreter (3.11.7 vs 3.12.1 differ).
        return {"kind": "stdlib", "python": list(sys.version_info[:3]), "implementation": sys.implementation.name}
    if config.source.startswith("hf:"):
        return {"kind": "hf", "spec": config.source}
    path = Path(config.source).expanduser().resolve()
    if not path.exists():
        raise FileNotFoundError(f"DataConfig.source {config.source!r} is neither 'stdlib', 'hf:NAME' nor an "
                                f"existing path")
    identity = {"kind": "path", "path": str(path), "fingerprint": _path_fingerprint(path)}
    if path.is_file() and path.suffix != ".jsonl":  # cut into paragraph documents since 0.2
        identity["documents"] = "paragraphs/16384"
    return identity


def tokenizer_identity(config: DataConfig) -> dict[str, Any]:
    if config.tokenizer == "bpe":
        return {"kind": "bpe", "vocab_size": config.vocab_size}
    tokenizer = load_tokenizer(config.tokenizer)  # the file's content, not its path, is what matters
    return {"kind": "file", "sha256": tokenizer_sha256(tokenizer)}


def cache_key(config: DataConfig) -> str:
    """16 hex digits naming the prepared directory for ``config``."""
    return _sha256_json({
        "format": FORMAT_VERSION,
        "source": source_identity(config),
        "tokenizer": tokenizer_identity(config),
        "val_fraction": config.val_fraction,
        "include_tests": config.include_tests,
        "text_field": config.text_field,
    } | ({"retrieval_docs": config.retrieval_docs, "retrieval_format": RETRIEVAL_FORMAT}
         if config.retrieval_docs else {})
      | ({"recall_docs": config.recall_docs, "recall_format": RECALL_FORMAT}
         if config.recall_docs else {}))[:16]  # keys without synthetic documents are unchanged


@dataclass
class PreparedData:
    """A prepared corpus: tokenizers and train/val shards, all from one cache directory."""

    directory: Path
    tokenizer: Tokenizer
    compressed: CompressedTokenizer
    train: TokenShards
    val: TokenShards
    pad_id: int
    bos_id: int | None
    eos_id: int | None
    vocab_size: int  # raw ids, special tokens included: the backbone's vocab_size

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for run logs."""
        return {"directory": str(self.directory), "vocab_size": self.vocab_size,
                "compressed_vocab_size": self.compressed.vocab_size, "pad_id": self.pad_id,
                "bos_id": self.bos_id, "eos_id": self.eos_id,
                "train": _summary(self.train), "val": _summary(self.val)}


def _summary(shards: TokenShards) -> dict[str, Any]:
    return {"tokens": shards.n_tokens, "docs": shards.n_docs, "bytes": shards.n_bytes,
            "bytes_per_token": round(shards.bytes_per_token, 4)}


def _open(directory: Path) -> PreparedData:
    meta = json.loads((directory / PREPARED).read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{directory / PREPARED} has format {meta.get('format')!r}, expected {FORMAT_VERSION}")
    tokenizer = read_tokenizer_file(directory / "tokenizer.json")
    sha = tokenizer_sha256(tokenizer)
    splits = {s: TokenShards(directory, s) for s in ("train", "val")}
    for s, shards in splits.items():
        if shards.manifest["tokenizer_sha256"] != sha:
            raise ValueError(f"{directory}: the {s} shards were written with another tokenizer; delete the "
                             f"directory to prepare again")
    return PreparedData(
        directory=directory, tokenizer=tokenizer, compressed=CompressedTokenizer.load(directory),
        train=splits["train"], val=splits["val"], pad_id=meta["pad_id"], bos_id=meta["bos_id"],
        eos_id=meta["eos_id"], vocab_size=meta["vocab_size"],
    )


def _build(config: DataConfig, directory: Path, key: str) -> None:
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    _log(f"reading documents from {config.source!r} ...")
    docs = load_documents(config)
    seconds["read"] = time.perf_counter() - t
    _log(f"{len(docs['train'])} train / {len(docs['val'])} val documents")

    t = time.perf_counter()
    if config.tokenizer == "bpe":
        n_chars = sum(len(d.text) for d in docs["train"])
        _log(f"training BPE (vocab {config.vocab_size}) on {len(docs['train'])} documents, "
             f"{n_chars / 1e6:.1f}M characters ...")
        tokenizer = train_bpe((d.text for d in docs["train"]), config.vocab_size)
    else:
        tokenizer = load_tokenizer(config.tokenizer)
    seconds["tokenizer"] = time.perf_counter() - t
    tokenizer.save(str(directory / "tokenizer.json"))

    special = special_ids(tokenizer)
    pad_id, pad_note = special.pad, "pad token found"
    if pad_id is None:
        pad_id = special.eos if special.eos is not None else 0
        pad_note = f"tokenizer has no pad token; using {'its eos' if special.eos is not None else 'id 0'} ({pad_id})"
        _log(pad_note)

    t = time.perf_counter()
    compressed = CompressedTokenizer.from_pretrained(tokenizer)
    compressed.save(directory)
    seconds["compress"] = time.perf_counter() - t

    manifests = {}
    for split in ("train", "val"):
        t = time.perf_counter()
        manifests[split] = write_split(docs[split], tokenizer, directory, split, bos_id=special.bos)
        seconds[f"tokenize_{split}"] = time.perf_counter() - t
        _log(f"{split}: {manifests[split]['n_tokens']:,} tokens in {seconds[f'tokenize_{split}']:.1f}s")

    meta = {
        "format": FORMAT_VERSION, "key": key, "config": config.to_dict(),
        "source": source_identity(config), "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "pad_id": pad_id, "pad_note": pad_note, "bos_id": special.bos, "eos_id": special.eos,
        "tokenizer_sha256": tokenizer_sha256(tokenizer), "compressed": compressed.describe(),
        "splits": {s: {k: m[k] for k in ("n_tokens", "n_docs", "n_bytes")} for s, m in manifests.items()},
        "seconds": {k: round(v, 3) for k, v in seconds.items()},
    }
    atomic_write_json(directory / PREPARED, meta, indent=1)


def _locked(directory: Path):
    """The per-key lock beside ``directory``: one process prepares, the others wait for it."""
    def waiting(holder: str) -> None:
        _log(f"waiting for {holder or 'another process'} preparing {directory.name} ...")
    return FileLock(directory.with_name(directory.name + ".lock"), purpose="engram data prepare"), waiting


def prepare_data(config: DataConfig, rebuild: bool = False) -> PreparedData:
    """Prepared data for ``config``: from the cache when complete, else built (and cached) now.

    Safe under concurrency: the cache key's lock (``<key>.lock``) lets one process build while the
    others wait and then open its result. A directory without prepared.json whose lock is free is an
    interrupted preparation, removed and rebuilt; ``rebuild=True`` rebuilds a complete one too.
    """
    key = cache_key(config)
    directory = Path(config.cache_dir) / key
    if (directory / PREPARED).is_file() and not rebuild:
        return _open(directory)
    lock, waiting = _locked(directory)
    lock.acquire(wait=True, on_wait=waiting)
    try:
        if (directory / PREPARED).is_file() and not rebuild:  # built by the process we waited for
            return _open(directory)
        if directory.exists():
            _log(f"removing {'old' if rebuild else 'incomplete'} preparation {directory}")
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        _build(config, directory, key)
        _log(f"prepared {directory}")
        return _open(directory)
    finally:
        lock.release()


def prepare_with_tokenizer(config: DataConfig, tokenizer: Tokenizer, tokenizer_file: str | Path) -> PreparedData:
    """The data of ``config`` tokenized by ``tokenizer`` (e.g. a checkpoint's own), never by a tokenizer
    trained again: the prepared cache of ``config`` when it was made with this very tokenizer, else the
    corpus tokenized now with ``tokenizer_file`` (its own cache entry, keyed by the tokenizer's sha256)."""
    sha = tokenizer_sha256(tokenizer)
    if config.tokenizer != "bpe":  # keyed by the file's content: the given one, wherever the named file went
        config = dataclasses.replace(config, tokenizer=str(tokenizer_file))
    directory = Path(config.cache_dir) / cache_key(config)
    if (directory / PREPARED).is_file():
        made_with = json.loads((directory / PREPARED).read_text()).get("tokenizer_sha256")
        if made_with == sha:
            return _open(directory)
        _log(f"{directory} was prepared with another tokenizer (sha256 {str(made_with)[:12]}, not {sha[:12]}): "
             "tokenizing the corpus again with the given one")
    elif config.tokenizer == "bpe":
        _log("no prepared data of this config was made with the given tokenizer: tokenizing the corpus with it "
             "(never a newly trained BPE)")
    return prepare_data(dataclasses.replace(config, tokenizer=str(tokenizer_file)))


def prepare_text(source: str, tokenizer: Tokenizer, tokenizer_file: str | Path, cache_dir: str | Path,
                 text_field: str = "text") -> TokenShards:
    """Every document of ``source`` (a path or "hf:NAME", read as ``DataConfig.source``) tokenized by
    ``tokenizer`` as one split, for evaluating a model on other text; cached under ``cache_dir``."""
    config = DataConfig(source=source, tokenizer=str(tokenizer_file), text_field=text_field,
                        cache_dir=str(cache_dir))
    key = _sha256_json({"format": FORMAT_VERSION, "kind": "text", "source": source_identity(config),
                        "tokenizer": tokenizer_sha256(tokenizer), "text_field": text_field})[:16]
    directory = Path(cache_dir) / f"text-{key}"
    if not (directory / PREPARED).is_file():
        lock, waiting = _locked(directory)
        with lock.acquire(wait=True, on_wait=waiting):
            if not (directory / PREPARED).is_file():
                shutil.rmtree(directory, ignore_errors=True)
                directory.mkdir(parents=True)
                docs = source_documents(config)
                if not docs:
                    raise ValueError(f"{source!r} holds no text to evaluate on")
                bos = special_ids(tokenizer).bos
                manifest = write_split(docs, tokenizer, directory, "val", bos_id=bos)
                atomic_write_json(directory / PREPARED, {"format": FORMAT_VERSION, "kind": "text", "key": key,
                                                         "source": source_identity(config),
                                                         "tokenizer_sha256": tokenizer_sha256(tokenizer),
                                                         "n_tokens": manifest["n_tokens"]}, indent=1)
    return TokenShards(directory, "val")

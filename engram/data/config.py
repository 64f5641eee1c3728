"""``DataConfig``: where training text comes from and how it becomes token shards."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from engram.schema import Serialisable, pos_int, require

@dataclass
class DataConfig(Serialisable):
    """Where training text comes from and how it becomes token shards.

    source: "stdlib" (the running interpreter's standard library: always present, no download),
        a local file or directory of text files, or "hf:NAME[:CONFIG]" for a Hugging Face dataset
        (local cache, or the hub where reachable; needs the optional ``datasets`` package).
    tokenizer: "bpe" trains a byte-level BPE of ``vocab_size`` on the training split (cached);
        anything else is a Hugging Face tokenizer directory or tokenizer.json path.
    val_fraction: share of documents in the validation split, chosen by a stable hash of the path.
    cache_dir: prepared corpora, tokenizers and shards, keyed by everything that changes them.
    retrieval_docs: this many synthetic retrieval documents (``engram.data.retrieval``: the long-context
        tasks' formats, with filler lines from the training split) join the corpus, so that a small model
        can learn retrieval at all (docs/LONG_CONTEXT.md); they split like any document, by name.
    recall_docs: this many synthetic in-context recall documents (``engram.data.recall``: multi-query
        associative recall and repeated random word sequences) join the corpus, likewise.
    """

    source: str = "stdlib"
    tokenizer: str = "bpe"
    vocab_size: int = 8192
    val_fraction: float = 0.02
    include_tests: bool = False
    text_field: str = "text"
    cache_dir: str = "runs/cache"
    retrieval_docs: int = 0
    recall_docs: int = 0

    def __post_init__(self) -> None:
        c = "DataConfig"
        pos_int(c, "retrieval_docs", self.retrieval_docs, minimum=0)
        pos_int(c, "recall_docs", self.recall_docs, minimum=0)
        require(isinstance(self.source, str) and self.source != "", c, "source",
                f"must be 'stdlib', a path, or 'hf:NAME', got {self.source!r}")
        require(isinstance(self.tokenizer, str) and self.tokenizer != "", c, "tokenizer",
                f"must be 'bpe' or a tokenizer path, got {self.tokenizer!r}")
        pos_int(c, "vocab_size", self.vocab_size, minimum=259)  # 256 bytes + special tokens
        require(isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1, c, "val_fraction",
                f"must be in (0, 1), got {self.val_fraction!r}")

    def _path_fields(self) -> list[str]:
        """The fields that hold a filesystem path here (``source`` and ``tokenizer`` only when they are one)."""
        return [name for name, value in (("source", self.source), ("tokenizer", self.tokenizer),
                                         ("cache_dir", self.cache_dir))
                if not (name == "source" and (value == "stdlib" or value.startswith("hf:")))
                and not (name == "tokenizer" and value == "bpe")]

    def relative_to(self, base: str | os.PathLike) -> "DataConfig":
        """This config with its relative paths (meant from the current directory) rewritten relative to
        ``base``: how a run stores them, so they still resolve when the run is used from elsewhere."""
        base = os.path.realpath(base)  # symlinks resolved on both sides: the relative path walks the real tree
        changes = {}
        for name in self._path_fields():
            value = os.path.expanduser(getattr(self, name))
            if not os.path.isabs(value):
                changes[name] = os.path.relpath(os.path.realpath(value), base)
        return dataclasses.replace(self, **changes)

    def resolved(self, base: str | os.PathLike | None = None) -> "DataConfig":
        """This config with every path absolute: relative ones taken from ``base`` (default: the
        current directory)."""
        base = os.path.realpath(base if base is not None else os.getcwd())
        changes = {name: os.path.realpath(os.path.join(base, os.path.expanduser(getattr(self, name))))
                   for name in self._path_fields()}
        return dataclasses.replace(self, **changes)


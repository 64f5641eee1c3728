"""Token shards on disk: flat memory-mapped id arrays plus where each document starts.

Legend: B batch, T sequence length (seq_len), n tokens in a shard, D documents in a shard.

One split is a few files in one directory::

    {split}_000.bin        (n,) uint16|uint32   every document as [bos] + ids, concatenated
    {split}_000.docs.npy   (D,) int64           start offset of every document in that shard
    {split}.json           manifest, written last: dtype, per-shard counts, bytes, tokenizer sha256

Documents never straddle shards, so a shard plus its offsets is self-contained. Training windows are
random slices of one shard; ``boundary`` marks the document starts inside a window so the Engram
n-grams never reach across documents (see ``engram.hashing``).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

from engram.data.bpe import tokenizer_sha256
from engram.data.corpus import Document
from engram.fileio import atomic_write, atomic_write_json, temporary_path

FORMAT = "engram.token_shards/1"
_ENCODE_CHUNK_CHARS = 4_000_000  # text per encode_batch call: keeps threads busy, memory bounded


def dtype_for(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (halves disk and page cache), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _encoded(documents: Iterable[Document], tokenizer: Tokenizer) -> Iterator[tuple[Document, list[int]]]:
    """(document, ids) in order, encoding chunks of documents with one parallel encode_batch each."""
    chunk: list[Document] = []
    chars = 0

    def flush():
        # add_special_tokens=False: the BOS prefix is ours to add, never a foreign post-processor's.
        encodings = tokenizer.encode_batch([d.text for d in chunk], add_special_tokens=False)
        return zip(list(chunk), [e.ids for e in encodings])

    for doc in documents:
        chunk.append(doc)
        chars += len(doc.text)
        if chars >= _ENCODE_CHUNK_CHARS:
            yield from flush()
            chunk, chars = [], 0
    if chunk:
        yield from flush()


class _ShardWriter:
    """Appends documents to ``{split}_{k:03d}.bin``, starting a new shard when the next would overflow."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self._path = self.out_dir / name
        self._file = open(temporary_path(self._path), "wb")  # streamed, then renamed whole
        self._starts: list[int] = []
        self._n = 0
        self.shards.append({"file": name, "tokens": 0, "docs": 0})

    def _close(self) -> None:
        self._file.close()
        os.replace(self._file.name, self._path)  # a .bin under its final name is always complete
        starts = np.asarray(self._starts, dtype=np.int64)  # (D,)
        atomic_write(self._path.with_suffix(".docs.npy"), lambda f: np.save(f, starts))
        self.shards[-1].update(tokens=self._n, docs=len(self._starts))
        self._file = None

    def add(self, ids: np.ndarray) -> None:
        if self._file is not None and self._n > 0 and self._n + len(ids) > self.shard_tokens:
            self._close()
        if self._file is None:
            self._open()
        self._starts.append(self._n)
        self._file.write(ids.astype(self.dtype, copy=False).tobytes())
        self._n += len(ids)

    def finish(self) -> list[dict]:
        if self._file is not None:
            self._close()
        return self.shards


def write_split(documents: Iterable[Document], tokenizer: Tokenizer, out_dir: str | os.PathLike, split: str,
                bos_id: int | None, shard_tokens: int = 50_000_000, progress: bool = True) -> dict:
    """Tokenize ``documents`` into ``out_dir/{split}_*.bin`` shards and return the manifest it wrote.

    Each document becomes ``[bos_id] + ids`` (no prefix when bos_id is None; a document that encodes
    to nothing is then dropped). A document longer than ``shard_tokens`` gets a shard of its own.
    """
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = dtype_for(vocab_size)
    if bos_id is not None and not 0 <= bos_id < vocab_size:
        raise ValueError(f"bos_id {bos_id} is outside the tokenizer's vocabulary [0, {vocab_size})")
    prefix = np.asarray([] if bos_id is None else [bos_id], dtype=np.int64)
    writer = _ShardWriter(out_dir, split, dtype, shard_tokens)
    n_docs = n_bytes = 0
    total = len(documents) if hasattr(documents, "__len__") else None
    bar = tqdm(total=total, desc=f"tokenizing {split}", unit="doc", file=sys.stderr, disable=not progress,
               mininterval=1.0)
    for doc, ids in _encoded(documents, tokenizer):
        bar.update(1)
        if not ids and bos_id is None:
            continue
        writer.add(np.concatenate([prefix, np.asarray(ids, dtype=np.int64)]))  # (len(prefix) + len(ids),)
        n_docs += 1
        n_bytes += len(doc.text.encode("utf-8"))
    bar.close()
    shards = writer.finish()
    manifest = {
        "format": FORMAT,
        "split": split,
        "dtype": dtype.name,
        "shards": shards,
        "n_tokens": sum(s["tokens"] for s in shards),
        "n_docs": n_docs,
        "n_bytes": n_bytes,
        "bos_id": bos_id,
        "vocab_size": vocab_size,
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
    }
    atomic_write_json(out_dir / f"{split}.json", manifest, indent=1)
    return manifest


class TokenShards:
    """One split's shards, memory-mapped read-only; random training windows and fixed eval windows."""

    def __init__(self, directory: str | os.PathLike, split: str):
        self.directory, self.split = Path(directory), split
        path = self.directory / f"{split}.json"
        if not path.is_file():
            raise FileNotFoundError(f"no token shard manifest {path} (write_split / prepare_data creates it)")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{path}: format {self.manifest.get('format')!r}, expected {FORMAT!r}")
        self.dtype = np.dtype(self.manifest["dtype"])
        self.tokens: list[np.memmap] = []  # per shard (n,)
        self.doc_starts: list[np.ndarray] = []  # per shard (D,) int64
        for shard in self.manifest["shards"]:
            ids, starts = self._open_shard(shard)
            self.tokens.append(ids)
            self.doc_starts.append(starts)

    def _open_shard(self, shard: dict) -> tuple[np.memmap, np.ndarray]:
        file = self.directory / shard["file"]
        expected = shard["tokens"] * self.dtype.itemsize
        if not file.is_file():
            raise ValueError(f"shard file {file} is missing (expected {expected} bytes); prepare the data again")
        actual = file.stat().st_size
        if actual != expected:
            raise ValueError(f"shard file {file} is {actual} bytes, expected {expected} "
                             f"({shard['tokens']} x {self.dtype.name}): truncated or overwritten; prepare again")
        docs_file = file.with_suffix(".docs.npy")
        if not docs_file.is_file():
            raise ValueError(f"document index {docs_file} is missing; prepare the data again")
        starts = np.load(docs_file)
        ok = (starts.dtype == np.int64 and starts.shape == (shard["docs"],) and (len(starts) == 0 or (
            starts[0] == 0 and starts[-1] < shard["tokens"] and bool(np.all(np.diff(starts) > 0)))))
        if not ok:
            raise ValueError(f"document index {docs_file} does not match its shard "
                             f"({shard['docs']} increasing int64 offsets below {shard['tokens']} expected)")
        return np.memmap(file, dtype=self.dtype, mode="r", shape=(shard["tokens"],)), starts

    # -- sizes ------------------------------------------------------------------------------------
    @property
    def n_shards(self) -> int:
        return len(self.tokens)

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def n_docs(self) -> int:
        return int(self.manifest["n_docs"])

    @property
    def n_bytes(self) -> int:
        """UTF-8 bytes of the documents' text: bits/byte = loss_nats/ln 2 / bytes_per_token."""
        return int(self.manifest["n_bytes"])

    @property
    def bytes_per_token(self) -> float:
        """Text bytes per stored token; the BOS prefixes count as tokens (they are predicted too)."""
        return self.n_bytes / max(1, self.n_tokens)

    def __repr__(self) -> str:
        return (f"TokenShards({str(self.directory)!r}, {self.split!r}: {self.n_tokens:,} tokens, "
                f"{self.n_docs:,} docs, {self.n_shards} shard(s))")

    # -- reading ----------------------------------------------------------------------------------
    def window(self, shard: int, start: int, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [start, start+length) of one shard: ids (length,) int64, boundary (length,) bool."""
        n = len(self.tokens[shard])
        if not (0 <= start and length >= 0 and start + length <= n):
            raise ValueError(f"window [{start}, {start + length}) is outside shard {shard} of {n} tokens")
        ids = np.asarray(self.tokens[shard][start:start + length], dtype=np.int64)
        starts = self.doc_starts[shard]
        lo, hi = np.searchsorted(starts, [start, start + length])
        boundary = np.zeros(length, dtype=bool)
        boundary[starts[lo:hi] - start] = True
        return ids, boundary

    def _stack(self, windows: list[tuple[int, int]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.window(shard, start, seq_len) for shard, start in windows]
        ids = torch.from_numpy(np.stack([p[0] for p in pairs]))  # (B, T) int64
        boundary = torch.from_numpy(np.stack([p[1] for p in pairs]))  # (B, T) bool
        return ids, boundary

    def sample_windows(self, step: int, batch_size: int, seq_len: int, seed: int) -> list[tuple[int, int]]:
        """The (shard, start) of each row of ``batch(step, ...)``.

        Its own Generator seeded from (seed, step), never global RNG state. Starts are uniform over every
        window that fits inside one shard, i.e. shards are weighted by their number of valid starts;
        shards shorter than seq_len (a small last shard) are never drawn.
        """
        for name, value, low in (("step", step, 0), ("batch_size", batch_size, 1), ("seq_len", seq_len, 1),
                                 ("seed", seed, 0)):
            if not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        valid = np.array([max(0, len(t) - seq_len + 1) for t in self.tokens], dtype=np.int64)  # per shard
        if valid.sum() == 0:
            longest = max((len(t) for t in self.tokens), default=0)
            raise ValueError(f"corpus too small for seq_len={seq_len}: the {self.split!r} split's longest shard "
                             f"has {longest} tokens; use a shorter seq_len or more text")
        rng = np.random.default_rng([seed, step])
        flat = rng.integers(0, int(valid.sum()), size=batch_size)  # (B,) index over all valid starts
        ends = np.cumsum(valid)
        shard = np.searchsorted(ends, flat, side="right")  # (B,)
        start = flat - (ends[shard] - valid[shard])
        return list(zip(shard.tolist(), start.tolist()))

    def batch(self, step: int, batch_size: int, seq_len: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Random training windows: input_ids (B, T) int64 and boundary (B, T) bool.

        A pure function of (seed, step, batch_size, seq_len) (see ``sample_windows``), so a run resumed
        at step s sees exactly the batches it would have seen.
        """
        return self._stack(self.sample_windows(step, batch_size, seq_len, seed), seq_len)

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed evaluation batches: consecutive non-overlapping windows from the start of the split.

        The same windows on every call, so evaluations at different steps are comparable. At most
        ``max_batches`` batches; the last may hold fewer than ``batch_size`` rows when the split runs out.
        """
        if batch_size < 1 or seq_len < 1 or max_batches < 1:
            raise ValueError(f"batch_size, seq_len and max_batches must be >= 1, got "
                             f"{batch_size}, {seq_len}, {max_batches}")
        every = ((k, s) for k, t in enumerate(self.tokens) for s in range(0, len(t) - seq_len + 1, seq_len))
        windows = list(itertools.islice(every, batch_size * max_batches))
        for i in range(0, len(windows), batch_size):
            yield self._stack(windows[i:i + batch_size], seq_len)

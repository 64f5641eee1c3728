"""Row stores: where one layer's Engram table lives. Each answers one question, ``gather``.

Legend: n requested rows, d_h row width, S scales per row.

Contract shared by every store (and by ``RowCache``, which wraps one):
  ``gather(rows)``: rows (n,) int64 on the CPU, unique -> (n, d_h) float32 on the CPU, row i = table[rows[i]],
  decoded from the stored format (``engram.storage.formats``);
  ``gather_encoded(rows)``: the same rows as stored, codes (n, d_h) and scales (n, S) or None, which
  ``format.decode`` turns into ``gather``'s rows (the row cache keeps rows encoded);
  ``warm(rows)``: whether gathering those rows is fast now (RAM, or disk pages in the page cache), so a
  caller may gather inline instead of handing the work to a thread; ``gather(rows, warm=True)`` then
  skips the store's own check;
  ``num_rows``, ``dim``, ``format``: the table's shape and stored format; ``nbytes``: the table's size as
  stored (codes and scales); ``ram_bytes``: what this store itself keeps in host RAM (the page cache of a
  disk table is the kernel's, not counted).
Rows come back as float32 whatever the stored format, so tiers are exact against each other (at equal
format) and the embedding casts once to the model's dtype.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import torch

from engram.storage import mapping
from engram.storage.export import TableEntry
from engram.storage.formats import RowFormat, from_numpy, row_format
from engram.storage.mapping import PAGE, as_tensor, file_map, mapped_bytes, release, view_rows

RESIDENT_SAMPLE = 8  # row pages checked before a read-ahead: all cached means the table is warm
SMALL_REQUEST = 1024  # rows: below it a request is decode-sized, and the checks below are spread over calls
WARM_TRUST = 8  # after a warm verdict, the next small requests up to this many are trusted warm unchecked


class _Pacing:
    """How often a disk store checks what costs ~100 us in a model's decode step (the caches cold from the
    layers between two gathers): its rows' residency, and its mapped budget.

    Residency (``warm``): checked on every request of ``SMALL_REQUEST`` rows or more, and on one small request
    in ``WARM_TRUST`` while the table is found warm; a cold verdict is checked again on the next request. A
    table that goes cold (its pages evicted) is noticed within ``WARM_TRUST`` small requests, which meanwhile
    fault their pages in one by one. The budget (``budget_due``): checked after any gather that brings the
    rows read since the last check to ``SMALL_REQUEST`` (the first gather always checks)."""

    def __init__(self):
        self.trusted = 0  # small requests still trusted warm after the last warm verdict
        self.unread = SMALL_REQUEST  # rows read since the budget was checked

    def warm(self, n: int, check) -> bool:
        if n < SMALL_REQUEST and self.trusted > 0:
            self.trusted -= 1
            return True
        warm = check()
        self.trusted = WARM_TRUST - 1 if warm else 0
        return warm

    def budget_due(self, n: int) -> bool:
        self.unread += n
        if self.unread < SMALL_REQUEST:
            return False
        self.unread = 0
        return True


class HostStore:
    """The table in host RAM, pinned when CUDA is present (docs/PITFALLS.md §13: pageable memory turns
    ``non_blocking`` copies synchronous). Built from a model's table (``HostStore(weight)``: on a CPU model
    the fp32 tensor is shared, not copied; ``format`` encodes it first, e.g. "int8") or from an exported
    table's files (``from_entry``: its codes and scales read into RAM)."""

    def __init__(self, table: torch.Tensor, pin: bool | None = None, format: str | RowFormat | None = None,
                 scales: torch.Tensor | None = None):
        pin = torch.cuda.is_available() if pin is None else pin
        if format is None:  # a float table is kept in its own dtype (others, e.g. float64, as float32)
            format = table.dtype if table.dtype in (torch.float32, torch.float16, torch.bfloat16) else "float32"
        self.format = format if isinstance(format, RowFormat) else row_format(format)
        table = table.detach().to("cpu").contiguous()  # (num_rows, d_h)
        if scales is None and (self.format.quantised or table.dtype != self.format.code_dtype):
            table, scales = self.format.encode(table)  # the model's fp32 rows, stored in this format
        self.table = table.pin_memory() if pin else table  # codes (num_rows, d_h)
        self.scales = None if scales is None else (scales.pin_memory() if pin else scales)  # (num_rows, S)

    @classmethod
    def from_store(cls, store, pin: bool | None = None) -> "HostStore":
        """Every row of another store (a file, a checkpoint's parts) read into RAM in its stored format."""
        codes, scales = store.gather_encoded(torch.arange(store.num_rows, dtype=torch.int64))
        return cls(codes, pin, store.format, scales)

    @classmethod
    def from_entry(cls, entry: TableEntry, pin: bool | None = None) -> "HostStore":
        """An exported layer's files (as ``open_tables`` checked them) read into RAM."""
        disk = DiskStore.from_entry(entry)
        codes = from_numpy(np.array(disk.array), disk.format.code_dtype)  # a copy in RAM
        scales = None if disk.scales is None else from_numpy(np.array(disk.scales), disk.format.scale_dtype)
        return cls(codes, pin, disk.format, scales)

    @property
    def num_rows(self) -> int:
        return self.table.shape[0]

    @property
    def dim(self) -> int:
        return self.table.shape[1]

    @property
    def nbytes(self) -> int:
        scales = 0 if self.scales is None else self.scales.numel() * self.scales.element_size()
        return self.table.numel() * self.table.element_size() + scales

    @property
    def ram_bytes(self) -> int:
        return self.nbytes

    def warm(self, rows: torch.Tensor) -> bool:
        return True

    def gather_encoded(self, rows: torch.Tensor, warm: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        codes = self.table.index_select(0, rows)  # (n, d_h)
        return codes, None if self.scales is None else self.scales.index_select(0, rows)  # (n, S)

    def gather(self, rows: torch.Tensor, warm: bool | None = None) -> torch.Tensor:  # (n,) -> (n, d_h)
        return self.format.decode(*self.gather_encoded(rows))


class DiskStore:
    """A read-only ``np.memmap`` of one exported layer file (and of its scales, for a quantised format):
    the table may be larger than RAM; only the pages of requested rows are read (and kept in the kernel's
    page cache). ``offset`` / ``scales_offset``: where the rows start in their files, so a tensor inside
    another container (a safetensors shard: ``from_safetensors``) is served in place, never copied.

    A gather first queues the reads of all the pages its rows lie on (``read_ahead``), then copies the
    rows out of the map; ``readahead = False`` (on the class or an instance) turns that off, for comparison.
    Once the process maps more than ``mapped_budget`` bytes of files, a gather releases its maps' pages
    (``release_mappings``), so the process's RSS stays bounded whatever the table's size; the budget is
    checked after any gather that brings the rows read since the last check to ``SMALL_REQUEST``."""

    readahead = True
    mapped_budget = 1 << 30  # bytes of files this process may map beyond what it mapped before the store

    def __init__(self, path, num_rows: int, dim: int, dtype: str | RowFormat = "float32", scales_path=None,
                 offset: int = 0, scales_offset: int = 0):
        self.format = dtype if isinstance(dtype, RowFormat) else row_format(dtype)
        if self.format.quantised and scales_path is None:
            raise ValueError(f"a {self.format.name} table needs its scales file")
        self.path = path
        self.dtype = self.format.name
        # one map per file, shared by every store in it (a checkpoint's 512 table parts in a few shards)
        self._maps = [file_map(path, self.readahead)] + (
            [] if scales_path is None else [file_map(scales_path, self.readahead)])
        self.array = view_rows(self._maps[0], np.dtype(self.format.numpy_dtype), (num_rows, dim), offset, path)
        self.scales = None if scales_path is None else view_rows(
            self._maps[1], np.dtype(self.format.scale_numpy_dtype),
            (num_rows, self.format.scales_per_row(dim)), scales_offset, scales_path)
        # the same bytes as tensors, for index_select; None where the files' byte order is not the CPU's
        codes, scales = as_tensor(self.array, self.format.code_dtype), as_tensor(self.scales, self.format.scale_dtype)
        self._tensors = None if codes is None or (self.scales is not None and scales is None) else (codes, scales)
        self._addresses = [self.array.ctypes.data] + ([] if self.scales is None else [self.scales.ctypes.data])
        # (path, first byte, bytes per row) of each file, for the batched read-ahead
        self._files = [(path, offset, self.array.strides[0])] + (
            [] if self.scales is None else [(scales_path, scales_offset, self.scales.strides[0])])
        self._baseline = mapped_bytes()  # files the process mapped before: not this store's to release
        self._pacing = _Pacing()

    @classmethod
    def from_safetensors(cls, codes, scales=None) -> "DiskStore":
        """A table stored as a safetensors tensor ``codes`` (``SafetensorsTensor``: (rows, d_h) fp32, fp16, bf16
        or fp8 e4m3) and, for fp8, ``scales`` (rows, d_h / block) ue8m0, each read where it lies in its shard."""
        dtypes = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "fp8_e4m3"}
        if codes.dtype not in dtypes or len(codes.shape) != 2:
            raise ValueError(f"{codes.name}: a table is a (rows, d_h) tensor of {sorted(dtypes)}, got {codes.dtype} "
                             f"{codes.shape}")
        rows, dim = codes.shape
        fmt = row_format(dtypes[codes.dtype])
        if fmt.quantised:
            if scales is None or scales.dtype not in ("F8_E8M0", "U8") or len(scales.shape) != 2 or \
                    scales.shape[0] != rows or dim % scales.shape[1]:
                got = None if scales is None else (scales.dtype, scales.shape)
                raise ValueError(f"{codes.name} is fp8: it needs ue8m0 scales of shape ({rows}, {dim} / block), got {got}")
            fmt = row_format("fp8_e4m3", block=dim // scales.shape[1])
        elif scales is not None:
            raise ValueError(f"{codes.name} is {codes.dtype}: it has no scales, but {scales.name} was given")
        return cls(codes.path, rows, dim, fmt, None if scales is None else scales.path, codes.offset,
                   0 if scales is None else scales.offset)

    @classmethod
    def from_entry(cls, entry: TableEntry) -> "DiskStore":
        return cls(entry.path, entry.rows, entry.dim, entry.format,
                   None if entry.scales is None else entry.scales.path)

    @property
    def num_rows(self) -> int:
        return self.array.shape[0]

    @property
    def dim(self) -> int:
        return self.array.shape[1]

    @property
    def nbytes(self) -> int:
        return self.array.nbytes + (0 if self.scales is None else self.scales.nbytes)

    @property
    def ram_bytes(self) -> int:
        return 0

    def read_ahead(self, idx: np.ndarray) -> None:
        """Queue the reads of every page that rows ``idx`` (ascending) lie on, all at once, as merged runs of
        pages (``posix_fadvise(WILLNEED)``: the kernel reads them in the background, many in flight), before
        any is touched. Without it a cold table is read one page fault at a time (docs/BENCHMARKS.md)."""
        if not self.readahead or not hasattr(os, "posix_fadvise") or len(idx) == 0:
            return
        for path, base, row_bytes in self._files:
            start = base + idx.astype(np.int64) * row_bytes
            first, last = start // PAGE, (start + row_bytes - 1) // PAGE  # pages of each row, ascending
            new_run = np.flatnonzero(first[1:] > last[:-1] + 1) + 1  # a gap between two rows' pages
            begins, ends = first[np.r_[0, new_run]], last[np.r_[new_run - 1, len(idx) - 1]]
            fd = os.open(path, os.O_RDONLY)
            try:
                for b, e in zip(begins.tolist(), ends.tolist()):
                    os.posix_fadvise(fd, b * PAGE, (e - b + 1) * PAGE, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def _resident(self, idx: np.ndarray) -> bool:
        """Whether a sample of the rows' pages is all in the page cache (``mincore``; False where it is not
        available): a warm table skips the read-ahead, whose system calls would only cost time. 8 code pages,
        or one per 64 rows of a larger request (a 90%-cached batch of 4k rows then reads ahead with probability
        1 - 0.9^64 > 99.8%), and one scale page per 8 of those (a scale page holds the scales of hundreds of
        rows, so it is cached whenever its rows are). ~1 us per page checked."""
        if mapping.LIBC is None:
            return False
        if len(idx) == 0:
            return True
        count = max(RESIDENT_SAMPLE, len(idx) // 64)
        sample = idx[:: max(1, len(idx) // count)][:count].astype(np.int64)
        flag = ctypes.c_ubyte()
        ref, mincore = ctypes.byref(flag), mapping.LIBC.mincore
        for i, (base, (_, _, row_bytes)) in enumerate(zip(self._addresses, self._files)):
            rows = sample if i == 0 else sample[::8]
            for address in np.unique((base + rows * row_bytes) & ~(PAGE - 1)).tolist():
                if mincore(address, PAGE, ref) != 0 or not flag.value & 1:
                    return False
        return True

    def _warm(self, idx: np.ndarray) -> bool:
        return self._pacing.warm(len(idx), lambda: self._resident(idx))

    def warm(self, rows: torch.Tensor) -> bool:
        return self._warm(rows.numpy())

    def copy_rows(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows ``idx`` (ascending) copied out of the maps, as stored: no read-ahead, no release."""
        if self._tensors is None:  # numpy's indexing, which converts the byte order
            codes = from_numpy(self.array[idx], self.format.code_dtype)  # (n, d_h): just these rows
            return codes, None if self.scales is None else from_numpy(self.scales[idx], self.format.scale_dtype)
        at, (codes, scales) = torch.from_numpy(np.asarray(idx, dtype=np.int64)), self._tensors
        return codes.index_select(0, at), None if scales is None else scales.index_select(0, at)  # (n, d_h), (n, S)

    def over_budget(self) -> bool:
        return mapped_bytes() - self._baseline > self.mapped_budget

    def gather_encoded(self, rows: torch.Tensor, warm: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = rows.numpy()
        try:
            if np.all(idx[1:] > idx[:-1]):  # OffloadedEmbedding and RowCache ask in ascending order
                if not (warm or self._warm(idx)):
                    self.read_ahead(idx)
                return self.copy_rows(idx)
            order = np.argsort(idx, kind="stable")  # read in ascending offsets
            ordered = idx[order]
            if not (warm or self._warm(ordered)):
                self.read_ahead(np.unique(idx))
            back = torch.from_numpy(np.argsort(order, kind="stable"))  # then back to the caller's order
            codes, scales = self.copy_rows(ordered)
            return codes[back], None if scales is None else scales[back]
        finally:
            if self._pacing.budget_due(len(idx)) and self.over_budget():
                self.release_mappings()

    def release_limit(self) -> int:
        """Mapped file bytes a release brings the process down to: one ``RELEASE_CHUNK`` below the budget."""
        return self._baseline + max(0, self.mapped_budget - mapping.RELEASE_CHUNK)

    def release_mappings(self, everything: bool = False) -> None:
        """Drop this process's page-table entries of the maps (``MADV_DONTNEED``; the pages stay in the page
        cache, and the next touch maps them again) until it maps ``release_limit()`` bytes of files, or all
        of them (``everything=True``). Without it a table's mapped pages count in the process's RSS and only
        grow: a fault maps a whole large folio of the page cache (up to 2 MiB), so a few thousand random rows
        map an entire freshly written 1 GiB file. A gather calls it once the process maps ``mapped_budget``
        bytes of files more than when the store was made; ~0.15 ms in a model's decode step
        (docs/BENCHMARKS.md)."""
        release(self._maps, None if everything else self.release_limit())

    def gather(self, rows: torch.Tensor, warm: bool | None = None) -> torch.Tensor:  # (n,) -> (n, d_h)
        return self.format.decode(*self.gather_encoded(rows, warm))


class ConcatStore:
    """One table whose rows are held by several stores one after another (a table saved in parts, as
    transformers saves Qwen4-Exp's ``split_ngram_parts``): served where each part lies, never concatenated.
    All parts share the row width and the stored format."""

    def __init__(self, parts: list):
        if not parts:
            raise ValueError("ConcatStore needs at least one part")
        first = parts[0]
        for i, part in enumerate(parts):
            if part.dim != first.dim or part.format != first.format:
                raise ValueError(f"part {i} holds {part.format.name} rows of width {part.dim}, part 0 "
                                 f"{first.format.name} of width {first.dim}: the parts of one table must agree")
        self.parts, self.format = list(parts), first.format
        self.bounds = np.cumsum([0] + [p.num_rows for p in parts])  # part i holds rows [bounds[i], bounds[i+1])
        self._pacing = _Pacing()

    @property
    def num_rows(self) -> int:
        return int(self.bounds[-1])

    @property
    def dim(self) -> int:
        return self.parts[0].dim

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.parts)

    @property
    def ram_bytes(self) -> int:
        return sum(p.ram_bytes for p in self.parts)

    def _groups(self, idx: np.ndarray) -> list:
        """(part, its rows in ascending order, their places in the request) of each part ``idx`` touches."""
        which = np.searchsorted(self.bounds, idx, side="right") - 1  # (n,) the part of each row
        groups = []
        for p in np.unique(which):
            at = np.flatnonzero(which == p)
            local = idx[at] - self.bounds[p]
            order = np.argsort(local, kind="stable")
            groups.append((self.parts[p], local[order], at[order]))
        return groups

    def _sample_warm(self, idx: np.ndarray) -> bool:
        """One residency sample for the whole request, not one per part: ``RESIDENT_SAMPLE`` of its rows (one
        per 64 of a larger request), each checked in the part that holds it."""
        count = max(RESIDENT_SAMPLE, len(idx) // 64)
        sample = np.sort(idx[:: max(1, len(idx) // count)][:count])
        which = np.searchsorted(self.bounds, sample, side="right") - 1  # the part of each sampled row
        for p in np.unique(which):
            part, local = self.parts[p], sample[which == p] - self.bounds[p]
            if not (part._resident(local) if isinstance(part, DiskStore) else part.warm(torch.from_numpy(local))):
                return False
        return True

    def _warm(self, idx: np.ndarray) -> bool:
        return self._pacing.warm(len(idx), lambda: self._sample_warm(idx))

    def warm(self, rows: torch.Tensor) -> bool:
        return self._warm(rows.numpy())

    def gather_encoded(self, rows: torch.Tensor, warm: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        idx = rows.numpy()
        groups = self._groups(idx)
        on_disk = all(isinstance(part, DiskStore) for part, _, _ in groups)
        if on_disk and not (warm or self._warm(idx)):  # one read-ahead pass for the request
            for part, local, _ in groups:
                part.read_ahead(local)
        codes = torch.empty(len(idx), self.dim, dtype=self.format.code_dtype)
        scales = None
        try:
            for part, local, at in groups:
                c, s = part.copy_rows(local) if on_disk else part.gather_encoded(torch.from_numpy(local))
                where = torch.from_numpy(at)
                codes[where] = c
                if s is not None:
                    if scales is None:
                        scales = torch.empty(len(idx), s.shape[1], dtype=s.dtype)
                    scales[where] = s
        finally:
            if on_disk and groups and self._pacing.budget_due(len(idx)) and groups[0][0].over_budget():
                release({id(m): m for part, _, _ in groups for m in part._maps}.values(),  # shared maps once
                         groups[0][0].release_limit())
        return codes, scales

    def gather(self, rows: torch.Tensor, warm: bool | None = None) -> torch.Tensor:  # (n,) -> (n, d_h)
        return self.format.decode(*self.gather_encoded(rows, warm))

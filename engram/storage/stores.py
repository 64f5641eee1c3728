"""Row stores: where one layer's Engram table lives. Each answers one question, ``gather``.

Legend: n requested rows, d_h row width.

Contract shared by every store (and by ``RowCache``, which wraps one):
  ``gather(rows)``: rows (n,) int64 on the CPU, unique -> (n, d_h) float32 on the CPU, row i = table[rows[i]].
  ``num_rows``, ``dim``: the table's shape; ``nbytes``: the table's size in its stored dtype;
  ``ram_bytes``: what this store itself keeps in host RAM (the page cache of a disk table is the
  kernel's, not counted).
Rows come back as float32 whatever the stored dtype, so tiers are exact against each other and the
embedding casts once to the model's dtype.
"""

from __future__ import annotations

import numpy as np
import torch

from engram.storage.export import DTYPES, TableEntry


class HostStore:
    """The table in host RAM, pinned when CUDA is present (PITFALLS 13: pageable memory turns
    ``non_blocking`` copies synchronous). On a CPU model the tensor is shared, not copied."""

    def __init__(self, table: torch.Tensor, pin: bool | None = None):
        pin = torch.cuda.is_available() if pin is None else pin
        table = table.detach().to("cpu").contiguous()  # (num_rows, d_h)
        self.table = table.pin_memory() if pin else table

    @property
    def num_rows(self) -> int:
        return self.table.shape[0]

    @property
    def dim(self) -> int:
        return self.table.shape[1]

    @property
    def nbytes(self) -> int:
        return self.table.numel() * self.table.element_size()

    @property
    def ram_bytes(self) -> int:
        return self.nbytes

    def gather(self, rows: torch.Tensor) -> torch.Tensor:  # (n,) -> (n, d_h)
        return self.table.index_select(0, rows).float()


class DiskStore:
    """A read-only ``np.memmap`` of one exported layer file: the table may be larger than RAM; only
    the pages of requested rows are read (and kept in the kernel's page cache)."""

    def __init__(self, path, num_rows: int, dim: int, dtype: str = "float32"):
        if dtype not in DTYPES:
            raise ValueError(f"unknown table dtype {dtype!r}; known: {sorted(DTYPES)}")
        self.path = path
        self.dtype = dtype
        self.array = np.memmap(path, dtype=np.dtype(DTYPES[dtype][1]), mode="r", shape=(num_rows, dim))

    @classmethod
    def from_entry(cls, entry: TableEntry) -> "DiskStore":
        return cls(entry.path, entry.rows, entry.dim, entry.dtype)

    @property
    def num_rows(self) -> int:
        return self.array.shape[0]

    @property
    def dim(self) -> int:
        return self.array.shape[1]

    @property
    def nbytes(self) -> int:
        return self.array.nbytes

    @property
    def ram_bytes(self) -> int:
        return 0

    def gather(self, rows: torch.Tensor) -> torch.Tensor:  # (n,) -> (n, d_h)
        idx = rows.numpy()
        if np.all(idx[1:] > idx[:-1]):  # already ascending (OffloadedEmbedding and RowCache ask so)
            out = self.array[idx]  # (n, d_h) fancy indexing copies just these rows out of the map
        else:
            order = np.argsort(idx, kind="stable")  # ascending offsets: sequential-ish reads, readahead helps
            out = np.empty((len(idx), self.dim), dtype=self.array.dtype)
            out[order] = self.array[idx[order]]  # back to the caller's order
        if self.dtype == "bfloat16":
            return torch.from_numpy(out.view(np.int16)).view(torch.bfloat16).float()
        return torch.from_numpy(out).float()

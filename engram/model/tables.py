"""Hashed tables: what every table answers, wherever its rows live, and the device-resident one.

Legend: B batch, T time, H hash heads, d_h row width, N rows of the flat table.

``HashedTable`` is the one type the rest of the code asks for ("which tables does this model have":
``EngramLM.named_tables``). Its implementations are the device table here (``MultiHeadEmbedding``), a
row-sharded block (``engram.distributed.ShardedEmbedding``) and an offloaded table
(``engram.storage.OffloadedEmbedding``); the placements swap one for another on a built model.

Whether a table's gradient is sparse (only the looked-up rows, for SparseAdam: docs/PITFALLS.md §12) is
decided when it is built or placed (``sparse``), never flipped later by an optimizer.

Table rows are initialised by ``normal_rows_``: rows come from independently seeded blocks of
``INIT_BLOCK_ROWS``, so a rank holding rows [a, b) of a table fills exactly the rows a whole table
would hold there, without ever materialising the rest.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from engram.hashing import TableGeometry

INIT_BLOCK_ROWS = 8192


def row_block_seed(seed: int, block: int) -> int:
    """The generator seed of rows [block * INIT_BLOCK_ROWS, (block + 1) * INIT_BLOCK_ROWS) of a table."""
    digest = hashlib.sha256(f"engram.table-init:{seed}:{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@torch.no_grad()
def normal_rows_(weight: torch.Tensor, first_row: int, std: float, seed: int) -> torch.Tensor:
    """Fill ``weight`` (n, d_h), which holds rows [first_row, first_row + n) of a table, with N(0, std)
    rows that depend only on (seed, row): whole tables and row shards of them agree row for row."""
    n, dim = weight.shape
    if n == 0 or weight.device.type == "meta":
        return weight
    first_block, last_block = first_row // INIT_BLOCK_ROWS, (first_row + n - 1) // INIT_BLOCK_ROWS
    generator = torch.Generator(device=weight.device)
    scratch = None
    for b in range(first_block, last_block + 1):
        generator.manual_seed(row_block_seed(seed, b))
        lo, hi = max(first_row, b * INIT_BLOCK_ROWS), min(first_row + n, (b + 1) * INIT_BLOCK_ROWS)
        if hi - lo == INIT_BLOCK_ROWS:  # a whole block: fill it in place
            weight[lo - first_row: hi - first_row].normal_(0.0, std, generator=generator)
            continue
        # part of a block: fill the whole block and copy the part (a fill's prefix is not a shorter fill)
        if scratch is None:
            scratch = torch.empty(INIT_BLOCK_ROWS, dim, dtype=weight.dtype, device=weight.device)
        scratch.normal_(0.0, std, generator=generator)
        weight[lo - first_row: hi - first_row].copy_(scratch[lo - b * INIT_BLOCK_ROWS: hi - b * INIT_BLOCK_ROWS])
    return weight


class HashedTable(nn.Module):
    """A flat table of H hashed heads: hash ids (B, T, H) -> rows (B, T, H, d_h). What every placement of a
    table answers, so nothing asks a table what it is (``isinstance``) or probes it (``hasattr``):

    offsets      (H,) buffer, head j's first row
    num_rows     N, rows of the flat table; dim: d_h, the row width
    sparse       whether its gradient holds only the looked-up rows (for SparseAdam: docs/PITFALLS.md §12)
    trainable    whether it holds rows an optimizer steps (``weight``, filled by ``init_weights(std, seed)``)
    prefetch     ``prefetch(hash_ids)``: start fetching the rows of the coming forward; nothing to do for a
                 table whose rows are at hand (the default)
    rows(a, b)   rows [a, b) of the flat table, fp32 on the CPU, wherever they live (what export reads)
    reset_buffers()  rewrites derived buffers after ``to_empty``
    """

    sparse: bool = False

    @property
    def trainable(self) -> bool:
        return False

    def prefetch(self, hash_ids: torch.Tensor) -> None:
        """Rows of a device or host-resident table are at hand: nothing to fetch ahead."""

    def reset_buffers(self) -> None:
        """Rewrite derived buffers (``offsets``) after ``to_empty``; a table without any has none to rewrite."""

    def init_weights(self, std: float, seed: int) -> None:
        """Fill the trainable rows N(0, std) from ``seed``; a table without trainable rows has none to fill."""

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) (n, d_h) fp32 on the CPU; a table holding a parameter reads it."""
        if not self.trainable:
            raise ValueError(f"{type(self).__name__} cannot read its rows here")
        return self.weight[start:stop].detach().to("cpu", torch.float32)


class TableHost:
    """Declared (by subclassing) by every model that holds Engram tables, so placements and tools take any of
    them without asking what it is: ``EngramLM``, ``engram.hf.EngramForCausalLM``, the retrofit
    ``EngramAdapter``, and any later host. ``engram.storage.apply_storage`` and ``export_tables`` accept a
    ``TableHost`` and nothing else.

    engram_layers  block index -> its Engram module, whose ``embedding`` is a ``HashedTable``
    hasher         the ``NgramHasher`` that addresses them (None when the model has no Engram layer)
    named_tables() module name -> every ``HashedTable`` of the model (Engram's and any other, such as
                   OverEncoding's), whatever placement holds its rows
    contributions() block index -> the module whose output is Engram's contribution (what knock-out zeroes;
                   the Engram module itself unless a host says otherwise)

    Models built elsewhere are hosts through an adapter that ``as_table_host`` finds: transformers'
    Qwen4-Exp (``engram.model.qwen4exp``).
    """

    @property
    def engram_layers(self) -> dict[int, nn.Module]:
        raise NotImplementedError(f"{type(self).__name__} declares TableHost but has no engram_layers")

    def named_tables(self) -> dict[str, HashedTable]:
        raise NotImplementedError(f"{type(self).__name__} declares TableHost but has no named_tables")

    def contributions(self) -> dict[int, nn.Module]:
        return self.engram_layers


def as_table_host(model, who: str) -> TableHost:
    """``model`` when it declares ``TableHost``, or its adapter (a transformers Qwen4-Exp model); else a
    one-line error saying what ``who`` takes."""
    if isinstance(model, TableHost):
        return model
    from engram.model.qwen4exp import qwen4exp_host

    host = qwen4exp_host(model)
    if host is None:
        raise TypeError(f"{who} takes a model holding Engram tables (a TableHost: EngramLM, EngramForCausalLM, "
                        f"an EngramAdapter, or transformers' Qwen4-Exp with PLE layers), got {type(model).__name__}")
    return host


class MultiHeadEmbedding(HashedTable):
    """All heads of one layer in one flat table on the model's device (docs/ALGORITHM.md §2 step 5).

    ``geometry`` (from the hasher) fixes the head sizes and offsets. ``sparse`` makes the backward
    produce a sparse gradient holding only the looked-up rows, so a sparse optimizer costs O(rows
    touched) (docs/PITFALLS.md §12).
    """

    def __init__(self, geometry: TableGeometry, dim: int, sparse: bool = False):
        super().__init__()
        self.geometry = geometry
        self.sparse = sparse
        self.register_buffer("offsets", torch.empty(geometry.n_heads, dtype=torch.int64), persistent=False)  # (H,)
        self.weight = nn.Parameter(torch.empty(geometry.num_rows, dim))
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        self.offsets.copy_(torch.tensor(self.geometry.offsets, dtype=torch.int64))

    @property
    def trainable(self) -> bool:
        return True

    @property
    def num_rows(self) -> int:
        return self.weight.shape[0]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def init_weights(self, std: float, seed: int) -> None:
        """Rows N(0, std) from ``seed`` (``normal_rows_``); std 0 gives zeros."""
        if std == 0:
            with torch.no_grad():
                self.weight.zero_()
        else:
            normal_rows_(self.weight, 0, std, seed)

    def forward(self, hash_ids: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H, d_h)
        return F.embedding(hash_ids + self.offsets, self.weight, sparse=self.sparse)

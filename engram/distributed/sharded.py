"""A row-sharded embedding table over a process group (issue 7, SPEC §5 "training at scale").

Legend: U distinct rows a rank asks for, R rows a rank serves, W world size, d row width.

Rows are padded to a multiple of W and rank r owns the contiguous block
``[r * rows_per_rank, (r + 1) * rows_per_rank)``. A lookup is three ``all_to_all`` exchanges:

    forward:  ids (any shape) -> unique ids U, sorted, hence grouped by owner
              counts -> owners; ids -> owners (R per rank); owners gather R local rows -> back (U, d)
              rows[inverse] -> (*ids.shape, d)
    backward: grad (*ids.shape, d) -> summed per unique id (U, d) -> owners (R, d)
              -> the local shard's gradient: sparse (only the R rows) or dense

Only distinct rows travel, so the bytes moved per step depend on the batch, never on the table size.
Every rank must call ``forward`` (and ``backward``) the same number of times, as with any collective;
a rank with an empty batch still takes part.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn


def _exchange(tensor: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """all_to_all along dim 0: send[r] rows of ``tensor`` go to rank r, recv[r] rows come from it."""
    out = tensor.new_empty((sum(recv), *tensor.shape[1:]))
    dist.all_to_all_single(out, tensor.contiguous(), recv, send, group=group)
    return out


class _ShardedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, shard, rows_per_rank, group, sparse):
        world = dist.get_world_size(group)
        flat = ids.reshape(-1)
        unique, inverse = torch.unique(flat, sorted=True, return_inverse=True)  # (U,), (N,)
        owner = unique // rows_per_rank  # non-decreasing, because unique is sorted
        send = torch.bincount(owner, minlength=world)  # (W,) rows asked of each rank
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)  # rows each rank asks of us
        send_l, recv_l = send.tolist(), recv.tolist()  # the host sync: split sizes are ints
        start = dist.get_rank(group) * rows_per_rank
        served = _exchange(unique, send_l, recv_l, group) - start  # (R,) local row indices
        rows = _exchange(shard.detach().index_select(0, served), recv_l, send_l, group)  # (U, d)
        ctx.save_for_backward(inverse, served)
        ctx.meta = (send_l, recv_l, group, sparse, shard.shape, unique.numel())
        return rows.index_select(0, inverse).reshape(*ids.shape, shard.shape[1])

    @staticmethod
    def backward(ctx, grad):
        inverse, served = ctx.saved_tensors
        send_l, recv_l, group, sparse, shape, n_unique = ctx.meta
        grad = grad.reshape(-1, shape[1])
        per_row = grad.new_zeros(n_unique, shape[1]).index_add_(0, inverse, grad)  # (U, d)
        received = _exchange(per_row, send_l, recv_l, group)  # (R, d): gradients of the rows we own
        if sparse:
            grad_shard = torch.sparse_coo_tensor(served[None], received, shape).coalesce()
        else:
            grad_shard = received.new_zeros(shape).index_add_(0, served, received)
        return None, grad_shard, None, None, None


def sharded_lookup(ids: torch.Tensor, shard: torch.Tensor, rows_per_rank: int, group=None,
                   sparse: bool = False) -> torch.Tensor:
    """Rows ``ids`` (global row indices, any shape) of the table whose local block is ``shard``."""
    return _ShardedLookup.apply(ids, shard, rows_per_rank, group, sparse)


class ShardedTable(nn.Module):
    """The local block of a ``num_rows`` x ``dim`` table split by rows over ``group``.

    ``weight`` holds rows ``[start, start + rows_per_rank)``; rows past ``num_rows`` are padding that
    no valid id reaches. ``sparse`` makes the shard's gradient a sparse tensor of the rows served.
    """

    def __init__(self, num_rows: int, dim: int, group=None, sparse: bool = True):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("ShardedTable needs an initialised torch.distributed process group")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_rows, self.dim, self.sparse = num_rows, dim, sparse
        self.rows_per_rank = math.ceil(num_rows / self.world)
        self.start = self.rank * self.rows_per_rank
        self.weight = nn.Parameter(torch.zeros(self.rows_per_rank, dim))

    @torch.no_grad()
    def load_full(self, full: torch.Tensor) -> None:
        """Take this rank's block of a full (num_rows, dim) table (e.g. from a single-process model)."""
        if full.shape != (self.num_rows, self.dim):
            raise ValueError(f"expected a ({self.num_rows}, {self.dim}) table, got {tuple(full.shape)}")
        block = full[self.start: self.start + self.rows_per_rank]
        self.weight.zero_()
        self.weight[: block.shape[0]].copy_(block)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...) int64 -> (..., d)
        return sharded_lookup(ids, self.weight, self.rows_per_rank, self.group, self.sparse)

"""A row-sharded embedding table over a process group (docs/ALGORITHM.md §5 "training at scale").

Legend: U distinct rows a rank asks for, R rows a rank serves, W world size, d row width.

Rows are padded to a multiple of W and rank r owns the contiguous block
``[r * rows_per_rank, (r + 1) * rows_per_rank)``. A lookup is three ``all_to_all`` exchanges:

    forward:  ids (any shape) -> unique ids U, sorted, hence grouped by owner
              counts -> owners; ids -> owners (R per rank); owners gather R local rows -> back (U, d)
              rows[inverse] -> (*ids.shape, d)
    backward: grad (*ids.shape, d) -> summed per unique id (U, d) -> owners (R, d)
              -> the local shard's gradient: sparse (only the R rows) or dense, times ``grad_scale``

Under data parallelism every rank's loss is the mean over its own part of the batch, and
DistributedDataParallel averages the dense gradients over ranks; ``shard_tables`` sets
``grad_scale = 1/W`` so that a row's gradient is averaged the same way, and W ranks train the model
one process trains on the concatenated batch.

Only distinct rows travel, so the bytes moved per step depend on the batch, never on the table size.
Every rank must call ``forward`` (and ``backward``) the same number of times, as with any collective;
a rank with an empty batch still takes part.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from engram.hashing import TableGeometry
from engram.model.tables import HashedTable, MultiHeadEmbedding, normal_rows_


class Traffic:
    """Bytes this process has sent to other ranks, by kind (for benchmarks and the training log):

    ``lookup_bytes``: the sharded lookups' all_to_all traffic (ids and split sizes out, rows back,
    row gradients to their owners), not counting what a rank exchanges with itself.
    ``allreduce_bytes``: the payload of the dense gradients' all-reduce buckets (``wrap_ddp``); a ring
    all-reduce sends about 2(W-1)/W times this per rank.
    ``allgather_bytes``, ``reduce_scatter_bytes``: under FSDP2 (``engram.distributed.fsdp``), the payload
    of the weights' all-gathers (the gathered units) and of the gradients' reduce-scatters; a ring sends
    about (W-1)/W times each per rank.
    """

    def __init__(self):
        self.lookup_bytes = 0
        self.allreduce_bytes = 0
        self.allgather_bytes = 0
        self.reduce_scatter_bytes = 0

    def snapshot(self) -> dict:
        return {"lookup_bytes": self.lookup_bytes, "allreduce_bytes": self.allreduce_bytes,
                "allgather_bytes": self.allgather_bytes, "reduce_scatter_bytes": self.reduce_scatter_bytes}


TRAFFIC = Traffic()


def _exchange(tensor: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """all_to_all along dim 0: send[r] rows of ``tensor`` go to rank r, recv[r] rows come from it."""
    out = tensor.new_empty((sum(recv), *tensor.shape[1:]))
    dist.all_to_all_single(out, tensor.contiguous(), recv, send, group=group)
    row_bytes = math.prod(tensor.shape[1:]) * tensor.element_size()
    TRAFFIC.lookup_bytes += (sum(send) - send[dist.get_rank(group)]) * row_bytes
    return out


class _ShardedLookup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ids, shard, rows_per_rank, group, sparse, grad_scale):
        world = dist.get_world_size(group)
        flat = ids.reshape(-1)
        unique, inverse = torch.unique(flat, sorted=True, return_inverse=True)  # (U,), (N,)
        owner = unique // rows_per_rank  # non-decreasing, because unique is sorted
        send = torch.bincount(owner, minlength=world)  # (W,) rows asked of each rank
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=group)  # rows each rank asks of us
        TRAFFIC.lookup_bytes += (world - 1) * send.element_size()
        send_l, recv_l = send.tolist(), recv.tolist()  # the host sync: split sizes are ints
        start = dist.get_rank(group) * rows_per_rank
        served = _exchange(unique, send_l, recv_l, group) - start  # (R,) local row indices
        rows = _exchange(shard.detach().index_select(0, served), recv_l, send_l, group)  # (U, d)
        ctx.save_for_backward(inverse, served)
        ctx.meta = (send_l, recv_l, group, sparse, shard.shape, unique.numel(), grad_scale)
        return rows.index_select(0, inverse).reshape(*ids.shape, shard.shape[1])

    @staticmethod
    def backward(ctx, grad):
        inverse, served = ctx.saved_tensors
        send_l, recv_l, group, sparse, shape, n_unique, grad_scale = ctx.meta
        grad = grad.reshape(-1, shape[1])
        per_row = grad.new_zeros(n_unique, shape[1]).index_add_(0, inverse, grad)  # (U, d)
        received = _exchange(per_row, send_l, recv_l, group)  # (R, d): gradients of the rows we own
        if grad_scale != 1.0:
            received = received * grad_scale
        if sparse:
            grad_shard = torch.sparse_coo_tensor(served[None], received, shape, check_invariants=False).coalesce()
        else:
            grad_shard = received.new_zeros(shape).index_add_(0, served, received)
        return None, grad_shard, None, None, None, None


def sharded_lookup(ids: torch.Tensor, shard: torch.Tensor, rows_per_rank: int, group=None,
                   sparse: bool = False, grad_scale: float = 1.0) -> torch.Tensor:
    """Rows ``ids`` (global row indices, any shape) of the table whose local block is ``shard``.

    Backward gives ``shard`` the gradient of its rows summed over every rank's lookups, times
    ``grad_scale``."""
    return _ShardedLookup.apply(ids, shard, rows_per_rank, group, sparse, grad_scale)


class ShardedTable(nn.Module):
    """The local block of a ``num_rows`` x ``dim`` table split by rows over ``group``.

    ``weight`` holds rows ``[start, start + rows_per_rank)``; rows past ``num_rows`` are padding that
    no valid id reaches. ``sparse`` makes the shard's gradient a sparse tensor of the rows served.
    """

    def __init__(self, num_rows: int, dim: int, group=None, sparse: bool = True, grad_scale: float = 1.0,
                 device: torch.device | str | None = None):
        super().__init__()
        if not dist.is_initialized():
            raise RuntimeError("ShardedTable needs an initialised torch.distributed process group")
        if num_rows < 1 or dim < 1:
            raise ValueError(f"a table needs at least one row and one column, got ({num_rows}, {dim})")
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_rows, self.dim, self.sparse, self.grad_scale = num_rows, dim, sparse, grad_scale
        self.rows_per_rank = math.ceil(num_rows / self.world)
        self.start = self.rank * self.rows_per_rank
        self.weight = nn.Parameter(torch.zeros(self.rows_per_rank, dim, device=device))

    @property
    def local_rows(self) -> int:
        """Real (not padding) rows this rank holds: rows ``[start, start + local_rows)`` of the table."""
        return max(0, min(self.rows_per_rank, self.num_rows - self.start))

    @torch.no_grad()
    def load_block(self, block: torch.Tensor) -> None:
        """Take this rank's real rows, (local_rows, dim), e.g. read from a checkpoint; padding is zeroed."""
        if block.shape != (self.local_rows, self.dim):
            raise ValueError(f"rank {self.rank} holds {self.local_rows} rows of width {self.dim}, "
                             f"got a block of shape {tuple(block.shape)}")
        self.weight.zero_()
        self.weight[: self.local_rows].copy_(block)

    @torch.no_grad()
    def load_full(self, full: torch.Tensor) -> None:
        """Take this rank's block of a full (num_rows, dim) table (e.g. from a single-process model)."""
        if full.shape != (self.num_rows, self.dim):
            raise ValueError(f"expected a ({self.num_rows}, {self.dim}) table, got {tuple(full.shape)}")
        self.load_block(full[self.start: self.start + self.local_rows])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...) int64 -> (..., d)
        return sharded_lookup(ids, self.weight, self.rows_per_rank, self.group, self.sparse, self.grad_scale)


class ShardedEmbedding(ShardedTable, HashedTable):
    """A ``HashedTable`` whose flat table of H heads (``geometry``) is row-sharded:
    hash ids (B, T, H) -> (B, T, H, d_h). Head j's rows start at ``offsets[j]``, as before.

    Built on the meta device it allocates nothing; after ``to_empty``, ``init_weights(std, seed)``
    fills this rank's rows with exactly the rows a whole table gets from the same seed."""

    def __init__(self, geometry: TableGeometry, dim: int, group=None, sparse: bool = True,
                 grad_scale: float = 1.0, device: torch.device | str | None = None):
        super().__init__(geometry.num_rows, dim, group, sparse, grad_scale, device)
        self.geometry = geometry
        self.register_buffer("offsets", torch.empty(geometry.n_heads, dtype=torch.int64, device=self.weight.device),
                             persistent=False)  # (H,)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        self.offsets.copy_(torch.tensor(self.geometry.offsets, dtype=torch.int64))

    @property
    def trainable(self) -> bool:
        return True

    @torch.no_grad()
    def init_weights(self, std: float, seed: int) -> None:
        """This rank's rows of the N(0, std) table ``seed`` gives (zeros for std 0); padding rows zero."""
        self.weight.zero_()
        if std != 0:
            normal_rows_(self.weight[: self.local_rows], self.start, std, seed)

    def forward(self, hash_ids: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H, d_h)
        return super().forward(hash_ids + self.offsets)


def _tables(model: nn.Module, kind) -> dict[str, nn.Module]:
    """Module name -> every submodule of ``model`` of the given kind."""
    return {name: m for name, m in model.named_modules() if isinstance(m, kind)}


def sharded_tables(model: nn.Module) -> dict[str, ShardedTable]:
    """Module name -> every row-sharded table of ``model`` (empty for a model that was not sharded)."""
    return _tables(model, ShardedTable)


def shard_tables(model: nn.Module, group=None) -> dict[str, ShardedEmbedding]:
    """Row-shard every hashed table of a built model over ``group``, in place (a transform, like
    ``engram.storage.apply_storage``); returns module name -> its ``ShardedEmbedding``.

    On a model built on the meta device nothing is allocated: each rank's block is materialised by
    ``to_empty`` and filled by ``init_weights`` (or a checkpoint). On a materialised model every rank
    must hold the same full tables (same seed, or the same checkpoint); each keeps its block and drops
    the rest. Gradients are averaged over ranks (``grad_scale`` 1/W) to match DistributedDataParallel
    on the dense parameters (``wrap_ddp``). The shards' gradients are sparse.
    """
    if not dist.is_initialized():
        raise RuntimeError("shard_tables needs an initialised torch.distributed process group")
    if sharded_tables(model):
        raise ValueError("the model's tables are already sharded; shard_tables once per model")
    if any(not t.trainable for t in _tables(model, HashedTable).values()):
        raise ValueError("the model's tables were moved to a storage tier; shard a model with device tables")
    tables = _tables(model, MultiHeadEmbedding)
    if not tables:
        raise ValueError("the model has no hashed tables (Engram or OverEncoding) to shard")
    world = dist.get_world_size(group)
    sharded = {}
    for name, old in tables.items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        weight = old.weight
        # a shard is trained by SparseAdam on its own rows: its gradient is sparse whatever the table's was
        new = ShardedEmbedding(old.geometry, weight.shape[1], group, sparse=True, grad_scale=1.0 / world,
                               device=weight.device)
        new.weight.requires_grad_(weight.requires_grad)
        if weight.device.type != "meta":
            new.load_full(weight.detach())
        setattr(parent, attr, new)  # the full table is freed with the old module
        sharded[name] = new
    return sharded

"""A per-rank memory plan: what each rank of W holds for a model before anything is allocated, so a user
can size a cluster before renting it (``engram plan --preset engram-27b --world-size W``).

Legend: W ranks, r a rank, n a parameter's first dimension, c = ceil(n / W), N a table's rows, d_h its
row width, b bytes per value (4: fp32 weights and optimizer state).

The model is built on ``meta`` (nothing allocated) and every number follows from parameter shapes and
what the placements allocate (``tests/distributed/test_fsdp.py`` compares them with the bytes a 2-rank
run materialises):

| part                 | parameters                  | gradients                         | optimizer state             |
|----------------------|-----------------------------|-----------------------------------|-----------------------------|
| tables (row-sharded) | ceil(N/W) rows x d_h x b    | sparse, per step: about           | SparseAdam: 2 moments of    |
|                      | (the last block is padded)  | min(tokens x H / W, ceil(N/W))    | the block                   |
|                      |                             | rows x (d_h b + 8), an estimate   |                             |
|                      |                             | for uniformly spread hashes       |                             |
| dense, FSDP2         | c x (rest of the shape) x b | the same (FSDP's padded           | AdamW 2 moments, Muon 1     |
|                      | per parameter (FSDP pads    | reduce-scatter outputs)           | momentum, of this rank's    |
|                      | every rank's shard to c)    |                                   | rows (not padded)           |
| dense, DDP           | every parameter, whole      | whole (+ DDP's buckets, as big)   | whole                       |

FSDP2 splits dim 0, so a stack of E experts on W > E ranks leaves ranks E.. without experts: their
optimizer state is smaller, their padded parameters are not.

FSDP also gathers units whole for their forward and backward. ``gathered_unit`` estimates the peak a
rank holds on top of its shards: the root unit (embedding, head, final norm, which FSDP2 keeps
gathered from forward to backward) plus three of the largest block (the one computing, the next one
prefetched, and the computing one's whole gradient before its reduce-scatter). DDP's line is its
gradient buckets, as large as the gradients. Activations are not planned.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass

import torch

from engram.model.config import ModelConfig
from engram.distributed.runtime import PARALLEL
from engram.model.matrices import OPTIMIZERS, muon_parameters
from engram.distributed.fsdp import row_range

BYTES = 4  # fp32
INDEX_BYTES = 8  # int64 row index of a sparse gradient row


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds, by part."""

    rank: int
    table_params: int
    table_grads: int  # sparse, per step: an estimate (hashes spread uniformly over the rows)
    table_optimizer: int
    dense_params: int
    dense_grads: int
    dense_optimizer: int
    gathered_unit: int  # FSDP: root + 3 x the largest block, gathered (transient estimate); DDP: gradient buckets

    @property
    def total(self) -> int:
        return (self.table_params + self.table_grads + self.table_optimizer + self.dense_params
                + self.dense_grads + self.dense_optimizer + self.gathered_unit)


@dataclass(frozen=True)
class MemoryPlan:
    world: int
    strategy: str
    optimizer: str
    tokens_per_step: int
    ranks: list[RankMemory]  # every rank, or (every_rank False) one per run of equal ranks, and the last
    every_rank: bool = True

    def to_dict(self) -> dict:
        return asdict(self) | {"max_total": max(r.total for r in self.ranks)}


def _rest(shape: torch.Size) -> int:
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def memory_plan(config: ModelConfig, world: int, strategy: str = "fsdp", optimizer: str = "adamw",
                tokens_per_step: int = 0) -> MemoryPlan:
    """Bytes per rank of ``config``'s model trained on ``world`` ranks with ``strategy`` ("fsdp" or "ddp")
    and ``optimizer`` ("adamw" or "muon"); ``tokens_per_step`` (global, every micro-batch) sizes the
    tables' sparse gradients. Builds the model on meta only."""
    from engram.model.transformer import EngramLM

    if strategy not in PARALLEL:
        raise ValueError(f"strategy must be one of {PARALLEL}, got {strategy!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world size must be a positive integer, got {world!r}")
    with torch.device("meta"):
        model = EngramLM(config)
    tables = {f"{name}.weight": t for name, t in model.named_tables().items()}
    muon = {name for name, _ in muon_parameters(model)} if optimizer == "muon" else set()
    units: dict[str, int] = {}  # FSDP unit -> its full weight bytes
    dense = []
    for name, p in model.named_parameters():
        if name in tables:
            continue
        dense.append((name, p.shape))
        unit = ".".join(name.split(".")[:2]) if name.startswith("layers.") else "root"
        units[unit] = units.get(unit, 0) + p.numel() * BYTES
    fsdp = strategy == "fsdp" and world > 1
    blocks = [b for unit, b in units.items() if unit != "root"]
    gathered = units.get("root", 0) + 3 * max(blocks, default=0)  # FSDP's transient peak (module docstring)
    t_params = t_grads = 0  # every rank holds one padded block of every table
    for t in tables.values():
        rows = -(-t.num_rows // world)
        t_params += rows * t.dim * BYTES
        heads = t.offsets.shape[0]  # H rows looked up per token
        t_grads += min(-(-tokens_per_step * heads // world), rows) * (t.dim * BYTES + INDEX_BYTES)
    ranks = []
    for r in _ranks_to_list(world, [shape[0] if len(shape) else 1 for _, shape in dense] if fsdp else []):
        d_params = d_opt = 0
        for name, shape in dense:
            moments = 1 if name in muon else 2
            n, rest = shape[0] if len(shape) else 1, _rest(shape)
            if fsdp:
                start, stop = row_range(n, world, r)
                d_params += -(-n // world) * rest * BYTES
                d_opt += moments * (stop - start) * rest * BYTES
            else:
                d_params += n * rest * BYTES
                d_opt += moments * n * rest * BYTES
        buckets = d_params if world > 1 else 0  # DDP's: as large as the gradients
        ranks.append(RankMemory(rank=r, table_params=t_params, table_grads=t_grads, table_optimizer=2 * t_params,
                                dense_params=d_params, dense_grads=d_params, dense_optimizer=d_opt,
                                gathered_unit=gathered if fsdp else buckets))
    return MemoryPlan(world=world, strategy=strategy, optimizer=optimizer, tokens_per_step=tokens_per_step,
                      ranks=ranks, every_rank=len(ranks) == world)


ALL_RANKS = 1024  # up to this many ranks the plan lists each; beyond, one rank per class of equal ranks


def _ranks_to_list(world: int, sharded_rows: list[int]) -> list[int]:
    """Every rank up to ``ALL_RANKS``; beyond, the first rank of each run of ranks whose numbers are equal, and
    the last rank. A dimension of n rows sharded over ``world`` ranks gives ceil(n / W) rows to ranks below
    n // ceil(n / W), a remainder to the next, none after: only those two ranks per dimension start a new run,
    so the list is O(parameters) long however large the world (and its largest total is the plan's)."""
    if world <= ALL_RANKS:
        return list(range(world))
    starts = {0, world - 1}
    for n in sharded_rows:
        full = n // -(-n // world)
        starts.update(r for r in (full, full + 1) if r < world)
    return sorted(starts)


def format_plan(plan: MemoryPlan, name: str = "") -> str:
    """A table per rank (GiB, or MiB for a small model): rank 0 (the largest) and, when its numbers
    differ, the last rank."""
    first, last = plan.ranks[0], plan.ranks[-1]
    shown = [first] + ([last] if dataclasses.replace(last, rank=0) != first else [])
    unit, scale = ("GiB", 2**30) if first.total >= 2**30 else ("MiB", 2**20)
    extra = "FSDP gathered units (transient, est.)" if plan.strategy == "fsdp" and plan.world > 1 else \
        "DDP gradient buckets" if plan.world > 1 else "(single process)"
    lines = [f"{name + ': ' if name else ''}{plan.world} rank(s), {plan.strategy.upper()}, {plan.optimizer} "
             f"(tables: row-sharded, SparseAdam), fp32, {unit} per rank, activations not included"]
    header = f"{'':<40}" + ("".join(f"{'rank ' + str(r.rank):>12}" for r in shown) if len(shown) > 1 or plan.world == 1
                            else f"{'each rank':>12}")
    rows = [("tables: parameters", "table_params"), ("tables: gradients (sparse, estimate)", "table_grads"),
            ("tables: optimizer", "table_optimizer"), ("dense/experts: parameters", "dense_params"),
            ("dense/experts: gradients", "dense_grads"), ("dense/experts: optimizer", "dense_optimizer"),
            (extra, "gathered_unit")]
    lines.append(header)
    for label, key in rows:
        lines.append(f"{label:<40}" + "".join(f"{getattr(r, key) / scale:>12,.2f}" for r in shown))
    lines.append(f"{'total':<40}" + "".join(f"{r.total / scale:>12,.2f}" for r in shown))
    return "\n".join(lines)

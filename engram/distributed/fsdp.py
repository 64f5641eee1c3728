"""FSDP2 placement (``train.parallel = "fsdp"``): the dense and expert weights, their gradients and their
optimizer state sharded over the ranks with ``torch.distributed.fsdp.fully_shard``; the hashed tables
row-sharded by the all_to_all lookup as under DDP (``engram.distributed.sharded``).

Legend: W ranks, r this rank, n a parameter's first dimension, c = ceil(n / W) its rows per rank.

Placement, from a model built on meta (nothing allocated) whose tables are already row-sharded:

    for each block:  to_empty on the host (its table block only) -> reset its buffers -> initialise it
                     (``EngramLM.init_block``, the same per-name streams as one process) -> move to the
                     device -> fully_shard(block): the full weights are freed, the rank keeps rows
                     [r c, (r+1) c) of every parameter (torch.chunk's split of dim 0)
    the rest:        embedding, head, final norm, hashers (``EngramLM.init_top``) -> fully_shard(model)

so a rank never holds more than one block's full weights (plus its own shards), and the values equal
``EngramLM(config)`` under the same seed. The table parameters are on every ``fully_shard``'s
``ignored_params``: FSDP never gathers them.

Checkpoints keep the one-process layout: the dense weights and their optimizer state are gathered one
tensor at a time (``DTensor.full_tensor``, every rank in the same order; the other ranks drop each at
once) and rank 0 writes them as ``model.safetensors`` and ``optimizer.pt``; table rows are written per
rank as before. So a checkpoint written under FSDP loads in one process, under DDP or under FSDP on any
number of ranks, and the other way round. Loading reads only this rank's rows of each dense weight
(``safetensors`` slices) and copies only its rows of every optimizer moment out of the memory-mapped
``optimizer.pt``. Rank 0 holds the whole dense state on the host while it writes: a sharded dense format
(``torch.distributed.checkpoint``) is not implemented.

Gradient accumulation: every micro-batch reduce-scatters its gradients into the shards. (FSDP2 can skip
the sync until the last micro-batch, but it then keeps every unit's whole gradient on every rank, as
large as the dense model.)

Traffic: ``TRAFFIC.allgather_bytes`` / ``reduce_scatter_bytes`` count the payload of FSDP's
collectives (the gathered unit, the gradients reduced), measured by wrapping the two functions FSDP
calls; a ring sends about (W-1)/W of each per rank.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from engram.distributed.sharded import TRAFFIC, sharded_tables
from engram.fileio import CheckpointError
from engram.model.init import reset_derived_buffers


# -- which rows a rank holds ------------------------------------------------------------------------------
def row_range(n: int, world: int, rank: int) -> tuple[int, int]:
    """Rows [start, stop) of a dimension of n that rank ``rank`` of ``world`` holds: torch.chunk's split
    (ceil(n / W) rows per rank, the last ranks fewer or none), which is FSDP2's Shard(0)."""
    c = -(-n // world)
    start = min(rank * c, n)
    return start, min(start + c, n)


def local_rows(like: DTensor) -> tuple[int, int]:
    """The rows [start, stop) of ``like``'s first dimension that this rank holds (Shard(0), one mesh dim)."""
    mesh = like.device_mesh
    return row_range(like.shape[0], mesh.size(), mesh.get_local_rank())


def local_part(full: torch.Tensor, like: DTensor) -> torch.Tensor:
    """This rank's piece of ``full``, a whole tensor shaped like the DTensor ``like``."""
    start, stop = local_rows(like)
    return full[start:stop]


# -- placement --------------------------------------------------------------------------------------------
def _table_params(model: nn.Module) -> set[nn.Parameter]:
    return {p for table in sharded_tables(model).values() for p in table.parameters()}


def shard_dense(model: nn.Module, device: torch.device, init_tables: bool = True) -> None:
    """Materialise a meta-built ``EngramLM`` under FSDP2 block by block (module docstring): each rank
    allocates its shards, one block's full weights at a time. The values are those of one process that
    built the model under the same seed (the seed is drawn from torch's generator, as ``init_weights``
    draws it)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    count_fsdp_traffic()
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))  # the run's device, not the host's accelerator
    seed = model.draw_init_seed()
    for i, block in enumerate(model.layers):
        block.to_empty(device="cpu")  # new Parameter objects (meta -> cpu): collect the tables' after this
        reset_derived_buffers(block)
        model.init_block(i, seed, tables=init_tables)
        block.to(device)
        fully_shard(block, mesh=mesh, ignored_params=_table_params(block) or None)
    for name, child in model.named_children():
        if name != "layers":
            child.to_empty(device="cpu")
            reset_derived_buffers(child)
    model.init_top(seed, tables=init_tables)
    for name, child in model.named_children():
        if name != "layers":
            child.to(device)
    fully_shard(model, mesh=mesh, ignored_params=_table_params(model) or None)


# -- checkpoints ------------------------------------------------------------------------------------------
def gather_full(value, keep: bool = True):
    """``value`` (a tensor or nested dicts/lists of them) with every DTensor gathered whole onto the host.
    Collective: every rank calls it on structures of the same shape, in the same order. ``keep=False``
    (every rank but the writer) drops each gathered tensor at once (None in its place), so a rank holds
    at most one whole tensor at a time."""
    if isinstance(value, DTensor):
        full = value.full_tensor()
        return full.cpu() if keep else None
    if isinstance(value, dict):
        return {k: gather_full(v, keep) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(gather_full(v, keep) for v in value)
    return value


def full_model_state(model: nn.Module, skip: set[str] = frozenset(), keep: bool = True) -> dict[str, torch.Tensor]:
    """The model's state dict with every sharded weight gathered whole, on the host (every rank calls;
    ``keep=False`` on the ranks that do not write, which then return an empty dict)."""
    state = {}
    for k, v in model.state_dict().items():
        if k in skip:
            continue
        full = gather_full(v.detach(), keep)
        if keep:
            state[k] = full.contiguous().cpu()
    return state


@torch.no_grad()
def load_full_state(model: nn.Module, read, skip: set[str] = frozenset()) -> list[str]:
    """Fill ``model``'s state from a whole-model source: ``read(name, start, stop)`` returns rows
    [start, stop) of the stored tensor ``name`` (all of it for None), or None when it is not stored.
    A sharded weight reads only this rank's rows; ``skip`` names (row-sharded tables) are left alone.
    Returns the names that were not stored."""
    missing = []
    for name, target in model.state_dict().items():
        if name in skip:
            continue
        if isinstance(target, DTensor):
            rows = read(name, *local_rows(target))
            if rows is None:
                missing.append(name)
                continue
            target.to_local().copy_(rows)
        else:
            value = read(name, None, None)
            if value is None:
                missing.append(name)
                continue
            target.copy_(value)
    return missing


def load_checkpoint_rows(checkpoint, model: nn.Module) -> None:
    """Fill ``model``, whose dense weights are FSDP shards, from ``checkpoint`` (an
    ``engram.train.checkpoint.Checkpoint``): each rank reads its rows of each stored weight
    (``checkpoint.weights()``: the file opened once, a row slice per tensor), nothing more. Its tables are
    row-sharded (``parallelize`` shards them before FSDP) and filled by ``load_shards``."""
    tables = sharded_tables(model)
    whole = [name for name in model.named_tables() if name not in tables]
    if whole:
        raise CheckpointError(f"the tables {whole} are whole in a model whose dense weights are FSDP shards; "
                              "place the model with engram.distributed.parallelize, which row-shards them")
    checkpoint.check_layouts(model)
    with checkpoint.weights() as reader:
        missing = load_full_state(model, reader.read, {f"{name}.weight" for name in tables})
        unexpected = reader.names - set(model.state_dict())
    if missing or unexpected:
        raise CheckpointError(f"{checkpoint.path}/model.safetensors does not fit the stored config: "
                              f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


@torch.no_grad()
def shard_optimizer_state(optimizers, state: dict) -> dict:
    """A whole-model optimizer state (``Optimizers.state_dict()`` as one process or a gathering save
    wrote it) with every moment of a sharded parameter cut to this rank's rows, as a DTensor like the
    parameter: what ``Optimizers.load_state_dict`` takes under FSDP. Only this rank's rows are copied
    (the stored file is memory-mapped), so no rank materialises the whole moments."""
    out = dict(state)
    for key in ("dense", "matrices"):  # the torch optimizers over dense parameters
        opt, stored = getattr(optimizers, key, None), state.get(key)
        if opt is None or stored is None:
            continue
        params = [p for group in opt.param_groups for p in group["params"]]
        entries = {}
        for index, entry in stored["state"].items():
            param = params[int(index)]
            if isinstance(param, DTensor):
                entry = {name: _shard_like(value, param) for name, value in entry.items()}
            entries[index] = entry
        out[key] = {**stored, "state": entries}
    return out


def _shard_like(value, param: DTensor):
    if not isinstance(value, torch.Tensor) or isinstance(value, DTensor) or value.shape != param.shape:
        return value  # step counters and the like
    local = local_part(value, param).to(param.to_local().device).clone()
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


# -- traffic --------------------------------------------------------------------------------------------------
_COUNTING = False


def count_fsdp_traffic() -> None:
    """Wrap the two collectives FSDP2 calls (``dist.all_gather_single``, ``dist.reduce_scatter_single``)
    so ``TRAFFIC`` counts their payload. Idempotent; the wrappers only add to counters."""
    global _COUNTING
    if _COUNTING:
        return
    _COUNTING = True
    gather, scatter = dist.all_gather_single, dist.reduce_scatter_single

    @functools.wraps(gather)
    def counted_gather(output, input, *args, **kwargs):
        TRAFFIC.allgather_bytes += output.numel() * output.element_size()
        return gather(output, input, *args, **kwargs)

    @functools.wraps(scatter)
    def counted_scatter(output, input, *args, **kwargs):
        TRAFFIC.reduce_scatter_bytes += input.numel() * input.element_size()
        return scatter(output, input, *args, **kwargs)

    dist.all_gather_single, dist.reduce_scatter_single = counted_gather, counted_scatter

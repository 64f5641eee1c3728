"""Process-group plumbing for data-parallel training with sharded tables.

Roles, in the order the trainer uses them:

    init_from_env()      torchrun's RANK / WORLD_SIZE / MASTER_ADDR -> the default process group
                         (gloo on CPU, NCCL on CUDA); a plain ``python -m engram.cli`` stays single-process
    local_device(device) cuda -> cuda:LOCAL_RANK, so the ranks of one node take one GPU each
    shard_tables(model)  (sharded.py) every hashed table -> this rank's block of rows
    wrap_ddp(model)      DistributedDataParallel over the dense parameters only; the sharded tables are
                         on DDP's ignore list, their gradients reach their owners through all_to_all
    reduce_moe_load(model) the MoE token counts summed over ranks before ``update_moe_bias``, so every
                         rank moves its expert bias exactly as one process seeing the whole batch would

A single process (no process group, or a group of one) goes through none of this.
"""

from __future__ import annotations

import gc
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from engram.distributed.sharded import TRAFFIC, sharded_tables
from engram.model.moe import moe_layers

PARALLEL = ("ddp", "fsdp")  # how the dense part is placed over ranks: replicated (DDP) or sharded (FSDP2)


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """The rank that prints, logs and writes the replicated files."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def launched_by_torchrun() -> bool:
    """torchrun (or any launcher following its convention) set WORLD_SIZE > 1 for this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(backend: str | None = None, timeout_minutes: float = 30.0) -> bool:
    """Join the process group torchrun describes in the environment; False when not launched by it.

    ``backend`` defaults to NCCL when CUDA is available and gloo otherwise (CPU training).
    """
    if not launched_by_torchrun():
        return False
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set; "
                           "launch with torchrun (see docs/DISTRIBUTED.md)")
    if dist.is_initialized():
        return True
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
    return True


def shutdown() -> None:
    """Leave the process group. Objects that hold it and sit in reference cycles (a DDP wrapper and its
    reducer) are collected first: left to the interpreter's exit, they destroyed the gloo group's
    threads during finalisation, which aborted the process ("terminate called without an active
    exception") once in a few runs."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
        gc.collect()


def local_device(device: torch.device) -> torch.device:
    """Under a process group, a bare ``cuda`` means this rank's GPU, ``cuda:LOCAL_RANK``."""
    if device.type == "cuda" and device.index is None and is_distributed():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return device


def check_backend(device: torch.device) -> None:
    """gloo runs CPU tensors and NCCL CUDA ones; a mismatch would fail deep inside the first collective."""
    backend = dist.get_backend()
    if device.type == "cpu" and backend == "nccl":
        raise ValueError("the NCCL backend needs CUDA tensors; train on cuda, or launch with the gloo backend")
    if device.type == "cuda" and backend == "gloo":
        raise ValueError("training on CUDA with the gloo backend; use NCCL (the default when CUDA is present)")


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel over the dense parameters; the sharded tables' parameters are ignored.

    ``forward_sync_buffers=False`` (buffers are synced once, at construction): the buffers that change in training are the MoE load counts (summed by
    ``reduce_moe_load``) and the expert bias (moved identically on every rank by that sum); broadcasting
    rank 0's copy before every forward would wipe the counts of the other ranks' micro-batches.
    """
    from torch.nn.parallel import DistributedDataParallel

    ignore = [f"{name}.weight" for name in sharded_tables(model)]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignore)
    device_ids = [device.index] if device.type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)
    ddp.register_comm_hook(None, _counted_allreduce)
    return ddp


def _counted_allreduce(state, bucket):
    """DDP's default all-reduce (average over ranks), counting the bucket's bytes in ``TRAFFIC``."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    buffer = bucket.buffer()
    TRAFFIC.allreduce_bytes += buffer.numel() * buffer.element_size()
    return allreduce_hook(state, bucket)


@torch.no_grad()
def reduce_moe_load(model) -> None:
    """Sum every MoE layer's token counts over ranks (one all_reduce for all layers)."""
    if not is_distributed():
        return
    loads = [moe._load for moe in moe_layers(model)]
    if not loads:
        return
    flat = torch.cat(loads)
    dist.all_reduce(flat)
    for load, summed in zip(loads, flat.split([x.numel() for x in loads])):
        load.copy_(summed)


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of a per-rank scalar (e.g. the loss of each rank's equal share of the batch)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    if not is_distributed():
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()

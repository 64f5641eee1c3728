"""Placement for training: ``parallelize(model, device)`` shards the hashed tables over the process group,
materialises and initialises the model (each rank only its own block of every table), and wraps the
dense part in DistributedDataParallel. It returns a ``Parallel``: everything collective the trainer
needs, in one object, so that the train step, the optimizer and the checkpoint code never call
``torch.distributed`` themselves.

Outside a process group of several ranks (a plain ``python -m engram.cli train``) it only materialises
the model, and every method of ``Parallel`` is the single-process identity. With ``strategy="fsdp"``
(``train.placement.parallel``) the dense part is sharded by FSDP2 instead of replicated by DDP
(``engram.distributed.fsdp``). Checkpoints are written through the file steps the placement is given
(``files``, a ``CheckpointWriter``), so this package never imports the trainer.

The flow the trainer follows (``engram.train.startup.setup``)::

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = EngramLM(config, tokenizer, sparse_tables=True)   # nothing allocated
    parallel = parallelize(model, device, files=CHECKPOINT_FILES)  # shard tables -> to_empty (host)
                                                                    # -> init_weights -> device -> DDP
    optimizers = Optimizers(model, train_config, reduce_table_sq=parallel.table_squares_reduce)
    parallel.restore(checkpoint, optimizers)   # when resuming
"""

from __future__ import annotations

import contextlib
import functools
import gc
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import engram.distributed.runtime as rt
from engram.distributed.runtime import PARALLEL
from engram.distributed.checkpoint import (CheckpointWriter, load_shards, registered_checkpoint_files,
                                          restore_sharded, save_sharded)
from engram.distributed.sharded import TRAFFIC, shard_tables, sharded_tables


class Parallel:
    """How this process takes part in training. ``net`` is what forward and backward go through (the
    DDP wrapper, or the model itself); ``model`` keeps the weights, the checkpoints and evaluation."""

    def __init__(self, model: nn.Module, device: torch.device, net: nn.Module | None = None,
                 strategy: str = "ddp", files: CheckpointWriter | None = None):
        self.model, self.device = model, device
        self.files = files  # how checkpoints are written (engram.train.checkpoint.CHECKPOINT_FILES), if saved here
        self.net = net if net is not None else model
        self.strategy = strategy  # "ddp" or "fsdp" (meaningful with several ranks)
        self.world, self.rank = rt.world_size(), rt.rank()
        tables = sharded_tables(model)
        self.table_group = next(iter(tables.values())).group if tables else None
        self.tables_sharded = bool(tables)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        """The rank that prints, logs and writes the replicated files."""
        return self.rank == 0

    def rows(self, *tensors: torch.Tensor | None):
        """This rank's rows of each tensor of the global batch (all of them in a single process)."""
        if not self.distributed:
            return tensors
        return tuple(None if t is None else t.chunk(self.world)[self.rank] for t in tensors)

    def no_sync(self, last_micro_batch: bool):
        """DDP all-reduces the dense gradients once per step: after the last micro-batch only."""
        if last_micro_batch or not self.distributed or self.fsdp:  # FSDP: every micro-batch (fsdp.py)
            return contextlib.nullcontext()
        return self.net.no_sync()

    @property
    def fsdp(self) -> bool:
        """The dense weights are FSDP2 shards (DTensors), not replicas."""
        return self.distributed and self.strategy == "fsdp"

    def sum_dense_squares(self, squares: torch.Tensor) -> torch.Tensor:
        """The squared gradient norm of the sharded dense weights over every rank's shards."""
        dist.all_reduce(squares)
        return squares

    @property
    def dense_squares_reduce(self):
        """What ``Optimizers(reduce_dense_sq=...)`` needs under FSDP (sharded dense gradients), else None."""
        return self.sum_dense_squares if self.fsdp else None

    def mean(self, value: float) -> float:
        """The mean over ranks of a per-rank scalar (e.g. the loss of each rank's equal share)."""
        return rt.mean_over_ranks(value, self.device)

    def sum(self, values: list[float]) -> list[float]:
        return rt.sum_over_ranks(values, self.device)

    def max_over_ranks(self, value: int) -> int:
        """The largest of every rank's ``value`` (e.g. a stop request that reached some ranks only)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def sum_table_squares(self, squares: torch.Tensor) -> torch.Tensor:
        """The tables' squared gradient norm over every rank's rows (each rank holds its own rows), so
        every rank clips by the norm of one process holding the whole tables."""
        if self.tables_sharded:
            dist.all_reduce(squares, group=self.table_group)
        return squares

    @property
    def table_squares_reduce(self):
        """What ``Optimizers(reduce_table_sq=...)`` needs: ``sum_table_squares`` when the tables are
        sharded, else None (one process sums the squares in its usual order, bit for bit as before)."""
        return self.sum_table_squares if self.tables_sharded else None

    def reduce_moe_load(self) -> None:
        """The whole batch's expert load on every rank, so every rank moves its expert bias alike."""
        rt.reduce_moe_load(self.model)

    def traffic(self) -> dict:
        """Bytes sent to other ranks so far, by kind (``TRAFFIC``)."""
        return TRAFFIC.snapshot()

    def barrier(self) -> None:
        rt.barrier()

    def close(self) -> None:
        """Drop the DDP wrapper now. It sits in reference cycles that hold the process group; left to
        the interpreter's exit, destroying the group's threads there can abort the process."""
        if self.net is not self.model:
            self.net = self.model
            gc.collect()

    def save_checkpoint(self, run_dir: str | Path, step: int, optimizer_state: dict, run_config, tokenizer,
                        trainer_state: dict, keep_last: int = 2) -> Path:
        """Write checkpoint ``step`` through the checkpoint file steps this placement was given (``files``;
        else those ``engram.train.checkpoint`` registered): by this process alone, or by every rank together."""
        files = self.files or registered_checkpoint_files()
        if files is None:
            raise ValueError("this placement has no checkpoint files to write with: "
                             "parallelize(..., files=engram.train.checkpoint.CHECKPOINT_FILES)")
        if self.fsdp:  # gathered whole (every rank takes part), written in the one-process layout
            from engram.distributed.fsdp import full_model_state, gather_full  # DTensor: imported when used

            skip = {f"{name}.weight" for name in sharded_tables(self.model)}
            model_state = full_model_state(self.model, skip, keep=self.is_main)
            optimizer_state = {k: (v if k == "tables" else gather_full(v, keep=self.is_main))
                               for k, v in optimizer_state.items()}
            return save_sharded(run_dir, step, self.model, optimizer_state, run_config, tokenizer, trainer_state,
                                keep_last, model_state=model_state, files=files)
        if self.distributed:
            return save_sharded(run_dir, step, self.model, optimizer_state, run_config, tokenizer, trainer_state,
                                keep_last, files=files)
        return files.save(run_dir, step, self.model, optimizer_state, run_config, tokenizer, trainer_state, keep_last)

    def _load_weights(self, checkpoint) -> None:
        if self.fsdp:  # each rank reads its rows of every dense weight
            from engram.distributed.fsdp import load_checkpoint_rows

            load_checkpoint_rows(checkpoint, self.model)
        else:
            checkpoint.load_into(self.model)

    def load_weights(self, checkpoint) -> None:
        """Only the weights of ``checkpoint`` (this rank's rows of sharded tables), no optimizer state:
        a new run that starts from another's weights (``train.checkpoint.init_from``)."""
        self._load_weights(checkpoint)
        if self.tables_sharded:
            load_shards(checkpoint.tables(list(self.model.named_tables())), sharded_tables(self.model))

    def restore(self, checkpoint, optimizers) -> dict:
        """Load ``checkpoint`` (``engram.train.checkpoint.Checkpoint``, written by any number of ranks):
        weights (this rank's rows of sharded tables) and optimizer state; returns the optimizer state
        as loaded (it holds ``torch_rng``)."""
        self._load_weights(checkpoint)
        prepare = None
        if self.fsdp:  # the stored whole-model moments, cut to this rank's shards before loading
            from engram.distributed.fsdp import shard_optimizer_state

            prepare = functools.partial(shard_optimizer_state, optimizers)
        if self.tables_sharded:
            return restore_sharded(checkpoint, self.model, optimizers, prepare)
        state = checkpoint.optimizer_state()
        if prepare is not None:
            state = prepare(state)
        optimizers.load_state_dict(state)
        return state


def materialise(model: nn.Module, device: torch.device, init_tables: bool = True) -> nn.Module:
    """A model built on meta: allocate it on the host, initialise it once, move it to ``device``. The
    initial values come from torch's CPU generator, so a seed gives the same model on every device.
    A model that is already materialised is only moved."""
    if any(p.device.type == "meta" for p in model.parameters()):
        model.to_empty(device="cpu")
        model.init_weights(tables=init_tables)
    return model.to(device)


def parallelize(model: nn.Module, device: torch.device, init_tables: bool = True, strategy: str = "ddp",
                files: CheckpointWriter | None = None) -> Parallel:
    """Place ``model`` (an ``EngramLM``, built on meta or materialised) for training on ``device``.

    Inside a process group of W > 1 ranks: its hashed tables are row-sharded (``shard_tables``; on a meta
    model each rank then allocates only its block), the model is materialised and initialised
    (``init_tables=False`` leaves table rows for a checkpoint) and the dense parameters go under
    DistributedDataParallel (``strategy="ddp"``, ``wrap_ddp``) or are sharded by FSDP2 (``"fsdp"``,
    ``engram.distributed.fsdp.shard_dense``: a meta model is materialised one block at a time, each rank
    keeping its shards). Otherwise the model is only materialised and moved. ``files``: how the returned
    placement writes checkpoints (``engram.train.checkpoint.CHECKPOINT_FILES``; needed by ``save_checkpoint``).
    """
    if strategy not in PARALLEL:
        raise ValueError(f"strategy must be one of {PARALLEL}, got {strategy!r}")
    if not rt.is_distributed():
        return Parallel(materialise(model, device, init_tables), device, strategy=strategy, files=files)
    rt.check_backend(device)
    if strategy == "fsdp" and not any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError("parallelize(strategy='fsdp') places a model built on meta (with "
                         "torch.device('meta'): EngramLM(...)), so no rank holds more than its shards")
    if model.named_tables():
        shard_tables(model)
    if strategy == "fsdp":
        from engram.distributed.fsdp import shard_dense

        shard_dense(model, device, init_tables)
        return Parallel(model, device, strategy="fsdp", files=files)
    materialise(model, device, init_tables)
    return Parallel(model, device, rt.wrap_ddp(model, device), files=files)

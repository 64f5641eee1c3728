"""Hashed tables in checkpoints: written by every rank as its own shard, read back as any row range.

Legend: W ranks that wrote the checkpoint, N a table's rows, d its width, rpr = ceil(N / W).

A checkpoint of a model whose tables are sharded (``shard_tables``) keeps the usual files for the
replicated state (``engram/train/checkpoint.py``), minus the table rows, plus

    tables/index.json                          {"format", "world": W, "tables": {name: {rows, dim, rows_per_shard}}}
    tables/shard-RRRRR-of-WWWWW.safetensors    rank r's real rows [r*rpr, min((r+1)*rpr, N)) of every table:
                                               <name>.weight, <name>.exp_avg, <name>.exp_avg_sq

``name`` is the table's module name (e.g. ``layers.1.engram.embedding``); the two moments are
SparseAdam's, whose scalar step count stays in ``optimizer.pt``. Padding rows are never written, so
the rows in the files do not depend on W.

``CheckpointTables`` reads rows ``[start, stop)`` of any of these tensors from a sharded checkpoint
or from a single-process one (full tables in ``model.safetensors``, moments in ``optimizer.pt``),
opening only the shards that overlap the range. That one operation is the resharding: a single
process reads [0, N); rank r of W' ranks reads its own block of the new split.

The collective parts live here and nowhere else: ``save_sharded`` (every rank writes its shard, rank 0
the replicated files and the manifest, through the file steps it is given: a ``CheckpointWriter``, which
``engram.train.checkpoint`` supplies) and ``restore_sharded`` (each rank reads its own rows and moments).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist

from engram import fileio
from engram.fileio import CheckpointError
import engram.distributed.runtime as runtime
from engram.distributed.sharded import sharded_tables

class CheckpointWriter(Protocol):
    """What a placement needs to write a checkpoint's files; ``engram.train.checkpoint.CHECKPOINT_FILES`` (a
    ``CheckpointFiles``) is one."""

    def checkpoints_dir(self, run_dir) -> Path: ...

    def stage(self, run_dir, step: int, tag: str | None = None) -> Path: ...

    def write_replicated(self, tmp: Path, step: int, model, optimizer_state: dict, run_config, tokenizer,
                         trainer_state: dict, skip: set[str] = frozenset(), model_state: dict | None = None) -> None: ...

    def publish(self, tmp: Path, step: int, keep_last: int = 2, entries: dict | None = None) -> Path: ...

    def save(self, run_dir, step: int, model, optimizer_state: dict, run_config, tokenizer, trainer_state: dict,
             keep_last: int = 2, model_state: dict | None = None) -> Path: ...


_REGISTERED: CheckpointWriter | None = None


def register_checkpoint_files(files: CheckpointWriter) -> None:
    """Make ``files`` what a placement given none writes with. ``engram.train.checkpoint`` registers its
    ``CHECKPOINT_FILES`` when it is imported (as it is wherever a ``Checkpoint`` exists), so this package
    writes checkpoints without importing the trainer."""
    global _REGISTERED
    _REGISTERED = files


def registered_checkpoint_files() -> CheckpointWriter | None:
    return _REGISTERED


INDEX = "tables/index.json"
FORMAT = "engram.tables.sharded/1"
MOMENTS = ("exp_avg", "exp_avg_sq")


def shard_name(rank: int, world: int) -> str:
    return f"tables/shard-{rank:05d}-of-{world:05d}.safetensors"


def table_index(tables: dict, world: int) -> dict:
    """index.json for ``tables`` (module name -> ``ShardedTable``), identical on every rank."""
    return {"format": FORMAT, "world": world,
            "tables": {name: {"rows": t.num_rows, "dim": t.dim, "rows_per_shard": t.rows_per_rank}
                       for name, t in tables.items()}}


def write_shard(directory: Path, tables: dict, table_optimizer_state: dict | None) -> str:
    """Write this rank's rows of every table (and their moments) into ``directory``; returns the
    file's path relative to ``directory``.

    ``tables``: module name -> ``ShardedTable``, in optimizer order; ``table_optimizer_state``: the
    SparseAdam ``state_dict`` of those tables' shards (None when there is none).
    """
    from safetensors.torch import save_file

    first = next(iter(tables.values()))
    rel = shard_name(first.rank, first.world)
    state = (table_optimizer_state or {}).get("state", {})
    tensors = {}
    for i, (name, table) in enumerate(tables.items()):
        n = table.local_rows
        tensors[f"{name}.weight"] = table.weight.detach()[:n].contiguous().cpu()
        for moment in MOMENTS:
            if i in state and moment in state[i]:
                tensors[f"{name}.{moment}"] = state[i][moment][:n].contiguous().cpu()
    (directory / "tables").mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / rel), metadata={"format": FORMAT})
    return rel


def strip_table_moments(optimizer_state: dict) -> dict:
    """The replicated part of ``Optimizers.state_dict()``: the table moments go to the shards; their
    step counts and hyperparameters stay."""
    tables = optimizer_state.get("tables")
    if tables is None:
        return optimizer_state
    state = {i: {k: v for k, v in s.items() if k not in MOMENTS} for i, s in tables["state"].items()}
    return {**optimizer_state, "tables": {**tables, "state": state}, "table_moments": "sharded"}


class CheckpointTables:
    """Rows of a checkpoint's hashed tables and SparseAdam moments: ``read(name, what, start, stop)``.

    ``names``: the model's table module names in optimizer order (the model's ``named_tables()``),
    needed to find a table's moments in a single-process ``optimizer.pt``.
    """

    def __init__(self, path: str | Path, names: list[str]):
        self.path = Path(path)
        self.names = list(names)
        index_file = self.path / INDEX
        self.sharded = index_file.is_file()
        self._optimizer = None
        if self.sharded:
            index = json.loads(index_file.read_text())
            if index.get("format") != FORMAT:
                raise ValueError(f"{index_file} has format {index.get('format')!r}, expected {FORMAT!r}")
            self.world = int(index["world"])
            self.tables = index["tables"]
            unknown = sorted(set(self.tables) ^ set(self.names))
            if unknown:
                raise ValueError(f"{index_file} lists tables {sorted(self.tables)}, the model has {self.names}")
        else:
            from safetensors import safe_open

            self.world = 1
            self._model = safe_open(str(self.path / "model.safetensors"), "pt")
            self.tables = {}
            for name in self.names:
                rows, dim = self._model.get_slice(f"{name}.weight").get_shape()
                self.tables[name] = {"rows": rows, "dim": dim, "rows_per_shard": rows}

    def num_rows(self, name: str) -> int:
        return int(self.tables[name]["rows"])

    def _optimizer_state(self) -> dict:
        if self._optimizer is None:
            self._optimizer = torch.load(self.path / "optimizer.pt", map_location="cpu", weights_only=True,
                                         mmap=True)
        return self._optimizer

    def read(self, name: str, what: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Rows [start, stop) (clipped to the table) of ``what`` = "weight", "exp_avg" or "exp_avg_sq"."""
        meta = self.tables[name]
        rows = int(meta["rows"])
        stop = rows if stop is None else min(stop, rows)
        start = min(start, stop)
        if not self.sharded:
            if what == "weight":
                return self._model.get_slice(f"{name}.weight")[start:stop]
            state = self._optimizer_state()["tables"]["state"][self.names.index(name)]
            return state[what][start:stop].clone()
        from safetensors import safe_open

        per = int(meta["rows_per_shard"])
        parts = []
        shards = range(start // per, math.ceil(stop / per)) if stop > start else range(0)
        for r in shards:  # only the shards that overlap [start, stop)
            lo, hi = max(start, r * per), min(stop, (r + 1) * per)
            with safe_open(str(self.path / shard_name(r, self.world)), "pt") as f:
                parts.append(f.get_slice(f"{name}.{what}")[lo - r * per: hi - r * per])
        if not parts:
            return torch.empty(0, int(meta["dim"]))
        return torch.cat(parts)

    def full_moments_state(self, optimizer_state: dict) -> dict:
        """``optimizer_state`` (as stored) with every table's full moments filled in from the shards,
        i.e. what a single process holding whole tables loads."""
        if optimizer_state.get("table_moments") != "sharded":
            return optimizer_state
        tables = optimizer_state["tables"]
        state = {i: {**s, **{m: self.read(self.names[i], m) for m in MOMENTS}} for i, s in tables["state"].items()}
        out = {k: v for k, v in optimizer_state.items() if k != "table_moments"}
        return {**out, "tables": {**tables, "state": state}}


def load_shards(reader: CheckpointTables, tables: dict) -> None:
    """Fill every ``ShardedTable`` in ``tables`` (module name -> table) with its rows from ``reader``."""
    for name, table in tables.items():
        if name not in reader.tables or reader.num_rows(name) != table.num_rows:
            got = reader.tables.get(name, {}).get("rows")
            raise CheckpointError(f"{reader.path}: table {name} has {got} rows, the model needs {table.num_rows}")
        block = reader.read(name, "weight", table.start, table.start + table.local_rows)
        table.load_block(block.to(table.weight.dtype))


def shard_optimizer_state(reader: CheckpointTables, tables: dict, optimizer_state: dict) -> dict:
    """``optimizer_state`` as stored (either layout) with each table's moments cut to this rank's block,
    padded like its shard: what ``Optimizers.load_state_dict`` takes on a sharded model."""
    stored = optimizer_state.get("tables")
    if stored is None:
        return optimizer_state
    state = {}
    for i, (name, table) in enumerate(tables.items()):
        entry = stored["state"].get(i)
        if entry is None:  # SparseAdam creates a table's state at its first step
            continue
        entry = {k: v for k, v in entry.items() if k not in MOMENTS}
        for moment in MOMENTS:
            block = torch.zeros(table.rows_per_rank, table.dim)
            block[: table.local_rows] = reader.read(name, moment, table.start, table.start + table.local_rows)
            entry[moment] = block
        state[i] = entry
    out = {k: v for k, v in optimizer_state.items() if k != "table_moments"}
    return {**out, "tables": {**stored, "state": state}}


def save_sharded(run_dir: str | os.PathLike, step: int, model, optimizer_state: dict, run_config, tokenizer,
                 trainer_state: dict, keep_last: int = 2, model_state: dict | None = None,
                 files: CheckpointWriter | None = None) -> Path:
    """Checkpoint ``step`` of a model trained over a process group; every rank calls this. ``files``: the
    checkpoint file steps (default: those ``engram.train.checkpoint`` registered).

    With sharded tables each rank writes its shard and hashes it, rank 0 writes the replicated files
    (weights without table rows, optimizer state without table moments) and the manifest covering all
    of them. Without sharded tables rank 0 writes the whole checkpoint alone. ``run_dir`` must be one
    directory every rank sees (e.g. a shared filesystem). ``model_state``: rank 0's whole dense weights
    when the model's own state dict holds shards (FSDP; ``engram.distributed.fsdp.full_model_state``)."""
    files = files or registered_checkpoint_files()
    if files is None:
        raise ValueError("save_sharded needs the checkpoint file steps: files=engram.train.checkpoint.CHECKPOINT_FILES")
    tables = sharded_tables(model)
    if not tables:
        final = None
        if runtime.is_main():
            final = files.save(run_dir, step, model, optimizer_state, run_config, tokenizer,
                                         trainer_state, keep_last, model_state=model_state)
        runtime.barrier()  # no rank reads or re-saves the step before rank 0 has renamed it
        return final or files.checkpoints_dir(run_dir) / f"step_{step:07d}"
    group = next(iter(tables.values())).group
    main = dist.get_rank(group) == 0
    tmp = files.checkpoints_dir(run_dir) / f".tmp_step_{step:07d}_sharded"  # one name every rank agrees on
    if main:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp = files.stage(run_dir, step, "sharded")
    dist.barrier(group)
    written = write_shard(tmp, tables, optimizer_state.get("tables"))
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, {written: fileio.file_entry(tmp / written)}, group=group)  # each rank hashes its own
    final = files.checkpoints_dir(run_dir) / f"step_{step:07d}"
    if main:
        try:
            files.write_replicated(tmp, step, model, strip_table_moments(optimizer_state), run_config, tokenizer,
                                  trainer_state, skip={f"{name}.weight" for name in tables}, model_state=model_state)
            fileio.atomic_write_json(tmp / INDEX, table_index(tables, dist.get_world_size(group)), sort_keys=True)
            final = files.publish(tmp, step, keep_last, entries={k: v for entry in gathered for k, v in entry.items()})
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    dist.barrier(group)
    return final


def restore_sharded(checkpoint, model, optimizers, prepare=None) -> dict:
    """Fill ``model``'s sharded tables with this rank's rows of ``checkpoint`` (a
    ``engram.train.checkpoint.Checkpoint``, written by any number of ranks) and ``optimizers`` with the
    optimizer state cut to this rank's rows; the dense weights come from ``checkpoint.load_into``.
    ``prepare(state)``, when given, transforms the state before it is loaded. Returns the optimizer state
    as loaded (it holds ``torch_rng``)."""
    tables = sharded_tables(model)
    reader = checkpoint.tables(list(model.named_tables()))
    load_shards(reader, tables)
    state = shard_optimizer_state(reader, tables, checkpoint.stored_optimizer_state())
    if prepare is not None:  # FSDP: the dense moments cut to this rank's shards too
        state = prepare(state)
    optimizers.load_state_dict(state)
    return state

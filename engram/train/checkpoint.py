"""Checkpoints: safetensors weights, JSON config, the tokenizer, the hash layout and optimizer state.

A checkpoint is a directory ``<run>/checkpoints/step_NNNNNNN/``:

    model.safetensors            weights and persistent buffers (MoE expert bias)
    optimizer.pt                 AdamW + SparseAdam state and the torch RNG (loaded with weights_only)
    run_config.json              the resolved RunConfig
    trainer_state.json           step, tokens seen, last metrics
    hash_layout.json             NgramHasher.layout() (Engram models only)
    overencoding_layout.json     the OverEncoding hasher's layout (OverEncoding models only)
    tokenizer/tokenizer.json, tokenizer/compressed_tokenizer.safetensors
    manifest.json                size and sha256 of every file above; written last

A model trained with sharded tables writes the same files with the table rows left out of
``model.safetensors`` and the table moments out of ``optimizer.pt``; every rank writes its rows to
``tables/shard-RRRRR-of-WWWWW.safetensors``. That collective save lives in
``engram.distributed.checkpoint``, which composes the file steps (``CHECKPOINT_FILES``); nothing in the
checkpoint modules talks to other processes. Such a checkpoint loads on any number of
ranks, and in a single process as whole tables.

Writing, naming and listing steps is ``engram.train.checkpoint_files`` (whose names this module also
exports); this module reads a step back: ``open_checkpoint``, ``load_checkpoint``, ``Checkpoint``. Loading
checks the manifest first (a truncated or altered file is reported by name, not as a torch traceback) and
refuses a tokenizer or hash layout that disagrees with the one the tables were trained with
(docs/PITFALLS.md §3, §4).
"""


from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engram.distributed import checkpoint as table_ckpt
from engram import fileio
from engram.model.transformer import EngramLM
from engram.tokenizer import CompressedTokenizer, read_tokenizer_file
from engram.train.checkpoint_files import (CHECKPOINT_FILES, FORMAT, LATEST, MANIFEST, STAGING_PREFIX,
                                           CheckpointError, CheckpointFiles, checkpoints_dir,
                                           last_intact_checkpoint, latest_checkpoint, layout_files,
                                           list_checkpoints, point_latest, publish, recovery_hint, remove_staging,
                                           resolve_checkpoint, run_directory, save_checkpoint, stage, step_of,
                                           verify_checkpoint, write_replicated)
from engram.train.config import RunConfig

__all__ = ["CHECKPOINT_FILES", "FORMAT", "LATEST", "MANIFEST", "STAGING_PREFIX", "Checkpoint", "CheckpointError",
           "CheckpointFiles", "checkpoints_dir", "last_intact_checkpoint", "latest_checkpoint", "list_checkpoints",
           "load_checkpoint", "open_checkpoint", "point_latest", "publish", "recovery_hint", "remove_staging",
           "resolve_checkpoint", "restore_training_state", "run_directory", "save_checkpoint", "stage", "step_of",
           "verify_checkpoint", "write_replicated"]


@dataclass
class Checkpoint:
    """A verified checkpoint directory: its configs and tokenizer, and ``load_into`` to fill a model.

    ``model`` is set by ``load_checkpoint`` (a fresh model holding the checkpoint's weights)."""

    path: Path
    run_config: RunConfig
    tokenizer: Any  # tokenizers.Tokenizer
    compressed: CompressedTokenizer
    trainer_state: dict
    model: EngramLM | None = None
    _optimizer_state: dict | None = field(default=None, repr=False)

    @property
    def step(self) -> int:
        return int(self.trainer_state["step"])

    @property
    def data_config(self):
        """The run's ``DataConfig`` with absolute paths. Runs store relative paths relative to the run
        directory (``trainer_state["paths_relative_to"] == "run_dir"``), so they resolve from anywhere;
        older checkpoints stored them relative to where training ran, taken here from the current
        directory as before."""
        if self.trainer_state.get("paths_relative_to") != "run_dir":
            return self.run_config.data.resolved()
        return self.run_config.data.resolved(run_directory(self.path))

    @property
    def identity(self) -> str:
        """sha256 of the manifest, which lists every file's sha256: names these exact weights wherever
        the checkpoint is copied (exported tables record it)."""
        return fileio.sha256_file(self.path / MANIFEST)

    def prepared_data(self):
        """Moved: ``engram.train.startup.checkpoint_data(checkpoint)`` (the run's corpus with this tokenizer)."""
        import warnings

        from engram.train.startup import checkpoint_data

        warnings.warn("Checkpoint.prepared_data() moved to engram.train.startup.checkpoint_data(checkpoint)",
                      DeprecationWarning, stacklevel=2)
        return checkpoint_data(self)

    def text_data(self, source: str):
        """Moved: ``engram.train.startup.checkpoint_text(checkpoint, source)``."""
        import warnings

        from engram.train.startup import checkpoint_text

        warnings.warn("Checkpoint.text_data() moved to engram.train.startup.checkpoint_text(checkpoint, source)",
                      DeprecationWarning, stacklevel=2)
        return checkpoint_text(self, source)

    @property
    def sharded(self) -> bool:
        """Written by ranks holding sharded tables (``tables/`` holds the rows)."""
        return (self.path / table_ckpt.INDEX).is_file()

    def stored_optimizer_state(self) -> dict:
        """``optimizer.pt`` as written: without table moments when the checkpoint is sharded."""
        if self._optimizer_state is None:
            # memory-mapped: under FSDP each rank copies out only its rows of the moments, not the file
            self._optimizer_state = torch.load(self.path / "optimizer.pt", map_location="cpu", weights_only=True,
                                               mmap=True)
        return self._optimizer_state

    def optimizer_state(self) -> dict:
        """The optimizer state of a single process holding whole tables (moments gathered from the
        shards of a sharded checkpoint)."""
        stored = self.stored_optimizer_state()
        return self.tables().full_moments_state(stored) if self.sharded else stored

    def tables(self, names: list[str] | None = None) -> table_ckpt.CheckpointTables:
        """A reader of any row range of the stored tables and their moments, whichever layout."""
        if names is None:  # the stored model's tables, in optimizer order (a meta build allocates nothing)
            names = list((self.model or self.build_model()).named_tables())
        try:
            return table_ckpt.CheckpointTables(self.path, names)
        except ValueError as err:
            raise CheckpointError(str(err)) from None

    def build_model(self, sparse_tables: bool = True) -> EngramLM:
        """The stored model's architecture on the meta device: nothing allocated yet (place it, then
        ``to_empty``, ``init_weights(tables=False)`` and ``load_into``)."""
        with torch.device("meta"):
            return EngramLM(self.run_config.model, self.compressed, sparse_tables=sparse_tables)

    @contextlib.contextmanager
    def weights(self):
        """``model.safetensors`` opened once: ``reader.read(name, start, stop)`` (the one primitive placements
        read weights with) and ``reader.names``, for as long as the block lasts."""
        from safetensors import safe_open

        with safe_open(str(self.path / "model.safetensors"), "pt") as f:
            yield WeightReader(f)

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor | None:
        """The stored tensor ``name`` (rows [start, stop) when given, read without the rest), or None when it is
        not stored; opens the file for this one read (``weights()`` keeps it open for many)."""
        with self.weights() as reader:
            return reader.read(name, start, stop)

    def check_layouts(self, model: EngramLM) -> None:
        """The stored hash layouts must equal ``model``'s hashers' (docs/PITFALLS.md §3, §4): other addresses would
        scramble every table row."""
        for name, hasher in layout_files(model).items():
            layout_file = self.path / name
            if not layout_file.is_file():
                raise CheckpointError(f"{self.path} holds a model with hashed tables but no {name}")
            try:
                hasher.check_layout(json.loads(layout_file.read_text()))
            except ValueError as err:
                raise CheckpointError(f"{layout_file}: {err}") from None

    def load_into(self, model: EngramLM) -> None:
        """Check the hash layouts against ``model``'s hashers and copy the weights in. Tables that are
        row-sharded (``engram.distributed``) are left to ``engram.distributed.checkpoint.load_shards``;
        whole tables are read from either layout. A model whose dense weights are FSDP shards reads its
        rows through its placement (``engram.distributed.Parallel.restore`` / ``load_weights``)."""
        from safetensors import safe_open
        from torch.distributed.tensor import DTensor

        if any(isinstance(p, DTensor) for p in model.parameters()):
            raise CheckpointError("the model's dense weights are FSDP shards: load them through its placement "
                                  "(engram.distributed.Parallel.restore or load_weights), which reads each rank's rows")
        self.check_layouts(model)
        tables = model.named_tables()
        per_rank = set(table_ckpt.sharded_tables(model))
        table_keys = {f"{name}.weight" for name in tables}
        whole = [name for name in tables if name not in per_rank]
        with safe_open(str(self.path / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
            state = {k: f.get_tensor(k) for k in keys if k not in table_keys}
            if not self.sharded:
                state |= {f"{n}.weight": f.get_tensor(f"{n}.weight") for n in whole if f"{n}.weight" in keys}
        if self.sharded and whole:
            reader = self.tables(list(tables))
            state |= {f"{name}.weight": reader.read(name, "weight") for name in whole}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if k[: -len(".weight")] not in per_rank]
        if missing or unexpected:
            raise CheckpointError(f"{self.path}/model.safetensors does not fit the stored config: "
                                  f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")


class WeightReader:
    """The stored weights of a checkpoint, from its open ``model.safetensors`` (``Checkpoint.weights()``)."""

    def __init__(self, handle):
        self._file = handle
        self.names: set[str] = set(handle.keys())

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor | None:
        """The tensor ``name``, or rows [start, stop) of it (read alone: a safetensors slice), or None when the
        checkpoint does not store it."""
        if name not in self.names:
            return None
        return self._file.get_tensor(name) if start is None else self._file.get_slice(name)[start:stop]


def open_checkpoint(path: str | os.PathLike, tokenizer=None, check_hashes: bool = True) -> Checkpoint:
    """Verify a checkpoint (or a run directory's latest) and read its configs, without building a model.

    ``tokenizer`` (a tokenizers.Tokenizer, directory or tokenizer.json), when given, must compress
    exactly like the one stored; otherwise the stored tokenizer is used. Either way the compressed
    table is rebuilt from the tokenizer and compared with the stored one."""
    from tokenizers import Tokenizer

    path = resolve_checkpoint(path)
    try:
        verify_checkpoint(path, check_hashes)
    except CheckpointError as err:
        if path.parent.name != "checkpoints" or step_of(path) is None:
            raise
        raise CheckpointError(f"{err}; {recovery_hint(path.parent.parent, below=step_of(path))}") from None
    run_config = RunConfig.from_dict(json.loads((path / "run_config.json").read_text()))
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    stored = CompressedTokenizer.load(path / "tokenizer")
    if tokenizer is None:
        tokenizer = read_tokenizer_file(path / "tokenizer" / "tokenizer.json")
    elif not isinstance(tokenizer, Tokenizer):
        tokenizer = read_tokenizer_file(Path(tokenizer) / "tokenizer.json" if Path(tokenizer).is_dir() else tokenizer)
    rebuilt = CompressedTokenizer.from_pretrained(tokenizer)
    if rebuilt != stored:
        raise CheckpointError(
            f"the tokenizer in use compresses to V'={rebuilt.vocab_size} (sha256 {rebuilt.sha256[:12]}) but the "
            f"checkpoint's tables were addressed with V'={stored.vocab_size} (sha256 {stored.sha256[:12]}); "
            "refusing to load (a different tokenizer or tokenizers version would scramble every Engram row)")
    return Checkpoint(path=path, run_config=run_config, tokenizer=tokenizer, compressed=stored,
                      trainer_state=trainer_state)


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu", tokenizer=None,
                    check_hashes: bool = True) -> Checkpoint:
    """Load a checkpoint (or a run directory's latest) into a fresh model on ``device`` (``.model``).

    Built on meta, materialised once, table rows never initialised only to be overwritten; a sharded
    checkpoint loads with whole tables (read from every shard)."""
    ckpt = open_checkpoint(path, tokenizer, check_hashes)
    model = ckpt.build_model()
    model.to_empty(device="cpu")
    model.init_weights(tables=False)
    ckpt.load_into(model)
    ckpt.model = model.to(device)
    return ckpt


def restore_training_state(ckpt: Checkpoint, model: EngramLM, optimizers, prepare=None) -> dict:
    """Put ``ckpt``'s optimizer state into ``optimizers`` (the model's weights are already loaded);
    returns it as loaded (it holds ``torch_rng``). A model with sharded tables restores through
    ``engram.distributed.checkpoint.restore_sharded``."""
    if table_ckpt.sharded_tables(model):
        raise CheckpointError("the model's tables are sharded over ranks: restore with "
                              "engram.distributed.checkpoint.restore_sharded")
    state = ckpt.optimizer_state()
    if prepare is not None:  # e.g. FSDP: moments cut to this rank's shards
        state = prepare(state)
    optimizers.load_state_dict(state)
    return state

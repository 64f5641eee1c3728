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
``engram.distributed.checkpoint``, which composes the steps here (``stage``, ``write_replicated``,
``publish``); nothing in this module talks to other processes. Such a checkpoint loads on any number of
ranks, and in a single process as whole tables.

It is written into a temporary directory and renamed into place, then ``<run>/checkpoints/latest`` is
replaced atomically, so a crash at any moment leaves the previous checkpoint intact. Loading checks
the manifest first (a truncated or altered file is reported by name, not as a torch traceback) and
refuses a tokenizer or hash layout that disagrees with the one the tables were trained with
(PITFALLS 3, 4).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engram import fileio
from engram.train.config import RunConfig
from engram.distributed import checkpoint as table_ckpt
from engram.model.transformer import EngramLM
from engram.tokenizer import CompressedTokenizer

FORMAT = "engram.checkpoint/1"
MANIFEST = "manifest.json"
LATEST = "latest"
STAGING_PREFIX = ".tmp_step_"  # a checkpoint being written; left behind only by a killed writer


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, corrupted, or incompatible with the tokenizer in use."""


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


# -- writing: stage -> write -> publish ----------------------------------------------------------------
def stage(run_dir: str | os.PathLike, step: int, tag: str | None = None) -> Path:
    """A fresh temporary directory for checkpoint ``step`` (``tag`` names it when several processes write
    into one; default this process's pid)."""
    root = checkpoints_dir(run_dir)
    tmp = root / f"{STAGING_PREFIX}{step:07d}_{tag or os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tokenizer").mkdir(parents=True)
    return tmp


def _hashers(model: EngramLM) -> dict[str, object]:
    """Layout file name -> the hasher whose addresses it fixes."""
    hashers = {}
    if model.hasher is not None:
        hashers["hash_layout.json"] = model.hasher
    if model.overencoding is not None:
        hashers["overencoding_layout.json"] = model.overencoding.hasher
    return hashers


def write_replicated(tmp: Path, step: int, model: EngramLM, optimizer_state: dict, run_config: RunConfig,
                     tokenizer, trainer_state: dict, skip: set[str] = frozenset(),
                     model_state: dict[str, torch.Tensor] | None = None) -> None:
    """Everything but per-rank table shards into ``tmp``: weights (without the ``skip`` keys), optimizer
    state plus the torch RNG, the configs, the hash layouts and the tokenizer. ``model_state``: the
    weights to write when ``model``'s own state dict holds shards (FSDP gathers them first)."""
    from safetensors.torch import save

    if model_state is None:
        model_state = model.state_dict()
    state = {k: v.detach().contiguous().cpu() for k, v in model_state.items() if k not in skip}
    fileio.atomic_write_bytes(tmp / "model.safetensors", save(state, metadata={"format": FORMAT, "step": str(step)}))
    fileio.atomic_write(tmp / "optimizer.pt", lambda f: torch.save({**optimizer_state, "torch_rng": torch.get_rng_state()}, f))
    fileio.atomic_write_json(tmp / "run_config.json", run_config.to_dict(), sort_keys=True)
    fileio.atomic_write_json(tmp / "trainer_state.json", {"format": FORMAT, "step": step, **trainer_state}, sort_keys=True)
    for name, hasher in _hashers(model).items():
        fileio.atomic_write_json(tmp / name, hasher.layout(), sort_keys=True)
    tokenizer.save(str(tmp / "tokenizer" / "tokenizer.json"))
    # the tokenizer's compression, not the hasher's: with compress=False the hasher is the identity,
    # and loading compares this file with the compression rebuilt from tokenizer.json
    compressed = model.compressed_tokenizer
    if compressed is None:
        compressed = CompressedTokenizer.from_pretrained(tokenizer)
    compressed.save(tmp / "tokenizer")


def publish(tmp: Path, step: int, keep_last: int = 2, entries: dict[str, dict] | None = None) -> Path:
    """Write ``tmp``'s manifest (``entries`` supplies files hashed elsewhere, e.g. by the rank that wrote
    them), rename it to ``step_NNNNNNN``, point ``latest`` at it and keep the newest ``keep_last``."""
    entries = entries or {}
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    listed = {str(p.relative_to(tmp)): entries.get(str(p.relative_to(tmp))) or fileio.file_entry(p) for p in files}
    missing = sorted(set(entries) - set(listed))
    if missing:
        raise CheckpointError(f"{missing} were written by other ranks but are not in {tmp}: every rank must see "
                              "the same run directory (a shared filesystem)")
    fileio.write_manifest(tmp / MANIFEST, FORMAT, step=step, files=listed)
    root = tmp.parent
    final = root / f"step_{step:07d}"
    if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.rename(tmp, final)
    point_latest(root.parent, final)
    # prune only below the step just written: a higher step is never this history's to delete
    older = [path for s, path in list_checkpoints(root.parent) if s < step]
    for old in older[:max(0, len(older) - (keep_last - 1))] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(run_dir: str | os.PathLike, step: int, model: EngramLM, optimizer_state: dict,
                    run_config: RunConfig, tokenizer, trainer_state: dict, keep_last: int = 2,
                    model_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint ``step`` of a single process atomically and point ``latest`` at it; keep the
    newest ``keep_last``. A model with row-sharded tables is saved by all of its ranks together
    (``engram.distributed.checkpoint.save_sharded``)."""
    if table_ckpt.sharded_tables(model):
        raise CheckpointError("the model's tables are sharded over ranks: save it with "
                              "engram.distributed.checkpoint.save_sharded, which every rank calls")
    tmp = stage(run_dir, step)
    try:
        write_replicated(tmp, step, model, optimizer_state, run_config, tokenizer, trainer_state,
                         model_state=model_state)
        return publish(tmp, step, keep_last)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class CheckpointFiles:
    """The file steps of a checkpoint, handed to the placement that saves it (``parallelize(...,
    files=CHECKPOINT_FILES)``), so ``engram.distributed`` writes checkpoints without importing the
    trainer: ``checkpoints_dir``, ``stage`` -> ``write_replicated`` -> ``publish``, and ``save`` (all of it,
    one process)."""

    checkpoints_dir = staticmethod(checkpoints_dir)
    stage = staticmethod(stage)
    write_replicated = staticmethod(write_replicated)
    publish = staticmethod(publish)
    save = staticmethod(save_checkpoint)


CHECKPOINT_FILES = CheckpointFiles()
table_ckpt.register_checkpoint_files(CHECKPOINT_FILES)  # what a placement given no files writes with


# -- reading -------------------------------------------------------------------------------------------
def step_of(path: str | os.PathLike) -> int | None:
    """``step_0000100`` -> 100; None for any other name."""
    name = Path(path).name
    if name.startswith("step_") and name[5:].isdigit():
        return int(name[5:])
    return None


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, directory) of every published checkpoint of the run, by step (not verified)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(step_of(p), p) for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(found)


def run_directory(checkpoint: str | os.PathLike) -> Path:
    """The run directory a checkpoint belongs to: ``<run>/checkpoints/step_N``, or, once archived,
    ``<run>/archive/<name>/checkpoints/step_N``."""
    checkpoint = Path(checkpoint).resolve()
    run = checkpoint.parent.parent
    if run.parent.name == "archive":
        run = run.parent.parent
    return run


def point_latest(run_dir: str | os.PathLike, checkpoint: Path) -> None:
    """Atomically make ``latest`` name ``checkpoint`` (a published directory of this run)."""
    fileio.atomic_write_text(checkpoints_dir(run_dir) / LATEST, Path(checkpoint).name + "\n")


def last_intact_checkpoint(run_dir: str | os.PathLike, below: int | None = None) -> Path | None:
    """The newest checkpoint (with a step below ``below``, when given) whose every file matches its
    manifest; None when there is none. Reads every file of each candidate (sha256)."""
    for step, path in reversed(list_checkpoints(run_dir)):
        if below is not None and step >= below:
            continue
        try:
            verify_checkpoint(path)
        except CheckpointError:
            continue
        return path
    return None


def recovery_hint(run_dir: str | os.PathLike, below: int | None = None) -> str:
    """What to do when a checkpoint of ``run_dir`` cannot be used: name the last intact one."""
    intact = last_intact_checkpoint(run_dir, below)
    if intact is None:
        return "no older intact checkpoint is left in this run (start afresh with --no-resume)"
    step = step_of(intact)
    return (f"the last intact checkpoint is {intact}: continue from it with `engram train ... --resume-from "
            f"{step}` (train(..., resume_from={step})), or evaluate it with --ckpt {intact}")


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``latest`` points at, or None when the run has none."""
    pointer = checkpoints_dir(run_dir) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = checkpoints_dir(run_dir) / name
    if step_of(name) is None or "/" in name:
        raise CheckpointError(f"{pointer} holds {name!r}, not the name of a step directory; {recovery_hint(run_dir)}")
    if not path.is_dir():
        raise CheckpointError(f"{pointer} points at {path.name}, which does not exist; {recovery_hint(run_dir)}")
    return path


def remove_staging(run_dir: str | os.PathLike) -> list[Path]:
    """Delete the half-written checkpoints a killed writer left (``.tmp_step_*``); returns them. Only
    safe while no other process writes into the run (hold its lock, ``engram.train.rundir``)."""
    root = checkpoints_dir(run_dir)
    stale = sorted(root.glob(f"{STAGING_PREFIX}*")) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """Accept a checkpoint directory, or a run directory (its latest checkpoint)."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is not None:
            return found
        if (path / "model.safetensors").exists():
            raise CheckpointError(f"{path} has no {MANIFEST}: the checkpoint was not completely written")
    raise CheckpointError(f"no checkpoint at {path} (expected a checkpoint directory or a run directory)")


def verify_checkpoint(path: str | os.PathLike, check_hashes: bool = True) -> dict:
    """Check every file against the manifest; raise CheckpointError naming the first bad file."""
    path = Path(path)
    manifest = fileio.read_manifest(path / MANIFEST, FORMAT, CheckpointError,
                                    missing_hint="the checkpoint is incomplete")
    for name, expected in manifest["files"].items():
        fileio.check_file(path / name, expected["bytes"], expected["sha256"] if check_hashes else None,
                          CheckpointError)
    return manifest


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

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> torch.Tensor | None:
        """The stored tensor ``name`` of ``model.safetensors`` (rows [start, stop) of it when given, read
        without the rest), or None when it is not stored: the one primitive placements read weights with."""
        from safetensors import safe_open

        with safe_open(str(self.path / "model.safetensors"), "pt") as f:
            if name not in f.keys():
                return None
            return f.get_tensor(name) if start is None else f.get_slice(name)[start:stop]

    def stored_names(self) -> set[str]:
        """The names of every tensor in ``model.safetensors``."""
        from safetensors import safe_open

        with safe_open(str(self.path / "model.safetensors"), "pt") as f:
            return set(f.keys())

    def check_layouts(self, model: EngramLM) -> None:
        """The stored hash layouts must equal ``model``'s hashers' (PITFALLS 3, 4): other addresses would
        scramble every table row."""
        for name, hasher in _hashers(model).items():
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
        tokenizer = Tokenizer.from_file(str(path / "tokenizer" / "tokenizer.json"))
    elif not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_file(str(Path(tokenizer) / "tokenizer.json" if Path(tokenizer).is_dir() else tokenizer))
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

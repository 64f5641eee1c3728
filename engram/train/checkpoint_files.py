"""The files of checkpoints: writing one step (``stage`` -> ``write_replicated`` -> ``publish``, or
``save_checkpoint`` for all of it), naming and listing the steps of a run, the ``latest`` pointer, and
checking a step against its manifest. Reading a checkpoint back is ``engram.train.checkpoint``.

    <run>/checkpoints/step_NNNNNNN/     one published step (``engram.train.checkpoint`` lists its files)
    <run>/checkpoints/latest            the name of the newest published step of this history
    <run>/checkpoints/.tmp_step_*       a step being written; left behind only by a killed writer

A step is written into a temporary directory and renamed into place, then ``latest`` is replaced
atomically, so a crash at any moment leaves the previous checkpoint intact. Nothing here talks to other
processes: ``engram.distributed.checkpoint.save_sharded`` composes these steps (``CHECKPOINT_FILES``).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from engram import fileio
from engram.fileio import CheckpointError
from engram.distributed import checkpoint as table_ckpt
from engram.model.transformer import EngramLM
from engram.tokenizer import CompressedTokenizer
from engram.train.config import RunConfig

FORMAT = "engram.checkpoint/1"
MANIFEST = "manifest.json"
LATEST = "latest"
STAGING_PREFIX = ".tmp_step_"  # a checkpoint being written; left behind only by a killed writer


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


def layout_files(model: EngramLM) -> dict[str, object]:
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
    for name, hasher in layout_files(model).items():
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

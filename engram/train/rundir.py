"""The run directory: one trainer at a time, histories that never mix, nothing half-written left behind.

    <run>/
      .train.lock        held (flock) by the process training into the run; names it ("host H pid P since T")
      config.json        the run's config (paths relative to <run>)
      metrics.jsonl      one history: on resume, entries after the resumed step are dropped
      checkpoints/       step_NNNNNNN/ (see engram.train.checkpoint), latest, .tmp_step_* while writing
      archive/           earlier histories, moved here whole, never deleted:
        <UTC time>-fresh/      what --no-resume found (checkpoints/, metrics.jsonl, config.json)
        <UTC time>-rewind-N/   the checkpoints after step N that --resume-from N abandoned

Design choices: ``--no-resume`` *archives* the old history instead of refusing a non-empty
directory or numbering steps per attempt, so a fresh run's ``step_0000100`` can never be pruned as older
than a previous attempt's ``step_0000400``, and nothing is deleted. ``latest`` is rewritten before any
step it might name moves, so at every instant it names a published step or is absent.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from engram.fileio import FileLock, LockBusy
from engram.train.checkpoint import CheckpointError, list_checkpoints, point_latest, verify_checkpoint

LOCK = ".train.lock"
ARCHIVE = "archive"
HISTORY = ("checkpoints", "metrics.jsonl", "config.json")


class RunDirectoryBusy(ValueError):
    """Another live process is training into the run directory."""


def lock_run(run_dir: str | os.PathLike) -> FileLock:
    """Take the run directory's lock for this process (creating the directory); raise
    ``RunDirectoryBusy`` naming the holder when another live process has it. A lock whose process died
    (kill -9, power loss) is free again: the kernel released it with the process."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir} is a file; choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        return FileLock(run_dir / LOCK, purpose="engram train").acquire(wait=False)
    except LockBusy as err:
        raise RunDirectoryBusy(f"{run_dir} is in use by another training process ({err.holder or 'unknown'}; "
                               f"lock {err.path}); wait for it to finish, stop it, or train into another "
                               "--out") from None


def _archive_dir(run_dir: Path, reason: str) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base = run_dir / ARCHIVE / f"{stamp}-{reason}"
    path, k = base, 1
    while path.exists():
        k += 1
        path = base.with_name(f"{base.name}-{k}")
    path.mkdir(parents=True)
    return path


def start_fresh(run_dir: str | os.PathLike) -> Path | None:
    """Move the run's history (checkpoints, metrics, config) into ``archive/<time>-fresh/``; returns that
    directory, or None when there was nothing to move. Moving ``checkpoints/`` whole takes ``latest``
    with it in one rename."""
    run_dir = Path(run_dir)
    present = [name for name in HISTORY if (run_dir / name).exists()]
    if not present:
        return None
    target = _archive_dir(run_dir, "fresh")
    for name in present:  # checkpoints/ first: from here on the run has no latest
        os.rename(run_dir / name, target / name)
    return target


def rewind(run_dir: str | os.PathLike, step: int, verify: bool = True) -> tuple[Path, Path | None]:
    """Make checkpoint ``step`` the run's latest and move every later checkpoint into
    ``archive/<time>-rewind-<step>/``; returns (the checkpoint, the archive or None). ``step`` must be a
    published checkpoint of the run whose files match its manifest (``verify=False``: the caller has
    just checked); a damaged one is refused before anything moves."""
    run_dir = Path(run_dir)
    steps = list_checkpoints(run_dir)
    chosen = dict(steps).get(step)
    if chosen is None:
        have = ", ".join(str(s) for s, _ in steps) or "none"
        raise CheckpointError(f"{run_dir} has no checkpoint of step {step} (steps: {have})")
    if verify:
        verify_checkpoint(chosen)
    later = [path for s, path in steps if s > step]
    point_latest(run_dir, chosen)  # before anything it could name moves away
    target = None
    if later:
        target = _archive_dir(run_dir, f"rewind-{step}") / "checkpoints"
        target.mkdir()
        for path in later:
            os.rename(path, target / path.name)
    return chosen, target


def copy_metrics(run_dir: Path, archive: Path | None) -> None:
    """Keep the whole metrics log beside archived checkpoints (a rewind truncates the live one)."""
    if archive is not None and (run_dir / "metrics.jsonl").is_file():
        shutil.copy2(run_dir / "metrics.jsonl", archive.parent / "metrics.jsonl")

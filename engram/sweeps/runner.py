"""Sweep runner: ``engram sweep allocation|memory|ablation|init --budget NAME [--seeds K] [--workers N]``
(and ``make demo``, whose runs are a small plan of their own).

It executes a plan (``plan.plan``: a list of ``PlannedRun``, a grid point and a seed with its full
``RunConfig``). Each run lives in ``<root>/<budget>/<sweep>/<point>/seed<k>/`` and writes there::

    plan.json      the run's config, grid coordinates and initialisation scheme; a later plan that differs
                   (or a new scheme: the same seed would draw other weights) is refused
    train/         the training run (checkpoints, metrics.jsonl): an interrupted run resumes
    result.json    written last and atomically: its presence means the run is done and is skipped
                   (a run identical to one another sweep of the budget finished reuses that result)
    failed.json    the error of a run that raised; the next invocation retries it
    .lock          held while a process trains the run (host and pid inside)

Runs are claimed through the lock file (written whole, then linked into place: ``os.link`` fails if it
exists), so any number of processes can work through one sweep: the workers ``run_workers`` spawns for ``--workers N`` (``multiprocessing``, each
calling ``work_through`` on the same plan), or sweeps started by hand in other shells. Each skips runs
that are done or claimed; a lock left by a dead process on this host is taken over.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import sys
import threading
import time
import traceback
from multiprocessing.connection import wait
from pathlib import Path

from engram.train.config import RunConfig
from engram.fileio import atomic_write_json
from engram.model.init import INIT_SCHEME
from engram.sweeps.plan import PlannedRun, plan


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def try_lock(path: Path) -> bool:
    """Claim ``path`` (create it exclusively); take over a lock whose process on this host is gone."""
    me = f"{socket.gethostname()} {os.getpid()}"
    # written whole to a private file, then linked into place (link fails if the lock exists): a lock is
    # never seen empty, even when the process is stopped between creating and writing it
    staging = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}")
    staging.write_text(me)
    try:
        for _ in range(2):
            try:
                os.link(staging, path)
            except FileExistsError:
                try:
                    host, pid = path.read_text().split()
                except (OSError, ValueError):
                    return False  # unreadable: leave it
                if host != socket.gethostname() or _pid_alive(int(pid)):
                    return False
                path.unlink(missing_ok=True)  # stale: its process died
                continue
            return True
        return False
    finally:
        staging.unlink(missing_ok=True)


def _plan_record(planned: PlannedRun) -> dict:
    return {"sweep": planned.sweep, "budget": planned.budget, "point": planned.point, "seed": planned.seed,
            "info": planned.info, "run": planned.run.to_dict(), "init_scheme": INIT_SCHEME}


def _scheme(plan_path: Path):
    """The initialisation scheme a stored plan was trained under (None: before schemes were recorded)."""
    try:
        return json.loads(plan_path.read_text()).get("init_scheme")
    except (OSError, ValueError, AttributeError):
        return None


def _stored_run(plan_path: Path) -> dict | None:
    """A plan.json's run config, normalised through RunConfig so fields added since (with their
    defaults) do not make an old, identical plan look different."""
    try:
        return RunConfig.from_dict(json.loads(plan_path.read_text())["run"]).to_dict()
    except (KeyError, ValueError, TypeError):
        return None


def check_plan(planned: PlannedRun, directory: Path) -> None:
    """Refuse a directory that holds a run of a different plan (a changed budget or override)."""
    path = directory / "plan.json"
    stored = _stored_run(path) if path.exists() else None
    if stored is not None and stored != planned.run.to_dict():
        why = "the budget or the overrides changed"
        if (stored.get("model", {}).get("backbone", {}).get("document_mask", False) is False
                and planned.run.model.backbone.document_mask):
            why = "it was trained before document-masked attention, which the plan now uses"
        raise ValueError(f"{directory} holds a run of a different config ({why}); use another --out or remove the "
                         "directory")
    if path.exists() and _scheme(path) != INIT_SCHEME:
        raise ValueError(f"{directory} holds a run trained under another initialisation scheme "
                         f"({_scheme(path) or 'before 2'}, now {INIT_SCHEME}: the same seed draws other weights, "
                         f"so its result does not pair with new runs); use another --out or remove the directory")


def result_of(planned: PlannedRun, root: Path) -> dict | None:
    """The finished run's result, None when not finished; a result of a different plan is refused."""
    directory = planned.directory(root)
    path = directory / "result.json"
    if not path.exists():
        return None
    check_plan(planned, directory)
    return json.loads(path.read_text())


def _record(planned: PlannedRun, result: dict) -> dict:
    return {"sweep": planned.sweep, "budget": planned.budget, "point": planned.point, "seed": planned.seed,
            **planned.info, **result}


# the numbers ``execute`` records from a training run, and a reused twin carries over
RESULT_KEYS = ("val_loss", "val_bpb", "tokens", "train_seconds", "tokens_per_s", "params", "evals", "checkpoint")


def find_twin(planned: PlannedRun, root: Path) -> dict | None:
    """The result of an identical run (same model, data, training and seed) finished by another sweep of
    the budget, e.g. the ablation's reference is one allocation point. Training is deterministic given
    the config, so the twin's result is this run's result."""
    mine = planned.run.to_dict()
    for plan_path in sorted((Path(root) / planned.budget).glob("*/*/seed*/plan.json")):
        result_path = plan_path.with_name("result.json")
        if plan_path.parent == planned.directory(root) or not result_path.exists():
            continue
        if _stored_run(plan_path) == mine and _scheme(plan_path) == INIT_SCHEME:
            twin = json.loads(result_path.read_text())
            return _record(planned, {k: twin[k] for k in RESULT_KEYS if k in twin} | {"reused_from": str(plan_path.parent)})
    return None


def execute(planned: PlannedRun, root: Path, progress: bool = True) -> dict | None:
    """Train one planned run unless it is done or claimed; returns its result (None when claimed
    elsewhere). Exceptions are recorded in failed.json and re-raised."""
    from engram.train import train

    directory = planned.directory(root)
    done = result_of(planned, root)
    if done is not None:
        return done
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / ".lock"
    if not try_lock(lock):
        return None
    try:
        done = result_of(planned, root)  # finished between our check and the lock
        if done is not None:
            return done
        check_plan(planned, directory)
        if not (directory / "plan.json").exists():
            atomic_write_json(directory / "plan.json", _plan_record(planned))
        (directory / "failed.json").unlink(missing_ok=True)
        twin = find_twin(planned, root)
        if twin is not None:
            atomic_write_json(directory / "result.json", twin)
            return twin
        try:
            result = train(planned.run, out_dir=directory / "train", progress=progress)
        except Exception as exc:
            atomic_write_json(directory / "failed.json", {"error": f"{type(exc).__name__}: {exc}",
                                                    "traceback": traceback.format_exc()})
            raise
        numbers = {
            "val_loss": result.final_eval["val_loss"], "val_bpb": result.final_eval["val_bpb"],
            "tokens": result.tokens, "train_seconds": round(result.train_seconds, 2),
            "tokens_per_s": round(result.tokens_per_s, 1), "params": result.parameters, "evals": result.evals,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None}
        record = _record(planned, numbers)
        atomic_write_json(directory / "result.json", record)
        return record
    finally:
        lock.unlink(missing_ok=True)


# -- the sweep ---------------------------------------------------------------------------------------
def _log(message: str) -> None:
    print(f"[engram.sweep] {message}", file=sys.stderr, flush=True)


def run_sweep(sweep: str, budget: str, seeds: int | None = None, root: str | Path = "runs/sweeps",
              workers: int = 1, threads: int | None = None, overrides: list[str] | None = None,
              progress: bool = True, first_seed: int = 0, points: list[str] | None = None) -> list[dict]:
    """Run (or finish) a sweep, seeds ``first_seed`` onwards; returns the results of every finished run of
    the plan.

    ``workers > 1`` starts that many worker processes on the same plan (each with ``threads`` torch
    threads, default cores // workers) and shows one progress bar over the whole sweep.
    """
    from engram.data import prepare_data

    root = Path(root)
    runs = plan(sweep, budget, seeds, overrides, first_seed, points)
    prepare_data(runs[0].run.data)  # once, before the workers start (they would wait on its lock anyway)
    if threads is None and workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    pending = [r for r in runs if result_of(r, root) is None]
    _log(f"{sweep} sweep, budget {budget}: {len(runs)} runs, {len(runs) - len(pending)} already done, "
         f"{len(pending)} to go" + (f", {workers} workers" if workers > 1 else ""))
    if workers > 1 and pending:
        failures = run_workers(runs, root, workers, threads, progress, f"{sweep} sweep")
    else:
        failures = work_through(pending, root, progress)
    results = [r for r in (result_of(p, root) for p in runs) if r is not None]
    if failures:
        _log(f"{len(failures)} run(s) failed (see failed.json in their directories; rerun to retry):\n  "
             + "\n  ".join(failures))
    return results


def work_through(runs: list[PlannedRun], root: Path, progress: bool = True) -> list[str]:
    """Execute each run in turn, skipping those done or claimed by another process; returns one line per
    run that failed (its error is also in its failed.json)."""
    failures = []
    for i, planned in enumerate(runs):
        start = time.time()
        try:
            if result_of(planned, root) is not None:
                continue  # finished by another process since the list was made: it logged it
            record = execute(planned, root, progress=progress)
        except Exception as exc:  # keep going: one diverged point must not lose the rest of the sweep
            failures.append(f"{planned.point} seed {planned.seed}: {type(exc).__name__}: {exc}")
            _log(f"FAILED {planned.point} seed {planned.seed}: {exc}")
            continue
        if record is None:
            _log(f"{planned.point} seed {planned.seed}: claimed by another process, skipped")
            continue
        _log(f"[{i + 1}/{len(runs)}] {planned.point} seed {planned.seed}: val_loss {record['val_loss']:.4f} "
             f"({time.time() - start:.0f} s)")
    return failures


def _follow_parent(parent: int, every: float = 1.0) -> None:
    """In a worker: when the process that started it is gone (killed, even with SIGKILL), stop the way
    ``run_workers`` stops a worker (SIGTERM: the run in training saves its step, then the worker exits),
    instead of training on as an orphan that holds its run's lock."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        while True:  # again and again: one signal may land where it is not acted on (between runs' checks)
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5 * every)

    threading.Thread(target=watch, name="engram-sweep-parent-watch", daemon=True).start()


def _worker(runs: list[PlannedRun], root: Path, threads: int, parent: int | None = None) -> None:
    """One worker process of ``run_workers``: the runs of the plan not done yet, with its own threads."""
    import torch

    if parent is not None:
        _follow_parent(parent)
    # SIGTERM outside a training step (between runs, while preparing one) stops the worker at once;
    # inside one, the trainer's own handler saves the step first
    signal.signal(signal.SIGTERM, _interrupt)
    torch.set_num_threads(threads)
    try:
        work_through([r for r in runs if result_of(r, root) is None], root, progress=False)
    except KeyboardInterrupt:  # Ctrl-C reaches every process of the terminal; the parent reports it once
        sys.exit(130)


def steps_done(planned: PlannedRun, root: Path) -> int:
    """How far a run has trained: its last logged step (all of them once it is done; 0 before it starts)."""
    from engram.train import read_metrics

    if (planned.directory(root) / "result.json").exists():
        return planned.run.train.max_steps
    try:
        records = read_metrics(planned.directory(root) / "train" / "metrics.jsonl", tail_bytes=4096)
    except OSError:
        return 0
    return int(records[-1].get("step", 0)) if records else 0


def _show_progress(bar, runs: list[PlannedRun], root: Path) -> None:
    bar.n = sum(steps_done(r, root) for r in runs)
    bar.set_postfix_str(f"{sum((r.directory(root) / 'result.json').exists() for r in runs)}/{len(runs)} runs",
                        refresh=False)
    bar.refresh()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def run_workers(runs: list[PlannedRun], root: Path, workers: int, threads: int, progress: bool = True,
                desc: str = "sweep") -> list[str]:
    """Work through ``runs`` with ``workers`` processes (one progress bar over all runs); returns the failed
    runs and the workers that exited abnormally. Ctrl-C stops the workers; a run they were training resumes
    from its last checkpoint next time (a lock left behind names a dead process, so it is taken over).

    The workers are started with ``spawn``: each imports engram afresh, then calls ``work_through`` on the
    same plan (a forked child of a process that has run torch can hang in its thread pool, and cannot use
    CUDA at all). The locks decide which worker trains which run."""
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=_worker, args=(runs, root, threads, os.getpid()), name=f"engram-sweep-worker-{i}")
             for i in range(workers)]
    for p in procs:
        p.start()
    # SIGTERM (kill, a scheduler's time limit) stops the workers the way Ctrl-C does, so none trains on
    # as an orphan (a SIGKILL cannot be caught: the workers notice their parent is gone, _follow_parent)
    old_term = signal.signal(signal.SIGTERM, _interrupt) if threading.current_thread() is threading.main_thread() else None
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(r.run.train.max_steps for r in runs), initial=sum(steps_done(r, root) for r in runs),
                   desc=desc, unit="step", dynamic_ncols=True)
    try:
        while alive := [p for p in procs if p.is_alive()]:
            wait([p.sentinel for p in alive], timeout=5)  # returns early when a worker exits
            if bar is not None:
                _show_progress(bar, runs, root)
    except KeyboardInterrupt:
        # a terminal's Ctrl-C reached the workers too; a SIGTERM did not: pass it on, give them a moment
        # to save their step and release their locks, then stop the rest
        for p in procs:
            if p.is_alive():
                p.terminate()
        deadline = time.time() + 60
        for p in procs:
            p.join(max(0.0, deadline - time.time()))
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        raise
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if bar is not None:
            _show_progress(bar, runs, root)
            bar.close()
    failed = [f"worker {i} exited with {p.exitcode}" for i, p in enumerate(procs) if p.exitcode != 0]
    for r in runs:  # the workers logged these as they happened; collected here for the final summary
        path = r.directory(root) / "failed.json"
        if path.exists() and result_of(r, root) is None:
            failed.append(f"{r.point} seed {r.seed}: {json.loads(path.read_text())['error']}")
    return failed

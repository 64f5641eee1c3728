"""The training loop: ``run_loop(state)`` takes any ``TrainState`` from its step to ``max_steps``: one
``train_step`` per step, then evaluation, the metrics log and checkpoints on their schedule, stopping
cleanly on SIGINT/SIGTERM. ``train(run)`` is ``engram train``: the run directory's lock, ``setup``, the loop.
``engram finetune`` (``engram.hf.finetune``) runs the same loop over a base model with its adapter.

The pieces the loop uses live beside it: ``step`` (``train_step``, ``TrainState``), ``setup``, ``resume``
(which checkpoint, and what may change), ``evaluate``, ``metrics`` (the log), ``device``.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import engram.train.rundir as rundir
from engram.distributed import runtime as rt
from engram.fileio import CheckpointError, atomic_write_json
from engram.model.accounting import count_parameters
from engram.train.config import RunConfig
from engram.train.device import autocast, resolve_device
from engram.train.evaluation import evaluate, mean_loss
from engram.train.metrics import MetricsLog, read_metrics
from engram.train.resume import INIT_FROM_MAY_CHANGE, INIT_ONLY_FIELDS, config_changes
from engram.train.startup import check_splits, setup, stored_run
from engram.train.step import TrainingDiverged, TrainState, train_step

__all__ = ["INIT_FROM_MAY_CHANGE", "INIT_ONLY_FIELDS", "MetricsLog", "StopSignals", "TrainResult", "TrainState",
           "TrainingDiverged", "TrainingInterrupted", "autocast", "check_splits", "config_changes", "evaluate",
           "mean_loss", "read_metrics", "resolve_device", "run_loop", "setup", "train", "train_step"]


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    train_seconds: float
    tokens_per_s: float
    final_eval: dict
    evals: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None
    parameters: dict = field(default_factory=dict)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT or SIGTERM after a finished step, with that step saved. A
    ``KeyboardInterrupt``, so code that stops on Ctrl-C stops on it too; the CLI exits 128 + ``signum``."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint} "
                         "holds it; to continue, train into the same directory again without --no-resume or "
                         "--resume-from (resume=True, the default)")


class StopSignals:
    """SIGINT and SIGTERM ask for a stop at the end of the current step, which is then saved; a second
    SIGINT stops at once (KeyboardInterrupt, nothing saved). Installed only in the main thread (Python
    delivers signals there); elsewhere signals keep their handlers."""

    def __init__(self, verbose: bool):
        self.signum = 0
        self.verbose = verbose
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.verbose:
            print(f"\n[engram] {signal.Signals(signum).name}: stopping after this step and saving it "
                  "(Ctrl-C again stops at once, unsaved)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run_loop(state: TrainState, progress: bool = True,
             on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train ``state`` from ``state.step`` to ``train.max_steps``: a ``train_step`` per step; evaluation
    every ``eval.every`` steps and at the last; a metrics line every ``log_every``; ``state.save`` every
    ``checkpoint.every`` steps, at the last and when a signal stops the run (``TrainingInterrupted``).
    Rank 0 alone logs and shows progress; every rank stops at the same step."""
    if state.save is None:
        raise ValueError("TrainState.save is None: give the state a checkpoint writer before training (engram "
                         "train's is engram.train.startup.save_run_checkpoint)")
    tc, par = state.train, state.parallel
    start = state.step
    resumed = state.last_checkpoint is not None
    log = MetricsLog(state.run_dir / "metrics.jsonl", start if resumed else None) if par.is_main else None

    def evaluate_now() -> dict:
        return evaluate(state.model, state.data.val, tc.batch_size, tc.seq_len, tc.eval.batches, state.device,
                        par.distributed)

    saved_step = start if resumed else None

    def save(done: int, metrics: dict) -> None:
        nonlocal saved_step
        try:
            state.last_checkpoint = state.save(state, done, metrics)
        except (OSError, RuntimeError) as err:
            if isinstance(err, RuntimeError) and "write" not in str(err):  # torch.save reports a full disk so
                raise
            kept = state.last_checkpoint.name if state.last_checkpoint is not None else "none yet"
            detail = " ".join(str(err).split())[-200:]  # torch's message spans lines
            full = isinstance(err, RuntimeError) or getattr(err, "errno", None) == errno.ENOSPC
            raise CheckpointError(f"saving the checkpoint of step {done} in {state.run_dir} failed ({detail}); "
                                  f"nothing of it was kept, the last checkpoint is {kept}: "
                                  f"{'free disk space' if full else 'fix the cause'}, then run the same command to "
                                  "resume") from err
        saved_step = done

    bar = None
    if progress and par.is_main:
        from tqdm import tqdm
        bar = tqdm(total=tc.max_steps, initial=start, desc=state.run_dir.name, unit="step", dynamic_ncols=True)
    evals: list[dict] = []
    train_seconds, trained_tokens = 0.0, 0
    metrics: dict = {}
    stopped = 0
    with StopSignals(verbose=par.is_main) as stop:
        try:
            while state.step < tc.max_steps:
                metrics = train_step(state)
                done = state.step
                train_seconds += metrics.pop("seconds")
                trained_tokens += tc.tokens_per_step
                if log is not None and (done % tc.log_every == 0 or done == tc.max_steps):
                    log.write({"kind": "train", **metrics})
                if done % tc.eval.every == 0 or done == tc.max_steps:
                    result = evaluate_now()
                    evals.append({"step": done, "tokens": metrics["tokens"], **result})
                    if log is not None:
                        log.write({"kind": "eval", "step": done, "tokens": metrics["tokens"], **result})
                    metrics.update(result)
                if done % tc.checkpoint.every == 0 or done == tc.max_steps:
                    save(done, metrics)
                if bar is not None:
                    bar.update(1)
                    shown = {"loss": f"{metrics['loss']:.3f}", "tok/s": f"{trained_tokens / train_seconds:,.0f}"}
                    if "val_loss" in metrics:
                        shown["val"] = f"{metrics['val_loss']:.3f}"
                    bar.set_postfix(shown)
                if on_step is not None:
                    on_step(done, metrics)
                stopped = par.max_over_ranks(stop.signum)  # every rank stops at the same step
                if stopped:
                    break
            if stopped and saved_step != state.step:
                save(state.step, metrics)
        finally:
            if bar is not None:
                bar.close()
    if stopped:
        par.close()
        raise TrainingInterrupted(stopped, state.step, state.last_checkpoint)

    final = evals[-1] if evals else evaluate_now()
    par.close()  # the DDP wrapper goes now, not at interpreter exit (see Parallel.close)
    return TrainResult(run_dir=state.run_dir, steps=tc.max_steps, tokens=tc.max_steps * tc.tokens_per_step,
                       train_seconds=train_seconds,
                       tokens_per_s=trained_tokens / train_seconds if train_seconds else 0.0,
                       final_eval=final, evals=evals, checkpoint=state.last_checkpoint)


def _announce(state: TrainState, counts: dict) -> None:
    tc, par = state.train, state.parallel
    print(f"[engram] run {state.run_dir}: P_tot={counts['total']:,} P_act={counts['active']:,} "
          f"Engram tables={counts['engram_tables']:,}"
          + (f" OverEncoding tables={counts['overencoding_tables']:,}" if counts.get("overencoding_tables") else "")
          + f"; {tc.tokens_per_step:,} tokens/step, "
          f"{tc.max_steps} steps, device {state.device}" + (f", resuming at step {state.step}" if state.step else "")
          + (f"; {par.world} ranks ({tc.batch_size // par.world} rows each)" if par.distributed else "")
          + (", tables sharded by rows" if par.tables_sharded else "")
          + (", dense weights sharded by FSDP2" if par.fsdp else ", dense weights replicated (DDP)" if par.distributed
             else "") + (", Muon for the matrices" if tc.optim.name == "muon" else ""),
          file=sys.stderr)


def train(run: RunConfig, out_dir: str | Path | None = None, resume: bool = True, progress: bool = True,
          on_step: Callable[[int, dict], None] | None = None, resume_from: int | None = None) -> TrainResult:
    """Train ``run`` into ``out_dir`` (default ``run.train.out_dir``): from its latest checkpoint
    (``resume``), from checkpoint ``resume_from``, or afresh (``resume=False``; see ``engram.train.rundir``
    for what happens to the old history). The run directory is locked while training: a second trainer
    is refused. SIGINT/SIGTERM save the last finished step and raise ``TrainingInterrupted``.

    ``on_step(step, metrics)`` is called after every optimizer step (logging hooks, tests). Inside a
    process group of several ranks every rank calls ``train`` with the same arguments (see
    ``engram.train.startup``); rank 0 alone locks the directory, prints, logs and writes the replicated
    checkpoint files.
    """
    run_dir = Path(out_dir or run.train.out_dir)
    with rundir.lock_run(run_dir) if rt.is_main() else contextlib.nullcontext():
        state = setup(run, run_dir, resume, resume_from)
        counts = count_parameters(state.run.model, state.train.seq_len).to_dict()
        if state.parallel.is_main:
            state.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(state.run_dir / "config.json", stored_run(state.run, state.run_dir).to_dict())
            _announce(state, counts)
        result = run_loop(state, progress, on_step)
        result.parameters = counts
        return result

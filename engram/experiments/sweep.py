"""Sweep runner: ``engram sweep allocation|memory|ablation --budget NAME [--seeds K] [--workers N]``.

A sweep is a plan: a list of ``PlannedRun`` (a grid point and a seed, with its full ``RunConfig``).
Each run lives in ``<root>/<budget>/<sweep>/<point>/seed<k>/`` and writes there::

    plan.json      the run's config and grid coordinates; a later plan that differs is refused
    train/         the training run (checkpoints, metrics.jsonl): an interrupted run resumes
    result.json    written last and atomically: its presence means the run is done and is skipped
                   (a run identical to one another sweep of the budget finished reuses that result)
    failed.json    the error of a run that raised; the next invocation retries it
    .lock          held while a process trains the run (host and pid inside)

Runs are claimed through the lock file (``O_CREAT | O_EXCL``), so any number of processes, started by
``--workers`` or by hand, can work through one sweep: each skips runs that are done or claimed. A lock
left by a dead process on this host is taken over. Seeds are the outer loop, so every grid point has
a first seed before any gets a second.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from engram.config import ModelConfig, OverEncodingConfig, RunConfig
from engram.cli.overrides import apply_overrides
from engram.model.accounting import count_parameters
from engram.experiments.allocation import allocate, allocation_grid, format_grid, with_rows_per_head
from engram.experiments.budgets import Budget, get_budget


@dataclass(frozen=True)
class PlannedRun:
    sweep: str
    budget: str
    point: str  # grid-point label, unique within the sweep and safe as a directory name
    seed: int
    run: RunConfig
    info: dict = field(default_factory=dict)  # grid coordinates: rho / method, table_params / variant, group

    def directory(self, root: Path) -> Path:
        return Path(root) / self.budget / self.sweep / self.point / f"seed{self.seed}"


def _seeded(run: RunConfig, model: ModelConfig, seed: int) -> RunConfig:
    return dataclasses.replace(run, model=model, train=dataclasses.replace(run.train, seed=seed))


def _table_params(model: ModelConfig) -> int:
    count = count_parameters(model)
    return count.engram_tables + count.overencoding_tables


# -- the three plans ----------------------------------------------------------------------------------
def plan_allocation(budget: Budget, seeds: int) -> list[PlannedRun]:
    base = budget.base_run()
    points = allocation_grid(base.model, budget.engram_template(), budget.rhos)
    return [PlannedRun("allocation", budget.name, p.label, seed, _seeded(base, p.config, seed),
                       {"rho": p.rho, "rho_nominal": p.rho_nominal, "rho_target": p.rho_target,
                        "removed_experts": p.removed_experts, "rows_per_head": p.rows_per_head,
                        "table_params": p.params.engram_tables})
            for seed in range(seeds) for p in points]


def memory_models(budget: Budget) -> list[tuple[str, dict, ModelConfig]]:
    """(label, info, model): the fixed rho = 1 backbone without memory, with Engram, with OverEncoding."""
    base = budget.base_run().model
    template = budget.engram_template()
    models = [("none", {"method": "none", "rows_per_head": 0}, base)]
    for rows in budget.memory_rows:
        engram = ModelConfig(backbone=base.backbone, engram=with_rows_per_head(template, rows))
        models.append((f"engram-rows={rows}", {"method": "engram", "rows_per_head": rows}, engram))
    for rows in budget.memory_rows:
        over = OverEncodingConfig(engram_vocab_size=[rows] * template.n_orders, max_ngram_size=template.max_ngram_size,
                                  n_embed_per_ngram=template.n_embed_per_ngram,
                                  n_head_per_ngram=template.n_head_per_ngram, pad_id=template.pad_id)
        models.append((f"overencoding-rows={rows}", {"method": "overencoding", "rows_per_head": rows},
                       ModelConfig(backbone=base.backbone, overencoding=over)))
    return models


def plan_memory(budget: Budget, seeds: int) -> list[PlannedRun]:
    base = budget.base_run()
    return [PlannedRun("memory", budget.name, label, seed, _seeded(base, model, seed),
                       info | {"table_params": _table_params(model)})
            for seed in range(seeds) for label, info, model in memory_models(budget)]


def ablation_models(budget: Budget) -> list[tuple[str, str, ModelConfig]]:
    """(variant, group, model) at the Engram table budget of ``budget.ablation_rho`` (SPEC §5)."""
    base = budget.base_run().model
    template = budget.engram_template()
    ref = allocate(base, template, budget.ablation_rho).config
    e, bb = ref.engram, ref.backbone

    def engram(**changes) -> ModelConfig:
        return dataclasses.replace(ref, engram=dataclasses.replace(e, **changes))

    # +4-grams: the same table parameters spread over three orders instead of two
    rows4 = e.engram_vocab_size[0] * e.n_orders // (e.n_orders + 1)
    variants = [
        ("full", "component", ref),
        ("no-compression", "component", engram(compress=False)),
        ("no-gate", "component", engram(gate="none")),
        ("no-short-conv", "component", engram(short_conv=False)),
        ("+4-grams", "component", engram(max_ngram_size=e.max_ngram_size + 1,
                                         engram_vocab_size=[rows4] * (e.n_orders + 1))),
    ]
    if bb.hc_mult == 1:  # branch-specific keys need hyper-connections: compare G=2 with and without them
        g2 = ModelConfig(backbone=dataclasses.replace(bb, hc_mult=2), engram=e)
        variants += [("G=2", "component", g2),
                     ("G=2-shared-key", "component",
                      dataclasses.replace(g2, engram=dataclasses.replace(g2.engram, branch_keys=False)))]
    else:
        variants += [("shared-key", "component", engram(branch_keys=False))]
    variants += [(f"layer={layer}", "layer", engram(layer_ids=[layer]))
                 for layer in budget.layer_sweep if [layer] != e.layer_ids]
    return variants


def plan_ablation(budget: Budget, seeds: int) -> list[PlannedRun]:
    base = budget.base_run()
    variants = ablation_models(budget)
    ref_layer = variants[0][2].engram.layer_ids[0]  # variants[0] is "full"
    runs = []
    for seed in range(seeds):
        for variant, group, model in variants:
            info = {"variant": variant, "group": group, "table_params": _table_params(model),
                    "layer": model.engram.layer_ids[0], "reference_layer": ref_layer}
            runs.append(PlannedRun("ablation", budget.name, variant, seed, _seeded(base, model, seed), info))
    return runs


PLANS: dict[str, Callable[[Budget, int], list[PlannedRun]]] = {
    "allocation": plan_allocation, "memory": plan_memory, "ablation": plan_ablation}


def plan(sweep: str, budget: str, seeds: int | None = None, overrides: list[str] | None = None) -> list[PlannedRun]:
    """The runs of ``sweep`` for ``budget`` (``seeds`` defaults to the budget's); ``overrides`` are
    ``key=value`` settings applied to every run's data/train config (e.g. ``train.max_steps=20``)."""
    if sweep not in PLANS:
        raise ValueError(f"unknown sweep {sweep!r}; known: {list(PLANS)}")
    b = get_budget(budget)
    n = b.seeds if seeds is None else seeds
    if n < 1:
        raise ValueError(f"--seeds must be >= 1, got {n}")
    runs = PLANS[sweep](b, n)
    if overrides:
        bad = [o for o in overrides if o.split("=", 1)[0].strip().startswith("model.")]
        if bad:
            raise ValueError(f"sweep overrides may not change the model (the grid defines it): {bad}")
        runs = [dataclasses.replace(r, run=apply_overrides(r.run, overrides)) for r in runs]
    return runs


# -- running one planned run ---------------------------------------------------------------------------
def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


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
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                host, pid = path.read_text().split()
            except (OSError, ValueError):
                return False  # being written right now, or unreadable: leave it
            if host != socket.gethostname() or _pid_alive(int(pid)):
                return False
            path.unlink(missing_ok=True)  # stale: its process died
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return True
    return False


def _plan_record(planned: PlannedRun) -> dict:
    return {"sweep": planned.sweep, "budget": planned.budget, "point": planned.point, "seed": planned.seed,
            "info": planned.info, "run": planned.run.to_dict()}


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
    if path.exists() and _stored_run(path) != planned.run.to_dict():
        raise ValueError(f"{directory} holds a run of a different config (the budget or the overrides "
                         f"changed); use another --out or remove the directory")


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
        if _stored_run(plan_path) == mine:
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
            _write_json(directory / "plan.json", _plan_record(planned))
        (directory / "failed.json").unlink(missing_ok=True)
        twin = find_twin(planned, root)
        if twin is not None:
            _write_json(directory / "result.json", twin)
            return twin
        try:
            result = train(planned.run, out_dir=directory / "train", progress=progress)
        except Exception as exc:
            _write_json(directory / "failed.json", {"error": f"{type(exc).__name__}: {exc}",
                                                    "traceback": traceback.format_exc()})
            raise
        numbers = {
            "val_loss": result.final_eval["val_loss"], "val_bpb": result.final_eval["val_bpb"],
            "tokens": result.tokens, "train_seconds": round(result.train_seconds, 2),
            "tokens_per_s": round(result.tokens_per_s, 1), "params": result.parameters, "evals": result.evals,
            "checkpoint": str(result.checkpoint) if result.checkpoint else None}
        record = _record(planned, numbers)
        _write_json(directory / "result.json", record)
        return record
    finally:
        lock.unlink(missing_ok=True)


# -- the sweep ---------------------------------------------------------------------------------------
def _log(message: str) -> None:
    print(f"[engram.sweep] {message}", file=sys.stderr, flush=True)


def run_sweep(sweep: str, budget: str, seeds: int | None = None, root: str | Path = "runs/sweeps",
              workers: int = 1, threads: int | None = None, overrides: list[str] | None = None,
              progress: bool = True) -> list[dict]:
    """Run (or finish) a sweep; returns the results of every finished run of the plan.

    ``workers > 1`` starts that many worker processes on the same plan (each with ``threads`` torch
    threads, default cores // workers) and shows one progress bar over the whole sweep.
    """
    from engram.data import prepare_data

    root = Path(root)
    runs = plan(sweep, budget, seeds, overrides)
    prepare_data(runs[0].run.data)  # once, before workers start: preparation is not parallel-safe
    if threads is None and workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    pending = [r for r in runs if result_of(r, root) is None]
    _log(f"{sweep} sweep, budget {budget}: {len(runs)} runs, {len(runs) - len(pending)} already done, "
         f"{len(pending)} to go" + (f", {workers} workers" if workers > 1 else ""))
    failures: list[str] = []
    if workers > 1 and pending:
        failures = _run_workers(sweep, budget, seeds, root, workers, threads, overrides or [], runs, progress)
    else:
        for i, planned in enumerate(pending):
            start = time.time()
            try:
                record = execute(planned, root, progress=progress)
            except Exception as exc:  # keep going: one diverged point must not lose the rest of the sweep
                failures.append(f"{planned.point} seed {planned.seed}: {type(exc).__name__}: {exc}")
                _log(f"FAILED {planned.point} seed {planned.seed}: {exc}")
                continue
            if record is None:
                _log(f"{planned.point} seed {planned.seed}: claimed by another process, skipped")
                continue
            _log(f"[{i + 1}/{len(pending)}] {planned.point} seed {planned.seed}: val_loss {record['val_loss']:.4f} "
                 f"({time.time() - start:.0f} s)")
    results = [r for r in (result_of(p, root) for p in runs) if r is not None]
    if failures:
        _log(f"{len(failures)} run(s) failed (see failed.json in their directories; rerun to retry):\n  "
             + "\n  ".join(failures))
    return results


def _run_workers(sweep, budget, seeds, root, workers, threads, overrides, runs, progress) -> list[str]:
    cmd = [sys.executable, "-m", "engram.cli", "sweep", sweep, "--budget", budget, "--out", str(root),
           "--workers", "1", "--threads", str(threads), "--no-progress", "--no-summary"]
    if seeds is not None:
        cmd += ["--seeds", str(seeds)]
    for o in overrides:
        cmd += ["--set", o]
    procs = [subprocess.Popen(cmd) for _ in range(workers)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(runs), desc=f"{sweep} sweep", unit="run", dynamic_ncols=True)
    try:
        while any(p.poll() is None for p in procs):
            if bar is not None:
                bar.n = sum(result_of(r, root) is not None for r in runs)
                bar.refresh()
            time.sleep(5)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    finally:
        if bar is not None:
            bar.n = sum(result_of(r, root) is not None for r in runs)
            bar.close()
    return [f"worker {i} exited with {p.returncode}" for i, p in enumerate(procs) if p.returncode != 0]


def format_summary(results: list[dict]) -> str:
    """Per grid point: seeds, mean and spread of the validation loss."""
    from engram.experiments.report import summarise

    rows = summarise(results)
    lines = [f"{'point':<28} {'seeds':>5} {'val_loss':>9} {'std':>7} {'min':>8} {'max':>8}"]
    for r in rows:
        lines.append(f"{r['point']:<28} {r['n']:>5} {r['mean']:>9.4f} {r['std']:>7.4f} {r['min']:>8.4f} {r['max']:>8.4f}")
    return "\n".join(lines)


def describe_plan(sweep: str, budget: str, seeds: int | None = None, overrides: list[str] | None = None) -> str:
    """What ``--dry-run`` prints: the solver's table (allocation) or each grid point's sizes, and the
    number of runs."""
    runs = plan(sweep, budget, seeds, overrides)
    if sweep == "allocation":
        b = get_budget(budget)
        base = b.base_run().model
        lines = [format_grid(allocation_grid(base, b.engram_template(), b.rhos), count_parameters(base))]
    else:
        lines = [f"{'point':<28} {'table params':>13} {'P_tot':>12} {'P_act':>11}"]
        for r in runs:
            if r.seed == 0:
                c = count_parameters(r.run.model)
                lines.append(f"{r.point:<28} {r.info['table_params']:>13,} {c.total:>12,} {c.active:>11,}")
    tc = runs[0].run.train
    lines.append(f"{len(runs)} runs; tokens per run {tc.max_steps * tc.tokens_per_step:,}")
    return "\n".join(lines)


def report_sweep(budget: str, root: str | Path, out_dir: str | Path) -> tuple[str, dict[str, Path]]:
    """Plots, fits and tables of every finished run of ``budget`` under ``root``: (markdown, paths)."""
    from engram.experiments.report import load_results, markdown_tables, write_report

    where = Path(root) / get_budget(budget).name
    results = load_results([where])
    if not results:
        raise FileNotFoundError(f"no result.json under {where}; run a sweep first")
    return markdown_tables(results), write_report(results, Path(out_dir))

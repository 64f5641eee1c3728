"""The sweep runner (engram.sweeps.runner): resumable and parallel-safe execution of a plan."""

import json
import multiprocessing.context
import os
import socket
import subprocess
import sys

import pytest
import torch

import engram.train
from engram.cli import main as cli
from engram.sweeps import runner
from engram.sweeps.plan import plan


def test_sweep_runs_resumes_and_skips(budget_file, tmp_path, monkeypatch):
    results = runner.run_sweep("allocation", budget_file, seeds=1, root=tmp_path, progress=False)
    assert sorted(r["point"] for r in results) == ["rho=0.500", "rho=1.000"]
    for r in results:
        assert r["sweep"] == "allocation" and r["budget"] == "unit" and r["seed"] == 0
        assert r["val_loss"] > 0 and r["params"]["total"] > 0 and "rho" in r
        directory = tmp_path / "unit" / "allocation" / r["point"] / "seed0"
        assert (directory / "plan.json").exists() and not (directory / ".lock").exists()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(engram.train, "train", no_training)
    again = runner.run_sweep("allocation", budget_file, seeds=1, root=tmp_path, progress=False)
    assert sorted(r["val_loss"] for r in again) == sorted(r["val_loss"] for r in results)
    # the ablation's reference is the allocation point at its rho: reused, not retrained
    full = next(r for r in plan("ablation", budget_file, seeds=1) if r.point == "full")
    record = runner.execute(full, tmp_path, progress=False)
    assert record["reused_from"].endswith("rho=0.500/seed0") and record["variant"] == "full"
    assert record["val_loss"] == next(r["val_loss"] for r in results if r["point"] == "rho=0.500")
    report = tmp_path / "report"
    with pytest.warns(UserWarning, match="no ablation plot"):  # only the reused reference so far
        assert cli(["sweep", "report", "--budget", budget_file, "--out", str(tmp_path),
                    "--report-dir", str(report)]) == 0
    summary = json.loads((report / "summary.json").read_text())
    assert {row["point"] for row in summary["summary"]} >= {"rho=1.000", "rho=0.500", "full"}
    assert "rho=0.500" in (report / "tables.md").read_text()
    with pytest.raises(ValueError, match="different config"):  # a changed plan never mixes with old results
        runner.run_sweep("allocation", budget_file, seeds=1, root=tmp_path, overrides=["train.lr=0.01"], progress=False)


def test_failed_run_is_recorded_and_the_sweep_goes_on(budget_file, tmp_path, monkeypatch):
    real = engram.train.train

    def flaky(run, out_dir, **kwargs):
        if run.model.engram is not None:
            raise RuntimeError("boom")
        return real(run, out_dir=out_dir, **kwargs)

    monkeypatch.setattr(engram.train, "train", flaky)
    results = runner.run_sweep("allocation", budget_file, seeds=1, root=tmp_path, progress=False)
    assert [r["point"] for r in results] == ["rho=1.000"]
    failed = tmp_path / "unit" / "allocation" / "rho=0.500" / "seed0" / "failed.json"
    assert "boom" in json.loads(failed.read_text())["error"]
    monkeypatch.setattr(engram.train, "train", real)
    results = runner.run_sweep("allocation", budget_file, seeds=1, root=tmp_path, progress=False)
    assert len(results) == 2 and not failed.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_locks_claim_runs_and_stale_locks_are_taken_over(budget_file, tmp_path):
    planned = plan("allocation", budget_file, seeds=1)[0]
    directory = planned.directory(tmp_path)
    directory.mkdir(parents=True)
    lock = directory / ".lock"
    lock.write_text(f"{socket.gethostname()} {os.getppid()}")  # a live process holds it
    assert runner.execute(planned, tmp_path, progress=False) is None
    assert runner.result_of(planned, tmp_path) is None
    lock.write_text(f"{socket.gethostname()} {_dead_pid()}")  # its process died mid-run
    record = runner.execute(planned, tmp_path, progress=False)
    assert record is not None and record["point"] == planned.point and not lock.exists()


@pytest.mark.slow
def test_two_workers_share_one_sweep(budget_file, tmp_path):
    results = runner.run_sweep("allocation", budget_file, seeds=2, root=tmp_path, workers=2, threads=1, progress=False)
    assert len(results) == 4
    assert not list(tmp_path.rglob(".lock"))
    for r in results:  # each run trained once: its metrics log holds one history
        log = tmp_path / "unit" / "allocation" / r["point"] / f"seed{r['seed']}" / "train" / "metrics.jsonl"
        steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if '"train"' in line]
        assert steps == [1, 2]


def test_workers_are_spawned_processes_running_the_library(budget_file, tmp_path, monkeypatch):
    """`--workers N` starts N spawned processes that call the runner on the plan; nothing shells out to
    `python -m engram.cli`, so the library does not depend on the CLI's flag names."""
    started = []
    start = multiprocessing.context.SpawnProcess.start

    def record_start(process):
        started.append(process)
        start(process)

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"a sweep started a subprocess: {args}")

    monkeypatch.setattr(multiprocessing.context.SpawnProcess, "start", record_start)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    results = runner.run_sweep("allocation", budget_file, seeds=1, root=tmp_path, workers=2, threads=1, progress=False)
    assert sorted(r["point"] for r in results) == ["rho=0.500", "rho=1.000"]
    assert len(started) == 2 and [p.exitcode for p in started] == [0, 0]
    assert not list(tmp_path.rglob(".lock"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs train.device=cuda to fail")
def test_runs_that_fail_in_workers_are_reported(budget_file, tmp_path, capfd):
    results = runner.run_sweep("allocation", budget_file, seeds=1, root=tmp_path, workers=2, threads=1,
                               overrides=["train.device=cuda"], progress=False)
    assert results == []
    for point in ("rho=0.500", "rho=1.000"):
        failed = tmp_path / "unit" / "allocation" / point / "seed0" / "failed.json"
        assert "CUDA is not available" in json.loads(failed.read_text())["error"]
    err = capfd.readouterr().err
    assert "2 run(s) failed" in err and "rho=0.500 seed 0: ValueError" in err


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_workers_stop_with_their_parent_and_save_their_run(budget_file, tmp_path, how):
    """Killing `engram sweep --workers N` (SIGTERM, or SIGKILL that cannot be caught) stops its workers:
    none trains on as an orphan holding its lock, and the run it was training saved a checkpoint."""
    import signal
    import time

    script = (f"from engram.sweeps import runner\n"
              f"runner.run_sweep('allocation', {budget_file!r}, seeds=1, root={str(tmp_path)!r}, workers=2, threads=1,"
              f" overrides=['train.max_steps=100000', 'train.save_every=100000', 'train.eval_every=100000'],"
              f" progress=False)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    locks = []
    deadline = time.time() + 120
    while time.time() < deadline and len(locks) < 2:
        time.sleep(0.5)
        locks = list(tmp_path.rglob(".lock"))
    assert len(locks) == 2, "the workers never claimed their runs"
    pids = [int(lock.read_text().split()[1]) for lock in locks]
    while time.time() < deadline and len(list(tmp_path.rglob("metrics.jsonl"))) < 2:
        time.sleep(0.5)  # until both train (a step logged)
    parent.send_signal(getattr(signal, how))
    parent.wait(timeout=120)
    deadline = time.time() + 60
    while time.time() < deadline and any(runner._pid_alive(pid) for pid in pids):
        time.sleep(0.5)
    assert not any(runner._pid_alive(pid) for pid in pids), "a worker outlived its parent"
    assert not list(tmp_path.rglob(".lock"))
    assert len(list(tmp_path.rglob("checkpoints/step_*"))) == 2  # each run saved the step it stopped at


def test_steps_done_reads_a_runs_last_logged_step(budget_file, tmp_path):
    """The workers' progress bar counts steps: 0 before a run starts, its last logged step while it
    trains (a torn last line skipped), max_steps once done."""
    planned = plan("allocation", budget_file, seeds=1)[0]
    assert runner.steps_done(planned, tmp_path) == 0
    metrics = planned.directory(tmp_path) / "train" / "metrics.jsonl"
    metrics.parent.mkdir(parents=True)
    metrics.write_text('{"kind": "train", "step": 1}\n{"kind": "eval", "step": 2}\n{"kind": "tr')
    assert runner.steps_done(planned, tmp_path) == 2
    (planned.directory(tmp_path) / "result.json").write_text("{}")
    assert runner.steps_done(planned, tmp_path) == planned.run.train.max_steps


def test_a_run_of_another_init_scheme_is_refused_and_never_reused(budget_file, tmp_path):
    """Results trained before the initialisation scheme changed do not pair with new runs: a run
    directory holding one is refused with what to do, and another sweep never reuses it as a twin."""
    planned = next(r for r in plan("allocation", budget_file, seeds=1) if r.point == "rho=0.500")
    directory = planned.directory(tmp_path)
    directory.mkdir(parents=True)
    record = runner._plan_record(planned)
    del record["init_scheme"]  # what sweeps wrote before schemes were recorded
    (directory / "plan.json").write_text(json.dumps(record))
    (directory / "result.json").write_text(json.dumps({"sweep": "allocation", "point": "rho=0.500", "seed": 0,
                                                       "val_loss": 1.0}))
    with pytest.raises(ValueError, match="another initialisation scheme.*use another --out"):
        runner.result_of(planned, tmp_path)
    full = next(r for r in plan("ablation", budget_file, seeds=1) if r.point == "full")
    assert runner.find_twin(full, tmp_path) is None


def test_a_lock_is_never_seen_empty_and_the_staging_file_is_removed(tmp_path):
    lock = tmp_path / ".lock"
    assert runner.try_lock(lock) and lock.read_text().split()[1] == str(os.getpid())
    assert not runner.try_lock(lock)  # held by a live process (this one)
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]

"""The run directory defends its history: --no-resume, one trainer at a time, recovery from a bad latest
checkpoint, stale staging directories, SIGINT/SIGTERM saving, changed settings on resume, limits up front."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from support import tiny_run
from engram.cli import main
from engram.fileio import FileLock
from engram.train import (CheckpointError, RunDirectoryBusy, TrainingInterrupted, latest_checkpoint,
                          list_checkpoints, load_checkpoint, train, verify_checkpoint)
from engram.train.rundir import LOCK, lock_run


def steps(run_dir):
    return [s for s, _ in list_checkpoints(run_dir)]


def metric_steps(run_dir, kind="train"):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(l)["step"] for l in lines if l.strip() and json.loads(l)["kind"] == kind]


def test_no_resume_into_a_longer_history_keeps_both(corpus_dir, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_run(corpus_dir, cache_dir, run_dir, max_steps=12, save_every=4), progress=False)
    assert steps(run_dir) == [8, 12]
    result = train(tiny_run(corpus_dir, cache_dir, run_dir, max_steps=4, save_every=2), resume=False, progress=False)
    # the new run's checkpoints survive its own pruning, latest and the reported path are real
    assert steps(run_dir) == [2, 4]
    assert result.checkpoint.is_dir() and latest_checkpoint(run_dir) == result.checkpoint
    assert metric_steps(run_dir) == [1, 2, 3, 4]
    (archive,) = (run_dir / "archive").iterdir()
    assert archive.name.endswith("-fresh") and steps(archive) == [8, 12]
    assert metric_steps(archive)[-1] == 12 and (archive / "config.json").is_file()
    verify_checkpoint(archive / "checkpoints" / "step_0000012")


def test_a_second_trainer_is_refused_naming_the_holder(corpus_dir, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    run = tiny_run(corpus_dir, cache_dir, run_dir, max_steps=100_000, save_every=100_000, eval_every=100_000)
    cmd = [sys.executable, "-m", "engram.cli", "train", "--preset", "tiny-engram", "--out", str(run_dir),
           "--no-progress", *[a for k, v in _flat_sets(run) for a in ("--set", f"{k}={v}")]]
    first = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text():
            assert first.poll() is None, first.stderr.read()
            assert time.time() < deadline
            time.sleep(0.2)
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"pid {first.pid}" in second.stderr and "in use by another training process" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        with pytest.raises(RunDirectoryBusy, match=f"pid {first.pid}"):
            train(run, progress=False)
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=120)
    assert first.returncode == 143  # stopped by SIGTERM, its last step saved
    assert latest_checkpoint(run_dir) is not None


def _flat_sets(run):
    """(dotted key, JSON value) for the data and train fields of ``run`` (the preset has the model)."""
    for section in ("data", "train"):
        for key, value in getattr(run, section).to_dict().items():
            yield f"{section}.{key}", json.dumps(value)


def test_a_dead_holders_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from engram.fileio import FileLock; "
                               f"FileLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)",
                               str(tmp_path / LOCK)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirectoryBusy, match=f"pid {holder.pid}"):
        lock_run(tmp_path)
    holder.kill()  # kill -9: no cleanup of its own
    holder.wait()
    lock = lock_run(tmp_path)
    assert f"pid {os.getpid()}" in (tmp_path / LOCK).read_text()
    lock.release()


def test_stale_staging_is_removed_on_start(corpus_dir, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    stale = run_dir / "checkpoints" / ".tmp_step_0000008_12345"
    (stale / "tokenizer").mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    train(tiny_run(corpus_dir, cache_dir, run_dir, max_steps=4), progress=False)
    assert not stale.exists() and steps(run_dir) == [4]


def _corrupt(checkpoint: Path) -> None:
    path = checkpoint / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_bad_latest_names_the_last_intact_one_and_resume_from_continues(corpus_dir, cache_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    run = tiny_run(corpus_dir, cache_dir, run_dir, max_steps=8, save_every=4)
    train(run, progress=False)
    _corrupt(run_dir / "checkpoints" / "step_0000008")
    capsys.readouterr()
    for argv in (["eval", "--ckpt", str(run_dir)], ["sample", "--ckpt", str(run_dir), "--prompt", "x"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "step_0000008/model.safetensors" in err and "last intact checkpoint is" in err
        assert "step_0000004" in err and "--resume-from 4" in err and len(err.splitlines()) == 1
    with pytest.raises(CheckpointError, match="--resume-from 4"):
        train(run, progress=False)

    longer = dataclasses.replace(run, train=dataclasses.replace(run.train, max_steps=12))
    result = train(longer, progress=False, resume_from=4)
    assert steps(run_dir) == [8, 12] and result.checkpoint.name == "step_0000012"
    verify_checkpoint(run_dir / "checkpoints" / "step_0000008")  # the new step 8, not the damaged one
    assert metric_steps(run_dir) == list(range(1, 13))  # one history, no duplicated steps
    (archive,) = (run_dir / "archive").iterdir()
    assert archive.name.endswith("-rewind-4") and steps(archive) == [8]


def test_resume_from_a_missing_step_is_refused(corpus_dir, cache_dir, tmp_path):
    run = tiny_run(corpus_dir, cache_dir, tmp_path / "run", max_steps=4)
    train(run, progress=False)
    with pytest.raises(CheckpointError, match=r"no checkpoint of step 3 \(steps: 4\)"):
        train(run, progress=False, resume_from=3)


def test_latest_naming_nothing_is_reported_with_the_way_out(corpus_dir, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_run(corpus_dir, cache_dir, run_dir, max_steps=8, save_every=4), progress=False)
    (run_dir / "checkpoints" / "latest").write_text("step_0000099\n")
    with pytest.raises(CheckpointError, match="step_0000099, which does not exist.*step_0000008.*--resume-from 8"):
        latest_checkpoint(run_dir)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_saves_the_last_finished_step(corpus_dir, cache_dir, tmp_path, sig, code):
    run_dir = tmp_path / "run"
    run = tiny_run(corpus_dir, cache_dir, run_dir, max_steps=100_000, save_every=100_000, eval_every=100_000)
    cmd = [sys.executable, "-m", "engram.cli", "train", "--preset", "tiny-engram", "--out", str(run_dir),
           "--no-progress", *[a for k, v in _flat_sets(run) for a in ("--set", f"{k}={v}")]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run_dir / "metrics.jsonl").is_file() or len(metric_steps(run_dir)) < 3:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    ckpt = latest_checkpoint(run_dir)
    verify_checkpoint(ckpt)
    assert steps(run_dir) == [metric_steps(run_dir)[-1]]  # the last finished step, nothing lost
    assert f"stopped by {signal.Signals(sig).name} after step {steps(run_dir)[0]}" in err


def test_in_process_sigterm_raises_training_interrupted(corpus_dir, cache_dir, tmp_path):
    run_dir = tmp_path / "run"

    def term_at_3(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as stop:
        train(tiny_run(corpus_dir, cache_dir, run_dir, max_steps=12), progress=False, on_step=term_at_3)
    assert stop.value.signum == signal.SIGTERM and stop.value.step == 3
    assert steps(run_dir) == [3] and stop.value.checkpoint == run_dir / "checkpoints" / "step_0000003"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    resumed = train(tiny_run(corpus_dir, cache_dir, run_dir, max_steps=12), progress=False)
    whole = train(tiny_run(corpus_dir, cache_dir, tmp_path / "whole", max_steps=12), progress=False)
    assert resumed.final_eval == whole.final_eval  # the saved step resumes bit-identically


def test_resume_names_changed_fields(corpus_dir, cache_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(tiny_run(corpus_dir, cache_dir, run_dir, max_steps=4), progress=False)
    other = tiny_run(corpus_dir, cache_dir, run_dir, max_steps=8)
    other.model.backbone.d_model = 96
    with pytest.raises(ValueError, match=r"different model \(model.backbone.d_model: 64 -> 96\)"):
        train(other, progress=False)
    capsys.readouterr()
    train(tiny_run(corpus_dir, cache_dir, run_dir, max_steps=8, lr=1e-3), progress=False)
    err = capsys.readouterr().err
    assert "changed settings (allowed" in err and "train.lr: 0.003 -> 0.001" in err and "train.max_steps: 4 -> 8" in err
    # the tables' initial std decides step 0 only: a resumed run reports it, never refuses it
    init = tiny_run(corpus_dir, cache_dir, run_dir, max_steps=9)
    first = init.model.engram.table_init_std
    init.model.engram.table_init_std = 0.5
    train(init, progress=False)
    assert f"keeping the checkpoint's model.engram.table_init_std={first!r} (asked 0.5)" in capsys.readouterr().err
    assert json.loads((run_dir / "config.json").read_text())["model"]["engram"]["table_init_std"] == first


def test_a_validation_split_too_small_is_refused_before_any_step(corpus_dir, cache_dir, tmp_path):
    run = tiny_run(corpus_dir, cache_dir, tmp_path / "run", seq_len=64)
    run.model.backbone.max_seq_len = 100_000
    run = dataclasses.replace(run, train=dataclasses.replace(run.train, seq_len=20_000))
    with pytest.raises(ValueError, match="split of .* has no window of train.seq_len=20000 tokens"):
        train(run, progress=False)
    assert steps(tmp_path / "run") == [] and not (tmp_path / "run" / "metrics.jsonl").exists()


def test_seq_len_above_the_context_is_refused_at_config_time(corpus_dir, cache_dir, tmp_path, capsys):
    run = tiny_run(corpus_dir, cache_dir, tmp_path / "run")
    with pytest.raises(ValueError, match="train.seq_len: is 512, above the model's context"):
        dataclasses.replace(run, train=dataclasses.replace(run.train, seq_len=512))
    assert main(["train", "--preset", "tiny-engram", "--set", "train.seq_len=100000"]) == 2
    assert "above the model's context" in capsys.readouterr().err


def test_relative_paths_resolve_against_the_run_directory(corpus_dir, cache_dir, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    rel_corpus = os.path.relpath(corpus_dir, work)
    run = tiny_run(rel_corpus, "cache", "runs/a", max_steps=2)
    result = train(run, progress=False)
    stored = json.loads((work / "runs/a/checkpoints/step_0000002/run_config.json").read_text())["data"]
    assert stored["cache_dir"] == "../../cache" and stored["source"] == os.path.relpath(corpus_dir, work / "runs/a")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ckpt = load_checkpoint(work / "runs/a")
    assert ckpt.data_config.source == str(Path(corpus_dir).resolve())
    assert ckpt.data_config.cache_dir == str(work / "cache")
    from engram.train import evaluate
    from engram.train.startup import checkpoint_data
    again = evaluate(ckpt.model, checkpoint_data(ckpt).val, 4, 32, 2, torch.device("cpu"))
    assert again == {k: result.final_eval[k] for k in again} and not (elsewhere / "cache").exists()


def test_resume_from_a_damaged_step_moves_nothing(corpus_dir, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    run = tiny_run(corpus_dir, cache_dir, run_dir, max_steps=8, save_every=4)
    train(run, progress=False)
    _corrupt(run_dir / "checkpoints" / "step_0000004")
    with pytest.raises(CheckpointError, match="step_0000004/model.safetensors"):
        train(run, progress=False, resume_from=4)
    assert steps(run_dir) == [4, 8] and latest_checkpoint(run_dir).name == "step_0000008"
    assert not (run_dir / "archive").exists()


def test_checkpoints_without_latest_are_not_silently_restarted(corpus_dir, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    run = tiny_run(corpus_dir, cache_dir, run_dir, max_steps=8, save_every=4)
    train(run, progress=False)
    before = (run_dir / "checkpoints" / "step_0000008" / "model.safetensors").read_bytes()
    (run_dir / "checkpoints" / "latest").unlink()
    with pytest.raises(CheckpointError, match=r"steps 4, 8\) but no 'latest'.*--resume-from 8"):
        train(run, progress=False)
    assert (run_dir / "checkpoints" / "step_0000008" / "model.safetensors").read_bytes() == before
    assert metric_steps(run_dir)[-1] == 8


@pytest.mark.parametrize("mode", ["no-resume", "resume-from"])
def test_a_refused_command_leaves_the_run_directory_alone(corpus_dir, cache_dir, tmp_path, mode):
    """--no-resume and --resume-from change the directory only after every check has passed."""
    run_dir = tmp_path / "run"
    run = tiny_run(corpus_dir, cache_dir, run_dir, max_steps=8, save_every=4)
    train(run, progress=False)
    if mode == "no-resume":
        bad = dataclasses.replace(run, data=dataclasses.replace(run.data, source=str(tmp_path / "missing")))
        with pytest.raises(FileNotFoundError):
            train(bad, progress=False, resume=False)
    else:
        bad = tiny_run(corpus_dir, cache_dir, run_dir, max_steps=8, save_every=4)
        bad.model.backbone.d_model = 96
        with pytest.raises(ValueError, match="different model"):
            train(bad, progress=False, resume_from=4)
    assert steps(run_dir) == [4, 8] and latest_checkpoint(run_dir).name == "step_0000008"
    assert not (run_dir / "archive").exists() and metric_steps(run_dir)[-1] == 8


def test_changed_data_resumes_with_the_checkpoints_tokenizer(corpus_dir, cache_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(tiny_run(corpus_dir, cache_dir, run_dir, max_steps=4), progress=False)
    changed = tiny_run(corpus_dir, cache_dir, run_dir, max_steps=6)
    changed = dataclasses.replace(changed, data=dataclasses.replace(changed.data, val_fraction=0.3))
    capsys.readouterr()
    train(changed, progress=False)  # a BPE trained on the new split would address other rows
    err = capsys.readouterr().err
    assert "data.val_fraction: 0.2 -> 0.3" in err and "tokenized with the checkpoint's tokenizer" in err
    assert steps(run_dir)[-1] == 6


def test_max_steps_below_the_checkpoint_is_refused(corpus_dir, cache_dir, tmp_path):
    train(tiny_run(corpus_dir, cache_dir, tmp_path / "run", max_steps=4), progress=False)
    with pytest.raises(ValueError, match="train.max_steps=2 is below the step"):
        train(tiny_run(corpus_dir, cache_dir, tmp_path / "run", max_steps=2), progress=False)


def test_archived_checkpoints_and_symlinked_runs_resolve_their_data(corpus_dir, cache_dir, tmp_path, monkeypatch):
    work = tmp_path / "work"
    (work / "deep" / "x").mkdir(parents=True)
    (work / "link").symlink_to(work / "deep" / "x")
    monkeypatch.chdir(work)
    rel_corpus = os.path.relpath(corpus_dir, work)
    train(tiny_run(rel_corpus, "cache", "link/a", max_steps=2), progress=False)
    real = work / "deep" / "x" / "a"
    assert load_checkpoint(real).data_config.source == str(Path(corpus_dir).resolve())
    train(tiny_run(rel_corpus, "cache", "link/a", max_steps=2), progress=False, resume=False)
    (archived,) = (real / "archive").glob("*/checkpoints/step_0000002")
    monkeypatch.chdir(tmp_path)
    ckpt = load_checkpoint(archived)
    assert ckpt.data_config.source == str(Path(corpus_dir).resolve())
    assert ckpt.data_config.cache_dir == str((work / "cache").resolve())


def test_a_torn_last_metrics_line_is_dropped_on_resume(corpus_dir, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    train(tiny_run(corpus_dir, cache_dir, run_dir, max_steps=4), progress=False)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 5, "lo')  # a crash mid-write
    train(tiny_run(corpus_dir, cache_dir, run_dir, max_steps=6), progress=False)
    assert metric_steps(run_dir) == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("failure", [
    RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0\n"
                 "PytorchStreamWriter failed writing file data/0: file write failed"),  # torch.save's, disk full
    OSError(28, "No space left on device"),
])
def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(corpus_dir, cache_dir, tmp_path,
                                                                              monkeypatch, capsys, failure):
    from engram.train import checkpoint_files

    run_dir = tmp_path / "run"
    argv = ["train", "--preset", "tiny-engram", "--out", str(run_dir), "--no-progress",
            "--set", f"data.source={corpus_dir}", "--set", f"data.cache_dir={cache_dir}", "--set", "data.vocab_size=300",
            "--set", "data.val_fraction=0.2", "--set", "train.max_steps=4", "--set", "train.save_every=2",
            "--set", "train.batch_size=4", "--set", "train.seq_len=32", "--set", "train.eval_every=100",
            "--set", "train.eval_batches=1"]
    real, calls = checkpoint_files.write_replicated, []

    def fails_second_time(tmp, step, *args, **kwargs):
        calls.append(step)
        if len(calls) == 2:
            raise failure
        return real(tmp, step, *args, **kwargs)
    monkeypatch.setattr(checkpoint_files, "write_replicated", fails_second_time)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "saving the checkpoint of step 4" in err and "the last checkpoint is step_0000002" in err
    assert "Traceback" not in capsys.readouterr().err
    assert latest_checkpoint(run_dir).name == "step_0000002" and not list((run_dir / "checkpoints").glob(".*"))

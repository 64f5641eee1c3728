import json

import pytest
import torch

from support import tiny_run
from engram.train import TrainingDiverged, latest_checkpoint, load_checkpoint, train


def losses(run_dir):
    records = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def test_loss_falls_and_outputs_exist(corpus_dir, cache_dir, tmp_path):
    run = tiny_run(corpus_dir, cache_dir, tmp_path / "run", max_steps=40, eval_every=40, save_every=40)
    result = train(run, progress=False)
    train_losses = [l for _, l in losses(tmp_path / "run")]
    assert sum(train_losses[-5:]) / 5 < sum(train_losses[:5]) / 5 - 0.5
    assert result.final_eval["val_loss"] < 5.0 and result.final_eval["val_bpb"] > 0
    assert result.tokens == 40 * 4 * 32 and result.tokens_per_s > 0
    assert (tmp_path / "run" / "config.json").is_file()
    assert latest_checkpoint(tmp_path / "run").name == "step_0000040"


def test_kill_and_resume_is_bit_identical(corpus_dir, cache_dir, tmp_path):
    whole = train(tiny_run(corpus_dir, cache_dir, tmp_path / "whole"), progress=False)

    class Killed(Exception):
        pass

    def kill_at_6(step, metrics):
        if step == 6:
            raise Killed

    with pytest.raises(Killed):
        train(tiny_run(corpus_dir, cache_dir, tmp_path / "split"), progress=False, on_step=kill_at_6)
    assert latest_checkpoint(tmp_path / "split").name == "step_0000004"
    resumed = train(tiny_run(corpus_dir, cache_dir, tmp_path / "split"), progress=False)

    assert losses(tmp_path / "whole") == losses(tmp_path / "split")  # exact, and no duplicated steps
    assert whole.final_eval == resumed.final_eval
    a = load_checkpoint(whole.checkpoint).model.state_dict()
    b = load_checkpoint(resumed.checkpoint).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(corpus_dir, cache_dir, tmp_path, monkeypatch):
    import engram.model.transformer as transformer

    calls = {"n": 0}
    real = transformer.F.cross_entropy

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 7 else loss  # steps 1-4 + eval at 4 fine, then NaN

    monkeypatch.setattr(transformer.F, "cross_entropy", poisoned)
    with pytest.raises(TrainingDiverged, match="loss is nan at step .*step_0000004"):
        train(tiny_run(corpus_dir, cache_dir, tmp_path / "run"), progress=False)
    monkeypatch.setattr(transformer.F, "cross_entropy", real)
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.step == 4
    assert all(torch.isfinite(p).all() for p in ckpt.model.parameters())


def test_resume_refuses_a_different_model(corpus_dir, cache_dir, tmp_path):
    train(tiny_run(corpus_dir, cache_dir, tmp_path / "run", max_steps=4), progress=False)
    other = tiny_run(corpus_dir, cache_dir, tmp_path / "run", max_steps=8)
    other.model.engram.layer_ids = [2]
    with pytest.raises(ValueError, match="different model"):
        train(other, progress=False)

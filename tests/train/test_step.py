"""The train step on its own: ``setup`` builds a ``TrainState``, ``train_step`` runs one optimizer step;
together they are exactly what ``train`` does."""

import dataclasses
import json
import math

import pytest
import torch

from support import tiny_run
from engram.train import TrainingDiverged, learning_rate, setup, train, train_step


def _params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_setup_then_steps_are_what_train_does(corpus_dir, cache_dir, tmp_path):
    whole = train(tiny_run(corpus_dir, cache_dir, tmp_path / "whole", max_steps=3, eval_every=3), progress=False)
    logged = [json.loads(x) for x in (whole.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in logged if r["kind"] == "train"}

    run = tiny_run(corpus_dir, cache_dir, tmp_path / "alone", max_steps=3)
    state = setup(run)
    assert state.step == 0 and state.last_checkpoint is None
    assert state.run.model.unresolved() == [] and state.run.model.backbone.vocab_size == state.data.vocab_size
    assert all(t.sparse for t in state.model.named_tables().values())
    moe = state.model.moe_layers()[0]
    before, bias = _params(state.model), moe.expert_bias.clone()
    metrics = train_step(state)
    assert state.step == metrics["step"] == 1
    assert metrics["lr"] == learning_rate(0, run.train) and metrics["tokens"] == run.train.tokens_per_step
    assert metrics["loss"] == losses[1] and math.isfinite(metrics["grad_norm"])
    after = _params(state.model)
    assert not torch.equal(before["layers.1.engram.embedding.weight"], after["layers.1.engram.embedding.weight"])
    assert not torch.equal(before["output.weight"], after["output.weight"])
    assert not torch.equal(bias, moe.expert_bias)  # the MoE bias moved on the step's load
    assert all(p.grad is None for p in state.model.parameters())  # gradients cleared for the next step
    for step in (2, 3):
        assert train_step(state)["loss"] == losses[step]


def test_a_nan_loss_stops_before_anything_moves(corpus_dir, cache_dir, tmp_path):
    state = setup(tiny_run(corpus_dir, cache_dir, tmp_path / "run"))
    train_step(state)
    with torch.no_grad():
        state.model.output.weight[0, 0] = float("inf")
    before = _params(state.model)
    moments = {k: v.clone() for k, v in state.optimizers.dense.state_dict()["state"][0].items()}
    with pytest.raises(TrainingDiverged, match="at step 2 .*no checkpoint was written yet"):
        train_step(state)
    assert state.step == 1
    after = _params(state.model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # (inf equals inf: nothing moved)
    assert torch.equal(state.optimizers.dense.state_dict()["state"][0]["exp_avg"], moments["exp_avg"])
    assert all(p.grad is None for p in state.model.parameters())


def test_setup_resumes_where_a_run_stopped(corpus_dir, cache_dir, tmp_path):
    whole = train(tiny_run(corpus_dir, cache_dir, tmp_path / "whole", max_steps=4, eval_every=4), progress=False)
    logged = [json.loads(x) for x in (whole.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in logged if r["kind"] == "train"}
    first = tiny_run(corpus_dir, cache_dir, tmp_path / "split", max_steps=2, eval_every=2, save_every=2)
    train(first, progress=False)
    state = setup(dataclasses.replace(first, train=dataclasses.replace(first.train, max_steps=4)))
    assert state.step == 2 and state.last_checkpoint.name == "step_0000002"
    assert [train_step(state)["loss"] for _ in range(2)] == [losses[3], losses[4]]


def test_run_loop_refuses_a_state_without_a_checkpoint_writer_before_training(corpus_dir, cache_dir, tmp_path):
    from engram.train import run_loop

    state = setup(tiny_run(corpus_dir, cache_dir, tmp_path / "run", max_steps=2), tmp_path / "run")
    state = dataclasses.replace(state, save=None)
    with pytest.raises(ValueError, match="TrainState.save is None.*save_run_checkpoint"):
        run_loop(state, progress=False)
    assert state.step == 0  # refused before any step was spent

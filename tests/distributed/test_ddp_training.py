"""Data-parallel training with sharded tables: 2 gloo ranks spawned by the test train the
model one process trains on the same global batch, and checkpoints move between world sizes.

The model is the tiny MoE + Engram preset. The strict checks use the sigmoid gate: the default
signed-sqrt gate has derivative 1/(2 sqrt|s|) (up to 500 at its 1e-6 floor), so for a token whose
score lands near 0 it multiplies the ~1e-7 differences of summing gradients in another order into
~1e-2 differences of the key projection's gradient within a few steps. With the sigmoid gate 2 ranks
stay within 4e-7 of one process over the test's 6 steps; the signed-sqrt run is checked at a looser tolerance.
"""

import dataclasses
import json

import pytest
import torch
import torch.distributed as dist

from support import tiny_run, train_on_ranks, train_one_process
from engram.config import RunConfig
from engram.train import load_checkpoint, train

TOL = 1e-5  # fp32: the ranks sum gradients in a different order than one process does


def _train_worker(run: dict, out_dir: str, record: str) -> None:
    steps = []
    keys = ("step", "loss", "grad_norm", "sent_lookup_bytes", "sent_allreduce_bytes")
    result = train(RunConfig.from_dict(run), out_dir=out_dir, progress=False,
                   on_step=lambda step, m: steps.append({k: m[k] for k in keys}))
    if dist.get_rank() == 0:
        with open(record, "w") as f:
            json.dump({"steps": steps, "final_eval": result.final_eval}, f)


def _run_ranks(world: int, run, out_dir, record) -> dict:
    return train_on_ranks(world, _train_worker, run, out_dir, record)


def _run_one(run, out_dir) -> dict:
    return train_one_process(run, out_dir)


def _settings(**more):
    # decay_at beyond the last step: runs cut at step 3 and resumed keep the 6-step run's schedule
    return dict(dict(max_steps=6, batch_size=4, grad_accum=2, eval_every=3, save_every=3, decay_at=[0.99]), **more)


def _run(run_dirs, out, gate="sigmoid", **settings):
    run = tiny_run(*run_dirs, out, **_settings(**settings))
    engram = dataclasses.replace(run.model.engram, gate=gate)
    return dataclasses.replace(run, model=dataclasses.replace(run.model, engram=engram))


def _assert_same_steps(got: list[dict], want: list[dict], tol: float = TOL, norm_rtol: float = 1e-4) -> None:
    assert [s["step"] for s in got] == [s["step"] for s in want]
    for g, w in zip(got, want):
        assert abs(g["loss"] - w["loss"]) <= tol, (g, w)
        assert abs(g["grad_norm"] - w["grad_norm"]) <= norm_rtol * w["grad_norm"], (g, w)


def _assert_same_model(a_dir, b_dir) -> None:
    """Table rows within 1e-6. Dense parameters within 1e-4: Adam divides by the root of the squared
    gradient, so the hyper-connection scalars, whose gradients are sums that nearly cancel, turn
    rounding differences into up to ~4e-5 after 6 steps (their gradients still agree to 1e-4)."""
    a = load_checkpoint(a_dir).model.state_dict()
    b = load_checkpoint(b_dir).model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        atol = 1e-6 if k.endswith("embedding.weight") else 1e-4
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=atol, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def reference(corpus_dir, cache_dir, tmp_path_factory):
    """One process, 6 steps of a batch of 4 rows with 2 micro-batches (the MoE + Engram tiny model)."""
    out = tmp_path_factory.mktemp("one")
    run = _run((corpus_dir, cache_dir), out)
    return run, out, _run_one(run, out)


def test_two_ranks_match_one_process(reference, tmp_path):
    run, one_dir, want = reference
    got = _run_ranks(2, run, tmp_path / "two", tmp_path / "two.json")
    _assert_same_steps(got["steps"], want["steps"])
    assert abs(got["final_eval"]["val_loss"] - want["final_eval"]["val_loss"]) <= TOL
    # traffic: every dense gradient is all-reduced once per step (2 micro-batches, one all-reduce);
    # the table's rows and gradients move through the lookups
    model = load_checkpoint(one_dir).model
    dense_bytes = 4 * sum(p.numel() for n, p in model.named_parameters() if not n.endswith("embedding.weight"))
    assert all(s["sent_allreduce_bytes"] == dense_bytes for s in got["steps"])
    assert all(s["sent_lookup_bytes"] > 0 for s in got["steps"])
    ckpt = load_checkpoint(tmp_path / "two")  # the sharded checkpoint, loaded whole in one process
    assert ckpt.sharded and sorted(p.name for p in (ckpt.path / "tables").iterdir()) == [
        "index.json", "shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"]
    _assert_same_model(one_dir, tmp_path / "two")  # tables included: every row ends where one process put it
    # the table moments too: the optimizer state one process resumes from
    a, b = load_checkpoint(one_dir).optimizer_state(), ckpt.optimizer_state()
    for i, state in a["tables"]["state"].items():
        assert b["tables"]["state"][i]["step"] == state["step"]
        for m in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(b["tables"]["state"][i][m], state[m], rtol=1e-4, atol=1e-9)


def test_resume_on_a_different_number_of_ranks(reference, tmp_path):
    run, one_dir, want = reference
    dirs = (run.data.source, run.data.cache_dir)
    # 2 ranks to step 3, then one process to step 6
    a_dir = tmp_path / "two_then_one"
    first = _run_ranks(2, _run(dirs, a_dir, max_steps=3), a_dir, tmp_path / "a.json")
    second = _run_one(_run(dirs, a_dir), a_dir)
    _assert_same_steps(first["steps"] + second["steps"], want["steps"])
    # one process to step 3, then 2 ranks to step 6
    b_dir = tmp_path / "one_then_two"
    first = _run_one(_run(dirs, b_dir, max_steps=3), b_dir)
    second = _run_ranks(2, _run(dirs, b_dir), b_dir, tmp_path / "b.json")
    _assert_same_steps(first["steps"] + second["steps"], want["steps"])
    _assert_same_model(one_dir, a_dir)
    _assert_same_model(one_dir, b_dir)


def test_signed_sqrt_gate_stays_close(corpus_dir, cache_dir, tmp_path):
    """The default gate: same run, a looser bound (see the module docstring)."""
    run = _run((corpus_dir, cache_dir), tmp_path / "one", gate="signed_sqrt")
    want = _run_one(run, tmp_path / "one")
    got = _run_ranks(2, run, tmp_path / "two", tmp_path / "two.json")
    _assert_same_steps(got["steps"], want["steps"], tol=1e-4, norm_rtol=1e-2)

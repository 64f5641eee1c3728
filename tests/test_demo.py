"""The main job (engram.demo, what `make demo` runs): paired seeds, their statistics, resume."""

import dataclasses
import json
import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import engram.train
from engram.cli import main as cli
from engram.demo import PRESETS, demo_plan, paired_stats, run_demo, t975, verdict
from engram.model.accounting import count_parameters
from engram.model.transformer import EngramLM


def test_the_presets_are_iso_parameter_and_stated():
    moe, eng = (count_parameters(p.run.model) for p in demo_plan([0])[:2])
    assert eng.engram_tables > 0 == moe.engram_tables
    assert abs(eng.total / moe.total - 1) < 0.01 and abs(eng.active / moe.active - 1) < 0.01


def test_a_seed_pairs_data_order_and_every_shared_initial_weight():
    """A pair shares the seed, the data and the batch shapes (so the batches: ``TokenShards.batch`` is a
    function of them and the step), and every weight both models hold starts equal; another seed differs."""
    plan = demo_plan([0, 1])
    assert [(p.point, p.seed) for p in plan] == [(n, s) for s in (0, 1) for n in PRESETS]
    for seed in (0, 1):
        moe, eng = (p.run for p in plan if p.seed == seed)
        assert moe.train.seed == eng.train.seed == seed and moe.data == eng.data
        assert dataclasses.replace(moe.train, out_dir="") == dataclasses.replace(eng.train, out_dir="")
    weights = {}
    for p in plan:
        torch.manual_seed(p.run.train.seed)  # what the trainer does before it builds the model
        with torch.device("meta"):
            model = EngramLM(p.run.model.with_data(p.run.model.backbone.vocab_size, 0))
        model.to_empty(device="cpu")
        torch.manual_seed(p.run.train.seed)
        model.init_weights()
        weights[p.point, p.seed] = dict(model.named_parameters())
    moe, eng = weights["demo-moe", 0], weights["demo-engram", 0]
    shared = [n for n in moe if n in eng and moe[n].shape == eng[n].shape]
    assert all(torch.equal(moe[n], eng[n]) for n in shared)
    # resized along experts (routers, expert stacks) or hidden units (block 0's FFN, narrower in the
    # Engram model): the Engram model holds the first experts and units of the MoE's
    resized = [n for n in moe if n in eng and n not in shared]
    assert len(shared) + len(resized) == len(moe) and "layers.0.ffn.w2.weight" in resized
    for n in resized:
        prefix = moe[n][:, : eng[n].shape[1]] if n.endswith("ffn.w2.weight") else moe[n][: eng[n].shape[0]]
        assert torch.equal(prefix, eng[n]), n
    assert not torch.equal(weights["demo-moe", 1]["tok_embeddings.weight"], moe["tok_embeddings.weight"])


def test_paired_stats_and_the_t_quantiles():
    per_seed = [{"difference": d} for d in (-0.05, -0.03, 0.01)]
    p = paired_stats(per_seed)
    assert p["n"] == 3 and p["engram_wins"] == 2 and p["moe_wins"] == 1
    assert p["mean_difference"] == pytest.approx(-0.07 / 3)
    assert p["std_difference"] == pytest.approx(statistics.stdev([-0.05, -0.03, 0.01]))
    half = 4.303 * p["std_difference"] / math.sqrt(3)
    assert p["ci95"] == pytest.approx([p["mean_difference"] - half, p["mean_difference"] + half])
    assert t975(1) == 12.706 and t975(30) == 2.042 and t975(100) == 1.96


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(-0.5, 0.5, allow_nan=False).filter(lambda d: abs(d) > 1e-9), min_size=1, max_size=8))
def test_the_verdict_says_what_the_numbers_show(diffs):
    p = paired_stats([{"difference": d} for d in diffs])
    text = verdict(p)
    if len(diffs) == 1:
        assert "one seed settles nothing" in text
        return
    lo, hi = p["ci95"]
    if hi < 0:
        assert text.startswith("Engram ahead") and f"wins {p['engram_wins']} of {len(diffs)}" in text
    elif lo > 0:
        assert text.startswith("MoE ahead") and f"wins {p['moe_wins']} of {len(diffs)}" in text
    else:
        assert text.startswith("Not settled") and "includes zero" in text
    assert f"{p['mean_difference']:+.4f}" in text


def test_a_zero_mean_is_led_by_neither_and_the_demo_keeps_its_own_seeds():
    p = paired_stats([{"difference": d} for d in (0.1, -0.1)])
    assert "neither leads on average" in verdict(p)
    with pytest.raises(ValueError, match="sets train.seed itself.*--seeds and --first-seed"):
        demo_plan([0], ["train.seed=3"])


SMALL = ["train.batch_size=2", "train.seq_len=64"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One prepared corpus (the stdlib's 4,096-id BPE) for the demo tests."""
    return tmp_path_factory.mktemp("cache")


def test_demo_quick_end_to_end_then_resume_skips_finished_runs(tmp_path, cache, capsys, monkeypatch):
    """What `make demo` runs, a few steps per model on the real stdlib corpus, 2 paired seeds; the second
    call trains nothing and reports the same numbers."""
    out = tmp_path / "demo"
    overrides = [f"data.cache_dir={cache}", *SMALL]
    results = run_demo(out_dir=out, quick=True, progress=False, seeds=2, workers=1, overrides=overrides)
    stored = json.loads((out / "results.json").read_text())
    assert stored["seeds"] == [0, 1] and [r["seed"] for r in stored["per_seed"]] == [0, 1]
    for r in stored["per_seed"]:
        assert r["difference"] == pytest.approx(r["demo-engram"] - r["demo-moe"])
    assert {"n", "mean_difference", "std_difference", "ci95", "engram_wins"} <= set(stored["paired"])
    for name in PRESETS:
        assert {"total_params", "active_params", "engram_params", "tokens", "val_loss", "val_loss_std",
                "per_seed"} <= set(stored[name])
        assert set(stored[name]["per_seed"]) == {"0", "1"}
        assert stored["samples"][name]["text"].startswith("def __init__(self")
    assert stored["demo-moe"]["engram_params"] == 0 < stored["demo-engram"]["engram_params"]
    assert stored["verdict"].startswith("none: --quick trains 4 steps per model")  # no verdict from 4 steps
    assert verdict(stored["paired"]) not in stored["verdict"]
    assert (out / "loss.png").stat().st_size > 10_000
    assert (out / "seed1" / "demo-engram" / "result.json").exists()
    printed = capsys.readouterr().out
    assert "Engram - MoE" in printed and "greedy completion" in printed and stored["verdict"] in printed

    def no_training(*args, **kwargs):
        raise AssertionError("a finished demo run was trained again")

    monkeypatch.setattr(engram.train, "train", no_training)
    again = run_demo(out_dir=out, quick=True, progress=False, seeds=2, workers=1, overrides=overrides)
    assert again["per_seed"] == results["per_seed"]
    assert "4 runs (2 models x 2 seeds), 4 already done" in capsys.readouterr().out


def test_demo_cli_quick_with_two_workers(tmp_path, cache, capsys, monkeypatch):
    """`engram demo --quick` as CI runs it: the default seeds, worker processes, and its own directory
    (runs/demo-quick), so a later real `make demo` in runs/demo is not refused for a different config."""
    monkeypatch.chdir(tmp_path)
    code = cli(["demo", "--quick", "--no-progress", "--workers", "2",
                "--set", f"data.cache_dir={cache}", *[a for s in SMALL for a in ("--set", s)]])
    assert code == 0
    stored = json.loads((tmp_path / "runs" / "demo-quick" / "results.json").read_text())
    assert stored["seeds"] == [0, 1, 2] and stored["paired"]["n"] == 3
    assert len(stored["demo-engram"]["per_seed"]["2"]["evals"]) == 2  # the whole history, from metrics.jsonl
    assert not (tmp_path / "runs" / "demo").exists()
    assert "Verdict over 3 paired seeds" in capsys.readouterr().out
    assert cli(["demo", "--seeds", "0"]) == 2

"""The paper-scale presets and allocation budgets: counted against Table 1 and docs/ALGORITHM.md §3 without building
anything, and built on meta (nothing allocated) fast."""

import json
import time

import pytest
import torch

from engram.model.accounting import count_parameters
from engram.model.transformer import EngramLM
from engram.presets import PAPER_PRESETS, PAPER_TABLE_1, get_preset, get_run_preset
from engram.sweeps.budgets import BUDGETS, PAPER_BUDGETS


@pytest.mark.parametrize("name", sorted(PAPER_PRESETS))
def test_paper_presets_reproduce_table_1(name):
    c, paper = count_parameters(get_preset(name)), PAPER_TABLE_1[name]
    assert c.paper_total == pytest.approx(paper["total"] * 1e9, rel=0.01)
    assert c.paper_active == pytest.approx(paper["active"] * 1e9, rel=0.01)
    if paper["engram"] is None:
        assert c.engram_tables == 0
    elif name == "engram-40b":
        assert c.engram_tables == pytest.approx(paper["engram"] * 1e9, rel=0.01)
    else:  # 32 heads x 2,262,400 rows x 80 = 5.79B, which Table 1 prints as 5.7B (truncated, as docs/ALGORITHM.md §3 does)
        assert c.engram_tables == pytest.approx(5.79e9, rel=0.001)
        assert c.engram_tables == pytest.approx(paper["engram"] * 1e9, rel=0.017)


def test_paper_presets_are_what_the_paper_gives():
    moe, engram, dense = get_preset("moe-27b"), get_preset("engram-27b"), get_preset("dense-4b")
    bb = moe.backbone
    assert (bb.n_layers, bb.d_model, bb.n_heads, bb.hc_mult, bb.vocab_size, bb.max_seq_len) == (
        30, 2560, 32, 4, 129_280, 4096)
    assert bb.mla is not None and dense.backbone.moe is None
    assert (bb.moe.n_shared_experts, bb.moe.n_routed_experts, bb.moe.top_k, bb.moe.first_dense_layers) == (2, 72, 6, 1)
    assert engram.backbone.moe.n_routed_experts == 55
    e = engram.engram
    assert (e.layer_ids, e.max_ngram_size, e.n_head_per_ngram, e.memory_dim, e.head_dim) == ([1, 14], 3, 8, 1280, 80)
    assert e.engram_vocab_size == [2_262_400] * 2 and get_preset("engram-40b").engram.engram_vocab_size == [7_239_680] * 2
    # iso-parameter: the same P_tot (within 0.1%) and rho = 49/66 of MoE-27B's sparse parameters in experts
    c_moe, c_engram = count_parameters(moe), count_parameters(engram)
    assert c_engram.total == pytest.approx(c_moe.total, rel=0.001)
    assert 1 - c_engram.engram_share_of_sparse == pytest.approx(49 / 66, abs=0.01)
    train = get_run_preset("engram-27b").train
    assert (train.optimizer, train.lr, train.weight_decay, train.table_lr_mult, train.seq_len) == (
        "muon", 4e-4, 0.1, 5.0, 4096)


@pytest.mark.parametrize("name", sorted(PAPER_BUDGETS))
def test_paper_allocation_budgets(name):
    _, total, active, experts = PAPER_BUDGETS[name]
    base = BUDGETS[name].base_run()
    c = count_parameters(base.model)
    assert c.total == pytest.approx(total, rel=0.01) and c.active == pytest.approx(active, rel=0.01)
    assert base.model.backbone.moe.n_routed_experts == experts
    assert c.total / c.active == pytest.approx(10, rel=0.03)  # docs/ALGORITHM.md §3: P_tot / P_act ~ 10
    flops = 3 * c.flops_per_token * base.train.tokens_per_step * base.train.max_steps
    assert flops == pytest.approx(PAPER_BUDGETS[name][0], rel=0.001)


def test_paper_presets_build_on_meta_in_well_under_a_second():
    with torch.device("meta"):
        EngramLM(get_preset("tiny-engram"))  # imports and first-use costs outside the timing
    for name in PAPER_PRESETS:
        config = get_preset(name)
        start = time.perf_counter()
        with torch.device("meta"):
            model = EngramLM(config)
        elapsed = time.perf_counter() - start
        assert elapsed < 0.5, (name, elapsed)
        assert all(p.device.type == "meta" for p in model.parameters())
        assert sum(p.numel() for p in model.parameters()) == count_parameters(config).with_embeddings


def test_presets_command_prints_table_1_without_building(monkeypatch, capsys):
    from engram.cli import main

    def refuse(*args, **kwargs):
        raise AssertionError("engram presets built a model")

    monkeypatch.setattr(EngramLM, "__init__", refuse)
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in list(PAPER_PRESETS) + list(PAPER_BUDGETS):
        assert name in out
    assert "26,704,966,740" in out and "5,792,338,560" in out


def test_plan_command_sizes_the_paper_model_per_rank(capsys):
    from engram.cli import main

    assert main(["plan", "--preset", "engram-27b", "--world-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "64 rank(s), FSDP, muon" in out and "GiB" in out and "rank 63" in out
    assert main(["plan", "--preset", "engram-27b", "--world-size", "8", "--strategy", "ddp", "--optimizer", "adamw",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    rank0 = plan["ranks"][0]
    c = count_parameters(get_preset("engram-27b"))
    # DDP: every rank holds every dense weight, 2 AdamW moments of each, and 1/8 of the tables
    assert rank0["dense_params"] == 4 * (c.with_embeddings - c.engram_tables)
    assert rank0["dense_optimizer"] == 2 * rank0["dense_params"]
    assert rank0["table_params"] == pytest.approx(4 * c.engram_tables / 8, rel=1e-4)
    assert main(["plan", "--preset", "engram-27b", "--world-size", "0"]) == 2
    assert "--world-size" in capsys.readouterr().err


def test_a_fresh_process_builds_them_in_well_under_a_second():
    """No first-use cost either: nothing in the meta build may pull in torch._dynamo (~1 s to import),
    as nn.Embedding's own N(0, 1) fill and RoPE's tables computed on meta did."""
    import subprocess
    import sys

    code = ("import sys, time, torch\nfrom engram.presets import PAPER_PRESETS, get_preset\n"
            "from engram.model.transformer import EngramLM\nstart = time.perf_counter()\n"
            "for name in PAPER_PRESETS:\n    with torch.device('meta'):\n        EngramLM(get_preset(name))\n"
            "print(time.perf_counter() - start, 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert float(out[0]) < 1.0 and out[1] == "False", out

"""The allocation solver: every grid point is iso-parameter and iso-FLOP with the pure-MoE base."""

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.config import BackboneConfig, EngramConfig, ModelConfig, MoEConfig
from engram.model.accounting import count_parameters
from engram.model.transformer import EngramLM
from engram.sweeps.allocation import allocate, allocation_grid, format_grid, solve_rows
from engram.sweeps.budgets import BUDGETS


def check_point(base: ModelConfig, point, rho: float, rho_slack: float = 1.0) -> None:
    moe = base.backbone.moe
    ref = count_parameters(base)
    c = point.params
    assert c == count_parameters(point.config)
    # the dense FFN absorbs the difference in whole hidden units: 3*D weights in each dense block
    tolerance = 3 * base.backbone.d_model * moe.first_dense_layers // 2
    assert abs(c.active - ref.active) <= tolerance
    assert abs(c.total - ref.total) / ref.total <= 0.01
    assert abs(c.flops_per_token - ref.flops_per_token) <= 2 * tolerance
    step = 1 / (moe.n_routed_experts - moe.top_k)
    ideal = 1 - point.removed_experts * step
    assert abs(ideal - rho) <= step / 2 + 1e-9  # the nearest reachable ratio
    assert abs(point.rho - ideal) <= rho_slack  # tables are sized in whole rows per head
    assert point.config.backbone.moe.n_routed_experts == moe.n_routed_experts - point.removed_experts
    if point.removed_experts:
        # the reported rho is the routed share of what is actually sparse
        assert point.rho == pytest.approx(1 - c.engram_tables / c.sparse)
        assert point.config.engram.layer_ids == [1]
    else:
        assert point.config == base and c.engram_tables == 0


@pytest.mark.parametrize("name", sorted(BUDGETS))
def test_budget_grids_hit_their_targets(name):
    budget = BUDGETS[name]
    base = budget.base_run().model
    points = allocation_grid(base, budget.engram_template(), budget.rhos)
    assert len(points) >= 6 and points[0].rho == 1.0 and min(p.rho for p in points) <= 0.41
    for rho, point in zip(sorted(budget.rhos, reverse=True), points):
        check_point(base, point, rho, rho_slack=0.005)
    assert "rho" in format_grid(points, count_parameters(base))


def test_tiny_budget_is_exact_in_active_parameters():
    budget = BUDGETS["tiny"]
    base = budget.base_run().model
    for point in allocation_grid(base, budget.engram_template(), budget.rhos):
        assert point.params.active == count_parameters(base).active
        assert point.params.flops_per_token == count_parameters(base).flops_per_token


def test_counts_match_a_built_model():
    budget = BUDGETS["tiny"]
    point = allocate(budget.base_run().model, budget.engram_template(), 0.6)
    model = EngramLM(point.config)
    numel = sum(p.numel() for p in model.parameters())
    assert numel == point.params.with_embeddings


@settings(max_examples=40, deadline=None)
@given(d=st.sampled_from([32, 48, 64]), experts=st.integers(4, 24), top_k=st.integers(1, 3),
       hidden=st.sampled_from([16, 32, 48]), layers=st.integers(2, 5), dense=st.integers(1, 2),
       heads=st.sampled_from([1, 2, 4]), d_h=st.sampled_from([4, 8]), g=st.sampled_from([1, 2]),
       rho=st.floats(0.0, 1.0))
def test_any_backbone_and_ratio(d, experts, top_k, hidden, layers, dense, heads, d_h, g, rho):
    top_k = min(top_k, experts - 1)
    dense = min(dense, layers - 1)
    base = ModelConfig(backbone=BackboneConfig(
        vocab_size=256, n_layers=layers, d_model=d, n_heads=2, ffn_hidden=8 * d, hc_mult=g,
        moe=MoEConfig(n_routed_experts=experts, top_k=top_k, expert_hidden=hidden, first_dense_layers=dense)))
    engram = EngramConfig(engram_vocab_size=[50, 50], n_embed_per_ngram=heads * d_h, n_head_per_ngram=heads,
                          layer_ids=[1], pad_id=0)
    try:
        point = allocate(base, engram, rho)
    except ValueError as err:  # only when the tables cannot be sized finely enough for 1%
        assert "tolerance" in str(err)
        return
    check_point(base, point, rho)


def test_solve_rows_lands_near_the_target():
    budget = BUDGETS["tiny"]
    point = allocate(budget.base_run().model, budget.engram_template(), 0.5)
    e = point.config.engram
    for target in (10_000, 123_456, 2_000_000):
        rows = solve_rows(point.config, target)
        cfg = dataclasses.replace(point.config, engram=dataclasses.replace(e, engram_vocab_size=[rows] * e.n_orders))
        got = count_parameters(cfg).engram_tables
        # one nominal row more or less moves every head: H * d_h parameters, plus prime gaps
        assert abs(got - target) <= 0.01 * target + e.n_heads * e.head_dim


def test_bad_inputs_are_refused():
    budget = BUDGETS["tiny"]
    base, template = budget.base_run().model, budget.engram_template()
    with pytest.raises(ValueError, match="rho must be in"):
        allocate(base, template, 1.5)
    with pytest.raises(ValueError, match="needs a MoE backbone"):
        allocate(dataclasses.replace(base, backbone=dataclasses.replace(base.backbone, moe=None)), template, 0.5)
    with pytest.raises(ValueError, match="pure-MoE model"):
        allocate(allocate(base, template, 0.5).config, template, 0.5)
    no_dense = dataclasses.replace(base.backbone, moe=dataclasses.replace(base.backbone.moe, first_dense_layers=0))
    with pytest.raises(ValueError, match="dense block"):
        allocate(dataclasses.replace(base, backbone=no_dense), template, 0.5)
    wide = dataclasses.replace(template, n_embed_per_ngram=512, n_head_per_ngram=4)
    with pytest.raises(ValueError, match="dense FFN"):
        allocate(base, wide, 0.5)


def test_grid_merges_ratios_that_round_to_the_same_model():
    budget = BUDGETS["tiny"]
    points = allocation_grid(budget.base_run().model, budget.engram_template(), [1.0, 0.99, 0.5, 0.51])
    assert [p.removed_experts for p in points] == [0, 10]

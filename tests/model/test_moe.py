"""MoE against a per-token loop reference, bias balancing, causality and parameter counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.config import MoEConfig
from engram.model.moe import MoE, moe_params


def make(dim: int = 16, seed: int = 0, std: float = 0.3, **kw) -> MoE:
    kw = {"n_routed_experts": 6, "n_shared_experts": 1, "top_k": 2, "expert_hidden": 8, **kw}
    torch.manual_seed(seed)
    moe = MoE(dim, MoEConfig(**kw))
    moe.init_weights(std)  # large enough that outputs are O(1) and a 1e-5 tolerance means something
    return moe


def swiglu(x: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return w2 @ (F.silu(w1 @ x) * (w3 @ x))


def reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """One token at a time: score all experts, pick k by biased score, mix by unbiased score."""
    cfg = moe.config
    flat = x.reshape(-1, x.shape[-1]).float()
    out = torch.zeros_like(flat)
    bias = moe.expert_bias.tolist()
    for n, tok in enumerate(flat):
        scores = torch.sigmoid(moe.router.weight.float() @ tok)
        biased = [scores[e].item() + bias[e] for e in range(cfg.n_routed_experts)]
        chosen = sorted(range(cfg.n_routed_experts), key=lambda e: -biased[e])[: cfg.top_k]
        total = sum(scores[e] for e in chosen)
        for e in chosen:
            w = scores[e] / total * cfg.route_scale
            out[n] += w * swiglu(tok, moe.experts.w1[e], moe.experts.w3[e], moe.experts.w2[e])
        if moe.shared is not None:
            s = moe.shared
            out[n] += swiglu(tok, s.w1.weight, s.w3.weight, s.w2.weight)
    return out.view_as(x)


def test_shape_dtype_and_state_dict_keys():
    moe = make()
    x = torch.randn(2, 5, 16)
    assert moe(x).shape == (2, 5, 16)
    assert moe.to(torch.bfloat16)(x.bfloat16()).dtype == torch.bfloat16
    assert set(make().state_dict()) == {
        "router.weight", "experts.w1", "experts.w3", "experts.w2", "expert_bias",
        "shared.w1.weight", "shared.w3.weight", "shared.w2.weight",
    }
    assert make().experts.w2.shape == (6, 16, 8)
    assert make(n_shared_experts=0).shared is None


def test_empty_input():
    assert make()(torch.randn(0, 3, 16)).shape == (0, 3, 16)


def test_matches_reference():
    moe = make(route_scale=2.5)
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(moe(x), reference(moe, x), atol=1e-5, rtol=1e-5)


def test_gradients_reach_router_and_used_experts_only():
    moe = make(n_routed_experts=8, top_k=2)
    x = torch.randn(1, 3, 16)  # 3 tokens * 2 experts leave at least 2 of 8 experts unused
    moe(x).square().sum().backward()
    _, chosen = moe.route(x.reshape(-1, 16))
    used = set(chosen.flatten().tolist())
    assert moe.router.weight.grad.abs().sum() > 0
    assert moe.shared.w1.weight.grad.abs().sum() > 0
    for e in range(8):
        g = moe.experts.w1.grad[e].abs().sum() + moe.experts.w2.grad[e].abs().sum()
        assert (g > 0) == (e in used), e


def test_bias_changes_selection_not_weights():
    moe = make()
    x = torch.randn(2, 6, 16)
    flat = x.reshape(-1, 16)
    moe.expert_bias[3] = 10.0
    weights, chosen = moe.route(flat)
    assert (chosen == 3).any(-1).all()
    scores = torch.sigmoid(flat @ moe.router.weight.T)
    unbiased = scores.gather(-1, chosen)
    torch.testing.assert_close(weights, unbiased / unbiased.sum(-1, keepdim=True))
    torch.testing.assert_close(moe(x), reference(moe, x), atol=1e-5, rtol=1e-5)


def test_load_counted_in_training_only():
    moe = make().eval()
    moe(torch.randn(2, 4, 16))
    assert moe._load.sum() == 0
    moe.train()
    moe(torch.randn(2, 4, 16))
    moe(torch.randn(1, 3, 16))
    assert moe._load.sum() == (8 + 3) * 2
    assert "_load" not in moe.state_dict()


def test_update_bias_moves_by_exactly_the_rate_and_resets():
    rate = 0.01
    moe = make(n_routed_experts=4, bias_update_rate=rate)
    moe.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
    moe._load.copy_(torch.tensor([5.0, 1.0, 3.0, 3.0]))  # mean 3: one over, one under, two balanced
    moe.update_bias()
    expected = torch.tensor([0.1 - rate, -0.2 + rate, 0.0, 0.3])
    torch.testing.assert_close(moe.expert_bias, expected)
    assert moe._load.sum() == 0
    torch.testing.assert_close(moe.load_fractions(), torch.tensor([5.0, 1.0, 3.0, 3.0]) / 12)


def test_update_bias_after_a_training_forward():
    moe = make(bias_update_rate=0.05).train()
    moe(torch.randn(4, 8, 16))
    load = moe._load.clone()
    moe.update_bias()
    torch.testing.assert_close(moe.expert_bias, 0.05 * torch.sign(load.mean() - load))
    torch.testing.assert_close(moe.load_fractions(), load / load.sum())


def test_update_bias_noop_without_tokens():
    moe = make()
    assert moe.load_fractions().sum() == 0
    moe.update_bias()
    assert moe.expert_bias.abs().sum() == 0
    moe.train()
    moe(torch.randn(2, 4, 16))
    moe.update_bias()
    bias, fractions = moe.expert_bias.clone(), moe.load_fractions()
    moe.eval()
    moe(torch.randn(2, 4, 16))
    moe.update_bias()  # nothing counted in eval: bias and the logged load stay
    torch.testing.assert_close(moe.expert_bias, bias)
    torch.testing.assert_close(moe.load_fractions(), fractions)


def test_token_independence():
    moe = make()
    x = torch.randn(2, 6, 16)
    base = moe(x)
    for b, t in [(0, 0), (0, 3), (1, 5)]:
        x2 = x.clone()
        x2[b, t] += torch.randn(16)
        out = moe(x2)
        assert not torch.allclose(out[b, t], base[b, t])
        # Other tokens may move by rounding only: the perturbed token changes the per-expert group
        # sizes and with them the matmul blocking.
        out[b, t] = base[b, t]
        torch.testing.assert_close(out, base, atol=1e-6, rtol=0)


def test_no_gradient_crosses_tokens():
    moe = make()
    x = torch.randn(2, 6, 16, requires_grad=True)
    moe(x)[1, 2].sum().backward()
    grad = x.grad.abs().sum(-1)  # (B, T)
    assert grad[1, 2] > 0
    grad[1, 2] = 0
    assert grad.max() == 0


@pytest.mark.parametrize("n_shared", [0, 2])
def test_moe_params_matches_numel(n_shared):
    cfg = MoEConfig(n_routed_experts=5, n_shared_experts=n_shared, top_k=3, expert_hidden=12)
    moe = MoE(20, cfg)
    total, active = moe_params(20, cfg)
    assert total == sum(p.numel() for p in moe.parameters())
    expert = 3 * 20 * 12
    assert total - active == (5 - 3) * expert


def test_init_weights():
    moe = make(n_routed_experts=16, expert_hidden=32)
    moe.expert_bias.fill_(0.5)
    moe.init_weights(0.02, out_std=0.005)
    assert moe.expert_bias.eq(0.5).all()
    expected = {"experts.w2": 0.005, "shared.w2.weight": 0.005}
    for name, p in moe.named_parameters():
        assert abs(p.std().item() - expected.get(name, 0.02)) < 0.2 * expected.get(name, 0.02), name
    moe.init_weights(0.03)
    assert abs(moe.experts.w2.std().item() - 0.03) < 0.003


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(1, 3),
    t=st.integers(1, 5),
    dim=st.integers(1, 12),
    n_experts=st.integers(1, 6),
    k_frac=st.floats(0.0, 1.0),
    n_shared=st.integers(0, 2),
    hidden=st.integers(1, 8),
    route_scale=st.floats(0.5, 3.0),
    seed=st.integers(0, 2**16),
)
def test_property_matches_reference(b, t, dim, n_experts, k_frac, n_shared, hidden, route_scale, seed):
    top_k = max(1, round(k_frac * n_experts))
    moe = make(dim, seed=seed, n_routed_experts=n_experts, n_shared_experts=n_shared, top_k=top_k,
               expert_hidden=hidden, route_scale=route_scale)
    moe.expert_bias.normal_(0, 0.1)
    x = torch.randn(b, t, dim, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(moe(x), reference(moe, x), atol=1e-5, rtol=1e-5)

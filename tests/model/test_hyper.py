"""mHC hyper-connections: Sinkhorn projection, weight constraints, init, causality, parameter counts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.model.hyper import HyperConnection, PlainResidual, hyper_params, make_residual, sinkhorn


def make(dim: int = 8, g: int = 4, seed: int = 0, perturb: float = 0.0) -> HyperConnection:
    torch.manual_seed(seed)
    hc = HyperConnection(dim, g, sinkhorn_iters=20)
    if perturb:  # move off the init so a test exercises the dynamic part at full strength
        with torch.no_grad():
            hc.alpha.fill_(perturb)
            for p in (hc.bias_pre, hc.bias_post, hc.bias_res, hc.norm.weight):
                p.add_(perturb * torch.randn_like(p))
    return hc


def token_ffn(dim: int, seed: int = 1):
    """A per-token nonlinear fn (B, T, D) -> (B, T, D)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, dim, generator=gen) / dim**0.5
    return lambda h: torch.tanh(h @ w)


def reference(hc: HyperConnection, x: torch.Tensor, fn) -> torch.Tensor:
    """One token, one copy at a time, straight from the paper's equations."""
    b, t, g, d = x.shape
    out = torch.empty_like(x)
    w = hc.proj.weight
    for i in range(b):
        for j in range(t):
            v = x[i, j].reshape(-1)
            z = v / v.pow(2).mean().add(hc.norm.eps).sqrt() * hc.norm.weight
            dyn = w @ z
            pre = torch.sigmoid(hc.alpha[0] * dyn[:g] + hc.bias_pre)
            post = 2 * torch.sigmoid(hc.alpha[1] * dyn[g : 2 * g] + hc.bias_post)
            res = sinkhorn(hc.alpha[2] * dyn[2 * g :].reshape(g, g) + hc.bias_res, hc.sinkhorn_iters)
            h = sum(pre[k] * x[i, j, k] for k in range(g))
            y = fn(h[None, None])[0, 0]
            for k in range(g):
                out[i, j, k] = sum(res[k, m] * x[i, j, m] for m in range(g)) + post[k] * y
    return out


@settings(max_examples=60, deadline=None)
@given(g=st.integers(1, 6), lead=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_sinkhorn_doubly_stochastic(g: int, lead: int, seed: int) -> None:
    # Logits within [-1, 1]: 20 iterations bring row sums within 1e-4 (spread logits converge slower).
    gen = torch.Generator().manual_seed(seed)
    logits = torch.rand(lead, g, g, generator=gen) * 2 - 1
    p = sinkhorn(logits, 20)
    assert p.shape == (lead, g, g) and p.dtype == torch.float32
    assert (p >= 0).all()
    torch.testing.assert_close(p.sum(-1), torch.ones(lead, g), atol=1e-4, rtol=0)
    torch.testing.assert_close(p.sum(-2), torch.ones(lead, g), atol=1e-5, rtol=0)


@settings(max_examples=40, deadline=None)
@given(g=st.integers(1, 6), scale=st.floats(1.0, 200.0), seed=st.integers(0, 2**31 - 1))
def test_sinkhorn_extreme_logits_stay_finite_with_exact_columns(g: int, scale: float, seed: int) -> None:
    # Log-space: huge logits neither overflow nor give NaN, and the final column step is exact.
    gen = torch.Generator().manual_seed(seed)
    p = sinkhorn(torch.randn(g, g, generator=gen) * scale, 3)
    assert torch.isfinite(p).all() and (p >= 0).all()
    torch.testing.assert_close(p.sum(-2), torch.ones(g), atol=1e-5, rtol=0)


def test_sinkhorn_runs_in_fp32() -> None:
    p = sinkhorn(torch.zeros(2, 3, 3, dtype=torch.bfloat16), 5)
    assert p.dtype == torch.float32
    torch.testing.assert_close(p, torch.full((2, 3, 3), 1 / 3))


@pytest.mark.parametrize("g", [1, 2, 4])
def test_weights_constraints(g: int) -> None:
    # A modest move off the init; spread logits need more than 20 iterations for exact rows.
    hc = make(g=g, perturb=0.1)
    x = torch.randn(2, 5, g, 8) * 3
    pre, post, res = hc.weights(x)
    assert pre.shape == (2, 5, g) and post.shape == (2, 5, g) and res.shape == (2, 5, g, g)
    assert all(w.dtype == torch.float32 for w in (pre, post, res))
    assert (pre >= 0).all() and (pre <= 1).all()
    assert (post >= 0).all() and (post <= 2).all()
    assert (res >= 0).all()
    torch.testing.assert_close(res.sum(-1), torch.ones(2, 5, g), atol=1e-3, rtol=0)
    torch.testing.assert_close(res.sum(-2), torch.ones(2, 5, g), atol=1e-5, rtol=0)


@pytest.mark.parametrize("g", [2, 3])
def test_matches_per_token_reference(g: int) -> None:
    hc = make(g=g, perturb=0.5)
    x = torch.randn(2, 3, g, 8)
    fn = token_ffn(8)
    with torch.no_grad():
        torch.testing.assert_close(hc(x, fn), reference(hc, x, fn), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("g", [2, 4])
def test_zero_fn_preserves_sum_over_copies(g: int) -> None:
    # fn == 0 leaves only H_res; its columns sum to 1, so the summed stream is conserved.
    hc = make(g=g, perturb=1.0)
    x = torch.randn(3, 4, g, 8)
    out = hc(x, torch.zeros_like)
    torch.testing.assert_close(out.sum(2), x.sum(2), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out, x, atol=1e-3)  # copies did mix


def test_plain_residual_is_exact() -> None:
    x = torch.randn(2, 5, 1, 8)
    fn = token_ffn(8)
    res = PlainResidual()
    assert torch.equal(res(x, fn), x + fn(x.squeeze(2)).unsqueeze(2))
    assert sum(p.numel() for p in res.parameters()) == 0


@pytest.mark.parametrize("g", [2, 4, 6])
def test_init_close_to_plain_residual_on_equal_copies(g: int) -> None:
    hc = make(g=g)
    pre, post, res = hc.weights(torch.randn(2, 3, g, 8))
    torch.testing.assert_close(pre, torch.full_like(pre, 1 / g), atol=0.01, rtol=0)
    torch.testing.assert_close(post, torch.ones_like(post), atol=0.02, rtol=0)
    eye = torch.eye(g).expand_as(res)
    torch.testing.assert_close(res, 0.9 * eye + 0.1 / (g - 1) * (1 - eye), atol=0.01, rtol=0)

    x1 = torch.randn(2, 6, 8)
    x = x1[:, :, None, :].expand(2, 6, g, 8).contiguous()
    fn = token_ffn(8)
    expected = (x1 + fn(x1))[:, :, None, :].expand_as(x)
    torch.testing.assert_close(hc(x, fn), expected, atol=0.03, rtol=0)


def test_g1_hyper_connection_is_near_plain() -> None:
    hc = make(g=1)
    x = torch.randn(2, 4, 1, 8)
    fn = token_ffn(8)
    pre, post, res = hc.weights(x)
    torch.testing.assert_close(pre, torch.full_like(pre, 0.99), atol=1e-3, rtol=0)
    assert torch.equal(res, torch.ones_like(res))
    torch.testing.assert_close(hc(x, fn), PlainResidual()(x, fn), atol=0.03, rtol=0)


@pytest.mark.parametrize("g", [1, 3])
def test_token_independence(g: int) -> None:
    hc = make(g=g, perturb=0.5)
    fn = token_ffn(8)
    x = torch.randn(2, 7, g, 8)
    base = hc(x, fn)
    t = 3
    x2 = x.clone()
    x2[:, t] += torch.randn(2, g, 8)
    out = hc(x2, fn)
    others = [i for i in range(7) if i != t]
    assert torch.equal(out[:, others], base[:, others])
    assert not torch.allclose(out[:, t], base[:, t])


def test_gradients_reach_every_parameter() -> None:
    hc = make(g=3)
    x = torch.randn(2, 4, 3, 8, requires_grad=True)
    lin = torch.nn.Linear(8, 8)
    hc(x, lambda h: torch.tanh(lin(h))).pow(2).sum().backward()
    for name, p in hc.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert x.grad is not None and lin.weight.grad.abs().sum() > 0


def test_bf16_stream_keeps_dtype_and_fp32_weights() -> None:
    hc = make(g=2).to(torch.bfloat16)
    x = torch.randn(2, 3, 2, 8, dtype=torch.bfloat16)
    seen = []
    out = hc(x, lambda h: seen.append(h.dtype) or h)
    assert out.dtype == torch.bfloat16 and seen == [torch.bfloat16]
    assert all(w.dtype == torch.float32 for w in hc.weights(x))


def test_parameter_names_are_stable() -> None:
    names = {n: tuple(p.shape) for n, p in make(dim=8, g=3).named_parameters()}
    assert names == {
        "norm.weight": (24,),
        "proj.weight": (3 + 3 + 9, 24),
        "alpha": (3,),
        "bias_pre": (3,),
        "bias_post": (3,),
        "bias_res": (3, 3),
    }


@pytest.mark.parametrize("dim,g", [(8, 1), (8, 2), (16, 4), (12, 6)])
def test_hyper_params_matches_numel(dim: int, g: int) -> None:
    module = make_residual(dim, g, sinkhorn_iters=20, eps=1e-6)
    assert hyper_params(dim, g) == sum(p.numel() for p in module.parameters())
    if g > 1:
        assert hyper_params(dim, g) == sum(p.numel() for p in HyperConnection(dim, g).parameters())


def test_make_residual_picks_class() -> None:
    assert isinstance(make_residual(8, 1, 20, 1e-6), PlainResidual)
    hc = make_residual(8, 4, 7, 1e-5)
    assert isinstance(hc, HyperConnection)
    assert hc.hc_mult == 4 and hc.sinkhorn_iters == 7 and hc.norm.eps == 1e-5

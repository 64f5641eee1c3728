"""Hooks (knock-out, gate and stream capture) and shared helpers (engram.analysis.hooks)."""

import pytest
import torch
from research_support import random_ids, tiny_model

from engram.analysis.hooks import capture_gates, capture_streams, head_logits, knockout, short_labels


def test_knockout_zeroes_engram_and_restores_the_model():
    model, x = tiny_model(), random_ids()
    with torch.no_grad():
        before = model(x).logits
        with knockout(model):
            knocked = model(x).logits
        after = model(x).logits
    assert not torch.allclose(before, knocked)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert all(not layer._forward_hooks for layer in model.engram_layers.values())


def test_knockout_of_a_model_whose_engram_output_is_zero_changes_nothing():
    model, x = tiny_model(), random_ids()
    with torch.no_grad():
        for layer in model.engram_layers.values():
            layer.value_proj.weight.zero_()
        before = model(x).logits
        with knockout(model):
            knocked = model(x).logits
    torch.testing.assert_close(before, knocked, rtol=0, atol=0)


def test_knockout_restores_hooks_after_an_error():
    model = tiny_model()
    with pytest.raises(RuntimeError):
        with knockout(model):
            raise RuntimeError("boom")
    assert all(not layer._forward_hooks for layer in model.engram_layers.values())


def test_captured_gates_are_the_alpha_the_forward_used():
    # without the conv Y = alpha * W_V e, so the captured alpha must reproduce Y exactly
    model, x = tiny_model(short_conv=False), random_ids()
    (lid, layer), = model.engram_layers.items()
    seen = {}
    handle = layer.register_forward_hook(lambda mod, args, out: seen.update(y=out, e=mod.embedding(args[1])))
    with torch.no_grad(), capture_gates(model) as gates:
        model(x)
    handle.remove()
    alpha = gates[lid][0]  # (B, T, G)
    assert alpha.shape == (2, 24, 2) and bool(((alpha > 0) & (alpha < 1)).all())
    e = seen["e"].reshape(2, 24, -1)
    torch.testing.assert_close(alpha[..., None] * layer.value_proj(e)[:, :, None], seen["y"])
    assert not layer._forward_hooks


def test_gates_of_the_no_gate_ablation_are_one():
    model = tiny_model(gate="none")
    with torch.no_grad(), capture_gates(model) as gates:
        model(random_ids())
    assert torch.equal(gates[1][0], torch.ones(2, 24, 2))


def test_streams_are_branch_means_and_the_last_one_gives_the_logits():
    model, x = tiny_model(), random_ids()
    with torch.no_grad(), capture_streams(model) as streams:
        logits = model(x).logits
        assert len(streams) == 4 and streams[0].shape == (2, 24, 64)
        torch.testing.assert_close(head_logits(model, streams[-1]), logits, rtol=0, atol=0)
    assert all(not blk._forward_hooks for blk in model.layers)


def test_short_labels_drop_shared_path_components():
    assert short_labels(["runs/demo/demo-engram", "runs/demo/demo-moe"]) == ["demo-engram", "demo-moe"]
    assert short_labels(["s/rho=0.9/seed0/train", "s/rho=1.0/seed0/train", "s/rho=1.0/seed1/train"]) == [
        "rho=0.9/seed0", "rho=1.0/seed0", "rho=1.0/seed1"]
    assert short_labels(["a/b", "a/b"]) == ["a/b", "a/b"]
    assert short_labels(["only/one"]) == ["one"]

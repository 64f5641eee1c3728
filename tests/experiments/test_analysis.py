"""Hooks (knock-out, gate and stream capture), LogitLens and CKA (engram.experiments.analysis)."""

import dataclasses

import numpy as np
import pytest
import torch

from engram.config import ModelConfig
from engram.presets import get_preset
from engram.experiments.analysis import (MinibatchCKA, alignment_index, capture_gates, capture_streams, cka_between,
                                         head_logits, knockout, linear_cka, logit_lens)
from engram.model.transformer import EngramLM


def tiny(name="tiny-engram", **engram) -> EngramLM:
    config = get_preset(name)
    if engram:
        config = ModelConfig(backbone=config.backbone, engram=dataclasses.replace(config.engram, **engram))
    model = EngramLM(config).eval()
    with torch.no_grad():  # make the conv non-trivial so Y is not just the gated value
        for layer in model.engram_layers.values():
            if layer.conv_weight is not None:
                layer.conv_weight.normal_(std=0.3)
    return model


def ids(B=2, T=24):
    return torch.randint(3, 512, (B, T))


# -- CKA ---------------------------------------------------------------------------------------------


def test_cka_of_a_representation_with_itself_is_one():
    x = torch.randn(300, 32)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(x, x, minibatch=100) == pytest.approx(1.0, abs=1e-6)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    x = torch.randn(400, 24, dtype=torch.float64)
    y = x @ torch.randn(24, 16, dtype=torch.float64) + 0.5 * torch.randn(400, 16, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(24, 24, dtype=torch.float64))
    base = linear_cka(x, y, minibatch=100)
    assert 0.2 < base < 0.99
    assert linear_cka(x @ q, y, minibatch=100) == pytest.approx(base, abs=1e-9)
    assert linear_cka(7.5 * x, y, minibatch=100) == pytest.approx(base, abs=1e-9)
    assert linear_cka(x, 0.01 * y, minibatch=100) == pytest.approx(base, abs=1e-9)


def test_unbiased_cka_of_independent_features_is_near_zero():
    x, y = torch.randn(2048, 64), torch.randn(2048, 64)
    assert abs(linear_cka(x, y, minibatch=256)) < 0.02


def test_minibatch_cka_is_a_layer_by_layer_matrix():
    x = torch.randn(3, 128, 8)
    cka = MinibatchCKA()
    cka.update(x, x[[2, 0]])
    S = cka.compute()
    assert S.shape == (3, 2)
    torch.testing.assert_close(S[2, 0].item(), 1.0)
    torch.testing.assert_close(S[0, 1].item(), 1.0)
    with pytest.raises(ValueError, match="no minibatch"):
        MinibatchCKA().compute()


def test_alignment_index_on_a_hand_made_matrix():
    # rows: baseline layers 1..6, columns: Engram layers 1..2
    S = np.array([[0.9, 0.1],
                  [0.5, 0.2],
                  [0.2, 0.3],
                  [0.1, 0.4],
                  [0.0, 0.6],
                  [0.05, 0.8]])
    a = alignment_index(S)
    # column 1: top-5 rows 1,2,3,4,6 (0.05 beats 0.0)
    assert a[0] == pytest.approx((0.9 * 1 + 0.5 * 2 + 0.2 * 3 + 0.1 * 4 + 0.05 * 6) / (0.9 + 0.5 + 0.2 + 0.1 + 0.05))
    # column 2: top-5 rows 6,5,4,3,2
    assert a[1] == pytest.approx((0.8 * 6 + 0.6 * 5 + 0.4 * 4 + 0.3 * 3 + 0.2 * 2) / 2.3)
    assert alignment_index(S[:3], top=5)[0] == pytest.approx((0.9 + 1.0 + 0.6) / 1.6)  # fewer rows: all of them
    assert alignment_index(np.eye(4), top=1).tolist() == [1, 2, 3, 4]


def test_cka_between_a_model_and_itself_has_a_unit_diagonal():
    model = tiny()
    S = cka_between(model, model, [(ids(4, 33), None)], minibatch=64)
    assert S.shape == (4, 4)
    np.testing.assert_allclose(np.diag(S), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="no batch holds a minibatch of 129 tokens"):
        cka_between(model, model, [(ids(4, 33), None)], minibatch=129)  # 4 x 32 tokens per batch


# -- hooks -------------------------------------------------------------------------------------------


def test_knockout_zeroes_engram_and_restores_the_model():
    model, x = tiny(), ids()
    with torch.no_grad():
        before = model(x).logits
        with knockout(model):
            knocked = model(x).logits
        after = model(x).logits
    assert not torch.allclose(before, knocked)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert all(not layer._forward_hooks for layer in model.engram_layers.values())


def test_knockout_of_a_model_whose_engram_output_is_zero_changes_nothing():
    model, x = tiny(), ids()
    with torch.no_grad():
        for layer in model.engram_layers.values():
            layer.value_proj.weight.zero_()
        before = model(x).logits
        with knockout(model):
            knocked = model(x).logits
    torch.testing.assert_close(before, knocked, rtol=0, atol=0)


def test_knockout_restores_hooks_after_an_error():
    model = tiny()
    with pytest.raises(RuntimeError):
        with knockout(model):
            raise RuntimeError("boom")
    assert all(not layer._forward_hooks for layer in model.engram_layers.values())


def test_captured_gates_are_the_alpha_the_forward_used():
    # without the conv Y = alpha * W_V e, so the captured alpha must reproduce Y exactly
    model, x = tiny(short_conv=False), ids()
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
    model = tiny(gate="none")
    with torch.no_grad(), capture_gates(model) as gates:
        model(ids())
    assert torch.equal(gates[1][0], torch.ones(2, 24, 2))


def test_streams_are_branch_means_and_the_last_one_gives_the_logits():
    model, x = tiny(), ids()
    with torch.no_grad(), capture_streams(model) as streams:
        logits = model(x).logits
        assert len(streams) == 4 and streams[0].shape == (2, 24, 64)
        torch.testing.assert_close(head_logits(model, streams[-1]), logits, rtol=0, atol=0)
    assert all(not blk._forward_hooks for blk in model.layers)


# -- LogitLens ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-engram", "tiny-moe"])
def test_logit_lens_kl_of_the_last_block_is_zero(name):
    model = tiny(name)
    kl = logit_lens(model, [(ids(), None), (ids(1, 16), torch.zeros(1, 16, dtype=torch.bool))])
    assert len(kl) == 4
    assert abs(kl[-1]) < 1e-6
    assert all(k > 0 for k in kl[:-1])


def test_short_labels_drop_shared_path_components():
    from engram.experiments.analysis import short_labels

    assert short_labels(["runs/demo/demo-engram", "runs/demo/demo-moe"]) == ["demo-engram", "demo-moe"]
    assert short_labels(["s/rho=0.9/seed0/train", "s/rho=1.0/seed0/train", "s/rho=1.0/seed1/train"]) == [
        "rho=0.9/seed0", "rho=1.0/seed0", "rho=1.0/seed1"]
    assert short_labels(["a/b", "a/b"]) == ["a/b", "a/b"]
    assert short_labels(["only/one"]) == ["one"]

"""The long-context model pieces: document-masked attention for packed batches and YaRN RoPE scaling."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from engram.config import BackboneConfig, ModelConfig, YarnConfig
from engram.infer import left_pad
from engram.model.layers import RotaryEmbedding, yarn_frequencies
from engram.model.transformer import EngramLM
from engram.presets import get_preset


def model_of(name, G=None, **backbone):
    config = get_preset(name)
    bb = dataclasses.replace(config.backbone, **backbone, **({} if G is None else {"hc_mult": G}))
    torch.manual_seed(0)
    model = EngramLM(dataclasses.replace(config, backbone=bb)).eval()
    with torch.no_grad():  # a trained-looking conv, so the conv's reset matters too
        for layer in model.engram_layers.values():
            if getattr(layer, "conv_weight", None) is not None:
                layer.conv_weight.normal_()
    return model


@pytest.mark.parametrize("name, G", [("tiny-engram", 2), ("tiny-engram", 1), ("tiny-moe", 1), ("tiny-dense", 2),
                                     ("tiny-engram-v41", 2)])
@pytest.mark.parametrize("layout", [([5, 11, 1, 15], [32]),
                                    ([1, 31], [1, 1, 30])],  # documents starting at position 1 (and 2)
                         ids=["mixed", "start-at-1"])
def test_a_packed_batch_equals_each_document_alone(name, G, layout):
    model = model_of(name, G)
    gen = torch.Generator().manual_seed(3)
    docs = [[torch.randint(3, 512, (n,), generator=gen) for n in lengths] for lengths in layout]
    ids = torch.stack([torch.cat(row) for row in docs])  # (2, 32)
    boundary = torch.zeros_like(ids, dtype=torch.bool)
    for b, row in enumerate(docs):
        starts = np.cumsum([0] + [len(d) for d in row[:-1]])
        boundary[b, starts] = True
    with torch.no_grad():
        packed = model(ids, boundary=boundary).logits
        worst = 0.0
        for b, row in enumerate(docs):
            at = 0
            for doc in row:
                alone = model(doc[None]).logits[0]
                worst = max(worst, (packed[b, at: at + len(doc)] - alone).abs().max().item())
                at += len(doc)
    assert worst <= 1e-5, worst


def test_without_the_mask_documents_see_each_other_and_old_configs_keep_that():
    masked, unmasked = model_of("tiny-engram"), model_of("tiny-engram", document_mask=False)
    ids = torch.randint(3, 512, (1, 20))
    boundary = torch.zeros_like(ids, dtype=torch.bool)
    boundary[0, [0, 8]] = True
    with torch.no_grad():
        assert not torch.allclose(masked(ids, boundary=boundary).logits, unmasked(ids, boundary=boundary).logits)
        assert torch.equal(masked(ids).logits, unmasked(ids).logits)  # one document: nothing to mask
    old = BackboneConfig().to_dict()
    old.pop("document_mask"), old.pop("rope_scaling")
    assert BackboneConfig.from_dict(old).document_mask is False  # a checkpoint trained before document-masked attention
    assert BackboneConfig().document_mask is True


# -- YaRN ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("d, L", [(16, 64), (64, 256), (128, 1024), (32, 4096)])
def test_scale_one_is_exactly_plain_rope(d, L):
    plain = RotaryEmbedding(d, 512, 10000.0)
    yarn = RotaryEmbedding(d, 512, 10000.0, YarnConfig(factor=1.0, original_max_seq_len=L))
    positions = torch.arange(512)
    for a, b in zip(plain(positions), yarn(positions)):
        assert torch.equal(a, b)
    m1, m2 = model_of("tiny-engram"), model_of("tiny-engram", rope_scaling=YarnConfig(factor=1.0))
    ids = torch.randint(3, 512, (2, 30))
    with torch.no_grad():
        assert torch.equal(m1(ids).logits, m2(ids).logits)


def independent_yarn(d, theta, L, s, beta_fast, beta_slow, mscale):
    """YaRN from its definition, per dimension pair: r_i = L / wavelength_i rotations over L; keep the
    frequency above beta_fast rotations, divide it by s below beta_slow, blend linearly in between, with
    DeepSeek's whole-dimension bounds (the fast bound floored, the slow one ceiled)."""
    freqs = [theta ** (-2 * i / d) for i in range(d // 2)]

    def dim_at(rotations):  # solve L * theta^(-2i/d) / (2 pi) = rotations for i
        return (d / 2) * math.log(L / (2 * math.pi * rotations)) / math.log(theta)

    lo, hi = max(math.floor(dim_at(beta_fast)), 0), min(math.ceil(dim_at(beta_slow)), d - 1)
    out = []
    for i, f in enumerate(freqs):
        w = 0.0 if i <= lo else 1.0 if i >= hi else (i - lo) / (hi - lo)
        out.append(f * (1 - w) + (f / s) * w)
    return np.array(out), (0.1 * mscale * math.log(s) + 1) ** 2


@pytest.mark.parametrize("d, L, s", [(64, 4096, 10.0), (16, 256, 4.0), (32, 128, 2.0)])
def test_frequencies_and_attention_factor_match_the_formula(d, L, s):
    scaling = YarnConfig(factor=s, original_max_seq_len=L, beta_fast=32, beta_slow=1, mscale=0.707)
    inv_freq, m = yarn_frequencies(d, 10000.0, scaling)
    expected, logit_factor = independent_yarn(d, 10000.0, L, s, 32, 1, 0.707)
    np.testing.assert_allclose(inv_freq.numpy(), expected, rtol=1e-6)
    assert math.isclose(m * m, logit_factor, rel_tol=1e-12)
    if s == 10.0:  # the paper's setting: logits x (0.1 * 0.707 * ln 10 + 1)^2 = 1.3521
        assert math.isclose(m * m, 1.3521, rel_tol=1e-4)
    assert inv_freq[0] == 1.0 and math.isclose(float(inv_freq[-1]), expected[-1], rel_tol=1e-6)


def test_decode_with_cache_equals_the_full_forward_at_the_extended_length():
    """Trained at 32 positions, extended 4x: a 120-token continuation decodes exactly."""
    model = model_of("tiny-engram", max_seq_len=128, rope_scaling=YarnConfig(factor=4.0, original_max_seq_len=32))
    gen = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (120, 90)]
    prompt_len = 20
    ids, starts = left_pad([s[:prompt_len] for s in seqs], pad_id=2)
    cache = model.new_cache(starts, 128)
    with torch.no_grad():
        model(ids, cache=cache)
        steps = [model(torch.tensor([[s[t]] for s in seqs]), cache=cache).logits[:, 0]
                 for t in range(prompt_len, 90)]
        for b, seq in enumerate(seqs):
            full = model(torch.tensor([seq[:90]])).logits[0]
            decoded = torch.stack([step[b] for step in steps])  # predictions after tokens 20..89
            assert (decoded - full[prompt_len:90]).abs().max().item() <= 1e-4


def test_bad_yarn_configs_are_refused():
    with pytest.raises(ValueError, match="factor"):
        YarnConfig(factor=0.5)
    with pytest.raises(ValueError, match="beta_fast"):
        YarnConfig(beta_fast=1, beta_slow=2)
    config = ModelConfig.from_dict(ModelConfig(backbone=BackboneConfig(rope_scaling=YarnConfig(factor=2.0))).to_dict())
    assert config.backbone.rope_scaling == YarnConfig(factor=2.0)

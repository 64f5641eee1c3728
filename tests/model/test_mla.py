"""Multi-head latent attention (``engram.model.attention.MLA``): its parameters, causality and document
mask, its decode cache (c + r numbers per token and block), decode = one full forward for every model
kind, greedy generation, and the softmax scale (YaRN's m^2 on the whole logit) by hand."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from support import assert_causal, assert_greedy_matches_recomputing, decode_error, roughen_decode_state
from engram.config import BackboneConfig, MLAConfig, ModelConfig, YarnConfig
from engram.model.attention import MLA, attention_params
from engram.model.layers import RotaryEmbedding, yarn_frequencies
from engram.model.transformer import EngramLM
from engram.presets import get_preset

MLA_Q0 = MLAConfig(q_lora_rank=0, kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10)
MLA_Q = dataclasses.replace(MLA_Q0, q_lora_rank=20)  # the low-rank query path
YARN = YarnConfig(factor=4.0, original_max_seq_len=8)  # the test sequences run past 8 positions


def mla_config(name: str, mla: MLAConfig = MLA_Q0, G: int | None = None, yarn: YarnConfig | None = None) -> ModelConfig:
    config = get_preset(name)
    bb = dataclasses.replace(config.backbone, mla=mla, rope_scaling=yarn, n_kv_heads=None,  # MLA: no grouped heads
                             **({} if G is None else {"hc_mult": G}))
    return dataclasses.replace(config, backbone=bb)


CASES = {
    "dense": mla_config("tiny-dense"),
    "dense-q-lora": mla_config("tiny-dense", MLA_Q),
    "moe-G1": mla_config("tiny-moe", G=1),
    "moe-yarn-q-lora": mla_config("tiny-moe", MLA_Q, yarn=YARN),
    "engram-G1": mla_config("tiny-engram", G=1),
    "engram-G2-q-lora": mla_config("tiny-engram", MLA_Q),
    "engram-G2-yarn": mla_config("tiny-engram", yarn=YARN),
}


def build(config: ModelConfig) -> EngramLM:
    torch.manual_seed(0)
    model = EngramLM(config).eval()
    roughen_decode_state(model)
    return model


def test_mla_config_refuses_grouped_heads_and_ignores_the_head_width():
    with pytest.raises(ValueError, match="n_kv_heads: must equal n_heads=4"):
        BackboneConfig(d_model=64, n_heads=4, n_kv_heads=2, mla=MLA_Q0)
    assert MLAConfig(q_lora_rank=None) == MLAConfig(q_lora_rank=0)  # DeepSeek's null: no low-rank query
    with pytest.raises(ValueError, match="qk_rope_head_dim: must be even"):
        MLAConfig(qk_rope_head_dim=7)
    bb = BackboneConfig(vocab_size=100, d_model=60, n_heads=4, ffn_hidden=32, mla=MLA_Q0)  # 60 / 4 = 15: odd
    assert bb.n_kv_heads == 4 and bb.rope_dim == MLA_Q0.qk_rope_head_dim
    assert EngramLM(ModelConfig(backbone=bb))(torch.randint(0, 100, (1, 5))).logits.shape == (1, 5, 100)


@pytest.mark.parametrize("mla, query", [(MLA_Q0, {"wq"}), (MLA_Q, {"wq_a", "q_norm", "wq_b"})])
def test_the_layout_is_mla_configs_and_the_count_is_attention_params(mla, query):
    model = EngramLM(mla_config("tiny-engram", mla))
    for blk in model.layers:
        assert isinstance(blk.attn, MLA)
        assert {name for name, _ in blk.attn.named_children()} == query | {"wkv_a", "kv_norm", "wkv_b", "wo"}
        assert sum(p.numel() for p in blk.attn.parameters()) == attention_params(model.config.backbone)
    assert model.rope.head_dim == mla.qk_rope_head_dim


def test_init_streams_are_named_and_norms_are_ones():
    """MLA's matrices come from their own named streams, as the other weights do: two models that
    share a weight start it equal under one seed, whatever else either holds."""
    torch.manual_seed(5)
    dense = EngramLM(CASES["dense"])
    torch.manual_seed(5)
    engram = EngramLM(mla_config("tiny-engram"))
    for a, b in zip(dense.layers, engram.layers):
        for part in ("wq", "wkv_a", "wkv_b", "wo"):
            assert torch.equal(getattr(a.attn, part).weight, getattr(b.attn, part).weight)
        assert torch.equal(a.attn.kv_norm.weight, torch.ones(MLA_Q0.kv_lora_rank))
    wo = dense.layers[0].attn.wo.weight
    assert wo.std().item() == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.1)
    assert not torch.equal(dense.layers[0].attn.wkv_a.weight, dense.layers[1].attn.wkv_a.weight)


@pytest.mark.parametrize("name", ["dense", "engram-G2-q-lora", "moe-yarn-q-lora"])
def test_causal(name):
    assert_causal(EngramLM(CASES[name]), 512)


def test_a_packed_batch_equals_each_document_alone():
    model = build(CASES["engram-G2-q-lora"])
    gen = torch.Generator().manual_seed(3)
    docs = [torch.randint(3, 512, (n,), generator=gen) for n in (5, 11, 1, 15)]
    ids = torch.cat(docs)[None]  # (1, 32)
    boundary = torch.zeros_like(ids, dtype=torch.bool)
    boundary[0, np.cumsum([0] + [len(d) for d in docs[:-1]])] = True
    with torch.no_grad():
        packed = model(ids, boundary=boundary).logits[0]
        starts = np.cumsum([0] + [len(d) for d in docs])
        worst = max((packed[a:b] - model(d[None]).logits[0]).abs().max().item()
                    for d, a, b in zip(docs, starts, starts[1:]))
        assert not torch.allclose(packed, model(ids).logits[0])  # the mask is what separates them
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("chunk", [1, 3])
def test_decode_equals_full_forward(name, chunk):
    worst = decode_error(build(CASES[name]), chunk)
    assert worst <= 1e-5, worst


def test_the_cache_holds_the_latent_and_the_rope_key():
    """c + r numbers per token and block (24 + 8 here, against 2 * 2 * 16 for the GQA twin), and the
    buffers keep that layout when they grow and when rows are reordered (beam search)."""
    model = build(CASES["engram-G2-q-lora"])
    c, r = MLA_Q.kv_lora_rank, MLA_Q.qk_rope_head_dim
    cache = model.new_cache(torch.tensor([0, 2]), 6, growable=True)
    for layer in cache.layers:
        assert layer.keys.shape == (2, 1, 6, c) and layer.values.shape == (2, 1, 6, r)
        assert layer.keys[0, :, 0].numel() + layer.values[0, :, 0].numel() == c + r
    ids = torch.randint(3, 512, (2, 5))
    with torch.no_grad():
        model(ids, cache=cache)
        cache.select_rows(torch.tensor([1, 1, 0]))
        model(torch.randint(3, 512, (3, 4)), cache=cache)  # 9 > 6 positions: the buffers grow
    for layer in cache.layers:
        assert layer.keys.shape == (3, 1, 12, c) and layer.values.shape == (3, 1, 12, r)
    assert torch.equal(cache.layers[0].keys[0, :, :5], cache.layers[0].keys[1, :, :5])


@pytest.mark.parametrize("name", ["engram-G2-yarn", "moe-G1"])
def test_greedy_generation_matches_recomputing_the_prefix(name):
    assert_greedy_matches_recomputing(build(CASES[name]))


def _rotate(x: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """(T, 2) pairs turned by (T,) angles: RoPE on a width of 2."""
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([x[:, 0] * cos - x[:, 1] * sin, x[:, 1] * cos + x[:, 0] * sin], dim=-1)


@pytest.mark.parametrize("yarn", [None, YarnConfig(factor=4.0, original_max_seq_len=2, beta_fast=2.0)])
def test_one_head_by_hand(yarn):
    """softmax(q.k * m^2 / sqrt(n + r)) v for head 0, written out: q.k = q_nope.k_nope + R_t q_rope . R_s k_rope,
    with YaRN's m on the whole logit (DeepSeek-V3), not only on its rotated part."""
    n, r, v, c = 3, 2, 4, 5
    bb = BackboneConfig(vocab_size=16, n_layers=1, d_model=8, n_heads=2, ffn_hidden=8, max_seq_len=8, rope_scaling=yarn,
                        mla=MLAConfig(kv_lora_rank=c, qk_nope_head_dim=n, qk_rope_head_dim=r, v_head_dim=v))
    torch.manual_seed(0)
    attn = MLA(bb)
    with torch.no_grad():
        attn.kv_norm.weight.uniform_(0.5, 1.5)
        attn.wo.weight.zero_()
        attn.wo.weight[:v, :v] = torch.eye(v)  # the output's first v features are head 0's mix
    T = 4
    x = torch.randn(1, T, 8)
    rope = RotaryEmbedding(r, 8, bb.rope_theta, yarn)
    with torch.no_grad():
        y = attn(x, *rope(torch.arange(T)))[0, :, :v]  # (T, v)

        q = (x[0] @ attn.wq.weight.T)[:, : n + r]  # head 0: (T, n + r)
        a = x[0] @ attn.wkv_a.weight.T  # (T, c + r)
        latent = a[:, :c] / a[:, :c].pow(2).mean(-1, keepdim=True).add(bb.norm_eps).sqrt() * attn.kv_norm.weight
        kv = (latent @ attn.wkv_b.weight.T)[:, : n + v]  # head 0: (T, n + v)
        inv_freq = yarn_frequencies(r, bb.rope_theta, yarn)[0]  # (1,)
        angle = torch.arange(T) * inv_freq
        logits = q[:, :n] @ kv[:, :n].T + _rotate(q[:, n:], angle) @ _rotate(a[:, c:], angle).T  # (T, T)
        m = 1.0 if yarn is None else 0.1 * yarn.mscale * math.log(yarn.factor) + 1
        logits = logits * m**2 / math.sqrt(n + r)
        logits = logits.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        expected = logits.softmax(-1) @ kv[:, n:]  # (T, v)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    if yarn is not None:
        assert attn.scale == pytest.approx(m**2 / math.sqrt(n + r)) and m > 1.05

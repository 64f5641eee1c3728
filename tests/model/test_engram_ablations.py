"""The ablation switches of the Engram module (docs/ALGORITHM.md §5): compress, gate="none", short_conv,
branch_keys."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from support import assert_causal, train_step
from engram.config import EngramConfig, ModelConfig
from engram.model.accounting import count_parameters
from engram.model.engram import Engram, SharedLinear
from engram.model.transformer import EngramLM
from engram.presets import get_preset
from engram.tokenizer import CompressedTokenizer

PAIRS = CompressedTokenizer(torch.arange(512) // 2, 256)  # raw ids 2i and 2i+1 share a compressed id

SWITCHES = {
    "default": {},
    "no-compression": {"compress": False},
    "no-gate": {"gate": "none"},
    "no-conv": {"short_conv": False},
    "shared-keys": {"branch_keys": False},
    "4-grams": {"max_ngram_size": 4, "engram_vocab_size": [1009, 1013, 1019]},
    "all-off-4-grams": {"compress": False, "gate": "none", "short_conv": False, "branch_keys": False,
                        "max_ngram_size": 4, "engram_vocab_size": [1009, 1013, 1019]},
}


def ablated(**switches) -> ModelConfig:
    config = get_preset("tiny-engram")  # G = 2, MoE
    return ModelConfig(backbone=config.backbone, engram=dataclasses.replace(config.engram, **switches))


def make_layer(G=2, D=16, **switches) -> Engram:
    config = EngramConfig(engram_vocab_size=[11, 13], max_ngram_size=3, n_head_per_ngram=2, n_embed_per_ngram=8,
                          layer_ids=[0], **switches)
    layer = Engram(config, D, [11, 13, 17, 19], branches=G)
    with torch.no_grad():
        if layer.conv_weight is not None:
            layer.conv_weight.normal_()
    return layer


def inputs(layer, B=2, T=12):
    hash_ids = torch.randint(0, 11, (B, T, layer.config.n_heads))
    return torch.randn(B, T, layer.branches, layer.dim), hash_ids


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_switch_trains_one_step_and_is_causal(name):
    model = EngramLM(ablated(**SWITCHES[name]), PAIRS, sparse_tables=True)
    before = train_step(model, 512)
    after = dict(model.named_parameters())
    table = "layers.1.engram.embedding.weight"
    assert not torch.equal(before[table], after[table])
    assert not torch.equal(before["layers.1.engram.value_proj.weight"], after["layers.1.engram.value_proj.weight"])
    assert_causal(model, 512)


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_accounting_is_the_built_model(name):
    config = ablated(**SWITCHES[name])
    assert count_parameters(config).with_embeddings == sum(p.numel() for p in EngramLM(config).parameters())


def test_no_compression_hashes_raw_ids():
    ids = torch.randint(0, 512, (2, 20))
    raw = EngramLM(ablated(compress=False), PAIRS)
    identity = EngramLM(ablated(), CompressedTokenizer.identity(512))
    compressed = EngramLM(ablated(), PAIRS)
    assert torch.equal(raw.hash(ids)[1], identity.hash(ids)[1])
    assert not torch.equal(raw.hash(ids)[1], compressed.hash(ids)[1])
    assert raw.hasher.layout() == identity.hasher.layout()
    assert raw.hasher.compressed_vocab_size == 512 and raw.compressed_tokenizer is PAIRS
    # 10/11, 20/21, 30/31 merge only under compression
    a, b = torch.tensor([[10, 20, 30]]), torch.tensor([[11, 21, 31]])
    assert torch.equal(compressed.hash(a)[1], compressed.hash(b)[1])
    assert not torch.equal(raw.hash(a)[1], raw.hash(b)[1])


def test_no_gate_means_alpha_is_exactly_one():
    layer = make_layer(gate="none")
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"embedding.weight", "value_proj.weight", "norm_conv.weight", "conv_weight"}
    hidden, hash_ids = inputs(layer)
    e = layer.embedding(hash_ids).flatten(2)  # (B, T, M)
    alpha = layer.gate(hidden, e)
    assert alpha.shape == (2, 12, 2, 1) and torch.equal(alpha, torch.ones_like(alpha))
    value = layer.value_proj(e)[:, :, None].expand(-1, -1, 2, -1)  # (B, T, G, D), alpha = 1
    expected = value + F.silu(layer.short_conv(layer.norm_conv(value)))
    assert torch.equal(layer(hidden, hash_ids), expected)


def test_no_conv_returns_the_gated_value():
    layer = make_layer(short_conv=False)
    assert layer.conv_weight is None and layer.norm_conv is None
    hidden, hash_ids = inputs(layer)
    e = layer.embedding(hash_ids).flatten(2)
    assert torch.equal(layer(hidden, hash_ids), layer.gate(hidden, e) * layer.value_proj(e)[:, :, None])


def test_shared_keys_give_every_branch_the_same_key():
    G, D = 2, 16
    shared, own = make_layer(G, D, branch_keys=False), make_layer(G, D)
    assert isinstance(shared.key_proj, SharedLinear) and shared.norm_key.weight.shape == (1, D)
    with torch.no_grad():
        shared.norm_key.weight.uniform_(0.5, 1.5)  # a trained-looking shared norm
        shared.norm_query.weight.uniform_(0.5, 1.5)
    seen = {}
    shared.key_proj.register_forward_hook(lambda m, i, out: seen.__setitem__("key", out))
    shared.norm_key.register_forward_hook(lambda m, i, out: seen.__setitem__("normed", out))
    hidden, hash_ids = inputs(shared)
    y = shared(hidden, hash_ids)
    for key in (seen["key"], seen["normed"]):
        assert key.shape[2] == G and torch.equal(key[:, :, 0], key[:, :, 1])
    # the query and the gate stay per branch
    hidden2 = hidden.clone()
    hidden2[:, :, 1] += 3 * torch.randn_like(hidden2[:, :, 1])
    y2 = shared(hidden2, hash_ids)
    assert torch.equal(y[:, :, 0], y2[:, :, 0]) and not torch.equal(y[:, :, 1], y2[:, :, 1])
    M = shared.config.memory_dim
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(own) - count(shared) == (G - 1) * M * D + (G - 1) * D


def test_default_switches_keep_the_model():
    """The defaults are today's module: same parameters, same output as a config without the keys."""
    old = get_preset("tiny-engram").to_dict()
    for key in ("compress", "short_conv", "branch_keys"):
        del old["engram"][key]
    config = ModelConfig.from_dict(old)
    assert config == get_preset("tiny-engram")
    torch.manual_seed(0)
    a = EngramLM(config)
    torch.manual_seed(0)
    b = EngramLM(ablated(compress=True, gate="signed_sqrt", short_conv=True, branch_keys=True))
    assert list(a.state_dict()) == list(b.state_dict())
    ids = torch.randint(0, 512, (1, 9))
    assert torch.equal(a(ids).logits, b(ids).logits)

"""The official demo's Engram weights: ``engram.compat.deepseek.from_demo_state_dict`` against a reference
written here from docs/ALGORITHM.md §2 ("The demo's exact module"), under the demo's key names. The reference reads the
state dict directly; it shares no code with ``engram.model.engram``."""

import math

import pytest
import torch
import torch.nn.functional as F

from engram.compat.deepseek import DEMO_MODULE, from_demo_state_dict, to_demo_state_dict
from engram.config import EngramConfig
from engram.hashing import table_geometry
from engram.model.engram import Engram


def config_for(layer_ids=(1,), N=3, K=2, kernel=4):
    return EngramConfig(engram_vocab_size=[37, 41, 43][: N - 1], max_ngram_size=N, n_head_per_ngram=K,
                        n_embed_per_ngram=4 * K, layer_ids=list(layer_ids), kernel_size=kernel, pad_id=0)


def random_demo_state_dict(config, D, G, layer_id, seed=0):
    """What the demo module's state_dict() holds after training: every entry random, biases included."""
    g = torch.Generator().manual_seed(seed)
    geometry = table_geometry(config, config.layer_ids)[layer_id]
    M, K = config.memory_dim, config.kernel_size
    sd = {"multi_head_embedding.embedding.weight": torch.randn(geometry.num_rows, config.head_dim, generator=g),
          "multi_head_embedding.offsets": torch.tensor(geometry.offsets, dtype=torch.long),
          "value_proj.weight": torch.randn(D, M, generator=g) / math.sqrt(M),
          "value_proj.bias": torch.randn(D, generator=g) * 0.1,
          "short_conv.conv.weight": torch.randn(G * D, 1, K, generator=g) * 0.3}
    for b in range(G):
        sd[f"key_projs.{b}.weight"] = torch.randn(D, M, generator=g) / math.sqrt(M)
        sd[f"key_projs.{b}.bias"] = torch.randn(D, generator=g) * 0.1
        sd[f"norm1.{b}.weight"] = 1 + 0.2 * torch.randn(D, generator=g)
        sd[f"norm2.{b}.weight"] = 1 + 0.2 * torch.randn(D, generator=g)
        sd[f"short_conv.norms.{b}.weight"] = 1 + 0.2 * torch.randn(D, generator=g)
    return sd


def demo_reference(sd, hidden, hash_ids, dilation):
    """docs/ALGORITHM.md §2 steps 5-8 with the demo's numerics: biased W_K/W_V, nn.RMSNorm(eps=None) gate norms, conv
    norms at eps 1e-5, one depthwise Conv1d over G*D channels padded on both sides and cut to T."""
    B, T, G, D = hidden.shape
    e = F.embedding(hash_ids + sd["multi_head_embedding.offsets"], sd["multi_head_embedding.embedding.weight"])
    e = e.flatten(-2)  # (B, T, M)
    gates = []
    for b in range(G):
        key = F.linear(e, sd[f"key_projs.{b}.weight"], sd[f"key_projs.{b}.bias"])
        nk = torch.nn.functional.rms_norm(key, (D,), sd[f"norm1.{b}.weight"], eps=None)
        nq = torch.nn.functional.rms_norm(hidden[:, :, b], (D,), sd[f"norm2.{b}.weight"], eps=None)
        s = (nk * nq).sum(-1) / math.sqrt(D)
        s = s.abs().clamp_min(1e-6).sqrt() * s.sign()
        gates.append(s.sigmoid()[..., None])
    value = torch.stack(gates, dim=2) * F.linear(e, sd["value_proj.weight"], sd["value_proj.bias"])[:, :, None]
    normed = torch.cat([F.rms_norm(value[:, :, b], (D,), sd[f"short_conv.norms.{b}.weight"], eps=1e-5)
                        for b in range(G)], dim=-1)  # (B, T, G*D), channel b*D + d
    kernel = sd["short_conv.conv.weight"].shape[-1]
    y = F.conv1d(normed.transpose(1, 2), sd["short_conv.conv.weight"], padding=(kernel - 1) * dilation,
                 dilation=dilation, groups=G * D)[..., :T]
    return value + F.silu(y).transpose(1, 2).reshape(B, T, G, D)


def random_inputs(config, D, G, layer_id, B=2, T=23, scale=1.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    geometry = table_geometry(config, config.layer_ids)[layer_id]
    heads = torch.tensor([geometry.offsets[j + 1] - geometry.offsets[j] if j + 1 < geometry.n_heads
                          else geometry.num_rows - geometry.offsets[j] for j in range(geometry.n_heads)])
    hash_ids = (torch.rand(B, T, geometry.n_heads, generator=g) * heads).long()
    return scale * torch.randn(B, T, G, D, generator=g), hash_ids


@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_loaded_module_computes_what_the_demo_module_computes(G, scale):
    config, D = config_for(layer_ids=(1, 3)), 16
    sd = random_demo_state_dict(config, D, G, layer_id=3)
    module = from_demo_state_dict(sd, config, D, layer_id=3)
    hidden, hash_ids = random_inputs(config, D, G, 3, scale=scale)
    torch.testing.assert_close(module(hidden, hash_ids), demo_reference(sd, hidden, hash_ids, config.dilation),
                               atol=1e-5, rtol=0)


def test_the_demo_numerics_matter():
    """Without the biases and eps (our defaults) the same weights give other outputs: the switches are real."""
    config, D, G = config_for(), 16, 2
    sd = random_demo_state_dict(config, D, G, layer_id=1)
    demo = from_demo_state_dict(sd, config, D)
    ours = Engram(config, D, table_geometry(config, config.layer_ids)[1], 1e-6, branches=G)
    ours.load_state_dict({k: v for k, v in demo.state_dict().items() if not k.endswith("bias")})
    hidden, hash_ids = random_inputs(config, D, G, 1, scale=1e-3)
    assert (ours(hidden, hash_ids) - demo(hidden, hash_ids)).abs().max() > 1e-3
    assert demo.norm_query.eps is None and demo.norm_conv.eps == 1e-5 and demo.value_proj.bias is not None


@pytest.mark.parametrize("G", [1, 3])
def test_round_trip(G):
    config, D = config_for(N=4, K=3, kernel=3), 8
    sd = random_demo_state_dict(config, D, G, layer_id=1, seed=G)
    back = to_demo_state_dict(from_demo_state_dict(sd, config, D))
    assert back.keys() == sd.keys()
    for key in sd:
        assert back[key].dtype == sd[key].dtype and torch.equal(back[key], sd[key]), key


def test_our_module_exports_zero_biases_and_warns_about_eps():
    config, D = config_for(), 8
    ours = Engram(config, D, table_geometry(config, config.layer_ids)[1], 1e-6, branches=2)
    with pytest.warns(UserWarning, match="eps"):
        sd = to_demo_state_dict(ours)
    assert not sd["value_proj.bias"].any() and not sd["key_projs.1.bias"].any()
    assert torch.equal(sd["key_projs.1.weight"], ours.key_proj.weight[1])
    assert torch.equal(sd["short_conv.conv.weight"][5, 0], ours.conv_weight[0, 5])


def _refused(sd, match, config=None, **kw):
    with pytest.raises(ValueError, match=match):
        from_demo_state_dict(sd, config or config_for(), 16, **kw)


def test_bad_state_dicts_are_refused_by_name():
    config, D, G = config_for(), 16, 2
    good = random_demo_state_dict(config, D, G, layer_id=1)
    _refused({k: v for k, v in good.items() if k != "norm2.1.weight"}, r"missing keys \['norm2.1.weight'\]")
    _refused(good | {"extra.weight": torch.zeros(1)}, r"unexpected keys \['extra.weight'\]")
    _refused(good | {"value_proj.weight": torch.zeros(D, 7)}, r"value_proj.weight has shape \(16, 7\)")
    _refused(good | {"short_conv.conv.weight": torch.zeros(G * D, 1, 3)}, "short_conv.conv.weight")
    rows = good["multi_head_embedding.embedding.weight"]
    _refused(good | {"multi_head_embedding.embedding.weight": rows[:-1]}, "embedding.weight has shape")
    wrong = good["multi_head_embedding.offsets"].clone()
    wrong[1] += 1
    _refused(good | {"multi_head_embedding.offsets": wrong}, "offsets .* differ from our hash layout")
    _refused({}, "no key_projs")


def test_layer_choice_and_module_shape_are_checked():
    two = config_for(layer_ids=(1, 3))
    sd = random_demo_state_dict(two, 16, 1, layer_id=3)
    _refused(sd, "say which one with layer_id", config=two)
    _refused(sd, "not one of the config's Engram layers", config=two, layer_id=2)
    # layer 1's primes differ from layer 3's: loading under the wrong layer is caught by the offsets or shapes
    _refused(sd, "layer 1", config=two, layer_id=1)
    _refused(sd, "signed-sqrt gate", config=config_for().__class__(**(config_for().to_dict() | {"short_conv": False})))


def test_demo_module_config_constant():
    assert DEMO_MODULE == {"proj_bias": True, "gate_norm_eps": None, "conv_norm_eps": 1e-5}
    with pytest.raises(ValueError, match="gate_norm_eps"):
        EngramConfig(gate_norm_eps=0)
    with pytest.raises(ValueError, match="conv_norm_eps"):
        EngramConfig(conv_norm_eps="demo")
    assert EngramConfig.from_dict(EngramConfig(**DEMO_MODULE).to_dict()) == EngramConfig(**DEMO_MODULE)


def test_the_old_names_say_where_the_demo_weights_went():
    with pytest.raises(AttributeError, match="engram.compat.deepseek.from_demo_state_dict"):
        Engram.from_demo_state_dict({}, config_for(), 16)
    with pytest.raises(AttributeError, match="engram.compat.deepseek.to_demo_state_dict"):
        Engram(config_for(), 16, table_geometry(config_for(), [1])[1]).to_demo_state_dict()

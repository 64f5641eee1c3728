import dataclasses

import pytest
import torch
import torch.nn.functional as F

from support import assert_causal
from engram.config import BackboneConfig, EngramConfig, ModelConfig
from engram.hashing import NgramHasher
from engram.model.engram import Engram
from engram.model.hyper import HyperConnection, PlainResidual
from engram.model.moe import MoE
from engram.model.transformer import EngramLM
from engram.presets import get_preset
from engram.tokenizer import CompressedTokenizer


def variant(name: str, hc_mult: int | None = None) -> ModelConfig:
    config = get_preset(name)
    if hc_mult is not None:
        bb = dataclasses.replace(config.backbone, hc_mult=hc_mult)
        config = ModelConfig(backbone=bb, engram=config.engram)
    return config


CASES = [("tiny-dense", None), ("tiny-moe", None), ("tiny-engram", None), ("tiny-engram", 1), ("tiny-moe", 1)]


@pytest.mark.parametrize("name,G", CASES)
def test_causal(name, G):
    """Changing tokens after t never changes logits at positions <= t (docs/PITFALLS.md §17)."""
    assert_causal(EngramLM(variant(name, G)), 512)


@pytest.mark.parametrize("name,G", CASES)
def test_loss_and_backward(name, G):
    model = EngramLM(variant(name, G))
    ids = torch.randint(0, 512, (2, 16))
    labels = ids.clone()
    labels[0, 5] = -100
    out = model(ids, labels=labels)
    assert out.logits.shape == (2, 16, 512)
    expected = F.cross_entropy(out.logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not [n for n in missing if "experts" not in n], missing  # unrouted experts may get none
    assert model(ids).loss is None


def test_structure_follows_config():
    model = EngramLM(get_preset("tiny-engram"))
    assert list(model.engram_layers) == [1]
    assert isinstance(model.layers[0].ffn, torch.nn.Module) and not isinstance(model.layers[0].ffn, MoE)
    assert all(isinstance(b.ffn, MoE) for b in model.layers[1:])
    assert isinstance(model.layers[0].attn_res, HyperConnection)
    baseline = EngramLM(variant("tiny-moe", 1))
    assert baseline.hasher is None and not baseline.engram_layers
    assert isinstance(baseline.layers[0].attn_res, PlainResidual)
    assert not any("engram" in n for n, _ in baseline.named_parameters())
    empty = ModelConfig(backbone=get_preset("tiny-moe").backbone,
                        engram=EngramConfig(layer_ids=[], engram_vocab_size=[11, 11]))
    assert EngramLM(empty).hasher is None


def test_engram_changes_the_output_only_where_placed():
    """Zeroing the Engram value projection gives exactly the baseline with the same weights."""
    config = get_preset("tiny-engram")
    model = EngramLM(config).eval()
    base = EngramLM(ModelConfig(backbone=config.backbone)).eval()
    state = {k: v for k, v in model.state_dict().items() if ".engram." not in k}
    base.load_state_dict(state)
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, base(ids).logits)
        model.layers[1].engram.value_proj.weight.zero_()
        torch.testing.assert_close(model(ids).logits, base(ids).logits)


def test_boundary_resets_engram_inputs():
    """With a boundary, the Engram hash ids of document 2 equal those of document 2 alone."""
    model = EngramLM(get_preset("tiny-engram"))
    ids = torch.randint(0, 512, (1, 30))
    boundary = torch.zeros(1, 30, dtype=torch.bool)
    boundary[0, 12] = True
    packed = model.hash(ids, boundary)[1]
    alone = model.hash(ids[:, 12:])[1]
    assert torch.equal(packed[:, 12:], alone)
    assert model(ids, boundary=boundary).logits.shape == (1, 30, 512)


def test_hashes_once_per_forward(monkeypatch):
    config = get_preset("tiny-engram")
    config.engram.layer_ids = [0, 2, 3]
    model = EngramLM(config)
    calls = []
    original = NgramHasher.forward
    monkeypatch.setattr(NgramHasher, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    model(torch.randint(0, 512, (1, 8)))
    assert len(calls) == 1


def test_precomputed_hash_ids_are_used():
    model = EngramLM(get_preset("tiny-engram")).eval()
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, model(ids, hash_ids=model.hash(ids)).logits)


def test_no_host_round_trips_in_engram_forward():
    """The hasher and the layer run on meta tensors: any .item()/.cpu()/numpy in them fails."""
    config = get_preset("tiny-engram")
    hasher = NgramHasher(config.engram, CompressedTokenizer.identity(512)).to("meta")
    ids = torch.empty(2, 16, dtype=torch.long, device="meta")
    boundary = torch.empty(2, 16, dtype=torch.bool, device="meta")
    hash_ids = hasher(ids, boundary)[1]
    assert hash_ids.shape == (2, 16, config.engram.n_heads)
    layer = Engram(config.engram, 64, [1009] * 8, branches=2).to("meta")
    y = layer(torch.empty(2, 16, 2, 64, device="meta"), hash_ids)
    assert y.shape == (2, 16, 2, 64)


def test_compressed_tokenizer_is_used():
    config = get_preset("tiny-engram")
    lookup = torch.arange(512) // 2  # pairs of raw ids share a compressed id
    model = EngramLM(config, CompressedTokenizer(lookup, 256))
    assert model.hasher.compressed_vocab_size == 256
    h = model.hash(torch.tensor([[10, 20, 30]]))[1]
    h2 = model.hash(torch.tensor([[11, 21, 31]]))[1]
    assert torch.equal(h, h2)
    with pytest.raises(ValueError, match="covers 100 raw ids"):
        EngramLM(config, CompressedTokenizer.identity(100))


def test_bad_inputs_raise():
    model = EngramLM(get_preset("tiny-dense"))
    with pytest.raises(ValueError, match="token id 512"):
        model(torch.tensor([[1, 512]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="labels shape"):
        model(torch.tensor([[1, 2]]), labels=torch.tensor([[1]]))


def test_moe_bias_update_through_the_model():
    model = EngramLM(get_preset("tiny-moe")).train()
    model(torch.randint(0, 512, (2, 32)))
    before = [m.expert_bias.clone() for m in model.moe_layers()]
    model.update_moe_bias()
    after = [m.expert_bias for m in model.moe_layers()]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_gqa_and_long_sequences():
    config = ModelConfig(backbone=BackboneConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=4, n_kv_heads=1,
                                                 ffn_hidden=64, max_seq_len=8))
    model = EngramLM(config)
    assert model(torch.randint(0, 64, (1, 20))).logits.shape == (1, 20, 64)  # RoPE table grows on demand


def test_deterministic_given_seed():
    torch.manual_seed(3)
    a = EngramLM(get_preset("tiny-engram"))
    torch.manual_seed(3)
    b = EngramLM(get_preset("tiny-engram"))
    for (n, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), n

"""DeepSeek-V4.1 as released: its weights under DeepSeek's and transformers' names, in fp32, bf16 and fp8 with
ue8m0 scales, into and out of EngramV41, checked by name; left padding read as DEAD when decoding. The fp8
tensors here are written and read by an encoder written in this test from the format's definition (torch's
own float8 casts, scales by math.frexp), not by the library's."""

import dataclasses
import math

import pytest
import torch

from support import decode_error
from engram.config import EngramConfig, ModelConfig
from engram.hashing import table_geometry
from engram.infer import left_pad
from engram.model.engram_v41 import EngramV41
from engram.model.transformer import EngramLM
from engram.presets import get_preset

V41 = dict(variant="v4.1", short_conv=False)


def config(layer_ids=(1, 3)) -> EngramConfig:
    return EngramConfig(engram_vocab_size=[53, 59, 61], max_ngram_size=4, n_head_per_ngram=2, n_embed_per_ngram=64,
                        layer_ids=list(layer_ids), pad_id=0, **V41)


def scale_byte(amax: float) -> int:
    """The ue8m0 byte of the smallest power of two s with amax / s <= 448 (the format's rule)."""
    if amax == 0:
        return 0
    m, e = math.frexp(amax / 448.0)
    e = e - 1 if m == 0.5 else e
    return e + 127


def encode(x: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (R, C) -> float8_e4m3fn codes and float8_e8m0fnu scales per block, the slow obvious way."""
    R, C = x.shape
    br, bc = block
    scales = torch.zeros(-(-R // br), -(-C // bc), dtype=torch.uint8)
    codes = torch.zeros(R, C, dtype=torch.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            tile = x[i * br:(i + 1) * br, j * bc:(j + 1) * bc]
            byte = scale_byte(float(tile.abs().max()))
            scales[i, j] = byte
            codes[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = (tile / 2.0 ** (byte - 127)).to(torch.float8_e4m3fn)
    return codes, scales.view(torch.float8_e8m0fnu)


def decode(codes: torch.Tensor, scales: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    s = scales.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return codes.float() * s[: codes.shape[0], : codes.shape[1]]


def release(cfg: EngramConfig, layer_id: int, G: int, D: int, dtype: str, names: str, seed: int = 0) -> dict:
    """A release state dict of one layer, written here: table (rows, d_h), wkv ((G+1) D, M), two gains."""
    g = torch.Generator().manual_seed(seed)
    rows = sum(table_geometry(cfg, cfg.layer_ids)[layer_id].sizes)
    table = torch.randn(rows, cfg.head_dim, generator=g) * 0.05
    wkv = torch.randn((G + 1) * D, cfg.memory_dim, generator=g) * 0.1
    q, k = 1 + 0.3 * torch.randn(G, D, generator=g), 1 + 0.3 * torch.randn(G, D, generator=g)
    prefix = ("model." if names == "transformers" else "") + f"layers.{layer_id}.engram."
    if dtype == "fp8":
        t_codes, t_scales = encode(table, (1, 32))
        w_codes, w_scales = encode(wkv, (32, 32))
        scale_name = "wkv.weight_scale_inv" if names == "transformers" else "wkv.scale"
        out = {"embed.weight": t_codes, "embed.scale": t_scales, "wkv.weight": w_codes, scale_name: w_scales,
               "q_weight": q.to(torch.bfloat16), "k_weight": k.to(torch.bfloat16)}
    else:
        cast = torch.bfloat16 if dtype == "bf16" else torch.float32
        out = {"embed.weight": table.to(cast), "wkv.weight": wkv.to(cast), "q_weight": q.to(cast),
               "k_weight": k.to(cast)}
    return {prefix + name: value for name, value in out.items()}


@pytest.mark.parametrize("names", ["deepseek", "transformers"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp8"])
def test_release_weights_load_as_the_format_defines_them(names, dtype):
    cfg = config()
    sd = release(cfg, 3, G=2, D=32, dtype=dtype, names=names)
    sd |= release(cfg, 1, G=2, D=32, dtype=dtype, names=names, seed=1)  # the other layer: left alone
    module = EngramV41.from_release_state_dict(sd, cfg, layer_id=3)
    prefix = ("model." if names == "transformers" else "") + "layers.3.engram."
    rows = sum(table_geometry(cfg, cfg.layer_ids)[3].sizes)
    if dtype == "fp8":
        scale = prefix + ("wkv.weight_scale_inv" if names == "transformers" else "wkv.scale")
        table = decode(sd[prefix + "embed.weight"], sd[prefix + "embed.scale"], (1, 32))
        wkv = decode(sd[prefix + "wkv.weight"], sd[scale], (32, 32))
    else:
        table, wkv = sd[prefix + "embed.weight"].float(), sd[prefix + "wkv.weight"].float()
    assert torch.equal(module.embedding.weight[:rows], table) and torch.equal(module.wkv.weight, wkv)
    assert torch.equal(module.q_weight, sd[prefix + "q_weight"].float())
    assert torch.equal(module.k_weight, sd[prefix + "k_weight"].float())
    assert (module.branches, module.dim) == (2, 32) and module.config.gate_norm_eps == 1e-20


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "fp8_e4m3"])
@pytest.mark.parametrize("names", ["deepseek", "transformers"])
def test_a_round_trip_gives_the_same_weights(dtype, names):
    cfg = config()
    module = EngramV41.from_release_state_dict(release(cfg, 1, 2, 32, "fp32", "deepseek"), cfg, layer_id=1)
    sd = module.to_release_state_dict(layer_id=1, names=names, dtype=dtype)
    again = EngramV41.from_release_state_dict(sd, cfg, layer_id=1)
    again_sd = again.to_release_state_dict(layer_id=1, names=names, dtype=dtype)
    assert sd.keys() == again_sd.keys()
    # written again, the weights read back are the same values (fp8 bytes may differ where a block's largest
    # code is 224: the smallest scale that fits the decoded block is then half the first one's)
    third = EngramV41.from_release_state_dict(again_sd, cfg, layer_id=1)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), third.state_dict().values()))
    if dtype != "fp8_e4m3":
        assert all(torch.equal(sd[k], again_sd[k]) for k in sd)
    if dtype == "float32":
        assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), again.state_dict().values()))
    if dtype == "fp8_e4m3":  # the library's encoder writes what this test's encoder writes
        prefix = ("model." if names == "transformers" else "") + "layers.1.engram."
        codes, scales = encode(module.embedding.weight.detach()[: sd[prefix + "embed.weight"].shape[0]], (1, 32))
        assert torch.equal(sd[prefix + "embed.weight"].view(torch.uint8), codes.view(torch.uint8))
        assert torch.equal(sd[prefix + "embed.scale"].view(torch.uint8), scales.view(torch.uint8))


@pytest.mark.parametrize("change, match", [
    (lambda sd: sd.pop("layers.1.engram.k_weight"), r"missing \['layers.1.engram.k_weight'\]"),
    (lambda sd: sd.__setitem__("layers.1.engram.bias", torch.zeros(3)), r"unexpected \['layers.1.engram.bias'\]"),
    (lambda sd: sd.__setitem__("layers.1.engram.embed.weight", torch.zeros(10, 32)),
     r"layers.1.engram.embed.weight has shape \(10, 32\), our layout of layer 1 needs"),
    (lambda sd: sd.__setitem__("layers.1.engram.wkv.weight", torch.zeros(96, 63)), r"wkv.weight has shape \(96, 63\)"),
    (lambda sd: sd.__setitem__("layers.1.engram.q_weight", torch.zeros(2, 31)), "must both be"),
    (lambda sd: sd.pop("layers.1.engram.embed.scale"), "embed.weight is fp8 but its scale tensor is missing"),
    (lambda sd: sd.__setitem__("layers.1.engram.wkv.scale", torch.zeros(5, 5, dtype=torch.uint8)),
     "wkv.weight: 5 scales do not cut 96 values"),
    (lambda sd: sd.__setitem__("layers.1.engram.q_weight", torch.zeros(2, 32, dtype=torch.int32)), "dtype torch.int32"),
])
def test_a_mismatch_is_refused_by_name(change, match):
    cfg = config()
    sd = release(cfg, 1, 2, 32, "fp8", "deepseek")
    change(sd)
    with pytest.raises(ValueError, match=match):
        EngramV41.from_release_state_dict(sd, cfg, layer_id=1)


def test_the_wrong_layer_or_variant_is_refused():
    cfg = config()
    sd = release(cfg, 1, 2, 32, "fp32", "deepseek")
    with pytest.raises(ValueError, match="no Engram layer 3 in this state dict"):
        EngramV41.from_release_state_dict(sd, cfg, layer_id=3)
    with pytest.raises(ValueError, match="say which one with layer_id"):
        EngramV41.from_release_state_dict(sd, cfg)
    with pytest.raises(ValueError, match="variant='v4.1'"):
        EngramV41.from_release_state_dict(sd, EngramConfig(layer_ids=[1]), layer_id=1)


# -- left padding reads as DEAD ------------------------------------------------------------------------------
def v41_lm(G=2) -> EngramLM:
    base = get_preset("tiny-engram-v41")
    cfg = ModelConfig(backbone=dataclasses.replace(base.backbone, hc_mult=G), engram=base.engram)
    torch.manual_seed(0)
    model = EngramLM(cfg).eval()
    with torch.no_grad():
        for layer in model.engram_layers.values():
            layer.q_weight.normal_(1.0, 0.3)
            layer.k_weight.normal_(1.0, 0.3)
            layer.wkv.weight.normal_(0, 0.2)
    return model


@pytest.mark.parametrize("pad_token", [0, 7])
def test_left_padding_hashes_as_dead_and_passes_through(pad_token):
    """In a padded prompt the pad positions hash as the all-pad n-gram whatever token fills them, and the
    Engram layer leaves them as they came (the gate closed); real tokens decode as each row alone."""
    model = v41_lm()
    ids, starts = left_pad([[5, 6, 9, 10, 11], [12, 13]], pad_id=pad_token)
    seen = {}
    layer = model.engram_layers[1]
    handle = layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], ids=args[1], y=out))
    cache = model.new_cache(starts, ids.shape[1] + 4)
    with torch.no_grad():
        model(ids, cache=cache)
    handle.remove()
    pad = torch.arange(ids.shape[1])[None] < starts[:, None]  # row 1's first three positions
    assert pad.sum() == 3
    dead_alone = model.hasher(torch.tensor([[0]]), dead=torch.tensor([[True]]))[1][0, 0]  # a lone DEAD position
    assert all(torch.equal(seen["ids"][1, t], dead_alone) for t in range(3))
    assert torch.equal(seen["y"][pad], seen["x"][pad])


@pytest.mark.parametrize("G", [1, 2])
@pytest.mark.parametrize("chunk", [1, 3])
def test_decode_equals_prefill_with_left_padding(G, chunk):
    assert decode_error(v41_lm(G), chunk, pad_id=0) < 1e-5
    assert decode_error(v41_lm(G), chunk, pad_id=7) < 1e-5  # a pad token that is not the tables' pad id

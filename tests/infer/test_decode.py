"""Incremental decoding equals one full forward (docs/PITFALLS.md §5, §6), for every model kind and G."""

import dataclasses

import pytest
import torch

from support import assert_greedy_matches_recomputing, decode_error

from engram.config import ModelConfig, OverEncodingConfig
from engram.infer import generate, left_pad, sample_next
from engram.model.transformer import EngramLM
from engram.presets import get_preset


def variant(name: str, hc_mult: int | None = None, overencoding: OverEncodingConfig | None = None,
            **engram) -> ModelConfig:
    config = get_preset(name)
    bb = config.backbone if hc_mult is None else dataclasses.replace(config.backbone, hc_mult=hc_mult)
    eg = config.engram
    if eg is not None:
        eg = dataclasses.replace(eg, **engram)
    return ModelConfig(backbone=bb, engram=eg, overencoding=overencoding)


OVERENCODING = OverEncodingConfig(engram_vocab_size=[1009, 1013, 1019], max_ngram_size=4, n_embed_per_ngram=32,
                                  n_head_per_ngram=4, pad_id=2)


CASES = {
    "dense": variant("tiny-dense"),
    "moe": variant("tiny-moe"),
    "engram-G2": variant("tiny-engram"),
    "engram-G1": variant("tiny-engram", 1),
    "engram-4gram-two-layers": variant("tiny-engram", 2, max_ngram_size=4, engram_vocab_size=[1009, 1013, 1019],
                                       layer_ids=[0, 2]),
    "engram-no-conv-shared-keys": variant("tiny-engram", short_conv=False, branch_keys=False),
    "engram-no-gate-raw-ids": variant("tiny-engram", gate="none", compress=False),
    "engram-v41": variant("tiny-engram-v41"),
    "engram-v41-G1-barriers": variant("tiny-engram-v41", 1, barrier_ids=list(range(3, 60))),  # ~1 token in 9
    "overencoding-4gram": variant("tiny-moe", overencoding=OVERENCODING),
    "overencoding-and-engram": variant("tiny-engram", overencoding=dataclasses.replace(
        OVERENCODING, engram_vocab_size=[1009], max_ngram_size=2)),
}


def build(config: ModelConfig) -> EngramLM:
    torch.manual_seed(0)
    model = EngramLM(config).eval()
    with torch.no_grad():  # trained-looking conv and MoE bias, so the decode state really matters
        for layer in model.engram_layers.values():
            if getattr(layer, "conv_weight", None) is not None:
                layer.conv_weight.normal_()
        for moe in model.moe_layers():
            moe.expert_bias.normal_(std=0.1)
        if model.overencoding is not None:  # its tables start at zero; trained rows are not
            model.overencoding.embedding.weight.normal_()
    return model


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("chunk", [1, 3])
def test_decode_equals_full_forward(name, chunk):
    worst = decode_error(build(CASES[name]), chunk)  # left-padded prompts, one shorter than the lookbacks
    assert worst <= 1e-5, worst


@pytest.mark.parametrize("name", ["engram-G2", "moe", "engram-v41-G1-barriers"])
def test_greedy_generation_matches_recomputing_the_prefix(name):
    assert_greedy_matches_recomputing(build(CASES[name]))


def test_stop_ids_and_streaming():
    model = build(CASES["engram-G2"])
    first = generate(model, [5, 6, 7], 6, temperature=0.0)
    streamed = []
    out = generate(model, [5, 6, 7], 6, temperature=0.0, stop_ids={first[2]}, on_token=streamed.append)
    assert out == first[:3] == streamed


def test_sampling_is_seeded():
    model = build(CASES["dense"])
    a = generate(model, [1, 2, 3], 8, temperature=1.0, seed=4)
    assert a == generate(model, [1, 2, 3], 8, temperature=1.0, seed=4)


def test_sample_next_filters():
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    assert sample_next(logits, 0.0).tolist() == [1]
    draws = {int(sample_next(logits, 1.0, top_k=2, generator=torch.Generator().manual_seed(i))) for i in range(50)}
    assert draws <= {1, 2}
    draws = {int(sample_next(logits, 1.0, top_p=0.5, generator=torch.Generator().manual_seed(i))) for i in range(50)}
    assert draws == {1}
    with pytest.raises(ValueError):
        sample_next(logits, -1.0)


def test_cache_errors():
    model = build(CASES["engram-G2"])
    cache = model.new_cache(torch.tensor([0]), 4)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache)
        with pytest.raises(ValueError, match="cache holds 4 positions"):
            model(torch.tensor([[1, 2]]), cache=cache)
        with pytest.raises(ValueError, match="neither boundary"):
            model(torch.tensor([[1]]), labels=torch.tensor([[1]]), cache=cache)
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []], 0)

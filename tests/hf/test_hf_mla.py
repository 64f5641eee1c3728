"""engram.hf with multi-head latent attention: generate() (greedy and beams) through the EngramCache, whose
row operations now move MLA's latent and RoPE-key buffers, equals our own decoder; a saved folder loads
as the same MLA model."""

import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

import engram.hf as H  # noqa: E402
from support import roughen_decode_state  # noqa: E402
from engram.config import MLAConfig, YarnConfig  # noqa: E402
from engram.infer import generate_batch, left_pad  # noqa: E402
from engram.model.transformer import EngramLM  # noqa: E402
from engram.presets import get_preset  # noqa: E402

PROMPTS = [[5, 17, 99, 4], [300, 8, 9, 10, 11, 12, 13, 14]]
PAD = 2


@pytest.fixture(scope="module")
def models():
    config = get_preset("tiny-engram")
    mla = MLAConfig(q_lora_rank=20, kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10)
    config = dataclasses.replace(config, backbone=dataclasses.replace(
        config.backbone, mla=mla, n_kv_heads=None, rope_scaling=YarnConfig(factor=4.0, original_max_seq_len=8)))
    torch.manual_seed(0)
    model = EngramLM(config).eval()
    roughen_decode_state(model)
    return model, H.to_hf(model)


def our_beam_search(model: EngramLM, prompts: list[list[int]], beams: int, steps: int) -> tuple[list, torch.Tensor]:
    """Beam search on ``model.new_cache``, reordering it with ``select_rows``: per prompt, its ``beams``
    continuations, best first, and their summed log-probabilities (B*beams,)."""
    ids, starts = left_pad(prompts, PAD)
    B, V = len(prompts), model.config.backbone.vocab_size
    cache = model.new_cache(starts.repeat_interleave(beams), ids.shape[1] + steps)
    scores = torch.tensor([0.0] + [-1e9] * (beams - 1)).repeat(B)  # (B*beams,): all beams start as one
    seqs = torch.zeros(B * beams, 0, dtype=torch.long)
    with torch.no_grad():
        logits = model(ids.repeat_interleave(beams, 0), cache=cache).logits[:, -1]  # (B*beams, V)
        for step in range(steps):
            total = (scores[:, None] + logits.float().log_softmax(-1)).view(B, beams * V)
            top, flat = total.topk(beams, dim=-1)  # (B, beams)
            rows = (torch.arange(B)[:, None] * beams + flat // V).flatten()  # the beam each one extends
            tokens, scores = (flat % V).flatten(), top.flatten()
            seqs = torch.cat([seqs[rows], tokens[:, None]], dim=1)
            if step + 1 < steps:
                cache.select_rows(rows)
                logits = model(tokens[:, None], cache=cache).logits[:, -1]
    return seqs.tolist(), scores  # (B*beams) rows, prompt by prompt


def test_generate_greedy_and_with_beams_equals_our_decoder(models):
    model, hf = models
    ids, starts = left_pad(PROMPTS, PAD)
    mask = (torch.arange(ids.shape[1])[None] >= starts[:, None]).long()  # (B, T) left padding
    settings = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, pad_token_id=PAD, do_sample=False)
    greedy = hf.generate(**settings)[:, ids.shape[1]:]
    assert greedy.tolist() == generate_batch(model, PROMPTS, 8, temperature=0.0)
    # both beams and their scores (summed log-probabilities: no length penalty), so every reorder counts
    beams = dict(num_beams=2, num_return_sequences=2, length_penalty=0.0, output_scores=True,
                 return_dict_in_generate=True)
    cached = hf.generate(**settings, **beams)
    sequences, scores = our_beam_search(model, PROMPTS, 2, 8)
    assert cached.sequences[:, ids.shape[1]:].tolist() == sequences
    torch.testing.assert_close(cached.sequences_scores, scores, atol=1e-4, rtol=0)
    uncached = hf.generate(**settings, **beams, use_cache=False)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(cached.sequences_scores, uncached.sequences_scores, atol=1e-4, rtol=0)


def test_a_saved_folder_loads_as_mla_with_the_same_logits(models, tmp_path):
    from transformers import AutoModelForCausalLM

    model, hf = models
    hf.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.model.config == model.config and loaded.model.config.backbone.mla is not None
    ids = torch.randint(3, 512, (1, 12))
    assert torch.equal(loaded(ids, use_cache=False).logits, model(ids).logits)

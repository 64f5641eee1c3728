"""Qwen4-Exp's PLE hashing as a scheme of NgramHasher (``hash_scheme="qwen4exp"``, engram.compat.qwen4exp),
bit for bit against transformers' own ``Qwen4ExpTextNGramEmbedding``: multipliers, primes, offsets and padded
rows, and the row ids of every position of random streams with EOS in them, hashed in one pass, in chunks
and token by token through transformers' cache."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")

from transformers.cache_utils import DynamicCache  # noqa: E402
from transformers.models.qwen4_exp.configuration_qwen4_exp import Qwen4ExpTextConfig  # noqa: E402
from transformers.models.qwen4_exp.modeling_qwen4_exp import Qwen4ExpTextNGramEmbedding  # noqa: E402

from engram.compat.qwen4exp import ple_hasher, ple_layer_ids  # noqa: E402


def text_config(ngram_size=3, heads=2, ple=(1, 3), layers=4, vocab=300, base=1000, seed=1234, eos=2, multiple=128):
    return Qwen4ExpTextConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
        hc_count=2, hc_lowrank=4, ple_layer_ids=list(ple), ple_embed_dim=4 * (ngram_size - 1) * heads,
        ngram_size=ngram_size, heads_per_ngram=heads, ngram_vocab_size_base=base, seed=seed,
        make_ngram_vocab_size_divisible_by=multiple, eos_token_id=eos, pad_token_id=0,
        layer_types=["linear_attention"] * layers)


def theirs(config) -> dict[int, Qwen4ExpTextNGramEmbedding]:
    """transformers' n-gram embedding of every PLE layer, keyed by 0-based block index."""
    return {lid: Qwen4ExpTextNGramEmbedding(config, config.ple_embed_dim, lid, index)
            for index, lid in enumerate(ple_layer_ids(config))}


def their_ids(embedding, ids, cache=None) -> torch.Tensor:
    """The (B, T, H) rows transformers' embedding reads for ``ids`` (offsets included)."""
    seen = []
    hook = embedding.ngram_embedding.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        embedding(ids, cache)
    finally:
        hook.remove()
    return seen[0]


def stream(B, T, vocab, eos, seed, eos_rate=0.15):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    return torch.where(torch.rand(B, T, generator=g) < eos_rate, torch.full_like(ids, eos), ids)


CONFIGS = [dict(), dict(ngram_size=2, heads=3), dict(ngram_size=4, heads=1, ple=(2, 3, 4)), dict(ple=(2,), seed=7),
           dict(vocab=1000, base=5003, multiple=64, eos=999)]


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_the_layout_is_transformers(kwargs):
    config = text_config(**kwargs)
    hasher = ple_hasher(config)
    for lid, emb in theirs(config).items():
        assert hasher.multipliers[lid].tolist() == emb.layer_multipliers.tolist()
        assert list(hasher.geometry[lid].sizes) == emb.ngram_heads_vocab_sizes.tolist()
        assert list(hasher.geometry[lid].offsets) == emb.ngram_heads_offsets.tolist()
        assert hasher.geometry[lid].num_rows == emb.ngram_embedding.num_embeddings  # padded rows included
        assert hasher.config.head_dim == emb.ngram_embedding.embedding_dim


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_one_pass_hashes_every_position_as_transformers_does(kwargs):
    config = text_config(**kwargs)
    hasher, eos = ple_hasher(config), config.eos_token_id
    ids = stream(3, 40, config.vocab_size, eos, seed=len(str(kwargs)))
    ids[0, 0], ids[1, 5:7], ids[2, -1] = eos, eos, eos  # at the start, twice in a row, at the end
    ours = hasher(ids)
    for lid, emb in theirs(config).items():
        assert torch.equal(ours[lid] + hasher.offsets[lid], their_ids(emb, ids)), lid


@pytest.mark.parametrize("kwargs", CONFIGS[:3])
@pytest.mark.parametrize("chunks", [[40], [1] * 40, [7, 1, 1, 13, 2, 16]])
def test_chunks_and_tokens_hash_as_transformers_cache_does(kwargs, chunks):
    """transformers keeps the last N-1 raw ids in its cache; our history does the same job."""
    config = text_config(**kwargs)
    hasher, eos, n = ple_hasher(config), config.eos_token_id, config.ngram_size - 1
    ids = stream(2, 40, config.vocab_size, eos, seed=sum(chunks))
    embeddings, cache = theirs(config), DynamicCache(config=config)
    whole = hasher(ids)
    history = torch.full((2, n), hasher.compressed_pad_id, dtype=torch.long)  # an empty history is EOS
    start = 0
    for size in chunks:
        part = ids[:, start:start + size]
        ours, history = hasher.hash_with_history(part, history)
        for lid, emb in embeddings.items():
            expected = their_ids(emb, part, cache)
            assert torch.equal(ours[lid] + hasher.offsets[lid], expected), (lid, start)
            assert torch.equal(ours[lid], whole[lid][:, start:start + size])  # and equal to the one pass
        start += size


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=24), st.integers(2, 4), st.integers(0, 2**31 - 1))
def test_any_stream_any_order(tokens, ngram_size, seed):
    """Small vocabularies make EOS frequent and n-grams repeat: every position still hashes as transformers'."""
    config = text_config(ngram_size=ngram_size, heads=2, vocab=10, base=50, seed=seed, eos=3, ple=(1,))
    ids = torch.tensor([tokens])
    (lid, emb), = theirs(config).items()
    hasher = ple_hasher(config)
    assert torch.equal(hasher(ids)[lid] + hasher.offsets[lid], their_ids(emb, ids))


def test_the_scheme_is_recorded_in_the_layout_and_refused_when_mixed_up():
    from engram.hashing import NgramHasher
    from engram.model.table_config import TableConfig
    from engram.tokenizer import CompressedTokenizer

    hasher = ple_hasher(text_config())
    layout = hasher.layout()
    assert layout["hash_scheme"] == "qwen4exp" and layout["row_multiple"] == 128
    deepseek = NgramHasher(TableConfig(**{**hasher.config.to_dict(), "hash_scheme": "deepseek"}),
                           CompressedTokenizer.identity(300), hasher.layer_ids)
    with pytest.raises(ValueError, match="hash_scheme"):
        deepseek.check_layout(layout)
    with pytest.raises(ValueError, match="TableConfig.compress: the qwen4exp scheme hashes raw ids"):
        TableConfig(hash_scheme="qwen4exp")
    with pytest.raises(ValueError, match="one base size"):
        TableConfig(hash_scheme="qwen4exp", compress=False, engram_vocab_size=[100, 200])

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from support import devices
from engram.config import EngramConfig
from engram.hashing import (NgramHasher, is_prime, layer_multipliers, multiplier_bound, next_prime,
                            table_primes)
from engram.tokenizer import CompressedTokenizer


def _golden_config(raw: dict) -> EngramConfig:
    return EngramConfig(**raw, n_embed_per_ngram=raw["n_head_per_ngram"] * 8)


# -- parity with DeepSeek's reference --------------------------------------------------------------
@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("which", [0, 1])
def test_golden_hashes(deepseek_compressed, golden, which, device):
    entry = golden["configs"][which]
    hasher = NgramHasher(_golden_config(entry["config"]), deepseek_compressed).to(device)
    assert hasher.compressed_pad_id == entry["compressed_pad_id"]
    assert {str(k): v.tolist() for k, v in hasher.multipliers.items()} == entry["multipliers"]
    assert {str(k): v for k, v in hasher.primes.items()} == entry["primes"]
    for case in entry["cases"]:
        ids = torch.tensor([case["input_ids"]], device=device)
        assert hasher.compress(ids)[0].tolist() == case["compressed_ids"]
        out = hasher(ids)
        assert sorted(out) == sorted(int(k) for k in case["hash_ids"])
        for layer_id, hashes in out.items():
            assert hashes.device.type == device and hashes.dtype == torch.int64
            assert hashes[0].tolist() == case["hash_ids"][str(layer_id)], (case["text"], layer_id)


def test_golden_batched_with_left_context(deepseek_compressed, golden):
    """Batching cases of different lengths (right-padded) leaves each row's valid prefix unchanged."""
    entry = golden["configs"][0]
    hasher = NgramHasher(_golden_config(entry["config"]), deepseek_compressed)
    cases = entry["cases"]
    T = max(len(c["input_ids"]) for c in cases)
    batch = torch.full((len(cases), T), 2, dtype=torch.long)
    for i, c in enumerate(cases):
        batch[i, : len(c["input_ids"])] = torch.tensor(c["input_ids"])
    out = hasher(batch)
    for i, c in enumerate(cases):
        n = len(c["input_ids"])
        for lid in hasher.layer_ids:
            assert out[lid][i, :n].tolist() == c["hash_ids"][str(lid)]


# -- a straightforward reference written from docs/ALGORITHM.md §2 --------------------------------------------
def reference_hash(raw_ids, lookup, config, multipliers, primes, boundary=None):
    """Pure Python ints, one position at a time, exactly as docs/ALGORITHM.md §2 steps 1-4 read."""
    pad = int(lookup[config.pad_id])
    N = config.max_ngram_size
    out = []
    for b, row in enumerate(raw_ids):
        comp = [int(lookup[config.pad_id if i < 0 else i]) for i in row]
        starts = [bool(boundary[b][t]) if boundary is not None else False for t in range(len(row))]
        per_t = []
        for t in range(len(row)):
            # x'_{t-k}, pad before the sequence start and across any document start in (t-k, t]
            xs = []
            for k in range(N):
                crossed = t - k < 0 or any(starts[t - k + 1: t + 1])
                xs.append(pad if crossed else comp[t - k])
            heads = []
            mix = xs[0] * multipliers[0]
            for n in range(2, N + 1):
                mix ^= xs[n - 1] * multipliers[n - 1]
                for p in primes[n - 2]:
                    heads.append(mix % p)
            per_t.append(heads)
        out.append(per_t)
    return out


@st.composite
def hashing_case(draw):
    raw_vocab = draw(st.integers(4, 300))
    comp_vocab = draw(st.integers(2, raw_vocab))
    lookup = np.array(draw(st.lists(st.integers(0, comp_vocab - 1), min_size=raw_vocab, max_size=raw_vocab)))
    lookup[:comp_vocab] = np.arange(comp_vocab)  # every compressed id is used
    N = draw(st.integers(2, 5))
    config = EngramConfig(
        engram_vocab_size=draw(st.lists(st.integers(2, 5000), min_size=N - 1, max_size=N - 1)),
        max_ngram_size=N,
        n_head_per_ngram=(K := draw(st.integers(1, 4))),
        n_embed_per_ngram=K * 2,
        layer_ids=draw(st.lists(st.integers(0, 40), min_size=1, max_size=3, unique=True)),
        pad_id=draw(st.integers(0, raw_vocab - 1)),
        seed=draw(st.integers(0, 2**31)),
    )
    B, T = draw(st.integers(1, 3)), draw(st.integers(1, 12))
    ids = draw(st.lists(st.lists(st.integers(-3, raw_vocab - 1), min_size=T, max_size=T), min_size=B, max_size=B))
    boundary = draw(st.none() | st.lists(st.lists(st.booleans(), min_size=T, max_size=T), min_size=B, max_size=B))
    return CompressedTokenizer(lookup, comp_vocab), config, ids, boundary


@settings(max_examples=150, deadline=None)
@given(hashing_case())
def test_matches_spec_reference(case):
    tok, config, ids, boundary = case
    hasher = NgramHasher(config, tok)
    mask = None if boundary is None else torch.tensor(boundary)
    out = hasher(torch.tensor(ids), mask)
    for lid in config.layer_ids:
        m = [int(x) for x in hasher.multipliers[lid]]
        expected = reference_hash(ids, tok.lookup.tolist(), config, m, hasher.primes[lid], boundary)
        assert out[lid].tolist() == expected
        assert (out[lid] >= 0).all()
        rows = torch.tensor([p for order in hasher.primes[lid] for p in order])
        assert (out[lid] < rows).all()


@settings(max_examples=60, deadline=None)
@given(hashing_case())
def test_packed_equals_documents_hashed_alone(case):
    """With a boundary mask, hashing a packed row equals hashing each document on its own."""
    tok, config, ids, _ = case
    hasher = NgramHasher(config, tok)
    row = torch.tensor(ids[0])[None]
    T = row.shape[1]
    cuts = sorted({0, *(t for t in range(1, T) if (t * 7919 + config.seed) % 3 == 0)})
    boundary = torch.zeros(1, T, dtype=torch.bool)
    boundary[0, cuts] = True
    packed = hasher(row, boundary)
    for start, end in zip(cuts, cuts[1:] + [T]):
        alone = hasher(row[:, start:end])
        for lid in config.layer_ids:
            assert torch.equal(packed[lid][:, start:end], alone[lid])


# -- properties of the layout ---------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(st.integers(2, 2**40), st.integers(0, 2**32), st.integers(0, 100), st.integers(2, 6))
def test_products_stay_in_int64(vocab, seed, layer, N):
    m = layer_multipliers(seed, layer, N, vocab)
    assert m.dtype == np.int64 and (m % 2 == 1).all() and (m > 0).all()
    assert all(int(x) * (vocab - 1) < 2**63 for x in m)
    assert int(multiplier_bound(vocab)) >= 1


def test_multiplier_width_matters():
    """A 32-bit mix would give other hashes (docs/PITFALLS.md §1): the multipliers need more than 32 bits."""
    m = layer_multipliers(0, 1, 3, 99092)
    assert (m > 2**32).any()


def test_primes_are_distinct_prime_and_above_nominal():
    primes = table_primes([1000, 2000, 3000], 4, [0, 2, 5])
    flat = [p for lid in primes for order in primes[lid] for p in order]
    assert len(flat) == len(set(flat)) == 3 * 3 * 4
    assert all(is_prime(p) for p in flat)
    for lid in primes:
        for size, order in zip([1000, 2000, 3000], primes[lid]):
            assert all(p >= size for p in order) and order == sorted(order)


def test_prime_order_depends_on_layer_order():
    """One global search (docs/PITFALLS.md §4): reordering layers changes which layer gets which primes."""
    a = table_primes([100, 100], 2, [0, 1])
    b = table_primes([100, 100], 2, [1, 0])
    assert a[0] == b[1] and a[1] == b[0] and a[0] != a[1]


def test_next_prime_and_is_prime():
    assert [p for p in range(30) if is_prime(p)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]
    assert next_prime(10, set()) == 11 and next_prime(10, {11}) == 13 and next_prime(11, set()) == 13


def test_offsets_partition_the_flat_table(deepseek_compressed, golden):
    hasher = NgramHasher(_golden_config(golden["configs"][1]["config"]), deepseek_compressed)
    for lid in hasher.layer_ids:
        sizes = [p for order in hasher.primes[lid] for p in order]
        assert hasher.offsets[lid].tolist() == list(np.cumsum([0] + sizes[:-1]))
        assert hasher.table_rows(lid) == sum(sizes)


# -- ids and errors ------------------------------------------------------------------------------
def _small_hasher(**overrides):
    config = EngramConfig(**{"engram_vocab_size": [50, 60], "n_head_per_ngram": 2, "n_embed_per_ngram": 4,
                             "layer_ids": [0, 1], "pad_id": 1, **overrides})
    return NgramHasher(config, CompressedTokenizer.identity(20))


def test_negative_ids_hash_as_pad():
    hasher = _small_hasher()
    ids = torch.tensor([[5, -100, 7, -1]])
    padded = torch.tensor([[5, 1, 7, 1]])
    for lid, h in hasher(ids).items():
        assert torch.equal(h, hasher(padded)[lid])


def test_out_of_range_id_raises():
    with pytest.raises(ValueError, match="token id 20 "):
        _small_hasher()(torch.tensor([[1, 20]]))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        _small_hasher()(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="boundary mask shape"):
        _small_hasher()(torch.tensor([[1, 2]]), torch.tensor([[True]]))
    with pytest.raises(ValueError, match="pad_id"):
        NgramHasher(EngramConfig(pad_id=30, layer_ids=[0]), CompressedTokenizer.identity(20))


def test_hashes_are_causal():
    hasher = _small_hasher()
    ids = torch.randint(0, 20, (2, 16))
    changed = ids.clone()
    changed[:, 9:] = torch.randint(0, 20, (2, 7))
    for lid in hasher.layer_ids:
        assert torch.equal(hasher(ids)[lid][:, :9], hasher(changed)[lid][:, :9])


def test_layout_round_trip_and_mismatch(tmp_path):
    hasher = _small_hasher()
    stored = json.loads(json.dumps(hasher.layout()))
    hasher.check_layout(stored)  # identical: no error
    _small_hasher().check_layout(stored)  # rebuilt the same way: same layout
    with pytest.raises(ValueError, match="multipliers"):
        _small_hasher(seed=1).check_layout(stored)
    with pytest.raises(ValueError, match="primes"):
        _small_hasher(layer_ids=[1, 0]).check_layout(stored)
    other_tok = NgramHasher(hasher.config, CompressedTokenizer(np.arange(20) % 19, 19))
    with pytest.raises(ValueError, match="compressed_vocab_size"):
        other_tok.check_layout(stored)
    with pytest.raises(ValueError):
        hasher.check_layout("not a dict")


def test_buffers_follow_the_module_but_are_not_weights():
    hasher = _small_hasher()
    assert hasher.state_dict() == {}
    assert {name for name, _ in hasher.named_buffers()} == {"lookup", "multiplier_table", "modulus_table", "barrier_table"}


def test_no_engram_layers_hash_to_nothing():
    hasher = _small_hasher(layer_ids=[])
    assert hasher(torch.tensor([[1, 2]])) == {}


def test_float_and_bool_ids_are_refused_not_truncated():
    hasher = _small_hasher()
    with pytest.raises(ValueError, match="integer"):
        hasher(torch.tensor([[0.5, 3.7]]))
    with pytest.raises(ValueError, match="integer"):
        hasher(torch.tensor([[True, False]]))


def test_narrow_integer_dtypes_hash_like_int64():
    hasher = _small_hasher()
    ids = torch.tensor([[3, -1, 7, 19]])
    for dtype in (torch.int32, torch.int16):
        for lid, h in hasher(ids.to(dtype)).items():
            assert torch.equal(h, hasher(ids)[lid])

"""Every tier gives exactly the logits and greedy tokens of the untouched device model."""

import threading

import pytest
import torch

from engram.infer import generate_batch
from engram.storage import OffloadedEmbedding, apply_storage

PROMPTS = [[5, 9, 2, 7], [11, 3, 8, 8, 1, 40, 41, 7, 300, 2, 17], [100]]  # different lengths: left padding
TIERS = [("host", 0, "lru"), ("disk", 0, "lru"), ("host", 40, "lru"), ("host", 40, "lfu"),
         ("disk", 40, "lru"), ("disk", 40, "lfu"), ("disk", 100_000, "lru")]


@pytest.fixture(scope="module")
def reference(fresh_model):
    model = fresh_model()
    ids = torch.randint(0, 512, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    return ids, logits, generate_batch(model, PROMPTS, 12, temperature=0)


def test_device_tier_leaves_the_model_alone(fresh_model, reference):
    model = fresh_model()
    before = model.engram_layers[1].embedding
    with apply_storage(model, "device") as handle:
        assert model.engram_layers[1].embedding is before
        assert torch.equal(model(reference[0]).logits, reference[1])
        assert handle.stats()["layers"][1]["table_bytes"] == before.weight.numel() * 4


@pytest.mark.parametrize("tier,cache_rows,policy", TIERS)
def test_tier_is_exact(fresh_model, tables, reference, tier, cache_rows, policy):
    ids, logits, tokens = reference
    model = fresh_model()
    with apply_storage(model, tier, tables[1] if tier == "disk" else None, cache_rows, policy) as handle:
        emb = model.engram_layers[1].embedding
        assert isinstance(emb, OffloadedEmbedding)
        assert not any(n.endswith("embedding.weight") for n, _ in model.named_parameters())  # parameter freed
        with torch.no_grad():
            assert torch.equal(model(ids).logits, logits)
        assert generate_batch(model, PROMPTS, 12, temperature=0) == tokens
        stats = handle.stats()["layers"][1]
        assert emb.calls_prefetched >= 12  # forward consumed the background fetch, not a second gather
        if cache_rows:
            assert stats["hits"] + stats["misses"] == stats["rows_fetched"] and stats["hits"] > 0
            assert 0 < stats["hit_rate"] < 1
        if tier == "disk" and not cache_rows:
            assert stats["ram_bytes"] == 0
    # after close the model still answers (synchronous gathers) and no worker is left
    assert torch.equal(model(ids).logits, logits)
    assert not [t for t in threading.enumerate() if t.name.startswith("engram-prefetch")]


def test_forward_without_prefetch_gathers_synchronously(fresh_model, reference):
    ids, logits, _ = reference
    model = fresh_model()
    with apply_storage(model, "host", cache_rows=30):
        hash_ids = model.hash(ids)
        with torch.no_grad():
            out = model(ids, hash_ids=hash_ids).logits
        assert torch.equal(out, logits)
        emb = model.engram_layers[1].embedding
        stale = model.hash(ids[:, :5])[1]
        emb.prefetch(stale)  # never consumed: the next forward must still be right
        direct = emb(hash_ids[1])
        assert torch.equal(direct, torch.nn.functional.embedding(hash_ids[1] + emb.offsets, _table(fresh_model)))


def _table(fresh_model):
    return fresh_model().engram_layers[1].embedding.weight.detach()


def test_bad_arguments(fresh_model, tables):
    with pytest.raises(ValueError, match="tier"):
        apply_storage(fresh_model(), "gpu")
    with pytest.raises(ValueError, match="tables_dir"):
        apply_storage(fresh_model(), "disk")
    with pytest.raises(ValueError, match="row cache"):
        apply_storage(fresh_model(), "device", cache_rows=5)
    model = fresh_model()
    with apply_storage(model, "host"):
        with pytest.raises(ValueError, match="already offloaded"):
            apply_storage(model, "disk", tables[1])

"""RowCache returns exactly what its store returns and never evicts a row its own call needs."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.storage import HostStore, RowCache

ROWS, DIM = 64, 3


def make_store() -> HostStore:
    return HostStore(torch.arange(ROWS * DIM, dtype=torch.float32).view(ROWS, DIM), pin=False)


def request(ids) -> torch.Tensor:
    return torch.tensor(sorted(set(ids)), dtype=torch.long)


@settings(max_examples=60, deadline=None)
@given(stream=st.lists(st.lists(st.integers(0, ROWS - 1), min_size=1, max_size=12), min_size=1, max_size=25),
       capacity=st.integers(1, 10), policy=st.sampled_from(["lru", "lfu"]))
def test_cache_matches_store_and_keeps_the_current_request(stream, capacity, policy):
    store = make_store()
    cache = RowCache(store, capacity, policy)
    for ids in stream:
        rows = request(ids)[torch.randperm(len(set(ids)))]  # any order, unique
        assert torch.equal(cache.gather(rows), store.gather(rows))
        resident = cache.resident(rows)
        if rows.numel() <= capacity:
            assert bool(resident.all()), "a row of the current call was evicted by that call"
        else:
            assert int(resident.sum()) == capacity
        assert int((cache.slot_row >= 0).sum()) == cache.keys.numel() <= capacity
        assert torch.equal(cache.keys, cache.keys.sort().values)
        assert torch.equal(cache.slots[cache.key_slot], store.gather(cache.keys))  # slots hold their rows
    assert cache.hits + cache.misses == sum(len(set(ids)) for ids in stream)


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_a_hit_refreshes(policy):
    cache = RowCache(make_store(), 3, policy)
    for row in (0, 1, 2):
        cache.gather(torch.tensor([row]))
    cache.gather(torch.tensor([0]))  # hit: 0 is now the most recent (and, for LFU, most frequent)
    cache.gather(torch.tensor([3]))  # must evict 1, the oldest untouched row, not 0
    assert cache.resident(torch.tensor([0, 1, 2, 3])).tolist() == [True, False, True, True]
    assert (cache.hits, cache.misses, cache.evictions) == (1, 4, 1)
    assert cache.hit_rate == pytest.approx(0.2)


def test_lfu_keeps_frequent_rows():
    cache = RowCache(make_store(), 2, "lfu")
    for _ in range(3):
        cache.gather(torch.tensor([7]))
    cache.gather(torch.tensor([8]))
    cache.gather(torch.tensor([9]))  # 8 (one use) goes, 7 (three uses) stays although older
    assert cache.resident(torch.tensor([7, 8, 9])).tolist() == [True, False, True]


def test_request_larger_than_capacity_is_still_exact():
    store = make_store()
    cache = RowCache(store, 4, "lru")
    rows = torch.arange(10, 30)
    assert torch.equal(cache.gather(rows), store.gather(rows))
    assert cache.keys.numel() == 4
    with pytest.raises(ValueError, match="policy"):
        RowCache(store, 4, "fifo")

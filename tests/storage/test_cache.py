"""RowCache returns exactly what its store returns, never evicts a row its own call needs, and evicts
the least recently (LRU) or least frequently (LFU) used rows first."""

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


def scores(cache: RowCache) -> dict[int, tuple[int, int]]:
    """row -> what eviction ranks it by (lower goes first): LRU the last use, LFU (uses, last use)."""
    rows, slots = cache.resident_rows()
    last, count = cache.last_used[slots.numpy()].tolist(), cache.count[slots.numpy()].tolist()
    if cache.policy == "lru":
        return {r: (0, t) for r, t in zip(rows.tolist(), last)}
    return {r: (c, t) for r, c, t in zip(rows.tolist(), count, last)}


@settings(max_examples=80, deadline=None)
@given(stream=st.lists(st.lists(st.integers(0, ROWS - 1), min_size=1, max_size=12), min_size=1, max_size=25),
       capacity=st.integers(1, 24), policy=st.sampled_from(["lru", "lfu"]),
       evict_fraction=st.sampled_from([0.0, 0.25, 0.5, 1.0]))
def test_cache_matches_store_and_keeps_the_current_request(stream, capacity, policy, evict_fraction):
    store = make_store()
    cache = RowCache(store, capacity, policy, evict_fraction=evict_fraction)
    for ids in stream:
        rows = request(ids)[torch.randperm(len(set(ids)))]  # any order, unique
        before, evictions_before = scores(cache), cache.evictions
        free_before = capacity - len(before)
        misses = sum(1 for r in set(ids) if r not in before)

        assert torch.equal(cache.gather(rows), store.gather(rows))

        resident = cache.resident(rows)
        if rows.numel() <= capacity:
            assert bool(resident.all()), "a row of the current call was evicted by that call"
        else:
            assert int(resident.sum()) == capacity
        keys, slots = cache.resident_rows()
        assert int((cache.slot_row >= 0).sum()) == keys.numel() <= capacity
        assert torch.equal(keys, keys.sort().values) and keys.unique().numel() == keys.numel()
        assert torch.equal(torch.from_numpy(cache.slot_row[slots.numpy()]), keys)
        assert torch.equal(cache.slots[slots], store.gather(keys))  # slots hold their rows

        after = set(keys.tolist())
        evicted = set(before) - after
        assert cache.evictions - evictions_before == len(evicted)
        assert not evicted & set(ids)
        if evicted:  # only a full cache evicts, and never a row used more recently (LFU: more often) than a survivor
            assert free_before < min(misses, capacity)
            survivors = (set(before) & after) - set(ids)
            if survivors:
                assert max(before[r] for r in evicted) <= min(before[r] for r in survivors)
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


def test_lfu_ranks_a_row_used_millions_of_times_last():
    """Uses and recency are two sort keys: a count past 2**23 once overflowed a packed int64 score,
    and the hottest row became the first victim."""
    cache = RowCache(make_store(), 2, "lfu")
    cache.gather(torch.tensor([1]))
    cache.gather(torch.tensor([0]))
    hot = int(cache.resident_rows()[1][0])  # the slot of row 0
    cache.count[hot] = 2**40  # as if row 0 had been hit 2**40 times
    cache.gather(torch.tensor([2]))  # a miss in a full cache: row 1 (one use) goes
    assert cache.resident(torch.tensor([0, 1, 2])).tolist() == [True, False, True]


def test_repeated_rows_are_refused():
    cache = RowCache(make_store(), 4, "lru")
    with pytest.raises(ValueError, match="unique"):
        cache.gather(torch.tensor([3, 5, 3]))
    assert cache.resident_rows()[0].numel() == 0  # refused before anything was cached


def test_a_full_cache_frees_a_batch_of_the_oldest_rows():
    cache = RowCache(make_store(), 8, "lru", evict_fraction=0.5)
    for row in range(8):
        cache.gather(torch.tensor([row]))
    cache.gather(torch.tensor([0]))  # refresh 0: now 1, 2, 3, 4 are the four oldest
    cache.gather(torch.tensor([20]))  # one miss in a full cache frees 8 * 0.5 = 4 slots
    assert cache.evictions == 4
    assert cache.resident(torch.arange(9)).tolist() == [True, False, False, False, False, True, True, True, False]
    for row in (21, 22, 23):  # the freed slots take the next misses without evicting again
        cache.gather(torch.tensor([row]))
    assert cache.evictions == 4 and len(cache.resident_rows()[0]) == 8


def test_request_larger_than_capacity_is_still_exact():
    store = make_store()
    cache = RowCache(store, 4, "lru")
    rows = torch.arange(10, 30)
    assert torch.equal(cache.gather(rows), store.gather(rows))
    assert cache.resident_rows()[0].numel() == 4
    with pytest.raises(ValueError, match="policy"):
        RowCache(store, 4, "fifo")
    with pytest.raises(ValueError, match="evict_fraction"):
        RowCache(store, 4, "lru", evict_fraction=1.5)

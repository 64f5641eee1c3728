"""Warm rows are gathered where the prefetch is asked, cold ones on the worker thread.

On a CPU model there is no device to overlap with, and handing a small gather to the thread costs about as
much as the gather: ``OffloadedEmbedding.prefetch`` gathers inline when its store says the rows are ``warm``
(RAM, a cache hit, disk pages in the page cache) and submits to the worker otherwise. Either way the rows,
and the model's outputs, are the same; only where the work runs changes."""

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.storage import OffloadedEmbedding, Prefetcher, RowCache
from engram.storage.stores import DiskStore, HostStore


class CountingPrefetcher(Prefetcher):
    def __init__(self):
        super().__init__()
        self.submitted = 0

    def submit(self, fn, *args):
        self.submitted += 1
        return super().submit(fn, *args)


class Cold:
    """A store wrapper that reports its rows cold (as a disk table after a reboot would)."""

    def __init__(self, store):
        self.store, self.format = store, store.format
        self.num_rows, self.dim, self.nbytes, self.ram_bytes = store.num_rows, store.dim, store.nbytes, 0
        self.warm_asked = []

    def warm(self, rows):
        self.warm_asked.append(rows.clone())
        return False

    def gather_encoded(self, rows, warm=None):
        assert not warm  # nobody found these rows warm
        return self.store.gather_encoded(rows)

    def gather(self, rows, warm=None):
        return self.format.decode(*self.gather_encoded(rows, warm))


def embedding(store, prefetcher, device="cpu"):
    return OffloadedEmbedding(store, torch.tensor([0, 40]), torch.device(device), torch.float32, prefetcher)


@settings(max_examples=25, deadline=None)
@given(ids=st.lists(st.integers(0, 39), min_size=2, max_size=40), fmt=st.sampled_from(["float32", "fp8_e4m3", "int8"]))
def test_warm_rows_are_gathered_inline_and_equal_the_threads(ids, fmt):
    table = torch.randn(80, 32, generator=torch.Generator().manual_seed(len(ids)))
    hash_ids = torch.tensor(ids[: len(ids) // 2 * 2]).view(1, -1, 2)  # (B, T, H=2)
    with CountingPrefetcher() as warm_pool, CountingPrefetcher() as cold_pool:
        warm = embedding(HostStore(table, format=fmt), warm_pool)
        cold_store = Cold(HostStore(table, format=fmt))
        cold = embedding(cold_store, cold_pool)
        for emb in (warm, cold):
            emb.prefetch(hash_ids)
        got_warm, got_cold = warm(hash_ids), cold(hash_ids)
        assert warm_pool.submitted == 0 and cold_pool.submitted == 1  # inline when warm, the thread when cold
        assert warm.calls_prefetched == cold.calls_prefetched == 1  # both served what prefetch fetched
        assert torch.equal(got_warm, got_cold)
        unique = torch.unique(hash_ids + torch.tensor([0, 40]))
        assert torch.equal(cold_store.warm_asked[0], unique)  # asked about exactly the rows it then gathers


def test_a_device_model_always_prefetches_on_the_thread():
    with CountingPrefetcher() as pool:
        emb = embedding(HostStore(torch.randn(80, 8)), pool, device="meta")  # any device that is not the CPU
        emb.prefetch(torch.tensor([[[1, 2]]]))
        assert pool.submitted == 1  # the worker's copy overlaps the device's compute
        emb.drop_pending()


def test_the_row_cache_is_warm_when_its_hits_cover_the_request():
    inner = Cold(HostStore(torch.randn(100, 8)))
    cache = RowCache(inner, 16)
    cache.gather(torch.tensor([3, 5, 7]))
    assert cache.warm(torch.tensor([3, 7]))  # every row cached: the cold store behind is never asked
    assert inner.warm_asked == []
    assert not cache.warm(torch.tensor([3, 9]))  # a miss: the store behind decides, for the missing row only
    assert [r.tolist() for r in inner.warm_asked] == [[9]]


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="posix_fadvise is Linux's")
def test_a_gather_found_warm_skips_the_disk_stores_own_check(tmp_path, monkeypatch):
    values = np.random.default_rng(0).standard_normal((5000, 16)).astype(np.float32)
    (tmp_path / "t.bin").write_bytes(values.tobytes())
    store = DiskStore(tmp_path / "t.bin", 5000, 16)
    checked, advised = [], []
    store._resident = lambda idx: checked.append(len(idx)) or False  # cold, were it asked
    monkeypatch.setattr(os, "posix_fadvise", lambda *a: advised.append(a))
    rows = torch.tensor([4, 800, 4999])
    assert torch.equal(store.gather(rows, warm=True), torch.from_numpy(values[rows.numpy()]))
    assert checked == [] and advised == []  # the caller's verdict stands: no second check, no read-ahead
    assert torch.equal(store.gather(rows), torch.from_numpy(values[rows.numpy()]))
    assert checked == [3] and advised  # asked itself: cold, so it read ahead


def test_an_empty_request_is_warm(tmp_path):
    (tmp_path / "t.bin").write_bytes(np.zeros((4, 4), np.float32).tobytes())
    assert DiskStore(tmp_path / "t.bin", 4, 4).warm(torch.empty(0, dtype=torch.int64))


def test_a_cache_as_large_as_a_table_is_reported_not_silently_cut(fresh_model):
    from engram.storage import apply_storage

    model = fresh_model()
    rows = min(layer.embedding.num_rows for layer in model.engram_layers.values())
    with pytest.warns(UserWarning, match=f"cache_rows={rows + 5:,} is not below the rows of the tables"):
        handle = apply_storage(model, "host", cache_rows=rows + 5)
    handle.close()
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_storage(fresh_model(), "host", cache_rows=8).close()  # a real cache: nothing to say

"""The prefetch thread shuts down cleanly (docs/PITFALLS.md §13)."""

import threading
import time

import pytest
import torch

from engram.storage import Prefetcher, apply_storage


def prefetch_threads():
    return [t for t in threading.enumerate() if t.name.startswith("engram-prefetch") and t.is_alive()]


def test_close_waits_joins_and_refuses():
    done = []
    prefetcher = Prefetcher()
    future = prefetcher.submit(lambda: (time.sleep(0.05), done.append(1)))
    assert prefetch_threads()
    prefetcher.close()
    assert future.done() and done == [1]  # in-flight work finished before close returned
    assert not prefetch_threads()
    with pytest.raises(RuntimeError, match="closed"):
        prefetcher.submit(print)
    prefetcher.close()  # idempotent


def test_context_manager():
    with Prefetcher() as prefetcher:
        assert prefetcher.submit(lambda x: x + 1, 1).result() == 2
    assert prefetcher.closed and not prefetch_threads()


def test_handle_close_stops_the_thread(fresh_model):
    model = fresh_model()
    handle = apply_storage(model, "host", cache_rows=20)
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    handle.prefetcher.submit(lambda: None).result()  # warm host rows are gathered inline: start the worker
    assert prefetch_threads()
    handle.close()
    handle.close()
    assert not prefetch_threads()
    with pytest.raises(RuntimeError):
        handle.prefetcher.submit(print)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # still usable, now synchronous
    assert not prefetch_threads()

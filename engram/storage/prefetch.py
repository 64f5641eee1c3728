"""One background thread that fetches Engram rows while the first blocks compute (docs/ALGORITHM.md §5).

docs/PITFALLS.md §13: the thread must shut down cleanly and never write after teardown. ``close()`` lets
in-flight work finish, joins the thread, and refuses later ``submit`` calls; results only ever go
into the returned ``Future``, never into shared state, so nothing can be written after ``close``.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

THREAD_PREFIX = "engram-prefetch"


class Prefetcher:
    """``submit(fn, *args) -> Future`` on one worker; ``close()`` is idempotent; a context manager."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=THREAD_PREFIX)
        self._lock = threading.Lock()  # makes "closed" and "submitted" one step for concurrent callers
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, fn, *args) -> Future:
        with self._lock:
            if self._closed:
                raise RuntimeError("Prefetcher is closed")
            return self._pool.submit(fn, *args)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.shutdown(wait=True)  # finishes queued work and joins the thread

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

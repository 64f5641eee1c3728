"""A bounded cache of hot rows in front of a slower row store (docs/ALGORITHM.md §5: access is Zipfian).

Legend: n requested rows, C capacity (slots), d_h row width, m resident rows (m <= C), r rows in the
``recent`` key vector.

Bookkeeping is O(C), not O(num_rows), because the store behind may be a disk table larger than RAM
(a row->slot vector would cost num_rows ints). Resident rows are kept as two sorted key vectors with
the slot of each key: ``main`` (as of the last fold) and a small ``recent`` (rows inserted since). A
lookup is one binary search in each; inserting k rows merges them into ``recent`` in O(r + k log k).
All of it is vectorised numpy on the host, where the row ids are (docs/PITFALLS.md §13: a per-row Python LRU
stalls), and the O(C) work runs once per C * evict_fraction inserted rows, not on every call:
  - eviction frees a batch: when the free slots cannot take a call's misses, one pass evicts the
    lowest-ranked max(needed, ``evict_fraction`` * C) rows at once (0 gives exact
    one-victim-per-miss eviction, and an O(C) pass on every call with a miss);
  - ``recent`` is folded into ``main`` (an O(C) merge) at each eviction pass or when it outgrows
    C * evict_fraction rows.

Correctness rules (docs/PITFALLS.md §14):
  - a call never evicts a row it requested itself (hits are protected; only C - hits slots can take
    misses; misses that do not fit are served straight from the store, uncached);
  - a hit refreshes recency (LRU) or frequency (LFU), and eviction takes the lowest-ranked rows
    first, so a just-hit row is never evicted while an older row (LFU: a less used one) stays.
"""

from __future__ import annotations

import numpy as np
import torch

_EMPTY = np.empty(0, dtype=np.int64)


def _merge(keys: np.ndarray, slots: np.ndarray, new_keys: np.ndarray, new_slots: np.ndarray):
    """Merge sorted (keys, slots) (m,) with unsorted, disjoint (new_keys, new_slots) (k,) in O(m + k log k)."""
    order = np.argsort(new_keys)
    new_keys, new_slots = new_keys[order], new_slots[order]
    m, k = len(keys), len(new_keys)
    dest = np.searchsorted(keys, new_keys) + np.arange(k)  # (k,) final index of each new key
    is_old = np.ones(m + k, dtype=bool)
    is_old[dest] = False
    out_keys = np.empty(m + k, dtype=np.int64)
    out_slots = np.empty(m + k, dtype=np.int64)
    out_keys[dest], out_slots[dest] = new_keys, new_slots
    out_keys[is_old], out_slots[is_old] = keys, slots
    return out_keys, out_slots


def _lowest(items: np.ndarray, keys: np.ndarray, n: int) -> np.ndarray:
    """The n ``items`` with the lowest ``keys`` (ties broken arbitrarily), unordered, in O(len(items))."""
    return items[np.argpartition(keys, n - 1)[:n]] if n > 0 else items[:0]


def _find(keys: np.ndarray, slots: np.ndarray, rows: np.ndarray):
    """rows (n,) -> hit (n,) bool, slot (n,) (meaningful where hit), against sorted ``keys``."""
    if len(keys) == 0:
        return np.zeros(len(rows), dtype=bool), np.zeros(len(rows), dtype=np.int64)
    pos = np.minimum(np.searchsorted(keys, rows), len(keys) - 1)  # (n,)
    return keys[pos] == rows, slots[pos]


class RowCache:
    """``RowCache(store, capacity_rows, policy)`` has the store's ``gather(rows)`` contract.

    ``evict_fraction`` (0 to 1, default 1/16): the least share of the capacity one eviction pass frees.
    Per-slot state (``slot_row``, ``last_used``, ``count``) is numpy, (C,) int64 each.

    Not thread-safe on its own: the embedding that owns it serialises calls (one prefetch worker).
    """

    def __init__(self, store, capacity_rows: int, policy: str = "lru", evict_fraction: float = 1 / 16):
        if policy not in ("lru", "lfu"):
            raise ValueError(f"cache policy must be 'lru' or 'lfu', got {policy!r}")
        if capacity_rows < 1:
            raise ValueError(f"cache capacity must be >= 1 row, got {capacity_rows}")
        if not 0 <= evict_fraction <= 1:
            raise ValueError(f"evict_fraction must be in [0, 1], got {evict_fraction}")
        self.store = store
        self.policy = policy
        self.capacity = int(min(capacity_rows, store.num_rows))
        C = self.capacity
        self.batch = int(C * evict_fraction)  # rows an eviction pass frees at least; also the fold threshold
        # rows are kept as the store holds them (an fp8 row of 8 values takes 9 bytes, not 32) and decoded on
        # the way out: (C, d_h) codes and (C, S) scales, preallocated once
        self.format = store.format
        S = self.format.scales_per_row(store.dim)
        self.slots = torch.zeros(C, store.dim, dtype=self.format.code_dtype)
        self.slot_scales = torch.zeros(C, S, dtype=self.format.scale_dtype) if self.format.quantised else None
        self.slot_row = np.full(C, -1, dtype=np.int64)  # (C,) row held by each slot, -1 = free
        self.last_used = np.zeros(C, dtype=np.int64)  # (C,) tick of the last call that used the slot
        self.count = np.zeros(C, dtype=np.int64)  # (C,) uses since insertion (LFU)
        self.free = np.arange(C, dtype=np.int64)  # (C - m,) free slots
        self.main_keys, self.main_slots = _EMPTY, _EMPTY  # (m - r,) resident rows ascending, their slots
        self.recent_keys, self.recent_slots = _EMPTY, _EMPTY  # (r,) rows inserted since the last fold
        self.tick = 0
        self.hits = self.misses = self.evictions = 0

    @property
    def num_rows(self) -> int:
        return self.store.num_rows

    @property
    def dim(self) -> int:
        return self.store.dim

    @property
    def nbytes(self) -> int:
        return self.store.nbytes

    @property
    def ram_bytes(self) -> int:
        own = sum(a.nbytes for a in (self.slot_row, self.last_used, self.count, self.free,
                                     self.main_keys, self.main_slots, self.recent_keys, self.recent_slots))
        rows = sum(t.numel() * t.element_size() for t in (self.slots, self.slot_scales) if t is not None)
        return own + rows + self.store.ram_bytes

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def resident(self, rows: torch.Tensor) -> torch.Tensor:
        """(n,) bool: which of ``rows`` are cached now."""
        return torch.from_numpy(self._lookup(rows.to(torch.long).numpy())[0])

    def resident_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every cached row ascending (m,), and the slot holding each (m,)."""
        keys, slots = _merge(self.main_keys, self.main_slots, self.recent_keys, self.recent_slots)
        return torch.from_numpy(keys), torch.from_numpy(slots)

    def _lookup(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """rows (n,) -> hit (n,) bool, slot (n,) (meaningful where hit)."""
        hit, slot = _find(self.main_keys, self.main_slots, rows)
        if len(self.recent_keys):
            recent_hit, recent_slot = _find(self.recent_keys, self.recent_slots, rows)
            slot = np.where(recent_hit, recent_slot, slot)
            hit |= recent_hit
        return hit, slot

    def warm(self, rows: torch.Tensor) -> bool:
        """Every row cached, or the store behind warm for the ones that are not."""
        rows = rows.to(torch.long)
        hit = self._lookup(rows.numpy())[0]
        return bool(hit.all()) or self.store.warm(rows[torch.from_numpy(~hit)])

    def gather(self, rows: torch.Tensor, warm: bool | None = None) -> torch.Tensor:  # (n,) unique -> (n, d_h) fp32
        return self.format.decode(*self.gather_encoded(rows, warm))

    def gather_encoded(self, rows: torch.Tensor, warm: bool | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(n,) unique -> codes (n, d_h), scales (n, S) or None, as the store holds them; ``warm``: the store
        behind was found warm for these rows (``warm(rows)``), so it skips its own check."""
        rows = rows.to(torch.long).numpy()
        if not np.all(rows[1:] > rows[:-1]) and len(np.unique(rows)) != len(rows):  # ascending is unique
            raise ValueError("RowCache.gather needs unique rows; a repeated row would be cached twice")
        self.tick += 1
        hit, slot = self._lookup(rows)
        hit_slots = slot[hit]  # (h,)
        self.last_used[hit_slots] = self.tick
        self.count[hit_slots] += 1  # rows are unique, so no slot repeats
        self.hits += len(hit_slots)
        scales = self.slot_scales
        if len(hit_slots) == len(rows):
            at = torch.from_numpy(hit_slots)
            return self.slots[at], None if scales is None else scales[at]

        out = torch.empty(len(rows), self.dim, dtype=self.slots.dtype)  # (n, d_h)
        out_scales = None if scales is None else torch.empty(len(rows), scales.shape[1], dtype=scales.dtype)
        hit_t, miss_t = torch.from_numpy(hit), torch.from_numpy(~hit)
        out[hit_t] = self.slots[torch.from_numpy(hit_slots)]
        miss_rows = rows[~hit]  # (n - h,)
        fetched, fetched_scales = self.store.gather_encoded(torch.from_numpy(miss_rows), warm)  # one slow-tier call
        out[miss_t] = fetched
        if out_scales is not None:
            out_scales[hit_t] = scales[torch.from_numpy(hit_slots)]
            out_scales[miss_t] = fetched_scales
        self.misses += len(miss_rows)
        k = min(len(miss_rows), self.capacity - len(hit_slots))  # slots not protected by this call
        if k > 0:
            self._insert(miss_rows[:k], fetched[:k], None if fetched_scales is None else fetched_scales[:k], hit_slots)
        return out, out_scales

    def _insert(self, rows: np.ndarray, codes: torch.Tensor, scales: torch.Tensor | None,
                protected: np.ndarray) -> None:
        """Put k new rows (k,) / (k, d_h) codes / (k, S) scales into free slots, first evicting if too few
        are free; never evicts a ``protected`` slot."""
        k = len(rows)
        if len(self.free) < k:
            self._evict(k - len(self.free), protected)
        use, self.free = self.free[:k], self.free[k:]
        self.slot_row[use] = rows
        at = torch.from_numpy(use)
        self.slots[at] = codes
        if scales is not None:
            self.slot_scales[at] = scales
        self.last_used[use] = self.tick
        self.count[use] = 1
        self.recent_keys, self.recent_slots = _merge(self.recent_keys, self.recent_slots, rows, use)
        if len(self.recent_keys) > self.batch:
            self._fold()

    def _evict(self, needed: int, protected: np.ndarray) -> None:
        """Free the ``max(needed, batch)`` lowest-ranked slots that are neither free nor protected.
        LRU ranks by last use; LFU by uses, then last use (two sort keys, so no packed score can overflow)."""
        eligible = self.slot_row >= 0  # (C,)
        eligible[protected] = False
        candidates = np.flatnonzero(eligible)  # (e,)
        n = min(max(needed, self.batch), len(candidates))  # >= needed, since k <= C - hits
        if self.policy == "lru":
            victims = _lowest(candidates, self.last_used[candidates], n)
        else:  # every row used less than the n-th lowest count, then the least recent of those at it
            uses = self.count[candidates]
            cut = np.partition(uses, n - 1)[n - 1]
            below, at = candidates[uses < cut], candidates[uses == cut]
            victims = np.concatenate([below, _lowest(at, self.last_used[at], n - len(below))])
        self.evictions += n
        self.slot_row[victims] = -1
        self.free = np.concatenate([self.free, victims])
        self._fold()

    def _fold(self) -> None:
        """Drop evicted rows from ``main`` and merge ``recent`` into it: O(C)."""
        keep = self.slot_row[self.main_slots] >= 0  # a slot keeps its row until evicted
        main_keys, main_slots = self.main_keys[keep], self.main_slots[keep]
        keep = self.slot_row[self.recent_slots] >= 0
        self.main_keys, self.main_slots = _merge(main_keys, main_slots, self.recent_keys[keep],
                                                 self.recent_slots[keep])
        self.recent_keys = self.recent_slots = _EMPTY

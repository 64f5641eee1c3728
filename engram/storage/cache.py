"""A bounded cache of hot rows in front of a slower row store (SPEC §5: access is Zipfian).

Legend: n requested rows, C capacity (slots), d_h row width, m resident rows (m <= C).

Bookkeeping is O(C), not O(num_rows), because the store behind may be a disk table larger than RAM
(a row->slot vector would cost num_rows ints). Resident rows are kept as a sorted key vector with the
slot of each key; a lookup is one ``searchsorted`` over the request, and an update is a vectorised
remove + merge, never a Python loop per row (PITFALLS 13: a per-row Python LRU stalls).

Correctness rules (PITFALLS 14):
  - a call never evicts a row it requested itself (hits are protected; only C - hits slots can take
    misses; misses that do not fit are served straight from the store, uncached);
  - a hit refreshes recency (LRU) or frequency (LFU), so a just-hit row is never the next victim
    while an older row is resident.
"""

from __future__ import annotations

import torch

_TICK_BITS = 40  # LFU score = count << 40 | last_used: frequency first, recency breaks ties


class RowCache:
    """``RowCache(store, capacity_rows, policy)`` has the store's ``gather(rows)`` contract.

    Not thread-safe on its own: the embedding that owns it serialises calls (one prefetch worker).
    """

    def __init__(self, store, capacity_rows: int, policy: str = "lru"):
        if policy not in ("lru", "lfu"):
            raise ValueError(f"cache policy must be 'lru' or 'lfu', got {policy!r}")
        if capacity_rows < 1:
            raise ValueError(f"cache capacity must be >= 1 row, got {capacity_rows}")
        self.store = store
        self.policy = policy
        self.capacity = int(min(capacity_rows, store.num_rows))
        C = self.capacity
        self.slots = torch.zeros(C, store.dim)  # (C, d_h) fp32, preallocated once
        self.slot_row = torch.full((C,), -1, dtype=torch.long)  # (C,) row held by each slot, -1 = free
        self.last_used = torch.zeros(C, dtype=torch.long)  # (C,) tick of the last call that used the slot
        self.count = torch.zeros(C, dtype=torch.long)  # (C,) uses since insertion (LFU)
        self.keys = torch.empty(0, dtype=torch.long)  # (m,) resident rows, ascending
        self.key_slot = torch.empty(0, dtype=torch.long)  # (m,) slot of keys[i]
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
        own = sum(t.numel() * t.element_size() for t in (self.slots, self.slot_row, self.last_used, self.count,
                                                         self.keys, self.key_slot))
        return own + self.store.ram_bytes

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def resident(self, rows: torch.Tensor) -> torch.Tensor:
        """(n,) bool: which of ``rows`` are cached now."""
        return self._lookup(rows)[0]

    def _lookup(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows (n,) -> hit (n,) bool, slot (n,) (meaningful where hit)."""
        if self.keys.numel() == 0:
            return torch.zeros_like(rows, dtype=torch.bool), torch.zeros_like(rows)
        pos = torch.searchsorted(self.keys, rows).clamp_max(self.keys.numel() - 1)  # (n,)
        return self.keys[pos] == rows, self.key_slot[pos]

    def gather(self, rows: torch.Tensor) -> torch.Tensor:  # (n,) unique -> (n, d_h)
        rows = rows.to(torch.long)
        self.tick += 1
        out = torch.empty(rows.numel(), self.dim)  # (n, d_h)
        hit, slot = self._lookup(rows)
        hit_slots = slot[hit]  # (h,)
        out[hit] = self.slots[hit_slots]
        self.last_used[hit_slots] = self.tick
        self.count[hit_slots] += 1
        self.hits += int(hit_slots.numel())

        miss = (~hit).nonzero().squeeze(1)  # (n - h,) positions in the request
        if miss.numel() == 0:
            return out
        miss_rows = rows[miss]
        fetched = self.store.gather(miss_rows)  # (n - h, d_h): one call to the slow tier
        out[miss] = fetched
        self.misses += int(miss.numel())
        k = min(miss.numel(), self.capacity - hit_slots.numel())  # slots not protected by this call
        if k > 0:
            self._insert(miss_rows[:k], fetched[:k], hit_slots)
        return out

    def _insert(self, rows: torch.Tensor, values: torch.Tensor, protected: torch.Tensor) -> None:
        """Put k new rows (k,) / (k, d_h) into the k best victim slots, never into a ``protected`` one."""
        k = rows.numel()
        if self.policy == "lru":
            score = self.last_used.clone()  # (C,)
        else:
            score = (self.count << _TICK_BITS) | self.last_used
        score[self.slot_row < 0] = -1  # free slots first
        score[protected] = torch.iinfo(torch.long).max
        victims = torch.topk(score, k, largest=False, sorted=False).indices  # (k,)

        old = self.slot_row[victims]
        old = old[old >= 0]
        self.evictions += int(old.numel())
        if old.numel():
            keep = ~torch.isin(self.keys, old)
            self.keys, self.key_slot = self.keys[keep], self.key_slot[keep]

        self.slot_row[victims] = rows
        self.slots[victims] = values
        self.last_used[victims] = self.tick
        self.count[victims] = 1
        self._merge_keys(rows, victims)

    def _merge_keys(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Merge new (rows, slots) into the sorted (keys, key_slot) in O(m + k), no full re-sort."""
        rows, order = rows.sort()
        slots = slots[order]
        m, k = self.keys.numel(), rows.numel()
        dest = torch.searchsorted(self.keys, rows) + torch.arange(k)  # (k,) final index of each new key
        is_new = torch.zeros(m + k, dtype=torch.bool)
        is_new[dest] = True
        keys = torch.empty(m + k, dtype=torch.long)
        key_slot = torch.empty(m + k, dtype=torch.long)
        keys[dest], key_slot[dest] = rows, slots
        keys[~is_new], key_slot[~is_new] = self.keys, self.key_slot
        self.keys, self.key_slot = keys, key_slot

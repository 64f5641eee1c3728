"""Placement of Engram tables as a transform on a finished model (STYLE: "Placement is a transform").

Legend: B batch, T time, H hash heads, d_h row width, n unique rows of one call.

``apply_storage(model, tier)`` swaps each ``MultiHeadEmbedding`` for an ``OffloadedEmbedding`` over a
row store (host RAM or a memory-mapped file, optionally behind a ``RowCache``). The model code does
not change: ``EngramLM.prefetch`` calls ``embedding.prefetch(hash_ids)`` right after hashing, before
block 0 runs, and the block later calls ``embedding(hash_ids)`` with the same tensor. Addresses depend
only on token ids, so the fetch overlaps the first blocks (docs/ALGORITHM.md §5).

Inference only: an offloaded table has no parameter, so its output never requires grad, the model's
``state_dict`` no longer holds the tables, and training or checkpointing a transformed model is not
supported (export with ``export_tables`` before, keep the checkpoint).
"""

from __future__ import annotations

import threading
import warnings
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import nn

from engram.model.tables import HashedTable, as_table_host
from engram.storage.cache import RowCache
from engram.storage.export import open_tables
from engram.storage.prefetch import Prefetcher
from engram.storage.stores import DiskStore, HostStore

TIERS = ("device", "host", "disk")


@dataclass
class _Pending:
    hash_ids: torch.Tensor  # the exact tensor prefetch saw; forward matches it by identity
    future: object  # Future of (n, d_h) fp32 CPU rows
    inverse: torch.Tensor  # (B*T*H,) index into the unique rows


class OffloadedEmbedding(HashedTable):
    """A ``HashedTable`` whose rows live in ``store`` (host RAM, disk, behind a cache): (B, T, H) ->
    (B, T, H, d_h). It has no parameter, so it is never trained (``sparse`` is False)."""

    def __init__(self, store, offsets: torch.Tensor, device: torch.device, dtype: torch.dtype,
                 prefetcher: Prefetcher | None = None):
        super().__init__()
        self.store = store
        self.register_buffer("offsets", offsets.detach().clone(), persistent=False)  # (H,)
        self._offsets_cpu = offsets.detach().cpu()  # rows are computed on the host, where the store is
        self.device, self.dtype = torch.device(device), dtype
        self.prefetcher = prefetcher
        self._pending: _Pending | None = None
        self._lock = threading.Lock()  # the store/cache sees one gather at a time (worker vs. fallback)
        self.rows_fetched = 0
        self.calls_prefetched = 0  # forwards served by a finished background fetch (overlap worked)

    def _apply(self, fn, *args, **kwargs):  # model.to(device) moves where the rows are sent, with the offsets
        module = super()._apply(fn, *args, **kwargs)
        self.device = self.offsets.device
        return module

    @property
    def num_rows(self) -> int:
        return self.store.num_rows

    @property
    def dim(self) -> int:
        return self.store.dim

    def _gather(self, unique: torch.Tensor, warm: bool | None = None) -> torch.Tensor:  # (n,) -> (n, d_h) fp32 CPU
        with self._lock:
            rows = self.store.gather(unique, warm)
            self.rows_fetched += unique.numel()
        if self.device.type == "cuda":
            rows = rows.pin_memory()  # so the host-to-device copy in forward can be asynchronous
        return rows

    def _rows(self, hash_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, H) -> unique table rows (n,) ascending, inverse (B*T*H,)."""
        rows = (hash_ids.to("cpu") + self._offsets_cpu).reshape(-1)  # (B*T*H,)
        return torch.unique(rows, sorted=True, return_inverse=True)  # sorted: disk locality

    def rows(self, start: int, stop: int) -> torch.Tensor:  # (n, d_h) fp32 CPU, read from the store
        with self._lock:
            return self.store.gather(torch.arange(start, stop, dtype=torch.int64))

    def prefetch(self, hash_ids: torch.Tensor) -> None:
        """Start fetching the rows of ``hash_ids`` (B, T, H) in the background. On a CPU model whose rows are
        warm (RAM, or disk pages already cached) they are gathered here instead: there is no device to overlap
        with, and handing ~100 us of work to the worker thread costs about as much again (docs/BENCHMARKS.md)."""
        if self.prefetcher is None or self.prefetcher.closed:
            return
        unique, inverse = self._rows(hash_ids)
        with self._lock:  # the store's state (its pacing, a cache's keys) is the worker's too
            warm = self.device.type == "cpu" and self.store.warm(unique)
        if warm:
            future = Future()
            future.set_result(self._gather(unique, warm=True))
        else:
            future = self.prefetcher.submit(self._gather, unique)
        self._pending = _Pending(hash_ids, future, inverse)

    def forward(self, hash_ids: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, H, d_h)
        pending, self._pending = self._pending, None
        if pending is not None and pending.hash_ids is hash_ids:
            rows, inverse = pending.future.result(), pending.inverse
            self.calls_prefetched += 1
        else:
            if pending is not None:
                pending.future.result()  # a stale prefetch: let it finish so it cannot race ours
            unique, inverse = self._rows(hash_ids)
            rows = self._gather(unique)
        rows = rows.to(self.device, non_blocking=rows.is_pinned())  # (n, d_h)
        out = rows[inverse.to(self.device, non_blocking=True)]  # (B*T*H, d_h)
        return out.view(*hash_ids.shape, -1).to(self.dtype)

    def drop_pending(self) -> None:
        self._pending = None


class StorageHandle:
    """What ``apply_storage`` returns: ``stats()``, and ``close()`` (or ``with``) to stop the prefetch
    thread. After ``close`` the model still works; it gathers synchronously."""

    def __init__(self, model, tier: str, prefetcher: Prefetcher | None):
        self.model, self.tier, self.prefetcher = model, tier, prefetcher

    def embeddings(self) -> dict[int, nn.Module]:
        return {lid: layer.embedding for lid, layer in self.model.engram_layers.items()}

    def stats(self) -> dict:
        layers, total = {}, 0
        for lid, emb in self.embeddings().items():
            entry = {"tier": self.tier, "rows_fetched": 0, "calls_prefetched": 0, "cache_rows": 0, "hits": 0,
                     "misses": 0, "evictions": 0, "hit_rate": None}
            if isinstance(emb, OffloadedEmbedding):
                store = emb.store
                entry |= {"table_bytes": store.nbytes, "ram_bytes": store.ram_bytes,
                          "rows_fetched": emb.rows_fetched, "calls_prefetched": emb.calls_prefetched}
                if isinstance(store, RowCache):
                    entry |= {"cache_rows": store.capacity, "hits": store.hits, "misses": store.misses,
                              "evictions": store.evictions, "hit_rate": store.hit_rate}
            else:  # device tier: the untouched parameter
                weight = emb.weight
                entry |= {"tier": "device", "table_bytes": weight.nbytes,
                          "ram_bytes": weight.nbytes if weight.device.type == "cpu" else 0}
            layers[lid] = entry
            total += entry["ram_bytes"]
        return {"tier": self.tier, "ram_bytes": total, "layers": layers}

    def close(self) -> None:
        for emb in self.embeddings().values():
            if isinstance(emb, OffloadedEmbedding):
                emb.drop_pending()
        if self.prefetcher is not None:
            self.prefetcher.close()

    def __enter__(self) -> "StorageHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def apply_storage(model, tier: str = "device", tables_dir=None, cache_rows: int = 0, policy: str = "lru",
                  verify: str = "size", checkpoint: str | None = None) -> StorageHandle:
    """Move every Engram table of ``model`` (a ``TableHost``: an ``EngramLM``, an ``EngramForCausalLM``, a
    retrofit ``EngramAdapter``) to ``tier`` in place; returns the handle to close.

    device: tables stay parameters (the reference). host: each table becomes a ``HostStore`` and the
    parameter is freed; with ``tables_dir`` the host store reads the exported files into RAM (in their
    stored format, e.g. int8 or fp8_e4m3), otherwise it keeps the model's rows. disk: rows come from
    ``tables_dir`` (``export_tables`` of this model, checked against ``model.hasher``), the parameter is
    freed. Quantised rows are decoded on gather and cast to the table's dtype. ``cache_rows`` > 0 puts a ``RowCache`` of that
    many rows per layer (``policy`` lru or lfu) in front of host or disk. ``verify`` and ``checkpoint``
    (the loaded checkpoint's identity) are ``open_tables``'s checks of the disk tier's files.
    """
    model = as_table_host(model, "apply_storage")
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
    if tier == "device" and tables_dir is not None:
        raise ValueError("tables_dir is read by the host and disk tiers, not the device tier")
    if cache_rows < 0:
        raise ValueError(f"cache_rows must be >= 0, got {cache_rows}")
    if tier == "device":
        if cache_rows:
            raise ValueError("a row cache sits in front of the host or disk tier, not the device tier")
        return StorageHandle(model, tier, None)
    if tier == "disk" and tables_dir is None:
        raise ValueError("the disk tier needs tables_dir (written by `engram export-tables`)")
    layers = model.engram_layers
    engram_tables = {id(layer.embedding) for layer in layers.values()}
    others = [name for name, t in model.named_tables().items() if id(t) not in engram_tables]
    if others:  # e.g. OverEncoding's: it would silently stay on the device
        raise ValueError(f"the {tier} tier offloads Engram tables only; this model also has the hashed tables "
                         f"{others} (OverEncoding), which storage tiers do not support")
    if any(isinstance(layer.embedding, OffloadedEmbedding) for layer in layers.values()):
        raise ValueError("the model's tables are already offloaded; apply_storage once per model")
    meta = [lid for lid, layer in layers.items() if layer.embedding.weight.device.type == "meta"]
    if meta and tables_dir is None:
        raise ValueError(f"the tables of layers {meta} were never allocated (meta device): give tables_dir, the "
                         "exported rows to serve")
    manifest = open_tables(tables_dir, model.hasher, verify, checkpoint) if tables_dir is not None else None
    if manifest is not None:  # check every layer before changing any
        for lid, layer in layers.items():
            entry, shape = manifest.layers.get(lid), tuple(layer.embedding.weight.shape)
            if entry is None or (entry.rows, entry.dim) != shape:
                got = None if entry is None else (entry.rows, entry.dim)
                raise ValueError(f"{tables_dir}: layer {lid} table is {got}, the model needs {shape}")

    stores = {}
    for lid, layer in layers.items():
        if manifest is None:
            stores[lid] = HostStore(layer.embedding.weight)
        elif tier == "host":
            stores[lid] = HostStore.from_entry(manifest.layers[lid])
        else:
            stores[lid] = DiskStore.from_entry(manifest.layers[lid])
    return serve_stores(model, stores, tier, cache_rows, policy)


def serve_stores(model, stores: dict, tier: str, cache_rows: int = 0, policy: str = "lru") -> StorageHandle:
    """Serve every Engram layer of ``model`` from the row store given for it (layer id -> a ``HostStore``,
    ``DiskStore``, ``ConcatStore``, ...: rows that already exist somewhere, such as a checkpoint's shards),
    each behind a ``RowCache`` of ``cache_rows`` rows when > 0; ``tier`` names the placement in ``stats()``.
    Each store's shape must be its layer's table's; rows decode to fp32 and are cast to the table's dtype."""
    model = as_table_host(model, "serve_stores")
    layers = model.engram_layers
    if set(stores) != set(layers):
        raise ValueError(f"stores are given for layers {sorted(stores)}, the model's Engram layers are {sorted(layers)}")
    for lid, layer in layers.items():
        table, store = layer.embedding, stores[lid]
        if isinstance(table, OffloadedEmbedding):
            raise ValueError("the model's tables are already offloaded; place them once per model")
        if (store.num_rows, store.dim) != (table.num_rows, table.dim):
            raise ValueError(f"layer {lid}: the store holds {(store.num_rows, store.dim)} rows x d_h, the table needs "
                             f"{(table.num_rows, table.dim)}")
    whole = sorted(lid for lid in layers if 0 < stores[lid].num_rows <= cache_rows)
    if whole:  # the cache is cut to the table's size; say so rather than silently
        sizes = ", ".join(f"layer {lid}: {stores[lid].num_rows:,}" for lid in whole)
        warnings.warn(f"cache_rows={cache_rows:,} is not below the rows of the tables of layers {whole} ({sizes}): "
                      "their caches hold the whole table (the host tier does that without a cache)", stacklevel=3)
    prefetcher = Prefetcher()
    for lid, layer in layers.items():
        old, store = layer.embedding, stores[lid]
        weight = old.weight
        if cache_rows:
            store = RowCache(store, cache_rows, policy)
        device = weight.device if weight.device.type != "meta" else torch.device("cpu")  # a table never allocated
        layer.embedding = OffloadedEmbedding(store, old.offsets, device, weight.dtype, prefetcher)
    return StorageHandle(model, tier, prefetcher)

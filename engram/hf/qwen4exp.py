"""Qwen4-Exp checkpoints (transformers' ``qwen4_exp``) loaded with their PLE tables on our tiers, never in memory.

transformers saves each PLE table as ``split_ngram_parts`` tensors (``...ngram_embedding.shard_{i}.weight``,
``torch.chunk`` of the rows) and concatenates them when it loads, so a 90 GiB table needs 90 GiB of RAM.
``load_tiered(directory)`` instead builds the model without its tables (each ``ngram_embedding`` is a
``MetaRows``: shapes only), lets transformers load everything else, and serves each table

- from the checkpoint's own shards, in place: each part is a memory map at its offset in its safetensors
  file (``DiskStore.from_safetensors``), the parts one ``ConcatStore`` (tier "disk"), or read into RAM
  (tier "host"); nothing is concatenated on disk or in memory for the disk tier;
- or from a tables directory written by ``export_tables`` (``tables=DIR``, any stored format: int8 and fp8
  files are 2.7-3.6x smaller), checked against the model's hash layout.

The PLE layers are then hashed once per forward and their rows prefetched (``engram.model.qwen4exp``).
``export_tables(model, DIR, dtype=...)`` on a model loaded this way streams the parts into our format.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from engram.model.qwen4exp import find_text_model, qwen4exp_host
from engram.storage import ConcatStore, DiskStore, HostStore, StorageHandle, apply_storage, serve_stores
from engram.storage.safetensors import tensors_in, weight_map

PART = re.compile(r"^(?P<prefix>.*)layers\.(?P<layer>\d+)\.ple\.ple_embedding\.ngram_embedding\."
                  r"(?:shard_(?P<part>\d+)\.)?weight$")
TIERS = ("host", "disk")


class MetaRows(nn.Module):
    """Stands in for a PLE layer's ``nn.Embedding`` so transformers neither loads nor allocates it: its
    shape, and a ``weight`` on the meta device (holding nothing)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = torch.empty(num_embeddings, embedding_dim, dtype=dtype, device="meta")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this PLE table was not loaded: place it with engram.hf.qwen4exp.load_tiered or "
                           "engram.storage.apply_storage(model, tier, tables_dir)")


def without_tables(cls: type) -> type:
    """A subclass of transformers' ``cls`` (``Qwen4ExpForCausalLM`` ...) whose PLE tables are ``MetaRows``:
    ``from_pretrained`` skips their parts in the checkpoint (never read) and allocates nothing for them."""

    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        for layer in find_text_model(self).layers:
            ple = getattr(layer, "ple", None)
            if ple is not None:
                table = ple.ple_embedding.ngram_embedding
                ple.ple_embedding.ngram_embedding = MetaRows(table.num_embeddings, table.embedding_dim,
                                                             table.weight.dtype)

    ignore = list(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or [])
    return type(f"{cls.__name__}WithoutTables", (cls,), {
        "__init__": __init__, "__module__": __name__,
        "_keys_to_ignore_on_load_unexpected": ignore + [r"ple_embedding\.ngram_embedding\."]})


def checkpoint_tables(directory) -> dict[int, list]:
    """Each PLE layer's table in a transformers checkpoint directory as its parts in order (``SafetensorsTensor``s,
    one when the table was saved whole), from the safetensors index (or the one ``model.safetensors``)."""
    directory = Path(directory)
    files_of = weight_map(directory)
    found: dict[int, dict[int, str]] = {}
    for name in files_of:
        match = PART.match(name)
        if match:
            part = -1 if match["part"] is None else int(match["part"])
            found.setdefault(int(match["layer"]), {})[part] = name
    files: dict[str, list[str]] = {}
    for parts in found.values():
        for name in parts.values():
            files.setdefault(files_of[name], []).append(name)
    located = {}
    for file, names in files.items():
        located |= tensors_in(directory / file, names)  # one header read per file
    tables = {}
    for lid, parts in sorted(found.items()):
        if -1 in parts and len(parts) > 1:
            raise ValueError(f"{directory}: layer {lid}'s PLE table is stored both whole and in parts")
        order = sorted(parts)
        if order != [-1] and order != list(range(len(order))):
            missing = sorted(set(range(max(order) + 1)) - set(order))
            raise ValueError(f"{directory}: layer {lid}'s PLE table lacks parts {missing} of {max(order) + 1}")
        tables[lid] = [located[parts[p]] for p in order]
    return tables


def checkpoint_stores(directory, expected: dict[int, tuple[int, int]]) -> dict[int, object]:
    """A disk store per PLE layer over the checkpoint's parts where they lie; refused by name when a layer is
    missing or its parts do not add up to ``expected[layer]`` (rows, d_h)."""
    tables = checkpoint_tables(directory)
    missing = sorted(set(expected) - set(tables))
    if missing:
        raise ValueError(f"{directory} holds no PLE table for blocks {missing} (0-based)")
    stores = {}
    for lid, shape in expected.items():
        parts = [DiskStore.from_safetensors(t) for t in tables[lid]]
        store = parts[0] if len(parts) == 1 else ConcatStore(parts)
        if (store.num_rows, store.dim) != shape:
            raise ValueError(f"{directory}: block {lid}'s PLE table has {store.num_rows} x {store.dim} rows in "
                             f"{len(parts)} parts, the config gives {shape[0]} x {shape[1]}")
        stores[lid] = store
    return stores


def load_tiered(directory, tier: str = "disk", tables=None, cache_rows: int = 0, policy: str = "lru",
                verify: str = "size", model_class: type | None = None, **kwargs) -> tuple[nn.Module, StorageHandle]:
    """(model, storage handle) of the Qwen4-Exp checkpoint in ``directory`` with its PLE tables on ``tier``
    ("disk" or "host"), served from the checkpoint's shards or, with ``tables``, from a tables directory
    (``export_tables``). ``model_class``: the transformers class (default: the config's architecture);
    ``kwargs`` go to its ``from_pretrained`` (``dtype=``, ...). Close the handle (or use it as a context
    manager) to stop the prefetch thread."""
    import transformers

    if tier not in TIERS:
        raise ValueError(f"tier must be one of {TIERS}, got {tier!r}")
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ValueError(f"{directory} has no config.json: not a transformers checkpoint directory")
    if model_class is None:
        config = json.loads((directory / "config.json").read_text())
        names = config.get("architectures") or []
        model_class = next((getattr(transformers, n) for n in names if hasattr(transformers, n)), None)
        if model_class is None or not model_class.__name__.startswith("Qwen4Exp"):
            raise ValueError(f"{directory} is a {names or config.get('model_type')} checkpoint, not Qwen4-Exp: pass "
                             "model_class= to load another class")
    model = without_tables(model_class).from_pretrained(directory, local_files_only=True, **kwargs).eval()
    host = qwen4exp_host(model)
    if host is None:
        raise ValueError(f"{directory}: this Qwen4-Exp model has no PLE layer (ple_layer_ids is empty)")
    if tables is not None:
        return model, apply_storage(host, tier, tables, cache_rows, policy, verify)
    expected = {lid: (slot.embedding.num_rows, slot.embedding.dim) for lid, slot in host.engram_layers.items()}
    stores = checkpoint_stores(directory, expected)
    if tier == "host":
        stores = {lid: HostStore.from_store(store) for lid, store in stores.items()}
    return model, serve_stores(host, stores, tier, cache_rows, policy)


__all__ = ["MetaRows", "checkpoint_stores", "checkpoint_tables", "load_tiered", "without_tables"]

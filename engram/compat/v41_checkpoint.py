"""DeepSeek-V4.1's released checkpoint directory, its Engram layers served from the shards where they lie:
``open_v41(directory)`` (also ``engram.compat.deepseek.open_v41``).

What it reads, and nothing else of the checkpoint:
- ``config.json``: ``text_config`` (or the top level) gives the Engram fields: ``engram_layer_ids`` (0-based
  blocks), ``engram_max_ngram_size`` (N), ``engram_n_heads`` (heads per order), ``engram_vocab_size`` (the
  nominal rows of every head), ``engram_head_dim`` (d_h), ``engram_pad_token_id``, and, checked against
  what we derive, ``engram_compressed_vocab_size`` (V') and ``engram_num_embeddings`` (each table's rows);
  ``hidden_size`` (D), ``hc_mult`` (G), ``rms_norm_eps`` (the gate's eps); ``image_token_id``, when present,
  is a barrier (DEAD) token, as V4.1 reads its image placeholders.
- ``tokenizer.json`` (unless a tokenizer is given), from which the compressed vocabulary is rebuilt.
- ``model.safetensors.index.json`` (or one ``model.safetensors``): where each Engram tensor lies. Each
  table (``layers.{L}.engram.embed.weight`` and ``.scale``) is located from its shard's header and served in
  place by the disk tier (``DiskStore.from_safetensors``): fp8 rows are decoded on gather, nothing is
  copied, and the rows a batch needs are fetched in the background as soon as it is hashed. Only the small
  tensors (``wkv`` and its scale, ``q_weight``, ``k_weight``) are read into memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from engram.hashing import NgramHasher
from engram.model.engram_v41 import EngramV41
from engram.model.table_config import V41_GATE_NORM_EPS, EngramConfig
from engram.model.tables import TableHost
from engram.model.v41_release import release_prefix
from engram.storage.apply import OffloadedEmbedding, StorageHandle
from engram.storage.cache import RowCache
from engram.storage.prefetch import Prefetcher
from engram.storage.safetensors import TORCH_DTYPES, tensor_in, weight_map
from engram.storage.stores import DiskStore
from engram.tokenizer import CompressedTokenizer, read_tokenizer_file

REQUIRED = ("engram_layer_ids", "engram_max_ngram_size", "engram_n_heads", "engram_vocab_size", "engram_head_dim",
            "engram_pad_token_id", "hidden_size", "hc_mult")


def v41_engram_config(config: dict) -> tuple[EngramConfig, dict]:
    """(our EngramConfig, the text config) of a V4.1 ``config.json``; a missing field is refused by name."""
    text = config.get("text_config", config)
    missing = [name for name in REQUIRED if name not in text]
    if missing:
        raise ValueError(f"config.json has no Engram fields {missing} (in text_config or at the top level): not a "
                         "DeepSeek-V4.1 checkpoint?")
    orders = text["engram_max_ngram_size"] - 1
    size = text["engram_vocab_size"]
    barriers = [config["image_token_id"]] if isinstance(config.get("image_token_id"), int) else []
    engram = EngramConfig(engram_vocab_size=list(size) if isinstance(size, (list, tuple)) else [size] * orders,
                          max_ngram_size=text["engram_max_ngram_size"], n_head_per_ngram=text["engram_n_heads"],
                          n_embed_per_ngram=text["engram_head_dim"] * text["engram_n_heads"],
                          pad_id=text["engram_pad_token_id"], seed=text.get("engram_seed", 0),
                          layer_ids=list(text["engram_layer_ids"]), variant="v4.1", short_conv=False,
                          gate_norm_eps=text.get("rms_norm_eps", V41_GATE_NORM_EPS), barrier_ids=barriers)
    return engram, text


def _compressed(directory: Path, tokenizer) -> tuple[CompressedTokenizer, object]:
    if tokenizer is None:
        file = directory / "tokenizer.json"
        if not file.is_file():
            raise ValueError(f"{directory} has no tokenizer.json: pass tokenizer= (the release's)")
        tokenizer = read_tokenizer_file(file)
    return CompressedTokenizer.from_pretrained(tokenizer), tokenizer


class ReleaseEngram(nn.Module, TableHost):
    """The Engram layers of a V4.1 release, tables on the disk tier: ``engram_layers`` (block -> EngramV41),
    ``hasher`` (the release's hashing over its compressed vocabulary), ``named_tables()``; ``hash(ids)``
    hashes every layer at once, ``prefetch(hash_ids)`` starts fetching their rows. ``close()`` (or ``with``)
    stops the prefetch thread; ``stats()`` reports rows fetched, cache hits and bytes."""

    def __init__(self, config: EngramConfig, hasher: NgramHasher, layers: dict[int, EngramV41], tokenizer,
                 directory: Path, prefetcher: Prefetcher):
        super().__init__()
        self.config, self.hasher, self.tokenizer, self.directory = config, hasher, tokenizer, directory
        self.modules_by_layer = nn.ModuleDict({str(lid): m for lid, m in layers.items()})
        self.handle = StorageHandle(self, "disk", prefetcher)

    @property
    def engram_layers(self) -> dict[int, EngramV41]:
        return {int(lid): m for lid, m in self.modules_by_layer.items()}

    def named_tables(self) -> dict:
        return {f"modules_by_layer.{lid}.embedding": m.embedding for lid, m in self.modules_by_layer.items()}

    def hash(self, input_ids: torch.Tensor, boundary: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        return self.hasher(input_ids, boundary)

    def prefetch(self, hash_ids: dict[int, torch.Tensor]) -> None:
        for lid, layer in self.engram_layers.items():
            layer.embedding.prefetch(hash_ids[lid])

    def stats(self) -> dict:
        return self.handle.stats()

    def close(self) -> None:
        self.handle.close()

    def __enter__(self) -> "ReleaseEngram":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _served_layer(directory: Path, files: dict[str, str], config: EngramConfig, hasher: NgramHasher, lid: int,
                  prefetcher: Prefetcher, cache_rows: int, policy: str) -> EngramV41:
    """Engram layer ``lid``: its table a disk-tier view of the shard, its small tensors read."""
    from safetensors import safe_open

    prefix = next((p for p in (release_prefix(lid, n) for n in ("deepseek", "transformers"))
                   if p + "embed.weight" in files), None)
    if prefix is None:
        raise ValueError(f"the checkpoint's index has no layers.{lid}.engram.embed.weight (nor under model.)")
    located = {n[len(prefix):]: tensor_in(directory / files[n], n) for n in files if n.startswith(prefix)}
    state = {}
    for name, where in located.items():
        if name.startswith("embed."):  # never read: its shape and dtype as a meta tensor
            dtype = TORCH_DTYPES.get(where.dtype, torch.uint8)
            state[prefix + name] = torch.empty(where.shape, dtype=dtype, device="meta")
        else:
            with safe_open(str(where.path), "pt") as f:
                state[prefix + name] = f.get_tensor(where.name)
    store = DiskStore.from_safetensors(located["embed.weight"], located.get("embed.scale"))
    if cache_rows:
        store = RowCache(store, cache_rows, policy)
    offsets = torch.tensor(hasher.geometry[lid].offsets, dtype=torch.int64)
    table = OffloadedEmbedding(store, offsets, torch.device("cpu"), torch.float32, prefetcher)
    return EngramV41.from_release_state_dict(state, config, lid, table=table)


def open_v41(directory, tokenizer=None, cache_rows: int = 0, policy: str = "lru") -> ReleaseEngram:
    """The Engram layers of the DeepSeek-V4.1 checkpoint in ``directory``, their tables served in place from
    its safetensors shards (see the module docstring). ``tokenizer``: the release's (a ``tokenizers`` object,
    a transformers tokenizer, a directory or tokenizer.json; default the directory's). ``cache_rows`` > 0
    puts a ``RowCache`` of that many rows per layer (``policy`` lru or lfu) in front of each table.

    Checked before anything is served: the compressed vocabulary against ``engram_compressed_vocab_size``,
    each table's rows against ``engram_num_embeddings`` and our hash layout, every tensor's name, shape
    and dtype; a mismatch is refused by name."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ValueError(f"{directory} has no config.json: not a checkpoint directory")
    config, text = v41_engram_config(json.loads((directory / "config.json").read_text()))
    compressed, tokenizer = _compressed(directory, tokenizer)
    expected_v = text.get("engram_compressed_vocab_size")
    if expected_v is not None and compressed.vocab_size != expected_v:
        raise ValueError(f"the tokenizer compresses to V'={compressed.vocab_size}, the release's config says "
                         f"engram_compressed_vocab_size={expected_v}: another tokenizer or tokenizers version")
    hasher = NgramHasher(config, compressed)
    rows = text.get("engram_num_embeddings")
    derived = [sum(hasher.geometry[lid].sizes) for lid in config.layer_ids]
    if rows is not None and list(rows) != derived:
        raise ValueError(f"the release's tables have engram_num_embeddings={list(rows)} rows, its Engram fields give "
                         f"{derived} by our hash layout: the hashing fields or seed differ")
    files = weight_map(directory)
    prefetcher = Prefetcher()
    try:
        layers = {lid: _served_layer(directory, files, config, hasher, lid, prefetcher, cache_rows, policy)
                  for lid in config.layer_ids}
    except BaseException:
        prefetcher.close()  # no thread left behind by a refused checkpoint
        raise
    return ReleaseEngram(config, hasher, layers, tokenizer, directory, prefetcher)

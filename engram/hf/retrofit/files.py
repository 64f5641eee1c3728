"""An adapter's folder: its weights, config, hash layout and compressed tokenizer, never the base model.

    adapter.safetensors                 the Engram modules' weights (``modules_by_layer.*``)
    adapter_config.json                 {"format": "engram.adapter/1", "config": EngramAdapterConfig, "base": identity}
    hash_layout.json                    NgramHasher.layout(): the addresses the rows were trained at
    compressed_tokenizer.safetensors    the raw -> compressed id table

Loading refuses a base model of another shape (``base_identity``) and a tokenizer that would address
other rows, and builds the adapter on meta, so nothing is initialised only to be overwritten.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from engram.fileio import atomic_write_bytes, atomic_write_json
from engram.hf.retrofit.adapter import EngramAdapter, build_adapter
from engram.hf.retrofit.blocks import base_identity
from engram.hf.retrofit.config import EngramAdapterConfig
from engram.tokenizer import CompressedTokenizer

FORMAT = "engram.adapter/1"


def save_adapter(adapter: EngramAdapter, directory: str | os.PathLike) -> Path:
    """Write ``adapter`` (attached: it records which base model it belongs to) into ``directory``."""
    from safetensors.torch import save

    if adapter._model is None:
        raise ValueError("save an attached adapter (it records which base model it belongs to)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in adapter.modules_by_layer.state_dict().items()}
    atomic_write_bytes(directory / "adapter.safetensors", save(state, metadata={"format": FORMAT}))
    adapter.compressed_tokenizer.save(directory)
    atomic_write_json(directory / "hash_layout.json", adapter.hasher.layout(), sort_keys=True)
    atomic_write_json(directory / "adapter_config.json", {"format": FORMAT, "config": adapter.config.to_dict(),
                                                          "base": base_identity(adapter._model)}, sort_keys=True)
    return directory


def load_adapter(model: nn.Module, directory: str | os.PathLike, tokenizer=None,
                 sparse_tables: bool = True) -> EngramAdapter:
    """The adapter saved in ``directory``, attached to ``model`` (see ``EngramAdapter.load``)."""
    from safetensors.torch import load_file

    from engram.hf.retrofit.adapter import ADAPTER_FOLDER

    directory = Path(directory)
    if not (directory / "adapter_config.json").is_file() and (directory / ADAPTER_FOLDER).is_dir():
        directory = directory / ADAPTER_FOLDER  # a retrofitted model's save_pretrained folder
    meta = json.loads((directory / "adapter_config.json").read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{directory}/adapter_config.json has format {meta.get('format')!r}, expected {FORMAT!r}")
    mine = base_identity(model)
    diffs = {k: (v, mine.get(k)) for k, v in meta["base"].items() if mine.get(k) != v}
    if diffs:
        detail = "; ".join(f"{k}: saved {a!r} vs given {b!r}" for k, (a, b) in diffs.items())
        raise ValueError(f"the adapter in {directory} was trained on another base model ({detail})")
    config = EngramAdapterConfig.from_dict(meta["config"])
    stored = CompressedTokenizer.load(directory)
    compressed = stored if tokenizer is None else CompressedTokenizer.from_pretrained(tokenizer)
    if compressed != stored:
        raise ValueError(f"the tokenizer given compresses to V'={compressed.vocab_size} (sha256 "
                         f"{compressed.sha256[:12]}) but the adapter's tables were addressed with "
                         f"V'={stored.vocab_size} (sha256 {stored.sha256[:12]}); refusing to load")
    adapter = build_adapter(config, compressed, model, sparse_tables)  # nothing initialised only to be overwritten
    adapter.hasher.check_layout(json.loads((directory / "hash_layout.json").read_text()))
    adapter.modules_by_layer.load_state_dict(load_file(str(directory / "adapter.safetensors")))
    return adapter.attach(model)

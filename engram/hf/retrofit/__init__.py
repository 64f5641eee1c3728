"""Retrofit Engram into a pretrained Hugging Face causal LM: ``attach_engram(model, tokenizer, config)``.

    adapter = attach_engram(model, tokenizer)         # Engram before block 1 (the paper's "layer 2")
    model(**batch).logits                             # == the base model's, exactly, until trained
    model.generate(**batch, max_new_tokens=20)        # exact: n-gram and conv state follow the cache
    adapter.save("adapter/"); adapter.detach()         # only the adapter; EngramAdapter.load(model, "adapter/", tok)

By concern: ``config`` (EngramAdapterConfig), ``blocks`` (finding the base model's decoder blocks and
width), ``adapter`` (the modules and the hooks), ``state`` (the decode state bound to transformers'
caches), ``files`` (save and load). docs/RETROFIT.md has the measurements.
"""

from engram.hf.retrofit.adapter import EngramAdapter, attach_engram, build_adapter
from engram.hf.retrofit.blocks import base_identity, find_blocks, model_dim
from engram.hf.retrofit.config import EngramAdapterConfig, default_adapter_engram
from engram.hf.retrofit.files import FORMAT, load_adapter, save_adapter

__all__ = ["FORMAT", "EngramAdapter", "EngramAdapterConfig", "attach_engram", "base_identity", "build_adapter",
           "default_adapter_engram", "find_blocks", "load_adapter", "model_dim", "save_adapter"]

"""Conversion between the project's ``EngramLM`` (and its checkpoints) and ``EngramForCausalLM``.

Weights move by state dict; the architecture and the hash layouts move in the config; nothing is
re-initialised on the way (the HF model is built on meta and materialised from the native tensors).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from engram.hf.configuration import EngramHFConfig
from engram.hf.modeling import EngramForCausalLM
from engram.model.transformer import EngramLM


def _special(tokenizer) -> dict:
    if tokenizer is None:
        return {}
    from engram.data import special_ids

    s = special_ids(tokenizer)
    return {"pad": s.pad, "bos": s.bos, "eos": s.eos}


def to_hf(model: EngramLM, tokenizer=None) -> EngramForCausalLM:
    """``model`` as an ``EngramForCausalLM`` with the same weights, on the same device. ``tokenizer``
    (a ``tokenizers.Tokenizer``), when given, travels with it (``save_pretrained`` writes it) and sets
    the config's pad/bos/eos ids."""
    if any(not layer.embedding.trainable for layer in model.engram_layers.values()):
        raise ValueError("the model's tables are offloaded (apply_storage): convert the device-resident model, "
                         "then apply the storage tier to the converted one")
    config = EngramHFConfig.from_model(model, _special(tokenizer))
    if tokenizer is not None and model.compressed_tokenizer is not None:
        from engram.tokenizer import CompressedTokenizer

        if CompressedTokenizer.from_pretrained(tokenizer) != model.compressed_tokenizer:
            raise ValueError("the tokenizer given does not compress like the model's: its tables would be "
                             "addressed with other rows")
    with torch.device("meta"):
        hf = EngramForCausalLM(config, compressed_tokenizer=model.compressed_tokenizer)
    device = next(model.parameters()).device
    hf.to_empty(device=device)
    hf.reset_derived_buffers()
    state = {k: v for k, v in model.state_dict().items()}
    hf.model.load_state_dict(state, strict=True)
    hf.engram_tokenizer = tokenizer
    if tokenizer is not None:
        hf.generation_config.pad_token_id = config.pad_token_id
        hf.generation_config.bos_token_id = config.bos_token_id
        hf.generation_config.eos_token_id = config.eos_token_id
    hf.eval()
    return hf


def from_hf(hf_model: EngramForCausalLM, sparse_tables: bool = True) -> EngramLM:
    """The ``EngramLM`` inside ``hf_model``, as a separate model with copied weights (sparse-gradient
    tables by default, what the project's optimizer needs)."""
    inner = hf_model.model
    device = next(inner.parameters()).device
    with torch.device("meta"):
        model = EngramLM(inner.config, inner.compressed_tokenizer, sparse_tables=sparse_tables)
    model.to_empty(device=device)
    model.init_weights(tables=False)
    model.load_state_dict({k: v.detach().clone() for k, v in inner.state_dict().items()}, strict=True)
    model.train(inner.training)
    return model


def export_hf(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, check_hashes: bool = True) -> Path:
    """Write a native checkpoint (or a run directory's latest; one written by several ranks too) as a
    ``save_pretrained`` folder; returns the folder."""
    from engram.train import load_checkpoint

    out_dir = Path(out_dir)
    _check_out(out_dir)
    ckpt = load_checkpoint(checkpoint, check_hashes=check_hashes)
    hf = to_hf(ckpt.model, ckpt.tokenizer)
    hf.save_pretrained(out_dir)
    return out_dir


def _check_out(out_dir: Path) -> None:
    """A folder to write a model into: absent, empty, or an earlier export of an Engram model."""
    import json

    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} is a file, not a directory")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    config = out_dir / "config.json"
    try:
        engram_folder = json.loads(config.read_text()).get("model_type") == "engram"
    except (OSError, ValueError, AttributeError):
        engram_folder = False
    if not engram_folder:
        raise ValueError(f"{out_dir} is not empty and is not an exported Engram model: refusing to write into it "
                         "(it may be a checkpoint or a run directory); choose another --out")

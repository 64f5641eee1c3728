"""``EngramForCausalLM.resize_token_embeddings``'s Engram side: a new vocabulary is taken only when every
table row stays where it is.

The hashers address rows through the compressed tokenizer, and every hash multiplier depends on its size V'
(``engram.hashing.multiplier_bound``). So a resize keeps each old id's compressed id and V' itself; new
tokens must normalise to forms the vocabulary already had, and padding ids past the tokenizer read as the
pad token. The hashers are rebuilt on the longer table (the same multipliers) before anything changes.
"""

from __future__ import annotations

import dataclasses

import torch

from engram.hashing import NgramHasher
from engram.tokenizer import CompressedTokenizer


def token_count(tokenizer) -> int:
    """Ids of a transformers tokenizer or a ``tokenizers.Tokenizer`` (added tokens included)."""
    return len(tokenizer) if hasattr(tokenizer, "__len__") else tokenizer.get_vocab_size(with_added_tokens=True)


def resized_compressed(inner, size: int, tokenizer) -> CompressedTokenizer | None:
    """The compressed tokenizer of ``inner`` (an ``EngramLM``) for a vocabulary of ``size`` ids, or None for a
    model that hashes nothing; ValueError when the tables' addresses cannot stay where they are."""
    if inner.hasher is None and inner.overencoding is None:
        return None
    old = inner.compressed_tokenizer
    if tokenizer is None:
        raise ValueError(f"this model's Engram tables are addressed through its compressed tokenizer (V'="
                         f"{old.vocab_size}); pass the tokenizer that now has the new ids: "
                         "resize_token_embeddings(len(tokenizer), tokenizer=tokenizer)")
    new = CompressedTokenizer.from_pretrained(tokenizer)
    kept = min(new.raw_vocab_size, old.raw_vocab_size)
    if not torch.equal(new.lookup[:kept], old.lookup[:kept]):
        raise ValueError("the tokenizer given compresses the existing ids differently: every Engram row "
                         "would be addressed by other n-grams; resize with the tokenizer the model was trained "
                         "with, tokens added at its end")
    if new.vocab_size != old.vocab_size:
        raise ValueError(f"the new tokens would change the compressed vocabulary from V'={old.vocab_size} to "
                         f"{new.vocab_size}: every hash multiplier depends on V', so every Engram row would move. "
                         "Add tokens that normalise to existing forms, or retrain the tables")
    if new.raw_vocab_size < size:  # padding ids past the tokenizer's: read as the pad token, never produced
        tables = inner.config.engram if inner.hasher is not None else inner.config.overencoding
        pad = int(old.lookup[tables.pad_id if tables.pad_id is not None else 0])
        lookup = torch.cat([new.lookup, torch.full((size - new.raw_vocab_size,), pad, dtype=torch.long)])
        new = CompressedTokenizer(lookup, new.vocab_size)
    return new


def rebuilt_hashers(inner, compressed: CompressedTokenizer | None) -> dict[str, NgramHasher]:
    """``inner``'s hashers rebuilt on ``compressed`` (the same multipliers: V' is unchanged), by role."""
    hashers: dict[str, NgramHasher] = {}
    if compressed is None:
        return hashers
    device = inner.tok_embeddings.weight.device
    if inner.hasher is not None:
        hashers["engram"] = NgramHasher(inner.config.engram, compressed).to(device)
    if inner.overencoding is not None:
        hashers["overencoding"] = NgramHasher(inner.config.overencoding, compressed,
                                              layer_ids=[inner.overencoding.layer_id]).to(device)
    for hasher in hashers.values():
        hasher.reset_buffers()
    return hashers


@torch.no_grad()
def init_new_rows(inner, old: int) -> None:
    """Token-embedding rows from ``old`` on N(0, 1) as ``EngramLM.init_weights`` draws them, head rows at the
    head's own spread (transformers initialises new rows through ``_init_weights``, a no-op here)."""
    inner.tok_embeddings.weight[old:].normal_(0.0, 1.0)
    inner.output.weight[old:].normal_(0.0, inner.output.weight[:old].std().item())


def follow_vocab(model, size: int, compressed: CompressedTokenizer | None, hashers: dict, tokenizer) -> None:
    """``model`` (an ``EngramForCausalLM``)'s config, its ``EngramLM``'s config, hashers and tokenizers follow a
    vocabulary of ``size`` ids whose embedding and head are already resized."""
    from tokenizers import Tokenizer

    inner = model.model
    inner.config = dataclasses.replace(inner.config,
                                       backbone=dataclasses.replace(inner.config.backbone, vocab_size=size))
    model.config.engram_config = inner.config.to_dict()
    model.config.vocab_size = size
    if compressed is not None:
        inner.compressed_tokenizer = compressed
    if "engram" in hashers:
        inner.hasher = hashers["engram"]
        model.config.hash_layout = inner.hasher.layout()
    if "overencoding" in hashers:
        inner.overencoding.hasher = hashers["overencoding"]
        model.config.overencoding_layout = inner.overencoding.hasher.layout()
    if tokenizer is not None:
        backend = tokenizer if isinstance(tokenizer, Tokenizer) else getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            model.engram_tokenizer = backend

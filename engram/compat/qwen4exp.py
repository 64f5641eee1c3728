"""Compatibility with Qwen4-Exp (transformers' ``Qwen4ExpForCausalLM``, model type ``qwen4_exp``): its PLE
layers are the paper's Engram module over Qwen's own hashing (docs/ALGORITHM.md §2c). This module reads a
Qwen4-Exp text config (any object with its fields; transformers is not imported) and gives the
``TableConfig`` and ``NgramHasher`` that hash exactly as its ``Qwen4ExpTextNGramEmbedding`` does, for
every PLE layer at once.
"""

from __future__ import annotations

from engram.hashing import NgramHasher
from engram.model.table_config import TableConfig
from engram.tokenizer import CompressedTokenizer


def eos_id(text_config) -> int:
    """The EOS that ends a PLE segment (the first, when the config lists several, as Qwen4-Exp takes it)."""
    eos = text_config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    if eos is None:
        raise ValueError("a Qwen4-Exp config with PLE layers needs eos_token_id: its n-gram segments end there")
    return int(eos)


def ple_layer_ids(text_config) -> list[int]:
    """The PLE layers as 0-based block indices (the config lists them 1-based), in Qwen's order."""
    return [lid - 1 for lid in sorted(set(text_config.ple_layer_ids or []))]


def ple_table_config(text_config) -> TableConfig:
    """The tables of a Qwen4-Exp text config's PLE layers: one base size for every order's heads, raw ids,
    segments ending at EOS, rows padded to ``make_ngram_vocab_size_divisible_by``."""
    orders, heads = text_config.ngram_size - 1, text_config.heads_per_ngram
    if text_config.ple_embed_dim % (orders * heads):
        raise ValueError(f"ple_embed_dim={text_config.ple_embed_dim} is not a multiple of the {orders * heads} n-gram "
                         "heads")
    head_dim = text_config.ple_embed_dim // (orders * heads)
    return TableConfig(engram_vocab_size=[text_config.ngram_vocab_size_base] * orders,
                       max_ngram_size=text_config.ngram_size, n_embed_per_ngram=head_dim * heads,
                       n_head_per_ngram=heads, pad_id=eos_id(text_config), seed=text_config.seed, compress=False,
                       hash_scheme="qwen4exp", row_multiple=text_config.make_ngram_vocab_size_divisible_by)


def ple_hasher(text_config) -> NgramHasher:
    """Hashes raw ids for every PLE layer of a Qwen4-Exp text config, keyed by 0-based block index. Its ids
    plus ``offsets[layer]`` are the rows ``Qwen4ExpTextNGramEmbedding`` reads, bit for bit."""
    if not text_config.ple_layer_ids:
        raise ValueError("this Qwen4-Exp config has no PLE layer (ple_layer_ids is empty)")
    return NgramHasher(ple_table_config(text_config), CompressedTokenizer.identity(text_config.vocab_size),
                       ple_layer_ids(text_config))

"""Compatibility with Qwen4-Exp (transformers' ``Qwen4ExpForCausalLM``, model type ``qwen4_exp``): its PLE
layers are the paper's Engram module over Qwen's own hashing (docs/ALGORITHM.md §2c). ``ple_hasher(config)``
hashes exactly as its ``Qwen4ExpTextNGramEmbedding`` does, for every PLE layer at once; a model as
transformers built it is a table host for our storage tiers (``engram.model.qwen4exp``, where these live).
"""

from engram.model.qwen4exp import (Qwen4ExpHost, TieredPLEEmbedding, eos_id, ple_hasher, ple_layer_ids,
                                   ple_table_config, qwen4exp_host)

__all__ = ["Qwen4ExpHost", "TieredPLEEmbedding", "eos_id", "ple_hasher", "ple_layer_ids", "ple_table_config",
           "qwen4exp_host"]

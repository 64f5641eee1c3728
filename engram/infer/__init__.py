"""Inference: incremental generation over the decode state (``engram.model.cache``: KV cache, n-gram
and conv histories)."""

from engram.infer.generate import generate, generate_batch, left_pad, sample_next
from engram.model.cache import InferenceCache, LayerCache

__all__ = ["InferenceCache", "LayerCache", "generate", "generate_batch", "left_pad", "sample_next"]

"""Inference: decode state (KV cache, n-gram and conv history) and incremental generation."""

from engram.infer.cache import InferenceCache, LayerCache
from engram.infer.generate import generate, generate_batch, left_pad, sample_next

__all__ = ["InferenceCache", "LayerCache", "generate", "generate_batch", "left_pad", "sample_next"]

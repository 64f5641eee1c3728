"""Inference: text generation."""

from engram.infer.generate import generate, sample_next

__all__ = ["generate", "sample_next"]

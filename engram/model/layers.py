"""Small building blocks: RMSNorm, rotary position embedding, SwiGLU feed-forward.

Legend: B batch, T time, D model width, h attention heads, d head width, F FFN hidden width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, normalised in fp32 and cast back (gate numerics, PITFALLS 10)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # (EngramLM builds on meta and sets ones in init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for RoPE (rotate-half convention), extended on demand."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.max_seq_len = max_seq_len
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the frequencies and the tables (after ``to_empty``, which leaves buffers unset)."""
        d = self.head_dim
        device = self.inv_freq.device
        self.inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))
        self._build(self.max_seq_len)

    def _build(self, length: int) -> None:
        t = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq)  # (T, d/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (T, d)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,) or (B, T) int64 -> cos, sin of shape positions.shape + (d,)."""
        needed = int(positions.max().item()) + 1 if positions.numel() else 0
        if needed > self.cos.shape[0]:
            self._build(max(needed, 2 * self.cos.shape[0]))
        return self.cos[positions], self.sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, h, T, d); cos/sin: (T, d) or (B, T, d)."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, d)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class SwiGLU(nn.Module):
    """Dense FFN: w2(silu(w1 x) * w3 x), no biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def swiglu_params(dim: int, hidden: int) -> int:
    """Parameter count of one SwiGLU (three bias-free matrices)."""
    return 3 * dim * hidden

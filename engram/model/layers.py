"""Small building blocks: RMSNorm, rotary position embedding (with YaRN scaling), SwiGLU feed-forward.

Legend: B batch, T time, D model width, h attention heads, d head width, F FFN hidden width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, normalised in fp32 and cast back (gate numerics, docs/PITFALLS.md §10)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))  # (EngramLM builds on meta and sets ones in init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def yarn_frequencies(head_dim: int, theta: float, scaling) -> tuple[torch.Tensor, float]:
    """RoPE inverse frequencies (d/2,) under YaRN ``scaling`` (a ``YarnConfig``), and the factor m that
    cos and sin are multiplied by, so that q.k logits scale by m^2 = YaRN's 1/t.

    Dimension i turns L * f_i / (2 pi) times over the pre-training context L. Counted in dimensions, the
    correction range is c(r) = d * ln(L / (2 pi r)) / (2 ln theta) for r = beta_fast (floored) and
    r = beta_slow (ceiled); a linear ramp over i from the first to the second blends f_i (kept) into
    f_i / s (interpolated). m = 0.1 * mscale * ln(s) + 1 (DeepSeek-V2/V3's form of YaRN)."""
    d = head_dim
    # on the host: the same values on every device, and no meta-device kernels (they import torch._dynamo)
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device="cpu") / d))  # (d/2,)
    if scaling is None or scaling.factor == 1:  # no extension: exactly plain RoPE (the blend is not, in fp32)
        return inv_freq, 1.0
    L, s = scaling.original_max_seq_len, scaling.factor

    def dims_for(rotations: float) -> float:
        return d * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(dims_for(scaling.beta_fast)), 0)
    high = min(math.ceil(dims_for(scaling.beta_slow)), d - 1)
    if low == high:
        high += 0.001  # a one-dimension ramp would divide by zero
    dims = torch.arange(d // 2, dtype=torch.float32, device="cpu")
    ramp = ((dims - low) / (high - low)).clamp(0, 1)  # 0 keep .. 1 scale
    inv_freq = inv_freq / s * ramp + inv_freq * (1 - ramp)
    return inv_freq, 0.1 * scaling.mscale * math.log(s) + 1.0


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables for RoPE (rotate-half convention), extended on demand; with ``scaling``
    (a ``YarnConfig``) the frequencies and the attention factor are YaRN's (``yarn_frequencies``)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0, scaling=None):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.scaling = scaling
        self.attention_factor = 1.0
        self.max_seq_len = max_seq_len
        self.register_buffer("inv_freq", torch.empty(head_dim // 2), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Recompute the frequencies and the tables (after ``to_empty``, which leaves buffers unset)."""
        inv_freq, self.attention_factor = yarn_frequencies(self.head_dim, self.theta, self.scaling)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        self._build(self.max_seq_len)

    def _build(self, length: int) -> None:
        if self.inv_freq.device.type == "meta":  # nothing to compute (reset_buffers runs again after to_empty)
            for name in ("cos", "sin"):
                self.register_buffer(name, torch.empty(length, self.head_dim, device="meta"), persistent=False)
            return
        t = torch.arange(length, dtype=torch.float32, device=self.inv_freq.device)
        freqs = torch.outer(t, self.inv_freq)  # (T, d/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (T, d)
        m = self.attention_factor  # q and k both rotate, so logits scale by m^2 (1.0 without YaRN)
        self.register_buffer("cos", emb.cos() * m if m != 1.0 else emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin() * m if m != 1.0 else emb.sin(), persistent=False)

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

"""Causal self-attention on PyTorch SDPA: ``Attention`` (RoPE, optional grouped-query heads) or ``MLA``
(multi-head latent attention, DeepSeek-V2/V3), chosen by ``BackboneConfig.mla`` at build time.

Legend: B batch, T time (new tokens), S keys (L cached + T new), D model width, h query heads,
k key/value heads, d head width; MLA: c latent width (kv_lora_rank), n / r / v per-head widths of the
unrotated q.k part, the RoPE part and the value.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engram.model.config import BackboneConfig
from engram.model.cache import LayerCache
from engram.model.layers import RMSNorm, apply_rotary, yarn_frequencies


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                       scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA written out, for when the weights are wanted (``output_attentions``): q (B, h, T, d), k (B, k, S, d),
    v (B, k, S, e), mask (B, 1, T, S) bool (True: may attend) or None for causal -> y (B, h, T, e), weights
    (B, h, T, S) fp32. Equal to ``F.scaled_dot_product_attention`` up to float rounding."""
    h, T, S = q.shape[1], q.shape[2], k.shape[2]
    if k.shape[1] != h:  # grouped-query heads: each key/value head serves h / k query heads
        k, v = k.repeat_interleave(h // k.shape[1], dim=1), v.repeat_interleave(h // v.shape[1], dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if mask is None:  # causal, the last T of S keys being the queries' own
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    weights = scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)  # (B, h, T, S)
    return (weights @ v.float()).to(v.dtype), weights


class Attention(nn.Module):
    """``keep_weights``: set True to compute the attention written out and keep its weights in ``weights``
    (B, h, T, S) after each call (``output_attentions``); off, SDPA's fused kernel runs and nothing is kept."""

    keep_weights = False

    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.weights = None
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        D, hd, kd = config.d_model, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.wq = nn.Linear(D, hd, bias=False)
        self.wk = nn.Linear(D, kd, bias=False)
        self.wv = nn.Linear(D, kd, bias=False)
        self.wo = nn.Linear(hd, D, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D); cos/sin (T, d) or (B, T, d) -> (B, T, D), causal.

        ``cache``: this block's decode state; keys/values of earlier calls are kept there and its mask
        says which cached positions each query may see. ``mask`` (B, 1, T, T) bool, True where a query
        may see a key: the document mask of a packed batch (``document_mask``); None is plain causal."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, h, T, d)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, k, T, d)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, k, T, d)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        gqa = self.n_kv_heads != self.n_heads
        if self.keep_weights:
            if cache is not None:
                k, v = cache.update(k, v)  # (B, k, L+T, d)
            y, self.weights = explicit_attention(q, k, v, mask if cache is None else cache.mask)
        elif cache is None and mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # (B, h, T, d)
        elif cache is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            k, v = cache.update(k, v)  # (B, k, L+T, d)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class MLA(nn.Module):
    """Multi-head latent attention (DeepSeek-V2 §2.1, V3): keys and values of every head come from one
    normalised latent per token (width c), so a decode cache holds that latent and one shared RoPE key
    (width r) per token instead of 2 * k * d numbers. RoPE is "decoupled": q.k = q_nope.k_nope + q_rope.k_rope,
    only the r-wide parts rotate, and the one rotated key serves every head. Weights as ``MLAConfig``.
    ``keep_weights`` / ``weights``: as ``Attention``'s."""

    keep_weights = False

    def __init__(self, config: BackboneConfig):
        super().__init__()
        self.weights = None
        m = config.mla
        D, h = config.d_model, config.n_heads
        self.n_heads, self.q_rank, self.kv_rank = h, m.q_lora_rank, m.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        if m.q_lora_rank:
            self.wq_a = nn.Linear(D, m.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(m.q_lora_rank, config.norm_eps)
            self.wq_b = nn.Linear(m.q_lora_rank, h * m.qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(D, h * m.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(D, m.kv_lora_rank + m.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(m.kv_lora_rank, config.norm_eps)
        self.wkv_b = nn.Linear(m.kv_lora_rank, h * (m.qk_nope_head_dim + m.v_head_dim), bias=False)
        self.wo = nn.Linear(h * m.v_head_dim, D, bias=False)
        # YaRN's m: RotaryEmbedding puts it into cos/sin, which would scale only the rope part of q.k by
        # m^2; DeepSeek-V3 scales the whole logit (nope and rope parts) by m^2, in the softmax scale
        self.rope_factor = yarn_frequencies(config.rope_dim, config.rope_theta, config.rope_scaling)[1]
        self.scale = self.rope_factor ** 2 / math.sqrt(m.qk_head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerCache | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """As ``Attention.forward``; cos/sin are (T, r) or (B, T, r). ``cache`` keeps this block's
        latents c in its keys and rotated RoPE keys in its values (``engram.model.cache``)."""
        B, T, _ = x.shape
        h, n, r = self.n_heads, self.nope_dim, self.rope_dim
        if self.rope_factor != 1.0:  # undo YaRN's m in the tables: the scale below carries m^2
            cos, sin = cos / self.rope_factor, sin / self.rope_factor
        # 1 queries: (B, T, D) -> (B, h, T, n + r), the rope part rotated
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_rank else self.wq(x)  # (B, T, h*(n+r))
        q_nope, q_rope = q.view(B, T, h, n + r).transpose(1, 2).split([n, r], dim=-1)  # (B, h, T, n), (B, h, T, r)
        q = torch.cat([q_nope, apply_rotary(q_rope, cos, sin)], dim=-1)  # (B, h, T, n + r)
        # 2 latent and shared RoPE key: (B, T, D) -> (B, 1, T, c), (B, 1, T, r)
        c, k_rope = self.wkv_a(x).split([self.kv_rank, r], dim=-1)  # (B, T, c), (B, T, r)
        c = self.kv_norm(c)[:, None]  # (B, 1, T, c)
        k_rope = apply_rotary(k_rope[:, None], cos, sin)  # (B, 1, T, r)
        # 3 decode: the cache stores only c and k_rope; all S cached latents are expanded again below
        # (absorbing wkv_b into the query and wo would attend in the latent space, the faster decode
        # form; not done here: the plain up-projection is the one training computes)
        if cache is not None:
            c, k_rope = cache.update(c, k_rope)  # (B, 1, S, c), (B, 1, S, r)
        S = c.shape[2]
        # 4 keys and values per head: (B, 1, S, c) -> (B, h, S, n + r), (B, h, S, v)
        kv = self.wkv_b(c[:, 0]).view(B, S, h, n + self.v_dim).transpose(1, 2)  # (B, h, S, n + v)
        k_nope, v = kv.split([n, self.v_dim], dim=-1)  # (B, h, S, n), (B, h, S, v)
        k = torch.cat([k_nope, k_rope.expand(-1, h, -1, -1)], dim=-1)  # (B, h, S, n + r)
        # 5 attention: softmax(q.k * m^2 / sqrt(n + r)) v, causal / document / cache mask as Attention
        if self.keep_weights:
            y, self.weights = explicit_attention(q, k, v, mask if cache is None else cache.mask, self.scale)
        elif cache is None and mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)  # (B, h, T, v)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask if cache is None else cache.mask,
                                               scale=self.scale)
        return self.wo(y.transpose(1, 2).reshape(B, T, h * self.v_dim))  # (B, T, D)


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool: causal and within one document (block-diagonal)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()  # (T, T)
    return (causal & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]


def attention_params(config: BackboneConfig) -> int:
    """Parameters of one block's attention: ``Attention``, or ``MLA`` (its layout in ``MLAConfig``)."""
    D, h = config.d_model, config.n_heads
    m = config.mla
    if m is None:
        d = config.head_dim
        return 2 * D * h * d + 2 * D * config.n_kv_heads * d
    q = D * h * m.qk_head_dim if not m.q_lora_rank else \
        D * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * h * m.qk_head_dim
    kv = D * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank + m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim)
    return q + kv + h * m.v_head_dim * D


def attention_score_width(config: BackboneConfig) -> int:
    """Per head and key: the q.k width plus the value width (FLOPs of scores and mixing)."""
    if config.mla is None:
        return 2 * config.head_dim
    return config.mla.qk_head_dim + config.mla.v_head_dim

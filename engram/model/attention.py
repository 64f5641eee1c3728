"""Causal self-attention with RoPE and optional grouped-query heads, on PyTorch SDPA.

Legend: B batch, T time, D model width, h query heads, k key/value heads, d head width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engram.config import BackboneConfig
from engram.model.cache import LayerCache
from engram.model.layers import apply_rotary


class Attention(nn.Module):
    def __init__(self, config: BackboneConfig):
        super().__init__()
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
        if cache is None and mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)  # (B, h, T, d)
        elif cache is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        else:
            k, v = cache.update(k, v)  # (B, k, L+T, d)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=cache.mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


def document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, 1, T, T) bool: causal and within one document (block-diagonal)."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()  # (T, T)
    return (causal & (doc_ids[:, :, None] == doc_ids[:, None, :]))[:, None]


def attention_params(config: BackboneConfig) -> int:
    D, d = config.d_model, config.head_dim
    return 2 * D * config.n_heads * d + 2 * D * config.n_kv_heads * d

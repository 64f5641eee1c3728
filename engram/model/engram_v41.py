"""DeepSeek-V4.1's production Engram module (docs/ALGORITHM.md §2b), chosen at build time by
``EngramConfig.variant = "v4.1"``; the paper's module is ``engram.model.engram.Engram``.

Legend: B batch, T time, G hyper-connection branches, D model width, H hash heads, d_h row width,
M = d_mem = H*d_h memory width.

What differs from the paper's module (facts from the public serving ports of V4.1, which copy DeepSeek's
reference; our own code):
- no short conv, so the decode state is the n-gram history alone;
- one fused bias-free projection ``wkv``: M -> D*(G+1), the G keys first (branch-major), then the one
  value shared by every branch;
- the query is the residual branch itself; the query and key RMSNorm gains are two (G, D) parameters,
  ``q_weight`` and ``k_weight``, as the release stores them (in bf16 their product would round), used only
  as their fp32 product w: score = sum(h * w * k) * rstd(h) * rstd(k) / sqrt(D), in fp32, with the
  release's RMS eps of 1e-20 by default (``EngramConfig.gate_norm_eps``);
- alpha = sigmoid(copysign(sqrt(max(|score|, 1e-6)), score)): the release's signed square root, which
  gives 0.50025 (not 0.5) at score 0;
- a token mask (False at barrier tokens and, when decoding, at left padding) closes the gate by a masked
  fill, so such a position passes through unchanged even where the gate is not finite;
- **it returns x + alpha * v**, the updated stream, not a contribution (``adds_residual``): the block
  replaces its stream with the output and never adds x again (docs/PITFALLS.md §9).
Barrier ("dead") tokens and their sticky lookbacks are the hasher's (``NgramHasher``, ``barrier_ids``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from engram.model.table_config import EngramConfig
from engram.hashing import TableGeometry
from engram.model.cache import LayerCache
from engram.model.engram import GATE_SQRT_FLOOR, init_table, table_geometry_for
from engram.model.tables import MultiHeadEmbedding


class EngramV41(nn.Module):
    """The V4.1 Engram at one block: ``forward(x, hash_ids, doc_ids, cache, token_mask)`` -> x + alpha*v.

    Takes the same build arguments as ``Engram``; ``config.variant`` must be "v4.1" (its validation
    refuses a conv, biases, other gates and shared keys for this variant)."""

    adds_residual = True  # forward returns the updated stream (the paper's module returns Y)

    def __init__(self, config: EngramConfig, dim: int, geometry: TableGeometry | Sequence[int],
                 norm_eps: float = 1e-6, *, branches: int = 1, sparse_table: bool = False):
        super().__init__()
        if config.variant != "v4.1":
            raise ValueError(f"EngramV41 needs EngramConfig.variant='v4.1', got {config.variant!r}")
        geometry = table_geometry_for(config, geometry, branches, "EngramV41")
        self.config = config
        self.dim = dim
        self.branches = branches
        self.eps = config.norm_eps("gate", norm_eps)
        self.embedding = MultiHeadEmbedding(geometry, config.head_dim, sparse=sparse_table)
        self.wkv = nn.Linear(config.memory_dim, dim * (branches + 1), bias=False)  # G keys, then the value
        self.q_weight = nn.Parameter(torch.empty(branches, dim))  # the query norm's gain, per branch
        self.k_weight = nn.Parameter(torch.empty(branches, dim))  # the key norm's gain, per branch
        self._register_load_state_dict_pre_hook(_merged_gain_of_before)
        if self.wkv.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, table_std: float | None = None, table_seed: int | None = None,
                     tables: bool = True) -> None:
        """| parameter        | init                                                          |
        |------------------|---------------------------------------------------------------|
        | embedding.weight | N(0, table_std) in seeded row blocks, as ``Engram``'s          |
        | wkv.weight       | N(0, std)                                                     |
        | q_weight         | ones                                                          |
        | k_weight         | ones                                                          |
        """
        init_table(self.embedding, self.config, table_std, table_seed, tables)
        nn.init.normal_(self.wkv.weight, std=std)
        nn.init.ones_(self.q_weight)
        nn.init.ones_(self.k_weight)

    @classmethod
    def from_release_state_dict(cls, state_dict, config: EngramConfig, layer_id: int | None = None, *,
                                sparse_table: bool = False, table=None) -> "EngramV41":
        """The module holding DeepSeek-V4.1's released weights of Engram layer ``layer_id``, from a state dict
        under DeepSeek's or transformers' names, in fp32, bf16 or fp8 with its scales; every name, shape and
        the table layout are checked first (``engram.model.v41_release``). ``table``: a ``HashedTable`` that
        already serves the released rows (a storage tier over the shards); the table entries are then only
        checked by shape and dtype, never read."""
        from engram.model.v41_release import from_release_state_dict

        return from_release_state_dict(cls, state_dict, config, layer_id, sparse_table=sparse_table, table=table)

    def to_release_state_dict(self, layer_id: int | None = None, names: str = "deepseek",
                              dtype: str = "float32") -> dict[str, torch.Tensor]:
        """This module's weights under the release's names and in its dtypes (``engram.model.v41_release``)."""
        from engram.model.v41_release import to_release_state_dict

        return to_release_state_dict(self, layer_id, names, dtype)

    def _rstd(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) fp32 -> (..., 1)
        eps = torch.finfo(torch.float32).eps if self.eps is None else self.eps
        return torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)

    def _gate(self, hidden: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, G, D), key (B, T, G, D) -> alpha (B, T, G, 1) fp32."""
        h, k = hidden.float(), key.float()
        gain = self.q_weight.float() * self.k_weight.float()  # (G, D), the product in fp32
        score = (h * gain * k).sum(dim=-1, keepdim=True)  # (B, T, G, 1)
        score = score * self._rstd(h) * self._rstd(k) / math.sqrt(self.dim)
        return torch.sigmoid(torch.copysign(score.abs().clamp_min(GATE_SQRT_FLOOR).sqrt(), score))

    def _keys_value(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """e (B, T, M) -> keys (B, T, G, D), value (B, T, D)."""
        B, T = e.shape[:2]
        G, D = self.branches, self.dim
        kv = self.wkv(e)  # (B, T, (G+1) D)
        return kv[..., : G * D].view(B, T, G, D), kv[..., G * D:]

    def gate(self, hidden: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """alpha (B, T, G, 1) fp32 from hidden (B, T, G, D) and the memory e (B, T, M), without the token
        mask (``engram inspect gates`` reads it)."""
        return self._gate(hidden, self._keys_value(e)[0])

    def forward(self, hidden: torch.Tensor, hash_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                cache: LayerCache | None = None, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (B, T, G, D), hash_ids (B, T, H), token_mask (B, T) bool -> x + alpha*v (B, T, G, D).

        The arguments are ``Engram.forward``'s, the block's one calling convention: ``doc_ids`` and ``cache``
        are accepted, since document starts and decode history act through the hash ids alone (no conv)."""
        B, T = hash_ids.shape[:2]
        # 1. gather: one row per head, concatenated into e_t
        e = self.embedding(hash_ids).reshape(B, T, -1)  # (B, T, H, d_h) -> (B, T, M)
        # 2. keys and the shared value from one fused projection
        key, value = self._keys_value(e)  # (B, T, G, D), (B, T, D)
        # 3. gate per branch, closed where the token mask is False (barrier tokens pass through)
        alpha = self._gate(hidden, key)  # (B, T, G, 1) fp32
        if token_mask is not None:  # a fill, not a product: a NaN gate at a closed position stays closed
            alpha = alpha.masked_fill(~token_mask[:, :, None, None].to(torch.bool), 0.0)
        # 4. the residual is added here: the output is the new stream
        return (hidden.float() + alpha * value[:, :, None, :].float()).to(hidden.dtype)  # (B, T, G, D)


def _merged_gain_of_before(state_dict, prefix, *args) -> None:
    """State dicts written before the two gains held their product as ``norm_weight``: it becomes
    ``q_weight`` with ``k_weight`` at one, the same fp32 product."""
    merged = state_dict.pop(prefix + "norm_weight", None)
    if merged is not None and prefix + "q_weight" not in state_dict:
        state_dict[prefix + "q_weight"] = merged
        state_dict[prefix + "k_weight"] = torch.ones_like(merged)

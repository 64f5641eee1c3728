"""The Engram module (docs/ALGORITHM.md §2 steps 5-9): gather hashed n-gram rows, gate them with the hidden state,
pass them through a dilated causal short conv and return the contribution to the residual stream.

Legend: B batch, T time, G hyper-connection branches, D model width, H hash heads, d_h row width,
M = d_mem = H*d_h memory width, K conv taps.

The module takes precomputed hash ids (``NgramHasher``, once per batch for every layer) and never
touches numpy or the host in ``forward`` (docs/PITFALLS.md §11). It returns Y only; the block adds it
(docs/PITFALLS.md §9: the V4.1 variant that returns x + alpha*v is a different convention).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from engram.model.table_config import EngramConfig
from engram.hashing import TableGeometry, table_geometry  # noqa: F401 (table_geometry: its name here before)
from engram.model.cache import LayerCache
from engram.model.tables import MultiHeadEmbedding

GATE_SQRT_FLOOR = 1e-6  # sqrt'(s) explodes at 0 (docs/PITFALLS.md §10)


def table_geometry_for(config: EngramConfig, geometry: TableGeometry | Sequence[int], branches: int,
                       who: str) -> TableGeometry:
    """The layer's table geometry (a list of H prime row counts is accepted too), checked against the
    config's heads, and G checked: shared by both Engram variants."""
    if not isinstance(geometry, TableGeometry):
        geometry = TableGeometry(tuple(int(x) for x in geometry))
    if geometry.n_heads != config.n_heads:
        raise ValueError(f"need one table size per hash head ({config.n_heads}), got {geometry.n_heads}")
    if not isinstance(branches, int) or branches < 1:
        raise ValueError(f"{who}.branches: must be an int >= 1, got {branches!r}")
    return geometry


@torch.no_grad()
def init_table(embedding, config: EngramConfig, table_std: float | None, table_seed: int | None,
               tables: bool) -> None:
    """Table rows N(0, table_std) (default ``config.table_init_std``) in row blocks seeded by
    ``table_seed`` (drawn from torch's generator when None); nothing with ``tables=False`` or for a
    placement that holds no trainable rows."""
    if table_seed is None:
        table_seed = int(torch.randint(0, 2**62, ()).item())
    if tables and embedding.trainable:
        embedding.init_weights(config.table_init_std if table_std is None else table_std, table_seed)


class BranchLinear(nn.Module):
    """One matrix per branch, stored as a (G, out, in) tensor: (B, T, in) -> (B, T, G, out); with
    ``bias`` a (G, out) bias too (the official demo's W_K)."""

    def __init__(self, branches: int, in_dim: int, out_dim: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(branches, out_dim, in_dim))
        self.bias = nn.Parameter(torch.empty(branches, out_dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("btm,gdm->btgd", x, self.weight)
        return y if self.bias is None else y + self.bias


class SharedLinear(BranchLinear):
    """One bias-free matrix read by all G branches, stored as (1, out, in): (B, T, in) -> (B, T, G, out),
    G broadcast views of one product. The "no branch-specific fusion" ablation's W_K (docs/ALGORITHM.md §5)."""

    def __init__(self, branches: int, in_dim: int, out_dim: int, bias: bool = False):
        super().__init__(1, in_dim, out_dim, bias)
        self.branches = branches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).expand(-1, -1, self.branches, -1)  # (B, T, 1, out) -> (B, T, G, out)


class BranchRMSNorm(nn.Module):
    """RMSNorm with its own weight per branch: (B, T, G, D) -> (B, T, G, D), optionally kept in fp32.
    With ``branches=1`` the one (1, D) weight broadcasts over every branch (a shared norm). ``eps``
    None is fp32's machine epsilon, as ``nn.RMSNorm(eps=None)`` (the official demo's gate norms)."""

    def __init__(self, branches: int, dim: int, eps: float | None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(branches, dim))

    def forward(self, x: torch.Tensor, keep_fp32: bool = False) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps) * self.weight.float()
        return y if keep_fp32 else y.to(x.dtype)


class Engram(nn.Module):
    """One Engram module at one block. ``geometry``: its table's head sizes and offsets (the hasher's
    ``geometry[layer_id]``; a list of the H prime row counts is accepted too). ``branches``: G, the
    backbone's ``hc_mult``. ``sparse_table``: the table's gradient holds only the looked-up rows.

    The ablation switches (docs/ALGORITHM.md §5) decide at build time which parameters exist, so parameter
    accounting and checkpoints see exactly the module that runs:
    gate="none" builds no key_proj, norm_query or norm_key; short_conv=False builds no norm_conv or
    conv_weight; branch_keys=False builds key_proj as a ``SharedLinear`` and norm_key with one weight.
    The default module keeps its parameter names and order (checkpoint keys, optimizer state order).
    ``proj_bias`` adds ``key_proj.bias`` and ``value_proj.bias``; the config's ``gate_norm_eps`` and
    ``conv_norm_eps`` override ``norm_eps`` (the backbone's) for those norms: the official demo's
    module is built by ``engram.compat.deepseek.from_demo_state_dict`` (and written back by its
    ``to_demo_state_dict``).

    Built on the meta device (inside ``EngramLM``) it allocates and initialises nothing; otherwise it
    initialises itself once (``init_weights``).
    """

    adds_residual = False  # forward returns Y; the block adds it (DeepSeek-V4.1's EngramV41 returns x + Y)

    def __init__(self, config: EngramConfig, dim: int, geometry: TableGeometry | Sequence[int],
                 norm_eps: float = 1e-6, *, branches: int = 1, sparse_table: bool = False):
        super().__init__()
        geometry = table_geometry_for(config, geometry, branches, "Engram")
        G, M = branches, config.memory_dim
        gated = config.gate != "none"
        keys = G if config.branch_keys else 1
        self.config = config
        self.dim = dim
        self.branches = G
        self.embedding = MultiHeadEmbedding(geometry, config.head_dim, sparse=sparse_table)
        # W_K^g, one per branch (branch-specific fusion), or one shared by all branches
        linear = BranchLinear if config.branch_keys else SharedLinear
        self.key_proj = linear(G, M, dim, config.proj_bias) if gated else None
        self.value_proj = nn.Linear(M, dim, bias=config.proj_bias)  # W_V, shared by all branches
        gate_eps, conv_eps = config.norm_eps("gate", norm_eps), config.norm_eps("conv", norm_eps)
        self.norm_query = BranchRMSNorm(G, dim, gate_eps) if gated else None
        self.norm_key = BranchRMSNorm(keys, dim, gate_eps) if gated else None
        self.norm_conv = BranchRMSNorm(G, dim, conv_eps) if config.short_conv else None
        self.conv_weight = nn.Parameter(torch.empty(G, dim, config.kernel_size)) if config.short_conv else None
        if self.value_proj.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, table_std: float | None = None, table_seed: int | None = None,
                     tables: bool = True) -> None:
        """Initialisation, per parameter (absent ones are skipped):

        | parameter            | init                                                      |
        |----------------------|-----------------------------------------------------------|
        | embedding.weight     | N(0, table_std), row blocks seeded by ``table_seed``       |
        |                      | (``table_std`` None: ``config.table_init_std``)            |
        |                      | (drawn from torch's generator when None; ``normal_rows_``) |
        | key_proj.weight      | N(0, std)                                                  |
        | value_proj.weight    | N(0, std)                                                  |
        | key_proj.bias,       | zeros (``proj_bias`` only)                                 |
        |   value_proj.bias    |                                                            |
        | norm_*.weight        | ones                                                       |
        | conv_weight          | zeros: the conv branch starts as identity (docs/ALGORITHM.md §2 step 8) |

        ``tables=False`` leaves the table rows as they are (a checkpoint or a benchmark fills them).
        """
        init_table(self.embedding, self.config, table_std, table_seed, tables)
        nn.init.normal_(self.value_proj.weight, std=std)
        if self.key_proj is not None:
            nn.init.normal_(self.key_proj.weight, std=std)
        for bias in (self.value_proj.bias, None if self.key_proj is None else self.key_proj.bias):
            if bias is not None:
                nn.init.zeros_(bias)
        for norm in (self.norm_query, self.norm_key, self.norm_conv):
            if norm is not None:
                nn.init.ones_(norm.weight)
        if self.conv_weight is not None:
            nn.init.zeros_(self.conv_weight)

    def gate(self, hidden: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """alpha (B, T, G, 1) in fp32 (docs/PITFALLS.md §10) from hidden (B, T, G, D) and the memory e (B, T, M).

        gate="none" is the "no gating" ablation: alpha is exactly 1, so every branch takes the whole value.
        """
        if self.key_proj is None:
            return torch.ones(*hidden.shape[:-1], 1, dtype=torch.float32, device=hidden.device)
        key = self.key_proj(e)  # (B, T, G, D)
        q = self.norm_query(hidden, keep_fp32=True)
        k = self.norm_key(key, keep_fp32=True)
        score = (q * k).sum(dim=-1, keepdim=True) / math.sqrt(self.dim)  # (B, T, G, 1)
        if self.config.gate == "signed_sqrt":
            score = score.sign() * score.abs().clamp_min(GATE_SQRT_FLOOR).sqrt()
        return torch.sigmoid(score)

    def conv_residual(self, value: torch.Tensor, doc_ids: torch.Tensor | None = None,
                      cache: LayerCache | None = None) -> torch.Tensor:
        """Y = v + SiLU(conv(RMSNorm v)): (B, T, G, D) -> (B, T, G, D). Y = v with short_conv=False."""
        if self.conv_weight is None:
            return value
        return value + F.silu(self.short_conv(self.norm_conv(value), doc_ids, cache))

    def short_conv(self, x: torch.Tensor, doc_ids: torch.Tensor | None = None,
                   cache: LayerCache | None = None) -> torch.Tensor:
        """Depthwise causal conv over time with dilation N: (B, T, G, D) -> (B, T, G, D).

        Tap j reads t - (K-1-j)*N (left padding (K-1)*N, docs/PITFALLS.md §8); a tap that reaches into an
        earlier document reads zero, like the sequence start (docs/PITFALLS.md §7). The input is padded once
        and each tap is a view of it (no per-tap copy), about 2x faster than shifting copies. With a
        decode ``cache`` the padding is the last (K-1)*N normalised inputs instead (docs/PITFALLS.md §6), and
        the cache keeps the new last ones.
        """
        K, N = self.config.kernel_size, self.config.dilation
        T, P = x.shape[1], (K - 1) * N
        if cache is None:
            padded = F.pad(x, (0, 0, 0, 0, P, 0))  # (B, P+T, G, D), zeros before t = 0
        else:
            padded = torch.cat([cache.conv_history, x], dim=1)  # (B, P+T, G, D)
        docs = None if doc_ids is None else F.pad(doc_ids, (P, 0), value=-1)  # (B, P+T)
        if cache is not None:
            history = padded[:, -P:]
            if docs is not None:  # inputs before this call's document start read as zero later on
                history = history * (docs[:, -P:] == doc_ids[:, -1:])[:, :, None, None].to(x.dtype)
            cache.conv_history = history.detach().clone()
        out = x * self.conv_weight[..., K - 1]
        for j in range(K - 1):
            start = P - (K - 1 - j) * N
            tap = padded[:, start: start + T]  # (B, T, G, D) view: x[t - (K-1-j)*N]
            if docs is not None:
                same_doc = docs[:, start: start + T] == doc_ids  # (B, T)
                tap = tap * same_doc[:, :, None, None].to(tap.dtype)
            out = out + tap * self.conv_weight[..., j]
        return out

    def forward(self, hidden: torch.Tensor, hash_ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                cache: LayerCache | None = None, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (B, T, G, D), hash_ids (B, T, H) int64, doc_ids (B, T) -> Y (B, T, G, D). Both Engram
        variants take these arguments (``EngramV41.forward``), so the block calls either the same way.

        ``cache``: the block's decode state when decoding (its ``conv_history``). ``token_mask`` (B, T)
        bool: False closes the gate at that position (the model passes one only for barrier tokens, which
        the V4.1 variant alone has)."""
        B, T = hash_ids.shape[:2]
        # 1. gather: one row per head, concatenated into the memory vector e_t
        e = self.embedding(hash_ids).reshape(B, T, -1)  # (B, T, H, d_h) -> (B, T, M)
        # 2-3. key per branch and gate: the hidden state decides how much of the memory it trusts
        alpha = self.gate(hidden, e)  # (B, T, G, 1), fp32
        if token_mask is not None:
            alpha = alpha * token_mask[:, :, None, None].to(alpha.dtype)
        # 4. value: shared projection, gated per branch
        value = alpha.to(e.dtype) * self.value_proj(e)[:, :, None, :]  # (B, T, 1, D) -> (B, T, G, D)
        # 5. short conv on the normalised value, residual inside the module
        return self.conv_residual(value, doc_ids, cache)  # (B, T, G, D)

    @classmethod
    def from_demo_state_dict(cls, *args, **kwargs):
        raise AttributeError("Engram.from_demo_state_dict moved: use engram.compat.deepseek.from_demo_state_dict")

    def to_demo_state_dict(self):
        raise AttributeError("Engram.to_demo_state_dict moved: use engram.compat.deepseek.to_demo_state_dict(module)")


def __getattr__(name: str):
    if name == "DEMO_MODULE":  # the demo's numerics moved with its weights
        raise AttributeError("engram.model.engram.DEMO_MODULE moved: use engram.compat.deepseek.DEMO_MODULE")
    raise AttributeError(f"module 'engram.model.engram' has no attribute {name!r}")

"""Parameter and FLOP accounting (docs/ALGORITHM.md §4), computed from a config without building the model.

P_tot: trainable parameters excluding the input embedding and the LM head (the paper's convention).
P_act: parameters used by one token: everything in P_tot except the routed experts a token does not
    visit and the hashed tables, Engram's and OverEncoding's (a token reads H rows out of millions; the
    paper counts tables as sparse). OverEncoding's per-order projections are active.
P_sparse = P_tot - P_act: the budget split by the allocation ratio rho between routed experts and Engram.
The paper's Table 1 counts otherwise: P_tot with the embedding and the head, P_act with the head but not
the embedding (``paper_total``, ``paper_active``; what ``engram presets`` prints for the paper presets).

``tests/model/test_accounting.py`` pins every count to ``numel`` of a built model, so the
allocation sweeps can trust these numbers without instantiating huge tables.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from engram.model.config import ModelConfig
from engram.hashing import table_geometry
from engram.model.attention import attention_params, attention_score_width
from engram.model.hyper import hyper_params
from engram.model.layers import swiglu_params
from engram.model.moe import moe_params


@dataclass(frozen=True)
class ParameterCount:
    total: int  # P_tot
    active: int  # P_act
    sparse: int  # P_sparse = P_tot - P_act
    routed_experts: int  # all routed-expert parameters (active and not)
    engram_tables: int  # table rows * row width, summed over Engram layers
    engram_dense: int  # Engram projections, norms and conv (active)
    embedding: int  # input embedding (excluded from P_tot)
    head: int  # LM head (excluded from P_tot)
    flops_per_token: int  # forward FLOPs per token at max_seq_len (see ``forward_flops_per_token``)
    overencoding_tables: int = 0  # OverEncoding table rows * row width (sparse; its projections are active)

    @property
    def with_embeddings(self) -> int:
        return self.total + self.embedding + self.head

    @property
    def paper_total(self) -> int:
        """P_tot as the paper's Table 1 counts it: every parameter, the embedding and the head included."""
        return self.with_embeddings

    @property
    def paper_active(self) -> int:
        """P_act as Table 1 counts it: the head included, the token embedding (a lookup) not."""
        return self.active + self.head

    @property
    def engram_share_of_sparse(self) -> float:
        """1 - rho: share of P_sparse held by Engram tables."""
        return self.engram_tables / self.sparse if self.sparse else 0.0

    def to_dict(self) -> dict:
        return asdict(self) | {"with_embeddings": self.with_embeddings, "paper_total": self.paper_total,
                               "paper_active": self.paper_active,
                               "engram_share_of_sparse": self.engram_share_of_sparse}


def engram_dense_params(config: ModelConfig) -> int:
    """Per Engram layer: shared W_V; unless gate="none", W_K and the key norm (per branch, or one shared
    with branch_keys=False) and the per-branch query norm; with short_conv, the per-branch conv norm
    and depthwise conv taps; with proj_bias, a bias on W_V and on each W_K. The V4.1 variant: its fused
    wkv and the query and key gains, (G, D) each."""
    e, D = config.engram, config.backbone.d_model
    G, M = config.branches, e.memory_dim
    if e.variant == "v4.1":  # one fused wkv M -> D*(G+1) and the query and key gains (G, D) each
        return M * D * (G + 1) + 2 * G * D
    bias = D if e.proj_bias else 0
    params = M * D + bias
    if e.gate != "none":
        keys = G if e.branch_keys else 1
        params += keys * (M * D + bias) + keys * D + G * D
    if e.short_conv:
        params += G * D + G * D * e.kernel_size
    return params


def engram_table_params(config: ModelConfig) -> int:
    e = config.engram
    if e is None or not e.layer_ids:
        return 0
    return sum(g.num_rows for g in table_geometry(e, e.layer_ids).values()) * e.head_dim


def overencoding_table_params(config: ModelConfig) -> int:
    """The input's one table (its own prime search, so the rows of one Engram layer of equal sizes)."""
    o = config.overencoding
    if o is None:
        return 0
    return table_geometry(o, [0])[0].num_rows * o.head_dim


def overencoding_dense_params(config: ModelConfig) -> int:
    """One E -> D projection per order, none when E = D."""
    o, D = config.overencoding, config.backbone.d_model
    if o is None or o.n_embed_per_ngram == D:
        return 0
    return o.n_orders * o.n_embed_per_ngram * D


def forward_flops_per_token(config: ModelConfig, active_matmul_params: int, seq_len: int) -> int:
    """2 FLOPs per active weight (including the head) plus attention scores and mixing.

    Causal attention at sequence length T attends to (T+1)/2 keys on average; QK^T and AV each cost
    2 * heads * head_dim FLOPs per key. Element-wise work (norms, gates, activations) is ignored, as
    usual; a training step costs about 3x the forward.
    """
    bb = config.backbone
    attn = 2 * bb.n_layers * bb.n_heads * attention_score_width(bb) * (seq_len + 1) // 2
    return 2 * active_matmul_params + attn


def count_parameters(config: ModelConfig, seq_len: int | None = None) -> ParameterCount:
    """P_tot, P_act, P_sparse, Engram and embedding/head parameters, and forward FLOPs per token."""
    bb = config.backbone
    D, V = bb.d_model, bb.vocab_size
    if V is None:
        raise ValueError("count_parameters: backbone.vocab_size is None (it comes from the data); count a "
                         "config aligned with its data (ModelConfig.with_data) or set the vocabulary")
    total = active = routed = 0
    for layer_id in range(bb.n_layers):
        block = attention_params(bb) + 2 * D + 2 * hyper_params(D, bb.hc_mult)  # attn, 2 norms, 2 residuals
        if bb.moe is not None and layer_id >= bb.moe.first_dense_layers:
            moe_total, moe_active = moe_params(D, bb.moe)
            total += block + moe_total
            active += block + moe_active
            routed += bb.moe.n_routed_experts * swiglu_params(D, bb.moe.expert_hidden)
        else:
            total += block + swiglu_params(D, bb.ffn_hidden)
            active += block + swiglu_params(D, bb.ffn_hidden)
        if layer_id in config.engram_layer_ids:
            total += engram_dense_params(config)
            active += engram_dense_params(config)
    total += D + overencoding_dense_params(config)  # final norm, OverEncoding projections
    active += D + overencoding_dense_params(config)
    tables = engram_table_params(config)
    oe_tables = overencoding_table_params(config)
    total += tables + oe_tables
    engram_dense = engram_dense_params(config) * len(config.engram_layer_ids) if config.engram else 0
    flops = forward_flops_per_token(config, active + D * V, seq_len or bb.max_seq_len)
    return ParameterCount(total=total, active=active, sparse=total - active, routed_experts=routed,
                          engram_tables=tables, engram_dense=engram_dense, embedding=V * D, head=V * D,
                          flops_per_token=flops, overencoding_tables=oe_tables)


def format_count(count: ParameterCount) -> str:
    """A short human-readable table."""
    rows = [("P_tot", count.total), ("P_act", count.active), ("P_sparse", count.sparse),
            ("routed experts", count.routed_experts), ("Engram tables", count.engram_tables),
            ("Engram dense", count.engram_dense), ("OverEncoding tables", count.overencoding_tables),
            ("embedding", count.embedding), ("head", count.head),
            ("FLOPs/token (fwd)", count.flops_per_token)]
    return "\n".join(f"{name:<19} {value:>16,}" for name, value in rows)

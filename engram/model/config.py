"""The model's configs: ``BackboneConfig`` (with ``MoEConfig``, ``YarnConfig``, ``MLAConfig``) and
``ModelConfig`` (a backbone plus optional Engram modules and OverEncoding, whose configs live in
``engram.model.table_config``). Named presets are ``engram.presets``.

Fields the data decides are *derived* (``derived(...)``): ``backbone.vocab_size`` and the tables'
``pad_id``. ``None`` means "take it from the data"; a value the user set is kept and must agree with
the data (``ModelConfig.with_data`` fills the first and refuses a conflict, never overwriting).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from engram.model.table_config import EngramConfig, OverEncodingConfig
from engram.schema import Serialisable, derived, nested, pos_int, require

@dataclass
class MoEConfig(Serialisable):
    """DeepSeekMoE: shared experts every token uses plus fine-grained routed experts, top-k.

    Routing scores are sigmoids of a linear router; a per-expert bias (not a parameter, not trained
    by gradient) is added only when choosing the top-k and moves by ``bias_update_rate`` per step
    toward balanced load (auxiliary-loss-free balancing). Blocks ``< first_dense_layers`` use the
    dense SwiGLU FFN instead (the paper keeps the first block dense).
    """

    n_routed_experts: int = 8
    n_shared_experts: int = 1
    top_k: int = 2
    expert_hidden: int = 128
    first_dense_layers: int = 1
    bias_update_rate: float = 1e-3
    route_scale: float = 1.0

    def __post_init__(self) -> None:
        c = "MoEConfig"
        pos_int(c, "n_routed_experts", self.n_routed_experts)
        pos_int(c, "n_shared_experts", self.n_shared_experts, minimum=0)
        pos_int(c, "top_k", self.top_k)
        require(self.top_k <= self.n_routed_experts, c, "top_k",
                f"must be <= n_routed_experts={self.n_routed_experts}, got {self.top_k}")
        pos_int(c, "expert_hidden", self.expert_hidden)
        pos_int(c, "first_dense_layers", self.first_dense_layers, minimum=0)
        require(isinstance(self.bias_update_rate, (int, float)) and self.bias_update_rate >= 0,
                c, "bias_update_rate", f"must be a float >= 0, got {self.bias_update_rate!r}")
        require(isinstance(self.route_scale, (int, float)) and self.route_scale > 0,
                c, "route_scale", f"must be a float > 0, got {self.route_scale!r}")


@dataclass
class YarnConfig(Serialisable):
    """YaRN RoPE scaling (Peng et al. 2023) as DeepSeek-V2/V3 apply it, which the Engram paper follows for
    its context extension (§5: s = 10, alpha = 1, beta = 32, attention factor 0.707).

    factor: s, the extension (new context / ``original_max_seq_len``).
    original_max_seq_len: L, the context the model was pre-trained at.
    beta_fast, beta_slow: beta and alpha of the ramp, in rotations over L: RoPE dimensions that turn more
        than beta_fast times keep their frequency, those under beta_slow are divided by s, and the ones
        between are blended linearly (over whole dimensions: DeepSeek floors the fast end, ceils the slow).
    mscale: the "attention factor": q.k logits are multiplied by (0.1 * mscale * ln s + 1)^2 (YaRN's
        1/t; DeepSeek-V2's configs give mscale = 0.707). With s = 1 this is 1 and YaRN is plain RoPE.
    """

    factor: float = 10.0
    original_max_seq_len: int = 256
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.707

    def __post_init__(self) -> None:
        c = "YarnConfig"
        for name in ("factor", "beta_fast", "beta_slow", "mscale"):
            value = getattr(self, name)
            require(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf"),
                    c, name, f"must be a number > 0, got {value!r}")
        require(self.factor >= 1, c, "factor", f"must be >= 1 (an extension), got {self.factor}")
        require(self.beta_fast > self.beta_slow, c, "beta_fast",
                f"must be above beta_slow={self.beta_slow}, got {self.beta_fast}")
        pos_int(c, "original_max_seq_len", self.original_max_seq_len)


@dataclass
class MLAConfig(Serialisable):
    """Multi-head latent attention (DeepSeek-V2/V3): keys and values come from one low-rank latent
    c = RMSNorm(W_kv_a x) of ``kv_lora_rank`` features per token, plus one RoPE key of ``qk_rope_head_dim``
    shared by every head (the "decoupled" RoPE key). A decode cache holds only c and that key per token.

    Weights (bias-free): queries ``wq`` D -> h*(nope+rope), or with ``q_lora_rank`` > 0 a low-rank pair
    ``wq_a`` D -> r_q, ``q_norm`` (r_q), ``wq_b`` r_q -> h*(nope+rope); ``wkv_a`` D -> r_kv + rope, ``kv_norm``
    (r_kv), ``wkv_b`` r_kv -> h*(nope + v); ``wo`` h*v -> D. Scores are scaled by 1/sqrt(nope + rope).
    """

    q_lora_rank: int = 0
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16

    def __post_init__(self) -> None:
        c = "MLAConfig"
        if self.q_lora_rank is None:  # DeepSeek's configs write null for "no low-rank query"
            self.q_lora_rank = 0
        pos_int(c, "q_lora_rank", self.q_lora_rank, minimum=0)
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            pos_int(c, name, getattr(self, name))
        require(self.qk_rope_head_dim % 2 == 0, c, "qk_rope_head_dim",
                f"must be even for RoPE, got {self.qk_rope_head_dim}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass
class BackboneConfig(Serialisable):
    """The decoder-only transformer that hosts Engram.

    vocab_size: raw token ids. Derived: ``None`` takes the training tokenizer's size.
    hc_mult: G, hyper-connection branches (mHC); 1 gives a plain residual stream. Engram modules read
        and write all G branches.
    ffn_hidden: width of the dense SwiGLU FFN (every block when ``moe`` is None, else the first
        ``moe.first_dense_layers`` blocks).
    rope_scaling: None (plain RoPE) or a ``YarnConfig`` (context extension).
    mla: None (multi-head attention with ``n_kv_heads`` grouped key/value heads of width d_model/n_heads)
        or an ``MLAConfig`` (multi-head latent attention, the paper's; ``n_kv_heads`` must then be unset
        or ``n_heads``, and the head widths are the ``MLAConfig``'s).
    document_mask: attention in a packed batch stays inside each document (causal and block-diagonal by
        the batch's ``boundary``), as the n-grams and the conv do. Configs written before it existed load
        with False, the attention their checkpoints were trained with.
    """

    vocab_size: int | None = derived(512, "the tokenizer's size")
    n_layers: int = 4
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int | None = None
    ffn_hidden: int = 172
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    hc_mult: int = 1
    hc_sinkhorn_iters: int = 20
    moe: MoEConfig | None = None
    rope_scaling: YarnConfig | None = None
    document_mask: bool = True
    mla: MLAConfig | None = None

    NESTED = {"moe": MoEConfig, "rope_scaling": YarnConfig, "mla": MLAConfig}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if isinstance(data, dict) and "document_mask" not in data:  # written before document-masked attention
            data = data | {"document_mask": False}
        return super().from_dict(data)

    def __post_init__(self) -> None:
        c = "BackboneConfig"
        nested(self, "rope_scaling", YarnConfig, c, optional=True)
        require(isinstance(self.document_mask, bool), c, "document_mask",
                f"must be true or false, got {self.document_mask!r}")
        if self.vocab_size is not None:
            pos_int(c, "vocab_size", self.vocab_size, minimum=2)
        pos_int(c, "n_layers", self.n_layers)
        pos_int(c, "d_model", self.d_model)
        pos_int(c, "n_heads", self.n_heads)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        pos_int(c, "n_kv_heads", self.n_kv_heads)
        nested(self, "mla", MLAConfig, c, optional=True)
        if self.mla is None:  # MLA's head widths are its own (MLAConfig), and it has no grouped heads
            require(self.d_model % self.n_heads == 0, c, "d_model",
                    f"must be divisible by n_heads={self.n_heads}, got {self.d_model}")
            require((self.d_model // self.n_heads) % 2 == 0, c, "d_model",
                    f"head width d_model/n_heads must be even for RoPE, got {self.d_model // self.n_heads}")
            require(self.n_heads % self.n_kv_heads == 0, c, "n_kv_heads",
                    f"must divide n_heads={self.n_heads} (grouped-query attention), got {self.n_kv_heads}")
        else:
            require(self.n_kv_heads == self.n_heads, c, "n_kv_heads",
                    f"must equal n_heads={self.n_heads} (or be unset) with MLA, whose keys and values come from one "
                    f"latent per token, got {self.n_kv_heads}")
        pos_int(c, "ffn_hidden", self.ffn_hidden)
        pos_int(c, "max_seq_len", self.max_seq_len)
        require(isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0, c, "rope_theta",
                f"must be > 0, got {self.rope_theta!r}")
        require(isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0, c, "norm_eps",
                f"must be > 0, got {self.norm_eps!r}")
        pos_int(c, "hc_mult", self.hc_mult)
        pos_int(c, "hc_sinkhorn_iters", self.hc_sinkhorn_iters)
        nested(self, "moe", MoEConfig, c, optional=True)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rope_dim(self) -> int:
        """The width RoPE rotates: the head width, or MLA's decoupled RoPE key."""
        return self.mla.qk_rope_head_dim if self.mla is not None else self.head_dim


@dataclass
class ModelConfig(Serialisable):
    """A backbone plus optional Engram modules and an optional OverEncoding input; ``engram=None`` (or
    no layer_ids) and ``overencoding=None`` is the baseline. Either, both or neither may be present."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    engram: EngramConfig | None = None
    overencoding: OverEncodingConfig | None = None

    NESTED = {"backbone": BackboneConfig, "engram": EngramConfig, "overencoding": OverEncodingConfig}

    def __post_init__(self) -> None:
        c = "ModelConfig"
        nested(self, "backbone", BackboneConfig, c)
        nested(self, "engram", EngramConfig, c, optional=True)
        nested(self, "overencoding", OverEncodingConfig, c, optional=True)
        vocab = self.backbone.vocab_size
        for name, tables in (("engram", self.engram), ("overencoding", self.overencoding)):
            if tables is not None and tables.pad_id is not None and vocab is not None:
                require(tables.pad_id < vocab, c, f"{name}.pad_id",
                        f"raw pad id {tables.pad_id} is outside backbone.vocab_size={vocab}")
        if self.engram is not None:
            bad = [lid for lid in self.engram.layer_ids if lid >= self.backbone.n_layers]
            require(not bad, c, "engram.layer_ids",
                    f"{bad} out of range for backbone.n_layers={self.backbone.n_layers} (ids are 0-based)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        """Also reads 0.1 configs, whose ``engram.hc_mult`` repeated ``backbone.hc_mult``: accepted
        when the two agree, refused (naming both) when they do not."""
        if isinstance(data, dict) and isinstance(data.get("engram"), dict) and "hc_mult" in data["engram"]:
            g = data["engram"]["hc_mult"]
            backbone = data.get("backbone")
            bg = backbone.get("hc_mult", 1) if isinstance(backbone, dict) else getattr(backbone, "hc_mult", 1)
            if g != bg:
                raise ValueError(f"ModelConfig.engram.hc_mult: the module reads and writes every branch, so it "
                                 f"must equal backbone.hc_mult={bg}, got {g} (G now lives in backbone.hc_mult only)")
        return super().from_dict(data)

    @property
    def engram_layer_ids(self) -> list[int]:
        return [] if self.engram is None else list(self.engram.layer_ids)

    @property
    def branches(self) -> int:
        """G, the residual stream's copies: the backbone's ``hc_mult``."""
        return self.backbone.hc_mult

    def derived_fields(self) -> dict[str, Any]:
        """Dotted name -> current value of every field the data decides (None: not set yet)."""
        out = {"backbone.vocab_size": self.backbone.vocab_size}
        for name in ("engram", "overencoding"):
            tables = getattr(self, name)
            if tables is not None:
                out[f"{name}.pad_id"] = tables.pad_id
        return out

    def with_data(self, vocab_size: int, pad_id: int) -> "ModelConfig":
        """This config with its derived fields taken from the data: a field left at ``None`` gets the
        data's value; a field set by the user must already equal it (ValueError naming the field, both
        values and the fix). The data never overwrites what the user set."""
        wanted = {"backbone.vocab_size": vocab_size, "engram.pad_id": pad_id, "overencoding.pad_id": pad_id}
        conflicts = [f"model.{k}={v} but the data gives {wanted[k]}"
                     for k, v in self.derived_fields().items() if v is not None and v != wanted[k]]
        if conflicts:
            raise ValueError("; ".join(conflicts) + ". These fields come from the data: set them to null "
                             "(e.g. --set model.backbone.vocab_size=null) to take the data's values, or "
                             "change the data")
        backbone = dataclasses.replace(self.backbone, vocab_size=vocab_size)
        engram = None if self.engram is None else dataclasses.replace(self.engram, pad_id=pad_id)
        over = None if self.overencoding is None else dataclasses.replace(self.overencoding, pad_id=pad_id)
        return ModelConfig(backbone=backbone, engram=engram, overencoding=over)

    def without_data(self) -> "ModelConfig":
        """This config with its derived fields unset (``None``), so that training takes them from the
        data (what a run preset built from a model preset does)."""
        backbone = dataclasses.replace(self.backbone, vocab_size=None)
        engram = None if self.engram is None else dataclasses.replace(self.engram, pad_id=None)
        over = None if self.overencoding is None else dataclasses.replace(self.overencoding, pad_id=None)
        return ModelConfig(backbone=backbone, engram=engram, overencoding=over)

    def unresolved(self) -> list[str]:
        """Derived fields still ``None``: a model cannot be built until the data (or the user) sets them."""
        return [k for k, v in self.derived_fields().items() if v is None]

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
        """The named model preset (``engram.model.presets``)."""
        from engram.model.presets import get_preset  # presets are built from this module's classes

        return get_preset(name)


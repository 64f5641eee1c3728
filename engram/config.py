"""Configuration dataclasses: what a model is, validated once, saved beside every checkpoint.

Every config validates itself in ``__post_init__`` and raises ``ValueError`` naming the field and the
reason. ``to_dict`` / ``from_dict`` round-trip through plain JSON types; unknown keys are refused so a
typo in a saved or user-supplied config never passes silently. Configs written by earlier versions
load: ``from_dict`` migrates their moved fields (see ``ModelConfig.from_dict``).

Fields the data decides are *derived* (``derived(...)``): ``backbone.vocab_size`` and the tables'
``pad_id``. ``None`` means "take it from the data"; a value the user set is kept and must agree with
the data (``ModelConfig.with_data`` fills the first and refuses a conflict, never overwriting).

Named presets live in ``engram.presets``; ``--set key=value`` parsing beside the CLI.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

GATES = ("signed_sqrt", "sigmoid", "none")
VARIANTS = ("paper", "v4.1")
OPTIMIZERS = ("adamw", "muon")
PARALLEL = ("ddp", "fsdp")
DERIVED = "derived"  # dataclass field metadata key: what in the data decides the field


def _require(ok: bool, cls: str, name: str, why: str) -> None:
    if not ok:
        raise ValueError(f"{cls}.{name}: {why}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _pos_int(cls: str, name: str, value: Any, minimum: int = 1) -> None:
    _require(_is_int(value), cls, name, f"must be an int, got {value!r}")
    _require(value >= minimum, cls, name, f"must be >= {minimum}, got {value}")


def derived(default: Any, source: str):
    """A field the data decides (``source`` says what in the data): ``None`` takes the data's value; a
    value set by the user is kept and checked against the data (``ModelConfig.with_data``)."""
    return field(default=default, metadata={DERIVED: source})


class _Serialisable:
    """to_dict/from_dict for (nested) config dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__}: expected a dict, got {type(data).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(known)}")
        kwargs = {}
        for name, value in data.items():
            sub = _NESTED.get((cls.__name__, name))
            kwargs[name] = sub.from_dict(value) if (sub is not None and value is not None) else value
        return cls(**kwargs)


@dataclass
class TableConfig(_Serialisable):
    """Hashed n-gram tables (SPEC §2 steps 1-5), shared by Engram and OverEncoding: equal fields give the
    same hashing, the same prime-sized heads and the same row width, whichever module reads them.
    The field names are the official demo's.

    engram_vocab_size: nominal table rows per hash head, one entry per n-gram order 2..N; each head
        gets its own prime a little above this (SPEC §2 step 3).
    max_ngram_size: N, the largest n-gram order.
    n_embed_per_ngram: width of one order's slice of the memory; d_h = n_embed_per_ngram / K.
    n_head_per_ngram: K, hash heads per order; H = K * (N - 1) in total.
    pad_id: the *raw* pad id; its compressed image pads n-grams on the left and across boundaries.
        Derived: ``None`` takes the training data's pad id (2 is the demo's).
    seed: base seed of the per-layer multipliers (numpy PCG64, SPEC §2 step 2).
    compress: False hashes raw ids (compressed id = raw id, V' = raw vocabulary) even when the model
        is given a CompressedTokenizer (the "no tokenizer compression" ablation, SPEC §5).
    """

    engram_vocab_size: list[int] = field(default_factory=lambda: [129280 * 5, 129280 * 5])
    max_ngram_size: int = 3
    n_embed_per_ngram: int = 512
    n_head_per_ngram: int = 8
    pad_id: int | None = derived(2, "the tokenizer's pad id")
    seed: int = 0
    compress: bool = True

    def __post_init__(self) -> None:
        c = type(self).__name__
        _pos_int(c, "max_ngram_size", self.max_ngram_size, minimum=2)
        _require(isinstance(self.engram_vocab_size, (list, tuple)), c, "engram_vocab_size",
                 f"must be a list with one size per n-gram order, got {self.engram_vocab_size!r}")
        self.engram_vocab_size = list(self.engram_vocab_size)
        _require(len(self.engram_vocab_size) == self.max_ngram_size - 1, c, "engram_vocab_size",
                 f"needs one entry per order 2..{self.max_ngram_size} "
                 f"({self.max_ngram_size - 1} entries), got {len(self.engram_vocab_size)}")
        for size in self.engram_vocab_size:
            _require(_is_int(size) and size >= 2, c, "engram_vocab_size",
                     f"every size must be an int >= 2, got {size!r}")
        _pos_int(c, "n_head_per_ngram", self.n_head_per_ngram)
        _pos_int(c, "n_embed_per_ngram", self.n_embed_per_ngram)
        _require(self.n_embed_per_ngram % self.n_head_per_ngram == 0, c, "n_embed_per_ngram",
                 f"must be divisible by n_head_per_ngram={self.n_head_per_ngram}, "
                 f"got {self.n_embed_per_ngram}")
        if self.pad_id is not None:
            _pos_int(c, "pad_id", self.pad_id, minimum=0)
        _require(_is_int(self.seed) and self.seed >= 0, c, "seed", f"must be an int >= 0, got {self.seed!r}")
        _require(isinstance(self.compress, bool), c, "compress", f"must be true or false, got {self.compress!r}")

    @property
    def n_orders(self) -> int:
        return self.max_ngram_size - 1

    @property
    def n_heads(self) -> int:
        """H: hash heads over all orders."""
        return self.n_head_per_ngram * self.n_orders

    @property
    def head_dim(self) -> int:
        """d_h: width of one table row."""
        return self.n_embed_per_ngram // self.n_head_per_ngram

    @property
    def memory_dim(self) -> int:
        """d_mem = H * d_h: width of the concatenated memory vector e_t."""
        return self.n_heads * self.head_dim


# The tables' initial std: DeepSeek's demo code draws N(0, 1) (the reference); issue 17's init study
# chose N(0, 0.02) on seeds 0-2 and confirmed it on seeds 3-5 (docs/RESULTS.md §4).
TABLE_INIT_REFERENCE = 1.0
TABLE_INIT_STD = 0.02

# The official demo module's numerics (SPEC §2): biased W_K and W_V, nn.RMSNorm's default eps (None: the
# fp32 machine epsilon) on the gate's norms and eps 1e-5 on the conv's.
DEMO_MODULE = {"proj_bias": True, "gate_norm_eps": None, "conv_norm_eps": 1e-5}


@dataclass
class EngramConfig(TableConfig):
    """The Engram module (SPEC §2): its tables (``TableConfig``'s fields) plus where it sits and how it
    reads them. The number of hyper-connection branches G it reads and writes is the backbone's
    ``hc_mult``, the one source for G.

    layer_ids: 0-based blocks that hold an Engram module (the paper's "layer 2" is 1 here).
    kernel_size: taps of the dilated causal short conv (its dilation is max_ngram_size).
    gate: "signed_sqrt" (demo and paper kernels, default), "sigmoid" (plain sigmoid of the score) or
        "none" (alpha = 1: no gating, and no W_K or query/key norms are built).

    Ablation switches (SPEC §5; the defaults are the paper's module; ``compress`` is a table field):
    short_conv: False drops the dilated short conv and its norm: Y = the gated value.
    branch_keys: False shares one W_K and one key RMSNorm across the G branches (no "branch-specific
        fusion"); the query norm and the gate stay per branch. Same as True when G = 1.
    table_init_std: the standard deviation of the tables' initial rows. Default 0.02
        (``TABLE_INIT_STD``): issue 17's study (docs/RESULTS.md §4) found it 0.057 nats better than
        DeepSeek's N(0, 1) on average, on 6 of 6 seeds (chosen on 0-2, confirmed on 3-5). The reference init stays available by name,
        ``TABLE_INIT_REFERENCE`` = 1.0 (``--set model.engram.table_init_std=1``); 0 starts every row at zero.

    The official demo's numerics (``DEMO_MODULE``; ``Engram.from_demo_state_dict`` switches them on):
    proj_bias: W_K and W_V carry biases (the demo's ``nn.Linear`` layers); ours have none by default.
    gate_norm_eps: eps of the query and key RMSNorms; conv_norm_eps: eps of the conv's RMSNorms. Each is
        "backbone" (the backbone's ``norm_eps``, the default), a float > 0, or None: fp32's machine
        epsilon, which is what ``nn.RMSNorm(eps=None)`` uses on the demo's fp32 weights (our norms
        always compute in fp32).

    variant: "paper" (the paper's and demo's module, ``Engram``) or "v4.1" (DeepSeek-V4.1's production
        module, ``EngramV41``: no conv, so ``short_conv`` must be false; one fused W_K/W_V, merged norm
        gains, returns x + alpha*v; SPEC §2b and docs/DEEPSEEK.md). The preset ``tiny-engram-v41`` has
        V4.1's orders 2..4 with 8 heads each.
    barrier_ids: raw token ids (V4.1 only; e.g. image tokens) that no n-gram crosses: a barrier hashes as
        all pad, a lookback that reaches one (or the sequence start) is pad and so is every older one
        ("sticky"), and the module's gate is closed at barrier positions.
    """

    layer_ids: list[int] = field(default_factory=lambda: [1, 15])
    kernel_size: int = 4
    gate: str = "signed_sqrt"
    short_conv: bool = True
    branch_keys: bool = True
    table_init_std: float = TABLE_INIT_STD
    proj_bias: bool = False
    gate_norm_eps: float | str | None = "backbone"
    conv_norm_eps: float | str | None = "backbone"
    variant: str = "paper"
    barrier_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        c = "EngramConfig"
        _require(isinstance(self.layer_ids, (list, tuple)), c, "layer_ids",
                 f"must be a list of 0-based block indices, got {self.layer_ids!r}")
        self.layer_ids = list(self.layer_ids)
        for lid in self.layer_ids:
            _require(_is_int(lid) and lid >= 0, c, "layer_ids",
                     f"must hold 0-based block indices (ints >= 0), got {lid!r}")
        _require(len(set(self.layer_ids)) == len(self.layer_ids), c, "layer_ids",
                 f"must not repeat a block, got {self.layer_ids}")
        _pos_int(c, "kernel_size", self.kernel_size)
        _require(self.gate in GATES, c, "gate", f"must be one of {GATES}, got {self.gate!r}")
        for name in ("short_conv", "branch_keys", "proj_bias"):
            value = getattr(self, name)
            _require(isinstance(value, bool), c, name, f"must be true or false, got {value!r}")
        _require(isinstance(self.table_init_std, (int, float)) and not isinstance(self.table_init_std, bool)
                 and 0 <= self.table_init_std < float("inf"), c, "table_init_std",
                 f"must be a finite number >= 0, got {self.table_init_std!r}")
        for name in ("gate_norm_eps", "conv_norm_eps"):
            value = getattr(self, name)
            _require(value is None or value == "backbone" or (
                isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")),
                c, name, f'must be "backbone", null (the dtype\'s machine epsilon) or a number > 0, got {value!r}')
        _require(self.variant in VARIANTS, c, "variant", f"must be one of {VARIANTS}, got {self.variant!r}")
        _require(isinstance(self.barrier_ids, (list, tuple)) and all(_is_int(i) and i >= 0 for i in self.barrier_ids),
                 c, "barrier_ids", f"must be a list of raw token ids >= 0, got {self.barrier_ids!r}")
        self.barrier_ids = sorted(self.barrier_ids)  # a set: one order, so layouts compare equal
        _require(len(set(self.barrier_ids)) == len(self.barrier_ids), c, "barrier_ids",
                 f"must not repeat an id, got {self.barrier_ids}")
        if self.variant == "v4.1":
            for name, want in (("short_conv", False), ("gate", "signed_sqrt"), ("branch_keys", True),
                               ("proj_bias", False)):
                _require(getattr(self, name) == want, c, name,
                         f"the v4.1 variant has {name}={want!r} (SPEC §2b), got {getattr(self, name)!r}")
        else:
            _require(not self.barrier_ids, c, "barrier_ids",
                     "barrier tokens belong to the v4.1 variant (set variant='v4.1')")

    def norm_eps(self, which: str, backbone_eps: float) -> float | None:
        """The eps of the ``which`` ("gate" or "conv") RMSNorms: None means the dtype's machine epsilon."""
        value = self.gate_norm_eps if which == "gate" else self.conv_norm_eps
        return backbone_eps if value == "backbone" else value

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        # Configs written by 0.1 carry G here too (``hc_mult``). ModelConfig.from_dict checks it against
        # backbone.hc_mult before it gets here; a lone EngramConfig (a budget's template) has no backbone.
        if isinstance(data, dict) and "hc_mult" in data:
            data = {k: v for k, v in data.items() if k != "hc_mult"}
        return super().from_dict(data)

    @property
    def dilation(self) -> int:
        return self.max_ngram_size


@dataclass
class OverEncodingConfig(TableConfig):
    """OverEncoding (Huang et al. 2025): hashed n-gram embeddings averaged into the input embedding.

    Exactly ``TableConfig``: an OverEncoding model and an Engram model with equal table fields have the
    same hashing, table rows and row width (the paper's "Engram beats OverEncoding at equal memory",
    SPEC §4). Layers, the conv, the gate and the module switches have no meaning at the input.
    """


@dataclass
class MoEConfig(_Serialisable):
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
        _pos_int(c, "n_routed_experts", self.n_routed_experts)
        _pos_int(c, "n_shared_experts", self.n_shared_experts, minimum=0)
        _pos_int(c, "top_k", self.top_k)
        _require(self.top_k <= self.n_routed_experts, c, "top_k",
                 f"must be <= n_routed_experts={self.n_routed_experts}, got {self.top_k}")
        _pos_int(c, "expert_hidden", self.expert_hidden)
        _pos_int(c, "first_dense_layers", self.first_dense_layers, minimum=0)
        _require(isinstance(self.bias_update_rate, (int, float)) and self.bias_update_rate >= 0,
                 c, "bias_update_rate", f"must be a float >= 0, got {self.bias_update_rate!r}")
        _require(isinstance(self.route_scale, (int, float)) and self.route_scale > 0,
                 c, "route_scale", f"must be a float > 0, got {self.route_scale!r}")


@dataclass
class YarnConfig(_Serialisable):
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
            _require(isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf"),
                     c, name, f"must be a number > 0, got {value!r}")
        _require(self.factor >= 1, c, "factor", f"must be >= 1 (an extension), got {self.factor}")
        _require(self.beta_fast > self.beta_slow, c, "beta_fast",
                 f"must be above beta_slow={self.beta_slow}, got {self.beta_fast}")
        _pos_int(c, "original_max_seq_len", self.original_max_seq_len)


@dataclass
class MLAConfig(_Serialisable):
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
        _pos_int(c, "q_lora_rank", self.q_lora_rank, minimum=0)
        for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            _pos_int(c, name, getattr(self, name))
        _require(self.qk_rope_head_dim % 2 == 0, c, "qk_rope_head_dim",
                 f"must be even for RoPE, got {self.qk_rope_head_dim}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass
class BackboneConfig(_Serialisable):
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

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if isinstance(data, dict) and "document_mask" not in data:  # written before issue 19
            data = data | {"document_mask": False}
        return super().from_dict(data)

    def __post_init__(self) -> None:
        c = "BackboneConfig"
        if isinstance(self.rope_scaling, dict):
            self.rope_scaling = YarnConfig.from_dict(self.rope_scaling)
        _require(self.rope_scaling is None or isinstance(self.rope_scaling, YarnConfig), c, "rope_scaling",
                 f"must be a YarnConfig or None, got {type(self.rope_scaling).__name__}")
        _require(isinstance(self.document_mask, bool), c, "document_mask",
                 f"must be true or false, got {self.document_mask!r}")
        if self.vocab_size is not None:
            _pos_int(c, "vocab_size", self.vocab_size, minimum=2)
        _pos_int(c, "n_layers", self.n_layers)
        _pos_int(c, "d_model", self.d_model)
        _pos_int(c, "n_heads", self.n_heads)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        _pos_int(c, "n_kv_heads", self.n_kv_heads)
        if isinstance(self.mla, dict):
            self.mla = MLAConfig.from_dict(self.mla)
        _require(self.mla is None or isinstance(self.mla, MLAConfig), c, "mla",
                 f"must be an MLAConfig or None, got {type(self.mla).__name__}")
        if self.mla is None:  # MLA's head widths are its own (MLAConfig), and it has no grouped heads
            _require(self.d_model % self.n_heads == 0, c, "d_model",
                     f"must be divisible by n_heads={self.n_heads}, got {self.d_model}")
            _require((self.d_model // self.n_heads) % 2 == 0, c, "d_model",
                     f"head width d_model/n_heads must be even for RoPE, got {self.d_model // self.n_heads}")
            _require(self.n_heads % self.n_kv_heads == 0, c, "n_kv_heads",
                     f"must divide n_heads={self.n_heads} (grouped-query attention), got {self.n_kv_heads}")
        else:
            _require(self.n_kv_heads == self.n_heads, c, "n_kv_heads",
                     f"must equal n_heads={self.n_heads} (or be unset) with MLA, whose keys and values come from one "
                     f"latent per token, got {self.n_kv_heads}")
        _pos_int(c, "ffn_hidden", self.ffn_hidden)
        _pos_int(c, "max_seq_len", self.max_seq_len)
        _require(isinstance(self.rope_theta, (int, float)) and self.rope_theta > 0, c, "rope_theta",
                 f"must be > 0, got {self.rope_theta!r}")
        _require(isinstance(self.norm_eps, (int, float)) and self.norm_eps > 0, c, "norm_eps",
                 f"must be > 0, got {self.norm_eps!r}")
        _pos_int(c, "hc_mult", self.hc_mult)
        _pos_int(c, "hc_sinkhorn_iters", self.hc_sinkhorn_iters)
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        _require(self.moe is None or isinstance(self.moe, MoEConfig), c, "moe",
                 f"must be a MoEConfig or None, got {type(self.moe).__name__}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rope_dim(self) -> int:
        """The width RoPE rotates: the head width, or MLA's decoupled RoPE key."""
        return self.mla.qk_rope_head_dim if self.mla is not None else self.head_dim


@dataclass
class ModelConfig(_Serialisable):
    """A backbone plus optional Engram modules and an optional OverEncoding input; ``engram=None`` (or
    no layer_ids) and ``overencoding=None`` is the baseline. Either, both or neither may be present."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    engram: EngramConfig | None = None
    overencoding: OverEncodingConfig | None = None

    def __post_init__(self) -> None:
        c = "ModelConfig"
        if isinstance(self.backbone, dict):
            self.backbone = BackboneConfig.from_dict(self.backbone)
        if isinstance(self.engram, dict):
            self.engram = EngramConfig.from_dict(self.engram)
        if isinstance(self.overencoding, dict):
            self.overencoding = OverEncodingConfig.from_dict(self.overencoding)
        _require(isinstance(self.backbone, BackboneConfig), c, "backbone",
                 f"must be a BackboneConfig, got {type(self.backbone).__name__}")
        _require(self.engram is None or isinstance(self.engram, EngramConfig), c, "engram",
                 f"must be an EngramConfig or None, got {type(self.engram).__name__}")
        _require(self.overencoding is None or isinstance(self.overencoding, OverEncodingConfig), c,
                 "overencoding", f"must be an OverEncodingConfig or None, got {type(self.overencoding).__name__}")
        vocab = self.backbone.vocab_size
        for name, tables in (("engram", self.engram), ("overencoding", self.overencoding)):
            if tables is not None and tables.pad_id is not None and vocab is not None:
                _require(tables.pad_id < vocab, c, f"{name}.pad_id",
                         f"raw pad id {tables.pad_id} is outside backbone.vocab_size={vocab}")
        if self.engram is not None:
            bad = [lid for lid in self.engram.layer_ids if lid >= self.backbone.n_layers]
            _require(not bad, c, "engram.layer_ids",
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
        from engram.presets import get_preset

        return get_preset(name)


@dataclass
class DataConfig(_Serialisable):
    """Where training text comes from and how it becomes token shards.

    source: "stdlib" (the running interpreter's standard library: always present, no download),
        a local file or directory of text files, or "hf:NAME[:CONFIG]" for a Hugging Face dataset
        (local cache, or the hub where reachable; needs the optional ``datasets`` package).
    tokenizer: "bpe" trains a byte-level BPE of ``vocab_size`` on the training split (cached);
        anything else is a Hugging Face tokenizer directory or tokenizer.json path.
    val_fraction: share of documents in the validation split, chosen by a stable hash of the path.
    cache_dir: prepared corpora, tokenizers and shards, keyed by everything that changes them.
    retrieval_docs: this many synthetic retrieval documents (``engram.data.retrieval``: the long-context
        tasks' formats, with filler lines from the training split) join the corpus, so that a small model
        can learn retrieval at all (issue 19); they split like any document, by name.
    """

    source: str = "stdlib"
    tokenizer: str = "bpe"
    vocab_size: int = 8192
    val_fraction: float = 0.02
    include_tests: bool = False
    text_field: str = "text"
    cache_dir: str = "runs/cache"
    retrieval_docs: int = 0

    def __post_init__(self) -> None:
        c = "DataConfig"
        _pos_int(c, "retrieval_docs", self.retrieval_docs, minimum=0)
        _require(isinstance(self.source, str) and self.source != "", c, "source",
                 f"must be 'stdlib', a path, or 'hf:NAME', got {self.source!r}")
        _require(isinstance(self.tokenizer, str) and self.tokenizer != "", c, "tokenizer",
                 f"must be 'bpe' or a tokenizer path, got {self.tokenizer!r}")
        _pos_int(c, "vocab_size", self.vocab_size, minimum=259)  # 256 bytes + special tokens
        _require(isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1, c, "val_fraction",
                 f"must be in (0, 1), got {self.val_fraction!r}")

    def _path_fields(self) -> list[str]:
        """The fields that hold a filesystem path here (``source`` and ``tokenizer`` only when they are one)."""
        return [name for name, value in (("source", self.source), ("tokenizer", self.tokenizer),
                                         ("cache_dir", self.cache_dir))
                if not (name == "source" and (value == "stdlib" or value.startswith("hf:")))
                and not (name == "tokenizer" and value == "bpe")]

    def relative_to(self, base: str | os.PathLike) -> "DataConfig":
        """This config with its relative paths (meant from the current directory) rewritten relative to
        ``base``: how a run stores them, so they still resolve when the run is used from elsewhere."""
        base = os.path.realpath(base)  # symlinks resolved on both sides: the relative path walks the real tree
        changes = {}
        for name in self._path_fields():
            value = os.path.expanduser(getattr(self, name))
            if not os.path.isabs(value):
                changes[name] = os.path.relpath(os.path.realpath(value), base)
        return dataclasses.replace(self, **changes)

    def resolved(self, base: str | os.PathLike | None = None) -> "DataConfig":
        """This config with every path absolute: relative ones taken from ``base`` (default: the
        current directory)."""
        base = os.path.realpath(base if base is not None else os.getcwd())
        changes = {name: os.path.realpath(os.path.join(base, os.path.expanduser(getattr(self, name))))
                   for name in self._path_fields()}
        return dataclasses.replace(self, **changes)


@dataclass
class TrainConfig(_Serialisable):
    """Optimisation and bookkeeping. Tokens per step = batch_size * seq_len * grad_accum.

    Learning rate: linear warmup for ``warmup_steps``, then constant, multiplied by ``decay_factor`` at
    each fraction of ``max_steps`` in ``decay_at`` (step decay). Engram tables use Adam (sparse, lazy)
    at ``table_lr_mult`` x the base rate with no weight decay (SPEC §3).

    init_from: a checkpoint (or run directory) whose weights a new run starts from, with a new optimizer
        and schedule from step 0 (context extension: a longer ``seq_len`` and ``model.backbone.max_seq_len``
        with ``rope_scaling``). Its model must be this run's except for the context fields
        (``INIT_FROM_MAY_CHANGE``). Ignored once the run has checkpoints of its own (it then resumes).
    keep_checkpoints: the newest checkpoints kept in the run directory (0 keeps every one, e.g. to
        extend or compare an earlier step).
    optimizer: "adamw" (every dense parameter) or "muon" (``torch.optim.Muon`` for the hidden weight
        matrices: attention, FFN, experts, routers, Engram's projections; AdamW for vectors, the
        embedding, the head and anything else that is not a matrix). The tables use sparse Adam either
        way. Recorded in checkpoints; a run resumes with the optimizer it started with.
    parallel: how the dense part is placed under torchrun: "ddp" (replicated on every rank) or "fsdp"
        (``fully_shard``: parameters, gradients and optimizer state sharded over the ranks). The tables
        are row-sharded either way. Ignored in a single process.
    """

    max_steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 3e-3
    table_lr_mult: float = 5.0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 20
    decay_at: list[float] = field(default_factory=lambda: [0.8, 0.9])
    decay_factor: float = 0.316
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10
    save_every: int = 100
    seed: int = 0
    device: str = "auto"
    out_dir: str = "runs/train"
    init_from: str | None = None
    keep_checkpoints: int = 2
    optimizer: str = "adamw"
    parallel: str = "ddp"

    def __post_init__(self) -> None:
        c = "TrainConfig"
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "eval_batches", "log_every", "save_every"):
            _pos_int(c, name, getattr(self, name))
        _pos_int(c, "seq_len", self.seq_len, minimum=2)  # one prediction needs two tokens
        _pos_int(c, "warmup_steps", self.warmup_steps, minimum=0)
        for name in ("lr", "table_lr_mult", "decay_factor"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and value > 0, c, name, f"must be > 0, got {value!r}")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and value >= 0, c, name, f"must be >= 0, got {value!r}")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            _require(isinstance(value, (int, float)) and 0 <= value < 1, c, name, f"must be in [0, 1), got {value!r}")
        _require(isinstance(self.decay_at, (list, tuple)) and all(
            isinstance(f, (int, float)) and 0 < f < 1 for f in self.decay_at), c, "decay_at",
            f"must be a list of fractions in (0, 1), got {self.decay_at!r}")
        self.decay_at = sorted(self.decay_at)
        _pos_int(c, "seed", self.seed, minimum=0)
        _pos_int(c, "keep_checkpoints", self.keep_checkpoints, minimum=0)
        _require(self.optimizer in OPTIMIZERS, c, "optimizer", f"must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        _require(self.parallel in PARALLEL, c, "parallel", f"must be one of {PARALLEL}, got {self.parallel!r}")
        _require(self.init_from is None or (isinstance(self.init_from, str) and self.init_from), c, "init_from",
                 f"must be a checkpoint or run directory, got {self.init_from!r}")
        _require(self.device == "auto" or self.device.split(":")[0] in ("cpu", "cuda", "mps"), c, "device",
                 f"must be 'auto', 'cpu', 'cuda[:N]' or 'mps', got {self.device!r}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum


@dataclass
class RunConfig(_Serialisable):
    """Everything one training run needs: the model, the data and the optimisation."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        for name, cls in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, cls.from_dict(value))
            _require(isinstance(getattr(self, name), cls), "RunConfig", name,
                     f"must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        context = self.model.backbone.max_seq_len
        _require(self.train.seq_len <= context, "RunConfig", "train.seq_len",
                 f"is {self.train.seq_len}, above the model's context model.backbone.max_seq_len={context}; "
                 "lower train.seq_len or raise the context")


_NESTED: dict[tuple[str, str], type] = {
    ("BackboneConfig", "moe"): MoEConfig,
    ("BackboneConfig", "rope_scaling"): YarnConfig,
    ("BackboneConfig", "mla"): MLAConfig,
    ("ModelConfig", "backbone"): BackboneConfig,
    ("ModelConfig", "engram"): EngramConfig,
    ("ModelConfig", "overencoding"): OverEncodingConfig,
    ("RunConfig", "model"): ModelConfig,
    ("RunConfig", "data"): DataConfig,
    ("RunConfig", "train"): TrainConfig,
}


_MOVED = {"PRESETS": "engram.presets", "RUN_PRESETS": "engram.presets", "get_preset": "engram.presets",
          "get_run_preset": "engram.presets"}


def __getattr__(name: str):
    """Names that 0.1 defined here and that now live in ``engram.presets`` stay importable from here."""
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

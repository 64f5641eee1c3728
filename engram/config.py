"""Configuration dataclasses: what a model is, validated once, saved beside every checkpoint.

Every config validates itself in ``__post_init__`` and raises ``ValueError`` naming the field and the
reason. ``to_dict`` / ``from_dict`` round-trip through plain JSON types; unknown keys are refused so a
typo in a saved or user-supplied config never passes silently.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

GATES = ("signed_sqrt", "sigmoid", "none")


def _require(ok: bool, cls: str, name: str, why: str) -> None:
    if not ok:
        raise ValueError(f"{cls}.{name}: {why}")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _pos_int(cls: str, name: str, value: Any, minimum: int = 1) -> None:
    _require(_is_int(value), cls, name, f"must be an int, got {value!r}")
    _require(value >= minimum, cls, name, f"must be >= {minimum}, got {value}")


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


def _check_tables(c: str, config) -> None:
    """Validate the table fields EngramConfig and OverEncodingConfig share (same hashing, same tables)."""
    _pos_int(c, "max_ngram_size", config.max_ngram_size, minimum=2)
    _require(isinstance(config.engram_vocab_size, (list, tuple)), c, "engram_vocab_size",
             f"must be a list with one size per n-gram order, got {config.engram_vocab_size!r}")
    config.engram_vocab_size = list(config.engram_vocab_size)
    _require(len(config.engram_vocab_size) == config.max_ngram_size - 1, c, "engram_vocab_size",
             f"needs one entry per order 2..{config.max_ngram_size} "
             f"({config.max_ngram_size - 1} entries), got {len(config.engram_vocab_size)}")
    for size in config.engram_vocab_size:
        _require(_is_int(size) and size >= 2, c, "engram_vocab_size",
                 f"every size must be an int >= 2, got {size!r}")
    _pos_int(c, "n_head_per_ngram", config.n_head_per_ngram)
    _pos_int(c, "n_embed_per_ngram", config.n_embed_per_ngram)
    _require(config.n_embed_per_ngram % config.n_head_per_ngram == 0, c, "n_embed_per_ngram",
             f"must be divisible by n_head_per_ngram={config.n_head_per_ngram}, "
             f"got {config.n_embed_per_ngram}")
    _pos_int(c, "pad_id", config.pad_id, minimum=0)
    _require(_is_int(config.seed) and config.seed >= 0, c, "seed", f"must be an int >= 0, got {config.seed!r}")
    _require(isinstance(config.compress, bool), c, "compress", f"must be true or false, got {config.compress!r}")


class _TableSizes:
    """Derived sizes of hashed n-gram tables (SPEC §2 notation)."""

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


@dataclass
class EngramConfig(_TableSizes, _Serialisable):
    """The Engram module, with the official demo's field names and meanings (SPEC §2).

    engram_vocab_size: nominal table rows per hash head, one entry per n-gram order 2..N; each head
        gets its own prime a little above this (SPEC §2 step 3).
    max_ngram_size: N, the largest n-gram order (also the short conv's dilation).
    n_embed_per_ngram: width of one order's slice of the memory; d_h = n_embed_per_ngram / K.
    n_head_per_ngram: K, hash heads per order; H = K * (N - 1) in total.
    layer_ids: 0-based blocks that hold an Engram module (the paper's "layer 2" is 1 here).
    pad_id: the *raw* pad id; its compressed image pads n-grams on the left and across boundaries.
    seed: base seed of the per-layer multipliers (numpy PCG64, SPEC §2 step 2).
    kernel_size: taps of the dilated causal short conv.
    gate: "signed_sqrt" (demo and paper kernels, default), "sigmoid" (plain sigmoid of the score) or
        "none" (alpha = 1: no gating, and no W_K or query/key norms are built).
    hc_mult: G, the number of hyper-connection branches the module reads and writes.

    Ablation switches (SPEC §5; the defaults are the paper's module):
    compress: False hashes raw ids (compressed id = raw id, V' = raw vocabulary) even when the model
        is given a CompressedTokenizer ("no tokenizer compression").
    short_conv: False drops the dilated short conv and its norm: Y = the gated value.
    branch_keys: False shares one W_K and one key RMSNorm across the G branches (no "branch-specific
        fusion"); the query norm and the gate stay per branch. Same as True when G = 1.
    """

    engram_vocab_size: list[int] = field(default_factory=lambda: [129280 * 5, 129280 * 5])
    max_ngram_size: int = 3
    n_embed_per_ngram: int = 512
    n_head_per_ngram: int = 8
    layer_ids: list[int] = field(default_factory=lambda: [1, 15])
    pad_id: int = 2
    seed: int = 0
    kernel_size: int = 4
    gate: str = "signed_sqrt"
    hc_mult: int = 1
    compress: bool = True
    short_conv: bool = True
    branch_keys: bool = True

    def __post_init__(self) -> None:
        c = "EngramConfig"
        _check_tables(c, self)
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
        _pos_int(c, "hc_mult", self.hc_mult)
        for name in ("short_conv", "branch_keys"):
            value = getattr(self, name)
            _require(isinstance(value, bool), c, name, f"must be true or false, got {value!r}")

    @property
    def dilation(self) -> int:
        return self.max_ngram_size


@dataclass
class OverEncodingConfig(_TableSizes, _Serialisable):
    """OverEncoding (Huang et al. 2025): hashed n-gram embeddings averaged into the input embedding.

    The table fields mean exactly what they mean in ``EngramConfig``, so an OverEncoding model and an
    Engram model with equal fields have the same hashing, table rows and row width (the paper's
    "Engram beats OverEncoding at equal memory", SPEC §4). It is its own class rather than an
    EngramConfig because layer_ids, kernel_size, gate, hc_mult and the module switches have no
    meaning at the input; ``hash_config`` builds the EngramConfig that ``NgramHasher`` reads.
    """

    engram_vocab_size: list[int] = field(default_factory=lambda: [129280 * 5, 129280 * 5])
    max_ngram_size: int = 3
    n_embed_per_ngram: int = 512
    n_head_per_ngram: int = 8
    pad_id: int = 2
    seed: int = 0
    compress: bool = True

    def __post_init__(self) -> None:
        _check_tables("OverEncodingConfig", self)

    def hash_config(self, layer_id: int) -> EngramConfig:
        """The hashing fields as an EngramConfig whose one (virtual) layer is ``layer_id``."""
        return EngramConfig(engram_vocab_size=list(self.engram_vocab_size), max_ngram_size=self.max_ngram_size,
                            n_embed_per_ngram=self.n_embed_per_ngram, n_head_per_ngram=self.n_head_per_ngram,
                            layer_ids=[layer_id], pad_id=self.pad_id, seed=self.seed, compress=self.compress)


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
class BackboneConfig(_Serialisable):
    """The decoder-only transformer that hosts Engram.

    hc_mult: G, hyper-connection branches (mHC); 1 gives a plain residual stream.
    ffn_hidden: width of the dense SwiGLU FFN (every block when ``moe`` is None, else the first
        ``moe.first_dense_layers`` blocks).
    """

    vocab_size: int = 512
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

    def __post_init__(self) -> None:
        c = "BackboneConfig"
        _pos_int(c, "vocab_size", self.vocab_size, minimum=2)
        _pos_int(c, "n_layers", self.n_layers)
        _pos_int(c, "d_model", self.d_model)
        _pos_int(c, "n_heads", self.n_heads)
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        _pos_int(c, "n_kv_heads", self.n_kv_heads)
        _require(self.d_model % self.n_heads == 0, c, "d_model",
                 f"must be divisible by n_heads={self.n_heads}, got {self.d_model}")
        _require((self.d_model // self.n_heads) % 2 == 0, c, "d_model",
                 f"head width d_model/n_heads must be even for RoPE, got {self.d_model // self.n_heads}")
        _require(self.n_heads % self.n_kv_heads == 0, c, "n_kv_heads",
                 f"must divide n_heads={self.n_heads} (grouped-query attention), got {self.n_kv_heads}")
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
        if self.overencoding is not None:
            _require(isinstance(self.overencoding, OverEncodingConfig), c, "overencoding",
                     f"must be an OverEncodingConfig or None, got {type(self.overencoding).__name__}")
            _require(self.overencoding.pad_id < self.backbone.vocab_size, c, "overencoding.pad_id",
                     f"raw pad id {self.overencoding.pad_id} is outside backbone.vocab_size="
                     f"{self.backbone.vocab_size}")
        if self.engram is None:
            return
        _require(isinstance(self.engram, EngramConfig), c, "engram",
                 f"must be an EngramConfig or None, got {type(self.engram).__name__}")
        bad = [lid for lid in self.engram.layer_ids if lid >= self.backbone.n_layers]
        _require(not bad, c, "engram.layer_ids",
                 f"{bad} out of range for backbone.n_layers={self.backbone.n_layers} (ids are 0-based)")
        _require(self.engram.hc_mult == self.backbone.hc_mult, c, "engram.hc_mult",
                 f"must equal backbone.hc_mult={self.backbone.hc_mult} (the module reads and writes "
                 f"every branch), got {self.engram.hc_mult}")
        _require(self.engram.pad_id < self.backbone.vocab_size, c, "engram.pad_id",
                 f"raw pad id {self.engram.pad_id} is outside backbone.vocab_size={self.backbone.vocab_size}")

    @property
    def engram_layer_ids(self) -> list[int]:
        return [] if self.engram is None else list(self.engram.layer_ids)

    @classmethod
    def from_name(cls, name: str) -> "ModelConfig":
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
    """

    source: str = "stdlib"
    tokenizer: str = "bpe"
    vocab_size: int = 8192
    val_fraction: float = 0.02
    include_tests: bool = False
    text_field: str = "text"
    cache_dir: str = "runs/cache"

    def __post_init__(self) -> None:
        c = "DataConfig"
        _require(isinstance(self.source, str) and self.source != "", c, "source",
                 f"must be 'stdlib', a path, or 'hf:NAME', got {self.source!r}")
        _require(isinstance(self.tokenizer, str) and self.tokenizer != "", c, "tokenizer",
                 f"must be 'bpe' or a tokenizer path, got {self.tokenizer!r}")
        _pos_int(c, "vocab_size", self.vocab_size, minimum=259)  # 256 bytes + special tokens
        _require(isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1, c, "val_fraction",
                 f"must be in (0, 1), got {self.val_fraction!r}")


@dataclass
class TrainConfig(_Serialisable):
    """Optimisation and bookkeeping. Tokens per step = batch_size * seq_len * grad_accum.

    Learning rate: linear warmup for ``warmup_steps``, then constant, multiplied by ``decay_factor`` at
    each fraction of ``max_steps`` in ``decay_at`` (step decay). Engram tables use Adam (sparse, lazy)
    at ``table_lr_mult`` x the base rate with no weight decay (SPEC §3).
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

    def __post_init__(self) -> None:
        c = "TrainConfig"
        for name in ("max_steps", "batch_size", "seq_len", "grad_accum", "eval_every", "eval_batches",
                     "log_every", "save_every"):
            _pos_int(c, name, getattr(self, name))
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


_NESTED: dict[tuple[str, str], type] = {
    ("BackboneConfig", "moe"): MoEConfig,
    ("ModelConfig", "backbone"): BackboneConfig,
    ("ModelConfig", "engram"): EngramConfig,
    ("ModelConfig", "overencoding"): OverEncodingConfig,
    ("RunConfig", "model"): ModelConfig,
    ("RunConfig", "data"): DataConfig,
    ("RunConfig", "train"): TrainConfig,
}


# -- named presets ---------------------------------------------------------------------------------
def _tiny_backbone(moe: bool) -> BackboneConfig:
    return BackboneConfig(
        vocab_size=512, n_layers=4, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=172,
        max_seq_len=256, hc_mult=2,
        moe=MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=32) if moe else None,
    )


def _tiny_engram() -> ModelConfig:
    return ModelConfig(
        backbone=_tiny_backbone(moe=True),
        engram=EngramConfig(engram_vocab_size=[1009, 1009], max_ngram_size=3, n_embed_per_ngram=32,
                            n_head_per_ngram=4, layer_ids=[1], pad_id=2, hc_mult=2),
    )


# Unit-test sized (seconds on a CPU). Training-sized presets are added beside these.
PRESETS = {
    "tiny-dense": lambda: ModelConfig(backbone=_tiny_backbone(moe=False)),
    "tiny-moe": lambda: ModelConfig(backbone=_tiny_backbone(moe=True)),
    "tiny-engram": _tiny_engram,
}


def get_preset(name: str) -> ModelConfig:
    """A fresh ModelConfig for a named preset; unknown names list the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]()


# -- run presets: a model plus its data and training settings -------------------------------------
def _demo_backbone(n_routed_experts: int) -> BackboneConfig:
    return BackboneConfig(
        vocab_size=8192, n_layers=6, d_model=192, n_heads=6, ffn_hidden=512, max_seq_len=512, hc_mult=1,
        moe=MoEConfig(n_routed_experts=n_routed_experts, n_shared_experts=1, top_k=2, expert_hidden=128,
                      first_dense_layers=1),
    )


def _demo_train(out: str) -> TrainConfig:
    # 400 steps x 2,048 tokens = 819k tokens: ~7 minutes per model on 2 CPU cores.
    return TrainConfig(max_steps=400, batch_size=8, seq_len=256, lr=3e-3, warmup_steps=40, eval_every=50,
                       eval_batches=8, log_every=10, save_every=100, out_dir=out)


def _demo_moe() -> RunConfig:
    return RunConfig(model=ModelConfig(backbone=_demo_backbone(16)), train=_demo_train("runs/demo/demo-moe"))


def _demo_engram() -> RunConfig:
    """demo-moe's iso-parameter twin: 3 of 16 routed experts per MoE block (1.11M parameters, 21% of the
    sparse budget) move into Engram tables at block 1; memory width 48 keeps P_act within 1%."""
    engram = EngramConfig(engram_vocab_size=[22613, 22613], max_ngram_size=3, n_embed_per_ngram=24,
                          n_head_per_ngram=3, layer_ids=[1], pad_id=0, hc_mult=1)
    return RunConfig(model=ModelConfig(backbone=_demo_backbone(13), engram=engram),
                     train=_demo_train("runs/demo/demo-engram"))


RUN_PRESETS = {
    "demo-moe": _demo_moe,
    "demo-engram": _demo_engram,
}


def get_run_preset(name: str) -> RunConfig:
    """A RunConfig by name: a run preset, or a model preset with default data and training settings."""
    if name in RUN_PRESETS:
        return RUN_PRESETS[name]()
    if name in PRESETS:
        return RunConfig(model=PRESETS[name](), train=TrainConfig(out_dir=f"runs/{name}"))
    raise ValueError(f"unknown preset {name!r}; known presets: {sorted(RUN_PRESETS) + sorted(PRESETS)}")


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``key=value`` overrides with dotted keys (``train.lr=1e-3``, ``model.engram.layer_ids=[1,3]``).

    Values are parsed as JSON when they parse (numbers, lists, true/false/null), else taken as strings.
    The result is validated like any config; an unknown key names the known ones.
    """
    import json as _json

    data = config.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value (e.g. train.lr=1e-3)")
        key, raw = item.split("=", 1)
        try:
            value = _json.loads(raw)
        except _json.JSONDecodeError:
            value = raw
        node, parts = data, key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"override {key!r}: no field {'.'.join(parts[: i + 1])!r}")
            if node[part] is None:
                raise ValueError(f"override {key!r}: {'.'.join(parts[: i + 1])} is null in this preset")
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            known = sorted(node) if isinstance(node, dict) else []
            raise ValueError(f"override {key!r}: unknown field {parts[-1]!r}; known: {known}")
        node[parts[-1]] = value
    return RunConfig.from_dict(data)

"""The hashed tables' configs: ``TableConfig`` (hashing, heads, row width), shared by the two modules that
read tables, ``EngramConfig`` (the Engram module at some blocks) and ``OverEncodingConfig`` (hashed n-gram
embeddings at the input). Validation and serialisation as every config (``engram.schema``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engram.schema import Serialisable, derived, is_int, pos_int, require

GATES = ("signed_sqrt", "sigmoid", "none")
VARIANTS = ("paper", "v4.1")
HASH_SCHEMES = ("deepseek", "qwen4exp")
V41_GATE_NORM_EPS = 1e-20  # the RMS eps of DeepSeek-V4.1's released gate (configs before it kept "backbone")

@dataclass
class TableConfig(Serialisable):
    """Hashed n-gram tables (docs/ALGORITHM.md §2 steps 1-5), shared by Engram and OverEncoding: equal fields give the
    same hashing, the same prime-sized heads and the same row width, whichever module reads them.
    The field names are the official demo's.

    engram_vocab_size: nominal table rows per hash head, one entry per n-gram order 2..N; each head
        gets its own prime a little above this (docs/ALGORITHM.md §2 step 3).
    max_ngram_size: N, the largest n-gram order.
    n_embed_per_ngram: width of one order's slice of the memory; d_h = n_embed_per_ngram / K.
    n_head_per_ngram: K, hash heads per order; H = K * (N - 1) in total.
    pad_id: the *raw* pad id; its compressed image pads n-grams on the left and across boundaries.
        Derived: ``None`` takes the training data's pad id (2 is the demo's).
    seed: base seed of the per-layer multipliers (numpy PCG64, docs/ALGORITHM.md §2 step 2).
    compress: False hashes raw ids (compressed id = raw id, V' = raw vocabulary) even when the model
        is given a CompressedTokenizer (the "no tokenizer compression" ablation, docs/ALGORITHM.md §5).
    hash_scheme: "deepseek" (the paper's and DeepSeek's, docs/ALGORITHM.md §2) or "qwen4exp" (Qwen4-Exp's PLE
        hashing, docs/ALGORITHM.md §2c: raw ids, splitmix64 multipliers of ``seed + 10007·i`` for the i-th
        hashed layer, every order's heads from one base size, segments that end at ``pad_id``, the EOS).
    row_multiple: each layer's table is padded to a multiple of this many rows (Qwen4-Exp: 128); the
        padding rows are never addressed.
    """

    engram_vocab_size: list[int] = field(default_factory=lambda: [129280 * 5, 129280 * 5])
    max_ngram_size: int = 3
    n_embed_per_ngram: int = 512
    n_head_per_ngram: int = 8
    pad_id: int | None = derived(2, "the tokenizer's pad id")
    seed: int = 0
    compress: bool = True
    hash_scheme: str = "deepseek"
    row_multiple: int = 1

    def __post_init__(self) -> None:
        c = type(self).__name__
        pos_int(c, "max_ngram_size", self.max_ngram_size, minimum=2)
        require(isinstance(self.engram_vocab_size, (list, tuple)), c, "engram_vocab_size",
                f"must be a list with one size per n-gram order, got {self.engram_vocab_size!r}")
        self.engram_vocab_size = list(self.engram_vocab_size)
        require(len(self.engram_vocab_size) == self.max_ngram_size - 1, c, "engram_vocab_size",
                f"needs one entry per order 2..{self.max_ngram_size} "
                f"({self.max_ngram_size - 1} entries), got {len(self.engram_vocab_size)}")
        for size in self.engram_vocab_size:
            require(is_int(size) and size >= 2, c, "engram_vocab_size",
                    f"every size must be an int >= 2, got {size!r}")
        pos_int(c, "n_head_per_ngram", self.n_head_per_ngram)
        pos_int(c, "n_embed_per_ngram", self.n_embed_per_ngram)
        require(self.n_embed_per_ngram % self.n_head_per_ngram == 0, c, "n_embed_per_ngram",
                f"must be divisible by n_head_per_ngram={self.n_head_per_ngram}, "
                f"got {self.n_embed_per_ngram}")
        if self.pad_id is not None:
            pos_int(c, "pad_id", self.pad_id, minimum=0)
        require(is_int(self.seed) and self.seed >= 0, c, "seed", f"must be an int >= 0, got {self.seed!r}")
        require(isinstance(self.compress, bool), c, "compress", f"must be true or false, got {self.compress!r}")
        require(self.hash_scheme in HASH_SCHEMES, c, "hash_scheme",
                f"must be one of {HASH_SCHEMES}, got {self.hash_scheme!r}")
        pos_int(c, "row_multiple", self.row_multiple)
        if self.hash_scheme == "qwen4exp":
            require(not self.compress, c, "compress", "the qwen4exp scheme hashes raw ids: set compress=false")
            require(len(set(self.engram_vocab_size)) == 1, c, "engram_vocab_size",
                    f"the qwen4exp scheme takes every order's heads from one base size, got {self.engram_vocab_size}")

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


# The tables' initial std: DeepSeek's demo code draws N(0, 1) (the reference); table-init study
# (docs/RESULTS.md §4) chose N(0, 0.02) on seeds 0-2 and confirmed it on seeds 3-5.
TABLE_INIT_REFERENCE = 1.0
TABLE_INIT_STD = 0.02


@dataclass
class EngramConfig(TableConfig):
    """The Engram module (docs/ALGORITHM.md §2): its tables (``TableConfig``'s fields) plus where it sits and how it
    reads them. The number of hyper-connection branches G it reads and writes is the backbone's
    ``hc_mult``, the one source for G.

    layer_ids: 0-based blocks that hold an Engram module (the paper's "layer 2" is 1 here).
    kernel_size: taps of the dilated causal short conv (its dilation is max_ngram_size).
    gate: "signed_sqrt" (demo and paper kernels, default), "sigmoid" (plain sigmoid of the score) or
        "none" (alpha = 1: no gating, and no W_K or query/key norms are built).

    Ablation switches (docs/ALGORITHM.md §5; the defaults are the paper's module; ``compress`` is a table field):
    short_conv: False drops the dilated short conv and its norm: Y = the gated value.
    branch_keys: False shares one W_K and one key RMSNorm across the G branches (no "branch-specific
        fusion"); the query norm and the gate stay per branch. Same as True when G = 1.
    table_init_std: the standard deviation of the tables' initial rows. Default 0.02
        (``TABLE_INIT_STD``): the table-init study (docs/RESULTS.md §4) found it 0.057 nats better than
        DeepSeek's N(0, 1) on average, on 6 of 6 seeds (chosen on 0-2, confirmed on 3-5). The reference init stays available by name,
        ``TABLE_INIT_REFERENCE`` = 1.0 (``--set model.engram.table_init_std=1``); 0 starts every row at zero.

    The official demo's numerics (``DEMO_MODULE``; ``engram.compat.deepseek.from_demo_state_dict`` switches them on):
    proj_bias: W_K and W_V carry biases (the demo's ``nn.Linear`` layers); ours have none by default.
    gate_norm_eps: eps of the query and key RMSNorms; conv_norm_eps: eps of the conv's RMSNorms. Each is
        "backbone" (the backbone's ``norm_eps``), a float > 0, or None: fp32's machine epsilon, which is
        what ``nn.RMSNorm(eps=None)`` uses on the demo's fp32 weights (our norms always compute in fp32).
        ``gate_norm_eps`` defaults to the variant's: "backbone" for the paper's module, 1e-20 for V4.1
        (``V41_GATE_NORM_EPS``, the release's); a config saved before that default keeps what it says.

    variant: "paper" (the paper's and demo's module, ``Engram``) or "v4.1" (DeepSeek-V4.1's production
        module, ``EngramV41``: no conv, so ``short_conv`` must be false; one fused W_K/W_V, the query and key
        norm gains used as their product, returns x + alpha*v; docs/ALGORITHM.md §2b and docs/DEEPSEEK.md). The preset ``tiny-engram-v41`` has
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
    gate_norm_eps: float | str | None = "variant"
    conv_norm_eps: float | str | None = "backbone"
    variant: str = "paper"
    barrier_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__post_init__()
        c = "EngramConfig"
        require(isinstance(self.layer_ids, (list, tuple)), c, "layer_ids",
                f"must be a list of 0-based block indices, got {self.layer_ids!r}")
        self.layer_ids = list(self.layer_ids)
        for lid in self.layer_ids:
            require(is_int(lid) and lid >= 0, c, "layer_ids",
                    f"must hold 0-based block indices (ints >= 0), got {lid!r}")
        require(len(set(self.layer_ids)) == len(self.layer_ids), c, "layer_ids",
                f"must not repeat a block, got {self.layer_ids}")
        pos_int(c, "kernel_size", self.kernel_size)
        require(self.gate in GATES, c, "gate", f"must be one of {GATES}, got {self.gate!r}")
        for name in ("short_conv", "branch_keys", "proj_bias"):
            value = getattr(self, name)
            require(isinstance(value, bool), c, name, f"must be true or false, got {value!r}")
        require(isinstance(self.table_init_std, (int, float)) and not isinstance(self.table_init_std, bool)
                and 0 <= self.table_init_std < float("inf"), c, "table_init_std",
                f"must be a finite number >= 0, got {self.table_init_std!r}")
        if self.gate_norm_eps == "variant":  # the variant's own: the backbone's, or the V4.1 release's 1e-20
            self.gate_norm_eps = V41_GATE_NORM_EPS if self.variant == "v4.1" else "backbone"
        for name in ("gate_norm_eps", "conv_norm_eps"):
            value = getattr(self, name)
            require(value is None or value == "backbone" or (
                isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")),
                c, name, f'must be "backbone", null (the dtype\'s machine epsilon) or a number > 0, got {value!r}')
        require(self.variant in VARIANTS, c, "variant", f"must be one of {VARIANTS}, got {self.variant!r}")
        require(isinstance(self.barrier_ids, (list, tuple)) and all(is_int(i) and i >= 0 for i in self.barrier_ids),
                c, "barrier_ids", f"must be a list of raw token ids >= 0, got {self.barrier_ids!r}")
        self.barrier_ids = sorted(self.barrier_ids)  # a set: one order, so layouts compare equal
        require(len(set(self.barrier_ids)) == len(self.barrier_ids), c, "barrier_ids",
                f"must not repeat an id, got {self.barrier_ids}")
        if self.variant == "v4.1":
            for name, want in (("short_conv", False), ("gate", "signed_sqrt"), ("branch_keys", True),
                               ("proj_bias", False)):
                require(getattr(self, name) == want, c, name,
                        f"the v4.1 variant has {name}={want!r} (docs/ALGORITHM.md §2b), got {getattr(self, name)!r}")
        else:
            require(not self.barrier_ids, c, "barrier_ids",
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

    def resolve_layer(self, layer_id: int | None) -> int:
        """``layer_id``, or the config's one Engram layer when it is None; a layer the config lacks (or None
        with several) is refused by name. For readers of one layer's weights (demo, release)."""
        if layer_id is None:
            if len(self.layer_ids) != 1:
                raise ValueError(f"the config has Engram layers {self.layer_ids}: say which one with layer_id=")
            return self.layer_ids[0]
        if layer_id not in self.layer_ids:
            raise ValueError(f"layer_id {layer_id} is not one of the config's Engram layers {self.layer_ids}")
        return layer_id


@dataclass
class OverEncodingConfig(TableConfig):
    """OverEncoding (Huang et al. 2025): hashed n-gram embeddings averaged into the input embedding.

    Exactly ``TableConfig``: an OverEncoding model and an Engram model with equal table fields have the
    same hashing, table rows and row width (the paper's "Engram beats OverEncoding at equal memory",
    docs/ALGORITHM.md §4). Layers, the conv, the gate and the module switches have no meaning at the input.
    """

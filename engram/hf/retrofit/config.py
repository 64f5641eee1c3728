"""The adapter's configuration: which Engram modules, where, and whether the base model is frozen."""

from __future__ import annotations

from dataclasses import dataclass, field

from engram.model.table_config import EngramConfig
from engram.schema import Serialisable


def default_adapter_engram() -> EngramConfig:
    """Tables of 2 x 4 heads x ~40k rows x 32 floats (10M parameters) before block 1: small enough for
    any base model, large enough to hold the common 2- and 3-grams of a 50k vocabulary. Rows start at
    N(0, 1), DeepSeek's init, which is what docs/RETROFIT.md measured (the init study of docs/RESULTS.md
    §4 is about training from scratch; it was not repeated for adapters)."""
    return EngramConfig(engram_vocab_size=[40_000, 40_000], max_ngram_size=3, n_embed_per_ngram=128,
                        n_head_per_ngram=4, pad_id=None, layer_ids=[1], kernel_size=4, table_init_std=1.0)


@dataclass
class EngramAdapterConfig(Serialisable):
    """engram: the Engram fields (``layer_ids`` are 0-based base-model blocks; default [1], the paper's
    placement rule). ``pad_id`` None takes the tokenizer's pad (else eos, else 0).
    freeze_base: the base model's parameters stop requiring gradients at attach.
    norm_eps: the module's RMSNorm epsilon."""

    engram: EngramConfig = field(default_factory=default_adapter_engram)
    freeze_base: bool = True
    norm_eps: float = 1e-6

    NESTED = {"engram": EngramConfig}

    def __post_init__(self) -> None:
        if isinstance(self.engram, dict):
            self.engram = EngramConfig.from_dict(self.engram)
        if not isinstance(self.engram, EngramConfig):
            raise ValueError(f"EngramAdapterConfig.engram: must be an EngramConfig, got {type(self.engram).__name__}")
        if self.engram.variant != "paper":  # the hooks add Y; the V4.1 module returns x + Y
            raise ValueError(f"EngramAdapterConfig.engram.variant: the adapter builds the paper's module, got "
                             f"{self.engram.variant!r}")
        if not isinstance(self.freeze_base, bool):
            raise ValueError(f"EngramAdapterConfig.freeze_base: must be true or false, got {self.freeze_base!r}")

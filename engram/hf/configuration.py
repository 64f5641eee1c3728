"""``EngramHFConfig``: a transformers ``PreTrainedConfig`` (``model_type="engram"``) carrying the project's
whole ``ModelConfig`` and the hash layouts that fix which table rows each n-gram addresses.

The usual transformers fields (``vocab_size``, ``hidden_size``, ``num_hidden_layers``,
``num_attention_heads``, ``max_position_embeddings``) are read from ``engram_config`` so tools that
inspect them (lm-eval's max length, generation defaults) see true values; ``engram_config`` is the
source of truth and they are recomputed from it at every construction.
"""

from __future__ import annotations

from transformers import PreTrainedConfig

from engram.model.config import ModelConfig


class EngramHFConfig(PreTrainedConfig):
    """``engram_config``: ``ModelConfig.to_dict()`` (derived fields resolved); ``hash_layout`` /
    ``overencoding_layout``: the hashers' ``layout()``, checked against the tokenizer at load."""

    model_type = "engram"

    engram_config: dict | None = None
    hash_layout: dict | None = None
    overencoding_layout: dict | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    max_position_embeddings: int | None = None
    use_cache: bool = True
    tie_word_embeddings: bool = False
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self, **kwargs):
        if self.engram_config is not None:
            bb = self.model_config.backbone
            if bb.vocab_size is None:
                raise ValueError("EngramHFConfig.engram_config: backbone.vocab_size must be resolved (a model "
                                 "built from data has it)")
            self.vocab_size = bb.vocab_size
            self.hidden_size = bb.d_model
            self.num_hidden_layers = bb.n_layers
            self.num_attention_heads = bb.n_heads
            self.max_position_embeddings = bb.max_seq_len
        super().__post_init__(**kwargs)

    @property
    def model_config(self) -> ModelConfig:
        """The project's ``ModelConfig`` (validated on every access)."""
        if self.engram_config is None:
            raise ValueError("EngramHFConfig has no engram_config: build it with EngramHFConfig.from_model(model) "
                             "or load a saved folder")
        return ModelConfig.from_dict(self.engram_config)

    @classmethod
    def from_model(cls, model, special: dict | None = None) -> "EngramHFConfig":
        """The config of a built ``EngramLM``; ``special``: pad/bos/eos token ids."""
        special = special or {}
        return cls(engram_config=model.config.to_dict(),
                   hash_layout=None if model.hasher is None else model.hasher.layout(),
                   overencoding_layout=None if model.overencoding is None else model.overencoding.hasher.layout(),
                   pad_token_id=special.get("pad"), bos_token_id=special.get("bos"), eos_token_id=special.get("eos"))

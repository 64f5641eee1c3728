"""Retrofit Engram into a pretrained Hugging Face causal LM: ``attach_engram(model, tokenizer, config)``.

Legend: B sequences, T new tokens this call, D the base model's width, N max n-gram order, K conv taps,
P = (K-1)*N conv lookback.

    adapter = attach_engram(model, tokenizer)         # Engram before block 1 (the paper's "layer 2")
    model(**batch).logits                             # == the base model's, exactly, until trained
    model.generate(**batch, max_new_tokens=20)        # exact: n-gram and conv state follow the cache
    adapter.save("adapter/"); adapter.detach()         # only the adapter; EngramAdapter.load(model, "adapter/", tok)

How it sits in the base model (no second copy of it, no change to its code):
  - The blocks are found as the one ``nn.ModuleList`` with ``num_hidden_layers`` entries (Llama, Mistral,
    Qwen2/3, Gemma, Phi: ``model.layers``; GPT-2: ``transformer.h``; GPT-NeoX: ``gpt_neox.layers``).
    A forward pre-hook on each chosen block turns its input ``h`` into ``h + Y``, Y the Engram output
    from h (SPEC §2: the module adds to the residual stream before the block's attention). The module
    is registered on the block as ``engram_adapter``: ``model.parameters()`` holds it (for optimizers,
    PEFT and Trainer) and no key of the base model's state dict changes.
  - A forward pre-hook on the top model reads ``input_ids``, ``attention_mask`` and the cache, hashes
    once for every inserted module (``NgramHasher`` on the base tokenizer's ``CompressedTokenizer``),
    and starts the storage tiers' prefetch.
  - **Identity at attach**: ``W_V`` (the value projection) starts at zero. The value is then zero, so the
    short conv reads zeros and Y = 0 exactly: the retrofitted model computes the base model's outputs
    bit for bit. ``W_V`` still receives gradient (dL/dW_V = dL/dv ⊗ e), so the first step moves it and
    from then on the tables and keys learn too. Zeroing the conv instead would leave Y = v ≠ 0.
  - **Decoding.** The n-gram history (B, N-1) and each module's conv history (B, P, 1, D) live in a
    ``_Sequences`` record bound to the transformers cache object of the generation (by identity). A cache
    of length 0 starts new sequences; its ``reorder_cache`` / ``batch_select_indices`` /
    ``batch_repeat_interleave`` are wrapped so beam search reorders the Engram state with the keys and
    values. ``attention_mask`` must be left padding: row b's first real token is a document start, so
    padding never enters an n-gram or the conv. Without a cache each forward is stateless.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from engram.model.table_config import EngramConfig
from engram.schema import Serialisable
from engram.fileio import atomic_write_bytes, atomic_write_json
from engram.hashing import NgramHasher, document_ids
from engram.model.cache import starts_from_left_padding
from engram.model.engram import Engram
from engram.tokenizer import CompressedTokenizer

FORMAT = "engram.adapter/1"


def default_adapter_engram() -> EngramConfig:
    """Tables of 2 x 4 heads x ~40k rows x 32 floats (10M parameters) before block 1: small enough for
    any base model, large enough to hold the common 2- and 3-grams of a 50k vocabulary. Rows start at
    N(0, 1), DeepSeek's init, which is what docs/RETROFIT.md measured (issue 17's init study is about
    training from scratch; it was not repeated for adapters)."""
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


# -- finding the blocks ------------------------------------------------------------------------------------

def _n_layers(config) -> int | None:
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the base model's decoder blocks: the one ``nn.ModuleList`` holding
    ``config.num_hidden_layers`` modules; a clear error naming what was found otherwise."""
    n = _n_layers(getattr(model, "config", None))
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    found = [(name, m) for name, m in lists if n is not None and len(m) == n]
    if len(found) != 1:
        seen = ", ".join(f"{name or '<root>'} ({len(m)})" for name, m in lists) or "none"
        raise ValueError(f"cannot find the decoder blocks of {type(model).__name__}: expected one nn.ModuleList of "
                         f"num_hidden_layers={n} modules, found ModuleLists: {seen}")
    return found[0]


def _model_dim(model: nn.Module) -> int:
    config = model.config
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"{type(model).__name__}'s config names no hidden size (hidden_size / n_embd / d_model)")


# -- the decode state --------------------------------------------------------------------------------------

class _ConvState:
    """What ``Engram.short_conv`` reads and writes when decoding (the ``LayerCache`` contract)."""

    def __init__(self, conv_history: torch.Tensor):
        self.conv_history = conv_history  # (B, P, 1, D)


@dataclass
class _Sequences:
    """The Engram state of the sequences one transformers cache holds."""

    length: int
    ngram_history: torch.Tensor  # (B, N-1) compressed ids
    conv: dict[int, _ConvState]

    def select(self, index: torch.Tensor) -> None:
        index = index.to(self.ngram_history.device, torch.long)
        self.ngram_history = self.ngram_history.index_select(0, index)
        for state in self.conv.values():
            state.conv_history = state.conv_history.index_select(0, index)


@dataclass
class _Call:
    """What the pre-hook computed for the forward in flight."""

    hash_ids: dict[int, torch.Tensor]  # layer -> (B, T, H)
    doc_ids: torch.Tensor | None  # (B, T)
    conv: dict[int, _ConvState] | None


def _starts(attention_mask: torch.Tensor | None, B: int, T: int, device) -> torch.Tensor:
    """(B,) first real token per row from a left-padding mask over the T new positions."""
    if isinstance(attention_mask, dict):  # one mask per attention type (models with sliding layers)
        attention_mask = attention_mask.get("full_attention", next(iter(attention_mask.values())))
    if attention_mask is None:
        return torch.zeros(B, dtype=torch.long, device=device)
    if attention_mask.dim() == 4:  # (B, 1, T, K) built by generate for static caches: the last query's keys
        last = attention_mask[:, 0, -1, :T]
        mask = last if last.dtype == torch.bool else last == 0  # additive masks: 0 allowed, -inf not
    else:
        mask = attention_mask[:, -T:]
    return starts_from_left_padding(mask.to(device))


# -- the adapter -------------------------------------------------------------------------------------------

class EngramAdapter(nn.Module):
    """The Engram modules, the hasher and the decode state of one retrofitted base model.

    ``engram_layers`` (block index -> ``Engram``) and ``hasher`` make it a target of
    ``engram.storage.apply_storage`` and ``export_tables`` like an ``EngramLM``."""

    def __init__(self, config: EngramAdapterConfig, compressed: CompressedTokenizer, dim: int):
        super().__init__()
        self.config = config
        self.dim = dim
        self.overencoding = None  # storage tiers check for one
        self.hasher = NgramHasher(config.engram, compressed)
        geometry = self.hasher.geometry
        self.modules_by_layer = nn.ModuleDict({
            str(lid): Engram(config.engram, dim, geometry[lid], config.norm_eps, branches=1, sparse_table=True)
            for lid in config.engram.layer_ids})
        # the base model is not a submodule of its adapter (its parameters are not the adapter's)
        self.__dict__["_model"] = None
        self.__dict__["_blocks"] = None
        self._hooks: list = []
        self._call: _Call | None = None
        self._pending: _Sequences | None = None
        self._boundary: torch.Tensor | None = None
        self._states: dict[int, tuple[weakref.ref, _Sequences]] = {}

    @property
    def engram_layers(self) -> dict[int, Engram]:
        return {int(lid): m for lid, m in self.modules_by_layer.items()}

    def named_tables(self) -> dict:
        """Module name -> hashed table, as ``EngramLM.named_tables`` (what ``Optimizers`` reads)."""
        return {f"modules_by_layer.{lid}.embedding": m.embedding for lid, m in self.modules_by_layer.items()}

    @property
    def compressed_tokenizer(self) -> CompressedTokenizer:
        return self.hasher.tokenizer

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int = 0) -> None:
        """Every module's own init (tables N(0, 1), rows from ``seed``), then ``W_V`` = 0: identity."""
        generator_state = torch.get_rng_state()
        torch.manual_seed(seed)
        for lid, module in self.engram_layers.items():
            module.init_weights(std, table_seed=seed * 1000 + lid)
            nn.init.zeros_(module.value_proj.weight)
        torch.set_rng_state(generator_state)

    # -- attach / detach --------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> "EngramAdapter":
        """Hook the modules into ``model``'s blocks (each block's forward gets ``h + Y`` for ``h``; its
        module is registered on it as ``engram_adapter``, so ``model.parameters()`` holds the adapter's
        and no key of the base model's state dict changes)."""
        if self._model is not None:
            raise ValueError("this adapter is already attached; detach() it first")
        if any(hasattr(m, "engram_adapter") for m in model.modules()):
            raise ValueError("the model already holds an Engram adapter; detach it first")
        _, blocks = find_blocks(model)
        bad = [lid for lid in self.engram_layers if not 0 <= lid < len(blocks)]
        if bad:
            raise ValueError(f"engram.layer_ids {bad} are outside the base model's {len(blocks)} blocks")
        param = next(model.parameters())
        self.to(device=param.device)
        if self.config.freeze_base:
            for p in model.parameters():
                p.requires_grad_(False)
        hooks = [model.register_forward_pre_hook(self._before, with_kwargs=True),
                 model.register_forward_hook(self._after, with_kwargs=True)]
        for lid, module in self.engram_layers.items():
            blocks[lid].add_module("engram_adapter", module)
            hooks.append(blocks[lid].register_forward_pre_hook(self._block_hook(lid), with_kwargs=True))
        self.__dict__.update(_model=model, _blocks=blocks)
        self._hooks = hooks
        return self

    def _block_hook(self, layer_id: int):
        def add_memory(block, args, kwargs):
            if args:
                return (args[0] + self.contribution(layer_id, args[0]), *args[1:]), kwargs
            hidden = kwargs["hidden_states"]
            return args, {**kwargs, "hidden_states": hidden + self.contribution(layer_id, hidden)}
        return add_memory

    def detach(self) -> nn.Module:
        """Remove the hooks and the modules from the base model; returns the base model."""
        if self._model is None:
            raise ValueError("this adapter is not attached")
        for hook in self._hooks:
            hook.remove()
        for lid in self.engram_layers:
            del self._blocks[lid].engram_adapter
        model = self._model
        self.__dict__.update(_model=None, _blocks=None)
        self._hooks = []
        self._states.clear()
        return model

    @contextlib.contextmanager
    def documents(self, boundary: torch.Tensor | None):
        """Within the block, forwards without a cache treat ``boundary`` (B, T) bool, True where a packed
        document starts, as document starts: n-grams and the conv reset there, as in ``engram train``.
        (The base model's own attention still spans the documents.)"""
        self._boundary = boundary
        try:
            yield self
        finally:
            self._boundary = None

    # -- the forward ------------------------------------------------------------------------------------
    def _before(self, module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("a model with an Engram adapter needs input_ids (Engram hashes token ids, not "
                             "inputs_embeds)")
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        mask = kwargs.get("attention_mask")
        B, T = input_ids.shape
        if self.hasher.lookup.device != input_ids.device:  # the base model was moved after attach
            self.hasher.to(input_ids.device)
        raw = self.hasher.lookup.shape[0]
        # ids the model can emit but the tokenizer lacks (a padded embedding table): hashed as padding
        input_ids = torch.where(input_ids < raw, input_ids, self.config.engram.pad_id)
        past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
        use_cache = kwargs.get("use_cache")
        if use_cache is None:  # what the model will do: return a cache when its config says so
            use_cache = bool(getattr(module.config, "use_cache", False))
        self._pending = None
        if past > 0:  # continuing the sequences of this cache
            entry = self._states.get(id(cache))
            if entry is None or entry[0]() is not cache or entry[1].length != past:
                raise ValueError("this cache holds no Engram state for its tokens: it was filled without the "
                                 "adapter, copied, or cropped (assisted and speculative decoding are not supported "
                                 "with an Engram adapter); start the generation again")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask[:, -T:].all()):
                raise ValueError("padding after the first chunk of a cached generation would enter the n-grams "
                                 "and the conv: only the prompt may be (left) padded")
            state = entry[1]
            ids, state.ngram_history = self.hasher.hash_with_history(input_ids, state.ngram_history)
            state.length += T
            self._call = _Call(ids, None, state.conv)
        else:
            starts = _starts(mask, B, T, input_ids.device)
            boundary = None
            if bool((starts > 0).any()):
                boundary = torch.arange(T, device=input_ids.device)[None] == starts[:, None]  # (B, T)
            if self._boundary is not None:  # packed documents (``documents``)
                packed = self._boundary.to(device=input_ids.device, dtype=torch.bool)
                boundary = packed if boundary is None else boundary | packed
            doc_ids = document_ids(boundary, input_ids.shape, input_ids.device)
            if use_cache or cache is not None:
                history = torch.full((B, self.config.engram.max_ngram_size - 1), self.hasher.compressed_pad_id,
                                     dtype=torch.long, device=input_ids.device)
                ids, history = self.hasher.hash_with_history(input_ids, history, boundary)
                P = (self.config.engram.kernel_size - 1) * self.config.engram.max_ngram_size
                dtype = next(self.parameters()).dtype
                conv = {lid: _ConvState(torch.zeros(B, P, 1, self.dim, device=input_ids.device, dtype=dtype))
                        for lid, m in self.engram_layers.items() if m.conv_weight is not None}
                state = _Sequences(T, history, conv)
                if cache is not None:
                    self._bind(cache, state)
                else:
                    self._pending = state  # the model creates the cache: bound after its forward
                self._call = _Call(ids, doc_ids, conv)
            else:
                self._call = _Call(self.hasher(input_ids, boundary), doc_ids, None)
        for lid, layer in self.engram_layers.items():  # storage tiers start fetching rows now
            layer.embedding.prefetch(self._call.hash_ids[lid])

    def _after(self, module, args, kwargs, output):
        self._call = None
        if self._pending is not None:
            if isinstance(output, tuple):  # return_dict=False: the cache is the element that has a length
                cache = next((o for o in output if hasattr(o, "get_seq_length")), None)
            else:
                cache = getattr(output, "cache", None)
                cache = cache if cache is not None else getattr(output, "past_key_values", None)
            if cache is not None:
                self._bind(cache, self._pending)
            self._pending = None

    def _bind(self, cache, state: _Sequences) -> None:
        """Tie ``state`` to ``cache`` (by identity; the entry goes when the cache is freed) and make the
        cache's row operations apply to it too. The wrappers hold the cache weakly: a cache keeps no
        reference cycle, so its keys and values are freed as soon as ``generate`` drops it."""
        key = id(cache)
        self._states[key] = (weakref.ref(cache), state)
        weakref.finalize(cache, self._states.pop, key, None)
        if getattr(cache, "_engram_wrapped", False):
            return
        states, ref = self._states, weakref.ref(cache)

        def current() -> _Sequences:
            return states[id(ref())][1]

        for name in ("reorder_cache", "batch_select_indices"):
            if getattr(cache, name, None) is not None:
                def wrapped(index, _name=name):
                    result = getattr(type(ref()), _name)(ref(), index)
                    current().select(index)
                    return result
                setattr(cache, name, wrapped)
        if getattr(cache, "batch_repeat_interleave", None) is not None:
            def repeat(repeats):
                result = type(ref()).batch_repeat_interleave(ref(), repeats)
                n = current().ngram_history.shape[0]
                current().select(torch.arange(n).repeat_interleave(repeats))
                return result
            cache.batch_repeat_interleave = repeat
        cache._engram_wrapped = True

    def contribution(self, layer_id: int, hidden: torch.Tensor) -> torch.Tensor:
        """Y (B, T, D) of block ``layer_id``'s module for the forward in flight (hidden (B, T, D))."""
        call = self._call
        if call is None:
            raise RuntimeError("the Engram adapter's block ran outside the model's forward (call the model, not "
                               "its blocks)")
        module = self.modules_by_layer[str(layer_id)]
        conv = None if call.conv is None else call.conv.get(layer_id)
        dtype = module.value_proj.weight.dtype
        y = module(hidden.to(dtype)[:, :, None, :], call.hash_ids[layer_id], call.doc_ids, conv)  # (B, T, 1, D)
        return y[:, :, 0].to(hidden.dtype)

    # -- save / load ------------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """adapter.safetensors (the modules' weights), adapter_config.json (this config and the base model's
        identity), hash_layout.json and the compressed tokenizer; the base model is not saved."""
        from safetensors.torch import save

        if self._model is None:
            raise ValueError("save an attached adapter (it records which base model it belongs to)")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.modules_by_layer.state_dict().items()}
        atomic_write_bytes(directory / "adapter.safetensors", save(state, metadata={"format": FORMAT}))
        self.compressed_tokenizer.save(directory)
        atomic_write_json(directory / "hash_layout.json", self.hasher.layout(), sort_keys=True)
        atomic_write_json(directory / "adapter_config.json", {"format": FORMAT, "config": self.config.to_dict(),
                                                              "base": base_identity(self._model)}, sort_keys=True)
        return directory

    @classmethod
    def load(cls, model: nn.Module, directory: str | os.PathLike, tokenizer=None) -> "EngramAdapter":
        """Attach the adapter saved in ``directory`` to ``model``: refuses a base model of another shape or
        a ``tokenizer`` that addresses other rows. Without ``tokenizer`` the saved compressed table is
        used as is (pass the tokenizer you will feed the model to have it checked)."""
        from safetensors.torch import load_file

        directory = Path(directory)
        meta = json.loads((directory / "adapter_config.json").read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{directory}/adapter_config.json has format {meta.get('format')!r}, expected {FORMAT!r}")
        mine = base_identity(model)
        diffs = {k: (v, mine.get(k)) for k, v in meta["base"].items() if mine.get(k) != v}
        if diffs:
            detail = "; ".join(f"{k}: saved {a!r} vs given {b!r}" for k, (a, b) in diffs.items())
            raise ValueError(f"the adapter in {directory} was trained on another base model ({detail})")
        config = EngramAdapterConfig.from_dict(meta["config"])
        stored = CompressedTokenizer.load(directory)
        compressed = stored if tokenizer is None else CompressedTokenizer.from_pretrained(tokenizer)
        if compressed != stored:
            raise ValueError(f"the tokenizer given compresses to V'={compressed.vocab_size} (sha256 "
                             f"{compressed.sha256[:12]}) but the adapter's tables were addressed with "
                             f"V'={stored.vocab_size} (sha256 {stored.sha256[:12]}); refusing to load")
        adapter = _build(config, compressed, model)  # nothing initialised only to be overwritten
        adapter.hasher.check_layout(json.loads((directory / "hash_layout.json").read_text()))
        adapter.modules_by_layer.load_state_dict(load_file(str(directory / "adapter.safetensors")))
        return adapter.attach(model)


def base_identity(model: nn.Module) -> dict:
    """What an adapter must match in a base model: its type and shape (not its weights)."""
    config = model.config
    return {"model_type": getattr(config, "model_type", None), "hidden_size": _model_dim(model),
            "num_hidden_layers": _n_layers(config), "vocab_size": getattr(config, "vocab_size", None)}


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def attach_engram(model: nn.Module, tokenizer, config: EngramAdapterConfig | None = None,
                  seed: int = 0) -> EngramAdapter:
    """Insert Engram modules into ``model`` (a Hugging Face causal LM) in place; returns the adapter.

    ``tokenizer``: the base model's own (a transformers tokenizer, a ``tokenizers.Tokenizer``, a
    directory or tokenizer.json): its ``CompressedTokenizer`` addresses the tables (a
    ``CompressedTokenizer`` is taken as is). The outputs equal the
    base model's exactly until the adapter is trained (``W_V`` starts at zero)."""
    config = config or EngramAdapterConfig()
    if config.engram.pad_id is None:
        config = dataclasses.replace(config, engram=dataclasses.replace(config.engram, pad_id=_pad_id(tokenizer)))
    compressed = tokenizer if isinstance(tokenizer, CompressedTokenizer) else CompressedTokenizer.from_pretrained(tokenizer)
    adapter = _build(config, compressed, model)
    adapter.init_weights(seed=seed)
    return adapter.attach(model)


def _build(config: EngramAdapterConfig, compressed: CompressedTokenizer, model: nn.Module) -> EngramAdapter:
    """An adapter for ``model`` on its device, built on meta: buffers computed, weights not yet set."""
    param = next(model.parameters())
    with torch.device("meta"):
        adapter = EngramAdapter(config, compressed, _model_dim(model))
    adapter.to_empty(device=param.device)
    for module in adapter.modules():
        if module is not adapter and hasattr(module, "reset_buffers"):
            module.reset_buffers()
    return adapter

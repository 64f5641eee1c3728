"""The adapter: Engram modules attached to a pretrained transformers causal LM by hooks.

Legend: B sequences, T new tokens this call, D the base model's width, N max n-gram order.

How it sits in the base model (no second copy of it, no change to its code):
  - A forward pre-hook on each chosen block turns its input ``h`` into ``h + Y``, Y the Engram output
    from h (docs/ALGORITHM.md §2: the module adds to the residual stream before the block's attention).
    The module is registered on the block as ``engram_adapter``: ``model.parameters()`` holds it (for
    optimizers, PEFT and Trainer, the last with ``sparse_tables=False``). The base model's own
    ``save_pretrained`` is shadowed while attached: it writes the model atomically, with checksums, and
    the adapter alone in ``engram_adapter/`` beside it.
  - A forward pre-hook on the top model reads ``input_ids``, ``attention_mask`` and the cache, hashes
    once for every inserted module (``NgramHasher`` on the base tokenizer's ``CompressedTokenizer``),
    and starts the storage tiers' prefetch.
  - **Identity at attach**: ``W_V`` (the value projection) starts at zero. The value is then zero, so the
    short conv reads zeros and Y = 0 exactly: the retrofitted model computes the base model's outputs
    bit for bit. ``W_V`` still receives gradient (dL/dW_V = dL/dv ⊗ e), so the first step moves it and
    from then on the tables and keys learn too. Zeroing the conv instead would leave Y = v ≠ 0.
  - **Decoding** (``state``): the n-gram and conv histories follow the transformers cache of each
    generation. ``attention_mask`` must be left padding: row b's first real token is a document start,
    so padding never enters an n-gram or the conv. Without a cache each forward is stateless.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from pathlib import Path

import torch
from torch import nn

from engram.hashing import NgramHasher, document_ids
from engram.hf.retrofit.blocks import find_blocks, model_dim
from engram.hf.retrofit.config import EngramAdapterConfig
from engram.hf.retrofit.state import Call, CacheStates, ConvState, Sequences, prompt_starts
from engram.model.engram import Engram
from engram.model.init import reset_derived_buffers
from engram.model.tables import TableHost
from engram.tokenizer import CompressedTokenizer


class EngramAdapter(nn.Module, TableHost):
    """The Engram modules, the hasher and the decode state of one retrofitted base model. A ``TableHost``
    (``engram_layers``, ``hasher``, ``named_tables``): ``engram.storage.apply_storage`` and ``export_tables``
    take it like an ``EngramLM``."""

    def __init__(self, config: EngramAdapterConfig, compressed: CompressedTokenizer, dim: int,
                 sparse_tables: bool = True):
        super().__init__()
        self.config = config
        self.dim = dim
        self.hasher = NgramHasher(config.engram, compressed)
        geometry = self.hasher.geometry
        self.modules_by_layer = nn.ModuleDict({
            str(lid): Engram(config.engram, dim, geometry[lid], config.norm_eps, branches=1, sparse_table=sparse_tables)
            for lid in config.engram.layer_ids})
        # the base model is not a submodule of its adapter (its parameters are not the adapter's)
        self.__dict__["_model"] = None
        self.__dict__["_blocks"] = None
        self._hooks: list = []
        self._call: Call | None = None
        self._pending: Sequences | None = None
        self._boundary: torch.Tensor | None = None
        self.caches = CacheStates()

    @property
    def engram_layers(self) -> dict[int, Engram]:
        return {int(lid): m for lid, m in self.modules_by_layer.items()}

    def named_tables(self) -> dict:
        """Module name -> hashed table, as ``EngramLM.named_tables`` (what ``Optimizers`` reads)."""
        return {f"modules_by_layer.{lid}.embedding": m.embedding for lid, m in self.modules_by_layer.items()}

    @property
    def compressed_tokenizer(self) -> CompressedTokenizer:
        return self.hasher.tokenizer

    @property
    def _states(self) -> dict:  # the live caches' states, by cache identity
        return self.caches._states

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
        if hasattr(model, "save_pretrained"):  # the instance's own: the base's files, then the adapter beside them
            model.__dict__["save_pretrained"] = functools.partial(_save_retrofitted, model, self)
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
        model.__dict__.pop("save_pretrained", None)
        self.__dict__.update(_model=None, _blocks=None)
        self._hooks = []
        self.caches.clear()
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
            state = self.caches.continuing(cache, past)
            if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask[:, -T:].all()):
                raise ValueError("padding after the first chunk of a cached generation would enter the n-grams "
                                 "and the conv: only the prompt may be (left) padded")
            ids, state.ngram_history = self.hasher.hash_with_history(input_ids, state.ngram_history)
            state.length += T
            self._call = Call(ids, None, state.conv)
        else:
            starts = prompt_starts(mask, B, T, input_ids.device)
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
                conv = {lid: ConvState(torch.zeros(B, P, 1, self.dim, device=input_ids.device, dtype=dtype))
                        for lid, m in self.engram_layers.items() if m.conv_weight is not None}
                state = Sequences(T, history, conv)
                if cache is not None:
                    self.caches.bind(cache, state)
                else:
                    self._pending = state  # the model creates the cache: bound after its forward
                self._call = Call(ids, doc_ids, conv)
            else:
                self._call = Call(self.hasher(input_ids, boundary), doc_ids, None)
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
                self.caches.bind(cache, self._pending)
            self._pending = None

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

    # -- files (engram.hf.retrofit.files) -----------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """adapter.safetensors (the modules' weights), adapter_config.json (this config and the base model's
        identity), hash_layout.json and the compressed tokenizer; the base model is not saved."""
        from engram.hf.retrofit.files import save_adapter

        return save_adapter(self, directory)

    @classmethod
    def load(cls, model: nn.Module, directory: str | os.PathLike, tokenizer=None,
             sparse_tables: bool = True) -> "EngramAdapter":
        """Attach the adapter saved in ``directory`` to ``model``: refuses a base model of another shape or
        a ``tokenizer`` that addresses other rows. Without ``tokenizer`` the saved compressed table is
        used as is (pass the tokenizer you will feed the model to have it checked). ``directory`` may also
        be a folder the retrofitted model's ``save_pretrained`` wrote (its adapter is in ``engram_adapter/``).
        ``sparse_tables``: as ``attach_engram``'s."""
        from engram.hf.retrofit.files import load_adapter

        return load_adapter(model, directory, tokenizer, sparse_tables)


ADAPTER_FOLDER = "engram_adapter"


def _save_retrofitted(model: nn.Module, adapter: "EngramAdapter", save_directory, *args, **kwargs):
    """``save_pretrained`` of a model with an adapter attached, through ``engram.hf.folder`` (atomic, with
    checksums): the model's files as transformers writes them, the adapter's tensors included (so Trainer's
    ``resume_from_checkpoint`` and ``load_state_dict`` restore them; a plain ``from_pretrained`` of the base
    class lists them as UNEXPECTED in its load report), and the adapter alone in ``engram_adapter/``
    (``EngramAdapter.load(model, folder)`` attaches it to a freshly loaded base)."""
    from engram.hf.folder import write_folder

    if kwargs.get("push_to_hub"):
        raise ValueError("save_pretrained(push_to_hub=True) of a retrofitted model: save to a folder, then upload "
                         "the folder (huggingface_hub.upload_folder)")
    if not kwargs.get("is_main_process", True):
        return

    def write(directory: Path) -> None:
        type(model).save_pretrained(model, directory, *args, **kwargs)
        adapter.save(directory / ADAPTER_FOLDER)

    write_folder(save_directory, write)


def _pad_id(tokenizer) -> int:
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if isinstance(value, int):
            return value
    return 0


def attach_engram(model: nn.Module, tokenizer, config: EngramAdapterConfig | None = None,
                  seed: int = 0, sparse_tables: bool = True) -> EngramAdapter:
    """Insert Engram modules into ``model`` (a Hugging Face causal LM) in place; returns the adapter.

    ``tokenizer``: the base model's own (a transformers tokenizer, a ``tokenizers.Tokenizer``, a
    directory or tokenizer.json): its ``CompressedTokenizer`` addresses the tables (a
    ``CompressedTokenizer`` is taken as is). The outputs equal the
    base model's exactly until the adapter is trained (``W_V`` starts at zero).

    ``sparse_tables`` (default True): the tables' gradients hold only the looked-up rows, for ``engram
    finetune``'s SparseAdam. False gives dense gradients, which transformers' ``Trainer`` needs (its AdamW
    and its gradient clipping refuse sparse ones); a dense gradient is as large as the table."""
    config = config or EngramAdapterConfig()
    if config.engram.pad_id is None:
        config = dataclasses.replace(config, engram=dataclasses.replace(config.engram, pad_id=_pad_id(tokenizer)))
    compressed = tokenizer if isinstance(tokenizer, CompressedTokenizer) else CompressedTokenizer.from_pretrained(tokenizer)
    adapter = build_adapter(config, compressed, model, sparse_tables)
    adapter.init_weights(seed=seed)
    return adapter.attach(model)


def build_adapter(config: EngramAdapterConfig, compressed: CompressedTokenizer, model: nn.Module,
                  sparse_tables: bool = True) -> EngramAdapter:
    """An adapter for ``model`` on its device, built on meta: buffers computed, weights not yet set."""
    param = next(model.parameters())
    with torch.device("meta"):
        adapter = EngramAdapter(config, compressed, model_dim(model), sparse_tables)
    adapter.to_empty(device=param.device)
    reset_derived_buffers(adapter)
    return adapter

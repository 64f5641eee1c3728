"""transformers' Qwen4-Exp models as table hosts: their PLE layers (the paper's Engram over Qwen's own hashing,
docs/ALGORITHM.md §2c) hashed by our ``NgramHasher`` and their tables placed by our storage tiers.

Legend: B batch, T time, H hash heads (all orders), d_h row width, n = N-1 ids of history.

A model is recognised by its structure, a submodule of class ``Qwen4ExpTextModel`` whose config lists
``ple_layer_ids``; transformers is never imported here, so ``engram.storage.apply_storage`` and
``export_tables`` take ``Qwen4ExpForCausalLM``, ``Qwen4ExpForConditionalGeneration`` or the text model as
transformers built them (``as_table_host`` asks ``qwen4exp_host``).

What changes when a tier is applied: each PLE layer's ``ple_embedding`` (transformers'
``Qwen4ExpTextNGramEmbedding``) is replaced by ``TieredPLEEmbedding``, which keeps the n-gram history in
transformers' cache exactly as the original does (conv state 2 of the layer) and reads rows from the
tier. A forward pre-hook on the text model hashes every PLE layer at once from the ids and the cached
history, and starts fetching each layer's rows before block 0 runs; each layer then takes its ids from
that one hashing (checked equal to its own inputs, else it hashes itself: the prefetch is an
optimisation, never a condition of correctness).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engram.hashing import NgramHasher
from engram.model.table_config import TableConfig
from engram.model.tables import HashedTable, TableHost
from engram.tokenizer import CompressedTokenizer

TEXT_MODEL = "Qwen4ExpTextModel"
NGRAM_EMBEDDING = "Qwen4ExpTextNGramEmbedding"
HISTORY_STATE = 2  # transformers keeps a PLE layer's last N-1 ids as its conv state 2


def eos_id(text_config) -> int:
    """The EOS that ends a PLE segment (the first, when the config lists several, as Qwen4-Exp takes it)."""
    eos = text_config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    if eos is None:
        raise ValueError("a Qwen4-Exp config with PLE layers needs eos_token_id: its n-gram segments end there")
    return int(eos)


def ple_layer_ids(text_config) -> list[int]:
    """The PLE layers as 0-based block indices (the config lists them 1-based and sorted)."""
    return [lid - 1 for lid in sorted(set(text_config.ple_layer_ids or []))]


def ple_table_config(text_config) -> TableConfig:
    """The tables of a Qwen4-Exp text config's PLE layers: one base size for every order's heads, raw ids,
    segments ending at EOS, rows padded to ``make_ngram_vocab_size_divisible_by``."""
    orders, heads = text_config.ngram_size - 1, text_config.heads_per_ngram
    if text_config.ple_embed_dim % (orders * heads):
        raise ValueError(f"ple_embed_dim={text_config.ple_embed_dim} is not a multiple of the {orders * heads} n-gram "
                         "heads")
    head_dim = text_config.ple_embed_dim // (orders * heads)
    return TableConfig(engram_vocab_size=[text_config.ngram_vocab_size_base] * orders,
                       max_ngram_size=text_config.ngram_size, n_embed_per_ngram=head_dim * heads,
                       n_head_per_ngram=heads, pad_id=eos_id(text_config), seed=text_config.seed, compress=False,
                       hash_scheme="qwen4exp", row_multiple=text_config.make_ngram_vocab_size_divisible_by)


def ple_hasher(text_config) -> NgramHasher:
    """Hashes raw ids for every PLE layer of a Qwen4-Exp text config, keyed by 0-based block index. Its ids
    plus ``offsets[layer]`` are the rows ``Qwen4ExpTextNGramEmbedding`` reads, bit for bit."""
    if not text_config.ple_layer_ids:
        raise ValueError("this Qwen4-Exp config has no PLE layer (ple_layer_ids is empty)")
    return NgramHasher(ple_table_config(text_config), CompressedTokenizer.identity(text_config.vocab_size),
                       ple_layer_ids(text_config))


def find_text_model(model: nn.Module) -> nn.Module | None:
    """The ``Qwen4ExpTextModel`` inside ``model`` (or ``model`` itself), None when there is none."""
    return next((m for m in model.modules() if type(m).__name__ == TEXT_MODEL), None)


class ParameterTable(HashedTable):
    """transformers' own table (an ``nn.Embedding`` of all heads' rows, offsets added by the caller) seen as a
    ``HashedTable``: what export and the tiers read from a model as transformers built it. (B, T, H) -> (B, T, H, d_h)."""

    def __init__(self, embedding: nn.Embedding, offsets: torch.Tensor):
        super().__init__()
        self.table = embedding
        self.register_buffer("offsets", offsets.clone(), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.table.weight

    @property
    def trainable(self) -> bool:
        return True

    @property
    def num_rows(self) -> int:
        return self.table.num_embeddings

    @property
    def dim(self) -> int:
        return self.table.embedding_dim

    def forward(self, hash_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(hash_ids + self.offsets.to(hash_ids.device), self.table.weight)


@dataclass
class _Hashed:
    ids: torch.Tensor  # (B, T) the ids hashed, after padding became EOS
    history: torch.Tensor  # (B, n) the cached ids before them
    hash_ids: dict[int, torch.Tensor]  # layer -> (B, T, H)


class PLEPlan:
    """Shared by a text model's tiered PLE layers: the hasher, the tables, and the last hashing."""

    def __init__(self, text_model: nn.Module, hasher: NgramHasher):
        self.config, self.hasher = text_model.config, hasher
        self.eos, self.n = eos_id(self.config), hasher.config.max_ngram_size - 1
        self.first = hasher.layer_ids[0]
        self.layers: dict[int, "TieredPLEEmbedding"] = {}
        self.last: _Hashed | None = None
        self.handle = text_model.register_forward_pre_hook(self.before_forward, with_kwargs=True)

    @staticmethod
    def cached(cache, layer_idx: int) -> torch.Tensor | None:
        """(B, n) the ids transformers keeps for ``layer_idx``, None before its first call."""
        return cache.get_conv_state(layer_idx, state_idx=HISTORY_STATE) if cache is not None else None

    def history(self, cached: torch.Tensor | None, batch: int, like: torch.Tensor) -> torch.Tensor:
        """(B, n) the ids before this call: the cached ones, or EOS when there are none (as transformers)."""
        return cached.clone() if cached is not None else like.new_full((batch, self.n), self.eos)

    def hash(self, ids: torch.Tensor, history: torch.Tensor) -> _Hashed:
        """Hash on the host (where the tiers' rows are found), whatever device the layers run on: the ids of
        every layer, kept with the inputs they came from."""
        ids, history = ids.cpu(), history.cpu()
        hash_ids, _ = self.hasher.hash_with_history(ids, history)
        self.last = _Hashed(ids, history, hash_ids)
        return self.last

    def hashed(self, ids: torch.Tensor, history: torch.Tensor) -> dict[int, torch.Tensor]:
        """Every layer's ids for ``ids`` after ``history``: the forward's one hashing when it is this one
        (compared on the host, so layers spread over several devices find it too)."""
        last, ids, history = self.last, ids.cpu(), history.cpu()
        if last is None or last.ids.shape != ids.shape or not torch.equal(last.ids, ids) or \
                not torch.equal(last.history, history):
            last = self.hash(ids, history)
        return last.hash_ids

    def before_forward(self, module, args, kwargs) -> None:
        """Hash all PLE layers from the forward's inputs and start fetching their rows."""
        self.last = None
        ids = kwargs.get("ple_input_ids")
        if ids is None:
            ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:  # inputs_embeds only: the text model recovers the ids itself; the layers hash them
            return
        ids = ids.long()
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        if isinstance(mask, dict):
            mask = mask.get("linear_attention")
        if isinstance(mask, torch.Tensor) and mask.ndim == 2 and ids.shape[1] > 1 and not bool((mask == 1).all()):
            ids = torch.where(mask[:, -ids.shape[1]:].bool(), ids, self.eos)  # padding hashes as EOS
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        hashed = self.hash(ids, self.history(self.cached(cache, self.first), ids.shape[0], ids))
        for lid, layer in self.layers.items():
            layer.embedding.prefetch(hashed.hash_ids[lid])


class TieredPLEEmbedding(nn.Module):
    """Stands in for transformers' ``Qwen4ExpTextNGramEmbedding`` of block ``layer_idx``: the same cache
    state and the same output (B, T, H * d_h), its rows read from ``embedding`` (any ``HashedTable``)."""

    def __init__(self, plan: PLEPlan, layer_idx: int, embedding: HashedTable):
        super().__init__()
        self.plan, self.layer_idx, self.embedding = plan, layer_idx, embedding  # the hasher stays on the host
        plan.layers[layer_idx] = self

    def forward(self, input_ids: torch.Tensor, cache=None, past_key_values=None) -> torch.Tensor:
        cache = cache if cache is not None else past_key_values
        input_ids = input_ids.long()
        B, T = input_ids.shape
        plan, n = self.plan, self.plan.n
        cached = plan.cached(cache, self.layer_idx)
        history = plan.history(cached, B, input_ids)
        if cache is not None:  # what transformers stores: the last n ids, an EOS-padded short first call
            kept = F.pad(input_ids, (n - T, 0), value=plan.eos) if cached is None and T < n else input_ids
            cache.update_conv_state(kept, self.layer_idx, state_idx=HISTORY_STATE, conv_kernel_size=n)
        hash_ids = plan.hashed(input_ids, history)[self.layer_idx]  # (B, T, H)
        rows = self.embedding(hash_ids)  # (B, T, H, d_h)
        return rows.to(input_ids.device).flatten(-2)


class _PLESlot:
    """What placements read and set on one PLE layer: ``embedding``, its table wherever the rows are."""

    def __init__(self, host: "Qwen4ExpHost", layer_idx: int):
        self.host, self.layer_idx = host, layer_idx
        self.ple = host.text_model.layers[layer_idx].ple
        self._view: ParameterTable | None = None

    @property
    def embedding(self) -> HashedTable:
        current = self.ple.ple_embedding
        if isinstance(current, TieredPLEEmbedding):
            return current.embedding
        if self._view is None or self._view.table is not current.ngram_embedding:
            self._view = ParameterTable(current.ngram_embedding, self.host.hasher.offsets[self.layer_idx])
        return self._view

    @embedding.setter
    def embedding(self, table: HashedTable) -> None:
        current = self.ple.ple_embedding
        if isinstance(current, TieredPLEEmbedding):
            current.embedding = table
        else:
            self.ple.ple_embedding = TieredPLEEmbedding(self.host.plan(), self.layer_idx, table)


class Qwen4ExpHost(TableHost):
    """A transformers Qwen4-Exp model as a ``TableHost``: ``engram_layers`` maps each PLE block to the slot of
    its table, ``hasher`` hashes as transformers does, ``contributions()`` gives the PLE modules (what
    knock-out zeroes). The transformers layout is checked against the hasher's when the host is made."""

    def __init__(self, model: nn.Module, text_model: nn.Module):
        self.model, self.text_model = model, text_model
        plan = getattr(text_model, "_engram_ple_plan", None)
        self.hasher = plan.hasher if plan is not None else ple_hasher(text_model.config)
        for lid in self.hasher.layer_ids:
            self._check(lid)
        self._slots = {lid: _PLESlot(self, lid) for lid in self.hasher.layer_ids}

    def _check(self, lid: int) -> None:
        ple = self.text_model.layers[lid].ple
        if ple is None:
            raise ValueError(f"block {lid} of the Qwen4-Exp model has no PLE layer, its config lists it")
        theirs = ple.ple_embedding
        if isinstance(theirs, TieredPLEEmbedding) or type(theirs).__name__ != NGRAM_EMBEDDING:
            return
        geometry = self.hasher.geometry[lid]
        found = (tuple(theirs.head_vocab_sizes), tuple(theirs.head_offsets), theirs.ngram_embedding.num_embeddings,
                 theirs.ngram_embedding.embedding_dim)
        ours = (geometry.sizes, geometry.offsets, geometry.num_rows, self.hasher.config.head_dim)
        if found != ours:
            raise ValueError(f"block {lid}'s PLE table (sizes, offsets, rows, d_h) {found} is not the hash layout "
                             f"{ours} of its config: a transformers version with another PLE layout?")

    def plan(self) -> PLEPlan:
        plan = getattr(self.text_model, "_engram_ple_plan", None)
        if plan is None:
            plan = PLEPlan(self.text_model, self.hasher)
            self.text_model._engram_ple_plan = plan
        return plan

    @property
    def engram_layers(self) -> dict[int, _PLESlot]:
        return dict(self._slots)

    def named_tables(self) -> dict[str, HashedTable]:
        return {f"layers.{lid}.ple.ple_embedding": slot.embedding for lid, slot in self.engram_layers.items()}

    def contributions(self) -> dict[int, nn.Module]:
        return {lid: self.text_model.layers[lid].ple for lid in self.hasher.layer_ids}


def qwen4exp_host(model) -> Qwen4ExpHost | None:
    """``model`` as a table host when it is (or holds) a transformers Qwen4-Exp text model with PLE layers."""
    if not isinstance(model, nn.Module):
        return None
    text_model = find_text_model(model)
    if text_model is None or not getattr(text_model.config, "ple_layer_ids", None):
        return None
    return Qwen4ExpHost(model, text_model)

"""EngramLM: a decoder-only transformer with Engram modules at configured blocks.

Legend: B batch, T time, G hyper-connection branches, D model width, V vocabulary, H hash heads.

Data flow: raw ids (B, T) -> hasher: {layer: (B, T, H)} once per batch -> token embedding (B, T, D)
[averaged with the hashed n-gram embeddings when the model has OverEncoding] -> copied into G
branches (B, T, G, D) -> blocks [Engram? -> attention -> FFN/MoE], each sub-layer through a
residual/hyper-connection -> mean over branches -> norm -> head (B, T, V).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engram.model.config import ModelConfig
from engram.hashing import NgramHasher, TableGeometry, document_ids
from engram.model.attention import MLA, Attention, document_mask
from engram.model.cache import InferenceCache, LayerCache
from engram.model.engram import Engram
from engram.model.engram_v41 import EngramV41
from engram.model.hyper import make_residual
from engram.model.init import derive_seed, normal_, normal_units_, reset_derived_buffers, seeded
from engram.model.layers import RMSNorm, RotaryEmbedding, SwiGLU
from engram.model.moe import MoE, moe_layers, update_moe_bias
from engram.model.overencoding import OverEncoding, input_layer_id
from engram.model.tables import HashedTable, TableHost
from engram.tokenizer import CompressedTokenizer, check_token_ids

IGNORE_INDEX = -100


def _keeping_weights(block: Block, *args) -> torch.Tensor:
    """``block(*args)`` with its attention keeping its weights (``output_attentions``) while it runs."""
    block.attn.keep_weights = True
    try:
        return block(*args)
    finally:
        block.attn.keep_weights = False


def _checkpoint(fn, *args):
    """Activation checkpointing when no function was set (``gradient_checkpointing = True`` by hand)."""
    from torch.utils.checkpoint import checkpoint

    return checkpoint(fn, *args, use_reentrant=False)


@dataclass
class LMOutput:
    logits: torch.Tensor  # (B, T, V)
    loss: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None  # n_layers + 1 of (B, T, D), when asked for
    attentions: tuple[torch.Tensor, ...] | None = None  # n_layers of (B, h, T, S), when asked for


class Block(nn.Module):
    """[Engram ->] attention -> FFN or MoE. The attention (GQA or MLA) and FFN variants are chosen here,
    at build time."""

    def __init__(self, config: ModelConfig, layer_id: int, geometry: TableGeometry | None, sparse_tables: bool = False):
        super().__init__()
        bb = config.backbone
        self.layer_id = layer_id
        self.engram = None
        if geometry is not None:  # the variant is a class chosen here (docs/ALGORITHM.md §2 vs §2b)
            variant = EngramV41 if config.engram.variant == "v4.1" else Engram
            self.engram = variant(config.engram, bb.d_model, geometry, bb.norm_eps, branches=bb.hc_mult,
                                  sparse_table=sparse_tables)
        self.attn_norm = RMSNorm(bb.d_model, bb.norm_eps)
        self.attn = MLA(bb) if bb.mla is not None else Attention(bb)
        self.attn_res = make_residual(bb.d_model, bb.hc_mult, bb.hc_sinkhorn_iters, bb.norm_eps)
        self.ffn_norm = RMSNorm(bb.d_model, bb.norm_eps)
        use_moe = bb.moe is not None and layer_id >= bb.moe.first_dense_layers
        self.ffn = MoE(bb.d_model, bb.moe) if use_moe else SwiGLU(bb.d_model, bb.ffn_hidden)
        self.ffn_res = make_residual(bb.d_model, bb.hc_mult, bb.hc_sinkhorn_iters, bb.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                hash_ids: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
                cache: LayerCache | None = None, token_mask: torch.Tensor | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, G, D) -> (B, T, G, D). ``cache``: this block's decode state, when decoding.
        ``token_mask`` (B, T): False at barrier tokens (V4.1 models with ``barrier_ids`` only).
        ``attn_mask`` (B, 1, T, T): the packed batch's document mask, or None (causal)."""
        if self.engram is not None:
            y = self.engram(x, hash_ids, doc_ids, cache, token_mask)
            x = y if self.engram.adds_residual else x + y  # V4.1's module adds x itself: never twice
        x = self.attn_res(x, lambda h: self.attn(self.attn_norm(h), cos, sin, cache, attn_mask))
        return self.ffn_res(x, lambda h: self.ffn(self.ffn_norm(h)))


class EngramLM(nn.Module, TableHost):
    """``model(input_ids).logits`` is (B, T, V); with ``labels`` the output also carries the loss.

    ``compressed_tokenizer`` fixes the Engram and OverEncoding addresses; without one, compressed id =
    raw id (no compression). A hasher whose config says ``compress=False`` hashes raw ids whatever it
    is given; ``self.compressed_tokenizer`` keeps the tokenizer the model was given, which checkpoints
    store. A config with neither Engram layers nor OverEncoding builds the plain dense/MoE baseline.
    ``sparse_tables`` (default True): the hashed tables' gradients hold only the looked-up rows, as
    ``engram.train.Optimizers`` (SparseAdam, O(rows touched) per step, docs/PITFALLS.md §12) needs. False gives
    dense gradients, for optimizers that take only dense ones (``torch.optim.AdamW`` refuses sparse
    gradients) or for inspecting them. Decided here, at build time; nothing flips it later.

    Build, place, initialise: the constructor builds every module on the meta device and, unless it
    is itself called under ``torch.device("meta")``, materialises them on the current default device
    and runs ``init_weights`` once. Under ``torch.device("meta")`` nothing is allocated: place the model
    (``engram.distributed.parallelize`` shards its tables), then ``to_empty(device=...)`` and
    ``init_weights()``.
    """

    def __init__(self, config: ModelConfig, compressed_tokenizer: CompressedTokenizer | None = None,
                 sparse_tables: bool = True):
        super().__init__()
        unresolved = config.unresolved()
        if unresolved:
            raise ValueError(f"{', '.join(unresolved)} unset: these come from the data; align the config with its "
                             "data (ModelConfig.with_data) or set them to build a model without data")
        self.config = config
        bb = config.backbone
        self.hasher = None
        self.overencoding = None
        self.compressed_tokenizer = compressed_tokenizer
        if config.engram_layer_ids or config.overencoding is not None:
            tok = compressed_tokenizer or CompressedTokenizer.identity(bb.vocab_size)
            if tok.raw_vocab_size != bb.vocab_size:
                raise ValueError(f"compressed tokenizer covers {tok.raw_vocab_size} raw ids but "
                                 f"backbone.vocab_size is {bb.vocab_size}")
            self.compressed_tokenizer = tok
        target = torch.get_default_device()
        with torch.device("meta"):  # allocate nothing yet, initialise nothing twice
            if config.engram_layer_ids:
                self.hasher = NgramHasher(config.engram, self.compressed_tokenizer)
            if config.overencoding is not None:
                self.overencoding = OverEncoding(config.overencoding, bb.d_model, self.compressed_tokenizer,
                                                 input_layer_id(config), sparse_table=sparse_tables)
            # an empty weight: init_weights fills it; nn.Embedding's own N(0, 1) fill on meta would import
            # torch._dynamo, a second on a cold process
            self.tok_embeddings = nn.Embedding(bb.vocab_size, bb.d_model, _weight=torch.empty(bb.vocab_size, bb.d_model))
            self.rope = RotaryEmbedding(bb.rope_dim, bb.max_seq_len, bb.rope_theta, bb.rope_scaling)
            geometry = self.hasher.geometry if self.hasher is not None else {}
            self.layers = nn.ModuleList(Block(config, i, geometry.get(i), sparse_tables) for i in range(bb.n_layers))
            self.norm = RMSNorm(bb.d_model, bb.norm_eps)
            self.output = nn.Linear(bb.d_model, bb.vocab_size, bias=False)
        # activation checkpointing per block (transformers' gradient_checkpointing_enable sets both; any
        # callable with torch.utils.checkpoint's signature works): blocks recompute in backward
        self.gradient_checkpointing = False
        self._gradient_checkpointing_func = None
        if target.type != "meta":
            self.to_empty(device=target)
            self.init_weights()

    @property
    def pads_as_dead(self) -> bool:
        """DeepSeek-V4.1 reads left padding as DEAD: the all-pad n-gram with its gate closed (the paper's
        module hashes the pad token's own id there, and the positions' outputs are never used)."""
        return self.hasher is not None and self.config.engram.variant == "v4.1"

    @property
    def engram_layers(self) -> dict[int, Engram | EngramV41]:
        return {blk.layer_id: blk.engram for blk in self.layers if blk.engram is not None}

    def named_tables(self) -> dict[str, HashedTable]:
        """Module name -> every hashed table, whatever placement holds its rows, in module order
        (OverEncoding's, then the blocks'), which is the order of the table optimizer's parameters."""
        return {name: m for name, m in self.named_modules() if isinstance(m, HashedTable)}

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, tables: bool = True) -> None:
        """Initialise every parameter and buffer, once, from one seed drawn from torch's generator
        (``torch.manual_seed``). Each weight comes from its own stream, ``derive_seed(seed, name)``
        (``engram.model.init``), a routed expert and a SwiGLU hidden unit from theirs: two models that
        share a parameter (same name and shape) start it equal under the same seed, whatever else either
        holds, so an MoE and its Engram twin are seed-paired. Engram, hyper-connection and
        OverEncoding modules draw their own weights inside their module's stream.

        | parameter                         | init                                   |
        |-----------------------------------|----------------------------------------|
        | tok_embeddings.weight             | N(0, 1)                                |
        | attention wq/wk/wv (MLA: wq or    | N(0, std)                              |
        | wq_a/wq_b, wkv_a, wkv_b), FFN     |                                        |
        | w1/w3                             |                                        |
        | attention wo, FFN/expert w2       | N(0, std / sqrt(2 * n_layers))         |
        | output.weight                     | N(0, std)                              |
        | norms (MLA's q_norm, kv_norm too) | ones                                   |
        | MoE, hyper-connections, Engram,   | their own ``init_weights``             |
        | OverEncoding                      |                                        |
        | hashed table rows                 | per table, from                        |
        |                                   | ``derive_seed(seed, module name)``:    |
        |                                   | row blocks, so shards agree with whole |
        |                                   | tables (``engram.model.tables``)       |
        | buffers (hasher, RoPE, offsets,   | recomputed from the config; MoE bias   |
        | MoE expert bias and load)         | and load counts zero                   |

        ``tables=False`` leaves the rows of the hashed tables as they are (a checkpoint fills them).
        The work is ``draw_init_seed``, ``init_top`` and ``init_block`` for each block: a placement that
        materialises one block at a time (FSDP2, ``engram.distributed.fsdp``) calls them itself and gets
        the same values.
        """
        reset_derived_buffers(self)
        seed = self.draw_init_seed()
        self.init_top(seed, std, tables)
        for i in range(len(self.layers)):
            self.init_block(i, seed, std, tables)

    @staticmethod
    def draw_init_seed() -> int:
        """The one draw from torch's generator that every weight's stream derives from."""
        return int(torch.randint(0, 2**62, ()).item())

    @torch.no_grad()
    def init_top(self, seed: int, std: float = 0.02, tables: bool = True) -> None:
        """``init_weights`` outside the blocks: embedding, head, final norm, OverEncoding."""
        normal_(self.tok_embeddings.weight, 1.0, derive_seed(seed, "tok_embeddings.weight"))
        normal_(self.output.weight, std, derive_seed(seed, "output.weight"))
        nn.init.ones_(self.norm.weight)
        if self.overencoding is not None:
            with seeded(derive_seed(seed, "overencoding")):
                self.overencoding.init_weights(tables=tables)

    @torch.no_grad()
    def init_block(self, i: int, seed: int, std: float = 0.02, tables: bool = True) -> None:
        """``init_weights`` of block ``i``: each weight from its own stream, so blocks can come in any order."""

        def own(name: str):  # the stream of a module that initialises itself (nn.init inside)
            return seeded(derive_seed(seed, name))

        out_std = std / math.sqrt(2 * self.config.backbone.n_layers)
        blk = self.layers[i]
        for norm in (blk.attn_norm, blk.ffn_norm):
            nn.init.ones_(norm.weight)
        for part, sub in blk.attn.named_children():  # wq, wk, wv, wo; or MLA's matrices and norms
            if isinstance(sub, RMSNorm):
                nn.init.ones_(sub.weight)
            else:
                normal_(sub.weight, out_std if part == "wo" else std,
                        derive_seed(seed, f"layers.{i}.attn.{part}.weight"))
        if isinstance(blk.ffn, SwiGLU):  # by hidden unit: a narrower FFN starts as the first units
            normal_units_([blk.ffn.w1.weight, blk.ffn.w3.weight], [blk.ffn.w2.weight], std, out_std,
                          derive_seed(seed, f"layers.{i}.ffn"))
        else:
            blk.ffn.init_weights(std, out_std, seed=derive_seed(seed, f"layers.{i}.ffn"))
        for part, res in (("attn_res", blk.attn_res), ("ffn_res", blk.ffn_res)):
            with own(f"layers.{i}.{part}"):  # PlainResidual has nothing to draw; mHC draws in its own stream
                res.init_weights()
        if blk.engram is not None:
            with own(f"layers.{i}.engram"):
                blk.engram.init_weights(std, table_seed=derive_seed(seed, f"layers.{i}.engram.embedding"),
                                        tables=tables)

    def hash(self, input_ids: torch.Tensor, boundary: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """Hash ids for every Engram layer, computed once per batch (empty for a baseline), plus the
        OverEncoding ids under its virtual layer id (``overencoding.layer_id``, never a block's)."""
        ids = {} if self.hasher is None else self.hasher(input_ids, boundary)
        if self.overencoding is not None:
            ids |= self.overencoding.hasher(input_ids, boundary)
        return ids

    def _hash_cached(self, input_ids: torch.Tensor, boundary: torch.Tensor | None, cache: InferenceCache,
                     dead: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """``hash`` for a cached call: each hasher continues from its last N-1 ids (docs/PITFALLS.md §5);
        ``dead`` (B, T): positions the Engram hasher reads as barriers."""
        ids = {}
        if self.hasher is not None:
            ids, cache.ngram_history = self.hasher.hash_with_history(input_ids, cache.ngram_history, boundary, dead)
        if self.overencoding is not None:
            more, cache.input_ngram_history = self.overencoding.hasher.hash_with_history(
                input_ids, cache.input_ngram_history, boundary)
            ids |= more
        return ids

    def new_cache(self, starts: torch.Tensor, max_len: int, growable: bool = False) -> InferenceCache:
        """Decode state for ``len(starts)`` left-padded sequences (``starts[b]``: first real token)."""
        return InferenceCache(self, starts, max_len, growable)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                boundary: torch.Tensor | None = None,
                hash_ids: dict[int, torch.Tensor] | None = None, cache: InferenceCache | None = None,
                output_hidden_states: bool = False, output_attentions: bool = False) -> LMOutput:
        """input_ids (B, T) raw ids; labels (B, T), the loss predicts labels[:, t+1] at position t
        (ignore index -100); boundary (B, T) bool, True where a packed document starts, resets the
        n-grams and the short conv; hash_ids, if already computed (e.g. by a prefetcher).

        With ``cache`` (``new_cache``), the call continues the cached sequences: T new tokens per row,
        attending to and hashing with everything cached before; prompts go in the first call.

        ``output_hidden_states``: the output also holds the token embeddings and each block's output, as
        (B, T, D) each (the G hyper-connection branches averaged, as the head reads them; the last one after
        the final norm, as transformers' models give it). ``output_attentions``: each block's attention
        weights (B, h, T, S), computed written out instead of by SDPA's fused kernel."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        V = self.config.backbone.vocab_size
        check_token_ids(input_ids, V, "the model's vocabulary", allow_negative=False)
        if cache is None:
            positions = torch.arange(T, device=input_ids.device)  # (T,)
            if hash_ids is None:
                hash_ids = self.hash(input_ids, boundary)
        else:
            if boundary is not None or labels is not None:
                raise ValueError("a cached call takes neither boundary (the cache's starts are the "
                                 "document starts) nor labels")
            padding = cache.padding(T) if self.pads_as_dead else None  # (B, T) or None
            positions, boundary = cache.begin(T)  # (B, T), (B, T) or None
            hash_ids = self._hash_cached(input_ids, boundary, cache, padding)
        self.prefetch(hash_ids)
        doc_ids = document_ids(boundary, input_ids.shape, input_ids.device)
        cos, sin = self.rope(positions)

        x = self.tok_embeddings(input_ids)  # (B, T, D)
        if self.overencoding is not None:
            x = self.overencoding(x, hash_ids[self.overencoding.layer_id])  # (B, T, D)
        x = x[:, :, None, :].expand(-1, -1, self.config.backbone.hc_mult, -1).contiguous()  # (B, T, G, D)
        padding = padding if cache is not None else None
        dead = None if self.hasher is None else self.hasher.barriers(input_ids, padding)  # (B, T) or None
        token_mask = None if dead is None else ~dead
        # packed documents do not attend to each other (built once, shared by every block)
        # (one host sync: windows that hold a single document keep the fast causal kernel)
        attn_mask = document_mask(doc_ids) if doc_ids is not None and cache is None and \
            self.config.backbone.document_mask and bool(boundary[:, 1:].any()) else None  # (B, 1, T, T)
        checkpointed = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        hidden = [x.mean(dim=2)] if output_hidden_states else None  # (B, T, D) each
        attentions = [] if output_attentions else None
        for i, blk in enumerate(self.layers):
            args = (x, cos, sin, hash_ids.get(blk.layer_id), doc_ids, None if cache is None else cache.layers[i],
                    token_mask, attn_mask)
            # with attention weights asked for, the block keeps them inside the call, so a recomputation in
            # backward takes the same path
            run = functools.partial(_keeping_weights, blk) if output_attentions else blk
            x = (self._gradient_checkpointing_func or _checkpoint)(run, *args) if checkpointed else run(*args)
            if output_attentions:
                attentions.append(blk.attn.weights)
                blk.attn.weights = None
            if output_hidden_states:
                hidden.append(x.mean(dim=2))
        if cache is not None:
            cache.end(T)
        final = self.norm(x.mean(dim=2))  # (B, T, G, D) -> (B, T, D)
        logits = self.output(final)  # (B, T, V)
        if output_hidden_states:
            hidden[-1] = final

        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
            # shift the labels, not the logits: slicing (B, T, V) logits costs a full zero-filled copy
            # in backward
            targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T), last position ignored
            loss = F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX)
        return LMOutput(logits=logits, loss=loss, hidden_states=None if hidden is None else tuple(hidden),
                        attentions=None if attentions is None else tuple(attentions))

    def prefetch(self, hash_ids: dict[int, torch.Tensor]) -> None:
        """Addresses depend only on token ids, so every Engram layer's rows are known before block 0
        runs: a storage tier (``engram.storage``) that replaced a table starts fetching them here, in
        the background, while the first blocks compute (docs/ALGORITHM.md §5). Device-resident tables do nothing."""
        for layer_id, layer in self.engram_layers.items():
            layer.embedding.prefetch(hash_ids[layer_id])

    def moe_layers(self) -> list[MoE]:
        return moe_layers(self)

    def update_moe_bias(self) -> None:
        """Auxiliary-loss-free balancing: call once per optimizer step."""
        update_moe_bias(self)

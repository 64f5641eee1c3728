"""OverEncoding (Huang et al. 2025, "Over-Tokenized Transformer"): hashed n-gram embeddings averaged
into the input embedding. The baseline the paper compares Engram with at equal memory (docs/ALGORITHM.md §4).

Legend: B batch, T time, D model width, N max n-gram order, O = N-1 orders, K heads per order,
H = K*O hash heads, d_h row width, E = K*d_h = n_embed_per_ngram (one order's width).

    x_t = (E[x_t] + sum_{n=2..N} P_n e_{n,t}) / N

where e_{n,t} (E,) concatenates the K rows of order n's heads and P_n is a bias-free E -> D linear
(one per order; absent when E = D).

Same memory as Engram, by construction:
  - the config (``OverEncodingConfig``) has Engram's table fields with Engram's meanings, and the
    tables are the same ``MultiHeadEmbedding`` (one flat table of prime-sized heads, ``.sparse`` for
    SparseAdam at the table learning rate);
  - addresses come from an ``NgramHasher``: compressed ids (unless ``compress`` is False), PCG64
    multipliers, one prime per head, pads before the sequence and across document starts.

Which multipliers: the hasher treats the input as a virtual layer with id ``backbone.n_layers``
(``input_layer_id``). Engram layer ids are validated to be < n_layers, so with equal seeds the input's
PCG64 stream (seed + 10007*n_layers) is never an Engram layer's, and a model with both has
independent collisions in its input and Engram tables. Its primes come from its own search, so with
equal sizes they equal those of a model's first Engram layer: equal rows, equal width.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from engram.model.config import ModelConfig
from engram.model.table_config import OverEncodingConfig
from engram.hashing import NgramHasher
from engram.model.tables import MultiHeadEmbedding
from engram.tokenizer import CompressedTokenizer


def input_layer_id(config: ModelConfig) -> int:
    """The virtual layer id of the input's hasher: one past the last block, so never an Engram layer's."""
    return config.backbone.n_layers


class OrderProjection(nn.Module):
    """One bias-free E -> D matrix per n-gram order, stored as (O, D, E): (B, T, O, E) -> (B, T, O, D)."""

    def __init__(self, orders: int, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(orders, out_dim, in_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("btoe,ode->btod", x, self.weight)


class OverEncoding(nn.Module):
    """The input embedding step: ``forward(tok_emb, hash_ids)`` -> the averaged input (B, T, D).

    ``hasher`` (non-persistent buffers, like ``EngramLM.hasher``) maps raw ids to ``{layer_id: (B, T, H)}``;
    the model hashes once per batch and hands this module its ids.
    """

    def __init__(self, config: OverEncodingConfig, dim: int, compressed_tokenizer: CompressedTokenizer,
                 layer_id: int, sparse_table: bool = False):
        super().__init__()
        self.config = config
        self.layer_id = layer_id
        self.hasher = NgramHasher(config, compressed_tokenizer, layer_ids=[layer_id])
        self.embedding = MultiHeadEmbedding(self.hasher.geometry[layer_id], config.head_dim, sparse=sparse_table)
        # the variant is chosen here: a projection only when an order's width is not the model's
        E = config.n_embed_per_ngram
        self.proj = OrderProjection(config.n_orders, E, dim) if E != dim else nn.Identity()
        if self.embedding.weight.device.type != "meta":  # inside EngramLM: the model initialises once
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, tables: bool = True) -> None:
        """Initialisation, per parameter:

        | parameter         | init                                                                 |
        |-------------------|----------------------------------------------------------------------|
        | embedding.weight  | zeros                                                                |
        | proj.weight       | N(0, 1/sqrt(E)): a unit-variance row stays unit-variance per coordinate |

        Zero tables, because nothing gates this input: a row that training never reached (an n-gram
        seen only at evaluation time) must add nothing, not a fixed random vector. With N(0, 1) rows
        the tiny memory sweep was 0.4-0.5 nats *worse* than no memory at all, at every table size.
        Rows leave zero on their first lookup (their gradient is P_n^T dL/dx, nonzero).
        ``tables=False`` leaves the table rows as they are (a checkpoint fills them).
        """
        if tables and self.embedding.trainable:
            self.embedding.init_weights(0.0, 0)
        if isinstance(self.proj, OrderProjection):
            nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(self.config.n_embed_per_ngram))

    def forward(self, tok_emb: torch.Tensor, hash_ids: torch.Tensor) -> torch.Tensor:
        """tok_emb (B, T, D), hash_ids (B, T, H) int64 -> (B, T, D)."""
        B, T = hash_ids.shape[:2]
        O, N = self.config.n_orders, self.config.max_ngram_size
        rows = self.embedding(hash_ids)  # (B, T, H, d_h), heads ordered by order, then head
        per_order = rows.reshape(B, T, O, -1)  # (B, T, O, K*d_h) = (B, T, O, E)
        grams = self.proj(per_order).to(tok_emb.dtype)  # (B, T, O, D)
        return (tok_emb + grams.sum(dim=2)) / N  # the mean of 1 + (N-1) embeddings

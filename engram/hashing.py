"""N-gram hashing (docs/ALGORITHM.md §2 steps 2-4), bit-exact with DeepSeek's reference.

Legend: B batch, T time, L Engram layers, N max n-gram order, H = K*(N-1) hash heads.

Build time (once, on the host): per-layer odd multipliers from numpy's PCG64 and per-head prime table
sizes from one global ascending search. Run time (every batch, on the ids' device, pure int64 torch):
compress ids, shift them back 0..N-1 steps (pad id before the sequence start and across document
starts), XOR-fold the products into one mix per order, and reduce the mix modulo each head's prime.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from engram.tokenizer import CompressedTokenizer, check_token_ids

if TYPE_CHECKING:  # configs are read by field; the hasher sits below the model package
    from engram.model.table_config import TableConfig

INT64_MAX = 2**63 - 1
LAYER_SEED_STRIDE = 10007  # seed of layer l is seed + 10007*l (reference constant)
LAYOUT_FORMAT = "engram.hash_layout/1"
DEAD = -1  # a barrier token in a decode history (compressed ids are >= 0)


# -- build-time pieces (pure functions) -------------------------------------------------------------
def multiplier_bound(compressed_vocab_size: int) -> int:
    """Upper bound (exclusive) for r in m = 2r + 1, chosen so x*m < 2**63 for every id x < V'."""
    return max(1, INT64_MAX // compressed_vocab_size // 2)


def layer_multipliers(seed: int, layer_id: int, max_ngram_size: int, compressed_vocab_size: int) -> np.ndarray:
    """The N odd multipliers of one layer. numpy's PCG64 stream is part of the contract
    (docs/ALGORITHM.md §2 step 2)."""
    rng = np.random.default_rng(seed + LAYER_SEED_STRIDE * layer_id)
    r = rng.integers(0, multiplier_bound(compressed_vocab_size), size=max_ngram_size, dtype=np.int64)
    return r * 2 + 1


SPLITMIX_GAMMA = 0x9E3779B97F4A7C15  # splitmix64's increment (2^64 / golden ratio)
MASK64 = (1 << 64) - 1


def splitmix64(state: int) -> int:
    """The output of Vigna's splitmix64 generator whose state is ``state``: the state moves by the gamma,
    then is mixed by two xor-shift-multiplies and a final xor-shift (all mod 2^64)."""
    z = (state + SPLITMIX_GAMMA) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def qwen4exp_multipliers(seed: int, index: int, max_ngram_size: int, vocab_size: int) -> np.ndarray:
    """Qwen4-Exp's N odd multipliers of its ``index``-th hashed layer (docs/ALGORITHM.md §2c): splitmix64 of
    ``seed + 10007·index`` stepped by the gamma once per order, reduced below the same bound as §2's."""
    base = seed + LAYER_SEED_STRIDE * index
    bound = multiplier_bound(vocab_size)
    return np.array([2 * (splitmix64((base + SPLITMIX_GAMMA * (k + 1)) & MASK64) % bound) + 1
                     for k in range(max_ngram_size)], dtype=np.int64)


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def next_prime(after: int, seen: set[int]) -> int:
    """Smallest prime strictly greater than ``after`` that is not in ``seen``."""
    candidate = after + 1
    while not is_prime(candidate) or candidate in seen:
        candidate += 1
    return candidate


def table_primes(engram_vocab_size: list[int], n_head_per_ngram: int, layer_ids: list[int]) -> dict[int, list[list[int]]]:
    """Prime row counts per (layer, order, head) from one global search (docs/ALGORITHM.md §2 step 3,
    docs/PITFALLS.md §4).

    Reordering or adding layers changes later primes: persist the result, never recompute silently.
    """
    seen: set[int] = set()
    primes: dict[int, list[list[int]]] = {}
    for layer_id in layer_ids:
        per_order = []
        for size in engram_vocab_size:
            heads, current = [], size - 1
            for _ in range(n_head_per_ngram):
                current = next_prime(current, seen)
                seen.add(current)
                heads.append(current)
            per_order.append(heads)
        primes[layer_id] = per_order
    return primes


@dataclass(frozen=True)
class TableGeometry:
    """One layer's flat table (docs/ALGORITHM.md §2 step 5): H heads with their prime row counts, ordered by n-gram
    order then head; head j's rows start at ``offsets[j]``. The one place sizes and offsets come from:
    the hasher, the tables, parameter accounting and the storage tiers all read it. ``row_multiple``: the
    table is padded to a multiple of this many rows (never addressed; Qwen4-Exp pads to 128)."""

    sizes: tuple[int, ...]
    row_multiple: int = 1

    @property
    def n_heads(self) -> int:
        return len(self.sizes)

    @property
    def num_rows(self) -> int:
        return -(-sum(self.sizes) // self.row_multiple) * self.row_multiple

    @property
    def offsets(self) -> tuple[int, ...]:
        return tuple(int(x) for x in np.cumsum((0,) + self.sizes[:-1]))


def geometry_from_primes(primes: dict[int, list[list[int]]], row_multiple: int = 1) -> dict[int, TableGeometry]:
    """layer id -> geometry, from ``table_primes``' per-layer, per-order lists of head primes."""
    return {lid: TableGeometry(tuple(p for order in per_order for p in order), row_multiple)
            for lid, per_order in primes.items()}


def table_geometry(config: TableConfig, layer_ids: list[int]) -> dict[int, TableGeometry]:
    """layer id -> its table's geometry, from the one global prime search over ``layer_ids`` in order
    (what a hasher of ``config`` over these layers holds, without building one). Qwen4-Exp's primes (the
    n-th prime above its base, for the n-th head of all its layers) are this search with every order at
    the base size."""
    return geometry_from_primes(table_primes(config.engram_vocab_size, config.n_head_per_ngram, list(layer_ids)),
                                config.row_multiple)


# -- run-time pieces (pure torch) -------------------------------------------------------------------
def document_ids(boundary: torch.Tensor | None, shape: torch.Size, device: torch.device) -> torch.Tensor | None:
    """(B, T) bool with True where a document starts -> (B, T) int64 running document index."""
    if boundary is None:
        return None
    if boundary.shape != shape:
        raise ValueError(f"boundary mask shape {tuple(boundary.shape)} != input_ids shape {tuple(shape)}")
    return boundary.to(device=device, dtype=torch.int64).cumsum(dim=1)


def shift_back(x: torch.Tensor, k: int, fill: float, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """x[:, t-k] at position t, ``fill`` where t-k < 0 or t-k lies in an earlier document.

    x is (B, T, ...); doc_ids (B, T). Used for n-gram lookbacks and for the short conv's taps.

    Document ids are non-decreasing in t, so once a lookback crosses a boundary every older one does
    too (docs/PITFALLS.md §7).
    """
    if k == 0:
        return x
    T = x.shape[1]
    out = torch.full_like(x, fill)
    if k < T:
        out[:, k:] = x[:, : T - k]
        if doc_ids is not None:
            crossed = torch.ones_like(doc_ids, dtype=torch.bool)
            crossed[:, k:] = doc_ids[:, : T - k] != doc_ids[:, k:]
            out = out.masked_fill(crossed.view(crossed.shape + (1,) * (x.dim() - 2)), fill)
    return out


def ngram_mixes(compressed: torch.Tensor, multipliers: torch.Tensor, pad_id: int,
                doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """XOR-folded n-gram mixes for every layer and order.

    compressed: (B, T) int64 compressed ids; multipliers: (L, N) int64.
    Returns (L, N-1, B, T): entry [l, n-2] = XOR_{k<n} x'_{t-k} * m_{l,k}, the mix of order n.
    """
    L, N = multipliers.shape
    out = compressed.new_empty((L, N - 1, *compressed.shape))  # (L, N-1, B, T), written in place
    mix = compressed[None] * multipliers[:, 0, None, None]  # (L, B, T)
    for k in range(1, N):
        back = shift_back(compressed, k, pad_id, doc_ids)  # (B, T)
        mix = torch.bitwise_xor(mix, back[None] * multipliers[:, k, None, None], out=out[:, k - 1])
    return out


def heads_from_mixes(mixes: torch.Tensor, moduli: torch.Tensor, n_head_per_ngram: int) -> torch.Tensor:
    """(L, N-1, B, T) mixes, (L, H) primes -> (L, B, T, H) hash ids; heads ordered by order, then head.

    Mixes are non-negative (products of ids < V' and multipliers bounded by ``multiplier_bound``), so
    remainder is the floor mod of the reference (docs/PITFALLS.md §2). The K heads of one order broadcast one
    mix against K primes, so the mix is never copied per head.
    """
    L, O, B, T = mixes.shape
    K = n_head_per_ngram
    out = mixes.new_empty(L, O, K, B, T)
    primes = moduli.view(L, O, K, 1, 1)
    for o in range(O):
        torch.remainder(mixes[:, o, None], primes[:, o], out=out[:, o])  # (L, 1, B, T) % (L, K, 1, 1)
    return out.view(L, O * K, B, T).permute(0, 2, 3, 1)  # (L, B, T, H)


# -- the object models and trainers use -------------------------------------------------------------
class NgramHasher(nn.Module):
    """Hashes raw ids ``(B, T)`` into ``{layer_id: (B, T, H) int64}`` for every layer at once.

    ``config``: the tables (an ``EngramConfig``, whose ``layer_ids`` are used unless ``layer_ids`` is
    given, or an ``OverEncodingConfig`` with the input's virtual layer id). Holds the layout:
    ``multipliers[layer_id]`` (int64 tensor of length N), ``primes[layer_id]`` (list per order of list
    per head) and ``geometry[layer_id]`` (the table's sizes and offsets). With ``config.compress`` False
    it hashes raw ids: ``tokenizer`` is then the identity, whatever tokenizer it was given, and the
    layout records that.

    Its tensors are non-persistent buffers: they follow ``model.to(device)``, are saved as a layout
    (``layout()``) rather than as weights, and verified on load (``check_layout``). ``reset_buffers``
    writes them from the host-side layout, so a hasher built on the meta device is filled by
    ``EngramLM.init_weights`` after ``to_empty``.
    """

    def __init__(self, config: TableConfig, compressed_tokenizer: CompressedTokenizer,
                 layer_ids: list[int] | None = None):
        super().__init__()
        if layer_ids is None:
            if not hasattr(config, "layer_ids"):
                raise ValueError(f"{type(config).__name__} names no layers: pass layer_ids")
            layer_ids = config.layer_ids
        if config.pad_id is None:
            raise ValueError(f"{type(config).__name__}.pad_id is None (it comes from the data): set it, or "
                             "build the model from a config aligned with its data (ModelConfig.with_data)")
        if config.pad_id >= compressed_tokenizer.raw_vocab_size:
            raise ValueError(f"{type(config).__name__}.pad_id={config.pad_id} is outside the tokenizer's "
                             f"{compressed_tokenizer.raw_vocab_size} ids")
        if not config.compress:  # the "no tokenizer compression" ablation: hash raw ids (docs/ALGORITHM.md §5)
            compressed_tokenizer = CompressedTokenizer.identity(compressed_tokenizer.raw_vocab_size)
        self.config = config
        self.tokenizer = compressed_tokenizer
        self.layer_ids = list(layer_ids)
        self.compressed_vocab_size = compressed_tokenizer.vocab_size
        self.compressed_pad_id = int(compressed_tokenizer.lookup[config.pad_id])

        # V4.1's barrier ("dead") tokens: no n-gram crosses one (docs/ALGORITHM.md §2b); raw ids, checked like inputs
        self.barrier_ids = list(getattr(config, "barrier_ids", None) or [])
        if any(i >= compressed_tokenizer.raw_vocab_size for i in self.barrier_ids):
            raise ValueError(f"{type(config).__name__}.barrier_ids {self.barrier_ids} reach outside the tokenizer's "
                             f"{compressed_tokenizer.raw_vocab_size} ids")

        # Qwen4-Exp: the n-grams of a segment end at EOS (the pad id), and its multipliers follow the i-th layer
        self.eos_segments = config.hash_scheme == "qwen4exp"
        if self.eos_segments:
            multipliers = [qwen4exp_multipliers(config.seed, i, config.max_ngram_size, self.compressed_vocab_size)
                           for i in range(len(self.layer_ids))]
        else:
            multipliers = [layer_multipliers(config.seed, lid, config.max_ngram_size, self.compressed_vocab_size)
                           for lid in self.layer_ids]
        self.multipliers = {lid: torch.from_numpy(m) for lid, m in zip(self.layer_ids, multipliers)}
        self.primes = table_primes(config.engram_vocab_size, config.n_head_per_ngram, self.layer_ids)
        self.geometry = geometry_from_primes(self.primes, config.row_multiple)

        L, N, H = len(self.layer_ids), config.max_ngram_size, config.n_heads
        self.register_buffer("lookup", torch.empty(compressed_tokenizer.raw_vocab_size, dtype=torch.int64),
                             persistent=False)
        self.register_buffer("multiplier_table", torch.empty(L, N, dtype=torch.int64), persistent=False)
        self.register_buffer("modulus_table", torch.empty(L, H, dtype=torch.int64), persistent=False)
        self.register_buffer("barrier_table", torch.empty(len(self.barrier_ids), dtype=torch.int64), persistent=False)
        self.reset_buffers()

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """Write the buffers from the layout held on the host (a no-op on the meta device)."""
        L, H = len(self.layer_ids), self.config.n_heads
        self.lookup.copy_(self.tokenizer.lookup)
        self.barrier_table.copy_(torch.tensor(self.barrier_ids, dtype=torch.int64))
        if L:
            self.multiplier_table.copy_(torch.stack([self.multipliers[lid] for lid in self.layer_ids]))
            self.modulus_table.copy_(torch.tensor([self.geometry[lid].sizes for lid in self.layer_ids],
                                                  dtype=torch.int64).reshape(L, H))

    @property
    def offsets(self) -> dict[int, torch.Tensor]:
        """layer id -> (H,) int64 start row of each head in the layer's flat table."""
        return {lid: torch.tensor(g.offsets, dtype=torch.int64) for lid, g in self.geometry.items()}

    def table_rows(self, layer_id: int) -> int:
        """Rows of one layer's flat table: the sum of its head primes."""
        return self.geometry[layer_id].num_rows

    def compress(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Raw ids -> compressed ids. Negative ids (ignore index, -1 padding) become the pad id first
        (docs/PITFALLS.md §2); ids past the tokenizer raise ValueError naming the id."""
        lo, _ = check_token_ids(input_ids, self.tokenizer.raw_vocab_size)
        ids = input_ids.long()
        if lo < 0:
            ids = torch.where(ids < 0, self.config.pad_id, ids)
        return self.lookup.index_select(0, ids.reshape(-1)).view(ids.shape)  # faster than lookup[ids]

    def barriers(self, input_ids: torch.Tensor, dead: torch.Tensor | None = None) -> torch.Tensor | None:
        """(B, T) raw ids -> (B, T) bool, True at barrier tokens and where ``dead`` (B, T) is True (e.g. the
        positions V4.1 reads as DEAD because the attention mask marks them as padding); None when neither."""
        found = torch.isin(input_ids, self.barrier_table) if self.barrier_ids else None
        if dead is not None:
            dead = dead.to(device=input_ids.device, dtype=torch.bool)
            found = dead if found is None else found | dead
        return found

    def _cut_at_barriers(self, compressed: torch.Tensor, dead: torch.Tensor,
                         starts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """A barrier starts a new segment and its own id reads as pad: a lookback that reaches it reads pad,
        and every older one crosses the segment start, so it is pad too, as at a document start (segment
        ids never decrease). -> compressed (B, T), segments (B, T)."""
        cut = dead if starts is None else dead | starts.to(torch.bool)
        return compressed.masked_fill(dead, self.compressed_pad_id), cut.to(torch.int64).cumsum(dim=1)

    def _after_eos(self, ids: torch.Tensor, boundary: torch.Tensor | None) -> torch.Tensor | None:
        """The qwen4exp scheme's segment starts: every position right after an EOS (the pad id), with
        ``boundary``'s document starts; (B, T) ids -> (B, T) bool. Other schemes: ``boundary`` as it is."""
        if not self.eos_segments:
            return boundary
        starts = F.pad(ids[:, :-1] == self.compressed_pad_id, (1, 0))
        return starts if boundary is None else starts | boundary.to(device=ids.device, dtype=torch.bool)

    def segments(self, input_ids: torch.Tensor, boundary: torch.Tensor | None = None,
                 dead: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What every lookback reads: (B, T) raw ids -> compressed ids (B, T) (barriers as pad) and segment
        ids (B, T) (document starts, barriers and, in the qwen4exp scheme, EOS; None when there are none).
        ``shift_back`` of these with the pad id is exactly what the hash of each order mixes (``engram
        inspect tables`` reads it)."""
        compressed = self.compress(input_ids)  # (B, T)
        if boundary is not None and boundary.shape != input_ids.shape:
            raise ValueError(f"boundary mask shape {tuple(boundary.shape)} != input_ids shape {tuple(input_ids.shape)}")
        boundary = self._after_eos(compressed, boundary)
        doc_ids = document_ids(boundary, input_ids.shape, input_ids.device)
        dead = self.barriers(input_ids, dead)
        if dead is not None:
            compressed, doc_ids = self._cut_at_barriers(compressed, dead, boundary)
        return compressed, doc_ids

    def forward(self, input_ids: torch.Tensor, boundary: torch.Tensor | None = None,
                dead: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """input_ids (B, T) raw; boundary (B, T) bool, True where a new document starts; dead (B, T) bool,
        positions hashed as barriers (the all-pad n-gram, sticky for later lookbacks)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        if not self.layer_ids:
            return {}
        compressed, doc_ids = self.segments(input_ids, boundary, dead)  # (B, T), (B, T) or None
        mixes = ngram_mixes(compressed, self.multiplier_table, self.compressed_pad_id, doc_ids)  # (L, N-1, B, T)
        hashes = heads_from_mixes(mixes, self.modulus_table, self.config.n_head_per_ngram)  # (L, B, T, H)
        return {lid: hashes[i] for i, lid in enumerate(self.layer_ids)}

    def hash_with_history(self, input_ids: torch.Tensor, history: torch.Tensor, boundary: torch.Tensor | None = None,
                          dead: torch.Tensor | None = None) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """Hash (B, T) raw ids that continue earlier ids whose last N-1 compressed ids are ``history``.

        Used by incremental decoding (docs/PITFALLS.md §5). Returns the hashes of the T new positions and the
        new history (B, N-1); positions before a document start in this call read as pad.
        """
        n = history.shape[1]
        compressed = self.compress(input_ids)
        dead_new = self.barriers(input_ids, dead)
        if dead_new is not None:  # a barrier stays in the history as DEAD, so the next call stops there too
            compressed = compressed.masked_fill(dead_new, DEAD)
        full = torch.cat([history, compressed], dim=1)  # (B, N-1+T)
        starts = None if boundary is None else F.pad(boundary.to(torch.bool), (n, 0))  # history: the previous doc
        if self.eos_segments:  # the history keeps its EOS: a segment start is found again in every window
            starts = self._after_eos(full, starts)
        doc_ids = None if starts is None else starts.to(torch.int64).cumsum(dim=1)
        values = full
        if dead_new is not None:
            values, doc_ids = self._cut_at_barriers(full, full == DEAD, starts)
        mixes = ngram_mixes(values, self.multiplier_table, self.compressed_pad_id, doc_ids)[..., n:]  # (L, N-1, B, T)
        hashes = heads_from_mixes(mixes, self.modulus_table, self.config.n_head_per_ngram)
        new_history = full[:, -n:]
        if doc_ids is not None and not self.eos_segments:
            same_doc = doc_ids[:, -n:] == doc_ids[:, -1:]
            new_history = new_history.masked_fill(~same_doc, self.compressed_pad_id)
        return {lid: hashes[i] for i, lid in enumerate(self.layer_ids)}, new_history

    # -- layout persistence (docs/PITFALLS.md §3, §4) ------------------------------------------------------
    def layout(self) -> dict[str, Any]:
        """Everything that fixes the addresses, as JSON-able data."""
        c = self.config
        return {
            "format": LAYOUT_FORMAT,
            "tokenizer": self.tokenizer.describe(),
            "compressed_vocab_size": self.compressed_vocab_size,
            "pad_id": c.pad_id,
            "compressed_pad_id": self.compressed_pad_id,
            "max_ngram_size": c.max_ngram_size,
            "n_head_per_ngram": c.n_head_per_ngram,
            "engram_vocab_size": list(c.engram_vocab_size),
            "seed": c.seed,
            "layer_ids": list(self.layer_ids),
            "multipliers": {str(lid): self.multipliers[lid].tolist() for lid in self.layer_ids},
            "primes": {str(lid): self.primes[lid] for lid in self.layer_ids},
            "offsets": {str(lid): list(self.geometry[lid].offsets) for lid in self.layer_ids},
        } | ({"barrier_ids": list(self.barrier_ids)} if self.barrier_ids else {}) | (  # absent: layouts before V4.1
            {"hash_scheme": c.hash_scheme} if c.hash_scheme != "deepseek" else {}) | (  # absent: the first scheme
            {"row_multiple": c.row_multiple} if c.row_multiple != 1 else {})

    def check_layout(self, stored: dict[str, Any]) -> None:
        """Raise ValueError listing every field where ``stored`` disagrees with this hasher."""
        if not isinstance(stored, dict):
            raise ValueError(f"hash layout must be a dict, got {type(stored).__name__}")
        mine = json.loads(json.dumps(self.layout()))  # normalise ints/keys like a JSON round trip
        diffs = [key for key in sorted(set(mine) | set(stored)) if mine.get(key) != stored.get(key)]
        if diffs:
            detail = "; ".join(f"{k}: stored {_short(stored.get(k))} vs current {_short(mine.get(k))}" for k in diffs)
            raise ValueError(f"hash layout mismatch in {diffs} ({detail}). The stored tables were "
                             "addressed with another tokenizer or Engram config; refusing to use them.")


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def __getattr__(name: str):
    if name == "TableConfig":  # imported here once; the hasher reads configs by field and sits below the model
        raise AttributeError("engram.hashing.TableConfig: the config lives in engram.model.table_config.TableConfig")
    raise AttributeError(f"module 'engram.hashing' has no attribute {name!r}")

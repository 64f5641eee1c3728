"""Decode state for incremental generation of a batch of sequences (docs/ALGORITHM.md §2, "decode-time state"): the
typed object ``EngramLM.forward(..., cache=)`` reads and writes, one ``LayerCache`` per block.

Legend: B sequences, T new tokens this call, L tokens cached so far, k key/value heads, d head width,
G branches, D model width, N max n-gram order, K conv taps, P = (K-1)*N conv lookback; for MLA
(``BackboneConfig.mla``) c its latent width (kv_lora_rank), r its RoPE key width (qk_rope_head_dim).

Per sequence the model must remember what training-time full forwards see:
  - attention: keys and values of every earlier position (B, k, L, d) per block; for MLA the
    ``keys`` buffer holds the normalised latent (B, 1, L, c) and ``values`` the rotated RoPE key
    (B, 1, L, r) instead, c + r numbers per token (``MLA.forward`` expands them to keys and values);
  - hashing: the last N-1 *compressed* ids (docs/PITFALLS.md §5: hashing only the new token would pad the
    history and give other n-grams than training did), for the Engram hasher and, with its own N,
    for the OverEncoding hasher;
  - each Engram conv: the last P *normalised* conv inputs per branch (docs/PITFALLS.md §6); none when the
    module has no conv (short_conv=False).

Prompts of different lengths are left-padded; ``starts[b]`` is row b's first real token. The model
treats ``starts`` as a document start (n-grams and the conv reset there), attention masks the pad keys,
and RoPE positions count from ``starts``, so each row decodes exactly as if it were alone.
"""

from __future__ import annotations

import torch


class LayerCache:
    """One block's slice of the state: its KV buffers and, for an Engram block, its conv history. The
    buffers are what the block's attention stores: keys and values (B, k, max_len, d) for ``Attention``,
    the latent (B, 1, max_len, c) and the rotated RoPE key (B, 1, max_len, r) for ``MLA``."""

    def __init__(self, parent: "InferenceCache", keys: torch.Tensor, values: torch.Tensor,
                 conv_history: torch.Tensor | None):
        self.parent = parent
        self.keys, self.values = keys, values  # (B, k, max_len, d); MLA: (B, 1, max_len, c), (B, 1, max_len, r)
        self.conv_history = conv_history  # (B, P, G, D), or None without an Engram conv

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this call's (B, k, T, d) keys/values; return all keys/values so far (B, k, L+T, d)
        (MLA: latents and RoPE keys, their widths c and r for d)."""
        start, T = self.parent.length, k.shape[2]
        self.keys[:, :, start: start + T] = k
        self.values[:, :, start: start + T] = v
        return self.keys[:, :, : start + T], self.values[:, :, : start + T]

    @property
    def mask(self) -> torch.Tensor:
        return self.parent.mask


class InferenceCache:
    """Everything a model needs to continue B sequences one call at a time.

    Build it with ``model.new_cache(starts, max_len)``; pass it to ``model(ids, cache=cache)``.
    """

    def __init__(self, model, starts: torch.Tensor, max_len: int, growable: bool = False):
        """``model``: the ``EngramLM`` the cache is for (its config, blocks and hashers). ``growable``:
        when a call needs more than ``max_len`` positions the KV buffers double instead of refusing
        (for callers that do not know the final length, e.g. transformers' ``generate``)."""
        bb = model.config.backbone
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
        self.starts = starts.to(device=device, dtype=torch.long)  # (B,)
        if self.starts.dim() != 1:
            raise ValueError(f"starts must be (B,), got shape {tuple(self.starts.shape)}")
        B = self.starts.numel()
        self.max_len = max_len
        self.growable = growable
        self.length = 0
        self.mask: torch.Tensor | None = None  # (B, 1, T, L+T) for the current call
        if bb.mla is None:
            key_shape = value_shape = (B, bb.n_kv_heads, max_len, bb.head_dim)
        else:  # MLA caches its latent and its one RoPE key shared by every head
            key_shape, value_shape = (B, 1, max_len, bb.mla.kv_lora_rank), (B, 1, max_len, bb.mla.qk_rope_head_dim)
        self.layers: list[LayerCache] = []
        for blk in model.layers:
            conv = None
            if blk.engram is not None and blk.engram.config.short_conv:
                e = blk.engram.config
                conv = torch.zeros(B, (e.kernel_size - 1) * e.dilation, bb.hc_mult, bb.d_model, device=device, dtype=dtype)
            self.layers.append(LayerCache(self, torch.zeros(key_shape, device=device, dtype=dtype),
                                          torch.zeros(value_shape, device=device, dtype=dtype), conv))
        # (B, N-1) compressed ids per hasher, pads until the first call
        self.ngram_history: torch.Tensor | None = _pad_history(model.hasher, B, device)  # Engram layers
        self.input_ngram_history: torch.Tensor | None = None  # OverEncoding
        if model.overencoding is not None:
            self.input_ngram_history = _pad_history(model.overencoding.hasher, B, device)

    @property
    def batch_size(self) -> int:
        return self.starts.numel()

    def begin(self, T: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prepare a call of T tokens: returns RoPE positions (B, T) and the boundary (B, T) or None."""
        if self.length + T > self.max_len:
            if not self.growable:
                raise ValueError(f"the cache holds {self.max_len} positions; {self.length} used, {T} more requested")
            self._grow(max(self.length + T, 2 * self.max_len))
        device = self.starts.device
        absolute = torch.arange(self.length, self.length + T, device=device)  # (T,)
        positions = (absolute[None] - self.starts[:, None]).clamp_min(0)  # (B, T)
        keys = torch.arange(self.length + T, device=device)  # (L+T,)
        # a query sees real keys up to itself; a pad query sees only itself (a row of -inf would be NaN)
        allowed = (keys[None, None] <= absolute[None, :, None]) & (keys[None, None] >= self.starts[:, None, None])
        allowed |= keys[None, None] == absolute[None, :, None]
        self.mask = allowed[:, None]  # (B, 1, T, L+T)
        boundary = None
        if bool(((self.starts >= self.length) & (self.starts < self.length + T)).any()):
            boundary = absolute[None] == self.starts[:, None]  # (B, T): each row's first real token
        return positions, boundary

    def padding(self, T: int) -> torch.Tensor | None:
        """(B, T) bool, True at the left padding among the next call's T positions; None when there is none
        (one host sync)."""
        absolute = torch.arange(self.length, self.length + T, device=self.starts.device)  # (T,)
        padding = absolute[None] < self.starts[:, None]
        return padding if bool(padding.any()) else None

    def end(self, T: int) -> None:
        self.length += T
        self.mask = None

    def _grow(self, max_len: int) -> None:
        """Reallocate every KV buffer to ``max_len`` positions, keeping what is cached."""
        for layer in self.layers:
            for name in ("keys", "values"):
                old = getattr(layer, name)  # (B, k, max_len, d)
                new = old.new_zeros(old.shape[0], old.shape[1], max_len, old.shape[3])
                new[:, :, : self.length] = old[:, :, : self.length]
                setattr(layer, name, new)
        self.max_len = max_len

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep, reorder or repeat sequences: row b becomes old row ``index[b]`` in every per-sequence
        tensor (starts, KV buffers, conv histories, n-gram histories). Beam search reorders with it."""
        index = index.to(self.starts.device, torch.long)
        self.starts = self.starts.index_select(0, index)
        for layer in self.layers:
            layer.keys = layer.keys.index_select(0, index)
            layer.values = layer.values.index_select(0, index)
            if layer.conv_history is not None:
                layer.conv_history = layer.conv_history.index_select(0, index)
        if self.ngram_history is not None:
            self.ngram_history = self.ngram_history.index_select(0, index)
        if self.input_ngram_history is not None:
            self.input_ngram_history = self.input_ngram_history.index_select(0, index)


def starts_from_left_padding(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) left-padding mask (zeros, then ones, per row) -> (B,) index of each row's first real
    token; any other mask is refused, since that token is where the row's n-grams and conv start."""
    mask = attention_mask.to(torch.bool)
    B, T = mask.shape
    starts = T - mask.sum(dim=1)  # (B,)
    if not torch.equal(mask, torch.arange(T, device=mask.device)[None] >= starts[:, None]):
        raise ValueError("attention_mask must be left padding (zeros, then ones, per row): each row's first real "
                         "token starts its n-grams and conv (tokenizer.padding_side = 'left')")
    if bool((starts >= T).any()):
        raise ValueError("a row of attention_mask has no real token")
    return starts


def _pad_history(hasher, B: int, device: torch.device) -> torch.Tensor | None:
    if hasher is None:
        return None
    n = hasher.config.max_ngram_size - 1
    return torch.full((B, n), hasher.compressed_pad_id, dtype=torch.long, device=device)

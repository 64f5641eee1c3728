"""The adapter's decode state, bound to the transformers cache of each generation.

Legend: B sequences, T new tokens this call, D the base model's width, N max n-gram order, K conv taps,
P = (K-1)*N conv lookback.

The n-gram history (B, N-1) and each module's conv history (B, P, 1, D) of the sequences one cache holds
live in a ``Sequences`` record, tied to the cache object by identity (``CacheStates``). A cache of
length 0 starts new sequences; its ``reorder_cache`` / ``batch_select_indices`` / ``batch_repeat_interleave``
are wrapped so beam search reorders the Engram state with the keys and values.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from engram.model.cache import starts_from_left_padding


class ConvState:
    """What ``Engram.short_conv`` reads and writes when decoding (the ``LayerCache`` contract)."""

    def __init__(self, conv_history: torch.Tensor):
        self.conv_history = conv_history  # (B, P, 1, D)


@dataclass
class Sequences:
    """The Engram state of the sequences one transformers cache holds."""

    length: int
    ngram_history: torch.Tensor  # (B, N-1) compressed ids
    conv: dict[int, ConvState]

    def select(self, index: torch.Tensor) -> None:
        index = index.to(self.ngram_history.device, torch.long)
        self.ngram_history = self.ngram_history.index_select(0, index)
        for state in self.conv.values():
            state.conv_history = state.conv_history.index_select(0, index)


@dataclass
class Call:
    """What the model's pre-hook computed for the forward in flight."""

    hash_ids: dict[int, torch.Tensor]  # layer -> (B, T, H)
    doc_ids: torch.Tensor | None  # (B, T)
    conv: dict[int, ConvState] | None


def prompt_starts(attention_mask, B: int, T: int, device) -> torch.Tensor:
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


class CacheStates:
    """The ``Sequences`` of every live transformers cache, keyed by the cache's identity: an entry goes when
    its cache is freed, and the cache's row operations (beam search) apply to it too."""

    def __init__(self):
        self._states: dict[int, tuple[weakref.ref, Sequences]] = {}

    def clear(self) -> None:
        self._states.clear()

    def continuing(self, cache, past: int) -> Sequences:
        """The state of ``cache``, which holds ``past`` tokens already; refused when the cache was filled
        without the adapter, copied or cropped."""
        entry = self._states.get(id(cache))
        if entry is None or entry[0]() is not cache or entry[1].length != past:
            raise ValueError("this cache holds no Engram state for its tokens: it was filled without the "
                             "adapter, copied, or cropped (assisted and speculative decoding are not supported "
                             "with an Engram adapter); start the generation again")
        return entry[1]

    def bind(self, cache, state: Sequences) -> None:
        """Tie ``state`` to ``cache`` and make the cache's row operations apply to it too. The wrappers
        hold the cache weakly: a cache keeps no reference cycle, so its keys and values are freed as soon
        as ``generate`` drops it."""
        key = id(cache)
        self._states[key] = (weakref.ref(cache), state)
        weakref.finalize(cache, self._states.pop, key, None)
        if getattr(cache, "_engram_wrapped", False):
            return
        states, ref = self._states, weakref.ref(cache)

        def current() -> Sequences:
            return states[id(ref())][1]

        for name in ("reorder_cache", "batch_select_indices"):  # present on some cache classes only
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

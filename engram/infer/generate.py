"""Incremental generation with the decode cache (``engram.model.cache``).

Prompts of different lengths are left-padded into one batch, run through the model once (the
prefill fills the cache), then each step feeds one new token per sequence. The logits are the same
as one full forward over each sequence alone (tested to 1e-5 for dense, MoE and Engram models).
"""

from __future__ import annotations

from typing import Callable

import torch

from engram.model.transformer import EngramLM


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) > top_p  # keep the smallest set reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """prompts -> ids (B, T) left-padded with ``pad_id``, starts (B,) index of each first real token."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
    return ids, torch.tensor([T - len(p) for p in prompts])


def fit_context(prompts: list[list[int]], max_new_tokens: int, context: int, truncate: bool = False) -> list[list[int]]:
    """The context policy: a prompt plus ``max_new_tokens`` must fit in the model's ``context``
    (``backbone.max_seq_len``, the longest sequence it was built for). Otherwise it is refused, or with
    ``truncate`` the prompt keeps its last ``context - max_new_tokens`` tokens (its start, BOS included,
    is dropped, as in a training window cut from the middle of a document)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    if max_new_tokens >= context:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in the model's context of "
                         f"{context} tokens (backbone.max_seq_len)")
    longest = max((len(p) for p in prompts), default=0)
    if longest + max_new_tokens <= context:
        return prompts
    if not truncate:
        raise ValueError(f"the prompt ({longest} tokens) plus max_new_tokens={max_new_tokens} exceeds the model's "
                         f"context of {context} tokens (backbone.max_seq_len); shorten the prompt, generate fewer "
                         f"tokens, or truncate (keep the prompt's last {context - max_new_tokens} tokens)")
    keep = context - max_new_tokens
    return [p[-keep:] for p in prompts]


@torch.no_grad()
def generate_batch(model: EngramLM, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.8,
                   top_k: int | None = 50, top_p: float | None = None, seed: int = 0,
                   stop_ids: set[int] | None = None,
                   on_token: Callable[[int, int], None] | None = None, truncate: bool = False) -> list[list[int]]:
    """Continue every prompt (raw ids); returns the new ids per prompt, each ending at its first stop id.

    ``on_token(row, id)`` streams tokens as they come. Prompts that do not fit the model's context with
    ``max_new_tokens`` are refused, or cut from the left with ``truncate`` (``fit_context``). Non-finite
    logits (NaN or inf weights) raise ValueError instead of producing arbitrary tokens.
    """
    prompts = fit_context(prompts, max_new_tokens, model.config.backbone.max_seq_len, truncate)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    pad_id = model.config.engram.pad_id if model.config.engram is not None else 0
    ids, starts = left_pad(prompts, pad_id)
    cache = model.new_cache(starts, ids.shape[1] + max_new_tokens)
    generator = torch.Generator(device=device).manual_seed(seed)
    logits = model(ids.to(device), cache=cache).logits[:, -1]  # (B, V)
    outs: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in range(max_new_tokens):
        if not bool(torch.isfinite(logits).all()):
            model.train(was_training)
            raise ValueError(f"the model's logits are not finite at generated token {step} (NaN or inf in the "
                             "weights or tables); refusing to sample from them")
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        for b, token in enumerate(nxt.tolist()):
            if done[b]:
                continue
            outs[b].append(token)
            if on_token is not None:
                on_token(b, token)
            done[b] = bool(stop_ids) and token in stop_ids
        if all(done) or step == max_new_tokens - 1:
            break
        logits = model(nxt[:, None], cache=cache).logits[:, -1]
    model.train(was_training)
    return outs


def generate(model: EngramLM, prompt: list[int], max_new_tokens: int, temperature: float = 0.8,
             top_k: int | None = 50, top_p: float | None = None, seed: int = 0,
             stop_ids: set[int] | None = None, on_token: Callable[[int], None] | None = None,
             truncate: bool = False) -> list[int]:
    """Continue one prompt; ``on_token(id)`` streams each new id."""
    stream = None if on_token is None else (lambda _row, token: on_token(token))
    return generate_batch(model, [prompt], max_new_tokens, temperature, top_k, top_p, seed, stop_ids, stream,
                          truncate)[0]

"""Text generation by recomputing the whole prefix each step.

Exact by construction (every step is one full causal forward, so n-grams, the short conv and
attention see exactly what training saw), at O(T^2) cost. Meant for short samples (CLI ``sample``,
the demo); a cached incremental decoder is a separate piece of work.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

from engram.model.transformer import EngramLM


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next ids (B,). temperature 0 is greedy."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
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


@torch.no_grad()
def generate(model: EngramLM, prompt: list[int], max_new_tokens: int, temperature: float = 0.8,
             top_k: int | None = 50, top_p: float | None = None, seed: int = 0,
             stop_ids: set[int] | None = None, on_token: Callable[[int], None] | None = None) -> list[int]:
    """Continue ``prompt`` (raw ids); returns the new ids. ``on_token`` streams each id as it comes."""
    if not prompt:
        raise ValueError("generate needs a non-empty prompt")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([prompt], device=device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ids).logits[:, -1]  # (1, V)
        nxt = sample_next(logits, temperature, top_k, top_p, generator)
        token = int(nxt)
        out.append(token)
        if on_token is not None:
            on_token(token)
        if stop_ids and token in stop_ids:
            break
        ids = torch.cat([ids, nxt[:, None]], dim=1)
    model.train(was_training)
    return out

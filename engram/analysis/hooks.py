"""What several ``engram inspect`` verbs share: forward hooks into a built model, and reading a
checkpoint's validation windows.

Legend: B batch, T time, G hyper-connection branches, D model width, V vocabulary.

Analysis is not a flag inside the layers: every tool attaches forward hooks to a finished ``EngramLM``
inside a context manager and removes them on exit, so no hook outlives a tool (the tools put the model
in eval mode and leave it there). Layer numbers in results are 1-based block indices (block 1 is the
first), like the paper's.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Iterator

import torch

from engram.model.tables import as_table_host
from engram.train.startup import checkpoint_data

# -- hooks -----------------------------------------------------------------------------------------


def storage_report(stats: dict) -> dict:
    """A storage handle's ``stats()`` with its layers keyed by 1-based block, as every report here is."""
    return {**stats, "layers": {str(lid + 1): entry for lid, entry in stats["layers"].items()}}


@contextlib.contextmanager
def knockout(model) -> Iterator[None]:
    """Zero every Engram module's contribution Y (docs/ALGORITHM.md §5 knock-out) while the context is open.

    ``model``: any table host (``as_table_host``), transformers' Qwen4-Exp included (its PLE layers return
    zeros, so each block's stream passes them unchanged). The module still runs (its output is replaced
    by zeros), so a storage tier's prefetch stays matched; the hooks are removed on exit, whatever happens
    inside.
    """
    def zero(mod, args, kwargs, out):  # V4.1's module returns x + Y: knocked out it returns x
        if not getattr(mod, "adds_residual", False):
            return torch.zeros_like(out)
        return args[0] if args else kwargs["hidden"]

    contributions = as_table_host(model, "knockout").contributions()
    handles = [m.register_forward_hook(zero, with_kwargs=True) for m in contributions.values()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture_gates(model) -> Iterator[dict[int, list[torch.Tensor]]]:
    """Record alpha (B, T, G) fp32 of every Engram layer on each forward: ``{layer_id: [per call]}``.

    ``Engram.gate`` is a method, not a module, so it cannot be hooked; the hook recomputes alpha from
    the module's own pieces (gather -> ``gate``) on the same inputs, which is what its forward used.
    """
    gates: dict[int, list[torch.Tensor]] = {lid: [] for lid in model.engram_layers}

    def hook(lid):
        def fn(mod, args, kwargs, out):
            call = inspect.signature(mod.forward).bind(*args, **kwargs).arguments  # both variants' one signature
            hidden, hash_ids = call["hidden"], call["hash_ids"]
            B, T = hash_ids.shape[:2]
            with torch.no_grad():
                e = mod.embedding(hash_ids).reshape(B, T, -1)  # (B, T, M)
                alpha = mod.gate(hidden, e)[..., 0].float()  # (B, T, G)
                mask = call.get("token_mask")  # barrier tokens: the gate applied there is 0
                if mask is not None:
                    alpha = alpha * mask[..., None].float()
                gates[lid].append(alpha.cpu())
        return fn

    handles = [layer.register_forward_hook(hook(lid), with_kwargs=True) for lid, layer in model.engram_layers.items()]
    try:
        yield gates
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def capture_streams(model) -> Iterator[list[torch.Tensor | None]]:
    """Record each block's output residual stream, averaged over the G branches as the LM head reads
    it: ``streams[l]`` is (B, T, D) for block l+1 after the forward (overwritten by the next call)."""
    streams: list[torch.Tensor | None] = [None] * len(model.layers)

    def hook(i):
        def fn(mod, args, out):
            streams[i] = out.mean(dim=2)  # (B, T, G, D) -> (B, T, D)
        return fn

    handles = [blk.register_forward_hook(hook(i)) for i, blk in enumerate(model.layers)]
    try:
        yield streams
    finally:
        for h in handles:
            h.remove()


def head_logits(model, stream: torch.Tensor) -> torch.Tensor:
    """The model's own head on a (B, T, D) branch-averaged stream: norm -> output, (B, T, V)."""
    return model.output(model.norm(stream))


# -- inputs and labels -----------------------------------------------------------------------------


def val_windows(ckpt, batch_size: int, seq_len: int, batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` fixed validation windows (ids (B, T), document starts (B, T)) of the corpus the
    checkpoint was trained on, tokenized by its own tokenizer (``engram.train.startup.checkpoint_data``)."""
    return windows_of(ckpt, checkpoint_data(ckpt).val, batch_size, seq_len, batches)


def windows_of(ckpt, shards, batch_size: int, seq_len: int, batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``shards.eval_batches`` as a list, refused up front when ``seq_len`` exceeds the checkpoint's model
    context or the split holds no window that long (an analysis of zero windows would print zeros)."""
    context = ckpt.run_config.model.backbone.max_seq_len
    if seq_len > context:
        raise ValueError(f"--seq-len {seq_len} is above the model's context of {context} tokens")
    windows = list(shards.eval_batches(batch_size, seq_len, batches))
    if not windows:
        raise ValueError(f"the {shards.split} split holds no window of {seq_len} tokens; use a shorter --seq-len")
    return windows


def short_labels(paths: list[str]) -> list[str]:
    """The paths without the leading and trailing components they all share, as plot labels:
    runs/demo/seed0/demo-engram/train, runs/demo/seed0/demo-moe/train -> demo-engram, demo-moe."""
    parts = [Path(p).parts for p in paths]
    if len(set(parts)) < len(parts):
        return [str(p) for p in paths]
    lo = 0
    while all(len(q) > lo + 1 for q in parts) and len({q[lo] for q in parts}) == 1:
        lo += 1
    hi = 0
    while all(len(q) > lo + hi + 1 for q in parts) and len({q[-1 - hi] for q in parts}) == 1:
        hi += 1
    return ["/".join(q[lo:len(q) - hi]) for q in parts]

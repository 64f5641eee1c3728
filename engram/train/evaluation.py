"""Validation loss: ``evaluate`` (mean next-token loss and bits per byte over fixed windows) and
``mean_loss`` (the same over any batches), for any model called as ``model(ids, labels=, boundary=)``
that returns an output with ``.loss`` (an ``EngramLM``, or a base model with its Engram adapter)."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from engram.distributed import runtime as rt
from engram.train.device import autocast


@torch.no_grad()
def evaluate(model: nn.Module, shards, batch_size: int, seq_len: int, max_batches: int,
             device: torch.device, distributed: bool = False) -> dict:
    """Mean next-token loss (nats) over fixed validation windows, and bits per byte.

    Bits per byte uses the split's average bytes per token, so it compares models across tokenizers.
    ``distributed``: every rank of the process group calls this and evaluates its share of each batch.
    """
    was_training = model.training
    model.eval()
    loss, count = mean_loss(model, shards.eval_batches(batch_size, seq_len, max_batches), device, distributed)
    model.train(was_training)
    if count == 0:
        raise ValueError(f"the evaluation data holds no window of {seq_len} tokens (no document, or shard, is that "
                         "long); use a shorter sequence length or more text")
    return {"val_loss": loss, "val_bpb": loss / math.log(2) / shards.bytes_per_token, "val_tokens": count}


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
              device: torch.device, distributed: bool = False) -> tuple[float, int]:
    """(mean next-token loss in nats, predicted tokens) over ``(ids, boundary)`` batches, each batch
    weighted by its B*(T-1) predictions; the model's train/eval mode is left as it is.

    ``distributed``: each rank takes its rows of every batch (all of them, counted once, when a batch
    has fewer rows than ranks: sharded tables need every rank in every forward) and the sums are
    all-reduced, so every rank returns the whole result."""
    world, rank = (rt.world_size(), rt.rank()) if distributed else (1, 0)
    total, count = 0.0, 0
    for ids, boundary in batches:
        counted = True
        if world > 1 and ids.shape[0] >= world:
            ids = ids.tensor_split(world)[rank]
            boundary = None if boundary is None else boundary.tensor_split(world)[rank]
        elif world > 1:
            counted = rank == 0
        ids = ids.to(device)
        boundary = None if boundary is None else boundary.to(device)
        with autocast(device):
            out = model(ids, labels=ids, boundary=boundary)
        if counted:
            n = ids.shape[0] * (ids.shape[1] - 1)
            total += out.loss.item() * n
            count += n
    if world > 1:
        total, count = rt.sum_over_ranks([total, float(count)], device)
        count = int(count)
    return (total / count if count else math.nan), count

"""One optimizer step: ``train_step(state)``, callable and testable on its own.

A step is: set the learning rate; for each micro-batch, this process's rows of the deterministic
global batch -> forward -> backward (DDP all-reduces the dense gradients after the last one only);
stop on a NaN/inf loss *before* the optimizer moves anything, so the last checkpoint stays good; clip
by the global norm; step both optimizers; update the MoE expert bias on the whole batch's load.

``TrainState`` is what a trainer builds (``engram.train.startup`` for ``engram train``,
``engram.hf.finetune`` for an adapter) and the loop (``engram.train.loop.run_loop``) carries: the run's
config, the data, the model and its placement, the optimizers, the step counter and how to save.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from engram.data.prepare import PreparedData
from engram.distributed.parallelize import Parallel
from engram.model.moe import update_moe_bias
from engram.train.config import TrainConfig
from engram.train.device import autocast
from engram.train.optim import Optimizers, learning_rate


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainState:
    """A run ready to train.

    run: the resolved config, anything whose ``.train`` is the ``TrainConfig`` (a ``RunConfig`` with its
        derived fields filled from the data, a ``FinetuneConfig``).
    model: any module called as ``model(ids, labels=, boundary=)`` returning an output with ``.loss``
        (an ``EngramLM``; a base model with its Engram adapter): the weights, evaluation and the MoE bias.
    parallel: the placement; ``parallel.net`` is what forward and backward go through.
    step: optimizer steps done. last_checkpoint: the newest checkpoint of this history, if any.
    save: ``save(state, step, metrics) -> checkpoint directory``, the trainer's own checkpoint writer.
    """

    run: Any
    run_dir: Path
    device: torch.device
    data: PreparedData
    model: nn.Module
    parallel: Parallel
    optimizers: Optimizers
    step: int = 0
    last_checkpoint: Path | None = None
    save: Callable[["TrainState", int, dict], Path] | None = None

    @property
    def train(self) -> TrainConfig:
        return self.run.train


def train_step(state: TrainState) -> dict:
    """Run optimizer step ``state.step + 1`` and advance ``state.step``; returns its metrics (step,
    loss averaged over micro-batches and ranks, lr, grad_norm, tokens, tokens_per_s, and under a
    process group the bytes this rank sent). Raises ``TrainingDiverged`` before any weight moves."""
    tc, par, opt = state.train, state.parallel, state.optimizers
    t0 = time.perf_counter()
    sent_before = par.traffic()
    lr = learning_rate(state.step, tc)
    opt.set_lr(lr)
    loss_sum = 0.0
    for micro in range(tc.grad_accum):
        ids, boundary = state.data.train.batch(state.step * tc.grad_accum + micro, tc.batch_size, tc.seq_len, tc.seed)
        ids, boundary = par.rows(ids, boundary)
        ids, boundary = ids.to(state.device), boundary.to(state.device)
        with par.no_sync(last_micro_batch=micro == tc.grad_accum - 1):
            with autocast(state.device):
                loss = par.net(ids, labels=ids, boundary=boundary).loss
            (loss / tc.grad_accum).backward()
        loss_sum += loss.item()
    loss_value = par.mean(loss_sum / tc.grad_accum)
    if not math.isfinite(loss_value):
        opt.zero_grad()
        last = state.last_checkpoint
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise TrainingDiverged(f"loss is {loss_value} at step {state.step + 1} (lr {lr:.3g}); stopping. {where}")
    grad_norm = opt.clip_grad_norm(tc.optim.grad_clip)
    opt.step()
    opt.zero_grad()
    par.reduce_moe_load()
    update_moe_bias(state.model)
    state.step += 1
    elapsed = time.perf_counter() - t0
    metrics = {"step": state.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
               "tokens": state.step * tc.tokens_per_step, "tokens_per_s": tc.tokens_per_step / elapsed,
               "seconds": elapsed}
    if par.distributed:  # what this rank sent to the others during the step
        metrics |= {f"sent_{k}": v - sent_before[k] for k, v in par.traffic().items()}
    return metrics

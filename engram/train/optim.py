"""Optimizers and the learning-rate schedule.

Dense parameters use AdamW (weight decay on matrices only). Hashed tables with sparse gradients (Engram
and OverEncoding, built with ``sparse_tables=True``, and their row shards) use Adam restricted to the rows a step looked up
(``torch.optim.SparseAdam``, lazy moments) at ``table_lr_mult`` x the base rate with no weight decay
(SPEC §3): a step costs O(rows touched), not O(table) (PITFALLS 12).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from engram.config import TrainConfig


def table_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable rows of every hashed table (offloaded tables hold none)."""
    return [t.weight for t in model.named_tables().values() if getattr(t, "weight", None) is not None]


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then step decay at each fraction in ``decay_at``."""
    warm = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    drops = sum(step >= math.ceil(f * config.max_steps) for f in config.decay_at)
    return config.lr * warm * config.decay_factor ** drops


class Optimizers:
    """AdamW for dense parameters plus SparseAdam for hashed tables, stepped and saved together.

    Whether a table's gradient is sparse is decided where the model was built or placed
    (``EngramLM(..., sparse_tables=True)``; row shards always are), never here: a model whose tables
    give dense gradients is refused, because Adam over a dense table gradient moves every row every
    step (PITFALLS 12: O(table) instead of O(rows touched)).

    ``reduce_table_sq``: how the tables' squared gradient norm is summed over the processes holding
    their rows (``engram.distributed.Parallel.table_squares_reduce``); None in a single process.
    """

    def __init__(self, model: nn.Module, config: TrainConfig,
                 reduce_table_sq: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.config = config
        self.reduce_table_sq = reduce_table_sq
        rows = {n: t for n, t in model.named_tables().items() if getattr(t, "weight", None) is not None}
        dense_grads = [n for n, t in rows.items() if not t.sparse]
        if dense_grads:
            raise ValueError(f"Optimizers: the tables {dense_grads} give dense gradients; build the model with "
                             "EngramLM(..., sparse_tables=True) so SparseAdam moves only the rows a step looked up "
                             "(Adam on a dense table gradient moves every row, every step)")
        tables = [t.weight for t in rows.values()]
        table_ids = {id(p) for p in tables}
        dense = [p for p in model.parameters() if p.requires_grad and id(p) not in table_ids]
        decay = [p for p in dense if p.dim() >= 2]
        no_decay = [p for p in dense if p.dim() < 2]
        betas = (config.beta1, config.beta2)
        self.dense = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay, "lr_mult": 1.0},
             {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0}],
            lr=config.lr, betas=betas, eps=1e-8)
        self.tables = None
        if tables:
            self.tables = torch.optim.SparseAdam([{"params": tables, "lr_mult": config.table_lr_mult}],
                                                 lr=config.lr * config.table_lr_mult, betas=betas, eps=1e-8)
        self.dense_params, self.table_params = dense, tables

    @property
    def all(self) -> list[torch.optim.Optimizer]:
        return [self.dense] + ([self.tables] if self.tables is not None else [])

    def set_lr(self, lr: float) -> None:
        for opt in self.all:
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_mult"]

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global L2 norm over dense and (coalesced) sparse table gradients; scales both when > max_norm.

        The tables' part goes through ``reduce_table_sq`` (with row-sharded tables every rank must call
        this), so every rank computes the norm one process holding the whole tables would.
        """
        squares, table_squares = [], []
        for p in self.table_params:
            if p.grad is not None:
                p.grad = p.grad.coalesce()  # duplicate rows from one batch must add before the norm
                table_squares.append(p.grad._values().float().square().sum())
        if self.reduce_table_sq is not None and self.table_params:
            device = self.table_params[0].device
            total = torch.stack(table_squares).sum() if table_squares else torch.zeros((), device=device)
            squares.append(self.reduce_table_sq(total))
        else:
            squares += table_squares
        for p in self.dense_params:
            if p.grad is not None:
                squares.append(p.grad.float().square().sum())
        if not squares:
            return 0.0
        norm = torch.stack(squares).sum().sqrt()
        if max_norm > 0:
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for p in self.dense_params + self.table_params:
                if p.grad is not None:
                    p.grad.mul_(scale)
        return float(norm)

    def step(self) -> None:
        for opt in self.all:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.all:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"dense": self.dense.state_dict(),
                "tables": None if self.tables is None else self.tables.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if (state.get("tables") is None) != (self.tables is None):
            raise ValueError("optimizer state and model disagree on whether Engram tables are sparse-optimised")
        self.dense.load_state_dict(state["dense"])
        if self.tables is not None:
            self.tables.load_state_dict(state["tables"])

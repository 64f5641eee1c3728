"""Optimizers and the learning-rate schedule.

Dense parameters use AdamW (weight decay on matrices only); with ``train.optim.name="muon"`` the
hidden matrices (``engram.model.matrices.muon_parameters``) use Muon instead (``engram.train.muon``) and AdamW keeps the rest.
Hashed tables with sparse gradients (Engram and OverEncoding, built with ``sparse_tables=True``, and
their row shards) use Adam restricted to the rows a step looked up (``torch.optim.SparseAdam``, lazy
moments) at ``table_lr_mult`` x the base rate with no weight decay (docs/ALGORITHM.md §3): a step costs O(rows
touched), not O(table) (docs/PITFALLS.md §12).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from engram.model.matrices import MATRICES, muon_parameters  # noqa: F401 (MATRICES: its name here before)
from engram.train.config import TrainConfig
from engram.train.muon import DTensor, Muon

def table_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable rows of every hashed table (offloaded tables hold none)."""
    return [t.weight for t in model.named_tables().values() if t.trainable]


def _sum_over_ranks(squares: list[torch.Tensor], reduce: Callable[[torch.Tensor], torch.Tensor],
                    device: torch.device) -> torch.Tensor:
    """This rank's squared norms summed, then through ``reduce`` (every rank calls it, holding none or some)."""
    return reduce(torch.stack(squares).sum() if squares else torch.zeros((), device=device))


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup over ``schedule.warmup_steps``, then step decay at each fraction in ``schedule.decay_at``
    of ``max_steps``."""
    schedule = config.schedule
    warm = min(1.0, (step + 1) / schedule.warmup_steps) if schedule.warmup_steps else 1.0
    drops = sum(step >= math.ceil(f * config.max_steps) for f in schedule.decay_at)
    return config.optim.lr * warm * schedule.decay_factor ** drops


class Optimizers:
    """AdamW for dense parameters (with ``optim.name="muon"``: Muon for ``muon_parameters``, AdamW for the
    other dense ones) plus SparseAdam for hashed tables, stepped, clipped and saved together.

    Whether a table's gradient is sparse is decided where the model was built or placed
    (``EngramLM(..., sparse_tables=True)``; row shards always are), never here: a model whose tables
    give dense gradients is refused, because Adam over a dense table gradient moves every row every
    step (docs/PITFALLS.md §12: O(table) instead of O(rows touched)).

    ``reduce_table_sq``: how the tables' squared gradient norm is summed over the processes holding
    their rows (``engram.distributed.Parallel.table_squares_reduce``); None in a single process.
    ``reduce_dense_sq``: the same for dense weights sharded by FSDP2 (DTensor gradients;
    ``Parallel.dense_squares_reduce``).

    Muon: Nesterov momentum 0.95, 5 Newton-Schulz steps, ``optim.weight_decay`` (decoupled) and the
    base rate scaled by 0.2 sqrt(max(rows, cols)) per matrix, so one learning rate and weight decay serve
    AdamW and Muon alike (Moonlight's recipe). The state dict of a Muon run says so (``"optimizer":
    "muon"``, the matrices' state under ``"matrices"``); an AdamW run's keeps the keys it always had
    (``"dense"``, ``"tables"``), so a state without ``"optimizer"`` is AdamW's. Loading one optimizer's
    state into the other is refused: a run resumes with the optimizer it started with.
    """

    def __init__(self, model: nn.Module, config: TrainConfig,
                 reduce_table_sq: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 reduce_dense_sq: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.config = config
        self.name = config.optim.name
        self.reduce_table_sq = reduce_table_sq
        self.reduce_dense_sq = reduce_dense_sq
        optim = config.optim
        rows = {n: t for n, t in model.named_tables().items() if t.trainable}
        dense_grads = [n for n, t in rows.items() if not t.sparse]
        if dense_grads:
            raise ValueError(f"Optimizers: the tables {dense_grads} give dense gradients; build the model with "
                             "EngramLM(..., sparse_tables=True) so SparseAdam moves only the rows a step looked up "
                             "(Adam on a dense table gradient moves every row, every step)")
        tables = [t.weight for t in rows.values()]
        table_ids = {id(p) for p in tables}
        dense = [p for p in model.parameters() if p.requires_grad and id(p) not in table_ids]
        matrices = [p for _, p in muon_parameters(model)] if self.name == "muon" else []
        matrix_ids = {id(p) for p in matrices}
        adamw = [p for p in dense if id(p) not in matrix_ids]
        decay = [p for p in adamw if p.dim() >= 2]
        no_decay = [p for p in adamw if p.dim() < 2]
        betas = (optim.beta1, optim.beta2)
        self.matrices = None
        if matrices:
            self.matrices = Muon([{"params": matrices, "lr_mult": 1.0}], lr=optim.lr, weight_decay=optim.weight_decay)
        self.dense = torch.optim.AdamW(
            [{"params": decay, "weight_decay": optim.weight_decay, "lr_mult": 1.0},
             {"params": no_decay, "weight_decay": 0.0, "lr_mult": 1.0}],
            lr=optim.lr, betas=betas, eps=1e-8)
        self.tables = None
        if tables:
            self.tables = torch.optim.SparseAdam([{"params": tables, "lr_mult": optim.table_lr_mult}],
                                                 lr=optim.lr * optim.table_lr_mult, betas=betas, eps=1e-8)
        self.dense_params, self.table_params = dense, tables

    @property
    def all(self) -> list[torch.optim.Optimizer]:
        return [opt for opt in (self.matrices, self.dense, self.tables) if opt is not None]

    def set_lr(self, lr: float) -> None:
        for opt in self.all:
            for group in opt.param_groups:
                group["lr"] = lr * group["lr_mult"]

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global L2 norm over dense and (coalesced) sparse table gradients; scales both when > max_norm.

        The tables' part goes through ``reduce_table_sq`` (with row-sharded tables every rank must call
        this), and the part of FSDP-sharded dense gradients through ``reduce_dense_sq``, so every rank
        computes the norm one process holding every row would.
        """
        squares, table_squares = [], []
        for p in self.table_params:
            if p.grad is not None:
                p.grad = p.grad.coalesce()  # duplicate rows from one batch must add before the norm
                table_squares.append(p.grad._values().float().square().sum())
        if self.reduce_table_sq is not None and self.table_params:
            squares.append(_sum_over_ranks(table_squares, self.reduce_table_sq, self.table_params[0].device))
        else:
            squares += table_squares
        shards = []  # FSDP2: this rank's rows of sharded gradients, summed over ranks below
        for p in self.dense_params:
            if p.grad is not None:
                if isinstance(p.grad, DTensor):
                    shards.append(p.grad.to_local().float().square().sum())
                else:
                    squares.append(p.grad.float().square().sum())
        if self.reduce_dense_sq is not None and self.dense_params:
            squares.append(_sum_over_ranks(shards, self.reduce_dense_sq, self.dense_params[0].device))
        elif shards:
            raise ValueError("Optimizers: the dense gradients are sharded (FSDP2) but no reduce_dense_sq was given to "
                             "sum their squares over the ranks")
        if not squares:
            return 0.0
        norm = torch.stack(squares).sum().sqrt()
        if max_norm > 0:
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for p in self.dense_params + self.table_params:
                if p.grad is not None:
                    (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).mul_(scale)
        return float(norm)

    def step(self) -> None:
        for opt in self.all:
            opt.step()

    def zero_grad(self) -> None:
        for opt in self.all:
            opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        state = {"dense": self.dense.state_dict(),
                 "tables": None if self.tables is None else self.tables.state_dict()}
        if self.name == "muon":
            state.update(optimizer="muon", matrices=None if self.matrices is None else self.matrices.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        stored = state.get("optimizer", "adamw")
        if stored != self.name:
            raise ValueError(f"the optimizer state is {stored}'s but this run has train.optimizer={self.name} "
                             f"(train.optim.name): a run resumes with the optimizer it started with; set "
                             f"train.optimizer={stored}, or start a new run from these weights with --init-from")
        if (state.get("tables") is None) != (self.tables is None):
            raise ValueError("optimizer state and model disagree on whether Engram tables are sparse-optimised")
        if self.matrices is not None:
            self.matrices.load_state_dict(state["matrices"])
        self.dense.load_state_dict(state["dense"])
        if self.tables is not None:
            self.tables.load_state_dict(state["tables"])

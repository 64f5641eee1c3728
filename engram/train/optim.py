"""Optimizers and the learning-rate schedule.

Dense parameters use AdamW (weight decay on matrices only). Hashed tables (Engram and OverEncoding:
every ``MultiHeadEmbedding``) use Adam restricted to the rows a step looked up
(``torch.optim.SparseAdam``, lazy moments) at ``table_lr_mult`` x the base rate with no weight decay
(SPEC §3): a step costs O(rows touched), not O(table) (PITFALLS 12).
"""

from __future__ import annotations

import math

import torch
from torch import nn

import torch.distributed as dist

from engram.config import TrainConfig
from engram.distributed.sharded import ShardedTable
from engram.model.engram import MultiHeadEmbedding
from engram.model.transformer import EngramLM


def named_tables(model: EngramLM) -> dict[str, MultiHeadEmbedding | ShardedTable]:
    """Module name -> every hashed table of the model (Engram layers, OverEncoding), in module order,
    which is the order of the table optimizer's parameters; after ``shard_tables`` these are the
    ``ShardedEmbedding`` blocks this rank owns."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (MultiHeadEmbedding, ShardedTable))}


def table_embeddings(model: EngramLM) -> list[MultiHeadEmbedding | ShardedTable]:
    return list(named_tables(model).values())


def table_parameters(model: EngramLM) -> list[nn.Parameter]:
    return [table.weight for table in table_embeddings(model)]


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps``, then step decay at each fraction in ``decay_at``."""
    warm = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    drops = sum(step >= math.ceil(f * config.max_steps) for f in config.decay_at)
    return config.lr * warm * config.decay_factor ** drops


class Optimizers:
    """AdamW for dense parameters plus SparseAdam for hashed tables, stepped and saved together."""

    def __init__(self, model: EngramLM, config: TrainConfig, sparse_tables: bool = True):
        self.config = config
        tables = table_parameters(model) if sparse_tables else []
        sharded = [t for t in table_embeddings(model) if isinstance(t, ShardedTable)]
        if sharded and not sparse_tables:
            raise ValueError("sharded tables are trained by SparseAdam on their own rows (sparse_tables=True)")
        # each rank holds its own rows: their squared gradient norm is summed over the tables' group
        self._table_group = sharded[0].group if sharded else None
        self._tables_sharded = bool(sharded)
        for table in table_embeddings(model):
            table.sparse = sparse_tables
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

        With sharded tables the table part is all-reduced over the ranks (every rank must call this),
        so every rank computes the same norm as one process holding the whole table.
        """
        squares, table_squares = [], []
        for p in self.table_params:
            if p.grad is not None:
                p.grad = p.grad.coalesce()  # duplicate rows from one batch must add before the norm
                table_squares.append(p.grad._values().float().square().sum())
        if self._tables_sharded:
            device = self.table_params[0].device
            total = torch.stack(table_squares).sum() if table_squares else torch.zeros((), device=device)
            dist.all_reduce(total, group=self._table_group)
            squares.append(total)
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

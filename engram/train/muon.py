"""Muon for matrices and stacks of matrices, whole or sharded.

``torch.optim.Muon`` takes only 2-D parameters, but routed experts, Engram's per-branch key projections
and OverEncoding's per-order projections are stored as stacks (..., out, in), one matrix per expert,
branch or order. ``Muon`` below updates every matrix of a stack with torch's own per-matrix step (the
functional ``torch.optim._muon.muon``, called on views, so the in-place updates land in the stack and
in its momentum buffer): a 2-D parameter steps exactly as under ``torch.optim.Muon``.

Sharded parameters (DTensor, FSDP2's ``fully_shard`` shards dim 0): Newton-Schulz orthogonalises a
whole matrix, and on a shard of one it would orthogonalise the shard instead. When the shards hold
whole matrices (a stack sharded on a stack dimension: whole experts per rank) each rank updates its
own; otherwise the momentum stays sharded (element-wise), the Nesterov update is gathered, each whole
matrix is orthogonalised (every rank computes the same) and each rank keeps its own part.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim._muon import (DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, EPS, _adjust_lr,
                               _zeropower_via_newtonschulz, muon)

if torch.distributed.is_available():
    from torch.distributed.tensor import DTensor, Replicate
else:  # a torch built without distributed holds no DTensors
    DTensor, Replicate = (), None


def matrices(t: Tensor) -> list[Tensor]:
    """The 2-D matrices of ``t`` (..., A, B) as views: writing into one writes into ``t``."""
    return [t] if t.dim() == 2 else [m for s in t.unbind(0) for m in matrices(s)]


def holds_whole_matrices(p: DTensor) -> bool:
    """Every rank's part of ``p`` is whole matrices: replicated, or sharded only on stack dimensions."""
    return all(pl.is_replicate() or (pl.is_shard() and pl.dim < p.dim() - 2) for pl in p.placements)


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` over parameters of two or more dimensions, each matrix (the last two
    dimensions) its own Newton-Schulz orthogonalisation, learning-rate adjustment and momentum. The
    defaults are this project's: Nesterov momentum 0.95, torch's Newton-Schulz coefficients and steps,
    and ``adjust_lr_fn="match_rms_adamw"`` (0.2 sqrt(max(A, B)) x lr: the update's RMS is AdamW's, so
    AdamW's learning rate and weight decay serve both; Liu et al. 2025, "Muon is Scalable for LLM
    Training"). State and param groups are ``torch.optim.Muon``'s."""

    def __init__(self, params, lr: float, weight_decay: float, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = DEFAULT_NS_STEPS, adjust_lr_fn: str = "match_rms_adamw"):
        # torch.optim.Muon.__init__ refuses every stack; its other checks concern these defaults
        torch.optim.Optimizer.__init__(self, params, dict(
            lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            ns_coefficients=(DEFAULT_A, DEFAULT_B, DEFAULT_C), eps=EPS, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn))
        vectors = [tuple(p.shape) for g in self.param_groups for p in g["params"] if p.dim() < 2]
        if vectors:
            raise ValueError(f"Muon: parameters of fewer than 2 dimensions {vectors}; give them to AdamW")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)  # torch's: momentum buffers made on first use
            for p, g, buf in zip(params, grads, bufs):
                if isinstance(p, DTensor) and not holds_whole_matrices(p):
                    self._step_split(p, g, buf, group)
                    continue
                if isinstance(p, DTensor):  # this rank's whole matrices: a local step
                    p, g, buf = p.to_local(), g.to_local(), buf.to_local()
                ps, gs, bs = matrices(p), matrices(g), matrices(buf)
                muon(ps, gs, bs, lr=group["lr"], weight_decay=group["weight_decay"], momentum=group["momentum"],
                     nesterov=group["nesterov"], ns_coefficients=group["ns_coefficients"], eps=group["eps"],
                     ns_steps=group["ns_steps"], adjust_lr_fn=group["adjust_lr_fn"], has_complex=False)
        return loss

    @staticmethod
    def _step_split(p: DTensor, grad: DTensor, buf: DTensor, group: dict) -> None:
        """torch's per-matrix step (``torch.optim._muon._single_tensor_muon``) for a parameter whose
        matrices are split over ranks: momentum on the shards, Newton-Schulz on the gathered matrices."""
        momentum, lr = group["momentum"], group["lr"]
        buf.lerp_(grad, 1 - momentum)
        update = grad.lerp(buf, momentum) if group["nesterov"] else buf
        whole = update.full_tensor()  # every rank the same (..., A, B)
        ortho = torch.stack([_zeropower_via_newtonschulz(m, group["ns_coefficients"], group["ns_steps"], group["eps"])
                             for m in matrices(whole)]).reshape(whole.shape)
        # Replicate -> the parameter's placements: each rank cuts its part locally, no communication
        ortho = DTensor.from_local(ortho, p.device_mesh, [Replicate()] * p.device_mesh.ndim).redistribute(
            p.device_mesh, p.placements)
        adjusted_lr = _adjust_lr(lr, group["adjust_lr_fn"], p.shape[-2:])
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(ortho, alpha=-adjusted_lr)

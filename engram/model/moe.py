"""DeepSeekMoE: shared experts every token uses plus fine-grained routed experts, top-k per token.

Load balancing is auxiliary-loss-free (docs/ALGORITHM.md §3): a per-expert bias, moved by a constant step after
every optimizer step, is added to the routing scores only to choose the top-k; the combine weights use
the unbiased scores.

Legend: B batch, T time, D model width, N = B*T tokens, E routed experts, k experts per token,
F hidden width of one expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engram.model.config import MoEConfig
from engram.model.init import derive_seed, normal_units_
from engram.model.layers import SwiGLU, swiglu_params


class RoutedExperts(nn.Module):
    """E SwiGLU experts stored as stacked matrices, so checkpoints hold three tensors, not 3E."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, hidden, dim))  # (E, F, D)
        self.w3 = nn.Parameter(torch.empty(n_experts, hidden, dim))  # (E, F, D)
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, hidden))  # (E, D, F)

    def forward(self, x: Tensor, experts: Tensor, weights: Tensor, counts: Tensor) -> Tensor:
        """x (N, D); experts, weights (N, k); counts (E,) tokens per expert -> (N, D)."""
        k = experts.shape[1]
        # Stable sort groups the N*k (token, expert) slots by expert, so each expert runs one matmul.
        order = experts.flatten().argsort(stable=True)  # (N*k,)
        tokens = order // k  # (N*k,) token of each grouped slot
        xs = x.index_select(0, tokens)  # (N*k, D)
        # The one host sync: split sizes must be Python ints.
        outs = []
        # unbind once: indexing w[e] per expert would give every expert's backward its own zero-filled
        # (E, F, D) gradient; unbind's backward stacks the per-expert gradients in one allocation.
        w1, w3, w2 = self.w1.unbind(0), self.w3.unbind(0), self.w2.unbind(0)
        for e, xe in enumerate(xs.split(counts.tolist())):
            if xe.shape[0] == 0:
                continue
            h = F.silu(F.linear(xe, w1[e])) * F.linear(xe, w3[e])  # (n_e, F)
            outs.append(F.linear(h, w2[e]))  # (n_e, D)
        if not outs:
            return torch.zeros_like(x)
        ys = torch.cat(outs) * weights.flatten()[order, None]  # (N*k, D)
        return torch.zeros_like(x).index_add_(0, tokens, ys)


class MoE(nn.Module):
    """Shared SwiGLU (n_shared_experts * expert_hidden wide) + top-k of E routed SwiGLU experts.

    Every token goes to all its k experts: no capacity limit and no dropping, so a token's output
    depends on that token alone (the layer stays causal and batch-independent).

    Buffers: ``expert_bias`` (E,) fp32 is model state and saved; ``_load`` (E,) counts the tokens
    routed to each expert in training mode since the last ``update_bias``. Keep the module in fp32
    for training (bf16 via autocast): casting it to bf16 would quantise the bias steps and the counts.
    """

    def __init__(self, dim: int, config: MoEConfig):
        super().__init__()
        self.config = config
        e = config.n_routed_experts
        self.router = nn.Linear(dim, e, bias=False)
        self.experts = RoutedExperts(e, dim, config.expert_hidden)
        hidden = config.n_shared_experts * config.expert_hidden
        self.shared = SwiGLU(dim, hidden) if hidden > 0 else None
        self.register_buffer("expert_bias", torch.zeros(e, dtype=torch.float32))
        self.register_buffer("_load", torch.zeros(e, dtype=torch.float32), persistent=False)
        self.register_buffer("_last_load", torch.zeros(e, dtype=torch.float32), persistent=False)
        if self.router.weight.device.type != "meta":  # a usable standalone default; EngramLM initialises once
            self.init_weights(dim**-0.5)

    @torch.no_grad()
    def reset_buffers(self) -> None:
        """The balancing state at its start: zero expert bias and load counts (``EngramLM.init_weights``
        calls this after building on meta; a checkpoint's bias is loaded after)."""
        for state in (self.expert_bias, self._load, self._last_load):
            state.zero_()

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float | None = None, seed: int | None = None) -> None:
        """Initialise every parameter; ``expert_bias`` is state, not a weight, and is left alone.

        Expert e's slices and router row are drawn from their own stream (``derive_seed(seed,
        "expert.e")``), the shared experts by hidden unit (``init.normal_units_``): an MoE with fewer
        experts starts with the first experts of a larger one under the same seed (seed
        pairing, engram.model.init). ``seed`` None: drawn from torch's generator.

        ``out_std`` (default ``std``) lets the model shrink the matrices that write to the residual
        stream, as it does for the dense FFN's w2.

        | parameter                          | init               |
        |------------------------------------|--------------------|
        | router.weight (E, D)               | normal(0, std)     |
        | experts.w1, experts.w3 (E, F, D)   | normal(0, std)     |
        | experts.w2 (E, D, F)               | normal(0, out_std) |
        | shared.w1.weight, shared.w3.weight | normal(0, std)     |
        | shared.w2.weight                   | normal(0, out_std) |
        """
        out_std = std if out_std is None else out_std
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        if self.router.weight.device.type == "meta":
            return
        generator = torch.Generator()
        w1, w3, w2, router = self.experts.w1, self.experts.w3, self.experts.w2, self.router.weight
        for e in range(w1.shape[0]):  # expert e and its router row: one stream of their own
            generator.manual_seed(derive_seed(seed, f"expert.{e}"))
            for w, s in ((router[e], std), (w1[e], std), (w3[e], std), (w2[e], out_std)):
                w.copy_(torch.randn(w.shape, generator=generator).mul_(s))
        if self.shared is not None:
            normal_units_([self.shared.w1.weight, self.shared.w3.weight], [self.shared.w2.weight], std, out_std,
                          derive_seed(seed, "shared"))

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, D) -> combine weights (N, k) fp32, chosen experts (N, k) int64."""
        # Autocast would run the router in bf16; near-tied sigmoid scores then flip the top-k.
        with torch.autocast(x.device.type, enabled=False):
            scores = torch.sigmoid(F.linear(x.float(), self.router.weight.float()))  # (N, E)
        chosen = (scores + self.expert_bias.float()).topk(self.config.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(-1, chosen)  # (N, k) unbiased: the bias steers choice only
        weights = weights / weights.sum(-1, keepdim=True) * self.config.route_scale
        return weights, chosen

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, T, D)
        flat = x.reshape(-1, x.shape[-1])  # (N, D)
        weights, chosen = self.route(flat)
        counts = torch.bincount(chosen.flatten(), minlength=self.config.n_routed_experts)  # (E,)
        if self.training:
            # Recomputation under activation checkpointing counts a step twice; harmless, since
            # update_bias uses only the sign of each expert's deviation from the mean.
            self._load += counts.to(self._load.dtype)
        out = self.experts(flat, chosen, weights.to(x.dtype), counts)  # (N, D)
        if self.shared is not None:
            out = out + self.shared(flat)
        return out.view_as(x)

    @torch.no_grad()
    def update_bias(self) -> None:
        """Move each expert's bias by bias_update_rate toward balance, then reset the load count.

        The trainer calls this once per optimizer step (after all micro-batches; under data
        parallelism after all-reducing ``_load``, so every rank moves its bias identically).
        Overloaded experts go down, underloaded up, balanced ones stay. With no tokens counted (eval
        mode, or called twice) every deviation is zero, so it changes nothing and keeps the last load.
        """
        load = self._load
        step = self.config.bias_update_rate * torch.sign(load.mean() - load)  # (E,)
        self.expert_bias += step
        counted = load.sum() > 0
        # torch.where rather than `if`: no host sync inside the training step.
        self._last_load.copy_(torch.where(counted, load, self._last_load))
        load.zero_()

    def load_fractions(self) -> Tensor:
        """(E,) share of routed tokens per expert over the last step closed by update_bias (zeros before)."""
        total = self._last_load.sum()
        return self._last_load / total.clamp(min=1.0)


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every MoE layer of ``model`` (any module: an ``EngramLM``, a base model with an adapter), in module order."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def update_moe_bias(model: nn.Module) -> None:
    """Auxiliary-loss-free balancing of every MoE layer of ``model``: call once per optimizer step."""
    for moe in moe_layers(model):
        moe.update_bias()


def moe_params(dim: int, config: MoEConfig) -> tuple[int, int]:
    """(total, active) parameter counts of one MoE layer; active = what one token uses."""
    router = dim * config.n_routed_experts
    expert = swiglu_params(dim, config.expert_hidden)
    shared = swiglu_params(dim, config.n_shared_experts * config.expert_hidden)
    total = router + config.n_routed_experts * expert + shared
    active = router + config.top_k * expert + shared
    return total, active

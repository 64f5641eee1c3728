"""Residual connections over a G-copy stream: mHC hyper-connections, or a plain residual when G == 1.

mHC (Manifold-Constrained Hyper-Connections, arXiv 2512.24880; docs/ALGORITHM.md §3) widens the residual stream to
G copies. Around one sub-layer ``fn`` (attention or FFN, each with its own pre-norm):

    h      = sum_g H_pre[g] * x[g]                                  read: non-negative mix of copies
    y      = fn(h)
    x'[g]  = sum_g' H_res[g, g'] * x[g'] + H_post[g] * y            write: mix copies, add the output

with, per token, from the RMS-normalised flattened stream z = norm(vec(x)):

    H_pre  = sigmoid(alpha[0] * (z W_pre) + bias_pre)               (G,)
    H_post = 2 * sigmoid(alpha[1] * (z W_post) + bias_post)         (G,)
    H_res  = sinkhorn(alpha[2] * mat(z W_res) + bias_res)           (G, G), doubly stochastic

W_pre, W_post, W_res are one fused bias-free matrix ``proj`` whose output rows are ordered
[pre (G), post (G), res (G*G, row-major over (g, g'))]; that order is part of the checkpoint format.

H_res doubly stochastic keeps the residual path from amplifying or killing the signal across depth
(the paper's motivation); Sinkhorn ends with a column normalisation, so sum_g x'[g] equals
sum_g x[g] + sum_g H_post[g] * y exactly, whatever the iteration count.

Every weight depends only on its own token's stream, so the mixing is causal.

Legend: B batch, T time, G stream copies (hc_mult), D model width.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engram.model.layers import RMSNorm

# Init targets (see HyperConnection.init_weights).
_ALPHA_INIT = 0.01
_RES_DIAG = 0.9  # share of each copy kept in place by H_res at init; nearer 1 slows Sinkhorn down
_PRE_MAX = 0.99  # sigmoid never reaches 1, so G == 1 reads 0.99 * x instead of x


def sinkhorn(logits: Tensor, iters: int) -> Tensor:
    """(..., G, G) logits -> (..., G, G) doubly stochastic matrix exp(logits) scaled by Sinkhorn-Knopp.

    Runs in fp32 log-space (a logsumexp per normalisation) so large logits neither overflow nor
    underflow. Each iteration normalises rows then columns; ending on columns makes column sums exact
    (conservation of the summed stream) while row sums converge geometrically.
    """
    log_p = logits.float()
    for _ in range(iters):
        log_p = log_p - log_p.logsumexp(dim=-1, keepdim=True)  # rows
        log_p = log_p - log_p.logsumexp(dim=-2, keepdim=True)  # columns
    return log_p.exp()


class HyperConnection(nn.Module):
    """mHC around one sub-layer: read with H_pre, write with H_post, mix copies with H_res."""

    def __init__(self, dim: int, hc_mult: int, sinkhorn_iters: int = 20, eps: float = 1e-6):
        super().__init__()
        if hc_mult < 1:
            raise ValueError(f"HyperConnection.hc_mult: must be >= 1, got {hc_mult}")
        self.dim = dim
        self.hc_mult = hc_mult
        self.sinkhorn_iters = sinkhorn_iters
        g = hc_mult
        self.norm = RMSNorm(g * dim, eps)
        self.proj = nn.Linear(g * dim, 2 * g + g * g, bias=False)
        self.alpha = nn.Parameter(torch.empty(3))  # gates of the dynamic part: pre, post, res
        self.bias_pre = nn.Parameter(torch.empty(g))
        self.bias_post = nn.Parameter(torch.empty(g))
        self.bias_res = nn.Parameter(torch.empty(g, g))
        if self.alpha.device.type != "meta":  # inside EngramLM the model initialises once
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Start close to a standard residual applied to every copy.

        | parameter   | shape         | init                                                         |
        |-------------|---------------|--------------------------------------------------------------|
        | norm.weight | (G*D,)        | ones                                                         |
        | proj.weight | (2G+G*G, G*D) | normal, std 1/sqrt(G*D): unit-scale logits from a normed z   |
        | alpha       | (3,)          | 0.01: the dynamic part starts as a small perturbation        |
        | bias_pre    | (G,)          | logit(1/G): H_pre reads the mean of the copies               |
        |             |               | (G == 1: logit(0.99), as a sigmoid cannot reach 1)           |
        | bias_post   | (G,)          | 0: H_post = 2*sigmoid(0) = 1, y is added to every copy       |
        | bias_res    | (G, G)        | log(0.9*(G-1)/0.1) on the diagonal, 0 off it: H_res has 0.9  |
        |             |               | on the diagonal and 0.1/(G-1) off it (exp(bias_res) is       |
        |             |               | already doubly stochastic up to scale). A diagonal nearer 1  |
        |             |               | shrinks the off-diagonal gradients and slows Sinkhorn's row  |
        |             |               | convergence: with logit noise of std 0.1 at G=4, 20 steps    |
        |             |               | leave row sums ~4e-4 off at 0.9 but ~2e-3 off at 0.95        |

        With equal copies the init output is then x + fn(x) per copy up to the alpha perturbation,
        because any doubly stochastic H_res maps equal copies to themselves.
        """
        g = self.hc_mult
        self.norm.weight.fill_(1.0)
        nn.init.normal_(self.proj.weight, std=1.0 / math.sqrt(g * self.dim))
        self.alpha.fill_(_ALPHA_INIT)
        p_read = min(1.0 / g, _PRE_MAX)
        self.bias_pre.fill_(math.log(p_read / (1.0 - p_read)))
        self.bias_post.zero_()
        self.bias_res.zero_()
        if g > 1:
            self.bias_res.fill_diagonal_(math.log(_RES_DIAG * (g - 1) / (1.0 - _RES_DIAG)))

    def weights(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, T, G, D) -> fp32 H_pre (B, T, G), H_post (B, T, G), H_res (B, T, G, G)."""
        b, t, g, d = x.shape
        z = self.norm(x.reshape(b, t, g * d).float())  # (B, T, G*D), fp32 in, fp32 out
        dyn = F.linear(z, self.proj.weight.float())  # (B, T, 2G + G*G)
        dyn_pre, dyn_post, dyn_res = dyn.split([g, g, g * g], dim=-1)
        alpha = self.alpha.float()
        pre = torch.sigmoid(alpha[0] * dyn_pre + self.bias_pre.float())  # (B, T, G)
        post = 2.0 * torch.sigmoid(alpha[1] * dyn_post + self.bias_post.float())  # (B, T, G)
        res_logits = alpha[2] * dyn_res.reshape(b, t, g, g) + self.bias_res.float()  # (B, T, G, G)
        return pre, post, sinkhorn(res_logits, self.sinkhorn_iters)

    def forward(self, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """x: (B, T, G, D); fn: (B, T, D) -> (B, T, D). Returns the new stream (B, T, G, D)."""
        pre, post, res = self.weights(x)
        xf = x.float()
        h = torch.einsum("btg,btgd->btd", pre, xf)  # (B, T, D)
        y = fn(h.to(x.dtype)).float()  # (B, T, D)
        mixed = torch.einsum("btgk,btkd->btgd", res, xf)  # (B, T, G, D)
        return (mixed + post[..., None] * y[:, :, None, :]).to(x.dtype)  # (B, T, G, D)


class PlainResidual(nn.Module):
    """G == 1: x + fn(x) on the single copy, no parameters (mHC at G == 1 only rescales read and write)."""

    def init_weights(self) -> None:
        """No parameters: nothing to initialise (``HyperConnection.init_weights``'s counterpart)."""

    def forward(self, x: Tensor, fn: Callable[[Tensor], Tensor]) -> Tensor:
        """x: (B, T, 1, D); fn: (B, T, D) -> (B, T, D). Returns (B, T, 1, D)."""
        h = x.squeeze(2)  # (B, T, D)
        return x + fn(h).unsqueeze(2)  # (B, T, 1, D), a new tensor (not a view: FSDP2 hooks block outputs)


def make_residual(dim: int, hc_mult: int, sinkhorn_iters: int, eps: float) -> nn.Module:
    """The residual wrapper for one sub-layer: PlainResidual for G == 1, else HyperConnection."""
    if hc_mult == 1:
        return PlainResidual()
    return HyperConnection(dim, hc_mult, sinkhorn_iters, eps)


def hyper_params(dim: int, hc_mult: int) -> int:
    """Parameter count of the module make_residual builds (0 for G == 1, the PlainResidual)."""
    if hc_mult == 1:
        return 0
    g = hc_mult
    gd = g * dim
    return gd + gd * (2 * g + g * g) + 3 + 2 * g + g * g  # norm, proj, alpha, biases

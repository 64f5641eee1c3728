"""The sparsity-allocation solver (docs/ALGORITHM.md §4): one iso-parameter, iso-FLOP model per allocation ratio rho.

Start from a pure-MoE model (rho = 1). P_sparse = P_tot - P_act is the inactive share of the routed
experts: (E - k) experts' worth of weights per MoE block. To move to rho < 1 we remove n routed experts
from every MoE block and put the same number of weights into Engram tables, so

    rho = (E - n - k) / (E - k),      Engram tables = n * (one expert's weights) * (MoE blocks).

rho is therefore quantised in steps of 1 / (E - k); the solver rounds each requested rho to the nearest
reachable one and reports both. Removing experts also removes their router rows (active weights), and
the Engram module brings active weights of its own (W_K, W_V, norms, conv). Both are balanced by
resizing the dense FFN of the first block(s), so P_act, and with it the FLOPs per token, stays equal to
the baseline's up to the granularity of one FFN hidden unit (3 * d_model weights per dense block):
|delta P_act| <= 1.5 * d_model * dense blocks, a few 1e-4 of P_act; the shipped budgets are exact or
within 1,024 weights of 272M. The table rows are solved by bisection so that P_tot lands within ``p_tot_tolerance``.

Tables are sized by ``count_parameters``, which tests pin to ``numel``; no huge model is ever built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from engram.model.config import ModelConfig
from engram.model.table_config import EngramConfig
from engram.model.accounting import (ParameterCount, count_parameters, engram_dense_params,
                                           engram_table_params)
from engram.model.layers import swiglu_params


@dataclass(frozen=True)
class AllocationPoint:
    rho_target: float  # the requested ratio
    rho: float  # the reached ratio: routed-expert share of P_sparse
    removed_experts: int  # n, per MoE block
    rows_per_head: int  # engram_vocab_size entry (nominal rows of every head; the primes lie just above)
    config: ModelConfig
    params: ParameterCount

    @property
    def rho_nominal(self) -> float:
        """(E - n - k) / (E - k): the ratio exactly, if the tables were sized to the weight."""
        moe = self.config.backbone.moe
        return 1.0 - self.removed_experts / (moe.n_routed_experts + self.removed_experts - moe.top_k)

    @property
    def label(self) -> str:
        return f"rho={self.rho_nominal:.3f}"


def _moe_blocks(config: ModelConfig) -> int:
    bb = config.backbone
    return bb.n_layers - bb.moe.first_dense_layers


def _check_base(base: ModelConfig) -> None:
    bb = base.backbone
    if bb.moe is None:
        raise ValueError("allocation needs a MoE backbone (backbone.moe is None): rho moves routed experts into Engram")
    if base.engram is not None and base.engram.layer_ids:
        raise ValueError("the allocation base must be the pure-MoE model (rho = 1) without Engram layers")
    if bb.moe.first_dense_layers < 1:
        raise ValueError("allocation needs at least one dense block (moe.first_dense_layers >= 1) to absorb "
                         "the Engram module's active weights and keep P_act fixed")
    if bb.moe.n_routed_experts <= bb.moe.top_k:
        raise ValueError("allocation needs more routed experts than top_k: with E == k nothing is sparse")


def with_rows_per_head(engram: EngramConfig, rows_per_head: int) -> EngramConfig:
    """``engram`` with every order's nominal table size set to ``rows_per_head``."""
    return dataclasses.replace(engram, engram_vocab_size=[rows_per_head] * engram.n_orders)


def solve_rows(config: ModelConfig, target_table_params: int) -> int:
    """Smallest nominal rows-per-head whose tables reach ``target_table_params`` (or the closer neighbour).

    Table parameters grow monotonically with the nominal size (each head's prime is the next unused
    prime above it), so bisection finds the crossing; we then keep whichever side is closer.
    """
    def table_params(rows: int) -> int:
        return engram_table_params(dataclasses.replace(config, engram=with_rows_per_head(config.engram, rows)))

    e = config.engram
    lo, hi = 2, max(3, 2 * target_table_params // (e.n_heads * e.head_dim * len(e.layer_ids)) + 8)
    while table_params(hi) < target_table_params:
        hi *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if table_params(mid) < target_table_params:
            lo = mid
        else:
            hi = mid
    return min((lo, hi), key=lambda r: abs(table_params(r) - target_table_params))


def allocate(base: ModelConfig, engram: EngramConfig, rho: float, p_tot_tolerance: float = 0.01) -> AllocationPoint:
    """The model at allocation ratio ``rho`` (nearest reachable) for the pure-MoE ``base``.

    ``engram`` is the template of the module (layers, orders, heads, row width, pad id ...);
    its ``engram_vocab_size`` is replaced by the solved table size.
    """
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho must be in [0, 1], got {rho}")
    _check_base(base)
    bb, moe = base.backbone, base.backbone.moe
    base_count = count_parameters(base)
    inactive = moe.n_routed_experts - moe.top_k
    removed = round((1.0 - rho) * inactive)
    if removed == 0:
        return AllocationPoint(rho, 1.0, 0, 0, base, base_count)

    D, n_dense, n_moe = bb.d_model, moe.first_dense_layers, _moe_blocks(base)
    expert = swiglu_params(D, moe.expert_hidden)
    new_moe = dataclasses.replace(moe, n_routed_experts=moe.n_routed_experts - removed)
    # Active weights to give back through the dense FFN(s): Engram's dense part minus the router rows
    # that left with the experts. One hidden unit of a dense SwiGLU is 3*D weights in each dense block.
    probe = ModelConfig(backbone=bb, engram=with_rows_per_head(engram, 2))
    extra_active = engram_dense_params(probe) * len(engram.layer_ids) - removed * D * n_moe
    shrink = round(extra_active / (3 * D * n_dense))
    if shrink >= bb.ffn_hidden:
        raise ValueError(f"the Engram module's active weights ({extra_active:,}) exceed the dense FFN "
                         f"(ffn_hidden={bb.ffn_hidden}); use a narrower memory (n_embed_per_ngram) or a wider FFN")
    backbone = dataclasses.replace(bb, moe=new_moe, ffn_hidden=bb.ffn_hidden - shrink)
    config = ModelConfig(backbone=backbone, engram=with_rows_per_head(engram, 2))
    rows = solve_rows(config, removed * expert * n_moe)
    config = ModelConfig(backbone=backbone, engram=with_rows_per_head(engram, rows))
    count = count_parameters(config)

    drift = abs(count.total - base_count.total) / base_count.total
    if drift > p_tot_tolerance:
        raise ValueError(f"rho={rho}: P_tot {count.total:,} is {drift:.2%} from the baseline's {base_count.total:,} "
                         f"(tolerance {p_tot_tolerance:.0%}); the table rows are too coarse for this budget")
    routed_inactive = (new_moe.n_routed_experts - moe.top_k) * expert * n_moe
    return AllocationPoint(rho, routed_inactive / count.sparse, removed, rows, config, count)


def allocation_grid(base: ModelConfig, engram: EngramConfig, rhos: Sequence[float],
                    p_tot_tolerance: float = 0.01) -> list[AllocationPoint]:
    """``allocate`` for every rho, highest first; requests that round to the same model are merged."""
    points: dict[int, AllocationPoint] = {}
    for rho in sorted(rhos, reverse=True):
        point = allocate(base, engram, rho, p_tot_tolerance)
        points.setdefault(point.removed_experts, point)
    return list(points.values())


def format_grid(points: Sequence[AllocationPoint], base: ParameterCount) -> str:
    """The solver's table: rho, experts, Engram rows, P_tot, P_act and FLOPs per token, with the
    differences to the pure-MoE ``base`` (``count_parameters`` of the rho = 1 model)."""
    header = (f"{'rho (asked)':>11} {'rho':>6} {'experts':>7} {'rows/head':>10} {'Engram rows':>12} "
              f"{'P_tot':>12} {'dP_tot':>7} {'P_act':>11} {'dP_act':>7} {'FLOPs/token':>12}")
    lines = [header]
    for p in points:
        e = p.config.engram
        rows = p.params.engram_tables // e.head_dim if e is not None and p.removed_experts else 0
        lines.append(
            f"{p.rho_target:>11.3f} {p.rho:>6.3f} {p.config.backbone.moe.n_routed_experts:>7} "
            f"{p.rows_per_head:>10,} {rows:>12,} {p.params.total:>12,} "
            f"{(p.params.total - base.total) / base.total:>+7.2%} {p.params.active:>11,} "
            f"{p.params.active - base.active:>+7,} {p.params.flops_per_token:>12,}")
    return "\n".join(lines)

"""Sweep plans: the runs of ``engram sweep allocation|memory|ablation --budget NAME [--seeds K]``.

A sweep is a plan: a list of ``PlannedRun`` (a grid point and a seed, with its full ``RunConfig``),
built from a ``Budget`` alone, with no file or process involved; ``runner`` executes it. Seeds are
the outer loop, so every grid point has a first seed before any gets a second.

- allocation: one iso-parameter, iso-FLOP model per rho (``allocation.allocation_grid``);
- memory: the rho = 1 backbone without memory, with Engram and with OverEncoding tables of growing size;
- ablation: switches of the Engram module and single-module layers at the table budget of ``ablation_rho``;
- init: the Engram tables' initial standard deviation (``INIT_STDS``) at the table budget of
  ``ablation_rho``, beside its pure-MoE twin (rho = 1), all seed-paired (the table-init study, docs/RESULTS.md §4).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from engram.schema import apply_overrides
from engram.model.config import ModelConfig
from engram.model.table_config import OverEncodingConfig
from engram.train.config import RunConfig
from engram.model.accounting import count_parameters
from engram.sweeps.allocation import allocate, allocation_grid, format_grid, with_rows_per_head
from engram.sweeps.budgets import Budget, get_budget


@dataclass(frozen=True)
class PlannedRun:
    sweep: str
    budget: str
    point: str  # grid-point label, unique within the sweep and safe as a directory name
    seed: int
    run: RunConfig
    info: dict = field(default_factory=dict)  # grid coordinates: rho / method, table_params / variant, group
    path: str | None = None  # its directory under the root; None: BUDGET/SWEEP/POINT/seedK (the demo sets its own)

    def directory(self, root: Path) -> Path:
        if self.path is not None:
            return Path(root) / self.path
        return Path(root) / self.budget / self.sweep / self.point / f"seed{self.seed}"


def _seeded(run: RunConfig, model: ModelConfig, seed: int) -> RunConfig:
    return dataclasses.replace(run, model=model, train=dataclasses.replace(run.train, seed=seed))


def _table_params(model: ModelConfig) -> int:
    count = count_parameters(model)
    return count.engram_tables + count.overencoding_tables


# -- the plans ----------------------------------------------------------------------------------------
def plan_allocation(budget: Budget, seeds: range) -> list[PlannedRun]:
    base = budget.base_run()
    points = allocation_grid(base.model, budget.engram_template(), budget.rhos)
    return [PlannedRun("allocation", budget.name, p.label, seed, _seeded(base, p.config, seed),
                       {"rho": p.rho, "rho_nominal": p.rho_nominal, "rho_target": p.rho_target,
                        "removed_experts": p.removed_experts, "rows_per_head": p.rows_per_head,
                        "table_params": p.params.engram_tables})
            for seed in seeds for p in points]


def memory_models(budget: Budget) -> list[tuple[str, dict, ModelConfig]]:
    """(label, info, model): the fixed rho = 1 backbone without memory, with Engram, with OverEncoding."""
    base = budget.base_run().model
    template = budget.engram_template()
    models = [("none", {"method": "none", "rows_per_head": 0}, base)]
    for rows in budget.memory_rows:
        engram = ModelConfig(backbone=base.backbone, engram=with_rows_per_head(template, rows))
        models.append((f"engram-rows={rows}", {"method": "engram", "rows_per_head": rows}, engram))
    for rows in budget.memory_rows:
        over = OverEncodingConfig(engram_vocab_size=[rows] * template.n_orders, max_ngram_size=template.max_ngram_size,
                                  n_embed_per_ngram=template.n_embed_per_ngram,
                                  n_head_per_ngram=template.n_head_per_ngram, pad_id=template.pad_id)
        models.append((f"overencoding-rows={rows}", {"method": "overencoding", "rows_per_head": rows},
                       ModelConfig(backbone=base.backbone, overencoding=over)))
    return models


def plan_memory(budget: Budget, seeds: range) -> list[PlannedRun]:
    base = budget.base_run()
    return [PlannedRun("memory", budget.name, label, seed, _seeded(base, model, seed),
                       info | {"table_params": _table_params(model)})
            for seed in seeds for label, info, model in memory_models(budget)]


def ablation_models(budget: Budget) -> list[tuple[str, str, ModelConfig]]:
    """(variant, group, model) at the Engram table budget of ``budget.ablation_rho`` (docs/ALGORITHM.md §5)."""
    base = budget.base_run().model
    template = budget.engram_template()
    ref = allocate(base, template, budget.ablation_rho).config
    e, bb = ref.engram, ref.backbone

    def engram(**changes) -> ModelConfig:
        return dataclasses.replace(ref, engram=dataclasses.replace(e, **changes))

    # +4-grams: the same table parameters spread over three orders instead of two
    rows4 = e.engram_vocab_size[0] * e.n_orders // (e.n_orders + 1)
    variants = [
        ("full", "component", ref),
        ("no-compression", "component", engram(compress=False)),
        ("no-gate", "component", engram(gate="none")),
        ("no-short-conv", "component", engram(short_conv=False)),
        ("+4-grams", "component", engram(max_ngram_size=e.max_ngram_size + 1,
                                         engram_vocab_size=[rows4] * (e.n_orders + 1))),
    ]
    if bb.hc_mult == 1:  # branch-specific keys need hyper-connections: compare G=2 with and without them
        g2 = ModelConfig(backbone=dataclasses.replace(bb, hc_mult=2), engram=e)
        variants += [("G=2", "component", g2),
                     ("G=2-shared-key", "component",
                      dataclasses.replace(g2, engram=dataclasses.replace(g2.engram, branch_keys=False)))]
    else:
        variants += [("shared-key", "component", engram(branch_keys=False))]
    variants += [(f"layer={layer}", "layer", engram(layer_ids=[layer]))
                 for layer in budget.layer_sweep if [layer] != e.layer_ids]
    return variants


def plan_ablation(budget: Budget, seeds: range) -> list[PlannedRun]:
    base = budget.base_run()
    variants = ablation_models(budget)
    ref_layer = variants[0][2].engram.layer_ids[0]  # variants[0] is "full"
    runs = []
    for seed in seeds:
        for variant, group, model in variants:
            info = {"variant": variant, "group": group, "table_params": _table_params(model),
                    "layer": model.engram.layer_ids[0], "reference_layer": ref_layer}
            runs.append(PlannedRun("ablation", budget.name, variant, seed, _seeded(base, model, seed), info))
    return runs


# table_init_std values of the init sweep: DeepSeek's N(0, 1) (the reference), a small N(0, 0.02) (the
# scale of every other weight here) and zero (what OverEncoding needed, docs/RESULTS.md §2)
INIT_STDS = (1.0, 0.02, 0.0)
INIT_TWIN = "pure-moe"


def init_label(std: float) -> str:
    return f"table_std={std:g}"


def plan_init(budget: Budget, seeds: range) -> list[PlannedRun]:
    base = budget.base_run()
    point = allocate(base.model, budget.engram_template(), budget.ablation_rho)
    models = [(INIT_TWIN, {"variant": INIT_TWIN, "table_init_std": None, "rho": 1.0, "table_params": 0},
               base.model)]
    for std in INIT_STDS:
        model = dataclasses.replace(point.config,
                                    engram=dataclasses.replace(point.config.engram, table_init_std=std))
        models.append((init_label(std), {"variant": init_label(std), "table_init_std": std, "rho": point.rho,
                                         "table_params": _table_params(model)}, model))
    return [PlannedRun("init", budget.name, label, seed, _seeded(base, model, seed), dict(info))
            for seed in seeds for label, info, model in models]


PLANS: dict[str, Callable[[Budget, range], list[PlannedRun]]] = {
    "allocation": plan_allocation, "memory": plan_memory, "ablation": plan_ablation, "init": plan_init}


def plan(sweep: str, budget: str, seeds: int | None = None, overrides: list[str] | None = None,
         first_seed: int = 0, points: list[str] | None = None) -> list[PlannedRun]:
    """The runs of ``sweep`` for ``budget``: seeds ``first_seed`` .. ``first_seed + seeds - 1`` (``seeds``
    defaults to the budget's; a later ``first_seed`` gives fresh seeds to confirm a choice made on the
    first ones); ``overrides`` are ``key=value`` settings applied to every run's data/train config (e.g.
    ``train.max_steps=20``)."""
    if sweep not in PLANS:
        raise ValueError(f"unknown sweep {sweep!r}; known: {list(PLANS)}")
    b = get_budget(budget)
    n = b.seeds if seeds is None else seeds
    if n < 1:
        raise ValueError(f"--seeds must be >= 1, got {n}")
    if not isinstance(first_seed, int) or first_seed < 0:
        raise ValueError(f"--first-seed must be an int >= 0, got {first_seed!r}")
    runs = PLANS[sweep](b, range(first_seed, first_seed + n))
    if points:  # only these grid points (e.g. confirm a choice and its reference on fresh seeds)
        known = list(dict.fromkeys(r.point for r in runs))
        unknown = [p for p in points if p not in known]
        if unknown:
            raise ValueError(f"unknown point(s) {unknown} of the {sweep} sweep; its points: {known}")
        runs = [r for r in runs if r.point in points]
    if overrides:
        bad = [o for o in overrides if o.split("=", 1)[0].strip().startswith("model.")]
        if bad:
            raise ValueError(f"sweep overrides may not change the model (the grid defines it): {bad}")
        runs = [dataclasses.replace(r, run=apply_overrides(r.run, overrides)) for r in runs]
    return runs


def describe_plan(sweep: str, budget: str, seeds: int | None = None, overrides: list[str] | None = None,
                  first_seed: int = 0, points: list[str] | None = None) -> str:
    """What ``--dry-run`` prints: the solver's table (allocation) or each grid point's sizes, and the
    number of runs."""
    runs = plan(sweep, budget, seeds, overrides, first_seed, points)
    if sweep == "allocation" and not points:
        b = get_budget(budget)
        base = b.base_run().model
        lines = [format_grid(allocation_grid(base, b.engram_template(), b.rhos), count_parameters(base))]
    else:
        lines = [f"{'point':<28} {'table params':>13} {'P_tot':>12} {'P_act':>11}"]
        for r in runs:
            if r.seed == runs[0].seed:
                c = count_parameters(r.run.model)
                lines.append(f"{r.point:<28} {r.info['table_params']:>13,} {c.total:>12,} {c.active:>11,}")
    tc = runs[0].run.train
    lines.append(f"{len(runs)} runs; tokens per run {tc.max_steps * tc.tokens_per_step:,}")
    return "\n".join(lines)

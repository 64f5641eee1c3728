"""The sweeps' pictures (PNG): the allocation U-curve, memory scaling per method, and the ablation bars.

The statistics behind them (fits, bootstrap interval, seed-paired deltas) live in ``stats``; these
functions only draw, through ``engram.plotting`` (matplotlib imported lazily, on the Agg backend).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from engram.plotting import pyplot, save_figure
from engram.sweeps.stats import (PAPER_OPTIMUM, REFERENCE, LogLinearFit, allocation_groups, bootstrap_minimiser,
                                 by_point, by_seed, delta_spread, delta_vs_reference, fit_quadratic, init_order,
                                 natural_key, runs_of, sample_std, sweep_fits)


def plot_allocation(results, path, n_boot: int = 2000, seed: int = 0) -> Path:
    plt = pyplot()
    runs = runs_of(results, "allocation")
    groups = allocation_groups(runs)
    rhos = np.array([g[0] for g in groups])
    means, stds = np.array([g[1].mean() for g in groups]), np.array([sample_std(g[1]) for g in groups])
    lo, hi = min(rhos.min(), PAPER_OPTIMUM[0]), max(rhos.max(), PAPER_OPTIMUM[1])
    lo, hi = lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)
    fig, ax = plt.subplots(figsize=(10, 4.8))
    ax.axvspan(*PAPER_OPTIMUM, color="tab:green", alpha=0.12, label="paper optimum (rho 0.75-0.80)")
    for rho, losses in groups:
        ax.scatter(np.full(len(losses), rho), losses, s=10, alpha=0.3, color="tab:blue")
    ax.errorbar(rhos, means, yerr=stds, fmt="o", color="tab:blue", capsize=3, label="mean ± std over seeds")
    if len(rhos) < 3:
        note = "fewer than 3 rho points: no quadratic fit"
    else:
        fit, boot = fit_quadratic(rhos, means), bootstrap_minimiser(runs, n_boot, seed)
        grid = np.linspace(rhos.min(), rhos.max(), 200)
        ax.plot(grid, fit(grid), color="tab:orange", label=f"quadratic fit (R²={fit.r2:.2f})")
        if boot.low is not None:  # shading clipped to the axes; the legend gives the true interval
            ax.axvspan(max(boot.low, lo), min(boot.high, hi), color="tab:orange", alpha=0.15,
                       label=f"bootstrap 95% [{boot.low:.3f}, {boot.high:.3f}], "
                             f"{boot.fraction_with_minimum:.0%} of replicates U-shaped")
        if fit.minimiser is not None and rhos.min() <= fit.minimiser <= rhos.max():
            ax.axvline(fit.minimiser, color="tab:orange", ls="-.", label=f"fitted minimum rho={fit.minimiser:.3f}")
            note = f"U-shaped: minimum at rho={fit.minimiser:.3f}"
        elif fit.minimiser is not None:
            note = f"fitted minimum rho={fit.minimiser:.3f} lies outside the sampled range"
        else:
            note = "no interior minimum (the fitted parabola opens downward or is flat)"
    ref = [m for r, m in zip(rhos, means) if math.isclose(r, 1.0)]
    if ref:
        ax.axhline(ref[0], color="grey", ls="--", label=f"pure MoE (rho=1): {ref[0]:.4f}")
    ax.set_xlim(lo, hi)
    ax.set_xlabel("allocation ratio rho (share of sparse parameters in routed experts)")
    ax.set_ylabel("validation loss (nats/token)")
    seeds = max(len(g[1]) for g in groups)
    ax.set_title(f"Sparsity allocation, budget {runs[0].get('budget')!s} (up to {seeds} seeds)\n{note}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: the points span the axes
    return save_figure(fig, path)


def plot_memory(results, path) -> Path:
    plt = pyplot()
    runs = runs_of(results, "memory")
    fits = sweep_fits("memory", runs).get("loglinear", {})
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    methods = sorted({r.get("method") for r in runs} - {"none", None})
    for colour, method in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], methods):
        m = [r for r in runs if r.get("method") == method and r.get("table_params", 0) > 0]
        by_size = defaultdict(list)
        for r in m:
            by_size[int(r["table_params"])].append(float(r["val_loss"]))
        xs = np.array(sorted(by_size))
        ax.scatter([r["table_params"] for r in m], [r["val_loss"] for r in m], s=10, alpha=0.3, color=colour)
        ax.errorbar(xs, [np.mean(by_size[x]) for x in xs], yerr=[sample_std(by_size[x]) for x in xs], fmt="o",
                    color=colour, capsize=3, label=f"{method}: mean ± std" + ("" if method in fits else " (no fit)"))
        if method in fits:
            f = LogLinearFit(**fits[method])
            grid = np.geomspace(xs.min(), xs.max(), 50)
            se = "" if math.isnan(f.slope_stderr) else f" ± {f.slope_stderr:.4f}"
            ax.plot(grid, f(grid), color=colour, label=f"{method} fit: {f.slope_per_doubling:+.4f}{se} per doubling")
    base = [float(r["val_loss"]) for r in runs if r.get("method") == "none"]
    if base:
        ax.axhline(np.mean(base), color="grey", ls="--", label=f"backbone, no memory: {np.mean(base):.4f}")
    if methods:
        ax.set_xscale("log")
    ax.set_xlabel("table parameters (rows × row width, log scale)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"Memory scaling at a fixed backbone, budget {runs[0].get('budget')!s}", fontsize=10)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_ablation(results, path) -> Path:
    plt = pyplot()
    runs = runs_of(results, "ablation")
    is_full = REFERENCE["ablation"][1]
    component = [r for r in runs if r.get("group", "component") != "layer" and not is_full(r)]
    layer = [r for r in runs if r.get("group") == "layer"]
    if not component and not layer:
        raise ValueError("no ablation variants besides 'full'")
    panels = ["component"] * bool(component) + ["layer"] * bool(layer)
    rows = max(len(by_point(component)), len(by_point(layer)))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 1.2 + 0.45 * rows + 1.5), squeeze=False)
    full = [r for r in runs if is_full(r)]
    if "component" in panels:
        ax = axes[0, 0]
        deltas = [d for d in delta_vs_reference(runs, "ablation") if d["group"] != "layer"]
        ref_seed, ref_mean = by_seed(full), float(np.mean([r["val_loss"] for r in full]))
        y = np.arange(len(deltas))[::-1]  # first variant on top
        vals = np.array([d["delta"] for d in deltas])
        ax.barh(y, vals, xerr=[delta_spread(d) for d in deltas], capsize=3, alpha=0.6,
                color=["tab:red" if v > 0 else "tab:green" for v in vals])
        points = by_point(runs)
        for yi, d in zip(y, deltas):  # a seed's own full run when it has one, else full's mean
            dots = [v - ref_seed.get(s, ref_mean) for s, v in by_seed(points[d["point"]]).items()]
            ax.scatter(dots, np.full(len(dots), yi), s=12, color="black", zorder=3)
        ax.axvline(0, color="grey", lw=1)
        ax.set_yticks(y, [d["point"] for d in deltas])
        ax.set_xlabel("val loss minus full (nats); positive = worse than full")
        paired = all(d["paired_n"] >= 2 for d in deltas)
        ax.set_title("Component ablations vs full\nbars: mean; error: " + ("std of seed-paired differences" if paired
                     else "paired std where >= 2 seeds pair up, else combined std"), fontsize=10)
    if "layer" in panels:
        ax = axes[0, -1]
        pts = by_point(layer)
        ref_layer = full[0].get("layer") if full else None
        if ref_layer is not None and f"layer={ref_layer}" not in pts:
            pts[f"layer={ref_layer} (full)"] = full  # the sweep skips the reference layer: full is that point
        pts = sorted(pts.items(), key=lambda kv: natural_key(kv[0]))
        means = [np.mean([r["val_loss"] for r in p]) for _, p in pts]
        x = np.arange(len(pts))
        for xi, (_, p) in zip(x, pts):
            ax.scatter(np.full(len(p), xi), [r["val_loss"] for r in p], s=10, alpha=0.3, color="tab:blue")
        ax.errorbar(x, means, yerr=[sample_std([r["val_loss"] for r in p]) for _, p in pts], fmt="o-", capsize=3,
                    color="tab:blue", label="mean ± std over seeds")
        best = int(np.argmin(means))
        ax.scatter([best], [means[best]], marker="*", s=250, color="tab:orange", zorder=4,
                   label=f"best: {pts[best][0]} ({means[best]:.4f})")
        if full:
            ax.axhline(np.mean([r["val_loss"] for r in full]), color="grey", ls="--", label="full (reference)")
        ax.set_xticks(x, [k for k, _ in pts])
        ax.set_xlabel("layer of the single Engram module")
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title("Single-module layer sweep: mean loss (lower is better)", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"Ablations, budget {runs[0].get('budget')!s}", fontsize=11)
    return save_figure(fig, path)


def plot_init(results, path) -> Path:
    """Left: every run's validation loss, one line per seed across the points (seeds pair up). Right:
    each init's per-seed difference to the pure-MoE twin (negative: Engram ahead)."""
    plt = pyplot()
    runs = runs_of(results, "init")
    points = sorted(by_point(runs).items(), key=lambda kv: init_order(kv[1][0].get("table_init_std")))
    if not points:
        raise ValueError("no init runs")
    names = [p for p, _ in points]
    seeds = sorted({r["seed"] for r in runs})
    colours = plt.get_cmap("viridis")(np.linspace(0, 0.9, max(len(seeds), 1)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for colour, seed in zip(colours, seeds):
        xs = [i for i, (_, pr) in enumerate(points) if seed in by_seed(pr)]
        left.plot(xs, [by_seed(points[i][1])[seed] for i in xs], "o-", color=colour, alpha=0.8, label=f"seed {seed}")
    left.set_xticks(range(len(names)), names)
    left.set_ylabel("validation loss (nats/token)")
    left.set_title("Validation loss per run (one line per seed)", fontsize=10)
    left.legend(fontsize=8, ncol=2)
    try:
        deltas = [d for d in delta_vs_reference(runs, "init") if d["table_init_std"] is not None]
    except ValueError:
        deltas = []
    for x, d in enumerate(deltas):
        for colour, seed in zip(colours, seeds):
            if seed in d["paired_diffs"]:
                right.scatter([x], [d["paired_diffs"][seed]], color=colour, s=18, zorder=3)
        if d["paired_n"]:
            right.errorbar([x], [d["paired_mean"]], yerr=[d["paired_std"] or 0.0], fmt="_", ms=30, capsize=4,
                           color="black", zorder=2)
    right.axhline(0, color="grey", lw=1)
    right.set_xticks(range(len(deltas)), [d["point"] for d in deltas])
    right.set_ylabel("val loss minus the pure-MoE twin (nats)")
    right.set_title("Seed-paired difference to the pure-MoE twin\n(dots: seeds; bar: mean ± std; below 0: Engram "
                    "ahead)", fontsize=10)
    fig.suptitle(f"Engram table initialisation, budget {runs[0].get('budget')!s}", fontsize=11)
    return save_figure(fig, path)


PLOTS = {"allocation": plot_allocation, "memory": plot_memory, "ablation": plot_ablation, "init": plot_init}

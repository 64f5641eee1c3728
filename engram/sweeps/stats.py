"""Statistics of the sweeps (docs/ALGORITHM.md §4-6): allocation U-shape, memory scaling, ablations.

Numbers only: ``plots`` draws them and ``report`` writes them out as tables and JSON.
Input is one dict per training run, as the sweep runner writes it to ``result.json`` (``load_results``):
``sweep``, ``budget``, ``point`` (a label unique within the sweep), ``seed``, ``val_loss``, ``params``, and
per sweep ``rho`` (allocation), ``method`` + ``table_params`` (memory), ``variant`` + ``group`` (ablation),
``variant`` + ``table_init_std`` (init; None for the pure-MoE twin).

What each statistic means
- ``summarise``: per (sweep, budget, point) the number of seeds and the mean, std (ddof=1; 0 for a single
  seed), min and max of val_loss. The std is the spread of one run across seeds, not an error of the mean.
- ``fit_quadratic``: least squares loss = a*rho^2 + b*rho + c on the per-point means. docs/ALGORITHM.md §4's U-shape is
  a > 0 with minimiser -b/(2a); with a <= 0 the data show no interior minimum and the fit says so.
- ``bootstrap_minimiser``: how far seed noise moves that minimiser. Each replicate resamples the seeds with
  replacement within every rho point and refits; the interval is the 2.5/97.5 percentiles of the replicates
  that were still U-shaped, and ``fraction_with_minimum`` says how many were (about half for flat noise).
- ``fit_loglinear``: loss = intercept + slope * log2(table params), the "infinite memory" law of docs/ALGORITHM.md §4,
  fitted on individual runs. The slope is the change in loss per *doubling* of the table (divide by ln 2
  for per e-fold), with its OLS standard error.
- ``delta_vs_reference``: each point's mean minus the reference's (pure MoE rho=1, the "none" backbone
  without memory, the "full" ablation variant, the pure-MoE twin of the init sweep). The paper's
  iso-parameter gain is ~0.01 nats (docs/ALGORITHM.md §6), about the seed-to-seed spread of a small run. Runs with the same seed share data order and init, so much
  of that spread is common to both arms and cancels in the per-seed difference: ``paired_mean`` /
  ``paired_std`` over the shared seeds are the numbers to read. ``combined_std`` = sqrt(std^2 + std_ref^2)
  is the spread of one difference if the arms were independent; it is the fallback when no seed is shared.
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

import numpy as np

SWEEPS = ("allocation", "memory", "ablation", "init")
_ORDER = {s: i for i, s in enumerate(SWEEPS)}  # report order; unknown sweeps go last
PAPER_OPTIMUM = (0.75, 0.80)  # docs/ALGORITHM.md §4: the U-shape bottoms out at rho ~ 75-80%
REQUIRED = ("sweep", "point", "seed", "val_loss")


@dataclass(frozen=True)
class QuadraticFit:
    """y = a*x^2 + b*x + c; ``minimiser`` is None when a <= 0 (no interior minimum)."""
    a: float
    b: float
    c: float
    minimiser: float | None
    r2: float

    def __call__(self, x):
        x = np.asarray(x, dtype=float)
        return (self.a * x + self.b) * x + self.c

    def describe(self) -> str:
        if self.minimiser is None:
            return f"no interior minimum (a={self.a:.4g} <= 0), R^2={self.r2:.3f}"
        return f"minimum at {self.minimiser:.4f} (a={self.a:.4g}), R^2={self.r2:.3f}"


@dataclass(frozen=True)
class LogLinearFit:
    """loss = intercept + slope_per_doubling * log2(table_params); negative slope: more memory helps."""
    slope_per_doubling: float
    slope_stderr: float  # OLS standard error of slope_per_doubling; nan with only two runs
    intercept: float  # loss extrapolated to one table parameter: read it only together with the slope
    r2: float
    n: int

    def __call__(self, table_params):
        return self.intercept + self.slope_per_doubling * np.log2(np.asarray(table_params, dtype=float))


class MinimiserInterval(NamedTuple):
    estimate: float | None  # minimiser of the fit to all seeds' per-point means
    low: float | None  # 2.5th percentile over the replicates with a minimum
    high: float | None
    fraction_with_minimum: float


# ---- fits ----

def _r2(y: np.ndarray, fitted: np.ndarray) -> float:
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return 1.0 if ss_tot == 0 else 1.0 - float(((y - fitted) ** 2).sum()) / ss_tot


def _curved_up(a, x: np.ndarray, y: np.ndarray):
    # Exactly linear or flat data fit a ~ +-1e-16, which would put a "minimum" at 1e15: demand curvature
    # that is visible in float64 across the sampled range.
    span = float(np.ptp(x)) or 1.0
    return a * span**2 > 1e-10 * max(float(np.abs(y).max()), 1e-12)


def fit_quadratic(x, y) -> QuadraticFit:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(np.unique(x)) < 3:
        raise ValueError("a quadratic needs at least 3 distinct x values")
    (a, b, c), *_ = np.linalg.lstsq(np.vander(x, 3), y, rcond=None)
    minimiser = float(-b / (2 * a)) if _curved_up(a, x, y) else None
    return QuadraticFit(float(a), float(b), float(c), minimiser, _r2(y, np.polyval([a, b, c], x)))


def fit_loglinear(table_params, losses) -> LogLinearFit:
    lx, y = np.log2(np.asarray(table_params, dtype=float)), np.asarray(losses, dtype=float)
    if len(np.unique(lx)) < 2:
        raise ValueError("a log-linear fit needs at least 2 distinct table sizes")
    (slope, intercept), *_ = np.linalg.lstsq(np.vander(lx, 2), y, rcond=None)
    resid = y - (slope * lx + intercept)
    sxx = float(((lx - lx.mean()) ** 2).sum())
    stderr = math.sqrt(float((resid**2).sum()) / (len(y) - 2) / sxx) if len(y) > 2 else math.nan
    return LogLinearFit(float(slope), stderr, float(intercept), _r2(y, y - resid), len(y))


def allocation_groups(results) -> list[tuple[float, np.ndarray]]:
    """[(rho, val_losses over seeds)], ascending rho."""
    groups = defaultdict(list)
    for r in runs_of(results, "allocation"):
        groups[round(float(r["rho"]), 6)].append(float(r["val_loss"]))
    return [(rho, np.array(groups[rho])) for rho in sorted(groups)]


def bootstrap_minimiser(results, n_boot: int = 2000, seed: int = 0) -> MinimiserInterval:
    groups = allocation_groups(results)
    rhos = np.array([rho for rho, _ in groups])
    estimate = fit_quadratic(rhos, [losses.mean() for _, losses in groups]).minimiser
    rng = np.random.default_rng(seed)
    # (n_boot, P): per-point means of seeds resampled with replacement, independently for each point
    means = np.stack([losses[rng.integers(0, len(losses), (n_boot, len(losses)))].mean(axis=1)
                      for _, losses in groups], axis=1)
    (a, b, _), *_ = np.linalg.lstsq(np.vander(rhos, 3), means.T, rcond=None)  # each (n_boot,)
    ok = _curved_up(a, rhos, means)
    if not ok.any():
        return MinimiserInterval(estimate, None, None, 0.0)
    low, high = np.percentile(-b[ok] / (2 * a[ok]), [2.5, 97.5])
    return MinimiserInterval(estimate, float(low), float(high), float(ok.mean()))


# ---- grouping, summaries and deltas ----

def runs_of(results, sweep: str) -> list[dict]:
    """The results of one sweep; refuses a mix of budgets or none at all."""
    runs = [r for r in results if r["sweep"] == sweep]
    budgets = {r.get("budget") for r in runs}
    if len(budgets) > 1:
        raise ValueError(f"{sweep} results mix budgets {sorted(map(str, budgets))}: pass one budget at a time")
    if not runs:
        raise ValueError(f"no {sweep} results")
    return runs


def by_sweep(results) -> dict[tuple[str, str], list[dict]]:
    """(sweep, budget) -> runs, in report order."""
    out = defaultdict(list)
    for r in results:
        out[(r["sweep"], str(r.get("budget", "")))].append(r)
    return dict(sorted(out.items(), key=lambda kv: (_ORDER.get(kv[0][0], len(SWEEPS)), kv[0])))


def _x_fields(run: dict) -> dict:
    sweep = run["sweep"]
    if sweep == "allocation":
        return {"rho": float(run["rho"])}
    if sweep == "memory":
        return {"method": run.get("method", "none"), "table_params": int(run.get("table_params", 0))}
    if sweep == "ablation":
        return {"variant": run.get("variant", run["point"]), "group": run.get("group", "component")}
    if sweep == "init":
        return {"variant": run.get("variant", run["point"]), "table_init_std": run.get("table_init_std")}
    return {}


def natural_key(s: str) -> tuple:
    """Sort key that orders digit runs by value: "layer10" after "layer9"."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", s) if t)


def _sort_key(row: dict) -> tuple:
    sweep = row["sweep"]
    if sweep == "allocation":
        inner = (-row["rho"],)
    elif sweep == "memory":
        inner = (row["method"] != "none", row["method"], row["table_params"])
    elif sweep == "ablation":
        inner = (row["variant"] != "full", row["group"] != "component", row["group"], natural_key(row["variant"]))
    elif sweep == "init":
        inner = init_order(row.get("table_init_std"))
    else:
        inner = (natural_key(str(row["point"])),)
    return (_ORDER.get(sweep, len(SWEEPS)), sweep, str(row["budget"]), inner)


def init_order(table_init_std: float | None) -> tuple:
    """The init sweep's order: the pure-MoE twin (no std), then the tables' init std from large to small."""
    return (table_init_std is not None, -(table_init_std or 0.0))


def sample_std(x) -> float:
    """Sample standard deviation (ddof 1); 0 for a single value."""
    return float(np.std(x, ddof=1)) if len(x) > 1 else 0.0


def by_point(runs) -> dict[str, list[dict]]:
    """Grid point -> its runs (one per seed)."""
    out = defaultdict(list)
    for r in runs:
        out[str(r["point"])].append(r)
    return out


def by_seed(runs) -> dict:
    """seed -> val_loss, averaging reruns of the same seed."""
    out = defaultdict(list)
    for r in runs:
        out[r["seed"]].append(float(r["val_loss"]))
    return {s: float(np.mean(v)) for s, v in out.items()}


def summarise(results) -> list[dict]:
    rows = []
    for (sweep, budget), runs in by_sweep(results).items():
        for point, pruns in by_point(runs).items():
            loss = np.array([float(r["val_loss"]) for r in pruns])
            params = defaultdict(list)
            for r in pruns:
                for k, v in (r.get("params") or {}).items():
                    if isinstance(v, (int, float)):
                        params[k].append(v)
            rows.append({"sweep": sweep, "budget": budget, "point": point, **_x_fields(pruns[0]),
                         "n": len(loss), "seeds": sorted({r["seed"] for r in pruns}), "mean": float(loss.mean()),
                         "std": sample_std(loss), "min": float(loss.min()), "max": float(loss.max()),
                         "params": {k: float(np.mean(v)) for k, v in params.items()}})
    return sorted(rows, key=_sort_key)


REFERENCE = {"allocation": ("rho=1 (pure MoE)", lambda r: math.isclose(float(r["rho"]), 1.0)),
             "memory": ("method 'none'", lambda r: r.get("method") == "none"),
             "ablation": ("variant 'full'", lambda r: r.get("variant", r["point"]) == "full"),
             "init": ("the pure-MoE twin", lambda r: r.get("table_init_std") is None)}


def delta_vs_reference(results, sweep: str, reference: tuple | None = None) -> list[dict]:
    """Each point against the sweep's reference (``REFERENCE``), or against ``reference`` = (name,
    predicate on a run); rows carry ``paired_diffs``, the per-seed differences, keyed by seed."""
    name, is_ref = REFERENCE[sweep] if reference is None else reference
    parts = {budget: runs for (s, budget), runs in by_sweep(results).items() if s == sweep}
    if not parts:
        raise ValueError(f"no {sweep} results")
    rows = []
    for budget, runs in parts.items():
        ref = [r for r in runs if is_ref(r)]
        if not ref:
            raise ValueError(f"{sweep} sweep (budget {budget!r}) has no reference runs ({name})")
        ref_loss, ref_seed = np.array([float(r["val_loss"]) for r in ref]), by_seed(ref)
        for point, pruns in by_point(r for r in runs if not is_ref(r)).items():
            loss, point_seed = np.array([float(r["val_loss"]) for r in pruns]), by_seed(pruns)
            shared = sorted(set(point_seed) & set(ref_seed))
            diffs = np.array([point_seed[s] - ref_seed[s] for s in shared])
            rows.append({"sweep": sweep, "budget": budget, "point": point, **_x_fields(pruns[0]), "n": len(loss),
                         "mean": float(loss.mean()), "ref_mean": float(ref_loss.mean()),
                         "delta": float(loss.mean() - ref_loss.mean()),
                         "combined_std": math.hypot(sample_std(loss), sample_std(ref_loss)),
                         "paired_n": len(shared), "paired_seeds": shared,
                         "paired_diffs": {int(s): float(d) for s, d in zip(shared, diffs)},
                         "paired_mean": float(diffs.mean()) if shared else None,
                         "paired_std": sample_std(diffs) if shared else None})
    return sorted(rows, key=_sort_key)


def delta_spread(d: dict) -> float:
    """Error bar for one delta: the paired std when two or more seeds pair up, else the unpaired one."""
    return d["paired_std"] if d["paired_n"] >= 2 else d["combined_std"]


def sweep_fits(sweep: str, runs: list[dict]) -> dict:
    """The fits of one (sweep, budget); a fit the data cannot support is recorded as its reason."""
    try:
        if sweep == "allocation":
            groups = allocation_groups(runs)
            fit = fit_quadratic([g[0] for g in groups], [g[1].mean() for g in groups])
            return {"quadratic": asdict(fit), "bootstrap": bootstrap_minimiser(runs)._asdict()}
        if sweep == "memory":
            out = {}
            for method in sorted({r.get("method") for r in runs} - {"none", None}):
                m = [r for r in runs if r.get("method") == method and r.get("table_params", 0) > 0]
                out[method] = asdict(fit_loglinear([r["table_params"] for r in m], [r["val_loss"] for r in m]))
            return {"loglinear": out}
    except ValueError as e:
        return {"error": str(e)}
    return {}


# ---- reading results ----

def load_results(paths: str | Path | Iterable[str | Path]) -> list[dict]:
    """Every ``result.json`` under the given directories (recursively) or the given files themselves."""
    paths = [paths] if isinstance(paths, (str, Path)) else paths
    files = [f for p in map(Path, paths) for f in (sorted(p.rglob("result.json")) if p.is_dir() else [p])]
    results = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:  # a run killed mid-write
            warnings.warn(f"skipping {f}: {e}", stacklevel=2)
            continue
        if not isinstance(data, dict) or not all(k in data for k in REQUIRED):
            warnings.warn(f"skipping {f}: not a run result (needs {', '.join(REQUIRED)})", stacklevel=2)
            continue
        results.append(data)
    return results

"""The sweeps' report: markdown tables, ``summary.json``, ``runs.jsonl`` and the plots of every sweep
present (``engram sweep report``). The numbers come from ``stats``, the pictures from ``plots``.

``write_report`` is a pure function of the results, so the committed ``docs/results/tiny/`` is rebuilt
byte for byte from its own ``runs.jsonl`` (tests/sweeps/test_report.py).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np

from engram.fileio import atomic_write_json, atomic_write_text
from engram.sweeps.budgets import get_budget
from engram.sweeps.plots import PLOTS
from engram.sweeps.stats import (REFERENCE, MinimiserInterval, QuadraticFit, by_sweep, delta_vs_reference,
                                 load_results, summarise, sweep_fits)


def _f(x, fmt: str = ".4f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _size(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _fit_lines(fits: dict) -> list[str]:
    if "error" in fits:
        return [f"Fit: not possible ({fits['error']})."]
    lines = []
    if "quadratic" in fits:
        q, b = QuadraticFit(**fits["quadratic"]), MinimiserInterval(**fits["bootstrap"])
        interval = "no replicate had a minimum" if b.low is None else f"95% [{b.low:.3f}, {b.high:.3f}]"
        lines.append(f"Quadratic fit on the per-point means: {q.describe()}; bootstrap over seeds: {interval}, "
                     f"{b.fraction_with_minimum:.0%} of replicates U-shaped (paper: 0.75-0.80).")
    for method, d in fits.get("loglinear", {}).items():
        lines.append(f"{method}: {_f(d['slope_per_doubling'], '+.4f')} ± {_f(d['slope_stderr'])} loss per doubling "
                     f"of the table (R^2={d['r2']:.3f}, {d['n']} runs).")
    return lines


def markdown_tables(results) -> str:
    x_cols = {"allocation": [("rho", lambda r: f"{r['rho']:.2f}")],
              "memory": [("method", lambda r: r["method"]), ("table params", lambda r: _size(r["table_params"]))],
              "ablation": [("group", lambda r: r["group"])],
              "init": [("table init std", lambda r: "-" if r["table_init_std"] is None else f"{r['table_init_std']:g}")]}
    summary, out = summarise(results), []
    for (sweep, budget), runs in by_sweep(results).items():
        cols = x_cols.get(sweep, [])
        try:
            deltas = {d["point"]: d for d in delta_vs_reference(runs, sweep)} if sweep in REFERENCE else {}
            ref = REFERENCE[sweep][0] if sweep in REFERENCE else ""
        except ValueError:
            deltas, ref = {}, "no reference"
        head = ["point", *(c for c, _ in cols), "n", "mean", "std", "min", "max", f"Δ vs {ref}", "paired Δ",
                "paired std", "pairs"]
        out += [f"### {sweep} sweep, budget {budget}", "", "| " + " | ".join(head) + " |",
                "| " + " | ".join("---" for _ in head) + " |"]
        for r in (r for r in summary if (r["sweep"], r["budget"]) == (sweep, budget)):
            d = deltas.get(r["point"], {})
            cells = [r["point"], *(fn(r) for _, fn in cols), str(r["n"]),
                     *(_f(r[k]) for k in ("mean", "std", "min", "max")),
                     _f(d.get("delta"), "+.4f"), _f(d.get("paired_mean"), "+.4f"), _f(d.get("paired_std")),
                     str(d["paired_n"]) if d else "-"]
            out.append("| " + " | ".join(cells) + " |")
        fits = sweep_fits(sweep, runs)
        out += ["", *_fit_lines(fits), ""] if fits else [""]
        if sweep == "init":
            out += init_comparison(runs)
    return "\n".join(out)


def init_comparison(runs: list[dict]) -> list[str]:
    """The init sweep's second table: every init against the reference (the largest std present: N(0, 1),
    DeepSeek's), seed by seed, so a choice made on some seeds can be checked on the others."""
    ref_std = max((r["table_init_std"] for r in runs if r.get("table_init_std") is not None), default=None)
    if ref_std is None:
        return []
    reference = (f"table_std={ref_std:g}", lambda r: r.get("table_init_std") == ref_std)
    rows = [d for d in delta_vs_reference(runs, "init", reference) if d["table_init_std"] is not None]
    if not rows:
        return []
    seeds = sorted({s for d in rows for s in d["paired_diffs"]})
    head = ["point", *(f"seed {s}" for s in seeds), "paired Δ", "paired std", "wins"]
    out = [f"Against the reference init ({reference[0]}), per seed (negative = better than the reference):", "",
           "| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for d in rows:
        diffs = d["paired_diffs"]
        wins = f"{sum(v < 0 for v in diffs.values())}/{len(diffs)}"
        out.append("| " + " | ".join([d["point"], *(_f(diffs.get(s), "+.4f") for s in seeds),
                                      _f(d["paired_mean"], "+.4f"), _f(d["paired_std"]), wins]) + " |")
    return out + [""]


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if math.isnan(x) else float(x)  # strict JSON has no NaN
    return x.item() if isinstance(x, np.generic) else x


def write_report(results, out_dir) -> dict[str, Path]:
    """Plots (one PNG per sweep present), ``summary.json`` (summaries, fits, deltas), ``tables.md`` and
    ``runs.jsonl`` (one line per run)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = by_sweep(results)
    paths, fits, deltas = {}, {}, {}
    for (sweep, budget), runs in parts.items():
        name = sweep if sum(s == sweep for s, _ in parts) == 1 else f"{sweep}_{budget}"
        fits[name] = sweep_fits(sweep, runs)
        try:
            deltas[name] = delta_vs_reference(runs, sweep) if sweep in REFERENCE else []
        except ValueError as e:
            deltas[name] = {"error": str(e)}
        if sweep in PLOTS:
            try:
                paths[name] = PLOTS[sweep](runs, out / f"{name}.png")
            except ValueError as e:  # e.g. an ablation sweep holding only the reference so far
                warnings.warn(f"no {name} plot: {e}", stacklevel=2)
    summary = {"summary": summarise(results), "fits": fits, "deltas": deltas}
    paths["summary"] = atomic_write_json(out / "summary.json", _jsonable(summary), indent=1)
    paths["tables"] = atomic_write_text(out / "tables.md", markdown_tables(results))
    # every run's numbers, one line each (without its eval history), so the tables can be recomputed
    runs = sorted(results, key=lambda r: (str(r["sweep"]), str(r["point"]), r["seed"]))
    paths["runs"] = atomic_write_text(out / "runs.jsonl", "".join(
        json.dumps(_jsonable({k: v for k, v in r.items() if k != "evals"})) + "\n" for r in runs))
    return paths


def report_sweep(budget: str, root: str | Path, out_dir: str | Path) -> tuple[str, dict[str, Path]]:
    """Plots, fits and tables of every finished run of ``budget`` under ``root``: (markdown, paths)."""
    where = Path(root) / get_budget(budget).name
    results = load_results([where])
    if not results:
        raise FileNotFoundError(f"no result.json under {where}; run a sweep first")
    return markdown_tables(results), write_report(results, Path(out_dir))


def format_summary(results: list[dict]) -> str:
    """Per grid point: seeds, mean and spread of the validation loss (printed after a sweep)."""
    rows = summarise(results)
    lines = [f"{'point':<28} {'seeds':>5} {'val_loss':>9} {'std':>7} {'min':>8} {'max':>8}"]
    for r in rows:
        lines.append(f"{r['point']:<28} {r['n']:>5} {r['mean']:>9.4f} {r['std']:>7.4f} {r['min']:>8.4f} {r['max']:>8.4f}")
    return "\n".join(lines)

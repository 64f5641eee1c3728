import json
import math

import numpy as np
import pytest

from engram.experiments.plots import plot_ablation, plot_allocation, plot_memory
from engram.experiments.report import (bootstrap_minimiser, delta_vs_reference, fit_loglinear, fit_quadratic,
                                       load_results, markdown_tables, summarise, write_report)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PARAMS = {"total": 1000, "active": 400, "sparse": 600, "routed_experts": 500, "engram_tables": 100,
          "overencoding_tables": 0}


def run(sweep, point, seed, loss, **extra):
    return {"sweep": sweep, "budget": "tiny", "point": point, "seed": seed, "val_loss": float(loss),
            "val_bpb": loss / 2.7, "tokens": 614400, "train_seconds": 1.0, "params": dict(PARAMS), **extra}


def allocation(curve, seeds=3, noise=0.0, rhos=(0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), seed=1):
    rng = np.random.default_rng(seed)
    return [run("allocation", f"rho={rho:.2f}", s, curve(rho) + noise * rng.standard_normal(), rho=rho)
            for rho in rhos for s in range(seeds)]


def memory(seeds=2):
    out = [run("memory", "none", s, 4.0 + 0.01 * s, method="none", table_params=0) for s in range(seeds)]
    for method, slope in (("engram", -0.02), ("overencoding", -0.01)):
        for rows in (1024, 4096, 16384):
            tp = rows * 64
            out += [run("memory", f"{method}/rows={rows}", s, 3.9 + slope * math.log2(tp / 65536) + 0.01 * s,
                        method=method, table_params=tp) for s in range(seeds)]
    return out


def ablation(seeds=2):
    out = [run("ablation", "full", s, 3.90 + 0.02 * s, variant="full", group="component", layer=1)
           for s in range(seeds)]
    for name, d in (("no-gate", 0.05), ("no-conv", 0.005)):
        out += [run("ablation", name, s, 3.90 + 0.02 * s + d, variant=name, group="component") for s in range(seeds)]
    for layer, d in ((0, 0.03), (2, -0.01), (10, 0.02)):
        out += [run("ablation", f"layer={layer}", s, 3.90 + 0.02 * s + d, variant=f"layer={layer}", group="layer")
                for s in range(seeds)]
    return out


def is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_MAGIC


# ---- fits ----

def test_fit_quadratic_recovers_noiseless_coefficients():
    x = np.linspace(0.3, 1.0, 8)
    fit = fit_quadratic(x, 2.0 * x**2 - 3.12 * x + 5.0)
    assert np.allclose([fit.a, fit.b, fit.c], [2.0, -3.12, 5.0])
    assert fit.minimiser == pytest.approx(0.78) and fit.r2 == pytest.approx(1.0)
    assert fit(0.78) == pytest.approx(5.0 - 2.0 * 0.78**2)


@pytest.mark.parametrize("y", [lambda x: -x**2 + x, lambda x: 0.5 * x + 1.0, lambda x: 0 * x + 3.0])
def test_fit_quadratic_without_interior_minimum(y):
    x = np.linspace(0.3, 1.0, 6)
    fit = fit_quadratic(x, y(x))
    assert fit.minimiser is None and "no interior minimum" in fit.describe()


def test_fit_quadratic_needs_three_distinct_x():
    with pytest.raises(ValueError):
        fit_quadratic([0.5, 0.5, 1.0], [1.0, 1.1, 1.2])


def test_fit_loglinear_recovers_slope():
    tp = np.array([1e5, 1e5, 4e5, 4e5, 1.6e6, 1.6e6, 6.4e6])
    rng = np.random.default_rng(0)
    exact = fit_loglinear(tp, 4.0 - 0.03 * np.log2(tp))
    assert exact.slope_per_doubling == pytest.approx(-0.03) and exact.intercept == pytest.approx(4.0)
    assert exact.r2 == pytest.approx(1.0) and exact.slope_stderr == pytest.approx(0.0, abs=1e-9) and exact.n == 7
    noisy = fit_loglinear(tp, 4.0 - 0.03 * np.log2(tp) + 0.002 * rng.standard_normal(7))
    assert abs(noisy.slope_per_doubling + 0.03) < 3 * noisy.slope_stderr + 1e-3 and noisy.slope_stderr > 0
    with pytest.raises(ValueError):
        fit_loglinear([1e5, 1e5], [1.0, 2.0])


# ---- bootstrap ----

def test_bootstrap_minimiser_finds_known_optimum():
    results = allocation(lambda r: 3.9 + 2.0 * (r - 0.78) ** 2, noise=0.003)
    est, low, high, frac = bootstrap_minimiser(results, n_boot=2000, seed=0)
    assert abs(est - 0.78) < 0.03 and low <= 0.78 <= high and high - low < 0.2
    assert frac == pytest.approx(1.0)
    assert tuple(bootstrap_minimiser(results, n_boot=2000, seed=0)) == (est, low, high, frac)
    assert bootstrap_minimiser(results, n_boot=500, seed=1).low != low


def test_bootstrap_minimiser_on_flat_noise_reports_fraction_below_one():
    results = allocation(lambda r: 3.9, noise=0.01, seed=3)
    est, low, high, frac = bootstrap_minimiser(results, n_boot=1000, seed=0)
    assert 0.0 < frac < 1.0


def test_bootstrap_minimiser_never_u_shaped():
    est, low, high, frac = bootstrap_minimiser(allocation(lambda r: 4.0 - r**2, seeds=1), n_boot=50)
    assert (est, low, high, frac) == (None, None, None, 0.0)


# ---- summaries and deltas ----

def test_summarise_statistics_and_order():
    results = allocation(lambda r: 3.0 + r, seeds=1, rhos=(0.6, 1.0, 0.8))
    results += [run("allocation", "rho=0.80", 1, 3.9, rho=0.8)]
    rows = summarise(results + ablation() + memory())
    alloc = [r for r in rows if r["sweep"] == "allocation"]
    assert [r["rho"] for r in alloc] == [1.0, 0.8, 0.6]
    one, two = alloc[0], alloc[1]
    assert (one["n"], one["std"], one["mean"], one["min"], one["max"]) == (1, 0.0, 4.0, 4.0, 4.0)
    assert two["n"] == 2 and two["mean"] == pytest.approx(3.85)
    assert two["std"] == pytest.approx(np.std([3.8, 3.9], ddof=1))
    assert two["params"]["total"] == 1000 and two["seeds"] == [0, 1]
    assert [r["sweep"] for r in rows] == ["allocation"] * 3 + ["memory"] * 7 + ["ablation"] * 6
    mem = [(r["method"], r["table_params"]) for r in rows if r["sweep"] == "memory"]
    assert mem[0] == ("none", 0) and mem[1:4] == [("engram", 65536), ("engram", 262144), ("engram", 1048576)]
    abl = [r["variant"] for r in rows if r["sweep"] == "ablation"]
    assert abl[0] == "full" and abl[-3:] == ["layer=0", "layer=2", "layer=10"]


def test_delta_vs_reference_pairs_seeds():
    results = [run("ablation", "full", s, loss, variant="full", group="component")
               for s, loss in enumerate([3.90, 4.00, 3.80])]
    # seeds 0, 1 shared with full; seed 5 is not
    results += [run("ablation", "no-gate", s, loss, variant="no-gate", group="component")
                for s, loss in ((0, 3.95), (1, 4.06), (5, 3.70))]
    (row,) = delta_vs_reference(results, "ablation")
    assert row["point"] == "no-gate" and row["delta"] == pytest.approx(np.mean([3.95, 4.06, 3.70]) - 3.9)
    assert row["paired_n"] == 2 and row["paired_seeds"] == [0, 1]
    assert row["paired_mean"] == pytest.approx(0.055)
    assert row["paired_std"] == pytest.approx(np.std([0.05, 0.06], ddof=1))
    assert row["combined_std"] == pytest.approx(math.hypot(np.std([3.95, 4.06, 3.70], ddof=1), 0.1))


def test_delta_vs_reference_single_seed_and_references():
    alloc = allocation(lambda r: 3.0 + r, seeds=1, rhos=(1.0, 0.8))
    (row,) = delta_vs_reference(alloc, "allocation")
    assert row["rho"] == 0.8 and row["delta"] == pytest.approx(-0.2)
    assert row["paired_n"] == 1 and row["paired_mean"] == pytest.approx(-0.2) and row["paired_std"] == 0.0
    mem = delta_vs_reference(memory(), "memory")
    assert len(mem) == 6 and all(r["method"] != "none" and r["paired_n"] == 2 for r in mem)
    unpaired = [run("ablation", "full", 0, 3.9, variant="full"), run("ablation", "x", 1, 4.0, variant="x")]
    (row,) = delta_vs_reference(unpaired, "ablation")
    assert row["paired_n"] == 0 and row["paired_mean"] is None and row["delta"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="reference"):
        delta_vs_reference(alloc[1:], "allocation")


# ---- plots ----

@pytest.mark.parametrize("case", ["u-shape", "one-seed", "no-minimum", "two-points"])
def test_plot_allocation_writes_png(tmp_path, case):
    results = {"u-shape": allocation(lambda r: 3.9 + 2 * (r - 0.78) ** 2, noise=0.003),
               "one-seed": allocation(lambda r: 3.9 + 2 * (r - 0.78) ** 2, seeds=1),
               "no-minimum": allocation(lambda r: 4.0 - r**2, seeds=2, noise=0.001),
               "two-points": allocation(lambda r: 3.9 + r, seeds=2, rhos=(0.8, 1.0))}[case]
    path = plot_allocation(results, tmp_path / "a.png", n_boot=200)
    assert is_png(path)


def test_plot_memory_writes_png_for_one_seed(tmp_path):  # several seeds: test_write_report_produces_files
    assert is_png(plot_memory(memory(seeds=1), tmp_path / "m.png"))


@pytest.mark.parametrize("subset", ["component", "layer", "one-seed"])  # both: test_write_report_produces_files
def test_plot_ablation_writes_png(tmp_path, subset):
    results = ablation(seeds=1 if subset == "one-seed" else 3)
    if subset == "component":
        results = [r for r in results if r["group"] == "component"]
    if subset == "layer":
        results = [r for r in results if r["group"] == "layer"]
    assert is_png(plot_ablation(results, tmp_path / "ab.png"))


# ---- io and report ----

def test_load_results_finds_nested_and_skips_corrupt(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "result.json").write_text(json.dumps(run("ablation", "full", 0, 3.9)))
    (tmp_path / "a" / "b" / "result.json").write_text(json.dumps(run("ablation", "full", 1, 3.8)))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "result.json").write_text('{"sweep": "abl')
    (tmp_path / "a" / "other.json").write_text("{}")
    with pytest.warns(UserWarning, match="skipping"):
        results = load_results([tmp_path])
    assert sorted(r["seed"] for r in results) == [0, 1]
    assert len(load_results(tmp_path / "a" / "result.json")) == 1


def test_write_report_produces_files(tmp_path):
    results = allocation(lambda r: 3.9 + 2 * (r - 0.78) ** 2, noise=0.003) + memory() + ablation()
    paths = write_report(results, tmp_path / "out")
    assert set(paths) == {"allocation", "memory", "ablation", "summary", "tables", "runs"}
    lines = [json.loads(line) for line in paths["runs"].read_text().splitlines()]
    assert len(lines) == len(results) and all("evals" not in r for r in lines)
    for key in ("allocation", "memory", "ablation"):
        assert is_png(paths[key])
    summary = json.loads(paths["summary"].read_text())
    assert {"summary", "fits", "deltas"} <= set(summary)
    assert summary["fits"]["allocation"]["quadratic"]["minimiser"] == pytest.approx(0.78, abs=0.03)
    assert summary["fits"]["memory"]["loglinear"]["engram"]["slope_per_doubling"] == pytest.approx(-0.02, abs=1e-6)
    tables = paths["tables"].read_text()
    assert tables == markdown_tables(results)
    assert tables.count("| ---") >= 3 and "no-gate" in tables and "0.0500" in tables


def test_write_report_separates_budgets(tmp_path):
    small = [dict(r, budget="small") for r in allocation(lambda r: 3.5 + (r - 0.7) ** 2, seeds=1)]
    paths = write_report(allocation(lambda r: 3.9 + (r - 0.8) ** 2, seeds=1) + small, tmp_path)
    assert {"allocation_tiny", "allocation_small"} <= set(paths)
    with pytest.raises(ValueError, match="budget"):
        plot_allocation(allocation(lambda r: 3.9, seeds=1) + small, tmp_path / "x.png")

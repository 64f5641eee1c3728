"""Sweep statistics (engram.sweeps.stats): fits, bootstrap interval, summaries, seed-paired deltas, reading results."""

import json
import math

import numpy as np
import pytest
from research_support import fake_ablation, fake_allocation, fake_memory, fake_run

from engram.sweeps.stats import (bootstrap_minimiser, delta_vs_reference, fit_loglinear, fit_quadratic, load_results,
                                 summarise)


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
    results = fake_allocation(lambda r: 3.9 + 2.0 * (r - 0.78) ** 2, noise=0.003)
    est, low, high, frac = bootstrap_minimiser(results, n_boot=2000, seed=0)
    assert abs(est - 0.78) < 0.03 and low <= 0.78 <= high and high - low < 0.2
    assert frac == pytest.approx(1.0)
    assert tuple(bootstrap_minimiser(results, n_boot=2000, seed=0)) == (est, low, high, frac)
    assert bootstrap_minimiser(results, n_boot=500, seed=1).low != low


def test_bootstrap_minimiser_on_flat_noise_reports_fraction_below_one():
    results = fake_allocation(lambda r: 3.9, noise=0.01, seed=3)
    est, low, high, frac = bootstrap_minimiser(results, n_boot=1000, seed=0)
    assert 0.0 < frac < 1.0


def test_bootstrap_minimiser_never_u_shaped():
    est, low, high, frac = bootstrap_minimiser(fake_allocation(lambda r: 4.0 - r**2, seeds=1), n_boot=50)
    assert (est, low, high, frac) == (None, None, None, 0.0)


# ---- summaries and deltas ----

def test_summarise_statistics_and_order():
    results = fake_allocation(lambda r: 3.0 + r, seeds=1, rhos=(0.6, 1.0, 0.8))
    results += [fake_run("allocation", "rho=0.80", 1, 3.9, rho=0.8)]
    rows = summarise(results + fake_ablation() + fake_memory())
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
    results = [fake_run("ablation", "full", s, loss, variant="full", group="component")
               for s, loss in enumerate([3.90, 4.00, 3.80])]
    # seeds 0, 1 shared with full; seed 5 is not
    results += [fake_run("ablation", "no-gate", s, loss, variant="no-gate", group="component")
                for s, loss in ((0, 3.95), (1, 4.06), (5, 3.70))]
    (row,) = delta_vs_reference(results, "ablation")
    assert row["point"] == "no-gate" and row["delta"] == pytest.approx(np.mean([3.95, 4.06, 3.70]) - 3.9)
    assert row["paired_n"] == 2 and row["paired_seeds"] == [0, 1]
    assert row["paired_mean"] == pytest.approx(0.055)
    assert row["paired_std"] == pytest.approx(np.std([0.05, 0.06], ddof=1))
    assert row["combined_std"] == pytest.approx(math.hypot(np.std([3.95, 4.06, 3.70], ddof=1), 0.1))


def test_delta_vs_reference_single_seed_and_references():
    alloc = fake_allocation(lambda r: 3.0 + r, seeds=1, rhos=(1.0, 0.8))
    (row,) = delta_vs_reference(alloc, "allocation")
    assert row["rho"] == 0.8 and row["delta"] == pytest.approx(-0.2)
    assert row["paired_n"] == 1 and row["paired_mean"] == pytest.approx(-0.2) and row["paired_std"] == 0.0
    mem = delta_vs_reference(fake_memory(), "memory")
    assert len(mem) == 6 and all(r["method"] != "none" and r["paired_n"] == 2 for r in mem)
    unpaired = [fake_run("ablation", "full", 0, 3.9, variant="full"), fake_run("ablation", "x", 1, 4.0, variant="x")]
    (row,) = delta_vs_reference(unpaired, "ablation")
    assert row["paired_n"] == 0 and row["paired_mean"] is None and row["delta"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="reference"):
        delta_vs_reference(alloc[1:], "allocation")


# ---- reading results ----

def test_load_results_finds_nested_and_skips_corrupt(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "result.json").write_text(json.dumps(fake_run("ablation", "full", 0, 3.9)))
    (tmp_path / "a" / "b" / "result.json").write_text(json.dumps(fake_run("ablation", "full", 1, 3.8)))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "result.json").write_text('{"sweep": "abl')
    (tmp_path / "a" / "other.json").write_text("{}")
    with pytest.warns(UserWarning, match="skipping"):
        results = load_results([tmp_path])
    assert sorted(r["seed"] for r in results) == [0, 1]
    assert len(load_results(tmp_path / "a" / "result.json")) == 1

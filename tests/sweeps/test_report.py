"""The sweep report (engram.sweeps.report): files, tables and budgets kept apart."""

import json
from pathlib import Path

import pytest
from research_support import fake_ablation, fake_allocation, fake_memory, is_png

from engram.sweeps.plots import plot_allocation
from engram.sweeps.report import markdown_tables, write_report


def test_write_report_produces_files(tmp_path):
    results = fake_allocation(lambda r: 3.9 + 2 * (r - 0.78) ** 2, noise=0.003) + fake_memory() + fake_ablation()
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
    small = [dict(r, budget="small") for r in fake_allocation(lambda r: 3.5 + (r - 0.7) ** 2, seeds=1)]
    paths = write_report(fake_allocation(lambda r: 3.9 + (r - 0.8) ** 2, seeds=1) + small, tmp_path)
    assert {"allocation_tiny", "allocation_small"} <= set(paths)
    with pytest.raises(ValueError, match="budget"):
        plot_allocation(fake_allocation(lambda r: 3.9, seeds=1) + small, tmp_path / "x.png")


COMMITTED = Path(__file__).parents[2] / "docs" / "results" / "tiny"


def test_report_reproduces_the_committed_tiny_results(tmp_path):
    """`engram sweep report --budget tiny` is a function of the results alone: fed the committed runs.jsonl, it
    rewrites docs/results/tiny byte for byte. PNG bytes depend on the matplotlib version, so only the text
    files are compared here (the PNGs were compared when the sweeps moved; see the commit message)."""
    results = [json.loads(line) for line in (COMMITTED / "runs.jsonl").read_text().splitlines() if line.strip()]
    write_report(results, tmp_path)
    for name in ("summary.json", "tables.md", "runs.jsonl"):
        assert (tmp_path / name).read_bytes() == (COMMITTED / name).read_bytes(), f"{name} differs from {COMMITTED}"

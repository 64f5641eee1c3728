"""The sweep report (engram.sweeps.report): files, tables and budgets kept apart."""

import json
from pathlib import Path

import pytest
from research_support import fake_ablation, fake_allocation, fake_init, fake_memory, is_png

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


def test_init_sweep_report_pairs_every_init_with_the_twin_and_the_reference(tmp_path):
    """The init sweep: deltas against the pure-MoE twin, a per-seed table against N(0, 1)
    (so a choice made on seeds 0-2 can be read off on 3-5), and the plot."""
    results = fake_init(seeds=range(6))
    paths = write_report(results, tmp_path)
    assert is_png(paths["init"])
    deltas = {d["point"]: d for d in json.loads(paths["summary"].read_text())["deltas"]["init"]}
    assert set(deltas) == {"table_std=1", "table_std=0.02", "table_std=0"}
    assert deltas["table_std=0.02"]["paired_mean"] == pytest.approx(-0.05, abs=0.001)
    assert deltas["table_std=0.02"]["paired_n"] == 6
    tables = paths["tables"].read_text()
    rows = [line for line in tables.splitlines() if line.startswith("| table_std=")]
    assert [r.split(" | ")[0] for r in rows[:3]] == ["| table_std=1", "| table_std=0.02", "| table_std=0"]
    per_seed = next(r for r in rows[3:] if r.startswith("| table_std=0.02 "))
    cells = [c.strip() for c in per_seed.strip("|").split("|")]
    assert cells[1:7] == ["-0.0200"] * 6 and cells[-1] == "6/6"  # -0.05 against -0.03, every seed
    assert "seed 5" in tables and "Against the reference init (table_std=1)" in tables


def test_write_report_separates_budgets(tmp_path):
    small = [dict(r, budget="small") for r in fake_allocation(lambda r: 3.5 + (r - 0.7) ** 2, seeds=1)]
    paths = write_report(fake_allocation(lambda r: 3.9 + (r - 0.8) ** 2, seeds=1) + small, tmp_path)
    assert {"allocation_tiny", "allocation_small"} <= set(paths)
    with pytest.raises(ValueError, match="budget"):
        plot_allocation(fake_allocation(lambda r: 3.9, seeds=1) + small, tmp_path / "x.png")


RESULTS = Path(__file__).parents[2] / "docs" / "results"


@pytest.mark.parametrize("name", ["tiny", "tiny-v0.2", "tiny-v0.2-confirm", "init"])
def test_report_reproduces_the_committed_results(tmp_path, name):
    """`engram sweep report --budget tiny` is a function of the results alone: fed the committed runs.jsonl, it
    rewrites docs/results/tiny (the allocation, memory and ablation sweeps) and docs/results/init (the init
    sweep) byte for byte. PNG bytes depend on the matplotlib version, so only the text files are compared."""
    committed = RESULTS / name
    results = [json.loads(line) for line in (committed / "runs.jsonl").read_text().splitlines() if line.strip()]
    paths = write_report(results, tmp_path)
    assert {p.name for p in paths.values()} == {p.name for p in committed.iterdir()}
    for file in ("tables.md", "runs.jsonl"):
        assert (tmp_path / file).read_bytes() == (committed / file).read_bytes(), f"{file} differs from {committed}"
    # the fits' last digits depend on the CPU's floating point (numpy's least squares): equal to 1e-9
    got, want = (json.loads((d / "summary.json").read_text()) for d in (tmp_path, committed))
    assert _close(got, want)


def _close(got, want, path="summary.json") -> bool:
    """Nested JSON equal, numbers to 1e-9 (relative)."""
    assert type(got) is type(want), path
    if isinstance(want, dict):
        assert got.keys() == want.keys(), path
        return all(_close(got[k], want[k], f"{path}.{k}") for k in want)
    if isinstance(want, list):
        assert len(got) == len(want), path
        return all(_close(g, w, f"{path}[{i}]") for i, (g, w) in enumerate(zip(got, want)))
    if isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-9, abs=1e-12), path
    else:
        assert got == want, path
    return True

"""Sweep plots (engram.sweeps.plots): every sweep draws a PNG, including its degenerate cases."""

import pytest
from research_support import fake_ablation, fake_allocation, fake_memory, is_png

from engram.sweeps.plots import plot_ablation, plot_allocation, plot_memory


@pytest.mark.parametrize("case", ["u-shape", "one-seed", "no-minimum", "two-points"])
def test_plot_allocation_writes_png(tmp_path, case):
    results = {"u-shape": fake_allocation(lambda r: 3.9 + 2 * (r - 0.78) ** 2, noise=0.003),
               "one-seed": fake_allocation(lambda r: 3.9 + 2 * (r - 0.78) ** 2, seeds=1),
               "no-minimum": fake_allocation(lambda r: 4.0 - r**2, seeds=2, noise=0.001),
               "two-points": fake_allocation(lambda r: 3.9 + r, seeds=2, rhos=(0.8, 1.0))}[case]
    path = plot_allocation(results, tmp_path / "a.png", n_boot=200)
    assert is_png(path)


def test_plot_memory_writes_png_for_one_seed(tmp_path):  # several seeds: test_write_report_produces_files
    assert is_png(plot_memory(fake_memory(seeds=1), tmp_path / "m.png"))


@pytest.mark.parametrize("subset", ["component", "layer", "one-seed"])  # both: test_write_report_produces_files
def test_plot_ablation_writes_png(tmp_path, subset):
    results = fake_ablation(seeds=1 if subset == "one-seed" else 3)
    if subset == "component":
        results = [r for r in results if r["group"] == "component"]
    if subset == "layer":
        results = [r for r in results if r["group"] == "layer"]
    assert is_png(plot_ablation(results, tmp_path / "ab.png"))

"""Sweep plans (engram.sweeps.plan): the grids, every variant trains a step, --dry-run."""

import dataclasses

import pytest
import torch

from engram.cli import main as cli
from engram.model.accounting import count_parameters
from engram.model.transformer import EngramLM
from engram.sweeps.plan import plan
from engram.train.optim import Optimizers


def test_plans_cover_their_grids():
    alloc = plan("allocation", "tiny", seeds=3)
    assert len(alloc) == 21 and len({(r.point, r.seed) for r in alloc}) == 21
    assert [r.seed for r in alloc[:7]] == [0] * 7  # every point gets a first seed before any gets a second
    assert {r.run.train.seed for r in alloc} == {0, 1, 2}
    memory = plan("memory", "tiny", seeds=1)
    methods = {r.info["method"] for r in memory}
    assert methods == {"none", "engram", "overencoding"}
    for method in ("engram", "overencoding"):  # equal memory at every grid point
        sizes = sorted(r.info["table_params"] for r in memory if r.info["method"] == method)
        assert sizes == sorted(r.info["table_params"] for r in memory if r.info["method"] == "engram")
    ablation = plan("ablation", "tiny", seeds=1)
    full = next(r for r in ablation if r.info["variant"] == "full")
    for r in ablation:  # a fixed Engram table budget: within 2% of the reference's table parameters
        assert abs(r.info["table_params"] - full.info["table_params"]) <= 0.02 * full.info["table_params"]
    variants = {r.info["variant"] for r in ablation}
    assert {"no-compression", "no-gate", "no-short-conv", "+4-grams", "G=2", "G=2-shared-key",
            "layer=0", "layer=2", "layer=3"} <= variants
    with pytest.raises(ValueError, match="may not change the model"):
        plan("allocation", "tiny", overrides=["model.backbone.d_model=64"])
    with pytest.raises(ValueError, match="unknown sweep"):
        plan("scaling", "tiny")
    with pytest.raises(ValueError, match="seeds"):
        plan("allocation", "tiny", seeds=0)


@pytest.mark.parametrize("sweep", ["memory", "ablation", "init"])
def test_every_variant_builds_and_trains_a_step(budget_file, sweep):
    for planned in plan(sweep, budget_file, seeds=1):
        model_config = planned.run.model
        assert count_parameters(model_config).total > 0
        torch.manual_seed(0)
        model = EngramLM(model_config, sparse_tables=True)
        optimizers = Optimizers(model, planned.run.train)
        ids = torch.randint(0, model_config.backbone.vocab_size, (2, 16))
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizers.step()
        assert torch.isfinite(loss), planned.point
        changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
        assert changed, planned.point
        if planned.info.get("table_params"):
            assert any("embedding.weight" in n or "table" in n for n in changed), (planned.point, changed)


def test_cli_dry_run_and_errors(budget_file, capsys):
    assert cli(["sweep", "allocation", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "rho (asked)" in out and "21 runs" in out
    assert cli(["sweep", "ablation", "--budget", budget_file, "--dry-run"]) == 0
    assert "no-gate" in capsys.readouterr().out
    assert cli(["sweep", "allocation", "--budget", "enormous"]) == 2
    assert "known budgets" in capsys.readouterr().err


def test_first_seed_gives_fresh_seeds_with_the_same_grid():
    """Choose on seeds 0-2, confirm on 3-5 (the table-init study's protocol): same points, other seeds and batches."""
    choose = plan("ablation", "tiny", seeds=3)
    confirm = plan("ablation", "tiny", seeds=3, first_seed=3)
    assert sorted({r.seed for r in choose}) == [0, 1, 2] and sorted({r.seed for r in confirm}) == [3, 4, 5]
    assert [r.point for r in choose] == [r.point for r in confirm]
    assert all(r.run.train.seed == r.seed for r in confirm)
    assert [r.run.model for r in choose if r.seed == 0] == [r.run.model for r in confirm if r.seed == 3]
    import pytest
    with pytest.raises(ValueError, match="--first-seed must be an int >= 0"):
        plan("ablation", "tiny", seeds=1, first_seed=-1)


def test_init_sweep_pairs_the_twin_and_three_table_inits():
    """The table-init study (docs/RESULTS.md §4): the pure-MoE twin and the rho = 0.8 Engram model with N(0, 1), N(0, 0.02)
    and zero tables; the Engram models differ in the table init only, at equal P_tot and P_act."""
    runs = plan("init", "tiny", seeds=2)
    assert [r.point for r in runs[:4]] == ["pure-moe", "table_std=1", "table_std=0.02", "table_std=0"]
    assert len(runs) == 8 and [r.seed for r in runs] == [0] * 4 + [1] * 4
    twin, *engrams = runs[:4]
    assert twin.run.model.engram is None and twin.info["table_init_std"] is None
    assert [r.run.model.engram.table_init_std for r in engrams] == [1.0, 0.02, 0.0]
    base = dataclasses.replace(engrams[0].run.model.engram, table_init_std=0.0)
    assert all(dataclasses.replace(r.run.model.engram, table_init_std=0.0) == base for r in engrams)
    counts = [count_parameters(r.run.model) for r in runs[:4]]
    assert len({c.active for c in counts}) == 1
    assert max(c.total for c in counts) - min(c.total for c in counts) < 0.001 * counts[0].total
    assert engrams[0].info["rho"] == pytest.approx(0.8, abs=0.01)


def test_points_select_part_of_the_grid(capsys):
    """--points: confirm a choice and its reference on fresh seeds without rerunning the whole grid."""
    runs = plan("init", "tiny", seeds=3, first_seed=3, points=["pure-moe", "table_std=0"])
    assert [(r.point, r.seed) for r in runs] == [(p, s) for s in (3, 4, 5) for p in ("pure-moe", "table_std=0")]
    with pytest.raises(ValueError, match=r"unknown point\(s\) \['x'\].*its points: \['pure-moe'"):
        plan("init", "tiny", points=["x"])
    assert cli(["sweep", "init", "--dry-run", "--first-seed", "3", "--points", "table_std=1"]) == 0
    out = capsys.readouterr().out
    assert "table_std=1 " in out and "table_std=0.02" not in out and "3 runs" in out

"""The sweep runner: plans, resumable and parallel-safe execution, and every variant trains a step."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from support import write_corpus

import engram.train
from engram.cli import main as cli
from engram.config import BackboneConfig, DataConfig, EngramConfig, ModelConfig, MoEConfig, RunConfig, TrainConfig
from engram.experiments import sweep as sw
from engram.model.accounting import count_parameters
from engram.experiments.budgets import budget_from_dict, budget_to_dict, get_budget
from engram.model.transformer import EngramLM
from engram.train.optim import Optimizers


@pytest.fixture(scope="module")
def budget_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    corpus = write_corpus(root / "corpus")
    backbone = BackboneConfig(vocab_size=300, n_layers=3, d_model=32, n_heads=2, ffn_hidden=96, max_seq_len=32,
                              moe=MoEConfig(n_routed_experts=6, top_k=2, expert_hidden=16, first_dense_layers=1))
    run = RunConfig(model=ModelConfig(backbone=backbone),
                    data=DataConfig(source=str(corpus), vocab_size=300, val_fraction=0.2, cache_dir=str(root / "cache")),
                    train=TrainConfig(max_steps=2, batch_size=2, seq_len=16, warmup_steps=1, eval_every=2,
                                      eval_batches=1, log_every=1, save_every=2, device="cpu"))
    engram = EngramConfig(engram_vocab_size=[40, 40], n_embed_per_ngram=8, n_head_per_ngram=2, layer_ids=[1],
                          pad_id=0, kernel_size=2)
    data = {"name": "unit", "description": "unit test", "base": run.to_dict(), "engram": engram.to_dict(),
            "rhos": [1.0, 0.5], "memory_rows": [32, 64], "ablation_rho": 0.5, "layer_sweep": [0, 1, 2], "seeds": 1}
    path = root / "unit.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_budget_file_round_trip(budget_file, tmp_path):
    budget = get_budget(budget_file)
    assert budget.name == "unit" and budget.rhos == (1.0, 0.5)
    again = budget_from_dict(budget_to_dict(budget))
    assert again.base_run() == budget.base_run() and again.engram_template() == budget.engram_template()
    tiny = budget_to_dict(get_budget("tiny"))
    assert budget_from_dict(json.loads(json.dumps(tiny))).base_run() == get_budget("tiny").base_run()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"name": "x", "rhos": [1.0]}))
    with pytest.raises(ValueError, match="missing field"):
        get_budget(str(bad))
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        get_budget(str(bad))
    with pytest.raises(FileNotFoundError):
        get_budget(str(tmp_path / "absent.json"))
    with pytest.raises(ValueError, match="known budgets"):
        get_budget("enormous")


def test_plans_cover_their_grids():
    alloc = sw.plan("allocation", "tiny", seeds=3)
    assert len(alloc) == 21 and len({(r.point, r.seed) for r in alloc}) == 21
    assert [r.seed for r in alloc[:7]] == [0] * 7  # every point gets a first seed before any gets a second
    assert {r.run.train.seed for r in alloc} == {0, 1, 2}
    memory = sw.plan("memory", "tiny", seeds=1)
    methods = {r.info["method"] for r in memory}
    assert methods == {"none", "engram", "overencoding"}
    for method in ("engram", "overencoding"):  # equal memory at every grid point
        sizes = sorted(r.info["table_params"] for r in memory if r.info["method"] == method)
        assert sizes == sorted(r.info["table_params"] for r in memory if r.info["method"] == "engram")
    ablation = sw.plan("ablation", "tiny", seeds=1)
    full = next(r for r in ablation if r.info["variant"] == "full")
    for r in ablation:  # a fixed Engram table budget: within 2% of the reference's table parameters
        assert abs(r.info["table_params"] - full.info["table_params"]) <= 0.02 * full.info["table_params"]
    variants = {r.info["variant"] for r in ablation}
    assert {"no-compression", "no-gate", "no-short-conv", "+4-grams", "G=2", "G=2-shared-key",
            "layer=0", "layer=2", "layer=3"} <= variants
    with pytest.raises(ValueError, match="may not change the model"):
        sw.plan("allocation", "tiny", overrides=["model.backbone.d_model=64"])
    with pytest.raises(ValueError, match="unknown sweep"):
        sw.plan("scaling", "tiny")
    with pytest.raises(ValueError, match="seeds"):
        sw.plan("allocation", "tiny", seeds=0)


@pytest.mark.parametrize("sweep", ["memory", "ablation"])
def test_every_variant_builds_and_trains_a_step(budget_file, sweep):
    for planned in sw.plan(sweep, budget_file, seeds=1):
        model_config = planned.run.model
        assert count_parameters(model_config).total > 0
        torch.manual_seed(0)
        model = EngramLM(model_config)
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


def test_sweep_runs_resumes_and_skips(budget_file, tmp_path, monkeypatch):
    results = sw.run_sweep("allocation", budget_file, seeds=1, root=tmp_path, progress=False)
    assert sorted(r["point"] for r in results) == ["rho=0.500", "rho=1.000"]
    for r in results:
        assert r["sweep"] == "allocation" and r["budget"] == "unit" and r["seed"] == 0
        assert r["val_loss"] > 0 and r["params"]["total"] > 0 and "rho" in r
        directory = tmp_path / "unit" / "allocation" / r["point"] / "seed0"
        assert (directory / "plan.json").exists() and not (directory / ".lock").exists()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(engram.train, "train", no_training)
    again = sw.run_sweep("allocation", budget_file, seeds=1, root=tmp_path, progress=False)
    assert sorted(r["val_loss"] for r in again) == sorted(r["val_loss"] for r in results)
    # the ablation's reference is the allocation point at its rho: reused, not retrained
    full = next(r for r in sw.plan("ablation", budget_file, seeds=1) if r.point == "full")
    record = sw.execute(full, tmp_path, progress=False)
    assert record["reused_from"].endswith("rho=0.500/seed0") and record["variant"] == "full"
    assert record["val_loss"] == next(r["val_loss"] for r in results if r["point"] == "rho=0.500")
    report = tmp_path / "report"
    with pytest.warns(UserWarning, match="no ablation plot"):  # only the reused reference so far
        assert cli(["sweep", "report", "--budget", budget_file, "--out", str(tmp_path),
                    "--report-dir", str(report)]) == 0
    summary = json.loads((report / "summary.json").read_text())
    assert {row["point"] for row in summary["summary"]} >= {"rho=1.000", "rho=0.500", "full"}
    assert "rho=0.500" in (report / "tables.md").read_text()
    with pytest.raises(ValueError, match="different config"):  # a changed plan never mixes with old results
        sw.run_sweep("allocation", budget_file, seeds=1, root=tmp_path, overrides=["train.lr=0.01"], progress=False)


def test_failed_run_is_recorded_and_the_sweep_goes_on(budget_file, tmp_path, monkeypatch):
    real = engram.train.train

    def flaky(run, out_dir, **kwargs):
        if run.model.engram is not None:
            raise RuntimeError("boom")
        return real(run, out_dir=out_dir, **kwargs)

    monkeypatch.setattr(engram.train, "train", flaky)
    results = sw.run_sweep("allocation", budget_file, seeds=1, root=tmp_path, progress=False)
    assert [r["point"] for r in results] == ["rho=1.000"]
    failed = tmp_path / "unit" / "allocation" / "rho=0.500" / "seed0" / "failed.json"
    assert "boom" in json.loads(failed.read_text())["error"]
    monkeypatch.setattr(engram.train, "train", real)
    results = sw.run_sweep("allocation", budget_file, seeds=1, root=tmp_path, progress=False)
    assert len(results) == 2 and not failed.exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_locks_claim_runs_and_stale_locks_are_taken_over(budget_file, tmp_path):
    planned = sw.plan("allocation", budget_file, seeds=1)[0]
    directory = planned.directory(tmp_path)
    directory.mkdir(parents=True)
    lock = directory / ".lock"
    lock.write_text(f"{socket.gethostname()} {os.getppid()}")  # a live process holds it
    assert sw.execute(planned, tmp_path, progress=False) is None
    assert sw.result_of(planned, tmp_path) is None
    lock.write_text(f"{socket.gethostname()} {_dead_pid()}")  # its process died mid-run
    record = sw.execute(planned, tmp_path, progress=False)
    assert record is not None and record["point"] == planned.point and not lock.exists()


@pytest.mark.slow
def test_two_workers_share_one_sweep(budget_file, tmp_path):
    results = sw.run_sweep("allocation", budget_file, seeds=2, root=tmp_path, workers=2, threads=1, progress=False)
    assert len(results) == 4
    assert not list(tmp_path.rglob(".lock"))
    for r in results:  # each run trained once: its metrics log holds one history
        log = tmp_path / "unit" / "allocation" / r["point"] / f"seed{r['seed']}" / "train" / "metrics.jsonl"
        steps = [json.loads(line)["step"] for line in log.read_text().splitlines() if '"train"' in line]
        assert steps == [1, 2]


def test_cli_dry_run_and_errors(budget_file, capsys):
    assert cli(["sweep", "allocation", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "rho (asked)" in out and "21 runs" in out
    assert cli(["sweep", "ablation", "--budget", budget_file, "--dry-run"]) == 0
    assert "no-gate" in capsys.readouterr().out
    assert cli(["sweep", "allocation", "--budget", "enormous"]) == 2
    assert "known budgets" in capsys.readouterr().err

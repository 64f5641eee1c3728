"""Files written by engram 0.1 (``tests/fixtures/v0_1``, made by ``make_fixtures.py`` at commit 759ad6a)
still load: a checkpoint (evaluates to its loss and resumes to the losses 0.1 trained), a checkpoint
written by two ranks with sharded tables, an exported tables directory, a sweep plan and a budget file.

The numbers in ``expected.json`` were computed by 0.1 on one machine; floating point differs between CPU
models, so they are compared with a tolerance here (on the machine that wrote them they agree exactly).
"""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from engram.config import DataConfig, RunConfig
from engram.data import prepare_data
from engram.storage import DiskStore, open_tables
from engram.train import evaluate, load_checkpoint, train

FIXTURES = Path(__file__).parent / "fixtures" / "v0_1"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
PROBE = torch.tensor(EXPECTED["probe_ids"])


def _data(cache_dir) -> DataConfig:
    return DataConfig(source=str(FIXTURES / "corpus"), vocab_size=300, val_fraction=0.25, cache_dir=str(cache_dir))


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * max(1.0, abs(b))


def test_checkpoint_loads_with_its_config_migrated():
    ckpt = load_checkpoint(FIXTURES / "run")
    assert ckpt.step == EXPECTED["step"]
    model = ckpt.run_config.model
    assert model.branches == 2 and "hc_mult" not in model.engram.to_dict()  # 0.1 wrote G twice
    # the BPE trained to 300 ids came out with 299 on this small corpus; 0.1 copied that into the config
    assert model.overencoding is not None and model.backbone.vocab_size == 299
    with torch.no_grad():
        logits = ckpt.model.eval()(PROBE).logits
    assert _close(float(logits.double().sum()), EXPECTED["probe_logits_sum"], 1e-4)
    torch.testing.assert_close(logits[0, -1, :8], torch.tensor(EXPECTED["probe_logits_last"]), atol=1e-5, rtol=1e-4)


def test_checkpoint_evaluates_to_the_loss_0_1_measured(tmp_path):
    ckpt = load_checkpoint(FIXTURES / "run")
    tc = ckpt.run_config.train
    prepared = prepare_data(_data(tmp_path / "cache"))
    result = evaluate(ckpt.model, prepared.val, tc.batch_size, tc.seq_len, tc.eval_batches, torch.device("cpu"))
    assert _close(result["val_loss"], EXPECTED["val_loss_at_step_2"])


def test_checkpoint_resumes_to_the_losses_0_1_trained(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES / "run", run_dir)
    stored = load_checkpoint(run_dir).run_config
    run = RunConfig(model=stored.model, data=_data(tmp_path / "cache"),
                    train=dataclasses.replace(stored.train, out_dir=str(run_dir)))
    torch.set_num_threads(1)
    result = train(run, progress=False)
    losses = {str(r["step"]): r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "train"}
    for step in ("3", "4"):
        assert _close(losses[step], EXPECTED["train_loss"][step]), (step, losses[step])
    assert _close(result.final_eval["val_loss"], EXPECTED["final_val_loss"])


def test_sharded_checkpoint_loads_in_one_process():
    ckpt = load_checkpoint(FIXTURES / "sharded_run")
    assert ckpt.sharded and ckpt.step == 2
    with torch.no_grad():
        logits = ckpt.model.eval()(PROBE).logits
    assert _close(float(logits.double().sum()), EXPECTED["sharded_probe_logits_sum"], 1e-4)
    assert set(ckpt.optimizer_state()) >= {"dense", "tables"}


def test_exported_tables_hold_the_checkpoint_rows():
    ckpt = load_checkpoint(FIXTURES / "run")
    model = ckpt.model
    manifest = open_tables(FIXTURES / "tables", model.hasher, verify="sha256")
    assert sorted(manifest.layers) == [1]
    table = model.engram_layers[1].embedding.weight.detach()
    store = DiskStore.from_entry(manifest.layers[1])
    rows = torch.arange(table.shape[0])
    torch.testing.assert_close(store.gather(rows), table, atol=0, rtol=0)


def test_sweep_plan_and_budget_files_still_match():
    from engram.sweeps import runner as sw  # runner.plan is plan.plan; check_plan is the runner's
    from engram.sweeps.budgets import get_budget

    stored = json.loads((FIXTURES / "plan.json").read_text())
    planned = next(r for r in sw.plan("allocation", "tiny", 1) if r.point == EXPECTED["plan_point"])
    # 0.1's model attended across packed documents: its config loads with that (document_mask False),
    # and is otherwise today's plan for the point
    old = RunConfig.from_dict(stored["run"])
    assert old.model.backbone.document_mask is False
    assert dataclasses.replace(old, model=dataclasses.replace(old.model, backbone=dataclasses.replace(
        old.model.backbone, document_mask=True))) == planned.run
    directory = FIXTURES  # holds plan.json: check_plan refuses a directory whose plan differs
    other = next(r for r in sw.plan("allocation", "tiny", 1) if r.point != EXPECTED["plan_point"])
    for run in (other, planned):  # the planned point too: its model changed (document-masked attention)
        with pytest.raises(ValueError, match="different config.*use another --out or remove the directory"):
            sw.check_plan(run, directory)
    # the same config, but 0.1 drew its initial weights otherwise (per-weight streams): the run is refused, saying
    # what to do, rather than mixed with runs whose seeds pair differently
    unmasked = dataclasses.replace(planned, run=old)
    with pytest.raises(ValueError, match="another initialisation scheme.*use another --out or remove the directory"):
        sw.check_plan(unmasked, directory)

    budget = get_budget(str(FIXTURES / "budget.json"))
    tiny = get_budget("tiny")
    base = budget.base_run()
    assert base.model.backbone.document_mask is False  # a 0.1 budget keeps the attention it was written for
    base = dataclasses.replace(base, model=dataclasses.replace(base.model, backbone=dataclasses.replace(
        base.model.backbone, document_mask=True)))
    assert base == tiny.base_run() and budget.engram_template() == tiny.engram_template()
    assert (budget.rhos, budget.memory_rows, budget.seeds) == (tiny.rhos, tiny.memory_rows, tiny.seeds)

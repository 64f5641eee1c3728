"""Files written by the package before it was regrouped by owner (``tests/fixtures/v0_2``, made by
``make_fixtures.py`` at commit 30ed242) still load: an ``engram finetune`` run resumes to the losses that
version trained, its adapter folder attaches to the base and computes what it computed, a checkpoint
with the flat ``TrainConfig`` loads, and an ``export-hf`` folder loads through transformers.

The numbers in ``expected.json`` were computed on one machine; floating point differs between CPU
models, so they are compared with a tolerance here (on the machine that wrote them they agree exactly).
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from engram.config import DataConfig, EngramConfig, TrainConfig  # noqa: E402
from engram.train import load_checkpoint  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "v0_2"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
PROBE = torch.tensor(EXPECTED["probe_ids"])


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    return abs(a - b) <= rel * max(1.0, abs(b))


def _finetune_config(cache_dir):
    from engram.hf.finetune import FinetuneConfig
    from engram.hf.retrofit import EngramAdapterConfig

    return FinetuneConfig(
        base=str(FIXTURES / "base"),
        data=DataConfig(source=str(FIXTURES.parent / "v0_1" / "corpus"), val_fraction=0.25, cache_dir=str(cache_dir)),
        adapter=EngramAdapterConfig(engram=EngramConfig(engram_vocab_size=[101, 103], n_embed_per_ngram=16,
                                                        n_head_per_ngram=2, pad_id=None, layer_ids=[1])),
        train=TrainConfig(max_steps=4, batch_size=2, seq_len=16, lr=1e-2, warmup_steps=1, eval_every=2,
                          eval_batches=2, log_every=1, save_every=2))


def test_a_finetune_run_resumes_to_the_losses_it_trained(tmp_path):
    from engram.hf.finetune import finetune

    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURES / "finetune_run", run_dir)
    torch.set_num_threads(1)
    steps = {}
    result = finetune(_finetune_config(tmp_path / "cache"), run_dir, progress=False,
                      on_step=lambda step, m: steps.__setitem__(step, m["loss"]))
    assert sorted(steps) == [3, 4]  # it resumed at step 2, not from scratch
    for step in (3, 4):
        assert _close(steps[step], EXPECTED["finetune_train_loss"][str(step)]), (step, steps[step])
    assert _close(result["val_loss"], EXPECTED["finetune_final_val_loss"])
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if r["kind"] == "train"] == [1, 2, 3, 4]


def test_the_adapter_folder_attaches_and_computes_what_it_computed(tmp_path):
    from engram.hf.finetune import load_base
    from engram.hf.retrofit import EngramAdapter

    model, tok = load_base(_finetune_config(tmp_path / "cache"))
    adapter = EngramAdapter.load(model, FIXTURES / "finetune_run" / "checkpoints" / "step_0000002" / "adapter", tok)
    assert adapter.engram_layers[1].value_proj.weight.abs().sum() > 0  # trained: no longer the identity
    with torch.no_grad():
        logits = model(input_ids=PROBE).logits
    assert _close(float(logits.double().sum()), EXPECTED["adapter_probe_logits_sum"], 1e-4)
    torch.testing.assert_close(logits[0, -1, :8], torch.tensor(EXPECTED["adapter_probe_logits_last"]),
                               atol=1e-5, rtol=1e-4)


def test_a_checkpoint_with_the_flat_train_config_loads():
    ckpt = load_checkpoint(FIXTURES / "run")
    stored = json.loads((FIXTURES / "run" / "checkpoints" / "step_0000002" / "run_config.json").read_text())
    assert "lr" in stored["train"]  # written flat, before TrainConfig had sections
    assert ckpt.run_config.train == TrainConfig.from_dict(stored["train"])
    assert ckpt.run_config.train.max_steps == 2 and ckpt.run_config.train.tokens_per_step == 32
    with torch.no_grad():
        logits = ckpt.model.eval()(PROBE).logits
    assert _close(float(logits.double().sum()), EXPECTED["run_probe_logits_sum"], 1e-4)
    torch.testing.assert_close(logits[0, -1, :8], torch.tensor(EXPECTED["run_probe_logits_last"]),
                               atol=1e-5, rtol=1e-4)


def test_an_hf_export_loads_through_transformers():
    import transformers

    import engram.hf  # noqa: F401  (registers model_type "engram")

    model = transformers.AutoModelForCausalLM.from_pretrained(FIXTURES / "hf_export").eval()
    with torch.no_grad():
        logits = model(input_ids=PROBE).logits
    assert _close(float(logits.double().sum()), EXPECTED["run_probe_logits_sum"], 1e-4)
    torch.testing.assert_close(logits[0, -1, :8], torch.tensor(EXPECTED["run_probe_logits_last"]),
                               atol=1e-5, rtol=1e-4)

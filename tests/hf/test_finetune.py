"""engram finetune: only the adapter trains, the run directory works as engram train's, and a killed run
resumes bit-identically."""

import json

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402

from support import tiny_run  # noqa: E402
from engram.cli import main  # noqa: E402
from engram.config import DataConfig, EngramConfig, TrainConfig  # noqa: E402
from engram.data import prepare_data  # noqa: E402
from engram.hf import hf_tokenizer  # noqa: E402
from engram.hf.finetune import FinetuneConfig, finetune  # noqa: E402
from engram.hf.retrofit import EngramAdapterConfig  # noqa: E402


@pytest.fixture(scope="module")
def base_dir(corpus_dir, cache_dir, tmp_path_factory):
    data = prepare_data(tiny_run(corpus_dir, cache_dir, tmp_path_factory.mktemp("ft")).data)
    folder = tmp_path_factory.mktemp("base")
    tok = hf_tokenizer(data.tokenizer)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def config(base_dir, corpus_dir, cache_dir, **train):
    settings = dict(max_steps=6, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=1, eval_every=3, eval_batches=2,
                    log_every=1, save_every=2)
    settings.update(train)
    return FinetuneConfig(base=str(base_dir), data=DataConfig(source=str(corpus_dir), val_fraction=0.2,
                                                              cache_dir=str(cache_dir)),
                          adapter=EngramAdapterConfig(engram=EngramConfig(
                              engram_vocab_size=[101, 103], n_embed_per_ngram=16, n_head_per_ngram=2, pad_id=None,
                              layer_ids=[1])),
                          train=TrainConfig(**settings))


def test_only_the_adapter_learns_and_a_killed_run_resumes_exactly(base_dir, corpus_dir, cache_dir, tmp_path):
    whole = finetune(config(base_dir, corpus_dir, cache_dir), tmp_path / "whole", progress=False)
    assert whole["steps"] == 6 and whole["val_loss"] < 10 and whole["adapter_parameters"] > 0

    class Killed(Exception):
        pass

    def kill_at_3(step, metrics):
        if step == 3:
            raise Killed

    with pytest.raises(Killed):
        finetune(config(base_dir, corpus_dir, cache_dir), tmp_path / "split", progress=False, on_step=kill_at_3)
    resumed = finetune(config(base_dir, corpus_dir, cache_dir), tmp_path / "split", progress=False)
    assert resumed["val_loss"] == whole["val_loss"]
    lines = [json.loads(l) for l in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines if l["kind"] == "train"] == [1, 2, 3, 4, 5, 6]

    # the base's weights are untouched: the adapter alone changed
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    from engram.hf.finetune import load_base
    from engram.hf.retrofit import EngramAdapter
    model, tok = load_base(config(base_dir, corpus_dir, cache_dir))
    adapter = EngramAdapter.load(model, tmp_path / "whole" / "checkpoints" / "step_0000006" / "adapter", tok)
    trained = model.state_dict()
    assert all(torch.equal(trained[k], v) for k, v in base.state_dict().items())
    assert adapter.engram_layers[1].value_proj.weight.abs().sum() > 0


def test_the_cli(base_dir, corpus_dir, cache_dir, tmp_path, capsys):
    argv = ["finetune", "--base", str(base_dir), "--data", str(corpus_dir), "--out", str(tmp_path / "run"),
            "--no-progress", "--set", "train.max_steps=2", "--set", "train.batch_size=2", "--set", "train.seq_len=32",
            "--set", "train.eval_batches=1", "--set", "data.val_fraction=0.2", "--set", f"data.cache_dir={cache_dir}",
            "--set", "adapter.engram.engram_vocab_size=[101,103]", "--set", "adapter.engram.n_embed_per_ngram=16",
            "--set", "adapter.engram.n_head_per_ngram=2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["steps"] == 2 and (tmp_path / "run" / "checkpoints" / "step_0000002" / "adapter").is_dir()
    assert main([*argv[:-2], "--set", "adapter.nope=1"]) == 2
    assert "unknown field 'nope'" in capsys.readouterr().err


def test_a_nan_loss_stops_before_anything_moves(base_dir, corpus_dir, cache_dir, tmp_path, monkeypatch):
    from engram.train import TrainingDiverged, latest_checkpoint

    calls = {"n": 0}
    real = torch.nn.functional.cross_entropy

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 2 else loss  # steps 1-2 fine, then NaN

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)
    with pytest.raises(TrainingDiverged, match="loss is nan at step 3 .*step_0000002"):
        finetune(config(base_dir, corpus_dir, cache_dir, eval_every=100), tmp_path / "run", progress=False)
    assert latest_checkpoint(tmp_path / "run").name == "step_0000002"


def test_freeze_base_false_is_refused(base_dir, corpus_dir, cache_dir, tmp_path):
    import dataclasses

    cfg = config(base_dir, corpus_dir, cache_dir)
    cfg = dataclasses.replace(cfg, adapter=dataclasses.replace(cfg.adapter, freeze_base=False))
    with pytest.raises(ValueError, match="trains and saves the adapter only"):
        finetune(cfg, tmp_path / "run", progress=False)


def test_the_lora_arm_of_the_retrofit_script_trains_through_the_same_loop(base_dir, corpus_dir, cache_dir, tmp_path):
    """scripts/retrofit_smollm2.py compares the adapter with LoRA; both arms run engram.train.loop.run_loop
    (one loop), so the LoRA run logs and checkpoints like engram finetune."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("peft")
    path = Path(__file__).parents[2] / "scripts" / "retrofit_smollm2.py"
    spec = importlib.util.spec_from_file_location("retrofit_smollm2", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    summary = script.run_lora(config(base_dir, corpus_dir, cache_dir, max_steps=4, eval_every=2, save_every=4), 0, 2,
                              tmp_path)
    run_dir = tmp_path / "lora-s0"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [c["step"] for c in summary["curve"]] == [2, 4] and summary["val_loss"] == summary["curve"][-1]["val_loss"]
    assert (run_dir / "lora" / "adapter_config.json").is_file() and summary["trainable"] > 0


def test_finetune_keeps_as_many_checkpoints_as_asked(base_dir, corpus_dir, cache_dir, tmp_path):
    finetune(config(base_dir, corpus_dir, cache_dir, max_steps=4, save_every=1, keep_checkpoints=1), tmp_path / "r",
             progress=False)
    assert [p.name for p in sorted((tmp_path / "r" / "checkpoints").glob("step_*"))] == ["step_0000004"]


# -- the defences engram train has -----------------------------------------------------------------------------
def make_base(folder, tokenizer_dir, vocab=None, seed=0):
    """A tiny Llama saved with the tokenizer in ``tokenizer_dir`` (``vocab``: its embedding's size)."""
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab or len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def no_base_load(monkeypatch):
    """Fails the test if the base's weights are loaded: a refusal must come first."""
    import engram.hf.finetune as F

    def refuse(*args, **kwargs):
        raise AssertionError("the base model was loaded before the run was refused")
    monkeypatch.setattr(F, "load_model", refuse)


def killed_at(step):
    class Killed(Exception):
        pass

    def on_step(s, metrics):
        if s == step:
            raise Killed
    return Killed, on_step


def test_resuming_on_another_base_is_refused_and_a_moved_base_is_not(base_dir, corpus_dir, cache_dir, tmp_path):
    import shutil

    Killed, on_step = killed_at(2)
    with pytest.raises(Killed):
        finetune(config(base_dir, corpus_dir, cache_dir), tmp_path / "run", progress=False, on_step=on_step)
    other = make_base(tmp_path / "other", base_dir, seed=1)  # the same architecture, other weights
    with pytest.raises(ValueError, match="trained on another base model \\(its weight files differ\\)"):
        finetune(config(other, corpus_dir, cache_dir), tmp_path / "run", progress=False)
    moved = shutil.copytree(base_dir, tmp_path / "moved")  # the same base elsewhere: resumes
    assert finetune(config(moved, corpus_dir, cache_dir), tmp_path / "run", progress=False)["steps"] == 6


def test_resuming_with_another_adapter_is_refused(base_dir, corpus_dir, cache_dir, tmp_path):
    import dataclasses

    Killed, on_step = killed_at(2)
    with pytest.raises(Killed):
        finetune(config(base_dir, corpus_dir, cache_dir), tmp_path / "run", progress=False, on_step=on_step)
    cfg = config(base_dir, corpus_dir, cache_dir)
    cfg = dataclasses.replace(cfg, adapter=dataclasses.replace(
        cfg.adapter, engram=dataclasses.replace(cfg.adapter.engram, layer_ids=[2])))
    with pytest.raises(ValueError, match="another adapter or optimizer .*adapter.engram.layer_ids"):
        finetune(cfg, tmp_path / "run", progress=False)


def test_a_tokenizer_larger_than_the_bases_vocabulary_is_refused_first(base_dir, corpus_dir, cache_dir, tmp_path,
                                                                       no_base_load):
    small = make_base(tmp_path / "small", base_dir, vocab=200)
    with pytest.raises(ValueError, match="tokenizer has \\d+ ids but its model's vocabulary holds 200"):
        finetune(config(small, corpus_dir, cache_dir), tmp_path / "run", progress=False)


def test_an_engram_model_as_base_is_refused_first(corpus_dir, cache_dir, tmp_path, no_base_load):
    import engram.hf as H
    from engram.model.transformer import EngramLM
    from engram.presets import get_preset

    data = prepare_data(tiny_run(corpus_dir, cache_dir, tmp_path / "d").data)
    model = EngramLM(get_preset("tiny-engram").without_data().with_data(data.vocab_size, data.pad_id), data.compressed)
    H.to_hf(model, data.tokenizer).save_pretrained(tmp_path / "engram-base")
    with pytest.raises(ValueError, match="is an Engram model already"):
        finetune(config(tmp_path / "engram-base", corpus_dir, cache_dir), tmp_path / "run", progress=False)


def test_data_without_a_window_is_refused_first(base_dir, corpus_dir, cache_dir, tmp_path, no_base_load):
    import dataclasses

    small = tmp_path / "small"
    small.mkdir()
    for i in range(3):  # three short documents: no window of 32 tokens in either split
        (small / f"f{i}.py").write_text(f"x_{i} = {i}\n")
    cfg = config(base_dir, small, cache_dir)
    with pytest.raises(ValueError, match="split .* has no window of train.seq_len=32"):
        finetune(cfg, tmp_path / "run", progress=False)


def test_resume_from_an_earlier_checkpoint_when_the_latest_is_damaged(base_dir, corpus_dir, cache_dir, tmp_path,
                                                                      capsys):
    from engram.train import CheckpointError

    run = tmp_path / "run"
    Killed, on_step = killed_at(5)
    with pytest.raises(Killed):
        finetune(config(base_dir, corpus_dir, cache_dir, keep_checkpoints=3), run, progress=False, on_step=on_step)
    latest = run / "checkpoints" / "step_0000004" / "adapter" / "adapter.safetensors"
    latest.write_bytes(latest.read_bytes()[:-10])  # truncated
    with pytest.raises(CheckpointError):
        finetune(config(base_dir, corpus_dir, cache_dir, keep_checkpoints=3), run, progress=False)
    argv = ["finetune", "--base", str(base_dir), "--data", str(corpus_dir), "--out", str(run), "--no-progress",
            "--resume-from", "2"] + [x for k, v in [("train.max_steps", 6), ("train.batch_size", 4),
                                                    ("train.seq_len", 32), ("train.lr", 3e-3),
                                                    ("train.warmup_steps", 1), ("train.eval_every", 3),
                                                    ("train.eval_batches", 2), ("train.log_every", 1),
                                                    ("train.save_every", 2), ("train.keep_checkpoints", 3),
                                                    ("data.val_fraction", 0.2), ("data.cache_dir", cache_dir),
                                                    ("adapter.engram.engram_vocab_size", "[101,103]"),
                                                    ("adapter.engram.n_embed_per_ngram", 16),
                                                    ("adapter.engram.n_head_per_ngram", 2),
                                                    ("adapter.engram.layer_ids", "[1]")]
                                     for x in ("--set", f"{k}={v}")]
    assert main(argv) == 0
    assert "resuming from step 2" in capsys.readouterr().err
    assert (run / "checkpoints" / "step_0000006").is_dir() and list((run / "archive").glob("*rewind-2*"))


def test_document_starts_reach_the_adapter(base_dir, corpus_dir, cache_dir, tmp_path, monkeypatch):
    """Each training batch's document starts go to the adapter, which resets its n-grams and conv there."""
    from engram.hf.retrofit import EngramAdapter

    seen = []
    real = EngramAdapter.documents

    def documents(self, boundary):
        seen.append(None if boundary is None else boundary.clone())
        return real(self, boundary)
    monkeypatch.setattr(EngramAdapter, "documents", documents)
    finetune(config(base_dir, corpus_dir, cache_dir, max_steps=2, eval_every=100), tmp_path / "run", progress=False)
    assert seen and all(b is not None and b.dtype == torch.bool for b in seen)
    assert any(bool(b[:, 1:].any()) for b in seen) or all(bool(b[:, 0].all()) for b in seen)

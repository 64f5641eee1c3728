"""engram.hf: the native model and its transformers twin give the same logits; generate() with the
EngramCache equals generation without a cache (greedy, sampling, beams, left padding); save/load with
the Auto classes, and tokenizers that would address other rows are refused; tiers; export-hf."""

import dataclasses
import json
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import engram.hf as H  # noqa: E402
from support import tiny_run  # noqa: E402
from engram.config import OverEncodingConfig  # noqa: E402
from engram.data import prepare_data  # noqa: E402
from engram.model.transformer import EngramLM  # noqa: E402


@pytest.fixture(scope="module")
def data(corpus_dir, cache_dir, tmp_path_factory):
    return prepare_data(tiny_run(corpus_dir, cache_dir, tmp_path_factory.mktemp("hf")).data)


def build(data, preset="tiny-engram", hc_mult=None, overencoding=False, seed=0, engram=None) -> EngramLM:
    """A model with every parameter drawn away from its initial value (conv taps and gates included)."""
    from engram.presets import get_preset

    config = get_preset(preset).without_data()
    if engram:
        config = dataclasses.replace(config, engram=dataclasses.replace(config.engram, **engram))
    if hc_mult is not None:
        config = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, hc_mult=hc_mult))
    if overencoding:
        config = dataclasses.replace(config, overencoding=OverEncodingConfig(
            engram_vocab_size=[211, 223], n_embed_per_ngram=16, n_head_per_ngram=2, pad_id=None))
    config = config.with_data(data.vocab_size, data.pad_id)
    torch.manual_seed(seed)
    model = EngramLM(config, data.compressed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embedding" not in name and "tok_embeddings" not in name:
                p.add_(torch.randn_like(p) * 0.05)
        for moe in model.moe_layers():  # a saved buffer, not a parameter: it must survive loading too
            moe.expert_bias.normal_(std=0.1)
    return model.eval()


VARIANTS = {"engram": {}, "engram-g1": {"hc_mult": 1}, "moe": {"preset": "tiny-moe"},
            "engram-v41": {"preset": "tiny-engram-v41"},
            "engram-v41-barriers": {"preset": "tiny-engram-v41", "engram": {"barrier_ids": list(range(3, 120))}},
            "dense-g1": {"preset": "tiny-dense", "hc_mult": 1}, "overencoding": {"preset": "tiny-moe", "overencoding": True}}


def ids_of(data, texts):
    return [[data.tokenizer.token_to_id("<|bos|>")] + data.tokenizer.encode(t).ids for t in texts]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_native_and_hf_logits_are_equal_before_and_after_a_round_trip(data, tmp_path, variant):
    model = build(data, **VARIANTS[variant])
    hf = H.to_hf(model, data.tokenizer)
    ids = torch.tensor(ids_of(data, ["def alpha_3(x):\n    return x + 3 * alpha_2(x)\n"]))
    native = model(ids).logits
    assert torch.equal(hf(ids, use_cache=False).logits, native)  # the same forward, bit for bit
    # use_cache (transformers' default in eval mode) runs the prefill path and returns the cache
    torch.testing.assert_close(hf(ids).logits, native, atol=1e-5, rtol=0)
    hf.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is H.EngramForCausalLM and not loaded.training
    assert torch.equal(loaded(ids, use_cache=False).logits, native)
    back = H.from_hf(loaded)
    assert torch.equal(back.eval()(ids).logits, native)
    assert back.config == model.config and back.compressed_tokenizer == model.compressed_tokenizer


def test_auto_classes_and_tokenizer(data, tmp_path):
    hf = H.to_hf(build(data), data.tokenizer)
    hf.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == "engram" and config.vocab_size == data.vocab_size
    assert config.engram_config["engram"]["layer_ids"] == hf.config.engram_config["engram"]["layer_ids"]
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.padding_side == "left" and tok.eos_token == "<|eos|>" and tok.pad_token_id == data.pad_id
    from engram.data import prompt_ids

    assert tok("import os")["input_ids"] == prompt_ids(data.tokenizer, "import os")  # [<|bos|>] + ids, as trained
    assert tok("import os", add_special_tokens=False)["input_ids"] == data.tokenizer.encode("import os").ids
    assert tok.model_max_length == hf.config.model_config.backbone.max_seq_len
    assert data.tokenizer.post_processor is None  # the tokenizer given was not changed by the export


def test_pipeline_continues_a_prompt_as_engram_sample_does(tmp_path, capsys):
    """The exported folder through transformers' pipeline, greedy, gives `engram sample --temperature 0`'s text."""
    from pathlib import Path

    from transformers import pipeline

    from engram.cli import main

    fixture = Path(__file__).parents[1] / "fixtures" / "v0_1" / "sharded_run"
    assert main(["export-hf", "--ckpt", str(fixture), "--out", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    for prompt in ("def f(x):\n    return", "import os"):
        assert main(["sample", "--ckpt", str(fixture), "--prompt", prompt, "--temperature", "0",
                     "--max-new-tokens", "12"]) == 0
        sampled = capsys.readouterr().out[:-1]  # the prompt and its continuation, then a newline
        generator = pipeline("text-generation", model=str(tmp_path / "hf"))
        piped = generator(prompt, max_new_tokens=12, do_sample=False)[0]["generated_text"]
        assert piped == sampled


def test_a_tampered_tokenizer_is_refused(data, tmp_path):
    hf = H.to_hf(build(data), data.tokenizer)
    hf.save_pretrained(tmp_path)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    vocab["x"], vocab["y"] = vocab["y"], vocab["x"]  # two ids swap pieces: other compressed ids, other rows
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="tokenizer.json.*(altered|corrupted)"):  # the folder's checksums first
        AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="tokenizer was changed or replaced; refusing to load"):
        AutoModelForCausalLM.from_pretrained(tmp_path, verify_checksums=False)


def test_a_folder_whose_layout_differs_is_refused(data, tmp_path):
    hf = H.to_hf(build(data), data.tokenizer)
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hash_layout"]["seed"] += 1
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"hash layout mismatch in \['seed'\]"):
        AutoModelForCausalLM.from_pretrained(tmp_path, verify_checksums=False)


@pytest.fixture(scope="module")
def loaded(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_gen")
    H.to_hf(build(data, seed=3), data.tokenizer).save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), folder


PROMPTS = ["def beta_4(x):", "import os\nclass Gamma:\n    def delta_1(self, x):\n        return"]


def test_step_logits_equal_one_full_forward(loaded):
    model, tok, _ = loaded
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=12, do_sample=False, output_logits=True, return_dict_in_generate=True)
    for row in range(len(PROMPTS)):
        real = batch["attention_mask"][row].bool()
        full = out.sequences[row][torch.cat([real, torch.ones(12, dtype=torch.bool)])]  # the row alone, no pads
        logits = model(full[None]).logits[0]  # one forward over prompt + generated
        P = int(real.sum())
        for step, step_logits in enumerate(out.logits):
            torch.testing.assert_close(step_logits[row], logits[P - 1 + step], atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["greedy", "sample", "beams"])
def test_cached_generation_equals_uncached(loaded, mode):
    model, tok, _ = loaded
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    kwargs = {"greedy": dict(do_sample=False), "sample": dict(do_sample=True, top_k=20, temperature=0.9),
              "beams": dict(num_beams=3, do_sample=False, num_return_sequences=2)}[mode]
    torch.manual_seed(7)
    cached = model.generate(**batch, max_new_tokens=10, **kwargs)
    torch.manual_seed(7)
    uncached = model.generate(**batch, max_new_tokens=10, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_a_left_padded_row_equals_the_prompt_alone(loaded):
    model, tok, _ = loaded
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    assert not batch["attention_mask"][0].all()  # the short prompt is padded
    together = model.generate(**batch, max_new_tokens=10, do_sample=False)
    for row, prompt in enumerate(PROMPTS):
        alone = model.generate(**tok([prompt], return_tensors="pt"), max_new_tokens=10, do_sample=False)
        assert torch.equal(together[row, -10:], alone[0, -10:])


def test_right_padding_is_refused(loaded):
    model, tok, _ = loaded
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    mask = batch["attention_mask"].flip(1)
    with pytest.raises(ValueError, match="left padding"):
        model(batch["input_ids"], attention_mask=mask)


def test_the_hf_model_trains_with_labels(loaded, data):
    model, _, _ = loaded
    ids = torch.tensor(ids_of(data, ["def alpha_1(x):\n    return x\n"]))
    native = H.from_hf(model)
    model.train()
    try:
        out = model(ids, labels=ids)
        assert out.cache is None
        torch.testing.assert_close(out.loss, native(ids, labels=ids).loss, atol=1e-6, rtol=0)
        out.loss.backward()
        assert model.model.tok_embeddings.weight.grad is not None
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_generation_is_identical_on_every_tier(loaded, tmp_path, tier):
    from engram.storage import apply_storage, export_tables

    model, tok, folder = loaded
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    reference = model.generate(**batch, max_new_tokens=10, do_sample=False)
    offloaded = AutoModelForCausalLM.from_pretrained(folder)
    tables = None
    if tier == "disk":
        tables = tmp_path / "tables"
        export_tables(offloaded.model, tables)
    with apply_storage(offloaded, tier, tables, cache_rows=64) as handle:
        assert torch.equal(offloaded.generate(**batch, max_new_tokens=10, do_sample=False), reference)
        assert handle.stats()["layers"]
    assert any(s["rows_fetched"] for s in handle.stats()["layers"].values())


def test_export_hf_of_a_two_rank_checkpoint(tmp_path, capsys):
    """The 0.1 fixture written by 2 ranks with row-sharded tables converts, and gives its logits."""
    from pathlib import Path

    from engram.cli import main
    from engram.train import load_checkpoint

    fixture = Path(__file__).parents[1] / "fixtures" / "v0_1" / "sharded_run"
    assert main(["export-hf", "--ckpt", str(fixture), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads(capsys.readouterr().out)["out"] == str(tmp_path / "hf")
    native = load_checkpoint(fixture).model.eval()
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = torch.randint(0, native.config.backbone.vocab_size, (2, 16))
    assert torch.equal(hf(ids, use_cache=False).logits, native(ids).logits)
    assert AutoTokenizer.from_pretrained(tmp_path / "hf").padding_side == "left"


def test_export_hf_refuses_a_file_as_out(tmp_path, capsys):
    from engram.cli import main

    (tmp_path / "f").write_text("x")
    assert main(["export-hf", "--ckpt", str(tmp_path), "--out", str(tmp_path / "f")]) == 2
    assert "argument --out" in capsys.readouterr().err


def test_v41_generation_with_barriers_equals_one_forward_per_step(data, tmp_path):
    """DeepSeek-V4.1's variant with barrier tokens in the prompts: generate() (cached, beams too) equals
    recomputing each step, and every step's logits equal one full forward over the row alone."""
    prompt_ids = ids_of(data, PROMPTS)
    barriers = sorted({prompt_ids[0][2], prompt_ids[1][3], prompt_ids[1][6]})  # tokens the prompts hold
    H.to_hf(build(data, preset="tiny-engram-v41", engram={"barrier_ids": barriers}, seed=5),
            data.tokenizer).save_pretrained(tmp_path)
    model, tok = AutoModelForCausalLM.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)
    assert model.model.config.engram.barrier_ids == barriers
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True)
    for row in range(len(PROMPTS)):
        real = batch["attention_mask"][row].bool()
        full = out.sequences[row][torch.cat([real, torch.ones(8, dtype=torch.bool)])]
        logits = model(full[None]).logits[0]
        P = int(real.sum())
        for step, step_logits in enumerate(out.logits):
            torch.testing.assert_close(step_logits[row], logits[P - 1 + step], atol=1e-5, rtol=0)
    beams = dict(num_beams=3, do_sample=False, num_return_sequences=2, max_new_tokens=6)
    assert torch.equal(model.generate(**batch, **beams), model.generate(**batch, use_cache=False, **beams))

import json
import shutil

import pytest
import torch

from support import tiny_run, write_corpus
from engram.train import CheckpointError, load_checkpoint, save_checkpoint, train, verify_checkpoint


@pytest.fixture(scope="module")
def trained(corpus_dir, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "run"
    result = train(tiny_run(corpus_dir, cache_dir, out, max_steps=4), progress=False)
    return result.checkpoint


def _copy(src, tmp_path):
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


def test_checkpoint_contents_and_round_trip(trained):
    names = {p.name for p in trained.rglob("*") if p.is_file()}
    assert {"model.safetensors", "optimizer.pt", "run_config.json", "trainer_state.json", "hash_layout.json",
            "tokenizer.json", "compressed_tokenizer.safetensors", "manifest.json"} <= names
    ckpt = load_checkpoint(trained)
    assert ckpt.step == 4 and ckpt.model.hasher is not None
    assert load_checkpoint(trained.parent.parent).path == trained  # a run directory resolves to its latest
    ids = torch.randint(0, ckpt.run_config.model.backbone.vocab_size, (1, 8))
    again = load_checkpoint(trained)
    torch.testing.assert_close(ckpt.model.eval()(ids).logits, again.model.eval()(ids).logits)


def test_corrupted_file_is_named(trained, tmp_path):
    ckpt = _copy(trained, tmp_path)
    blob = bytearray((ckpt / "model.safetensors").read_bytes())
    blob[-3] ^= 0xFF
    (ckpt / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="model.safetensors is corrupted"):
        load_checkpoint(ckpt)


def test_truncated_file_is_named(trained, tmp_path):
    ckpt = _copy(trained, tmp_path)
    data = (ckpt / "optimizer.pt").read_bytes()
    (ckpt / "optimizer.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="optimizer.pt is truncated"):
        verify_checkpoint(ckpt)


def test_incomplete_checkpoint_is_refused(trained, tmp_path):
    ckpt = _copy(trained, tmp_path)
    (ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="not completely written|incomplete"):
        load_checkpoint(ckpt)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nowhere")


def test_other_tokenizer_is_refused(trained, tmp_path):
    from engram.data import prepare_data
    from engram.config import DataConfig

    other_corpus = write_corpus(tmp_path / "other", n_files=30, seed=5)
    (other_corpus / "extra.txt").write_text("Zebra quagga xylophone! " * 50)
    prepared = prepare_data(DataConfig(source=str(other_corpus), vocab_size=300, val_fraction=0.3,
                                       cache_dir=str(tmp_path / "cache")))
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(trained, tokenizer=prepared.tokenizer)


def test_mismatched_hash_layout_is_refused(trained, tmp_path):
    ckpt = _copy(trained, tmp_path)
    layout_file = ckpt / "hash_layout.json"
    layout = json.loads(layout_file.read_text())
    layout["seed"] = layout["seed"] + 1
    layout_file.write_text(json.dumps(layout))
    with pytest.raises(CheckpointError, match="hash_layout.json is truncated|corrupted"):
        load_checkpoint(ckpt)  # the manifest catches the edit first
    with pytest.raises(CheckpointError, match="hash layout mismatch in \\['seed'\\]"):
        _load_ignoring_manifest(ckpt)


def _load_ignoring_manifest(ckpt):
    """Rewrite the manifest so only the layout check stands between the edit and the model."""
    import hashlib

    manifest = json.loads((ckpt / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        data = (ckpt / name).read_bytes()
        entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    return load_checkpoint(ckpt)


def test_keeps_only_the_newest(corpus_dir, cache_dir, tmp_path):
    train(tiny_run(corpus_dir, cache_dir, tmp_path / "run", max_steps=12, save_every=2), progress=False)
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*"))
    assert kept == ["step_0000010", "step_0000012"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp*"))


def test_raw_id_engram_and_overencoding_round_trip(corpus_dir, cache_dir, tmp_path):
    """compress=False hashes raw ids, yet the checkpoint keeps the tokenizer's real compression (loading
    compares it with the one rebuilt from tokenizer.json) and both hash layouts, and loads back."""
    import dataclasses

    from engram.config import OverEncodingConfig, RunConfig
    from engram.data import prepare_data
    from engram.model.transformer import EngramLM

    run = tiny_run(corpus_dir, cache_dir, tmp_path / "unused")
    prepared = prepare_data(run.data)
    assert prepared.compressed.vocab_size < prepared.vocab_size  # the BPE has ids that compression merges
    model_config = dataclasses.replace(
        run.model, engram=dataclasses.replace(run.model.engram, compress=False, gate="none", short_conv=False,
                                              branch_keys=False),
        overencoding=OverEncodingConfig(engram_vocab_size=[211, 223], n_embed_per_ngram=16, n_head_per_ngram=2,
                                        compress=False, pad_id=None))
    model_config = model_config.with_data(prepared.vocab_size, prepared.pad_id)
    model = EngramLM(model_config, prepared.compressed).eval()
    assert model.hasher.compressed_vocab_size == prepared.vocab_size  # raw ids
    assert model.overencoding.hasher.compressed_vocab_size == prepared.vocab_size
    path = save_checkpoint(tmp_path / "run", 0, model, {}, RunConfig(model=model_config, data=run.data),
                           prepared.tokenizer, {})
    assert (path / "overencoding_layout.json").is_file() and (path / "hash_layout.json").is_file()
    ckpt = load_checkpoint(path)
    assert ckpt.model.compressed_tokenizer == prepared.compressed
    assert ckpt.model.hasher.layout() == model.hasher.layout()
    ids = torch.randint(0, prepared.vocab_size, (2, 12))
    torch.testing.assert_close(ckpt.model.eval()(ids).logits, model(ids).logits, atol=0, rtol=0)
    # the OverEncoding layout is checked like the Engram one
    layout = json.loads((path / "overencoding_layout.json").read_text())
    layout["seed"] += 1
    (path / "overencoding_layout.json").write_text(json.dumps(layout))
    with pytest.raises(CheckpointError, match=r"overencoding_layout.json: hash layout mismatch in \['seed'\]"):
        _load_ignoring_manifest(path)

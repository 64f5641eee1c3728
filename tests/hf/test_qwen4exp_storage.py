"""Our storage tiers on transformers' own Qwen4-Exp models (engram.model.qwen4exp, engram.hf.qwen4exp): export and
apply_storage take the model as transformers built it; every PLE layer is hashed once per forward and its rows
prefetched; generate() (greedy, sampling, beams, left padding) gives the in-memory model's tokens; checkpoints
saved in split_ngram_parts are served from their shards in place; knock-out switches the PLE layers off."""

import json

import pytest
import torch

pytest.importorskip("transformers")

from transformers import Qwen4ExpForCausalLM  # noqa: E402
from transformers.models.qwen4_exp.configuration_qwen4_exp import Qwen4ExpTextConfig  # noqa: E402

from engram.analysis.hooks import knockout  # noqa: E402
from engram.hf.qwen4exp import checkpoint_tables, load_tiered  # noqa: E402
from engram.model.qwen4exp import PLEPlan, TieredPLEEmbedding  # noqa: E402
from engram.storage import apply_storage, export_tables  # noqa: E402

EOS = 2


def text_config(ngram_size=3, heads=2, ple=(1, 3), layers=4, hc=2, d_h=4, base=1000, parts=4, vocab=300):
    """A tiny Qwen4-Exp: linear-attention blocks (PLE needs them) and one indexed-attention block last."""
    return Qwen4ExpTextConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=2,
        moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
        hc_count=hc, hc_lowrank=4, ple_layer_ids=list(ple), ple_embed_dim=d_h * (ngram_size - 1) * heads,
        ngram_size=ngram_size, heads_per_ngram=heads, ngram_vocab_size_base=base, seed=1234,
        make_ngram_vocab_size_divisible_by=128, eos_token_id=EOS, pad_token_id=0, split_ngram_parts=parts,
        layer_types=["linear_attention"] * (layers - 1) + ["indexed_attention"], indexer_n_heads=2,
        indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8, indexer_compress_ratio=4)


def build(config, seed=0):
    """A model whose PLE layers matter: random tables and short convs (transformers starts the conv at zero)."""
    torch.manual_seed(seed)
    model = Qwen4ExpForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if layer.ple is not None:
                layer.ple.conv1d.weight.normal_(0, 0.3)
                layer.ple.ple_embedding.ngram_embedding.weight.normal_(0, 1.0)
    return model


def twin(model):
    other = Qwen4ExpForCausalLM(model.config).eval()
    other.load_state_dict(model.state_dict())
    return other


def batch(vocab=300, B=2, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    ids[0, 5] = EOS  # a segment ends inside the prompt
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    return ids, mask


CONFIGS = [dict(), dict(ngram_size=2, heads=3, ple=(2,)), dict(ngram_size=4, heads=1, ple=(1, 2, 3), hc=3)]


@pytest.mark.parametrize("kwargs", CONFIGS)
@pytest.mark.parametrize("tier", ["host", "disk"])
def test_generation_from_a_tier_is_the_in_memory_models(kwargs, tier, tmp_path):
    reference = build(text_config(**kwargs))
    model = twin(reference)
    export_tables(model, tmp_path / "tables")
    with apply_storage(model, tier, tmp_path / "tables", cache_rows=64 if tier == "disk" else 0) as handle:
        assert all(isinstance(layer.ple.ple_embedding, TieredPLEEmbedding)
                   for layer in model.model.layers if layer.ple is not None)
        ids, mask = batch()
        with torch.no_grad():
            torch.testing.assert_close(model(ids, attention_mask=mask).logits,
                                       reference(ids, attention_mask=mask).logits, rtol=0, atol=1e-5)
        for settings in (dict(do_sample=False), dict(do_sample=False, num_beams=3),
                         dict(do_sample=True, top_k=30, temperature=1.5)):
            torch.manual_seed(7)
            expected = reference.generate(ids, attention_mask=mask, max_new_tokens=6, **settings)
            torch.manual_seed(7)
            got = model.generate(ids, attention_mask=mask, max_new_tokens=6, **settings)
            assert torch.equal(got, expected), settings
        stats = handle.stats()
        assert set(stats["layers"]) == {lid - 1 for lid in model.config.ple_layer_ids}
        assert all(s["tier"] == tier and s["calls_prefetched"] > 0 for s in stats["layers"].values())


def test_every_ple_layer_is_hashed_once_per_forward_and_prefetched(tmp_path, monkeypatch):
    model = build(text_config(ple=(1, 2, 3)))
    export_tables(model, tmp_path)
    calls = []
    real = PLEPlan.hash
    monkeypatch.setattr(PLEPlan, "hash", lambda self, ids, history: calls.append(ids.shape) or real(self, ids, history))
    with apply_storage(model, "disk", tmp_path) as handle:
        ids, mask = batch()
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        forwards = len(calls)
        assert forwards == 4  # the prefill and three decode steps: one hashing each, for all three layers
        assert all(s["calls_prefetched"] == forwards for s in handle.stats()["layers"].values())


def test_quantised_tables_equal_the_model_holding_their_decoded_rows(tmp_path):
    from engram.storage import open_tables
    from engram.storage.stores import DiskStore

    model = build(text_config())
    export_tables(model, tmp_path, dtype="fp8_e4m3")
    decoded = twin(model)
    manifest = open_tables(tmp_path)
    with torch.no_grad():
        for lid, entry in manifest.layers.items():
            store = DiskStore.from_entry(entry)
            decoded.model.layers[lid].ple.ple_embedding.ngram_embedding.weight.copy_(
                store.gather(torch.arange(store.num_rows)))
    with apply_storage(model, "disk", tmp_path):
        ids, mask = batch()
        with torch.no_grad():
            assert torch.equal(model(ids, attention_mask=mask).logits, decoded(ids, attention_mask=mask).logits)


def test_a_table_that_is_not_this_models_is_refused(tmp_path):
    export_tables(build(text_config(base=1000)), tmp_path)
    with pytest.raises(ValueError, match="layout"):
        apply_storage(build(text_config(base=2000)), "disk", tmp_path)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A model saved by transformers in 5 parts per table, spread over several safetensors shards."""
    directory = tmp_path_factory.mktemp("qwen4exp")
    model = build(text_config(parts=5))
    model.save_pretrained(directory, max_shard_size="40KB")
    return directory, model


def test_the_checkpoint_stores_each_table_in_parts(checkpoint):
    directory, model = checkpoint
    tables = checkpoint_tables(directory)
    assert sorted(tables) == [0, 2] and all(len(parts) == 5 for parts in tables.values())
    assert len({p.path for parts in tables.values() for p in parts}) > 1  # the parts lie in several shards


@pytest.mark.parametrize("tier", ["disk", "host"])
def test_a_checkpoint_is_served_from_its_parts_in_place(checkpoint, tier, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    from support import record_tensor_reads

    directory, reference = checkpoint
    read = record_tensor_reads(monkeypatch, modeling_utils)  # what transformers materialises
    model, handle = load_tiered(directory, tier, cache_rows=32)
    with handle:
        assert read and not [n for n in read if "ngram_embedding" in n]  # transformers never read a table part
        ids, mask = batch()
        for settings in (dict(do_sample=False), dict(do_sample=False, num_beams=2)):
            expected = reference.generate(ids, attention_mask=mask, max_new_tokens=5, **settings)
            assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=5, **settings), expected)
        assert handle.stats()["tier"] == tier


def test_a_checkpoints_parts_export_in_slices(checkpoint, tmp_path, monkeypatch):
    import engram.storage.export as export
    from engram.storage.stores import ConcatStore

    directory, reference = checkpoint
    model, handle = load_tiered(directory, "disk")
    gathered = []
    real = ConcatStore.gather_encoded
    monkeypatch.setattr(ConcatStore, "gather_encoded", lambda self, rows, warm=None: gathered.append(len(rows)) or real(self, rows, warm))
    monkeypatch.setattr(export, "CHUNK_BYTES", 4096)  # slices of 256 rows of 4 fp32 values
    with handle:
        export_tables(model, tmp_path / "int8", dtype="int8")
        export_tables(model, tmp_path / "fp32")
    assert gathered and max(gathered) <= 256  # never the whole table at once
    served, served_handle = load_tiered(directory, "disk", tables=tmp_path / "fp32")
    with served_handle:
        ids, mask = batch()
        with torch.no_grad():
            assert torch.equal(served(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits)


def test_a_damaged_checkpoint_is_refused_by_name(checkpoint, tmp_path):
    import shutil

    directory, _ = checkpoint
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.2.ple.ple_embedding.ngram_embedding.shard_3.weight"]
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"layer 2's PLE table lacks parts \[3\] of 5"):
        load_tiered(copy)
    with pytest.raises(ValueError, match="tier must be one of"):
        load_tiered(directory, "device")
    with pytest.raises(ValueError, match="no config.json"):
        load_tiered(tmp_path)


def test_a_table_never_allocated_needs_its_files(tmp_path):
    with torch.device("meta"):
        model = Qwen4ExpForCausalLM(text_config())
    with pytest.raises(ValueError, match="never allocated"):
        apply_storage(model, "host")
    with pytest.raises(ValueError, match="never allocated"):
        export_tables(model, tmp_path)


def test_knockout_switches_the_ple_layers_off():
    model = build(text_config())
    silent = twin(model)
    with torch.no_grad():
        for layer in silent.model.layers:
            if layer.ple is not None:
                layer.ple.value_proj.weight.zero_()  # no value: the PLE layer adds exactly zero
    ids, mask = batch()
    with torch.no_grad():
        with knockout(model):
            off = model(ids, attention_mask=mask).logits
        on = model(ids, attention_mask=mask).logits
        assert torch.equal(off, silent(ids, attention_mask=mask).logits)
        assert not torch.equal(on, off)  # and the hooks are gone


def test_inspect_knockout_on_a_transformers_checkpoint(corpus_dir, cache_dir, tmp_path):
    from support import tiny_run

    from engram.cli import main
    from engram.data import prepare_data

    data = prepare_data(tiny_run(corpus_dir, cache_dir, "unused").data)  # a BPE of 300 ids
    directory = tmp_path / "model"
    build(text_config(parts=3)).save_pretrained(directory)
    data.tokenizer.save(str(directory / "tokenizer.json"))
    assert main(["inspect", "knockout", "--hf", str(directory), "--text", str(corpus_dir), "--cache-dir",
                 str(tmp_path / "cache"), "--seq-len", "32", "--max-probes", "20", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "knockout.json").read_text())
    assert result["engram_layers"] == [1, 3] and result["tier"] == "disk"
    assert result["all"]["logprob_with"] != result["all"]["logprob_without"]
    assert set(result["storage"]["layers"]) == {"1", "3"}
    assert main(["inspect", "knockout", "--hf", str(directory)]) == 2


def test_the_conditional_generation_model_too(tmp_path):
    """Qwen4ExpForConditionalGeneration: the text model sits under model.language_model, and so do its tables."""
    from transformers import Qwen4ExpForConditionalGeneration
    from transformers.models.qwen4_exp.configuration_qwen4_exp import Qwen4ExpConfig

    config = Qwen4ExpConfig(text_config=text_config(parts=3).to_dict(), image_token_id=290, video_token_id=291,
                            vision_start_token_id=292, vision_end_token_id=293,
                            vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2,
                                               out_hidden_size=32, patch_size=4, num_position_embeddings=16))
    torch.manual_seed(0)
    reference = Qwen4ExpForConditionalGeneration(config).eval()
    with torch.no_grad():
        for layer in reference.model.language_model.layers:
            if layer.ple is not None:
                layer.ple.conv1d.weight.normal_(0, 0.3)
    reference.save_pretrained(tmp_path / "model")
    assert sorted(checkpoint_tables(tmp_path / "model")) == [0, 2]
    model, handle = load_tiered(tmp_path / "model", "disk")
    with handle:
        assert type(model).__mro__[1] is Qwen4ExpForConditionalGeneration
        ids, mask = batch()
        expected = reference.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False), expected)
        assert all(s["calls_prefetched"] == 5 for s in handle.stats()["layers"].values())


def test_a_checkpoint_in_512_parts_holds_a_descriptor_per_file_not_per_part(tmp_path):
    """transformers' default split_ngram_parts is 512: every part is a view of its shard's one map."""
    import os

    build(text_config(ple=(1, 2, 3), parts=512)).save_pretrained(tmp_path / "model")
    before = len(os.listdir("/proc/self/fd"))
    model, handle = load_tiered(tmp_path / "model", "disk")
    with handle:
        assert len(os.listdir("/proc/self/fd")) - before < 16
        ids, mask = batch()
        with torch.no_grad():
            model(ids, attention_mask=mask)


def test_a_float16_checkpoint_is_served_in_float16(tmp_path):
    build(text_config(parts=3)).to(torch.float16).save_pretrained(tmp_path / "model")
    reference = Qwen4ExpForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float16).eval()  # as loaded
    model, handle = load_tiered(tmp_path / "model", "disk", dtype=torch.float16)
    with handle, torch.no_grad():
        ids, mask = batch()
        assert torch.equal(model(ids, attention_mask=mask).logits, reference(ids, attention_mask=mask).logits)

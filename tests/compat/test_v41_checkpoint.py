"""engram.compat.deepseek.open_v41 on a miniature DeepSeek-V4.1 checkpoint written here in the released layout:
config.json with text_config, tokenizer.json, two safetensors shards and their index, fp8 tables with ue8m0
scales per 32 values (codes and scales in different shards), fp8 wkv with 32 x 32 block scales, bf16 gains,
and backbone tensors beside them. The tables are served from the shards in place, and nothing else is read."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from engram.compat.deepseek import open_v41
from engram.compat.v41_checkpoint import v41_engram_config
from engram.hashing import NgramHasher
from engram.model.engram_v41 import EngramV41
from engram.quant import encode_blocks
from engram.tokenizer import CompressedTokenizer

G, D, LAYERS = 2, 32, (1, 3)


def text_config(compressed_vocab: int, rows=None) -> dict:
    text = {"hidden_size": D, "hc_mult": G, "num_hidden_layers": 4, "rms_norm_eps": 1e-20, "hc_eps": 1e-6,
            "engram_layer_ids": list(LAYERS), "engram_max_ngram_size": 4, "engram_n_heads": 2,
            "engram_vocab_size": 53, "engram_head_dim": 64, "engram_pad_token_id": 0,
            "engram_compressed_vocab_size": compressed_vocab}
    return text | ({} if rows is None else {"engram_num_embeddings": rows})


@pytest.fixture(scope="module")
def release(tmp_path_factory, corpus_dir, cache_dir):
    """(directory, every tensor written) of a miniature release."""
    from support import tiny_run
    from engram.data import prepare_data

    data = prepare_data(tiny_run(corpus_dir, cache_dir, "unused").data)
    directory = tmp_path_factory.mktemp("v41")
    data.tokenizer.save(str(directory / "tokenizer.json"))
    compressed = CompressedTokenizer.from_pretrained(data.tokenizer)
    config, _ = v41_engram_config({"text_config": text_config(compressed.vocab_size), "image_token_id": 5})
    hasher = NgramHasher(config, compressed)
    rows = [sum(hasher.geometry[lid].sizes) for lid in LAYERS]
    g = torch.Generator().manual_seed(0)
    shard1 = {"embed.weight": torch.randn(compressed.raw_vocab_size, D, generator=g).to(torch.bfloat16),
              "layers.0.attn.wq_a.weight": torch.randn(8, D, generator=g).to(torch.bfloat16)}
    shard2 = {"norm.weight": torch.ones(D, dtype=torch.bfloat16)}
    for lid, n in zip(LAYERS, rows):
        p = f"layers.{lid}.engram."
        codes, scales = encode_blocks(torch.randn(n, 64, generator=g) * 0.05, (1, 32))
        wkv, wkv_scales = encode_blocks(torch.randn((G + 1) * D, config.memory_dim, generator=g) * 0.1, (32, 32))
        shard1[p + "embed.weight"] = codes.view(torch.float8_e4m3fn)  # the codes in one shard ...
        shard2[p + "embed.scale"] = scales.view(torch.float8_e8m0fnu)  # ... and their scales in the other
        shard2[p + "wkv.weight"] = wkv.view(torch.float8_e4m3fn)
        shard2[p + "wkv.scale"] = wkv_scales.view(torch.float8_e8m0fnu)
        shard2[p + "q_weight"] = (1 + 0.3 * torch.randn(G, D, generator=g)).to(torch.bfloat16)
        shard2[p + "k_weight"] = (1 + 0.3 * torch.randn(G, D, generator=g)).to(torch.bfloat16)
    save_file(shard1, str(directory / "model-00001-of-00002.safetensors"))
    save_file(shard2, str(directory / "model-00002-of-00002.safetensors"))
    weight_map = {**dict.fromkeys(shard1, "model-00001-of-00002.safetensors"),
                  **dict.fromkeys(shard2, "model-00002-of-00002.safetensors")}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps({
        "model_type": "deepseek_v41", "architectures": ["DeepseekV41ForCausalLM"], "image_token_id": 5,
        "text_config": text_config(compressed.vocab_size, rows),
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [32, 32], "scale_fmt": "ue8m0"}}))
    return directory, shard1 | shard2


def test_layers_served_from_the_shards_equal_the_release_loaded_whole(release):
    directory, tensors = release
    with open_v41(directory) as host:
        assert sorted(host.engram_layers) == list(LAYERS)
        ids = torch.randint(0, host.hasher.tokenizer.raw_vocab_size, (2, 24))
        ids[0, 7] = 5  # the image token: a barrier (DEAD)
        hash_ids = host.hash(ids)
        host.prefetch(hash_ids)  # rows fetched in the background, picked up by the forward
        for lid, layer in host.engram_layers.items():
            whole = EngramV41.from_release_state_dict(tensors, host.config, lid)  # every table row in memory
            hidden = torch.randn(2, 24, G, D)
            mask = ~host.hasher.barriers(ids)
            with torch.no_grad():
                assert torch.equal(layer(hidden, hash_ids[lid], token_mask=mask),
                                   whole(hidden, hash_ids[lid], token_mask=mask))
        stats = host.stats()
        assert stats["tier"] == "disk" and all(s["calls_prefetched"] == 1 for s in stats["layers"].values())
        assert host.config.barrier_ids == [5] and host.config.gate_norm_eps == 1e-20


def test_nothing_but_the_engram_tensors_is_read(release, monkeypatch):
    import safetensors
    from support import record_tensor_reads

    directory, _ = release
    read = record_tensor_reads(monkeypatch, safetensors)
    with open_v41(directory) as host:
        tables = [t.store for t in host.named_tables().values()]
    assert sorted(read) == sorted(f"layers.{lid}.engram.{n}" for lid in LAYERS
                                  for n in ("wkv.weight", "wkv.scale", "q_weight", "k_weight"))
    assert all(str(t._maps[0].filename).endswith("00001-of-00002.safetensors") for t in tables)  # codes in place
    assert all(str(t._maps[1].filename).endswith("00002-of-00002.safetensors") for t in tables)
    assert all(t.array.base is not None and not t.array.flags.owndata for t in tables)  # views of the maps


def test_the_row_cache_serves_the_same_rows(release):
    directory, _ = release
    ids = torch.randint(0, 300, (2, 32))
    with open_v41(directory) as plain, open_v41(directory, cache_rows=64, policy="lfu") as cached:
        for _ in range(2):
            hash_ids = plain.hash(ids)
            for lid in LAYERS:
                a = plain.engram_layers[lid].embedding(hash_ids[lid])
                b = cached.engram_layers[lid].embedding(hash_ids[lid])
                assert torch.equal(a, b)
        assert all(s["hits"] > 0 for s in cached.stats()["layers"].values())


def _edit_json(directory, file: str, change) -> None:
    path = directory / file
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _truncate(directory, file: str) -> None:
    shard = directory / file
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a truncated download


REFUSALS = {  # what is broken in a copy of the release -> how the refusal names it
    "another tokenizer": (lambda d: _edit_json(d, "config.json", lambda c: c["text_config"].update(
        engram_compressed_vocab_size=99092)), "engram_compressed_vocab_size=99092"),
    "other table sizes": (lambda d: _edit_json(d, "config.json", lambda c: c["text_config"].update(
        engram_num_embeddings=[10, 20])), r"engram_num_embeddings=\[10, 20\] rows"),
    "a missing field": (lambda d: _edit_json(d, "config.json", lambda c: c["text_config"].pop("engram_head_dim")),
                        r"no Engram fields \['engram_head_dim'\]"),
    "a missing tensor": (lambda d: _edit_json(d, "model.safetensors.index.json", lambda i: i["weight_map"].pop(
        "layers.3.engram.k_weight")), r"missing \['layers.3.engram.k_weight'\]"),
    "a truncated shard": (lambda d: _truncate(d, "model-00001-of-00002.safetensors"), "truncated or damaged"),
}


@pytest.mark.parametrize("broken", sorted(REFUSALS))
def test_a_release_that_does_not_fit_is_refused_by_name(release, tmp_path, broken):
    directory = tmp_path / "copy"
    shutil.copytree(release[0], directory)
    damage, message = REFUSALS[broken]
    damage(directory)
    with pytest.raises(ValueError, match=message):
        open_v41(directory)


def test_inspect_tables_runs_on_a_release(release, corpus_dir, tmp_path, capsys):
    from engram.cli import main

    directory, _ = release
    assert main(["inspect", "tables", "--release", str(directory), "--text", str(corpus_dir), "--out",
                 str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"), "--batches", "2", "--seq-len", "32",
                 "--cache-rows", "128"]) == 0
    result = json.loads((tmp_path / "out" / "tables.json").read_text())
    assert set(result["layers"]) == {"2", "4"} and result["tokens"] == 2 * 4 * 32
    assert set(result["storage"]["layers"]) == {"2", "4"} and result["storage"]["layers"]["2"]["cache_rows"] == 128
    assert main(["inspect", "tables", "--release", str(directory), "--out", str(tmp_path / "x")]) == 2
    assert "--release needs --text" in capsys.readouterr().err

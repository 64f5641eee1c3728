"""transformers' Qwen4-Exp with its PLE tables on our disk tier: a table bigger than RAM, and decode speed
against the in-memory model; and DeepSeek-V4.1 Engram layers served from release shards against the
same layers held in memory.

1. **Bigger than RAM** (``--big-gb``, default 30 on a 23 GiB machine): a Qwen4-Exp-shaped model whose
   three PLE tables hold ``--big-gb`` GiB of fp32 rows (d_h = 64). It is built on the meta device (the
   tables are never allocated; the other weights are copied from a twin with small tables), its rows
   are written to a tables directory in slices (one random block tiled, so writing runs at disk speed),
   dropped from the page cache, and a fresh process generates from the disk tier: greedy, B x T prompts, ``--new-tokens`` tokens,
   once to warm up and once timed. It reports prefill and decode tokens/s, peak RSS (VmHWM, including
   the page-cache pages the memory map touched) and anon RSS (the process's own memory).
2. **Paired decode, Qwen4-Exp** (``--paired-gb``, default 1): the same shape with tables that fit in
   RAM, in memory (transformers' own model) and on the disk tier (its files dropped from the page cache
   after export, then warmed by the run's own reads), in one process, timed round-robin
   over ``--rounds``: per round, the in-memory decode time over the disk tier's. The median is reported.
   Greedy tokens must be identical.
3. **Paired layer calls, V4.1**: a miniature V4.1 release with fp8 tables of ``--v41-rows`` rows per
   layer, written in the released layout; its Engram layers served from the shards (``open_v41``)
   against the same layers loaded whole (``from_release_state_dict``: the decoded fp32 rows in memory),
   and against the release's own fp8 rows held in RAM (a ``HostStore``: decoded on gather, as the disk
   tier does), timed round-robin on decode-sized calls (hash, gather, gate; B = 8, T = 1). Per round:
   each in-memory arm's time over the served one's. Outputs must be equal.

    python benchmarks/qwen4exp_offload.py [--big-gb 30] [--paired-gb 1] [--v41-rows 2000000] [--json PATH]
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from engram.bench.offload import drop_page_cache, proc_status_mb
from engram.model.tables import HashedTable

D_H = 64
HEADS = 8  # per order; N = 3, so 16 heads of d_h = 64 per layer


def text_config(table_gb: float, layers: int = 4):
    from transformers.models.qwen4_exp.configuration_qwen4_exp import Qwen4ExpTextConfig

    ple = list(range(1, layers))  # every linear-attention block; the last block is indexed attention
    base = max(1000, int(table_gb * 2**30 / (D_H * 4) / (2 * HEADS) / len(ple)))
    return Qwen4ExpTextConfig(
        vocab_size=4096, hidden_size=128, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=1,
        head_dim=32, linear_key_head_dim=32, linear_value_head_dim=32, linear_num_key_heads=2,
        linear_num_value_heads=4, moe_intermediate_size=64, shared_expert_intermediate_size=64, num_experts=8,
        num_experts_per_tok=2, hc_count=2, hc_lowrank=16, ple_layer_ids=ple, ple_embed_dim=D_H * 2 * HEADS,
        ngram_size=3, heads_per_ngram=HEADS, ngram_vocab_size_base=base, seed=1234,
        make_ngram_vocab_size_divisible_by=128, eos_token_id=2, pad_token_id=0,
        layer_types=["linear_attention"] * (layers - 1) + ["indexed_attention"], indexer_n_heads=2,
        indexer_kv_heads=1, indexer_head_dim=32, indexer_budget=16, indexer_compress_ratio=4)


class TiledRows(HashedTable):
    """A table that exists only as rows made on demand (one random block tiled): what the bigger-than-RAM
    run exports, slice by slice, without ever holding the table."""

    def __init__(self, rows: int, offsets: torch.Tensor):
        super().__init__()
        self.n, self.block = rows, torch.randn(1 << 16, D_H, generator=torch.Generator().manual_seed(rows))
        self.register_buffer("offsets", offsets.clone(), persistent=False)

    @property
    def num_rows(self) -> int:
        return self.n

    @property
    def dim(self) -> int:
        return D_H

    @property
    def weight(self) -> torch.Tensor:
        return torch.empty(self.n, D_H, device="meta")

    def rows(self, start: int, stop: int) -> torch.Tensor:
        index = torch.arange(start, stop) % self.block.shape[0]
        return self.block[index]


def meta_model(config):
    """The model with no table allocated; every other weight and buffer copied from a twin with small tables."""
    from transformers import Qwen4ExpForCausalLM

    from engram.hf.qwen4exp import without_tables

    small = copy.deepcopy(config)
    small.ngram_vocab_size_base = 1000
    torch.manual_seed(0)
    twin = Qwen4ExpForCausalLM(small).eval()
    with torch.device("meta"):
        model = without_tables(Qwen4ExpForCausalLM)(config)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for name, value in list(twin.named_parameters()) + list(twin.named_buffers()):
            if "ple_embedding" not in name:
                target = model.get_parameter(name) if name in dict(model.named_parameters()) else model.get_buffer(name)
                target.copy_(value)
    return model.eval()


def write_big_tables(args, directory: Path) -> float:
    from engram.model.qwen4exp import qwen4exp_host
    from engram.storage import export_tables

    model = meta_model(text_config(args.big_gb))
    host = qwen4exp_host(model)
    for lid, slot in host.engram_layers.items():
        slot.embedding = TiledRows(slot.embedding.num_rows, host.hasher.offsets[lid])
    t0 = time.perf_counter()
    export_tables(host, directory)
    return time.perf_counter() - t0


def prompts(args, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (args.batch, args.seq), generator=g)


def timed_generate(model, ids, new_tokens: int) -> tuple[float, float, torch.Tensor]:
    """(prefill seconds, decode seconds per step, tokens) of greedy generation."""
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, do_sample=False)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
    total = time.perf_counter() - t0
    return prefill, (total - prefill) / (new_tokens - 1), out


def run_big(args) -> dict:
    from engram.storage import apply_storage

    model = meta_model(text_config(args.big_gb))
    ids = prompts(args, model.config.vocab_size)
    with apply_storage(model, "disk", args.dir) as handle, torch.no_grad():
        cold_prefill = timed_generate(model, ids, args.new_tokens)[0]  # the first call: pages partly cold
        prefill, step, tokens = timed_generate(model, ids, args.new_tokens)
        table_bytes = sum(s["table_bytes"] for s in handle.stats()["layers"].values())
    return {"table_gib": table_bytes / 2**30, "prefill_tok_s": ids.numel() / prefill,
            "decode_tok_s": ids.shape[0] / step, "first_call_prefill_tok_s": ids.numel() / cold_prefill,
            "peak_rss_mb": proc_status_mb("VmHWM"),
            "anon_rss_mb": proc_status_mb("RssAnon"), "tokens": tokens.tolist()}


def run_paired(args) -> dict:
    from transformers import Qwen4ExpForCausalLM

    from engram.storage import apply_storage, export_tables

    torch.manual_seed(0)
    memory = Qwen4ExpForCausalLM(text_config(args.paired_gb)).eval()
    disk = Qwen4ExpForCausalLM(memory.config).eval()
    disk.load_state_dict(memory.state_dict())
    directory = Path(tempfile.mkdtemp(prefix="engram-q4-", dir="/tmp"))
    try:
        export_tables(disk, directory)
        drop_page_cache(directory)  # warm means the rows this run read, not the whole file as just written
        with apply_storage(disk, "disk", directory), torch.no_grad():
            ids = prompts(args, memory.config.vocab_size)
            same = torch.equal(timed_generate(memory, ids, args.new_tokens)[2],
                               timed_generate(disk, ids, args.new_tokens)[2])
            ratios, steps = [], {"memory": [], "disk": []}
            for r in range(args.rounds):
                order = ("memory", "disk") if r % 2 == 0 else ("disk", "memory")
                for name in order:
                    steps[name].append(timed_generate(memory if name == "memory" else disk, ids, args.new_tokens)[1])
                ratios.append(steps["memory"][-1] / steps["disk"][-1])
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    table_gib = sum(layer.ple.ple_embedding.ngram_embedding.weight.nbytes for layer in memory.model.layers
                    if layer.ple is not None) / 2**30
    return {"table_gib": table_gib, "tokens_identical": same, "decode_ratios": ratios,
            "decode_ratio_median": statistics.median(ratios),
            "memory_decode_tok_s": ids.shape[0] / statistics.median(steps["memory"]),
            "disk_decode_tok_s": ids.shape[0] / statistics.median(steps["disk"])}


def write_release(directory: Path, rows_per_layer: int) -> None:
    """A miniature V4.1 release: fp8 tables (ue8m0 scales per 32 values), fp8 wkv, bf16 gains, two layers."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    from engram.compat.v41_checkpoint import v41_engram_config
    from engram.hashing import NgramHasher
    from engram.quant import encode_blocks
    from engram.tokenizer import CompressedTokenizer

    vocab = {f"t{i}": i for i in range(4096)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(directory / "tokenizer.json"))
    compressed = CompressedTokenizer.from_pretrained(tokenizer)
    G, D = 4, 256
    text = {"hidden_size": D, "hc_mult": G, "num_hidden_layers": 4, "rms_norm_eps": 1e-20,
            "engram_layer_ids": [1, 3], "engram_max_ngram_size": 4, "engram_n_heads": 8,
            "engram_vocab_size": max(1000, rows_per_layer // 24), "engram_head_dim": 32,
            "engram_pad_token_id": 0, "engram_compressed_vocab_size": compressed.vocab_size}
    config, _ = v41_engram_config({"text_config": text})
    hasher = NgramHasher(config, compressed)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for lid in (1, 3):
        n = sum(hasher.geometry[lid].sizes)
        block = torch.randn(1 << 16, config.head_dim, generator=g) * 0.05
        codes, scales = encode_blocks(block[torch.arange(n) % block.shape[0]], (1, 32))
        wkv, wkv_scales = encode_blocks(torch.randn((G + 1) * D, config.memory_dim, generator=g) * 0.05, (32, 32))
        p = f"layers.{lid}.engram."
        tensors |= {p + "embed.weight": codes.view(torch.float8_e4m3fn), p + "embed.scale": scales.view(
            torch.float8_e8m0fnu), p + "wkv.weight": wkv.view(torch.float8_e4m3fn),
            p + "wkv.scale": wkv_scales.view(torch.float8_e8m0fnu),
            p + "q_weight": (1 + 0.3 * torch.randn(G, D, generator=g)).to(torch.bfloat16),
            p + "k_weight": (1 + 0.3 * torch.randn(G, D, generator=g)).to(torch.bfloat16)}
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model_type": "deepseek_v41", "text_config": text}))


def run_v41(args) -> dict:
    from safetensors.torch import load_file

    from engram.compat.deepseek import open_v41
    from engram.model.engram_v41 import EngramV41
    from engram.storage.apply import OffloadedEmbedding
    from engram.storage.stores import HostStore

    directory = Path(tempfile.mkdtemp(prefix="engram-v41-", dir="/tmp"))
    try:
        write_release(directory, args.v41_rows)
        with open_v41(directory) as release, torch.no_grad():
            tensors = load_file(str(directory / "model.safetensors"))
            whole = {lid: EngramV41.from_release_state_dict(tensors, release.config, lid)
                     for lid in release.engram_layers}
            fp8_in_ram = {lid: EngramV41.from_release_state_dict(tensors, release.config, lid)
                          for lid in release.engram_layers}
            del tensors
            for lid, layer in fp8_in_ram.items():  # the served table's fp8 codes and scales, read into RAM
                served = release.engram_layers[lid].embedding
                layer.embedding = OffloadedEmbedding(HostStore.from_store(served.store, pin=False), served.offsets,
                                                     torch.device("cpu"), torch.float32, served.prefetcher)
            g = torch.Generator().manual_seed(1)
            calls = [torch.randint(1, 4096, (8, 1), generator=g) for _ in range(args.v41_calls)]
            hidden = torch.randn(8, 1, 4, 256, generator=g)
            arms = {"served": release.engram_layers, "whole": whole, "fp8_in_ram": fp8_in_ram}

            def step(name: str) -> tuple[float, list]:
                layers, outs, history = arms[name], [], torch.zeros(8, 3, dtype=torch.long)
                t0 = time.perf_counter()
                for ids in calls:
                    hash_ids, history = release.hasher.hash_with_history(ids, history)
                    if name != "whole":  # the tiers' prefetch: the rows of every layer, gathered once
                        for lid, layer in layers.items():
                            layer.embedding.prefetch(hash_ids[lid])
                    outs.append([layers[lid](hidden, hash_ids[lid]) for lid in sorted(layers)])
                return time.perf_counter() - t0, outs

            out = {name: step(name)[1] for name in arms}
            equal = all(torch.equal(a, b) for name in ("whole", "fp8_in_ram")
                        for x, y in zip(out["served"], out[name]) for a, b in zip(x, y))
            ratios = {"whole": [], "fp8_in_ram": []}
            order = list(arms)
            for r in range(args.rounds):
                times = {name: step(name)[0] for name in order[r % 3:] + order[:r % 3]}  # each arm first in turn
                for name in ratios:
                    ratios[name].append(times[name] / times["served"])
            rows = sum(layer.embedding.num_rows for layer in release.engram_layers.values())
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return {"rows": rows, "outputs_equal": equal, "call_ratios": ratios["whole"],
            "call_ratio_median": statistics.median(ratios["whole"]), "fp8_in_ram_ratios": ratios["fp8_in_ram"],
            "fp8_in_ram_ratio_median": statistics.median(ratios["fp8_in_ram"])}


def worker(args, name: str, directory: Path | None = None) -> dict:
    cmd = [sys.executable, __file__, *sys.argv[1:], "--worker", name] + (["--dir", str(directory)] if directory else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--big-gb", type=float, default=30.0, help="PLE tables of the bigger-than-RAM run, GiB (0: skip)")
    p.add_argument("--paired-gb", type=float, default=1.0, help="PLE tables of the paired run, GiB (default 1)")
    p.add_argument("--v41-rows", type=int, default=2_000_000, help="rows per V4.1 table (default 2M, fp8)")
    p.add_argument("--v41-calls", type=int, default=32, help="decode-sized calls per V4.1 timing (default 32)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=17)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps({"big": run_big, "paired": run_paired, "v41": run_v41}[args.worker](args)))
        return 0
    results = {"paired": worker(args, "paired")}
    print(f"paired Qwen4-Exp ({results['paired']['table_gib']:.2f} GiB): in-memory / disk decode time, median "
          f"{results['paired']['decode_ratio_median']:.3f} over {args.rounds} rounds "
          f"{[round(r, 3) for r in results['paired']['decode_ratios']]}; tokens identical: "
          f"{results['paired']['tokens_identical']}", flush=True)
    results["v41"] = worker(args, "v41")
    print(f"V4.1 layers ({results['v41']['rows']:,} rows, fp8): whole / served call time, median "
          f"{results['v41']['call_ratio_median']:.3f} {[round(r, 3) for r in results['v41']['call_ratios']]}; "
          f"fp8 rows in RAM / served: median {results['v41']['fp8_in_ram_ratio_median']:.3f} "
          f"{[round(r, 3) for r in results['v41']['fp8_in_ram_ratios']]}; "
          f"outputs equal: {results['v41']['outputs_equal']}", flush=True)
    if args.big_gb > 0:
        directory = Path(tempfile.mkdtemp(prefix="engram-q4big-", dir="/tmp"))
        try:
            seconds = write_big_tables(args, directory)
            print(f"wrote {args.big_gb:.0f} GiB of PLE rows in {seconds:.0f}s", flush=True)
            drop_page_cache(directory)  # the run starts cold, as after a reboot
            results["big"] = worker(args, "big", directory)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        big = results["big"]
        print(f"bigger than RAM: {big['table_gib']:.1f} GiB of PLE tables; prefill {big['prefill_tok_s']:,.0f} tok/s, "
              f"decode {big['decode_tok_s']:,.1f} tok/s (first call's prefill: {big['first_call_prefill_tok_s']:,.0f} "
              f"tok/s); peak RSS {big['peak_rss_mb']:,.0f} MB, anon RSS "
              f"{big['anon_rss_mb']:,.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

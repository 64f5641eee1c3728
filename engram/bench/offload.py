"""Engram table tiers: prefill and decode throughput with the tables on device, in host RAM, on disk
(warm page cache), on disk behind a row cache, and on disk with a cold page cache, each relative to
device in the same run. Run it as ``engram bench offload`` or ``python benchmarks/offload.py``.

Legend: B prompts, T prompt length, H hash heads, d_h row width.

Model: the ``tiny-engram`` backbone (or ``--preset``, e.g. ``tiny-engram-v41``) with its Engram tables
scaled to ``--table-gb`` in total (rows of
``--head-dim`` floats; the default 64 makes a row 256 bytes, so a disk read fetches few rows per page).
``--format`` stores the host and disk tiers' rows in that format (e.g. fp8_e4m3, DeepSeek-V4.1's); the
device model's rows are then the format's decoded values, so the in-memory baseline is the fp32 table a
model holds after decoding a quantised release, and the host tier the same format held in RAM.
Tables are filled by tiling one random block (memcpy speed, not ``normal_``): values do not matter
for timing, and every tier must still produce the same greedy tokens, which the script checks.
The tables are exported once to ``--dir`` (default a fresh directory under /tmp; it needs
``--table-gb`` of disk space and is deleted afterwards unless ``--keep``), then read once to warm the
page cache. Each tier runs in its own process, so the peak RSS (``VmHWM``, else ``resource.getrusage``) is
that tier's alone. For the disk tiers it includes the page-cache pages the memory map touched (shared
and reclaimable); ``RssAnon`` is the process's own memory, reported beside it.

Prompts are Zipf-distributed token ids (text-like reuse, so a cache can hit). Prefill: tokens/s of
one full forward over (B, T), median of ``--repeats``. Decode: ``generate_batch`` greedy,
tokens/s over the steps after the first token, best of ``--repeats``.

Tiers measured in separate processes, minutes apart, drift with the machine's load (±0.2 on a
2-core box). So one more process (``--paired``, on by default when device and a warm offloaded tier
run) holds a model per warm tier, times them round-robin in the same rounds, and reports the median
over rounds of each tier's time ratio to device: a paired ratio, which load moves on both sides.

    engram bench offload [--table-gb 2] [--format float32] [--head-dim 64] [--batch 8] [--seq 128] [--new-tokens 32]
                         [--cache-rows 65536] [--policy lru] [--repeats 5] [--threads 2]
                         [--dir DIR] [--keep] [--no-paired] [--json PATH]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from engram.infer import generate_batch
from engram.model.transformer import EngramLM
from engram.presets import get_preset
from engram.storage import StorageHandle, apply_storage, export_tables
from engram.storage.formats import FORMATS, row_format

TIERS = [("device", 0), ("host", 0), ("disk", 0), ("disk+cache", None)]  # None: --cache-rows
COLD_RUNS = 3  # fresh processes for the cold-page-cache tier; the median is reported


def config_for(table_gb: float, head_dim: int, engram_layers: int = 1, preset: str = "tiny-engram"):
    config = get_preset(preset)
    e = config.engram
    # several layers split a huge table into allocations the kernel's overcommit heuristic accepts
    e.layer_ids = list(range(1, 1 + engram_layers)) if engram_layers <= 3 else list(range(engram_layers))
    per_head = int(table_gb * 2**30 / (head_dim * 4) / (e.n_heads * len(e.layer_ids)))
    e.engram_vocab_size = [per_head] * (e.max_ngram_size - 1)
    e.n_embed_per_ngram = head_dim * e.n_head_per_ngram
    return config


def build(args, fill: bool) -> EngramLM:
    """The benchmark model: built on meta, materialised, dense weights initialised, table rows left
    to this function. A multi-GB N(0,1) fill costs seconds and, for the disk tiers, would make the
    table's pages resident (inflating peak RSS) before the tier frees them; untouched rows read as
    zero pages, and ``fill`` tiles one random block over them (memcpy speed)."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = EngramLM(config_for(args.table_gb, args.head_dim, args.engram_layers, args.preset))
    model.to_empty(device="cpu")
    model.init_weights(tables=False)
    model.eval()
    if fill:
        width = args.head_dim  # one random block of whole rows, rounded through the stored format: the device
        block = torch.randn((1 << 20) // width, width, generator=torch.Generator().manual_seed(1))  # model then
        block = row_format(args.format).decode(*row_format(args.format).encode(block)).view(-1)  # equals its rows
        for layer in model.engram_layers.values():
            flat = layer.embedding.weight.data.view(-1)
            for start in range(0, flat.numel(), block.numel()):
                piece = flat[start: start + block.numel()]
                piece.copy_(block[: piece.numel()])
    return model


def prompts(args) -> list[list[int]]:
    rng = np.random.default_rng(0)
    vocab = get_preset(args.preset).backbone.vocab_size
    ids = (rng.zipf(1.3, size=(args.batch, args.seq)) - 1) % vocab
    return ids.tolist()


def drop_page_cache(directory: Path) -> None:
    """Evict the table files from the page cache (POSIX_FADV_DONTNEED: clean pages, no root needed).
    Only pages no process has mapped are dropped, so this makes the *first* access in a fresh process
    cold; that is what the disk-cold tier measures."""
    for path in sorted(directory.glob("layer_*.bin")):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_cold(args) -> dict:
    """Worker process: one generate_batch straight after dropping the page cache. Prefill is the time
    to the first token; decode the rest (new n-grams mostly read rows not read before, so cold too)."""
    torch.set_num_threads(args.threads)
    model = build(args, fill=False)
    drop_page_cache(Path(args.dir))
    batch = prompts(args)
    with apply_storage(model, "disk", args.dir), torch.no_grad():
        to_first, after_first, tokens = timed_generation(model, batch, args.new_tokens)
    return {"tier": "disk-cold", "cache_rows": 0, "prefill_tok_s": args.batch * args.seq / to_first,
            "decode_tok_s": args.batch * (args.new_tokens - 1) / after_first, "hit_rate": None,
            "store_ram_mb": 0.0, "peak_rss_mb": proc_status_mb("VmHWM"), "anon_rss_mb": proc_status_mb("RssAnon"),
            "tokens": tokens}


def run_tier(args) -> dict:
    """Worker process: one tier, timed; prints one JSON line."""
    if args.worker == "disk-cold":
        return run_cold(args)
    if args.worker == "paired":
        return run_paired(args)
    torch.set_num_threads(args.threads)
    tier, cache_rows = args.worker, args.worker_cache_rows
    model, handle = tier_model(args, tier, cache_rows)
    batch = prompts(args)
    ids = torch.tensor(batch)
    with handle, torch.no_grad():
        model(ids)  # warm-up (and, for a cache, its first fill)
        prefill = [timed_forward(model, ids) for _ in range(args.repeats)]
        decode, tokens = [], None
        for _ in range(args.repeats):
            _, after_first, tokens = timed_generation(model, batch, args.new_tokens)
            decode.append(after_first)
        stats = handle.stats()
    layers = stats["layers"].values()
    hits, misses = sum(s["hits"] for s in layers), sum(s["misses"] for s in layers)
    return {"tier": tier, "cache_rows": cache_rows,
            "prefill_tok_s": args.batch * args.seq / statistics.median(prefill),
            "decode_tok_s": args.batch * (args.new_tokens - 1) / min(decode),
            "hit_rate": hits / (hits + misses) if cache_rows else None, "store_ram_mb": stats["ram_bytes"] / 2**20,
            "peak_rss_mb": proc_status_mb("VmHWM"), "anon_rss_mb": proc_status_mb("RssAnon"), "tokens": tokens}


def tier_cache_rows(args, rows: int | None) -> int:
    """Cache rows of a ``TIERS`` entry: None means ``--cache-rows``."""
    return args.cache_rows if rows is None else rows


def tier_model(args, tier: str, cache_rows: int) -> tuple[EngramLM, StorageHandle]:
    """The benchmark model with its tables on ``tier`` (device/host are filled in RAM, disk reads
    ``--dir``), and the storage handle to close."""
    model = build(args, fill=tier in ("device", "host"))
    from_files = tier.startswith("disk") or (tier == "host" and args.format != "float32")  # host: in its format
    handle = apply_storage(model, tier.split("+")[0], args.dir if from_files else None, cache_rows, args.policy)
    return model, handle


def timed_forward(model, ids: torch.Tensor) -> float:
    """Seconds of one full forward over (B, T): the prefill time."""
    t0 = time.perf_counter()
    model(ids)
    return time.perf_counter() - t0


def timed_generation(model, batch: list[list[int]], new_tokens: int) -> tuple[float, float, list]:
    """One greedy ``generate_batch``: (seconds to the first token, seconds after it, tokens)."""
    first = []
    t0 = time.perf_counter()
    tokens = generate_batch(model, batch, new_tokens, temperature=0,
                            on_token=lambda row, tok: first or first.append(time.perf_counter()))
    return first[0] - t0, time.perf_counter() - first[0], tokens


def run_paired(args) -> dict:
    """Worker process: one model per warm tier of ``--tiers``, timed round-robin in the same rounds;
    per tier, the median over rounds of device time / tier time (prefill forward, decode steps)."""
    torch.set_num_threads(args.threads)
    batch = prompts(args)
    ids = torch.tensor(batch)
    wanted = args.tiers.split(",")
    models = {}
    with contextlib.ExitStack() as stack, torch.no_grad():
        for tier, rows in TIERS:
            if tier in wanted:
                model, handle = tier_model(args, tier, tier_cache_rows(args, rows))
                models[tier] = model
                stack.enter_context(handle)
        tokens = {tier: timed_generation(model, batch, args.new_tokens)[2] for tier, model in models.items()}
        prefill = {tier: [] for tier in models}
        decode = {tier: [] for tier in models}
        for _ in range(args.repeats):
            for tier, model in models.items():
                prefill[tier].append(timed_forward(model, ids))
                decode[tier].append(timed_generation(model, batch, args.new_tokens)[1])
    same = all(t == tokens["device"] for t in tokens.values())
    return {"tokens_identical": same, "rounds": args.repeats, "tiers": {
        tier: {"prefill_vs_device": statistics.median(d / t for d, t in zip(prefill["device"], prefill[tier])),
               "decode_vs_device": statistics.median(d / t for d, t in zip(decode["device"], decode[tier]))}
        for tier in models}}


def proc_status_mb(field: str) -> float:
    """A /proc/self/status memory field in MB. Peak RSS is ``VmHWM`` where it exists: ``getrusage``
    ru_maxrss carries the parent's peak across fork+exec, so every tier would report the exporting
    parent's high-water mark. Peak RSS counts page-cache pages mapped by the disk tier's memmap
    (shared and reclaimable); ``RssAnon`` (now, at the end of the run) is the process's own memory."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if field == "VmHWM" else float("nan")


def warm_page_cache(directory: Path) -> None:
    for path in sorted(directory.glob("layer_*.bin")):
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    from engram.argtypes import directory, nonnegative_int, positive_float, positive_int

    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--table-gb", type=positive_float, default=2.0, help="total Engram table size in GiB (default 2)")
    p.add_argument("--preset", default="tiny-engram", help="model preset whose Engram tables are scaled (default "
                                                           "tiny-engram; tiny-engram-v41 for DeepSeek-V4.1's module)")
    p.add_argument("--head-dim", type=positive_int, default=64, help="row width d_h in floats (default 64)")
    p.add_argument("--format", default="float32", choices=sorted(FORMATS),
                   help="stored row format of the host and disk tiers (default float32; fp8_e4m3 is DeepSeek-V4.1's). "
                        "The device model's rows are rounded through it, so every tier computes the same tokens")
    p.add_argument("--batch", type=positive_int, default=8, help="prompts per batch (default 8)")
    p.add_argument("--seq", type=positive_int, default=128, help="prompt length (default 128)")
    p.add_argument("--new-tokens", type=positive_int, default=32, help="greedy tokens per prompt (default 32)")
    p.add_argument("--cache-rows", type=nonnegative_int, default=65536, help="rows per layer in the disk+cache tier")
    p.add_argument("--policy", default="lru", choices=["lru", "lfu"], help="cache policy (default lru)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed calls per measurement (default 5)")
    p.add_argument("--threads", type=positive_int, default=2, help="torch threads (default 2)")
    p.add_argument("--dir", default=None, type=directory, help="tables directory (default: a new one under /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the exported tables")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--engram-layers", type=int, default=1, choices=range(1, 5),
                   help="Engram layers the table size is split over (default 1; use 3 for tables above RAM)")
    p.add_argument("--tiers", default="device,host,disk,disk+cache,disk-cold",
                   help="comma-separated tiers to run (default all). Without device and host the tables are "
                        "never filled in RAM (exported as zeros, which is what lets a table exceed RAM)")
    p.add_argument("--paired", action=argparse.BooleanOptionalAction, default=True,
                   help="also time device and the warm offloaded tiers round-robin in one process and report "
                        "paired ratios (default on; needs device and host, disk or disk+cache in --tiers)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-cache-rows", type=int, default=0, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """``engram bench offload`` and ``benchmarks/offload.py``: each tier runs in a fresh process."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(prog).parse_args(argv)
    if args.worker:
        print(json.dumps(run_tier(args)))
        return 0

    made_dir = args.dir is None
    directory = Path(args.dir or tempfile.mkdtemp(prefix="engram-offload-", dir="/tmp"))
    try:
        t0 = time.perf_counter()
        torch.set_num_threads(args.threads)
        tiers = args.tiers.split(",")
        unknown = sorted(set(tiers) - {t for t, _ in TIERS} - {"disk-cold"})
        if unknown:
            raise SystemExit(f"unknown tiers {unknown}")
        in_ram = bool({"device", "host"} & set(tiers))
        model = build(args, fill=in_ram)  # untouched tables read as zero pages: RSS stays small
        export_tables(model, directory, dtype=args.format)
        table_bytes = sum(f.stat().st_size for f in directory.glob("layer_*.bin"))
        del model
        print(f"exported {table_bytes / 2**30:.2f} GiB of tables to {directory} in {time.perf_counter() - t0:.1f}s "
              f"(uses that much disk; {'kept' if args.keep else 'deleted at the end'})", flush=True)
        warm_page_cache(directory)
        results = []
        def worker(tier: str, rows: int) -> dict:
            cmd = [sys.executable, "-m", "engram.bench.offload", *argv, "--dir", str(directory),
                   "--worker", tier, "--worker-cache-rows", str(rows)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            return json.loads(out.strip().splitlines()[-1])

        for tier, rows in TIERS:
            if tier in tiers:
                results.append(worker(tier, tier_cache_rows(args, rows)))
                print(f"  {tier}: done", flush=True)
        if "disk-cold" in tiers:
            cold = sorted((worker("disk-cold", 0) for _ in range(COLD_RUNS)), key=lambda r: r["decode_tok_s"])
            results.append(cold[COLD_RUNS // 2])
            print(f"  disk-cold: done ({COLD_RUNS} fresh processes, median by decode speed)", flush=True)
        paired = None
        if args.paired and "device" in tiers and {"host", "disk", "disk+cache"} & set(tiers):
            paired = worker("paired", 0)
            print(f"  paired: done (the warm tiers in one process, {args.repeats} rounds)", flush=True)
    finally:
        if not args.keep and made_dir:
            shutil.rmtree(directory, ignore_errors=True)
        elif not args.keep:  # a directory the user named: remove only what the benchmark wrote
            for f in directory.glob("*"):
                if f.name.startswith(("layer_", "manifest")):
                    f.unlink(missing_ok=True)

    device = next((r for r in results if r["tier"] == "device"), None)
    same = all(r["tokens"] == results[0]["tokens"] for r in results) and (paired is None or paired["tokens_identical"])
    print(f"\nEngram tables {table_bytes / 2**30:.2f} GiB as {args.format}, d_h={args.head_dim}, "
          f"B x T = {args.batch} x {args.seq}, "
          f"{args.new_tokens} new tokens, {args.threads} threads; greedy tokens identical across tiers: {same}")
    print(f"{'tier':<12} {'prefill tok/s':>14} {'vs device':>10} {'paired':>7} {'decode tok/s':>13} {'vs device':>10} "
          f"{'paired':>7} {'hit rate':>9} {'store RAM MB':>13} {'peak RSS MB':>12} {'anon RSS MB':>12}")
    def ratio(value: float | None, width: int) -> str:
        return f"{'-' if value is None else f'{value:.3f}':>{width}}"

    for r in results:
        r["prefill_vs_device"] = r["prefill_tok_s"] / device["prefill_tok_s"] if device else None
        r["decode_vs_device"] = r["decode_tok_s"] / device["decode_tok_s"] if device else None
        pair = (paired or {"tiers": {}})["tiers"].get(r["tier"], {})
        r["paired_prefill_vs_device"] = pair.get("prefill_vs_device")
        r["paired_decode_vs_device"] = pair.get("decode_vs_device")
        hit = "-" if r["hit_rate"] is None else f"{r['hit_rate']:.1%}"
        print(f"{r['tier']:<12} {r['prefill_tok_s']:>14,.0f} {ratio(r['prefill_vs_device'], 10)} "
              f"{ratio(r['paired_prefill_vs_device'], 7)} {r['decode_tok_s']:>13,.0f} "
              f"{ratio(r['decode_vs_device'], 10)} {ratio(r['paired_decode_vs_device'], 7)} {hit:>9} "
              f"{r['store_ram_mb']:>13,.1f} {r['peak_rss_mb']:>12,.0f} {r['anon_rss_mb']:>12,.0f}")
    if paired:
        print(f"paired: median over {paired['rounds']} rounds of device time / tier time, all warm tiers in one "
              "process, timed round-robin")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if not k.startswith("worker")},
                                               "table_bytes": table_bytes, "tokens_identical": same,
                                               "results": [{k: v for k, v in r.items() if k != "tokens"} for r in results]},
                                              indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

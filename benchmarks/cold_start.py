"""Cold prefill from the disk tier, before and after the batched read-ahead, in one run.

Before: the rows of a batch are copied out of the memory map, and every page not yet in the page cache is
read by its own fault, one at a time (the table file's pages are random 4 KiB reads). After
(``DiskStore.read_ahead``, the default): the batch's row ids (sorted, de-duplicated) become merged runs of
pages, and all their reads are queued at once (``posix_fadvise(WILLNEED)``), so the device works at high
queue depth, before the map is touched.

The model is ``tiny-engram`` with Engram tables of ``--table-gb`` in total (rows of 64 floats: a row is
256 bytes, 16 per page), exported once to a temporary directory. Each measurement is a fresh process: it
drops the table files from the page cache (``POSIX_FADV_DONTNEED``), applies the disk tier (read-ahead on
or off), times one prefill forward over B x T Zipf-distributed prompts (cold), then the same forward
three more times (warm: the median, to show what the read-ahead costs once the pages are cached). Modes
alternate over ``--rounds`` rounds (before, after, after, before, ...), and the median per mode is
reported with its range. Logits must be identical between modes (checked).

    python benchmarks/cold_start.py [--table-gb 2] [--rounds 5] [--batch 8] [--seq 128] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from engram.bench.offload import build, drop_page_cache, prompts
from engram.storage import apply_storage, export_tables
from engram.storage.stores import DiskStore


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    model = build(args, fill=False)
    drop_page_cache(Path(args.dir))
    DiskStore.readahead = args.worker == "after"
    ids = torch.tensor(prompts(args))
    with apply_storage(model, "disk", args.dir), torch.no_grad():
        t0 = time.perf_counter()
        logits = model(ids).logits
        cold = time.perf_counter() - t0
        warm = []
        for _ in range(3):
            t0 = time.perf_counter()
            model(ids)
            warm.append(time.perf_counter() - t0)
    tokens = args.batch * args.seq
    return {"mode": args.worker, "cold_tok_s": tokens / cold, "warm_tok_s": tokens / statistics.median(warm),
            "logits_sum": float(logits.double().sum())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--table-gb", type=float, default=2.0, help="total Engram table size in GiB (default 2)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--preset", default="tiny-engram", help="model preset whose tables are scaled (default tiny-engram)")
    p.add_argument("--engram-layers", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5, help="cold runs per mode (default 5)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    directory = Path(tempfile.mkdtemp(prefix="engram-cold-", dir="/tmp"))
    try:
        t0 = time.perf_counter()
        export_tables(build(args, fill=True), directory)
        size = sum(f.stat().st_size for f in directory.glob("layer_*.bin"))
        print(f"exported {size / 2**30:.2f} GiB in {time.perf_counter() - t0:.0f}s", flush=True)
        runs = {"before": [], "after": []}
        for r in range(args.rounds):
            for mode in (("before", "after") if r % 2 == 0 else ("after", "before")):
                cmd = [sys.executable, __file__, *sys.argv[1:], "--dir", str(directory), "--worker", mode]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
                runs[mode].append(json.loads(out.strip().splitlines()[-1]))
                print(f"  round {r} {mode}: cold {runs[mode][-1]['cold_tok_s']:,.0f} tok/s", flush=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    same = len({run["logits_sum"] for mode in runs.values() for run in mode}) == 1
    summary = {}
    for mode, results in runs.items():
        cold = [r["cold_tok_s"] for r in results]
        warm = [r["warm_tok_s"] for r in results]
        summary[mode] = {"cold_tok_s": statistics.median(cold), "cold_range": [min(cold), max(cold)],
                         "warm_tok_s": statistics.median(warm), "warm_range": [min(warm), max(warm)]}
    print(f"\ntables {size / 2**30:.2f} GiB, d_h={args.head_dim}, B x T = {args.batch} x {args.seq}, "
          f"{args.rounds} fresh processes per mode; logits identical across modes: {same}")
    print(f"{'mode':<8} {'cold prefill tok/s':>19} {'range':>17} {'warm prefill tok/s':>19} {'range':>17}")
    for mode, s in summary.items():
        print(f"{mode:<8} {s['cold_tok_s']:>19,.0f} {s['cold_range'][0]:>8,.0f}-{s['cold_range'][1]:<8,.0f} "
              f"{s['warm_tok_s']:>19,.0f} {s['warm_range'][0]:>8,.0f}-{s['warm_range'][1]:<8,.0f}")
    speedup = summary["after"]["cold_tok_s"] / summary["before"]["cold_tok_s"]
    warm_ratio = summary["after"]["warm_tok_s"] / summary["before"]["warm_tok_s"]
    print(f"cold prefill after / before: {speedup:.2f}x; warm prefill after / before: {warm_ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "runs": runs, "cold_speedup": speedup,
                                               "warm_ratio": warm_ratio, "logits_identical": same}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

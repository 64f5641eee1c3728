"""DiskStore.gather: rows asked in ascending order (what OffloadedEmbedding and RowCache pass) against
the same rows in shuffled order, which takes the sort-and-reorder path every call used to take.

A (rows, d_h) fp32 table is written to a temporary file and memory-mapped; the page cache is warm
after the first call, so this times the gather itself, not the disk. Reported: median ms per call for
each order and each batch of distinct rows, and the ratio shuffled / ascending (the speed-up of the
ascending fast path).

    python benchmarks/disk_gather.py [--rows 2000000] [--dim 64] [--batches 1024 8192 32768] [--repeats 30]
                                     [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from engram.storage.stores import DiskStore


def median_ms(store: DiskStore, rows: torch.Tensor, repeats: int) -> float:
    store.gather(rows)  # warm the pages
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        store.gather(rows)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="table rows (default 2M)")
    parser.add_argument("--dim", type=int, default=64, help="row width d_h (default 64)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1024, 8192, 32768],
                        help="distinct rows per call (default 1024 8192 32768)")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per median (default 30)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)

    gen = torch.Generator().manual_seed(0)
    results = []
    with tempfile.NamedTemporaryFile(suffix=".bin") as f:
        np.random.default_rng(0).standard_normal((args.rows, args.dim), dtype=np.float32).tofile(f.name)
        store = DiskStore(f.name, args.rows, args.dim)
        for n in args.batches:
            ascending = torch.unique(torch.randint(0, args.rows, (n,), generator=gen), sorted=True)
            shuffled = ascending[torch.randperm(len(ascending), generator=gen)]
            assert torch.equal(store.gather(shuffled), store.gather(ascending)[torch.argsort(torch.argsort(shuffled))])
            results.append({"rows": len(ascending), "ascending_ms": median_ms(store, ascending, args.repeats),
                            "shuffled_ms": median_ms(store, shuffled, args.repeats)})

    print(f"DiskStore.gather, {args.rows:,} x {args.dim} fp32 memmap, warm page cache, median of {args.repeats}")
    print(f"{'rows':>8} {'ascending ms':>13} {'shuffled ms':>12} {'shuffled / ascending':>21}")
    for r in results:
        print(f"{r['rows']:>8,} {r['ascending_ms']:>13.3f} {r['shuffled_ms']:>12.3f} "
              f"{r['shuffled_ms'] / r['ascending_ms']:>20.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

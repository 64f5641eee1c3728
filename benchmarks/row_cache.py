"""RowCache.gather against the store gather it sits in front of: what the cache's bookkeeping costs
per call, with its hit rate.

The store is a warm (rows, d_h) fp32 table in RAM (``HostStore``), the fastest store there is, so the
ratio cache / store is the bookkeeping's price in the worst case for the cache. In front of a slow tier
(cold disk, or host rows copied to a GPU) a hit saves far more than it costs here. Each call asks for
the distinct rows of ``n`` Zipf(1.2) draws scattered over the table (text n-grams are Zipfian; hashing
scatters them); decode asks for a few dozen rows per layer and step, prefill for thousands. Every
stream warms the cache with ``--warmup`` calls, then the mean time per call over ``--calls`` calls is
reported (a mean, not a median: eviction work may land on some calls only). Before anything is timed,
every call's rows are checked against the store's.

    python benchmarks/row_cache.py [--rows 2000000] [--dim 64] [--capacity 65536] [--requests 64 1024 16384]
                                   [--calls 200] [--warmup 100] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from engram.storage import HostStore, RowCache


def stream(rows: int, draws: int, calls: int, seed: int) -> list[torch.Tensor]:
    """``calls`` requests of the distinct rows of ``draws`` Zipf draws, each ascending (as the embedding asks)."""
    rng = np.random.default_rng(seed)
    scatter = rng.permutation(rows)  # rank -> row: hot rows are spread over the table
    out = []
    for _ in range(calls):
        ranks = (rng.zipf(1.2, size=draws) - 1) % rows
        out.append(torch.from_numpy(np.unique(scatter[ranks])))
    return out


def mean_ms(store, requests: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for rows in requests:
        store.gather(rows)
    return (time.perf_counter() - start) / len(requests) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="table rows (default 2M)")
    parser.add_argument("--dim", type=int, default=64, help="row width d_h (default 64)")
    parser.add_argument("--capacity", type=int, default=65536, help="cache rows (default 65536)")
    parser.add_argument("--requests", type=int, nargs="+", default=[64, 1024, 16384],
                        help="Zipf draws per call (default 64 1024 16384)")
    parser.add_argument("--calls", type=int, default=200, help="timed calls per stream (default 200)")
    parser.add_argument("--warmup", type=int, default=100, help="calls that fill the cache first (default 100)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    store = HostStore(torch.randn(args.rows, args.dim, generator=torch.Generator().manual_seed(0)), pin=False)
    results = []
    for draws in args.requests:
        requests = stream(args.rows, draws, args.warmup + args.calls, seed=draws)
        warm, timed = requests[: args.warmup], requests[args.warmup:]
        row = {"draws": draws, "mean_rows": float(np.mean([len(r) for r in timed])),
               "store_ms": mean_ms(store, timed)}
        for policy in ("lru", "lfu"):
            cache = RowCache(store, args.capacity, policy)
            for rows in warm:
                assert torch.equal(cache.gather(rows), store.gather(rows))
            hits, misses = cache.hits, cache.misses
            row[f"{policy}_ms"] = mean_ms(cache, timed)
            row[f"{policy}_hit_rate"] = (cache.hits - hits) / (cache.hits - hits + cache.misses - misses)
        results.append(row)

    print(f"RowCache ({args.capacity:,} rows) in front of a warm {args.rows:,} x {args.dim} fp32 HostStore, "
          f"mean of {args.calls} calls after {args.warmup} warm-up calls, {args.threads} thread(s)")
    print(f"{'draws':>6} {'rows/call':>9} {'store ms':>9} {'lru ms':>8} {'lru/store':>10} {'lru hits':>9} "
          f"{'lfu ms':>8} {'lfu/store':>10} {'lfu hits':>9}")
    for r in results:
        print(f"{r['draws']:>6,} {r['mean_rows']:>9,.0f} {r['store_ms']:>9.3f} {r['lru_ms']:>8.3f} "
              f"{r['lru_ms'] / r['store_ms']:>9.1f}x {r['lru_hit_rate']:>8.1%} {r['lfu_ms']:>8.3f} "
              f"{r['lfu_ms'] / r['store_ms']:>9.1f}x {r['lfu_hit_rate']:>8.1%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

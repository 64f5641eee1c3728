"""DiskStore.gather: rows asked in ascending order (what OffloadedEmbedding and RowCache pass) against
the same rows in shuffled order, which takes the sort-and-reorder path every call used to take, and
against the same rows gathered from RAM (a HostStore of the same stored codes), the baseline a disk
tier is held to.

A (rows, d_h) table is encoded in ``--format`` (fp32 by default; fp8_e4m3 is DeepSeek-V4.1's), written to
a temporary file and memory-mapped; the page cache is warm after the first call, so this times the
gather itself (copy and decode), not the disk. Reported: median ms per call for each order and each
batch of distinct rows, shuffled / ascending (the speed-up of the ascending fast path) and ascending /
RAM (what the map costs over RAM).

    python benchmarks/disk_gather.py [--rows 2000000] [--dim 64] [--format float32] [--batches 192 1024 8192 32768]
                                     [--repeats 30] [--json PATH]
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

from engram.storage import FORMATS, row_format
from engram.storage.stores import DiskStore, HostStore


def median_ms(store, rows: torch.Tensor, repeats: int) -> float:
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
    parser.add_argument("--format", default="float32", choices=sorted(FORMATS),
                        help="stored row format (default float32)")
    parser.add_argument("--batches", type=int, nargs="+", default=[192, 1024, 8192, 32768],
                        help="distinct rows per call (default 192 1024 8192 32768; 192: a V4.1 decode step)")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per median (default 30)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    gen = torch.Generator().manual_seed(0)
    fmt = row_format(args.format)
    results = []
    with tempfile.TemporaryDirectory(prefix="engram-gather-", dir="/tmp") as tmp:
        rows = torch.from_numpy(np.random.default_rng(0).standard_normal((args.rows, args.dim), dtype=np.float32))
        codes, scales = fmt.encode(rows)
        del rows
        files = [f"{tmp}/codes.bin", f"{tmp}/scales.bin"]
        codes.view(torch.uint8).numpy().tofile(files[0])
        if scales is not None:
            scales.view(torch.uint8).numpy().tofile(files[1])
        store = DiskStore(files[0], args.rows, args.dim, fmt, None if scales is None else files[1])
        host = HostStore(codes, False, fmt, scales)
        for n in args.batches:
            ascending = torch.unique(torch.randint(0, args.rows, (n,), generator=gen), sorted=True)
            shuffled = ascending[torch.randperm(len(ascending), generator=gen)]
            assert torch.equal(store.gather(shuffled), store.gather(ascending)[torch.argsort(torch.argsort(shuffled))])
            assert torch.equal(store.gather(ascending), host.gather(ascending))
            results.append({"rows": len(ascending), "ascending_ms": median_ms(store, ascending, args.repeats),
                            "shuffled_ms": median_ms(store, shuffled, args.repeats),
                            "ram_ms": median_ms(host, ascending, args.repeats)})

    print(f"DiskStore.gather, {args.rows:,} x {args.dim} {args.format} memmap, warm page cache, median of "
          f"{args.repeats}, one thread; RAM: a HostStore of the same codes")
    print(f"{'rows':>8} {'ascending ms':>13} {'shuffled ms':>12} {'RAM ms':>8} {'shuffled / ascending':>21} "
          f"{'ascending / RAM':>16}")
    for r in results:
        print(f"{r['rows']:>8,} {r['ascending_ms']:>13.3f} {r['shuffled_ms']:>12.3f} {r['ram_ms']:>8.3f} "
              f"{r['shuffled_ms'] / r['ascending_ms']:>20.1f}x {r['ascending_ms'] / r['ram_ms']:>15.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

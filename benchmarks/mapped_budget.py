"""DiskStore over its mapped budget: decode-sized gathers from a table a little larger than the budget,
with no budget (the baseline), with the release of the whole map the store used to do, and with today's
release, a chunk at a time round the map until the process is one chunk under its budget.

A fresh (rows, d_h) fp32 table is written to a temporary file, so the page cache holds it in large folios
and one page fault maps up to 2 MiB of it: past the budget, every row a gather touches in a released part
is a fault. The three policies are timed round-robin in one process over ``--rounds`` rounds of
``--gathers`` gathers of ``--rows-per-gather`` distinct random rows (a decode step's 192 rows by default).
Reported: the median microseconds per gather, the minor page faults per gather, and each policy's time
over the baseline's.

    python benchmarks/mapped_budget.py [--table-gb 1.1] [--budget-gb 1.0] [--dim 256] [--rows-per-gather 192]
                                       [--gathers 2000] [--rounds 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time

import numpy as np
import torch

from engram.storage.stores import DiskStore

POLICIES = ("no budget", "release all", "release to budget")


def write_table(path: str, rows: int, dim: int) -> None:
    block = np.random.default_rng(0).standard_normal((1 << 14, dim)).astype(np.float32)
    with open(path, "wb") as f:
        for start in range(0, rows, len(block)):
            f.write(block[: min(len(block), rows - start)].tobytes())


class ReleaseAll(DiskStore):
    """The release the store did before: every page-table entry of its maps."""

    def release_mappings(self, everything: bool = True) -> None:
        super().release_mappings(everything=True)


def run(store: DiskStore, requests: list[torch.Tensor]) -> tuple[float, float]:
    """(seconds, minor faults) for ``requests`` gathered from ``store``."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.perf_counter()
    for rows in requests:
        store.gather(rows)
    return time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--table-gb", type=float, default=1.1, help="table size, GiB (default 1.1)")
    parser.add_argument("--budget-gb", type=float, default=1.0, help="mapped budget, GiB (default 1.0, the default)")
    parser.add_argument("--dim", type=int, default=256, help="row width in floats (default 256)")
    parser.add_argument("--rows-per-gather", type=int, default=192)
    parser.add_argument("--gathers", type=int, default=2000, help="gathers per timed run (default 2000)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = int(args.table_gb * (1 << 30)) // (args.dim * 4)
    budget = int(args.budget_gb * (1 << 30))
    with tempfile.TemporaryDirectory(prefix="engram-budget-", dir="/tmp") as tmp:
        path = os.path.join(tmp, "table.bin")
        write_table(path, rows, args.dim)
        # one store per policy, all over the same map (one per file and process), so they share its pages
        kinds = (DiskStore, ReleaseAll, DiskStore)
        stores = {policy: kind(path, rows, args.dim) for policy, kind in zip(POLICIES, kinds)}
        stores["no budget"].mapped_budget = 1 << 60
        stores["release all"].mapped_budget = stores["release to budget"].mapped_budget = budget
        rng = np.random.default_rng(1)
        requests = [torch.from_numpy(np.unique(rng.integers(0, rows, args.rows_per_gather)))
                    for _ in range(args.gathers)]
        run(stores["no budget"], requests)  # every page read into the cache and mapped once
        times = {p: [] for p in POLICIES}
        faults = {p: [] for p in POLICIES}
        for _ in range(args.rounds):
            for policy, store in stores.items():
                seconds, minflt = run(store, requests)
                times[policy].append(seconds / len(requests) * 1e6)
                faults[policy].append(minflt / len(requests))
        del stores
    base = statistics.median(times["no budget"])
    print(f"table {rows * args.dim * 4 / (1 << 30):.2f} GiB ({rows:,} rows of {args.dim} fp32), budget "
          f"{args.budget_gb:.2f} GiB, {args.rows_per_gather} rows per gather, {args.rounds} rounds of {args.gathers}")
    print(f"{'policy':<20}{'us/gather':>12}{'faults/gather':>16}{'time / no budget':>19}")
    results = {}
    for policy in POLICIES:
        us, minflt = statistics.median(times[policy]), statistics.median(faults[policy])
        results[policy] = {"us_per_gather": us, "faults_per_gather": minflt, "ratio": us / base,
                           "us_per_round": times[policy]}
        print(f"{policy:<20}{us:>12.1f}{minflt:>16.2f}{us / base:>19.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

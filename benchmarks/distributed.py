"""Data-parallel training with sharded tables: tokens/s and bytes moved per step, 1 rank vs W ranks, and
the sharded lookup's traffic as a function of batch size and table size.

Two measurements, every configuration in fresh processes (gloo on the CPU):

  throughput   ``engram.train.train`` on the demo-engram preset and the built-in corpus, the same
               global batch on 1 process and on W ranks (the machine's cores split evenly between
               ranks). Median tokens/s over the steps after warm-up, and the bytes each rank sent per
               step (``TRAFFIC``: lookup all_to_all, dense all-reduce payload). Reported ratio: W ranks
               over 1 process, measured in the same run.
  volume       W ranks, demo-engram with the table scaled 1x, 8x and 64x, global batches of 2-16
               windows of real text: the lookup bytes per step (forward + backward). They follow the
               batch's distinct n-grams, never the table size: a bigger table only resolves more hash
               collisions, so its rows can rise slightly, up to the batch's distinct n-grams.

    python benchmarks/distributed.py [--ranks 2] [--steps 12] [--batch 8] [--seq 256] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WARMUP = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_config(args, out_dir: str, table_scale: int = 1):
    from engram.presets import get_run_preset

    run = get_run_preset("demo-engram")
    engram = run.model.engram
    if table_scale != 1:
        engram = dataclasses.replace(engram, engram_vocab_size=[v * table_scale for v in engram.engram_vocab_size])
    train = dataclasses.replace(run.train, max_steps=args.steps, batch_size=args.batch, seq_len=args.seq,
                                eval_every=args.steps, eval_batches=1, save_every=args.steps, log_every=1,
                                out_dir=out_dir)
    return dataclasses.replace(run, model=dataclasses.replace(run.model, engram=engram), train=train)


def _group(rank: int, world: int, port: int, threads: int) -> None:
    torch.set_num_threads(threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)


def _throughput(rank: int, world: int, port: int, threads: int, args, out: str) -> None:
    from engram.train import train

    _group(rank, world, port, threads)
    steps = []
    try:
        train(_run_config(args, os.path.join(out, f"run{world}")), progress=False, resume=False,
              on_step=lambda step, m: steps.append(m))
    finally:
        if world > 1:
            dist.destroy_process_group()
    if rank == 0:
        timed = steps[WARMUP:]
        result = {"ranks": world, "threads_per_rank": threads, "steps": len(timed),
                  "tokens_per_s": statistics.median(s["tokens_per_s"] for s in timed),
                  "lookup_bytes": statistics.median(s.get("sent_lookup_bytes", 0) for s in timed),
                  "allreduce_bytes": statistics.median(s.get("sent_allreduce_bytes", 0) for s in timed)}
        with open(os.path.join(out, f"throughput{world}.json"), "w") as f:
            json.dump(result, f)


def _volume(rank: int, world: int, port: int, threads: int, args, out: str) -> None:
    """Lookup bytes per forward+backward for every (table scale, global batch), on real text."""
    from engram.data import prepare_data
    from engram.distributed import runtime, shard_tables
    from engram.distributed.sharded import TRAFFIC
    from engram.model.transformer import EngramLM

    _group(rank, world, port, threads)
    rows = []
    try:
        for scale in args.table_scales:
            run = _run_config(args, out, scale)
            prepared = prepare_data(run.data)
            model_cfg = run.model.with_data(prepared.vocab_size, prepared.pad_id)
            torch.manual_seed(0)
            model = EngramLM(model_cfg, prepared.compressed)
            tables = shard_tables(model)
            net = runtime.wrap_ddp(model, torch.device("cpu"))
            for batch in args.volume_batches:
                per_step = []
                for step in range(args.volume_steps):
                    ids, boundary = prepared.train.batch(step, batch, args.seq, seed=0)
                    ids, boundary = ids.chunk(world)[rank], boundary.chunk(world)[rank]
                    before = TRAFFIC.lookup_bytes
                    net(ids, labels=ids, boundary=boundary).loss.backward()
                    model.zero_grad(set_to_none=True)
                    per_step.append(TRAFFIC.lookup_bytes - before)
                rows.append({"table_rows": sum(t.num_rows for t in tables.values()), "table_scale": scale,
                             "global_batch": batch, "tokens": batch * args.seq,
                             "lookup_bytes": statistics.mean(per_step)})
            del net, model, tables
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out, f"volume_rank{rank}.json"), "w") as f:
        json.dump(rows, f)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", type=int, default=2, help="W, ranks of the distributed runs (default 2)")
    parser.add_argument("--steps", type=int, default=12, help=f"training steps per run, the first {WARMUP} untimed "
                                                              "(default 12)")
    parser.add_argument("--batch", type=int, default=8, help="global batch of the throughput runs (default 8)")
    parser.add_argument("--seq", type=int, default=256, help="T (default 256)")
    parser.add_argument("--cores", type=int, default=os.cpu_count(), help="threads in all (default: every core)")
    parser.add_argument("--volume-batches", type=int, nargs="+", default=[2, 4, 8, 16],
                        help="global batches of the volume sweep (default 2 4 8 16)")
    parser.add_argument("--table-scales", type=int, nargs="+", default=[1, 8, 64],
                        help="table sizes of the volume sweep, as multiples of demo-engram's (default 1 8 64)")
    parser.add_argument("--volume-steps", type=int, default=3, help="batches averaged per volume point (default 3)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if args.steps <= WARMUP:
        parser.error(f"--steps must exceed the {WARMUP} warm-up steps")
    if any(b % args.ranks for b in [args.batch, *args.volume_batches]):
        parser.error(f"every global batch must divide over --ranks {args.ranks}")

    from engram.data import prepare_data

    prepare_data(_run_config(args, "").data)  # once, before any rank races to build the cache
    with tempfile.TemporaryDirectory() as out:
        results = {}
        for world in (1, args.ranks):
            threads = max(1, args.cores // world)
            mp.spawn(_throughput, args=(world, _free_port(), threads, args, out), nprocs=world)
            with open(os.path.join(out, f"throughput{world}.json")) as f:
                results[world] = json.load(f)
        mp.spawn(_volume, args=(args.ranks, _free_port(), max(1, args.cores // args.ranks), args, out),
                 nprocs=args.ranks)
        volume = []
        for rank in range(args.ranks):
            with open(os.path.join(out, f"volume_rank{rank}.json")) as f:
                volume.append(json.load(f))

    one, many = results[1], results[args.ranks]
    ratio = many["tokens_per_s"] / one["tokens_per_s"]
    print(f"training demo-engram, global batch {args.batch}x{args.seq}, fp32 CPU ({args.cores} cores split "
          f"over the ranks), median of {one['steps']} steps")
    print(f"{'ranks':>5} {'threads/rank':>12} {'tokens/s':>9} {'lookup B/step':>14} {'all-reduce B/step':>18}")
    for r in (one, many):
        print(f"{r['ranks']:>5} {r['threads_per_rank']:>12} {r['tokens_per_s']:>9,.0f} {r['lookup_bytes']:>14,.0f} "
              f"{r['allreduce_bytes']:>18,.0f}")
    print(f"tokens/s, {args.ranks} ranks / 1 process: {ratio:.2f}x")

    # the volume a step moves: the most any rank sent (ranks see different rows)
    print(f"\nsharded-lookup traffic per step (forward + backward), {args.ranks} ranks, most sent by one rank")
    scales = sorted({r["table_scale"] for r in volume[0]})
    print(f"{'global batch':>12} {'tokens':>7} " + " ".join(f"{f'{s}x table':>14}" for s in scales))
    table_rows = {r["table_scale"]: r["table_rows"] for r in volume[0]}
    grid = {}
    for i, row in enumerate(volume[0]):
        grid[row["table_scale"], row["global_batch"]] = max(v[i]["lookup_bytes"] for v in volume)
    for batch in args.volume_batches:
        print(f"{batch:>12} {batch * args.seq:>7} " + " ".join(f"{grid[s, batch]:>14,.0f}" for s in scales))
    print("table rows: " + ", ".join(f"{s}x = {table_rows[s]:,}" for s in scales))
    growth_table = max(grid[scales[-1], b] / grid[scales[0], b] for b in args.volume_batches)
    growth_batch = grid[scales[0], args.volume_batches[-1]] / grid[scales[0], args.volume_batches[0]]
    print(f"bytes, {table_rows[scales[-1]] / table_rows[scales[0]]:.0f}x more table rows: at most {growth_table:.2f}x; "
          f"{args.volume_batches[-1] // args.volume_batches[0]}x the batch: {growth_batch:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"throughput": [one, many], "tokens_ratio": ratio,
                       "volume": [{**row, "lookup_bytes": grid[row["table_scale"], row["global_batch"]]}
                                  for row in volume[0]]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""FSDP2 vs DDP for the dense part: tokens/s and bytes communicated per step at W ranks.

``engram.train.train`` on the demo-engram preset and the built-in corpus, the same global batch, once with
``train.parallel = "ddp"`` (dense weights replicated, gradients all-reduced) and once with ``"fsdp"``
(``fully_shard`` per block: weights all-gathered for forward and again for backward, gradients
reduce-scattered); the tables are row-sharded in both. Every run in fresh processes (gloo on the CPU, the
machine's cores split evenly between ranks), the two strategies alternating ``--repeats`` times.

Reported per strategy: median tokens/s over the steps after warm-up (then the median over repeats), the
payload each rank moved per step (``TRAFFIC``: the dense all-reduce, or the all-gathers and the
reduce-scatters; a ring sends about 2(W-1)/W resp. (W-1)/W of it), the lookups' all_to_all bytes, and
what each rank holds (``engram.distributed.plan``: parameters, gradients, optimizer state). Ratio: FSDP
over DDP, measured in the same run.

    python benchmarks/fsdp.py [--ranks 2] [--steps 12] [--repeats 2] [--batch 8] [--seq 256] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WARMUP = 2
STRATEGIES = ("ddp", "fsdp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_config(args, strategy: str, out_dir: str):
    from engram.presets import get_run_preset

    run = get_run_preset("demo-engram")
    train = dataclasses.replace(run.train, max_steps=args.steps, batch_size=args.batch, seq_len=args.seq,
                                eval_every=args.steps, eval_batches=1, save_every=args.steps, log_every=1,
                                out_dir=out_dir, parallel=strategy, optimizer=args.optimizer)
    return dataclasses.replace(run, train=train)


def _worker(rank: int, world: int, port: int, threads: int, args, strategy: str, out: str) -> None:
    from engram.train import train

    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    steps = []
    try:
        train(_run_config(args, strategy, os.path.join(out, strategy)), progress=False, resume=False,
              on_step=lambda step, m: steps.append(m))
    finally:
        dist.destroy_process_group()
    if rank == 0:
        timed = steps[WARMUP:]

        def median(key: str) -> float:
            return statistics.median(s.get(key, 0) for s in timed)

        result = {"strategy": strategy, "tokens_per_s": median("tokens_per_s"),
                  "allreduce_bytes": median("sent_allreduce_bytes"), "allgather_bytes": median("sent_allgather_bytes"),
                  "reduce_scatter_bytes": median("sent_reduce_scatter_bytes"), "lookup_bytes": median("sent_lookup_bytes")}
        with open(os.path.join(out, f"{strategy}.json"), "w") as f:
            json.dump(result, f)


def _held(args, strategy: str) -> dict:
    from engram.distributed.plan import memory_plan

    run = _run_config(args, strategy, "unused")
    rank0 = memory_plan(run.model, args.ranks, strategy, args.optimizer, run.train.tokens_per_step).ranks[0]
    return {"params_bytes": rank0.table_params + rank0.dense_params,
            "grads_bytes": rank0.dense_grads, "optimizer_bytes": rank0.table_optimizer + rank0.dense_optimizer}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--optimizer", choices=["adamw", "muon"], default="adamw")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    threads = max(1, (os.cpu_count() or 1) // args.ranks)
    runs = {s: [] for s in STRATEGIES}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for strategy in STRATEGIES:
                out = os.path.join(tmp, f"r{repeat}")
                os.makedirs(out, exist_ok=True)
                mp.spawn(_worker, args=(args.ranks, _free_port(), threads, args, strategy, out), nprocs=args.ranks)
                with open(os.path.join(out, f"{strategy}.json")) as f:
                    runs[strategy].append(json.load(f))
    summary = {}
    for strategy, results in runs.items():
        summary[strategy] = {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in results),
                             "tokens_per_s_runs": [round(r["tokens_per_s"]) for r in results],
                             **{k: results[0][k] for k in results[0] if k.endswith("_bytes")},
                             **_held(args, strategy)}
    ddp, fsdp = summary["ddp"], summary["fsdp"]
    ratio = fsdp["tokens_per_s"] / ddp["tokens_per_s"]
    print(f"demo-engram, {args.ranks} ranks x {threads} thread(s), gloo, global batch {args.batch} x {args.seq}, "
          f"{args.optimizer}, {args.steps} steps ({WARMUP} warm-up), {args.repeats} repeats")
    print(f"{'':<10} {'tokens/s':>10} {'runs':>16} {'all-reduce':>12} {'all-gather':>12} {'red.-scatter':>12} "
          f"{'lookups':>10} {'params':>10} {'grads':>10} {'optimizer':>10}   (bytes per step / per rank)")
    for strategy, r in summary.items():
        print(f"{strategy:<10} {r['tokens_per_s']:>10,.0f} {str(r['tokens_per_s_runs']):>16} "
              f"{r['allreduce_bytes']:>12,.0f} {r['allgather_bytes']:>12,.0f} {r['reduce_scatter_bytes']:>12,.0f} "
              f"{r['lookup_bytes']:>10,.0f} {r['params_bytes']:>10,} {r['grads_bytes']:>10,} {r['optimizer_bytes']:>10,}")
    moved = {s: r["allreduce_bytes"] + r["allgather_bytes"] + r["reduce_scatter_bytes"] for s, r in summary.items()}
    print(f"ratio FSDP / DDP: tokens/s {ratio:.2f}x, dense payload per step {moved['fsdp'] / moved['ddp']:.2f}x, "
          f"bytes held per rank {sum(fsdp[k] for k in ('params_bytes', 'grads_bytes', 'optimizer_bytes')) / sum(ddp[k] for k in ('params_bytes', 'grads_bytes', 'optimizer_bytes')):.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": summary, "ratio_tokens_per_s": ratio}, f, indent=2)


if __name__ == "__main__":
    main()

"""Model construction: a model with a big Engram table is built with its table filled once, and the
largest shipped configuration builds on the meta device in milliseconds, allocating nothing.

1. Materialised build (``EngramLM(config)`` on the CPU) of ``tiny-engram`` with its tables scaled to
   ``--table-gb``, against a baseline measured in the same run: one ``normal_`` over a tensor of the
   table's size. A build that fills the table once costs about 1x the baseline (plus the small dense
   part); 0.1, which filled every table twice (``Engram.__init__`` and again ``EngramLM.init_weights``),
   cost about 2x.
2. Meta build (``with torch.device("meta"): EngramLM(config)``) of every shipped preset and every model
   of the shipped sweep budgets; prints the slowest and checks it is under ``--meta-limit`` seconds.

    python benchmarks/build.py [--table-gb 1] [--repeats 3] [--meta-limit 1.0] [--json PATH]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time

import torch


def big_table_config(table_gb: float):
    try:
        from engram.presets import get_preset
    except ImportError:  # 0.1 kept presets in engram.config (so the 'before' number can be measured)
        from engram.config import get_preset
    config = get_preset("tiny-engram")
    e = config.engram
    per_head = int(table_gb * 2**30 / (e.head_dim * 4) / (e.n_heads * len(e.layer_ids)))
    return dataclasses.replace(config, engram=dataclasses.replace(e, engram_vocab_size=[per_head] * e.n_orders))


def materialised(args) -> dict:
    from engram.model.transformer import EngramLM

    config = big_table_config(args.table_gb)
    build, fill = [], []
    for _ in range(args.repeats):
        torch.manual_seed(0)
        t0 = time.perf_counter()
        model = EngramLM(config)
        build.append(time.perf_counter() - t0)
        rows = sum(layer.embedding.weight.numel() for layer in model.engram_layers.values())
        del model
        t0 = time.perf_counter()
        baseline = torch.empty(rows)
        baseline.normal_()
        fill.append(time.perf_counter() - t0)
        del baseline
    b, f = statistics.median(build), statistics.median(fill)
    return {"table_floats": rows, "build_s": b, "one_fill_s": f, "build_over_one_fill": b / f}


def meta(args) -> dict | None:
    try:
        from engram.model.accounting import count_parameters
        from engram.presets import PRESETS, RUN_PRESETS, get_preset, get_run_preset
        from engram.sweeps.allocation import allocation_grid, with_rows_per_head
        from engram.sweeps.budgets import BUDGETS
    except ImportError:
        return None  # 0.1 could not build on meta
    from engram.config import ModelConfig
    from engram.model.transformer import EngramLM

    configs = {n: get_preset(n) for n in PRESETS} | {n: get_run_preset(n).model for n in RUN_PRESETS}
    for name, budget in BUDGETS.items():
        base, template = budget.base_run().model, budget.engram_template()
        configs |= {f"{name}/{p.label}": p.config for p in allocation_grid(base, template, budget.rhos)}
        rows = max(budget.memory_rows)
        configs[f"{name}/engram-rows={rows}"] = ModelConfig(backbone=base.backbone,
                                                           engram=with_rows_per_head(template, rows))
    with torch.device("meta"):  # warm-up: imports and first-call costs
        EngramLM(get_preset("tiny-engram"))
    times = {}
    for name, config in configs.items():
        t0 = time.perf_counter()
        with torch.device("meta"):
            model = EngramLM(config)
        times[name] = time.perf_counter() - t0
        assert all(p.device.type == "meta" for p in model.parameters()), name
    slowest = max(times, key=times.get)
    largest = max(configs, key=lambda n: count_parameters(configs[n]).total)
    return {"configs": len(configs), "slowest": slowest, "slowest_s": times[slowest], "largest": largest,
            "largest_params": count_parameters(configs[largest]).total, "largest_s": times[largest]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--table-gb", type=float, default=1.0, help="Engram table size of the materialised build")
    p.add_argument("--repeats", type=int, default=3, help="builds per measurement (median)")
    p.add_argument("--meta-limit", type=float, default=1.0, help="seconds a meta build may take")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    mat = materialised(args)
    print(f"materialised build, {mat['table_floats'] * 4 / 2**30:.2f} GiB of tables: {mat['build_s']:.2f} s; "
          f"one normal_ fill of that size: {mat['one_fill_s']:.2f} s; ratio {mat['build_over_one_fill']:.2f}x "
          "(1x: each table filled once)")
    met = meta(args)
    ok = True
    if met is not None:
        ok = met["slowest_s"] < args.meta_limit
        print(f"meta build of {met['configs']} shipped configurations: slowest {met['slowest']} "
              f"{met['slowest_s'] * 1e3:.1f} ms; largest {met['largest']} ({met['largest_params']:,} parameters) "
              f"{met['largest_s'] * 1e3:.1f} ms; limit {args.meta_limit} s: {'ok' if ok else 'EXCEEDED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"materialised": mat, "meta": met}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

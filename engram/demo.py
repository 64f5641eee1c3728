"""The main job (``make demo``): train demo-moe and its iso-parameter Engram twin on paired seeds, compare.

A *pair* is the two models trained with one seed: the same data order and the same initial value of
every weight they share (``EngramLM.init_weights`` draws each weight from a stream named after it), so
most of the seed-to-seed noise is common to both and cancels in the per-seed difference. The verdict is
read from those differences: how many seeds Engram wins, their mean and spread, and a t interval.

Layout under ``out`` (default ``runs/demo``)::

    seed<k>/<preset>/plan.json, result.json, train/   one run (the sweep runner's files: a finished run
                                                      is skipped, an interrupted one resumes)
    results.json                                      per-seed and paired numbers, the verdict, samples
    loss.png                                          every seed's validation curve, and the gap per seed

Runs are shared out to ``workers`` single-thread processes (``engram.sweeps.runner``): two on a 2-core
machine, which trains more tokens per second than one process with two threads at this size.
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

from engram.schema import apply_overrides
from engram.fileio import atomic_write_json
from engram.plotting import pyplot, save_figure
from engram.presets import get_run_preset
from engram.sweeps.plan import PlannedRun

PRESETS = ("demo-moe", "demo-engram")
SEEDS = 3
PROMPT = "def __init__(self"
SAMPLE_TOKENS = 48
QUICK = ["train.max_steps=4", "train.eval.every=2", "train.eval.batches=2", "train.checkpoint.every=2",
         "train.log_every=1", "train.schedule.warmup_steps=1"]

# two-sided 95% quantiles of Student's t by degrees of freedom (1-30); the normal 1.96 beyond
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def demo_plan(seeds: list[int], overrides: list[str] | None = None) -> list[PlannedRun]:
    """The demo's runs: every preset at every seed, seeds first (a pair finishes before the next starts
    when the workers keep up)."""
    if any(o.split("=", 1)[0].strip() == "train.seed" for o in overrides or []):
        raise ValueError("the demo sets train.seed itself (one per pair); choose the seeds with --seeds and "
                         "--first-seed instead of --set train.seed=...")
    runs = []
    for seed in seeds:
        for name in PRESETS:
            run = apply_overrides(get_run_preset(name), [f"train.seed={seed}", *(overrides or [])])
            runs.append(PlannedRun("demo", "demo", name, seed, run, {"preset": name}, path=f"seed{seed}/{name}"))
    return runs


def paired_stats(per_seed: list[dict]) -> dict:
    """Engram minus MoE validation loss per seed -> n, mean, std, standard error, 95% t interval, wins."""
    diffs = [r["difference"] for r in per_seed]
    n = len(diffs)
    mean = statistics.fmean(diffs)
    std = statistics.stdev(diffs) if n > 1 else 0.0
    se = std / math.sqrt(n) if n > 1 else None
    half = t975(n - 1) * se if se is not None else None
    return {"n": n, "mean_difference": mean, "std_difference": std, "stderr": se,
            "ci95": [mean - half, mean + half] if half is not None else None,
            "engram_wins": sum(d < 0 for d in diffs), "moe_wins": sum(d > 0 for d in diffs),
            "ties": sum(d == 0 for d in diffs)}


def verdict(paired: dict) -> str:
    """One sentence that says what the paired numbers show, and no more."""
    n, wins, losses = paired["n"], paired["engram_wins"], paired["moe_wins"]
    size = f"mean paired difference {paired['mean_difference']:+.4f} nats"
    if paired["ci95"] is None:
        return f"Engram {'ahead' if wins else 'not ahead'} on the one seed ({size}); one seed settles nothing."
    lo, hi = paired["ci95"]
    spread = f"{size} (std {paired['std_difference']:.4f}, 95% t interval [{lo:+.4f}, {hi:+.4f}])"
    if hi < 0:
        return f"Engram ahead: it wins {wins} of {n} seeds, {spread}, which excludes zero."
    if lo > 0:
        return f"MoE ahead: it wins {losses} of {n} seeds, {spread}, which excludes zero."
    mean = paired["mean_difference"]
    lead = "Engram leads" if mean < 0 else "MoE leads" if mean > 0 else "neither leads"
    return (f"Not settled: Engram wins {wins} of {n} seeds, {spread}, which includes zero; "
            f"{lead} on average, within the noise.")


def eval_history(run_dir: Path) -> list[dict]:
    """Every evaluation of a run, from its metrics log (which keeps the whole history across resumes;
    a result's ``evals`` hold only those since the last one)."""
    from engram.train import read_metrics

    return [{"step": r["step"], "tokens": r["tokens"], "val_loss": r["val_loss"]}
            for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "eval"]


def _run_summary(record: dict, train_dir: Path) -> dict:
    checkpoint = train_dir / "checkpoints" / Path(record["checkpoint"]).name if record.get("checkpoint") else None
    return {"val_loss": record["val_loss"], "val_bpb": record["val_bpb"], "tokens": record["tokens"],
            "tokens_per_s": record["tokens_per_s"], "train_seconds": record["train_seconds"],
            "checkpoint": str(checkpoint) if checkpoint else None, "evals": eval_history(train_dir)}


def summarise(plan: list[PlannedRun], records: dict[tuple[str, int], dict], settings: dict, out: Path) -> dict:
    """results.json from the finished runs (``records`` keyed by (preset, seed)) under ``out``."""
    seeds = sorted({p.seed for p in plan})
    dirs = {(p.point, p.seed): p.directory(out) / "train" for p in plan}
    results: dict = {"seeds": seeds, "settings": settings}
    for name in PRESETS:
        runs = {seed: _run_summary(records[name, seed], dirs[name, seed]) for seed in seeds}
        params = records[name, seeds[0]]["params"]
        losses = [r["val_loss"] for r in runs.values()]
        results[name] = {
            "total_params": params["total"], "active_params": params["active"],
            "engram_params": params["engram_tables"], "flops_per_token": params.get("flops_per_token"),
            "tokens": runs[seeds[0]]["tokens"], "val_loss": statistics.fmean(losses),
            "val_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "val_bpb": statistics.fmean(r["val_bpb"] for r in runs.values()),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs.values()),
            "per_seed": {str(seed): r for seed, r in runs.items()}}
    results["per_seed"] = [{"seed": seed, "demo-moe": records["demo-moe", seed]["val_loss"],
                            "demo-engram": records["demo-engram", seed]["val_loss"],
                            "difference": records["demo-engram", seed]["val_loss"] - records["demo-moe", seed]["val_loss"]}
                           for seed in seeds]
    results["paired"] = paired_stats(results["per_seed"])
    results["verdict"] = verdict(results["paired"])
    return results


def format_table(results: dict) -> str:
    """Per-seed losses and the paired difference, then each model's sizes and means."""
    lines = [f"{'seed':>6} {'demo-moe':>10} {'demo-engram':>12} {'Engram - MoE':>13}"]
    for r in results["per_seed"]:
        lines.append(f"{r['seed']:>6} {r['demo-moe']:>10.4f} {r['demo-engram']:>12.4f} {r['difference']:>+13.4f}")
    p = results["paired"]
    spread = f"{p['std_difference']:.4f}" if p["n"] > 1 else "-"
    lines.append(f"{'mean':>6} {results['demo-moe']['val_loss']:>10.4f} {results['demo-engram']['val_loss']:>12.4f} "
                 f"{p['mean_difference']:>+13.4f}  (std {spread}; Engram wins {p['engram_wins']}/{p['n']})")
    lines.append("")
    rows = [("total params (P_tot)", "total_params", "{:,}"), ("active params (P_act)", "active_params", "{:,}"),
            ("Engram table params", "engram_params", "{:,}"), ("training tokens per run", "tokens", "{:,}"),
            ("tokens/s per worker (median)", "tokens_per_s", "{:,.0f}"), ("bits per byte (mean)", "val_bpb", "{:.4f}")]
    lines.append(f"{'':<30}" + "".join(f"{n:>14}" for n in PRESETS))
    for label, key, fmt in rows:
        lines.append(f"{label:<30}" + "".join(f"{fmt.format(results[n][key]):>14}" for n in PRESETS))
    return "\n".join(lines)


def plot_demo(results: dict, path: Path) -> Path:
    """Left: every seed's validation curve, both models (one colour per model, one line style per seed).
    Right: Engram minus MoE validation loss along training, one line per seed."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.4))
    styles = ("-", "--", ":", "-.")
    colours = {"demo-moe": "tab:blue", "demo-engram": "tab:orange"}
    seeds = results["seeds"]
    for name in PRESETS:
        for i, seed in enumerate(seeds):
            evals = results[name]["per_seed"][str(seed)]["evals"]
            left.plot([e["tokens"] / 1e6 for e in evals], [e["val_loss"] for e in evals], styles[i % len(styles)],
                      color=colours[name], marker="o", ms=2.5, lw=1.4, label=f"{name}, seed {seed}")
    finals = [r[n] for r in results["per_seed"] for n in PRESETS]
    left.set_ylim(min(finals) - 0.15, min(finals) + 1.5)
    left.set_xlabel("training tokens (millions)")
    left.set_ylabel("validation loss (nats/token)")
    left.set_title("Validation loss, every seed", fontsize=10)
    left.grid(alpha=0.3)
    left.legend(fontsize=7, ncol=2)
    for i, seed in enumerate(seeds):
        moe = {e["step"]: e for e in results["demo-moe"]["per_seed"][str(seed)]["evals"]}
        eng = [e for e in results["demo-engram"]["per_seed"][str(seed)]["evals"] if e["step"] in moe]
        right.plot([e["tokens"] / 1e6 for e in eng], [e["val_loss"] - moe[e["step"]]["val_loss"] for e in eng],
                   styles[i % len(styles)], color="black", marker="o", ms=2.5, lw=1.2, label=f"seed {seed}")
    right.axhline(0, color="grey", lw=1)
    right.set_xlabel("training tokens (millions)")
    right.set_ylabel("Engram minus MoE (nats); below 0: Engram ahead")
    p = results["paired"]
    right.set_title(f"Seed-paired gap: final mean {p['mean_difference']:+.4f}, Engram wins "
                    f"{p['engram_wins']}/{p['n']}", fontsize=10)
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    fig.suptitle("demo-engram vs its iso-parameter MoE twin (Python stdlib)", fontsize=11)
    return save_figure(fig, path)


def greedy_sample(checkpoint: str) -> str:
    from engram.data import prompt_ids
    from engram.infer import generate
    from engram.train import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    tok = ckpt.tokenizer
    return PROMPT + tok.decode(generate(ckpt.model, prompt_ids(tok, PROMPT), SAMPLE_TOKENS, temperature=0.0))


def run_demo(out_dir: str | Path | None = None, overrides: list[str] | None = None, quick: bool = False,
             progress: bool = True, seeds: int = SEEDS, first_seed: int = 0, workers: int | None = None) -> dict:
    """Train both presets on ``seeds`` paired seeds (``first_seed`` onwards) with ``workers`` processes
    (default: one per core, at most 2), write results.json and loss.png, print the comparison.
    ``out_dir`` defaults to runs/demo, or runs/demo-quick for ``quick`` (whose short runs must not sit
    where the real ones go)."""
    import torch

    from engram.data import prepare_data
    from engram.sweeps.runner import result_of, run_workers, work_through

    if seeds < 1 or first_seed < 0:
        raise ValueError(f"seeds must be >= 1 and first_seed >= 0, got {seeds} and {first_seed}")
    out = Path(out_dir if out_dir is not None else "runs/demo-quick" if quick else "runs/demo")
    out.mkdir(parents=True, exist_ok=True)
    overrides = (QUICK if quick else []) + list(overrides or [])
    plan = demo_plan(list(range(first_seed, first_seed + seeds)), overrides)
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    threads = max(1, (os.cpu_count() or 1) // workers)
    prepare_data(plan[0].run.data)  # once, before the workers start; cached for later demos
    pending = [p for p in plan if result_of(p, out) is None]
    print(f"[engram.demo] {len(plan)} runs ({len(PRESETS)} models x {seeds} seeds), {len(plan) - len(pending)} "
          f"already done; {min(workers, len(pending)) or 0} worker(s)", flush=True)
    failures: list[str] = []
    if len(pending) > 1 and workers > 1:
        failures = run_workers(plan, out, workers, threads=threads, progress=progress, desc="demo")
    elif pending:
        failures = work_through(pending, out, progress)
    records = {(p.point, p.seed): result_of(p, out) for p in plan}
    missing = [f"{name} seed {seed}" for (name, seed), r in records.items() if r is None]
    if missing:
        raise RuntimeError(f"demo runs did not finish: {', '.join(missing)}"
                           + (f" ({'; '.join(failures)})" if failures else "") + "; run it again to resume them")
    settings = {"overrides": overrides, "workers": workers, "threads_per_worker": threads, "torch": torch.__version__}
    results = summarise(plan, records, settings, out)
    if quick:  # a few steps test the pipeline, not the models: no verdict is drawn from them
        results["verdict"] = (f"none: --quick trains {plan[0].run.train.max_steps} steps per model "
                              "to check that the demo runs end to end; its losses compare nothing (run `make demo`)")
    results["samples"] = {}
    for name in PRESETS:  # one greedy completion per model, from the first seed's run
        results["samples"][name] = {"seed": plan[0].seed, "prompt": PROMPT,
                                    "text": greedy_sample(results[name]["per_seed"][str(plan[0].seed)]["checkpoint"])}
    atomic_write_json(out / "results.json", results, indent=1)
    plot_demo(results, out / "loss.png")

    print()
    print(format_table(results))
    a, b = results["demo-moe"], results["demo-engram"]
    print(f"\nP_tot {b['total_params'] / a['total_params'] - 1:+.2%} and P_act "
          f"{b['active_params'] / a['active_params'] - 1:+.2%} (Engram vs MoE); same data, same token budget.")
    print(f"Verdict over {len(results['seeds'])} paired seeds: {results['verdict']}")
    for name, s in results["samples"].items():
        print(f"\n--- {name} (seed {s['seed']}), greedy completion ---\n{s['text']}")
    print(f"\nwrote {out / 'results.json'} and {out / 'loss.png'}")
    return results

"""The main job (``make demo``): train demo-moe and its iso-parameter Engram twin, then compare.

Writes ``<out>/results.json`` (one entry per model), ``<out>/loss.png`` (validation curves), prints
a side-by-side table and one sampled completion per model. Runs resume from their checkpoints, so a
second ``make demo`` (or one after an interruption) only finishes what is missing.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from engram.cli.overrides import apply_overrides
from engram.fileio import atomic_write_json
from engram.plotting import pyplot, save_figure
from engram.presets import get_run_preset

PRESETS = ("demo-moe", "demo-engram")
PROMPT = "def __init__(self"
QUICK = ["train.max_steps=4", "train.eval_every=2", "train.eval_batches=2", "train.save_every=2",
         "train.log_every=1", "train.warmup_steps=1"]


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if r["kind"] == "train"], [r for r in records if r["kind"] == "eval"]


def plot_losses(runs: dict[str, Path], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for (name, run_dir), colour in zip(runs.items(), ("tab:blue", "tab:orange", "tab:green")):
        train, evals = read_metrics(run_dir)
        ax.plot([r["tokens"] / 1e6 for r in train], [r["loss"] for r in train], color=colour, alpha=0.25, lw=1)
        ax.plot([r["tokens"] / 1e6 for r in evals], [r["val_loss"] for r in evals], color=colour, marker="o",
                ms=3, lw=1.8, label=f"{name} (validation)")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("loss (nats/token); faint: training")
    ax.set_title("Engram vs its iso-parameter MoE twin (Python stdlib)")
    ax.grid(alpha=0.3)
    ax.legend()
    # zoom on the part of the curve where the models differ
    finals = [read_metrics(d)[1][-1]["val_loss"] for d in runs.values() if read_metrics(d)[1]]
    if finals:
        ax.set_ylim(min(finals) - 0.3, min(finals) + 2.5)
    save_figure(fig, path)


def format_table(results: dict[str, dict]) -> str:
    rows = [("total params (P_tot)", "total_params", "{:,}"), ("active params (P_act)", "active_params", "{:,}"),
            ("Engram table params", "engram_params", "{:,}"), ("training tokens", "tokens", "{:,}"),
            ("tokens/s", "tokens_per_s", "{:,.0f}"), ("validation loss", "val_loss", "{:.4f}"),
            ("bits per byte", "val_bpb", "{:.4f}")]
    names = list(results)
    lines = [f"{'':<24}" + "".join(f"{n:>16}" for n in names)]
    for label, key, fmt in rows:
        lines.append(f"{label:<24}" + "".join(f"{fmt.format(results[n][key]):>16}" for n in names))
    return "\n".join(lines)


def run_demo(out_dir: str | Path = "runs/demo", overrides: list[str] | None = None, quick: bool = False,
             progress: bool = True) -> dict:
    from engram.infer import generate
    from engram.train import load_checkpoint, train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    overrides = (QUICK if quick else []) + list(overrides or [])
    results, run_dirs = {}, {}
    for name in PRESETS:
        run = apply_overrides(get_run_preset(name), overrides)
        run_dir = out / name
        start = time.time()
        result = train(run, out_dir=run_dir, progress=progress)
        train_log, _ = read_metrics(run_dir)
        ckpt = load_checkpoint(result.checkpoint)
        tok = ckpt.tokenizer
        prompt_ids = [tok.token_to_id("<|bos|>")] + tok.encode(PROMPT).ids
        completion = generate(ckpt.model, prompt_ids, 48, temperature=0.0)
        results[name] = {
            "total_params": result.parameters["total"], "active_params": result.parameters["active"],
            "engram_params": result.parameters["engram_tables"], "tokens": result.tokens,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in train_log),
            "val_loss": result.final_eval["val_loss"], "val_bpb": result.final_eval["val_bpb"],
            "wall_seconds": round(time.time() - start, 1), "steps": result.steps,
            "sample_prompt": PROMPT, "sample": PROMPT + tok.decode(completion),
        }
        run_dirs[name] = run_dir
    atomic_write_json(out / "results.json", results)
    plot_losses(run_dirs, out / "loss.png")

    print()
    print(format_table(results))
    a, b = results["demo-moe"], results["demo-engram"]
    print(f"\nEngram - MoE validation loss: {b['val_loss'] - a['val_loss']:+.4f} nats "
          f"({b['val_bpb'] - a['val_bpb']:+.4f} bits/byte); one seed, so read this with the noise in mind.")
    for name, r in results.items():
        print(f"\n--- {name}, greedy completion ---\n{r['sample']}")
    print(f"\nwrote {out / 'results.json'} and {out / 'loss.png'}")
    return results

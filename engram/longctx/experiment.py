"""The long-context experiment at CPU scale (the paper's §5, Table 2), as one resumable plan:

    python -m engram.longctx.experiment --out runs/longctx --seeds 0 1 --workers 2

1. **Pre-train** the demo's iso-parameter pair (``demo-moe``, ``demo-engram``: equal P_tot and P_act, so
   equal FLOPs per token) on a corpus with ``retrieval_docs`` synthetic retrieval documents, every
   checkpoint kept, per seed.
2. **Extend** each with YaRN (scale ``factor``, from ``seq_len`` to ``factor`` x ``seq_len``) for ``extend_steps``
   steps at the longer length (``train --init-from``): at equal FLOPs, each model's final checkpoint; at
   equal pre-training loss, the better model's kept checkpoint whose validation loss is closest to the
   other's final one (the paper's second comparison), extended the same way.
3. **Evaluate** every extended model with ``engram eval long-context`` at 1x, 2x and 4x the pre-training
   length (same samples for every model), and the pre-trained ones at 1x.

Runs go through the sweep runner (a finished run is skipped, an interrupted one resumes, Ctrl-C saves);
``summary.json`` and ``long_context.png`` under ``out`` hold the per-seed and mean scores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

from engram.schema import apply_overrides
from engram.model.config import YarnConfig
from engram.data.retrieval import TASKS
from engram.fileio import atomic_write_json
from engram.presets import get_run_preset
from engram.sweeps.plan import PlannedRun

PRESETS = ("demo-moe", "demo-engram")


@dataclasses.dataclass
class Settings:
    retrieval_docs: int = 6000
    pretrain_steps: int = 600
    save_every: int = 100
    factor: int = 4
    extend_steps: int = 150
    extend_lr: float = 1e-3
    samples: int = 12
    eval_seed: int = 1000  # the evaluation samples' seed stream (training documents use negative seeds)


def pretrain_plan(seeds: list[int], s: Settings) -> list[PlannedRun]:
    runs = []
    for seed in seeds:
        for name in PRESETS:
            run = apply_overrides(get_run_preset(name), [
                f"train.seed={seed}", f"data.retrieval_docs={s.retrieval_docs}", f"train.max_steps={s.pretrain_steps}",
                f"train.checkpoint.every={s.save_every}", "train.checkpoint.keep=0",
                f"train.eval.every={s.save_every}"])
            runs.append(PlannedRun("longctx", "demo", name, seed, run, {"preset": name, "stage": "pretrain"},
                                   path=f"seed{seed}/{name}/pretrain"))
    return runs


def extend_run(pre: PlannedRun, checkpoint: Path, label: str, s: Settings) -> PlannedRun:
    """``pre``'s model from ``checkpoint``, extended with YaRN to ``factor`` x its length: the same tokens per
    step (batch / factor), a new schedule at ``extend_lr``."""
    run = pre.run
    L = run.train.seq_len
    bb = dataclasses.replace(run.model.backbone, max_seq_len=L * s.factor,
                             rope_scaling=YarnConfig(factor=float(s.factor), original_max_seq_len=L))
    train = dataclasses.replace(run.train, init_from=str(checkpoint.resolve()), seq_len=L * s.factor,
                                batch_size=max(1, run.train.batch_size // s.factor), max_steps=s.extend_steps,
                                lr=s.extend_lr, warmup_steps=10, save_every=s.extend_steps,
                                eval_every=s.extend_steps, keep_checkpoints=1)
    run = dataclasses.replace(run, model=dataclasses.replace(run.model, backbone=bb), train=train)
    return PlannedRun("longctx", "demo", pre.point, pre.seed, run, {"preset": pre.point, "stage": label},
                      path=f"seed{pre.seed}/{pre.point}/{label}")


def eval_history(train_dir: Path) -> list[tuple[int, float, Path]]:
    """(step, val loss, checkpoint) of every kept checkpoint of a run, ascending."""
    from engram.train import read_metrics
    from engram.train.checkpoint import step_of

    losses = {r["step"]: r["val_loss"] for r in read_metrics(train_dir / "metrics.jsonl") if r.get("kind") == "eval"}
    out = []
    for ckpt in sorted((train_dir / "checkpoints").glob("step_*")):
        step = step_of(ckpt)
        if step is not None and step in losses:
            out.append((step, losses[step], ckpt))
    return out


def equal_loss_start(histories: dict[str, list]) -> tuple[str, int, Path, float] | None:
    """The better model's kept checkpoint whose validation loss is closest to the other's final one:
    (preset, step, checkpoint, its loss). None when that is its final checkpoint (then equal loss is
    equal FLOPs, up to the checkpoints' spacing). The loss gap that remains is reported beside it."""
    finals = {name: h[-1][1] for name, h in histories.items()}
    better = min(finals, key=finals.get)
    other = next(n for n in finals if n != better)
    step, loss, ckpt = min(histories[better], key=lambda h: abs(h[1] - finals[other]))
    if step == histories[better][-1][0]:
        return None
    return better, step, ckpt, loss


def run_experiment(out: str | Path, seeds: list[int], settings: Settings, workers: int = 2,
                   progress: bool = True) -> dict:
    from engram.longctx.evaluate import evaluate_long_context
    from engram.sweeps.runner import run_workers

    out = Path(out)
    pre = pretrain_plan(seeds, settings)
    failed = run_workers(pre, out, workers, threads=1, progress=progress, desc="pre-train")
    if failed:
        raise RuntimeError(f"pre-training failed: {failed}")
    ext, starts = [], {}
    for seed in seeds:
        runs = {p.point: p for p in pre if p.seed == seed}
        histories = {name: eval_history(p.directory(out) / "train") for name, p in runs.items()}
        for name, p in runs.items():
            ext.append(extend_run(p, histories[name][-1][2], "extend-equal-flops", settings))
        match = equal_loss_start(histories)
        starts[seed] = {name: {"final_step": h[-1][0], "final_loss": h[-1][1]} for name, h in histories.items()}
        if match is not None:
            name, step, ckpt, loss = match
            starts[seed]["equal_loss"] = {"preset": name, "step": step, "val_loss": loss}
            ext.append(extend_run(runs[name], ckpt, "extend-equal-loss", settings))
    failed = run_workers(ext, out, workers, threads=1, progress=progress, desc="extend")
    if failed:
        raise RuntimeError(f"extension failed: {failed}")
    L = pre[0].run.train.seq_len
    lengths = [L * k for k in (1, 2, 4) if k <= settings.factor]
    scores: dict = {}
    for planned in pre + ext:
        target = planned.directory(out) / "long_context"
        done = target / "long_context.json"
        if not done.exists():
            evaluate_long_context(str(planned.directory(out) / "train"),
                                  [L] if planned.info["stage"] == "pretrain" else lengths, list(TASKS),
                                  settings.samples, settings.eval_seed, str(target), progress=progress)
        scores[planned.path] = json.loads(done.read_text())
    summary = summarise(scores, pre + ext, seeds, lengths, starts, settings)
    atomic_write_json(out / "summary.json", summary)
    plot_summary(summary, out / "long_context.png")
    return summary


def summarise(scores: dict, runs: list[PlannedRun], seeds: list[int], lengths: list[int], starts: dict,
              settings: Settings) -> dict:
    """Mean exact match per (stage, model, task, length) over seeds, with the per-seed values."""
    table: dict = {}
    for planned in runs:
        stage, name = planned.info["stage"], planned.point
        result = scores[planned.path]
        for task, row in result["accuracy"].items():
            for L, cell in row.items():
                table.setdefault(stage, {}).setdefault(name, {}).setdefault(task, {}).setdefault(L, {})[
                    str(planned.seed)] = cell["exact"]
        for L, cell in result.get("perplexity", {}).items():
            table.setdefault(stage, {}).setdefault(name, {}).setdefault("long_doc_loss", {}).setdefault(L, {})[
                str(planned.seed)] = cell["loss"]
    means = {stage: {name: {task: {L: {"mean": statistics.fmean(v for v in per.values() if v is not None)
                                       if any(v is not None for v in per.values()) else None, "per_seed": per}
                                   for L, per in rows.items()} for task, rows in tasks.items()}
                     for name, tasks in models.items()} for stage, models in table.items()}
    return {"settings": dataclasses.asdict(settings), "seeds": seeds, "lengths": lengths, "starts": starts,
            "scores": means}


def plot_summary(summary: dict, path: Path) -> None:
    from engram.plotting import pyplot, save_figure

    plt = pyplot()
    stage = summary["scores"].get("extend-equal-flops", {})
    lengths = [str(L) for L in summary["lengths"]]
    fig, axes = plt.subplots(1, len(TASKS) + 1, figsize=(3 * (len(TASKS) + 1), 3))
    for ax, task in zip(axes, TASKS):
        for name, style in zip(PRESETS, ("s--", "o-")):
            cells = stage.get(name, {}).get(task, {})
            ax.plot(lengths, [100 * (cells.get(L, {}).get("mean") or 0) for L in lengths], style, label=name)
        ax.set(title=task, xlabel="tokens", ylim=(-2, 102))
    axes[0].set_ylabel("exact match (%), mean over seeds")
    axes[0].legend(fontsize=7)
    for name, style in zip(PRESETS, ("s--", "o-")):  # the held-out documents' loss, per seed and mean
        cells = stage.get(name, {}).get("long_doc_loss", {})
        axes[-1].plot(lengths, [cells.get(L, {}).get("mean") for L in lengths], style, label=name)
    axes[-1].set(title="long-document loss", xlabel="tokens", ylabel="nats (same documents per length)")
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the long-context experiment (docs/LONG_CONTEXT.md)")
    p.add_argument("--out", default="runs/longctx")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--workers", type=int, default=2)
    for f in dataclasses.fields(Settings):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    settings = Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Settings)})
    summary = run_experiment(args.out, args.seeds, settings, args.workers)
    json.dump(summary["starts"], sys.stdout, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

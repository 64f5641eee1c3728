"""The subcommands, in the order ``engram --help`` lists them (``inspect``'s verbs are in ``inspection``):
per command, the function that declares its flags and the one that runs it, which calls one library or
research function and prints what it returns."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from engram.cli.flags import (Command, add_ckpt, add_device, add_preset, add_sampling, add_set, device, directory,
                              nonnegative_int, positive_int, sequence_length)
from engram.cli.inspection import INSPECT
from engram.cli.research import bench_offload, demo, demo_flags, sweep, sweep_flags


def _run_config(args):
    from engram.schema import apply_overrides
    from engram.presets import get_run_preset

    return apply_overrides(get_run_preset(args.preset), args.overrides)


# -- train, eval ---------------------------------------------------------------------------------------

def train_flags(p) -> None:
    add_preset(p, None)
    p.add_argument("--out", default=None, type=directory, help="run directory (default: the preset's train.out_dir)")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--no-resume", action="store_true",
                        help="start from scratch; the directory's earlier checkpoints and metrics are moved to "
                             "OUT/archive/, never deleted")
    resume.add_argument("--resume-from", type=nonnegative_int, default=None, metavar="STEP",
                        help="continue from checkpoint STEP instead of the latest (e.g. when the latest is damaged); "
                             "later checkpoints are moved to OUT/archive/")
    p.add_argument("--init-from", default=None, metavar="CKPT",
                   help="start a new run from this checkpoint's (or run directory's) weights with a new optimizer "
                        "and schedule, e.g. a context extension (--set model.backbone.max_seq_len=1024 --set "
                        "train.seq_len=1024 --set 'model.backbone.rope_scaling={\"factor\": 4, "
                        "\"original_max_seq_len\": 256}'); the same as --set train.init_from=CKPT")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--backend", default=None, choices=["gloo", "nccl"],
                   help="torch.distributed backend when launched by torchrun (default: nccl with CUDA, else gloo); "
                        "ignored in a single process")


def train(args) -> int:
    import dataclasses

    from engram.distributed import runtime
    from engram.train import train

    run = _run_config(args)
    if args.init_from is not None:
        if not Path(args.init_from).exists():
            raise FileNotFoundError(f"--init-from {args.init_from} does not exist")
        run = dataclasses.replace(run, train=dataclasses.replace(run.train, init_from=str(args.init_from)))
    # under torchrun: join the process group; the trainer then shards the tables and runs DDP
    runtime.init_from_env(args.backend)
    try:
        result = train(run, out_dir=args.out, resume=not args.no_resume, progress=not args.no_progress,
                       resume_from=args.resume_from)
        if runtime.is_main():
            print(json.dumps({"run_dir": str(result.run_dir), "steps": result.steps, "tokens": result.tokens,
                              "tokens_per_s": round(result.tokens_per_s, 1), **result.final_eval,
                              "checkpoint": str(result.checkpoint), "ranks": runtime.world_size()}, indent=2))
    finally:
        runtime.shutdown()
    return 0


# engram.data.retrieval.TASKS, spelled out so that building the parser imports no torch (a test compares)
LONG_CONTEXT_TASKS = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe"]


def eval_flags(p) -> None:
    p.add_argument("what", nargs="?", default="loss", choices=["loss", "long-context", "recall"],
                   help="loss (default): validation loss and bits per byte; long-context: RULER-style tasks "
                        "(needles, variable tracking, word extraction) at --lengths, and the loss of long "
                        "held-out documents; recall: an induction probe (a random token sequence repeated, "
                        "loss on the copy) at --lengths, multi-query associative recall at --pairs, and at a "
                        "distance (--gaps)")
    add_ckpt(p)
    p.add_argument("--batches", type=positive_int, default=None,
                   help="evaluation batches (default: the run's eval_batches)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="sequences per batch (default: the run's)")
    p.add_argument("--seq-len", type=sequence_length, default=None,
                   help="tokens per sequence (default: the run's; at most the model's context)")
    p.add_argument("--data", default=None, metavar="SRC",
                   help="evaluate on every document of SRC (a file, a directory or hf:NAME) instead of the run's "
                        "validation split, tokenized with the checkpoint's tokenizer")
    p.add_argument("--lengths", type=positive_int, nargs="+", default=None, metavar="L",
                   help="long-context: context lengths in tokens (default: the model's context, and its half "
                        "and quarter when they are at least 128)")
    p.add_argument("--tasks", nargs="+", default=None, choices=LONG_CONTEXT_TASKS + ["all"],
                   help="long-context: tasks to run (default all)")
    p.add_argument("--samples", type=positive_int, default=20, help="long-context: samples per task and length "
                                                                    "(default 20)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="long-context: seed of the samples (default 0)")
    p.add_argument("--ppl-docs", type=positive_int, default=16,
                   help="long-context: held-out documents per length for the long-document loss (default 16)")
    p.add_argument("--pairs", type=positive_int, nargs="+", default=None, metavar="P",
                   help="recall: key-value pairs per MQAR sample (default 2 4 8 16)")
    p.add_argument("--gaps", type=nonnegative_int, nargs="+", default=None, metavar="G",
                   help="recall: also MQAR with G filler words between the pairs and the queries (the length "
                        "axis: the same task over more tokens)")
    p.add_argument("--gap-pairs", type=positive_int, default=None, metavar="P",
                   help="recall: key-value pairs of the --gaps samples (default 8)")
    p.add_argument("--every-checkpoint", action="store_true",
                   help="recall: score every checkpoint the run keeps, by step (when recall appears)")
    p.add_argument("--out", default=None, type=directory,
                   help="long-context: write long_context.json, .md and .png here; recall: recall.json and .md")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device(p)


def evaluate(args) -> int:
    from engram.train import evaluate, load_checkpoint
    from engram.train.startup import checkpoint_data, checkpoint_text

    where = device(args)
    long_only = [f for f, v in (("--lengths", args.lengths), ("--tasks", args.tasks), ("--out", args.out),
                                ("--samples", args.samples != 20), ("--seed", args.seed != 0),
                                ("--ppl-docs", args.ppl_docs != 16), ("--no-progress", args.no_progress)) if v]
    if args.what == "recall":
        return _evaluate_recall(args, where)
    recall_only = [f for f, v in (("--pairs", args.pairs), ("--gaps", args.gaps), ("--gap-pairs", args.gap_pairs),
                                  ("--every-checkpoint", args.every_checkpoint)) if v]
    if recall_only:
        raise ValueError(f"{', '.join(recall_only)} belong to `engram eval recall`")
    if args.what == "long-context":
        return _evaluate_long_context(args, where)
    if long_only:
        raise ValueError(f"{', '.join(long_only)} belong to `engram eval long-context`")
    ckpt = load_checkpoint(args.ckpt, device=where)
    tc = ckpt.run_config.train
    seq_len = args.seq_len or tc.seq_len
    context = ckpt.run_config.model.backbone.max_seq_len
    if seq_len > context:
        raise ValueError(f"--seq-len {seq_len} is above the model's context of {context} tokens")
    if args.data is not None and not args.data.startswith("hf:") and not Path(args.data).exists():
        raise FileNotFoundError(f"--data {args.data} does not exist")
    # the checkpoint's own tokenizer, never one trained again on today's corpus
    shards = checkpoint_text(ckpt, args.data) if args.data is not None else checkpoint_data(ckpt).val
    result = evaluate(ckpt.model, shards, args.batch_size or tc.batch_size, seq_len,
                      args.batches or tc.eval.batches, where)
    print(json.dumps({"checkpoint": str(ckpt.path), "step": ckpt.step,
                      "data": args.data if args.data is not None else "validation split", **result}, indent=2))
    return 0


# -- sample, generate, export-tables ---------------------------------------------------------------------

def _stream_completion(model, tokenizer, args) -> None:
    """Encode ``args.prompt`` as training documents start (with <|bos|>), stream the continuation."""
    from engram.data import prompt_ids, special_ids
    from engram.infer import generate
    from engram.infer.generate import fit_context

    prompt = prompt_ids(tokenizer, args.prompt)
    eos = special_ids(tokenizer).eos
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

    prompt = fit_context([prompt], args.max_new_tokens, model.config.backbone.max_seq_len, args.truncate_prompt)[0]
    sys.stdout.write(args.prompt)
    generate(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
             top_p=args.top_p, seed=args.seed, stop_ids={eos} if eos is not None else None, on_token=stream)
    sys.stdout.write("\n")


def _evaluate_recall(args, where) -> int:
    from engram.fileio import atomic_write_json, atomic_write_text
    from engram.longctx.recall import (DEFAULT_GAP_PAIRS, DEFAULT_LENGTHS, DEFAULT_PAIRS, evaluate_recall,
                                       markdown, recall_curve)

    loss_only = [f for f, v in (("--batches", args.batches), ("--batch-size", args.batch_size),
                                ("--seq-len", args.seq_len), ("--data", args.data), ("--tasks", args.tasks)) if v]
    if loss_only:
        raise ValueError(f"{', '.join(loss_only)} do not apply to `engram eval recall`")
    if args.gap_pairs is not None and not args.gaps:
        raise ValueError("--gap-pairs sets the pairs of the --gaps samples; give --gaps too")
    options = dict(lengths=args.lengths or DEFAULT_LENGTHS, pair_counts=args.pairs or DEFAULT_PAIRS,
                   samples=args.samples, seed=args.seed, device=str(where), gaps=tuple(args.gaps or ()),
                   gap_pairs=args.gap_pairs or DEFAULT_GAP_PAIRS)
    if args.every_checkpoint:
        from engram.train.checkpoint import resolve_checkpoint, run_directory

        results = recall_curve(run_directory(resolve_checkpoint(args.ckpt)), **options)
    else:
        results = [evaluate_recall(args.ckpt, **options)]
    table = markdown(results)
    print(table, end="")
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "recall.json", results, indent=1)
        atomic_write_text(out / "recall.md", table)
    return 0


def _evaluate_long_context(args, where) -> int:
    from engram.longctx import evaluate_long_context
    from engram.longctx.evaluate import markdown
    from engram.train import open_checkpoint

    if args.data is not None or args.batches is not None or args.seq_len is not None:
        raise ValueError("--data, --batches and --seq-len belong to `engram eval` (loss), not long-context")
    lengths = args.lengths
    if lengths is None:
        context = open_checkpoint(args.ckpt, check_hashes=False).run_config.model.backbone.max_seq_len
        lengths = [L for L in (context // 4, context // 2) if L >= 128] + [context]  # tasks need ~100 tokens
    tasks = LONG_CONTEXT_TASKS if args.tasks is None or "all" in args.tasks else args.tasks
    result = evaluate_long_context(args.ckpt, sorted(set(lengths)), tasks, args.samples, args.seed, args.out,
                                   str(where), args.batch_size or 8, args.ppl_docs, progress=not args.no_progress)
    print(markdown(result))
    return 0


def sample_flags(p) -> None:
    add_ckpt(p)
    add_sampling(p)


def sample(args) -> int:
    from engram.train import load_checkpoint

    ckpt = load_checkpoint(args.ckpt, device=device(args))
    _stream_completion(ckpt.model, ckpt.tokenizer, args)
    return 0


def generate_flags(p) -> None:
    sample_flags(p)
    p.add_argument("--tier", default="device", choices=["device", "host", "disk"],
                   help="where the tables live (default device); disk needs --tables")
    p.add_argument("--tables", default=None, help="tables directory from `engram export-tables` (disk tier; the "
                   "host tier reads it into RAM, e.g. int8 or fp8_e4m3 tables)")
    p.add_argument("--cache-rows", type=nonnegative_int, default=0,
                   help="rows per layer cached in RAM in front of the host/disk tier (default 0 = no cache)")
    p.add_argument("--policy", default="lru", choices=["lru", "lfu"], help="cache eviction policy (default lru)")
    p.add_argument("--stats", action="store_true", help="print per-layer cache hits and RAM use to stderr")
    p.add_argument("--verify", default="sha256", choices=["sha256", "size"],
                   help="check of the --tables files when opened: sha256 reads every byte once and also finds "
                        "non-finite rows (default; about 1.8 s per GiB on a 2-core CPU, docs/RUNS.md), size only catches truncation")


def generate(args) -> int:
    from engram.storage import apply_storage
    from engram.train import load_checkpoint

    ckpt = load_checkpoint(args.ckpt, device=device(args))
    if args.tables is not None and args.tier == "device":
        raise ValueError("--tables is read by the host and disk tiers, not --tier device")
    with apply_storage(ckpt.model, args.tier, args.tables, args.cache_rows, args.policy, verify=args.verify,
                       checkpoint=ckpt.identity) as handle:
        _stream_completion(ckpt.model, ckpt.tokenizer, args)
        if args.stats:
            print(json.dumps(handle.stats(), indent=2), file=sys.stderr)
    return 0


# engram.storage.formats.FORMATS, spelled out so that building the parser imports no torch (a test compares)
TABLE_FORMATS = ["bfloat16", "float16", "float32", "fp8_e4m3", "int8"]


def export_tables_flags(p) -> None:
    add_ckpt(p)
    p.add_argument("--out", required=True, type=directory,
                   help="tables directory to write (manifest.json is written last)")
    p.add_argument("--dtype", default="float32", choices=TABLE_FORMATS,
                   help="stored row format (default float32, the only exact one): float16, bfloat16, int8 (a "
                        "scale per row), fp8_e4m3 (a power-of-two scale per 32 values, DeepSeek-V4.1's); "
                        "bounds in docs/DEEPSEEK.md")


def export_tables(args) -> int:
    from engram.storage import export_tables
    from engram.train import load_checkpoint

    ckpt = load_checkpoint(args.ckpt)
    source = {"path": str(ckpt.path.resolve()), "step": ckpt.step, "identity": ckpt.identity}
    manifest = export_tables(ckpt.model, args.out, dtype=args.dtype, source=source)
    print(json.dumps({"checkpoint": str(ckpt.path), "manifest": str(manifest),
                      "layers": json.loads(manifest.read_text())["layers"]}, indent=2))
    return 0


def export_hf_flags(p) -> None:
    add_ckpt(p)
    p.add_argument("--out", required=True, type=directory,
                   help="folder to write: config.json, model.safetensors, the tokenizer (AutoModelForCausalLM and "
                        "AutoTokenizer load it after `import engram.hf`)")


def export_hf(args) -> int:
    from engram.hf import export_hf as convert

    out = convert(args.ckpt, args.out)
    print(json.dumps({"checkpoint": str(args.ckpt), "out": str(out)}, indent=2))
    return 0


def finetune_flags(p) -> None:
    p.add_argument("--base", required=True, help="the pretrained transformers model folder")
    p.add_argument("--gguf-file", default=None, help="a GGUF file inside --base to load (needs the gguf package)")
    p.add_argument("--data", required=True, help="training text: a file, a directory or hf:NAME (data.source)")
    p.add_argument("--out", default=None, type=directory, help="run directory (default runs/finetune)")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--no-resume", action="store_true",
                        help="start afresh; earlier checkpoints are moved to OUT/archive/, never deleted")
    resume.add_argument("--resume-from", type=nonnegative_int, default=None, metavar="STEP",
                        help="continue from checkpoint STEP instead of the latest (e.g. when the latest is damaged); "
                             "later checkpoints are moved to OUT/archive/")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_set(p, "override a field, e.g. train.max_steps=100, adapter.engram.layer_ids=[1,3], "
               "adapter.engram.engram_vocab_size=[20000,20000] (repeatable)")


def finetune(args) -> int:
    from engram.schema import apply_overrides
    from engram.data.config import DataConfig
    from engram.hf.finetune import FinetuneConfig, finetune as run

    config = FinetuneConfig(base=args.base, gguf_file=args.gguf_file, data=DataConfig(source=args.data))
    config = apply_overrides(config, args.overrides)
    result = run(config, out_dir=args.out, resume=not args.no_resume, progress=not args.no_progress,
                 resume_from=args.resume_from)
    print(json.dumps(result, indent=2))
    return 0


def lm_eval(args) -> int:
    from engram.hf.lm_eval import main as harness

    return harness(args.passthrough)


# -- data prepare, presets --------------------------------------------------------------------------------

def prepare_flags(p) -> None:
    add_preset(p, "demo-engram")


def prepare(args) -> int:
    from engram.data import prepare_data

    prepared = prepare_data(_run_config(args).data)
    print(json.dumps(prepared.describe(), indent=2, default=str))
    return 0


def presets(args) -> int:
    """Every preset's parameter counts, from the configs alone (nothing is built, so the paper-scale ones
    print instantly); the paper presets beside Table 1's numbers, and the paper's allocation budgets."""
    from engram.model.accounting import count_parameters
    from engram.presets import PAPER_PRESETS, PAPER_TABLE_1, PRESETS, RUN_PRESETS, get_preset, get_run_preset
    from engram.sweeps.budgets import BUDGETS, PAPER_BUDGETS

    print(f"{'preset':<14} {'kind':<6} {'P_tot':>16} {'P_act':>14} {'Engram tables':>16}")
    for name in list(RUN_PRESETS) + list(PRESETS):
        c = count_parameters(get_run_preset(name).model if name in RUN_PRESETS else get_preset(name))
        print(f"{name:<14} {'run' if name in RUN_PRESETS else 'model':<6} {c.total:>16,} {c.active:>14,} "
              f"{c.engram_tables:>16,}")
    print("\npaper scale (Table 1 counts P_tot with the embedding and the head, P_act with the head; "
          "inferred values: engram.presets)")
    print(f"{'preset':<14} {'P_tot':>16} {'Table 1':>8} {'P_act':>14} {'Table 1':>8} {'Engram tables':>16} "
          f"{'Table 1':>8}")
    for name in PAPER_PRESETS:
        c, paper = count_parameters(get_preset(name)), PAPER_TABLE_1[name]
        engram = f"{paper['engram']}B" if paper["engram"] else "-"
        print(f"{name:<14} {c.paper_total:>16,} {paper['total']:>7}B {c.paper_active:>14,} {paper['active']:>7}B "
              f"{c.engram_tables:>16,} {engram:>8}")
    print("\nthe paper's allocation budgets at rho = 1 (docs/ALGORITHM.md §4 counts: no embedding, no head)")
    print(f"{'budget':<14} {'P_tot':>16} {'paper':>8} {'P_act':>14} {'paper':>8} {'experts':>8} {'paper':>6}")
    for name, (_, total, active, experts) in PAPER_BUDGETS.items():
        base = BUDGETS[name].base_run().model
        c = count_parameters(base)
        print(f"{name:<14} {c.total:>16,} {total / 1e9:>7}B {c.active:>14,} {active / 1e6:>7g}M "
              f"{base.backbone.moe.n_routed_experts:>8} {experts:>6}")
    return 0


def plan_flags(p) -> None:
    add_preset(p, "engram-27b")
    p.add_argument("--world-size", type=positive_int, required=True, metavar="W", help="ranks (GPUs) to plan for")
    p.add_argument("--strategy", choices=["fsdp", "ddp"], default=None,
                   help="how the dense part is placed (default: the preset's train.parallel)")
    p.add_argument("--optimizer", choices=["adamw", "muon"], default=None,
                   help="dense optimizer (default: the preset's train.optimizer)")
    p.add_argument("--json", action="store_true", help="every rank's numbers as JSON (bytes)")


def plan(args) -> int:
    """Per-rank memory of a preset trained on W ranks, from its config alone (the model is built on meta)."""
    from engram.distributed.plan import format_plan, memory_plan
    from engram.presets import get_preset

    run = _run_config(args)
    model = run.model
    if model.unresolved():  # a model preset's run: the model preset's own values stand for its data
        base = get_preset(args.preset)
        tables = base.engram or base.overencoding
        model = model.with_data(base.backbone.vocab_size, tables.pad_id if tables else 0)
    result = memory_plan(model, args.world_size, args.strategy or run.train.placement.parallel,
                         args.optimizer or run.train.optim.name, run.train.tokens_per_step)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_plan(result, args.preset))
    return 0


COMMANDS = (
    Command("train", "train a model from a preset (resumes from the run's latest checkpoint)", train_flags, train),
    Command("eval", "validation loss and bits per byte of a checkpoint", eval_flags, evaluate),
    Command("sample", "continue a prompt with a trained model, streaming the text", sample_flags, sample),
    Command("export-tables", "write a checkpoint's Engram tables as raw files for the disk tier",
            export_tables_flags, export_tables),
    Command("generate", "like sample, with the Engram tables on device, in host RAM or on disk",
            generate_flags, generate),
    Command("export-hf", "write a checkpoint as a Hugging Face transformers folder (needs engram-lm[hf])",
            export_hf_flags, export_hf),
    Command("finetune", "train an Engram adapter on a frozen pretrained transformers model (needs engram-lm[hf])",
            finetune_flags, finetune),
    # lm_eval's own flags, passed through unchanged (see `engram lm-eval --help`), with the model "engram" registered
    Command("lm-eval", "run lm-evaluation-harness with the model name `engram` registered (needs engram-lm[eval])",
            run=lm_eval, passthrough=True),
    Command("data", "data preparation", subcommands=(
        Command("prepare", "build (or reuse) the corpus, tokenizer and token shards of a preset",
                prepare_flags, prepare),)),
    Command("demo", "train demo-moe and demo-engram and compare them (what `make demo` runs)", demo_flags, demo),
    Command("bench", "benchmarks that ship with the package", subcommands=(
        # its options (see `engram bench offload --help`) belong to the benchmark and are passed through
        Command("offload", "prefill/decode tokens/s per table tier vs device-resident, hit rate, peak RSS",
                run=bench_offload, passthrough=True),)),
    Command("sweep", "the paper's experiments: allocation (U-curve), memory scaling, ablations; report makes the "
                     "plots and tables", sweep_flags, sweep),
    INSPECT,
    Command("presets", "list presets with their parameter counts", run=presets),
    Command("plan", "per-rank memory (parameters, gradients, optimizer state) of a preset on W ranks, before renting "
                    "them", plan_flags, plan),
)

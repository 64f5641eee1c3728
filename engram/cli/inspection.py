"""``engram inspect VERB``: the analysis tools of ``engram.analysis`` (docs/ANALYSIS.md), one row per verb.

A verb is its name, its help, the function that declares its own flags, and a handler that calls the
tool's ``inspect_<verb>`` with the parsed flags and a resolved device. Every verb also takes
``--device`` and prints the tool's result as JSON.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable, NamedTuple

from engram.cli.flags import (CKPT_HELP, Command, add_ckpt, add_device, add_windows, device, directory,
                              nonnegative_int, positive_int, probability, sequence_length)


class Verb(NamedTuple):
    name: str
    help: str
    add_flags: Callable
    handler: Callable  # (args, device: str) -> the tool's result (a JSON-able dict)


def gates_flags(p) -> None:
    add_ckpt(p)
    p.add_argument("--text", default=None, help="the text to map")
    p.add_argument("--file", default=None, help="read the text from this file instead")
    p.add_argument("--out", required=True, type=directory, help="directory for gates.html, gates.png, gates.json")
    p.add_argument("--top", type=positive_int, default=20, help="highest-gated n-grams to list (default 20)")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="map only the first N tokens, <|bos|> included (default: all; more than the model's "
                        "context is an error)")


def gates(args, device: str) -> dict:
    from engram.analysis.gates import inspect_gates

    if (args.text is None) == (args.file is None):
        raise ValueError("give exactly one of --text and --file")
    text = args.text if args.text is not None else Path(args.file).read_text(encoding="utf-8")
    return inspect_gates(args.ckpt, text, args.out, top=args.top, max_tokens=args.max_tokens, device=device)


def knockout_flags(p) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--ckpt", help=CKPT_HELP)
    which.add_argument("--hf", help="a transformers Qwen4-Exp checkpoint directory: its PLE layers are knocked out, "
                                    "tables served from --tier (needs --text)")
    p.add_argument("--text", default=None, help="with --hf: the text to probe (a file, a directory or hf:NAME), split "
                                                "into train and validation documents")
    p.add_argument("--tables", default=None, help="with --hf: serve the PLE tables from this exported tables directory "
                                                  "instead of the checkpoint's shards")
    p.add_argument("--tier", default="disk", choices=["disk", "host"], help="with --hf: where the tables are served "
                                                                            "from (default disk)")
    p.add_argument("--cache-rows", type=nonnegative_int, default=0, help="with --hf: a row cache of N rows per table")
    p.add_argument("--cache-dir", default="runs/cache", help="with --hf: where the tokenized text is kept")
    p.add_argument("--val-fraction", type=probability, default=0.1, help="with --hf: the share of --text's documents "
                                                                     "probed; the rest are mined (default 0.1)")
    p.add_argument("--max-probes", type=positive_int, default=None, help="sample at most N probes per set (default all)")
    p.add_argument("--max-train-tokens", type=positive_int, default=None,
                   help="mine patterns and identifier counts from the first N train tokens (default all)")
    p.add_argument("--max-val-tokens", type=positive_int, default=None, help="probe the first N validation tokens (default all)")
    p.add_argument("--seq-len", type=sequence_length, default=256, help="scoring window; half of it is the minimum context "
                                                             "(default 256)")
    p.add_argument("--out", default=None, type=directory, help="also write knockout.json here")


def knockout(args, device: str) -> dict:
    from engram.analysis.knockout import inspect_knockout, inspect_knockout_text

    if args.hf is not None:
        if args.text is None:
            raise ValueError("--hf needs --text: a transformers checkpoint holds no corpus to probe")
        tokenizer_file = Path(args.hf) / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(f"{args.hf} has no tokenizer.json: the probes need the model's tokenizer")
        from engram.hf.qwen4exp import load_tiered

        model, handle = load_tiered(args.hf, args.tier, args.tables, args.cache_rows)
        model.to(device)  # the rows follow: the tier sends them where the model is
        with handle:
            return inspect_knockout_text(model, tokenizer_file, args.text, args.out, args.max_probes,
                                         args.max_train_tokens, args.max_val_tokens, args.seq_len, args.cache_dir,
                                         args.val_fraction, {"checkpoint": args.hf, "tier": args.tier}, handle)
    if args.text is not None or args.tables is not None or args.cache_rows:
        raise ValueError("--text, --tables and --cache-rows go with --hf (a checkpoint probes its own corpus)")
    return inspect_knockout(args.ckpt, args.out, max_probes=args.max_probes, max_train_tokens=args.max_train_tokens,
                            max_val_tokens=args.max_val_tokens, seq_len=args.seq_len, device=device)


def logit_lens_flags(p) -> None:
    add_ckpt(p, repeat=True)
    p.add_argument("--out", required=True, type=directory, help="directory for logit_lens.png and logit_lens.json")
    add_windows(p, 4)


def logit_lens(args, device: str) -> dict:
    from engram.analysis.logit_lens import inspect_logit_lens

    return inspect_logit_lens(args.ckpt, args.out, args.batch_size, args.seq_len, args.batches, device)


def cka_flags(p) -> None:
    add_ckpt(p, "--base", whose="the baseline's ")
    add_ckpt(p, "--engram", whose="the Engram model's ")
    p.add_argument("--out", required=True, type=directory, help="directory for cka.png and cka.json")
    p.add_argument("--minibatch", type=positive_int, default=512, help="tokens per CKA minibatch (default 512)")
    p.add_argument("--top", type=positive_int, default=5, help="most similar baseline blocks in the alignment index "
                                                      "(default 5, the paper's)")
    add_windows(p, 8)


def cka(args, device: str) -> dict:
    from engram.analysis.cka import inspect_cka

    return inspect_cka(args.base, args.engram, args.out, args.batch_size, args.seq_len, args.batches,
                       args.minibatch, args.top, device)


def tables_flags(p) -> None:
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--ckpt", help=CKPT_HELP)
    which.add_argument("--release", help="a DeepSeek-V4.1 checkpoint directory: its tables are read from the shards in "
                                         "place (needs --text)")
    p.add_argument("--text", default=None, help="with --release: the text to count (a file, a directory or hf:NAME)")
    p.add_argument("--cache-dir", default="runs/cache", help="with --release: where the tokenized text is kept")
    p.add_argument("--cache-rows", type=nonnegative_int, default=0, help="with --release: a row cache of N rows per "
                                                                        "table in front of the disk tier")
    p.add_argument("--out", required=True, type=directory, help="directory for tables.json and row_usage.png")
    p.add_argument("--split", default="val", choices=["train", "val"], help="with --ckpt: tokens to count (default val)")
    add_windows(p, 16)


def tables(args, device: str) -> dict:
    from engram.analysis.tables import inspect_release_tables, inspect_tables

    if args.release is not None:
        if args.text is None:
            raise ValueError("--release needs --text: the release holds no corpus to count")
        return inspect_release_tables(args.release, args.text, args.out, args.batch_size, args.seq_len, args.batches,
                                      args.cache_dir, args.cache_rows)
    if args.text is not None or args.cache_rows:
        raise ValueError("--text and --cache-rows go with --release (a checkpoint counts its own corpus)")
    return inspect_tables(args.ckpt, args.out, args.split, args.batch_size, args.seq_len, args.batches, device)


VERBS = (
    Verb("gates", "per-token Engram gate values of a text as HTML + PNG, top n-grams", gates_flags, gates),
    Verb("knockout", "static-pattern vs in-context probes with Engram zeroed: retention", knockout_flags, knockout),
    Verb("logit-lens", "KL(final || block) per block for one or more models, one plot", logit_lens_flags, logit_lens),
    Verb("cka", "linear CKA between the blocks of a baseline and an Engram model, heatmap and alignment index",
         cka_flags, cka),
    Verb("tables", "row usage (Zipf), collision rates vs capacity-1 and shuffled-hash controls, losses with those "
                   "controls", tables_flags, tables),
)


def _flags(verb: Verb, p) -> None:
    verb.add_flags(p)
    add_device(p)


def _run(verb: Verb, args) -> int:
    print(json.dumps(verb.handler(args, str(device(args))), indent=2))
    return 0


INSPECT = Command(
    "inspect", "analysis tools: gate maps, knock-out, LogitLens, CKA, table statistics (docs/ANALYSIS.md)",
    subcommands=tuple(Command(v.name, v.help, functools.partial(_flags, v), functools.partial(_run, v))
                      for v in VERBS))

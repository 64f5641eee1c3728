"""Command line: one subcommand per library function, help on every flag.

    engram train --preset demo-engram [--set train.max_steps=100 ...] [--out DIR] [--no-resume]
    torchrun --nproc_per_node=2 -m engram.cli train --preset demo-engram   (tables sharded over 2 ranks)
    engram eval --ckpt runs/demo/seed0/demo-engram/train
    engram sample --ckpt runs/demo/seed0/demo-engram/train --prompt "import os"
    engram data prepare [--preset NAME] [--set data.vocab_size=4096]
    engram demo [--quick] [--seeds 3] [--workers 2]
    engram export-tables --ckpt runs/demo/seed0/demo-engram/train --out tables/
    engram generate --ckpt runs/demo/seed0/demo-engram/train --prompt "import os" --tier disk --tables tables/
    engram sweep allocation --budget tiny --seeds 3 --workers 2
    engram sweep init --budget tiny --first-seed 3 --points pure-moe table_std=1
    engram sweep report --budget tiny
    engram inspect gates --ckpt runs/demo/seed0/demo-engram/train --text "import os.path" --out docs/results/analysis
    engram inspect knockout --ckpt runs/demo/seed0/demo-engram/train [--max-probes 500]
    engram inspect logit-lens --ckpt runs/demo/seed0/demo-engram/train --ckpt runs/demo/seed0/demo-moe/train --out DIR
    engram inspect cka --base runs/demo/seed0/demo-moe/train --engram runs/demo/seed0/demo-engram/train --out DIR
    engram inspect tables --ckpt runs/demo/seed0/demo-engram/train --out DIR
    engram presets

Each subcommand is a ``Command`` (``flags``): a function that declares its own flags and one that runs
it. ``commands`` holds them in ``--help`` order, ``inspection`` the five ``inspect`` verbs as one table,
``flags`` the flags several commands share and ``overrides`` the ``--set`` parser. Commands import what
they run when they run: the research tools (sweeps, analysis, demo, bench) load only when asked for.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from engram.cli.commands import COMMANDS
from engram.cli.flags import Command


def _add(sub, command: Command) -> None:
    p = sub.add_parser(command.name, help=command.help, add_help=not command.passthrough)
    if command.subcommands:
        inner = p.add_subparsers(dest=f"{command.name}_command", required=True)
        for child in command.subcommands:
            _add(inner, child)
        return
    if command.add_flags is not None:
        command.add_flags(p)
    p.set_defaults(fn=command.run, passthrough=command.passthrough)


class UsageError(Exception):
    """A command line argparse refused: ``main`` prints it as one line and returns 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors raised (one line, exit 2 from ``main``) instead of a usage dump."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="engram", description="Engram: conditional memory for language models")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        _add(sub, command)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if args.passthrough:
            args.passthrough = extra
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except UsageError as err:
        print(err, file=sys.stderr)
        return 2
    from engram.train import TrainingDiverged, TrainingInterrupted

    formatwarning = warnings.formatwarning  # one line per warning while the command runs; restored after
    warnings.formatwarning = lambda message, *rest, **kw: f"engram {args.command}: warning: {message}\n"
    try:
        return args.fn(args)
    except TrainingDiverged as err:
        print(f"engram {args.command}: {err}", file=sys.stderr)
        return 3
    except TrainingInterrupted as err:  # the last finished step was saved
        print(f"engram {args.command}: {err}", file=sys.stderr)
        return 128 + err.signum
    except (ValueError, OSError, ImportError) as err:
        # configuration, data and checkpoint problems are the user's to fix: say what, not where in torch
        print(f"engram {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"engram {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = formatwarning

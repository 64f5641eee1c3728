"""What the subcommands share: the ``Command`` record that ``build_parser`` turns into a subparser, and
the flags several commands declare (``--preset``/``--set``, ``--ckpt``, ``--device``, sampling, windows).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

CKPT_HELP = "checkpoint directory or run directory (uses its latest)"


@dataclass(frozen=True)
class Command:
    """One subcommand: ``add_flags(parser)`` declares its flags, ``run(args)`` returns the exit code.

    A command with ``subcommands`` is a group (``engram data prepare``, ``engram inspect gates``) and
    runs nothing itself. A ``passthrough`` command gets the arguments argparse did not recognise as
    ``args.passthrough`` and has no ``--help`` of its own (the offload benchmark parses its flags).
    """

    name: str
    help: str
    add_flags: Callable[[argparse.ArgumentParser], None] | None = None
    run: Callable[[argparse.Namespace], int] | None = None
    subcommands: tuple[Command, ...] = ()
    passthrough: bool = False


def add_preset(p: argparse.ArgumentParser, default: str | None) -> None:
    """``--preset`` (required when there is no default) and ``--set`` for a run config."""
    p.add_argument("--preset", default=default, required=default is None,
                   help="run or model preset (see `engram presets`)" + (f"; default {default}" if default else ""))
    add_set(p, "override a config field by dotted key, e.g. train.lr=1e-3 or model.engram.layer_ids=[1,3] "
               "(repeatable; values parsed as JSON when possible)")


def add_set(p: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``; ``help`` says what it may change."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_ckpt(p: argparse.ArgumentParser, flag: str = "--ckpt", whose: str = "", repeat: bool = False) -> None:
    """A required checkpoint flag; ``whose`` prefixes the help ("the baseline's "), ``repeat`` collects a list."""
    p.add_argument(flag, required=True, action="append" if repeat else "store",
                   help=whose + CKPT_HELP + ("; repeat for each model" if repeat else ""))


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto)")


def add_sampling(p: argparse.ArgumentParser) -> None:
    """The prompt and the sampler of ``sample`` and ``generate``, and ``--device``."""
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate (default 100)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens (default 50; 0 = off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold (default off)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    add_device(p)


def add_windows(p: argparse.ArgumentParser, batches: int) -> None:
    """Fixed validation windows read by an analysis tool: ``batches`` x ``--batch-size`` x ``--seq-len``."""
    p.add_argument("--batches", type=int, default=batches, help=f"batches of windows to read (default {batches})")
    p.add_argument("--batch-size", type=int, default=4, help="windows per batch (default 4)")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")


def device(args: argparse.Namespace):
    """``--device`` resolved (auto: CUDA when present), as a ``torch.device``."""
    from engram.train import resolve_device

    return resolve_device(args.device)

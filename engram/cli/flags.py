"""What the subcommands share: the ``Command`` record that ``build_parser`` turns into a subparser, and
the flags several commands declare (``--preset``/``--set``, ``--ckpt``, ``--device``, sampling, windows).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

# value types: engram.argtypes, shared with the research tools' own entry points
from engram.argtypes import (directory, nonnegative_float, nonnegative_int, positive_float, positive_int,
                             probability, seed, sequence_length)

CKPT_HELP = "checkpoint directory or run directory (uses its latest)"


def device_name(text: str) -> str:
    """auto, cpu, cuda[:N] or mps, and present on this machine."""
    kind, colon, index = text.partition(":")
    if text != "auto" and (kind not in ("cpu", "cuda", "mps") or (colon and not (kind == "cuda" and index.isdigit()))):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda, cuda:N or mps, got {text!r}")
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r} asked for, but CUDA is not available on this machine "
                                             "(use cpu or auto)")
        if index and int(index) >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if kind == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise argparse.ArgumentTypeError("'mps' asked for, but MPS is not available on this machine")
    return text


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
    add_set(p, "override a config field by dotted key, e.g. train.optim.lr=1e-3 or model.engram.layer_ids=[1,3] "
               "(repeatable; values parsed as JSON when possible)")


def add_set(p: argparse.ArgumentParser, help: str) -> None:
    """``--set KEY=VALUE`` (repeatable) into ``args.overrides``; ``help`` says what it may change."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def add_ckpt(p: argparse.ArgumentParser, flag: str = "--ckpt", whose: str = "", repeat: bool = False) -> None:
    """A required checkpoint flag; ``whose`` prefixes the help ("the baseline's "), ``repeat`` collects a list."""
    p.add_argument(flag, required=True, action="append" if repeat else "store",
                   help=whose + CKPT_HELP + ("; repeat for each model" if repeat else ""))


def add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", type=device_name, help="auto, cpu or cuda[:N] (default auto)")


def add_sampling(p: argparse.ArgumentParser) -> None:
    """The prompt and the sampler of ``sample`` and ``generate``, and ``--device``."""
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=positive_int, default=100, help="tokens to generate (default 100)")
    p.add_argument("--truncate-prompt", action="store_true",
                   help="when the prompt plus --max-new-tokens exceeds the model's context, keep the prompt's last "
                        "tokens instead of refusing")
    p.add_argument("--temperature", type=nonnegative_float, default=0.8, help="0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=nonnegative_int, default=50,
                   help="sample from the k most likely tokens (default 50; 0 = off)")
    p.add_argument("--top-p", type=probability, default=None, help="nucleus sampling threshold in (0, 1] (default off)")
    p.add_argument("--seed", type=seed, default=0, help="sampling seed (default 0)")
    add_device(p)


def add_windows(p: argparse.ArgumentParser, batches: int) -> None:
    """Fixed validation windows read by an analysis tool: ``batches`` x ``--batch-size`` x ``--seq-len``."""
    p.add_argument("--batches", type=positive_int, default=batches, help=f"batches of windows to read (default {batches})")
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows per batch (default 4)")
    p.add_argument("--seq-len", type=sequence_length, default=256, help="tokens per window (default 256)")


def device(args: argparse.Namespace):
    """``--device`` resolved (auto: CUDA when present), as a ``torch.device``."""
    from engram.train import resolve_device

    return resolve_device(args.device)

"""argparse value types shared by every command line: the ``engram`` CLI and the entry points of research
tools and benchmarks (``python -m engram.bench.offload``). Each reports "argument --flag: <why>" and
argparse exits 2 before any work starts."""

from __future__ import annotations

import argparse
from pathlib import Path


def _number(kind: type, low: float | None, low_open: bool, high: float | None, what: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if kind is float and value != value:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    parse.__name__ = what
    return parse


positive_int = _number(int, 1, False, None, "an integer >= 1")
sequence_length = _number(int, 2, False, None, "an integer >= 2 (a window needs two tokens to predict one)")
nonnegative_int = _number(int, 0, False, None, "an integer >= 0")
seed = _number(int, 0, False, 2**63 - 1, "an integer in [0, 2**63)")
nonnegative_float = _number(float, 0.0, False, 1e30, "a finite number >= 0")
positive_float = _number(float, 0.0, True, 1e30, "a finite number > 0")
probability = _number(float, 0.0, True, 1.0, "a probability in (0, 1]")


def directory(text: str) -> str:
    """A directory to write into: it may not exist yet, but it may not be a file."""
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a directory")
    return text

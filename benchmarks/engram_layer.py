"""Engram layer throughput, forward and forward+backward, against the SwiGLU FFN it sits beside.

Legend: B batch, T time, G hyper-connection branches, D model width, H hash heads, d_h row width,
M = d_mem = H*d_h memory width.

The paper's shape (docs/ALGORITHM.md §3): D=2560, d_mem=1280 (2 orders x 8 heads x d_h=80), G=4, conv kernel 4,
~2.26M rows per head. Scaled to a CPU: D=256, d_mem=128 (d_h=8), same d_mem/D = 0.5, G=4, kernel 4,
~100k rows per head, B x T = 8 x 512. Hash ids come from ``NgramHasher`` on random raw ids (so rows are
spread uniformly over the tables); hashing itself is timed by benchmarks/hashing.py, not here.

Timed, each as the median of several calls:
  engram dense    ``Engram.forward`` (+ backward into the hidden state and every parameter), the table
                  gradient a dense (rows, d_h) tensor;
  engram sparse   the same with ``layer.embedding.sparse = True``: the table gradient holds only the
                  B*T*H looked-up rows;
  ffn             ``SwiGLU(D, 8D/3)`` on (B, T, D) (the block's FFN reads one mix of the G branches).
The ratio engram / ffn is the layer's cost relative to one dense FFN of the same block (reported, no
target: on a CPU at small D the layer is bound by elementwise passes over (B, T, G, D), not matmuls).

    python benchmarks/engram_layer.py [--batch 8] [--seq 512] [--dim 256] [--rows 100000]
                                      [--repeats 10] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

import torch

from timing import time_calls

from engram.config import EngramConfig
from engram.hashing import NgramHasher
from engram.model.engram import Engram
from engram.model.layers import SwiGLU
from engram.tokenizer import CompressedTokenizer

RAW_VOCAB = 129_280  # DeepSeek-V4 raw vocabulary; compression does not change the lookup cost


def build(args: argparse.Namespace) -> tuple[Engram, SwiGLU, torch.Tensor, torch.Tensor, EngramConfig]:
    """The Engram layer, the FFN, hidden states (B, T, G, D) and hash ids (B, T, H) for one layer."""
    K = args.heads_per_order
    orders = args.max_ngram - 1
    # d_mem = orders * n_embed_per_ngram = D / 2, as in the paper (1280 / 2560)
    config = EngramConfig(engram_vocab_size=[args.rows] * orders, max_ngram_size=args.max_ngram,
                          n_embed_per_ngram=args.dim // 2 // orders, n_head_per_ngram=K, layer_ids=[1],
                          kernel_size=args.kernel)
    hasher = NgramHasher(config, CompressedTokenizer.identity(RAW_VOCAB))
    gen = torch.Generator().manual_seed(0)
    raw = torch.randint(0, RAW_VOCAB, (args.batch, args.seq), generator=gen)
    hash_ids = hasher(raw)[1]  # (B, T, H)
    table_sizes = hasher.geometry[1]
    torch.manual_seed(0)
    layer = Engram(config, args.dim, table_sizes, branches=args.branches)
    with torch.no_grad():  # a trained-looking conv, so the conv branch is not the identity shortcut
        layer.conv_weight.normal_(std=0.1)
    ffn = SwiGLU(args.dim, args.ffn_hidden or 8 * args.dim // 3)
    hidden = torch.randn(args.batch, args.seq, args.branches, args.dim, generator=gen)
    return layer, ffn, hidden, hash_ids, config


def forward_fn(module: torch.nn.Module, inputs: tuple, before: Callable[[], None] = lambda: None):
    """Inference forward (no autograd graph)."""
    def run():
        before()
        with torch.no_grad():
            return module(*inputs)
    return run


def train_fn(module: torch.nn.Module, x: torch.Tensor, rest: tuple, before: Callable[[], None] = lambda: None):
    """Forward + backward into x and every parameter with a fixed upstream gradient (both modules
    return x's shape). Grads are set to None first, as ``zero_grad(set_to_none=True)`` leaves them
    after an optimizer step, so the dense table gradient is allocated and zero-filled every call."""
    x = x.detach().requires_grad_(True)
    grad_out = torch.randn_like(x)

    def run():
        before()
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x, *rest).backward(grad_out)
    return run


def matmul_macs_per_token(config: EngramConfig, branches: int, dim: int, ffn_hidden: int) -> tuple[int, int]:
    """Multiply-accumulates per token of the projections: Engram (W_K per branch + shared W_V) vs SwiGLU."""
    M, G = config.memory_dim, branches
    return G * M * dim + M * dim, 3 * dim * ffn_hidden


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8, help="B (default 8)")
    parser.add_argument("--seq", type=int, default=512, help="T (default 512)")
    parser.add_argument("--dim", type=int, default=256, help="D, model width (default 256; paper 2560)")
    parser.add_argument("--rows", type=int, default=100_000, help="nominal rows per head table (default 100000; "
                        "paper ~2.26M)")
    parser.add_argument("--heads-per-order", type=int, default=8, help="K (default 8, as the paper)")
    parser.add_argument("--max-ngram", type=int, default=3, help="N (default 3: 2- and 3-grams)")
    parser.add_argument("--branches", type=int, default=4, help="G, hyper-connection branches (default 4)")
    parser.add_argument("--kernel", type=int, default=4, help="short conv taps (default 4)")
    parser.add_argument("--ffn-hidden", type=int, default=None, help="SwiGLU hidden width (default 8*D/3)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per measurement (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls first (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    layer, ffn, hidden, hash_ids, config = build(args)
    ffn_hidden = ffn.w1.out_features
    x_ffn = hidden[:, :, 0].contiguous()  # (B, T, D): the FFN's input size
    tokens = args.batch * args.seq

    def set_sparse(sparse: bool) -> Callable[[], None]:
        def before():
            layer.embedding.sparse = sparse
        return before

    fns: dict[str, Callable[[], object]] = {}
    for sparse in (False, True):
        tag = "sparse" if sparse else "dense"
        fns[f"engram {tag}|forward"] = forward_fn(layer, (hidden, hash_ids), set_sparse(sparse))
        fns[f"engram {tag}|forward+backward"] = train_fn(layer, hidden, (hash_ids,), set_sparse(sparse))
    fns["ffn|forward"] = forward_fn(ffn, (x_ffn,))
    fns["ffn|forward+backward"] = train_fn(ffn, x_ffn, ())
    times = {name: t["median_s"] for name, t in time_calls(fns, args.repeats, args.warmup).items()}

    # Gradient sizes: what an optimizer step has to read afterwards.
    grads = {}
    for sparse in (False, True):
        train_fn(layer, hidden, (hash_ids,), set_sparse(sparse))()
        g = layer.embedding.weight.grad
        nbytes = (g._values().nbytes + g._indices().nbytes) if g.is_sparse else g.nbytes
        grads["sparse" if sparse else "dense"] = nbytes
    layer.zero_grad(set_to_none=True)

    engram_macs, ffn_macs = matmul_macs_per_token(config, args.branches, args.dim, ffn_hidden)
    rows = layer.embedding.num_rows
    print(f"engram layer: B={args.batch} T={args.seq} G={args.branches} D={args.dim} "
          f"H={config.n_heads} d_h={config.head_dim} d_mem={config.memory_dim} kernel={args.kernel} "
          f"table rows={rows:,} (~{rows // config.n_heads:,}/head); ffn SwiGLU hidden={ffn_hidden}")
    print(f"paper: D=2560 d_mem=1280 d_h=80 G=4 ~2.26M rows/head; threads={torch.get_num_threads()} "
          f"repeats={args.repeats} (median)")
    print(f"projection MACs/token: engram {engram_macs:,} vs ffn {ffn_macs:,} "
          f"({engram_macs / ffn_macs:.2f}x)")
    print(f"{'module':<14} {'pass':<17} {'s/call':>9} {'tokens/s':>11} {'vs ffn':>7} {'table grad':>11}")
    results = []
    for key, seconds in times.items():
        module, phase = key.split("|")
        ratio = seconds / times[f"ffn|{phase}"]
        grad = ""
        if module.startswith("engram") and phase == "forward+backward":
            grad = f"{grads[module.split()[1]] / 2**20:.1f} MiB"
        print(f"{module:<14} {phase:<17} {seconds:>9.4f} {tokens / seconds:>11.3e} {ratio:>6.2f}x {grad:>11}")
        results.append({"module": module, "phase": phase, "median_s": seconds, "tokens_per_s": tokens / seconds,
                        "ratio_vs_ffn": ratio})
    headline = times["engram sparse|forward+backward"] / times["ffn|forward+backward"]
    print(f"engram (sparse) / ffn, forward+backward: {headline:.2f}x")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"benchmark": "engram_layer", "batch": args.batch, "seq": args.seq, "dim": args.dim,
                       "branches": args.branches, "n_heads": config.n_heads, "head_dim": config.head_dim,
                       "memory_dim": config.memory_dim, "table_rows": rows, "ffn_hidden": ffn_hidden,
                       "threads": torch.get_num_threads(), "repeats": args.repeats,
                       "macs_per_token": {"engram": engram_macs, "ffn": ffn_macs},
                       "table_grad_bytes": grads, "results": results,
                       "engram_sparse_over_ffn_fwd_bwd": headline}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

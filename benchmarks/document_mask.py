"""Cost of document-masked attention: a training step (forward + backward) of the demo Engram
model on a packed batch, with the mask (causal and block-diagonal by document, the default) against plain
causal attention, timed round-robin in the same run; and the same at 4x the length.

    python benchmarks/document_mask.py [--repeats 15] [--threads 2] [--doc-len 100] [--json out.json]

Documents are ``--doc-len`` tokens on average (exponential lengths, as packed corpora have), so a
256-token window holds ~2-3 of them. The ids are random: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import time_calls  # noqa: E402

from engram.model.transformer import EngramLM  # noqa: E402
from engram.presets import get_run_preset  # noqa: E402


def packed_batch(B: int, T: int, vocab: int, doc_len: float, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=gen)
    starts = torch.rand(B, T, generator=gen) < 1.0 / doc_len
    starts[:, 0] = True
    return ids, starts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--doc-len", type=float, default=100.0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = get_run_preset("demo-engram")
    rows = []
    for T, B in ((run.train.seq_len, run.train.batch_size), (4 * run.train.seq_len, run.train.batch_size // 4)):
        models = {}
        for masked in (False, True):
            bb = dataclasses.replace(run.model.backbone, max_seq_len=T, document_mask=masked)
            torch.manual_seed(0)
            models[masked] = EngramLM(dataclasses.replace(run.model, backbone=bb), sparse_tables=True)
        ids, starts = packed_batch(B, T, run.model.backbone.vocab_size, args.doc_len)

        def step(model):
            def fn():
                model.zero_grad(set_to_none=True)
                model(ids, labels=ids, boundary=starts).loss.backward()
            return fn

        times = time_calls({"causal": step(models[False]), "document mask": step(models[True])},
                           args.repeats, warmup=2)
        ratio = times["causal"]["median_s"] / times["document mask"]["median_s"]
        rows.append({"seq_len": T, "batch": B, "docs_per_row": float(starts.sum() / B),
                     "causal_s": times["causal"]["median_s"], "masked_s": times["document mask"]["median_s"],
                     "speed_vs_causal": ratio})
    print(f"demo-engram training step (forward + backward), {args.threads} threads, median of {args.repeats}")
    print(f"{'T':>5} {'B':>3} {'docs/row':>8} {'causal ms':>10} {'masked ms':>10} {'masked speed vs causal':>23}")
    for r in rows:
        print(f"{r['seq_len']:>5} {r['batch']:>3} {r['docs_per_row']:>8.1f} {1e3 * r['causal_s']:>10.1f} "
              f"{1e3 * r['masked_s']:>10.1f} {r['speed_vs_causal']:>22.3f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does a model use the needle at all? For NIAH-single samples at one length, the negative log-likelihood
of the answer's value tokens with its needle in the haystack, and with the needle's value replaced by
another number. A model that retrieves gives the first a much lower NLL; equal NLLs mean no retrieval,
even partial (docs/LONG_CONTEXT.md).

    python scripts/needle_signal.py CKPT [CKPT ...] [--length 256] [--samples 40]
"""

from __future__ import annotations

import argparse
import random

import torch

from engram.data.bpe import special_ids
from engram.longctx.evaluate import fit, held_out_texts
from engram.train import load_checkpoint


def value_nll(model, ids: list[int], answer: list[int]) -> float:
    """NLL (nats) of ``answer`` minus its final "." token after ``ids``."""
    x = torch.tensor([ids + answer])
    with torch.no_grad():
        logits = model(x).logits[0, len(ids) - 1: len(ids) + len(answer) - 2].float()  # predicts answer[:-1]
    return -torch.log_softmax(logits, -1)[torch.arange(len(answer) - 1), torch.tensor(answer[:-1])].sum().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpts", nargs="+")
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--samples", type=int, default=40)
    args = p.parse_args()
    for path in args.ckpts:
        ckpt = load_checkpoint(path)
        tok, bos = ckpt.tokenizer, special_ids(ckpt.tokenizer).bos
        texts = held_out_texts(ckpt.data_config)
        with_needle, replaced = [], []
        for i in range(args.samples):
            sample, ids = fit("niah_single", 5000 + i, texts, args.length, lambda t: tok.encode(t).ids, bos)
            answer = tok.encode(sample.answer + ".").ids
            value = sample.answer.strip()
            other = str(random.Random(i).randint(10000, 99999))
            swapped = [bos] + tok.encode(sample.prompt.replace(f"is {value}.", f"is {other}.", 1)).ids
            with_needle.append(value_nll(ckpt.model, ids, answer))
            replaced.append(value_nll(ckpt.model, swapped, answer))
        print(f"{path}: value NLL with its needle {sum(with_needle) / len(with_needle):.2f} nats, with the needle's "
              f"value replaced {sum(replaced) / len(replaced):.2f} ({args.samples} samples at {args.length} tokens)")


if __name__ == "__main__":
    main()

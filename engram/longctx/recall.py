"""``engram eval recall``: in-context recall at CPU scale, scored by teacher forcing (one forward per sample).

Legend: L copied tokens, V vocabulary, P key-value pairs.

- **Induction probe** (token level): ``[bos] + s + s`` for s, L ids drawn uniformly from the vocabulary
  (special ids left out). A model that cannot copy predicts the second s no better than the first, at
  about ln V nats per token; one with induction heads predicts it almost exactly. Reported per L: the loss
  on each copy, the gain (first minus second) and the share of second-copy tokens that are the argmax.
- **MQAR** (text level, ``engram.data.recall.mqar``): P pairs ``key=value``, then every key again in another
  order, each followed by its value. A query is recalled when every token of its value is the argmax
  given the text before it. Reported per P: recall accuracy, the loss per value token, and the sample's
  length in tokens (it grows with P).

Samples depend only on their seed (0, 1, ...), so two models are asked exactly the same things. A run
directory's every checkpoint can be scored (``recall_curve``), which gives the step at which recall
appears.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from engram.data.bpe import special_ids, with_bos
from engram.data.recall import mqar

DEFAULT_LENGTHS = (16, 32, 64)
DEFAULT_PAIRS = (2, 4, 8, 16)


@torch.no_grad()
def induction_probe(model, vocab_size: int, lengths, samples: int, seed: int = 0, bos: int | None = None,
                    exclude: tuple[int, ...] = (), batch: int = 16) -> dict:
    """{L: {"first_loss", "second_loss", "gain", "second_accuracy"}} of ``model`` (ids (B, T) -> logits)."""
    allowed = torch.tensor([i for i in range(vocab_size) if i not in set(exclude)])
    out = {}
    for L in lengths:
        g = torch.Generator().manual_seed(seed * 1_000_003 + L)
        seqs = allowed[torch.randint(0, len(allowed), (samples, L), generator=g)]  # (n, L)
        prefix = [] if bos is None else [bos]
        ids = torch.cat([torch.tensor([prefix] * samples, dtype=torch.long).view(samples, len(prefix)),
                         seqs, seqs], dim=1)  # (n, 2L + [1])
        losses, hits = [], []
        for start in range(0, samples, batch):
            x = ids[start: start + batch]
            logits = model(x).logits.float()  # (b, T, V)
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                  reduction="none").view(x.shape[0], -1)  # (b, T-1): predicting token t+1
            right = (logits[:, :-1].argmax(-1) == x[:, 1:])
            losses.append(nll)
            hits.append(right)
        nll, right = torch.cat(losses), torch.cat(hits)
        p = len(prefix)
        # target positions (of x[:, 1:]): the first copy's tokens 1..L-1 after the prefix, the second copy's 0..L-1
        first = nll[:, p: p + L - 1] if p else nll[:, : L - 1]
        second = nll[:, p + L - 1:]
        out[L] = {"first_loss": first.mean().item() if first.numel() else float("nan"),
                  "second_loss": second.mean().item(),
                  "gain": (first.mean() - second.mean()).item() if first.numel() else float("nan"),
                  "second_accuracy": right[:, p + L - 1:].float().mean().item()}
    return out


def _target_tokens(encoding, text: str, parts: tuple[str, ...]) -> list[list[int]]:
    """Token indices of each target (the odd parts): every token whose characters overlap it."""
    spans, at = [], 0
    for i, part in enumerate(parts):
        if i % 2:
            spans.append((at, at + len(part)))
        at += len(part)
    return [[t for t, (a, b) in enumerate(encoding.offsets) if a < end and b > start and b > a]
            for start, end in spans]


@torch.no_grad()
def mqar_accuracy(model, tokenizer, pair_counts, samples: int, seed: int = 0) -> dict:
    """{P: {"accuracy", "value_loss", "tokens"}} of ``model`` on MQAR samples of P pairs (all keys asked)."""
    bos = special_ids(tokenizer).bos
    shift = 0 if bos is None else 1
    out = {}
    for pairs in pair_counts:
        recalled = asked = 0
        losses, lengths = [], []
        for s in range(samples):
            sample = mqar(seed * 1_000_003 + s, pairs)
            enc = tokenizer.encode(sample.text, add_special_tokens=False)
            ids = torch.tensor([with_bos(enc.ids, bos)])
            logits = model(ids).logits[0].float()  # (T, V)
            lengths.append(ids.shape[1])
            for tokens in _target_tokens(enc, sample.text, sample.parts):
                at = torch.tensor([t + shift for t in tokens])  # positions in ids
                if (at == 0).any():
                    continue  # a target at the very start has nothing before it (never, with the templates)
                pred = logits[at - 1]  # predicted from the position before
                losses.append(F.cross_entropy(pred, ids[0, at], reduction="sum").item() / len(tokens))
                recalled += bool((pred.argmax(-1) == ids[0, at]).all())
                asked += 1
        out[pairs] = {"accuracy": recalled / max(1, asked), "value_loss": sum(losses) / max(1, len(losses)),
                      "tokens": sum(lengths) / len(lengths)}
    return out


def evaluate_recall(checkpoint, lengths=DEFAULT_LENGTHS, pair_counts=DEFAULT_PAIRS, samples: int = 32,
                    seed: int = 0, device: str = "cpu") -> dict:
    """Both probes on one checkpoint (a path or a run directory's latest); lengths and pairs beyond the
    model's context are left out and named."""
    from engram.train import load_checkpoint

    ckpt = load_checkpoint(checkpoint, device=device)
    model = ckpt.model.eval()
    context = ckpt.run_config.model.backbone.max_seq_len
    special = special_ids(ckpt.tokenizer)
    exclude = tuple(i for i in (special.pad, special.bos, special.eos) if i is not None)
    bos = special.bos
    fit = [L for L in lengths if 2 * L + (bos is not None) <= context]
    result = {"checkpoint": str(ckpt.path), "step": ckpt.step, "context": context, "samples": samples, "seed": seed,
              "induction": induction_probe(model, ckpt.run_config.model.backbone.vocab_size, fit, samples, seed,
                                           bos, exclude),
              "mqar": {}, "skipped_lengths": [L for L in lengths if L not in fit]}
    pairs_fit = []
    for P in pair_counts:
        n = len(with_bos(ckpt.tokenizer.encode(mqar(seed, P).text, add_special_tokens=False).ids, bos))
        (pairs_fit if n <= context else result.setdefault("skipped_pairs", [])).append(P)
    result["mqar"] = mqar_accuracy(model, ckpt.tokenizer, pairs_fit, samples, seed)
    return result


def recall_curve(run_dir, **kwargs) -> list[dict]:
    """``evaluate_recall`` of every checkpoint the run directory keeps, by step: when recall appears."""
    from engram.train import list_checkpoints

    steps = list_checkpoints(run_dir)
    if not steps:
        raise ValueError(f"{run_dir} holds no checkpoints")
    return [evaluate_recall(path, **kwargs) for _, path in steps]


def markdown(results: list[dict]) -> str:
    """One table per probe: a row per checkpoint, a column per length or pair count; what did not fit the
    model's context is named under it."""
    def table(title: str, key: str, columns: list[int], name: str, cell) -> list[str]:
        lines = [title, ""]
        if not columns:
            return lines + [f"(none fits the model's context of {results[0]['context']} tokens)", ""]
        lines += ["| step | " + " | ".join(f"{name}={c}" for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for r in results:
            cells = [(lambda m: "-" if m is None else cell(m))(r[key].get(c) or r[key].get(str(c))) for c in columns]
            lines.append(f"| {r['step']} | " + " | ".join(cells) + " |")
        return lines + [""]

    lengths = sorted({int(L) for r in results for L in r["induction"]})
    pairs = sorted({int(P) for r in results for P in r["mqar"]})
    lines = table("induction: second-copy loss (gain over the first copy), nats per token", "induction", lengths,
                  "L", lambda m: f"{m['second_loss']:.2f} ({m['gain']:+.2f})")
    lines += table("MQAR: recall accuracy (loss per value token), by pairs", "mqar", pairs, "P",
                   lambda m: f"{m['accuracy']:.0%} ({m['value_loss']:.2f})")
    skipped = sorted({f"L={L}" for r in results for L in r.get("skipped_lengths", [])}
                     | {f"P={P}" for r in results for P in r.get("skipped_pairs", [])})
    if skipped:
        lines.append(f"not run, longer than the model's context: {', '.join(skipped)}")
    return "\n".join(lines).rstrip() + "\n"


def chance_loss(vocab_size: int) -> float:
    """A uniform guess's loss per token, for reading the induction table."""
    return math.log(vocab_size)

"""``engram eval recall``: in-context recall at CPU scale, scored by teacher forcing (one forward per sample).

Legend: L words of an induction sequence, V vocabulary, P key-value pairs.

- **Induction probe** (``engram.data.recall.induction``): L random words, " |", the same L words. A model
  that cannot copy predicts the second copy no better than the first; one with induction heads predicts
  it almost exactly. Reported per L: the loss per token of each copy, the gain (first minus second) and
  the share of second-copy words whose every token is the argmax. (Uniformly random token ids instead of
  words would be text no model has read: a first pilot scored them above chance, 11 nats at V = 4096.)
- **MQAR** (text level, ``engram.data.recall.mqar``): P pairs ``key=value``, then every key again in another
  order, each followed by its value. A query is recalled when every token of its value is the argmax
  given the text before it. Reported per P: recall accuracy, the loss per value token, and the sample's
  length in tokens (it grows with P).
- **MQAR at a distance** (``gaps``): P fixed (``gap_pairs``), with G words of plain filler between the pairs and
  the queries, so the recall spans more tokens while the task stays the same size: the length axis of a
  context extension. Reported per G as for MQAR.

Samples depend only on their seed (0, 1, ...), so two models are asked exactly the same things. A run
directory's every checkpoint can be scored (``recall_curve``), which gives the step at which recall
appears.
"""

from __future__ import annotations


import torch

from engram.data.bpe import special_ids, with_bos
from engram.data.recall import induction, mqar

DEFAULT_LENGTHS = (8, 16, 32)  # words per induction sequence
DEFAULT_PAIRS = (2, 4, 8, 16)
DEFAULT_GAP_PAIRS = 8


class _Scored:
    """One sample read by ``model`` with teacher forcing: per span of its text, the log-probability of each of
    its tokens given everything before it, and whether every one of them is the argmax."""

    def __init__(self, model, tokenizer, text: str, bos: int | None):
        self.encoding = tokenizer.encode(text, add_special_tokens=False)
        self.ids = torch.tensor(with_bos(self.encoding.ids, bos))  # (T,)
        self.shift = 0 if bos is None else 1
        self.logp = model(self.ids[None]).logits[0].float().log_softmax(-1)  # (T, V)

    def positions(self, start: int, end: int) -> torch.Tensor:
        """Positions in ``ids`` of the tokens overlapping characters [start, end) that something precedes."""
        return torch.tensor([t + self.shift for t, (a, b) in enumerate(self.encoding.offsets)
                             if a < end and b > start and b > a and t + self.shift > 0], dtype=torch.long)

    def losses(self, at: torch.Tensor) -> torch.Tensor:  # (k,) positions -> (k,) nats, each from the one before
        return -self.logp[at - 1, self.ids[at]]

    def right(self, at: torch.Tensor) -> bool:
        return bool((self.logp[at - 1].argmax(-1) == self.ids[at]).all())


def _spans(sample) -> list[tuple[int, int]]:
    """Character spans of the targets (the odd parts) of ``sample``."""
    spans, at = [], 0
    for i, part in enumerate(sample.parts):
        if i % 2:
            spans.append((at, at + len(part)))
        at += len(part)
    return spans


@torch.no_grad()
def induction_probe(model, tokenizer, word_counts, samples: int, seed: int = 0) -> dict:
    """{L: {"first_loss", "second_loss", "gain", "second_accuracy"}} of ``model`` (ids (B, T) -> logits) on
    ``engram.data.recall.induction`` samples of L random words repeated: the loss per token of the words of
    each copy, the gain (first minus second), and the share of second-copy words whose every token is the
    argmax. The training documents of ``DataConfig.recall_docs`` have this form, with other seeds."""
    bos = special_ids(tokenizer).bos
    out = {}
    for L in word_counts:
        first_losses, second_losses, recalled = [], [], 0
        for s in range(samples):
            sample = induction(seed * 1_000_003 + s, L)
            scored = _Scored(model, tokenizer, sample.text, bos)
            words_start = len("repeat: ")  # the first copy: "repeat: w1 ... wL |"
            first = scored.positions(words_start, len(sample.parts[0]) - len(" | "))
            second = [scored.positions(*span) for span in _spans(sample)]
            first_losses.append(scored.losses(first).mean().item())
            second_losses.append(scored.losses(torch.cat(second)).mean().item())
            recalled += sum(scored.right(word) for word in second)
        first, second = sum(first_losses) / samples, sum(second_losses) / samples
        out[L] = {"first_loss": first, "second_loss": second, "gain": first - second,
                  "second_accuracy": recalled / (samples * L)}
    return out


@torch.no_grad()
def mqar_accuracy(model, tokenizer, pair_counts, samples: int, seed: int = 0, gap: int = 0) -> dict:
    """{P: {"accuracy", "value_loss", "tokens"}} of ``model`` on MQAR samples of P pairs (all keys asked),
    ``gap`` filler words between the pairs and the queries."""
    bos = special_ids(tokenizer).bos
    out = {}
    for pairs in pair_counts:
        recalled = asked = 0
        losses, lengths = [], []
        for s in range(samples):
            sample = mqar(seed * 1_000_003 + s, pairs, gap=gap)
            scored = _Scored(model, tokenizer, sample.text, bos)
            lengths.append(len(scored.ids))
            for span in _spans(sample):
                value = scored.positions(*span)
                losses.append(scored.losses(value).mean().item())
                recalled += scored.right(value)
                asked += 1
        out[pairs] = {"accuracy": recalled / max(1, asked), "value_loss": sum(losses) / max(1, len(losses)),
                      "tokens": sum(lengths) / len(lengths)}
    return out


def mqar_distance(model, tokenizer, pairs: int, gaps, samples: int, seed: int = 0) -> dict:
    """{G: {"accuracy", "value_loss", "tokens"}}: MQAR with ``pairs`` pairs and G filler words before the
    queries (the same pairs and queries at every G)."""
    return {g: mqar_accuracy(model, tokenizer, [pairs], samples, seed, gap=g)[pairs] for g in gaps}


def evaluate_recall(checkpoint, lengths=DEFAULT_LENGTHS, pair_counts=DEFAULT_PAIRS, samples: int = 32,
                    seed: int = 0, device: str = "cpu", gaps=(), gap_pairs: int = DEFAULT_GAP_PAIRS) -> dict:
    """The probes on one checkpoint (a path or a run directory's latest); lengths, pairs and gaps beyond the
    model's context are left out and named."""
    from engram.train import load_checkpoint

    ckpt = load_checkpoint(checkpoint, device=device)
    model = ckpt.model.eval()
    context = ckpt.run_config.model.backbone.max_seq_len
    bos = special_ids(ckpt.tokenizer).bos

    def fits(text: str) -> bool:
        return len(with_bos(ckpt.tokenizer.encode(text, add_special_tokens=False).ids, bos)) <= context

    fit = [L for L in lengths if fits(induction(seed, L).text)]
    result = {"checkpoint": str(ckpt.path), "step": ckpt.step, "context": context, "samples": samples, "seed": seed,
              "induction": induction_probe(model, ckpt.tokenizer, fit, samples, seed),
              "mqar": {}, "skipped_lengths": [L for L in lengths if L not in fit]}
    pairs_fit = []
    for P in pair_counts:
        (pairs_fit if fits(mqar(seed, P).text) else result.setdefault("skipped_pairs", [])).append(P)
    result["mqar"] = mqar_accuracy(model, ckpt.tokenizer, pairs_fit, samples, seed)
    if gaps:
        gaps_fit = [g for g in gaps if fits(mqar(seed, gap_pairs, gap=g).text)]
        result["gap_pairs"] = gap_pairs
        result["mqar_gap"] = mqar_distance(model, ckpt.tokenizer, gap_pairs, gaps_fit, samples, seed)
        result["skipped_gaps"] = [g for g in gaps if g not in gaps_fit]
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
            cells = [(lambda m: "-" if m is None else cell(m))(r.get(key, {}).get(c) or r.get(key, {}).get(str(c))) for c in columns]
            lines.append(f"| {r['step']} | " + " | ".join(cells) + " |")
        return lines + [""]

    lengths = sorted({int(L) for r in results for L in r["induction"]})
    pairs = sorted({int(P) for r in results for P in r["mqar"]})
    lines = table("induction: second-copy loss (gain over the first copy), nats per token; L words", "induction",
                  lengths, "L", lambda m: f"{m['second_loss']:.2f} ({m['gain']:+.2f})")
    lines += table("MQAR: recall accuracy (loss per value token), by pairs", "mqar", pairs, "P",
                   lambda m: f"{m['accuracy']:.0%} ({m['value_loss']:.2f})")
    gaps = sorted({int(G) for r in results for G in r.get("mqar_gap", {})})
    if gaps or any("mqar_gap" in r for r in results):
        tokens = {int(G): m["tokens"] for r in results for G, m in r.get("mqar_gap", {}).items()}
        lines += table(f"MQAR at a distance: P={results[0].get('gap_pairs')} pairs, G filler words before the "
                       "queries; recall accuracy (loss per value token). Tokens per sample: "
                       + ", ".join(f"G={G}: {tokens[G]:.0f}" for G in gaps), "mqar_gap", gaps, "G",
                       lambda m: f"{m['accuracy']:.0%} ({m['value_loss']:.2f})")
    skipped = sorted({f"L={L}" for r in results for L in r.get("skipped_lengths", [])}
                     | {f"P={P}" for r in results for P in r.get("skipped_pairs", [])}
                     | {f"G={G}" for r in results for G in r.get("skipped_gaps", [])})
    if skipped:
        lines.append(f"not run, longer than the model's context: {', '.join(skipped)}")
    return "\n".join(lines).rstrip() + "\n"

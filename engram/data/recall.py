"""In-context recall tasks small enough for a CPU-sized model: multi-query associative recall (MQAR) and
an induction sequence (a random word sequence, then the same sequence again).

Published work on induction heads finds that they form from batch x context and repeated-bigram
statistics more than from model size: a 2M-parameter model that never formed retrieval on RULER-style
haystacks (docs/LONG_CONTEXT.md) can still be given, and be tested on, the plainest form of the skill.

    MQAR       "recall: nozi=8341 bame=2209 tuvo=5120 ... ; bame=2209 nozi=8341 ...\n"
               pairs of a key (two syllables) and a value (4 digits), then some of the keys again in another
               order, each followed by its value: predicting a value after "key=" in the second part needs the
               first part (the values are random). With ``gap`` words of plain filler between the pairs and the
               " ;", the distance from a pair to its query grows while the number of pairs stays fixed.
    induction  "repeat: dako suli ... mepa | dako suli ... mepa\n"
               words drawn at random, then the same words again: from the "|" on, every word is a copy.

``recall_documents`` writes training documents (``DataConfig.recall_docs``, negative seeds); ``mqar`` and
``induction`` build the evaluation samples (seeds >= 0) that ``engram.longctx.recall`` scores.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from engram.data.retrieval import distinct_words

RECALL_FORMAT = 1  # bump when a template changes: prepared corpora with recall documents then miss
KINDS = ("mqar", "induction")
# the filler of a gap: plain English with nothing to remember, cycled word by word
FILLER = ("the weather was mild and nothing of note happened here today so the notes go on .").split()


@dataclass(frozen=True)
class RecallSample:
    """``prefix`` is read; each of ``targets`` is predicted after the text before it (``parts`` alternate
    given text and targets: given, target, given, target, ..., given)."""

    kind: str
    parts: tuple[str, ...]

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def targets(self) -> tuple[str, ...]:
        return self.parts[1::2]


def mqar(seed: int, pairs: int, queries: int | None = None, gap: int = 0) -> RecallSample:
    """``pairs`` key=value pairs, ``gap`` filler words, then ``queries`` (default all) of the keys in a shuffled
    order, each value a target. Keys are distinct two-syllable words, values distinct 4-digit numbers. The
    pairs, values and order depend on (seed, pairs, queries) only: the same sample at every gap."""
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    if gap < 0:
        raise ValueError(f"gap must be >= 0 words, got {gap}")
    queries = pairs if queries is None else queries
    if not 1 <= queries <= pairs:
        raise ValueError(f"queries must be in [1, {pairs}], got {queries}")
    rng = random.Random(f"mqar:{seed}:{pairs}:{queries}")
    keys = distinct_words(rng, pairs)
    values = [str(v) for v in rng.sample(range(1000, 10000), pairs)]
    filler = "".join(" " + FILLER[i % len(FILLER)] for i in range(gap))
    context = "recall: " + " ".join(f"{k}={v}" for k, v in zip(keys, values)) + filler + " ;"
    asked = rng.sample(range(pairs), queries)
    parts: list[str] = [context]
    for i in asked:
        parts[-1] += f" {keys[i]}="
        parts += [values[i], ""]
    parts[-1] += "\n"
    return RecallSample("mqar", tuple(parts))


def induction(seed: int, words: int) -> RecallSample:
    """``words`` random words, " |", then the same words: every word of the copy is a target."""
    if words < 1:
        raise ValueError(f"words must be >= 1, got {words}")
    rng = random.Random(f"induction:{seed}:{words}")
    sequence = [distinct_words(rng, 1)[0] for _ in range(words)]  # repeats allowed, as in random text
    parts: list[str] = ["repeat: " + " ".join(sequence) + " |"]
    for w in sequence:
        parts[-1] += " "
        parts += [w, ""]
    parts[-1] += "\n"
    return RecallSample("induction", tuple(parts))


def recall_documents(count: int, seed: int = 0, pairs: tuple[int, int] = (2, 24),
                     words: tuple[int, int] = (4, 48)) -> list[tuple[str, str]]:
    """``count`` training documents (name, text), MQAR and induction in turn, sizes drawn from the ranges.
    Their seeds are negative, so no document equals an evaluation sample (seeds >= 0)."""
    rng = random.Random(f"recall-documents:{seed}")
    out = []
    for i in range(count):
        kind = KINDS[i % len(KINDS)]
        doc_seed = -1 - (seed * 1_000_003 + i)
        if kind == "mqar":
            n = rng.randint(*pairs)
            sample = mqar(doc_seed, n, rng.randint(max(1, n // 2), n))
        else:
            sample = induction(doc_seed, rng.randint(*words))
        out.append((f"recall/{seed}/{i:06d}-{kind}", sample.text))
    return out

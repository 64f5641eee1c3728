"""RULER-style long-context tasks (Hsieh et al. 2024; the Engram paper's §5, Table 2), generated from a
seed at the text level, with haystacks cut from held-out text.

Every sample is ``context + query`` followed by the answer: the model continues the query, and the answer
is scored by exact match of what it writes up to the first "." or newline. The same generator writes the
synthetic retrieval documents a small model is pre-trained on (``retrieval_documents``), so the formats
seen in training and in evaluation are the same; evaluation haystacks and seeds are disjoint from them
(held-out documents, another seed stream).

Tasks (``TASKS``): needle in a haystack with one needle (``niah_single``), with distractor keys
(``niah_multikey``), one key with several values (``niah_multivalue``), several keys asked at once
(``niah_multiquery``); variable tracking through chains of assignments (``vt``); the three most common
words of a list (``cwe``) and the three most frequent words of a Zipf-distributed list (``fwe``).
Keys and words are made of consonant-vowel syllables, values are 5-digit numbers.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass, field

RETRIEVAL_FORMAT = 1  # bump when a template or the generator changes: prepared corpora with them then miss
TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
N_NEEDLES = 4  # distractors / values / chain length of the multi-needle tasks
N_QUERIES = 2  # keys asked by niah_multiquery
TOP_WORDS = 3  # words asked by cwe and fwe


@dataclass(frozen=True)
class Sample:
    """One task instance: the model reads ``context + query`` and should continue with ``answer``."""

    task: str
    context: str
    query: str
    answer: str  # with its leading space, without the final "."
    needles: tuple[str, ...] = field(default=())  # the inserted statements (niah, vt), for checks

    @property
    def prompt(self) -> str:
        return self.context + self.query

    @property
    def document(self) -> str:
        """The sample as a training document: prompt, answer and the closing full stop."""
        return self.prompt + self.answer + ".\n"


def word(rng: random.Random, syllables: int = 2) -> str:
    return "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))


def distinct_words(rng: random.Random, n: int, syllables: int = 2) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = word(rng, syllables)
        if w not in out:
            out.append(w)
    return out


def number(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def _weave(lines: list[str], needles: list[str], where: list[float]) -> str:
    """Insert each needle (a full line) before the filler line at fraction ``where[i]`` of the lines, in order."""
    slots = sorted(zip([min(int(w * (len(lines) + 1)), len(lines)) for w in where], range(len(needles))))
    out, at = [], 0
    for slot, i in slots:
        out.extend(lines[at:slot])
        out.append(needles[i])
        at = slot
    out.extend(lines[at:])
    return "".join(line + "\n" for line in out)


def make_sample(task: str, seed: int, filler: list[str], size: int) -> Sample:
    """Task ``task``'s sample number ``seed``, ``size`` units long: filler lines (the niah and vt tasks,
    taken in order from ``filler``) or list words (cwe, fwe). The same seed gives the same keys, values
    and relative needle positions at every size, so a length search can grow ``size`` alone."""
    if task not in TASKS:
        raise ValueError(f"unknown long-context task {task!r}; known: {', '.join(TASKS)}")
    rng = random.Random(f"{task}:{seed}")
    if task in ("cwe", "fwe"):
        return _word_task(task, rng, size)
    lines = filler[:size]
    if task == "vt":
        names = [w.upper() for w in distinct_words(rng, N_NEEDLES, 2)]
        value = number(rng)
        needles = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = {names[i - 1]}." for i in range(1, N_NEEDLES)]
        where = sorted(rng.random() for _ in needles)  # a chain reads in order
        return Sample(task, _weave(lines, needles, where), f"The variables equal to {value} are",
                      " " + ", ".join(names), tuple(needles))
    keys = distinct_words(rng, N_NEEDLES, 3)
    values = [number(rng) for _ in range(N_NEEDLES)]
    if task == "niah_single":
        keys, values = keys[:1], values[:1]
    if task == "niah_multivalue":
        keys = [keys[0]] * N_NEEDLES
    needles = [f"The magic number for {k} is {v}." for k, v in zip(keys, values)]
    where = [rng.random() for _ in needles]
    if task == "niah_multivalue":  # the values are asked in the order they appear
        where.sort()
        return Sample(task, _weave(lines, needles, where), f"The magic numbers for {keys[0]} are",
                      " " + ", ".join(values), tuple(needles))
    if task == "niah_multiquery":
        asked = rng.sample(range(N_NEEDLES), N_QUERIES)
        return Sample(task, _weave(lines, needles, where),
                      "The magic numbers for " + " and ".join(keys[i] for i in asked) + " are",
                      " " + ", ".join(values[i] for i in asked), tuple(needles))
    asked = rng.randrange(len(keys))
    return Sample(task, _weave(lines, needles, where), f"The magic number for {keys[asked]} is",
                  " " + values[asked], tuple(needles))


def _word_task(task: str, rng: random.Random, size: int) -> Sample:
    """A list of ``size`` words whose three most frequent ones have distinct counts (so the answer, most
    frequent first, is unique)."""
    vocabulary = distinct_words(rng, 60, 2)
    size = max(size, 12)
    if task == "cwe":  # three common words at about 12%, 9% and 6% of the list, every other word rarer
        common, rest = vocabulary[:TOP_WORDS], vocabulary[TOP_WORDS:]
        third = max(2, int(size * 0.06))
        second = max(third + 1, int(size * 0.09))
        counts = [max(second + 1, int(size * 0.12)), second, third]
        words = [w for w, c in zip(common, counts) for _ in range(c)]
        used = Counter()
        while len(words) < size:
            w = rng.choice(rest)
            if used[w] < third - 1:
                used[w] += 1
                words.append(w)
    else:  # fwe: Zipf(1) over the vocabulary; redraw until the top three counts differ
        weights = [1.0 / (i + 1) for i in range(len(vocabulary))]
        while True:
            words = rng.choices(vocabulary, weights, k=size)
            counts = sorted(Counter(words).values(), reverse=True)[: TOP_WORDS + 1]
            if len(set(counts)) == len(counts):
                break
    rng.shuffle(words)
    ranked = [w for w, _ in Counter(words).most_common(TOP_WORDS)]
    return Sample(task, "Words: " + " ".join(words) + ".\n", f"The {TOP_WORDS} most frequent words are",
                  " " + ", ".join(ranked))


def extract(generated: str) -> str:
    """What a continuation answers: the text up to its first "." or newline, stripped."""
    return re.split(r"[.\n]", generated, maxsplit=1)[0].strip()


def score(sample: Sample, generated: str) -> tuple[bool, float]:
    """(exact match, share of the answer's comma-separated parts that the continuation names)."""
    got = extract(generated)
    want = sample.answer.strip()
    parts = [p.strip() for p in want.split(",")]
    named = {p.strip() for p in got.split(",")}
    return got == want, sum(p in named for p in parts) / len(parts)


def text_lines(texts: list[str]) -> list[str]:
    """The non-empty lines of ``texts``, in order: what filler is cut from."""
    lines = [line for text in texts for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError("no text to cut haystacks from")
    return lines


def filler_lines(texts: list[str], rng: random.Random, n: int, lines: list[str] | None = None) -> list[str]:
    """``n`` non-empty lines of ``texts`` (or of ``lines``, their ``text_lines`` computed once) from a
    random start, in order (cycling), as haystack filler."""
    lines = text_lines(texts) if lines is None else lines
    start = rng.randrange(len(lines))
    return [lines[(start + i) % len(lines)] for i in range(n)]


def retrieval_documents(texts: list[str], count: int, seed: int = 0, tasks: tuple[str, ...] = TASKS,
                        lines: tuple[int, int] = (4, 24)) -> list[tuple[str, str]]:
    """``count`` synthetic training documents (name, text): samples of every task in turn, with
    ``lines`` (a range) filler lines from ``texts`` (the training corpus) or as many list words. Their
    seeds are negative, so they never equal an evaluation sample (seeds >= 0)."""
    rng = random.Random(f"retrieval-documents:{seed}")
    all_lines = text_lines(texts)
    out = []
    for i in range(count):
        task = tasks[i % len(tasks)]
        size = rng.randint(*lines)
        sample = make_sample(task, -1 - (seed * 1_000_003 + i), filler_lines(texts, rng, size, all_lines),
                             size * 4 if task in ("cwe", "fwe") else size)
        out.append((f"retrieval/{seed}/{i:06d}-{task}", sample.document))
    return out

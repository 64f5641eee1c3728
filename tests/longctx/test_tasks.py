"""Long-context task generators and scoring: deterministic for a seed, needles present and
unique, answers extractable from the prompt; a perfect copier scores 100% and a random one near zero."""

import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.data.retrieval import TASKS, extract, filler_lines, make_sample, retrieval_documents, score
from engram.longctx.evaluate import fit, run_tasks

TEXTS = ["import os\nimport sys\n\ndef main(argv):\n    return 0\n", "class Point:\n    x = 1\n    y = 2\n" * 5,
         "# a comment line\nvalue = compute(1, 2, 3)\n" * 7]


def oracle(prompt: str, task: str) -> str:
    """Answer by reading the prompt, as a model that retrieves perfectly would."""
    query = prompt.rstrip().splitlines()[-1]
    if task.startswith("niah"):
        keys = re.findall(r"for ([a-z]+(?: and [a-z]+)*) (?:is|are)$", query)[0].split(" and ")
        found = re.findall(r"The magic number for ([a-z]+) is (\d+)\.", prompt)
        if task == "niah_multivalue":
            return " " + ", ".join(v for k, v in found if k == keys[0])
        table = dict(found)
        return " " + ", ".join(table[k] for k in keys)
    if task == "vt":
        value = re.findall(r"equal to (\d+) are$", query)[0]
        found = re.findall(r"VAR ([A-Z]+) = ([A-Z]+|\d+)\.", prompt)
        names, changed = {k for k, v in found if v == value}, True
        while changed:
            more = {k for k, v in found if v in names} - names
            changed, names = bool(more), names | more
        order = [k for k, _ in found if k in names]
        return " " + ", ".join(order)
    words = re.findall(r"Words: (.*)\.\n", prompt)[0].split()
    counts = {w: words.count(w) for w in set(words)}
    return " " + ", ".join(sorted(counts, key=lambda w: -counts[w])[:3])


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(TASKS), st.integers(0, 10_000), st.integers(0, 40))
def test_samples_are_deterministic_with_unique_needles_and_extractable_answers(task, seed, size):
    filler = filler_lines(TEXTS, random.Random(seed), 40)
    a, b = make_sample(task, seed, filler, size), make_sample(task, seed, filler, size)
    assert a == b
    for needle in a.needles:
        assert a.context.count(needle) == 1  # present, once
    if task in ("niah_single", "niah_multikey", "niah_multiquery"):
        keys = re.findall(r"The magic number for ([a-z]+) is", a.context)
        assert len(keys) == len(set(keys))  # distinct keys: one right answer
    assert oracle(a.prompt, task) == a.answer
    assert score(a, a.answer + ". More text") == (True, 1.0)
    if size >= 2 and task not in ("cwe", "fwe"):  # the keys do not depend on the haystack size
        smaller = make_sample(task, seed, filler, size - 1)
        assert smaller.answer == a.answer and smaller.needles == a.needles


def test_scoring_reads_up_to_the_first_full_stop_or_newline():
    sample = make_sample("niah_multivalue", 1, filler_lines(TEXTS, random.Random(0), 5), 5)
    parts = sample.answer.strip().split(", ")
    assert extract(" 1, 2.\nmore") == "1, 2"
    assert score(sample, " " + ", ".join(parts[:2]) + ".") == (False, 0.5)
    assert score(sample, "\n" + sample.answer) == (False, 0.0)


class ToyTokenizer:
    """Characters as tokens: exact lengths, lossless."""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("length", [300, 900])
def test_fit_fills_the_length(length):
    tok = ToyTokenizer()
    for task in TASKS:
        sample, ids = fit(task, 3, TEXTS, length, tok.encode, bos=1)
        total = len(ids) + len(tok.encode(sample.answer + "."))
        assert total <= length and total > length - 80, (task, total)  # the largest haystack that fits
        assert ids[0] == 1 and tok.decode(ids[1:]) == sample.prompt


def _run(answer_fn):
    tok = ToyTokenizer()

    def generate(prompts, max_new):
        return [tok.encode(answer_fn(tok.decode(p[1:]))) for p in prompts]

    return run_tasks(generate, tok.encode, tok.decode, 1, TEXTS, [300, 600], list(TASKS), samples=6, batch_size=4)


def test_a_perfect_copier_scores_everything_and_a_random_one_nothing():
    result = _run(lambda prompt: oracle(prompt, _task_of(prompt)) + ". trailing")
    assert all(cell["exact"] == 1.0 and cell["n"] == 6 for row in result["accuracy"].values() for cell in row.values())
    rng = random.Random(0)
    result = _run(lambda prompt: " " + ", ".join(str(rng.randint(10000, 99999)) for _ in range(2)) + ".")
    assert all(cell["exact"] == 0.0 for row in result["accuracy"].values() for cell in row.values())
    assert result["examples"] and {"task", "length", "answer", "generated"} <= set(result["examples"][0])


def _task_of(prompt: str) -> str:
    query = prompt.rstrip().splitlines()[-1]
    if query.startswith("The variables"):
        return "vt"
    if query.startswith("The 3 most"):
        return "cwe"  # oracle() reads words the same way for cwe and fwe
    if " and " in query:
        return "niah_multiquery"
    if query.startswith("The magic numbers"):
        return "niah_multivalue"
    return "niah_single"  # single and multikey are answered alike


def test_training_documents_use_the_formats_and_never_an_evaluation_seed():
    docs = retrieval_documents(TEXTS, 14, seed=0)
    assert len({name for name, _ in docs}) == 14 and all(name.startswith("retrieval/0/") for name, _ in docs)
    assert {name.rsplit("-", 1)[1] for name, _ in docs} == set(TASKS)
    for name, text in docs:  # each is a sample followed by its answer: the oracle reads it back
        task = name.rsplit("-", 1)[1]
        body, last = text.rstrip("\n").rsplit("\n", 1)
        query, answer = re.match(r"^(.*? (?:is|are))( .*)\.$", last).groups()
        assert oracle(body + "\n" + query, task) == answer
    assert retrieval_documents(TEXTS, 14, seed=0) == docs and retrieval_documents(TEXTS, 14, seed=1) != docs
    # an evaluation sample (seeds >= 0) never appears among them, whatever its haystack
    texts = {text for _, text in docs}
    for task in TASKS:
        for seed in range(50):
            sample = make_sample(task, seed, filler_lines(TEXTS, random.Random(seed), 40), 8)
            assert not any(sample.query + sample.answer in text and all(n in text for n in sample.needles)
                           for text in texts if sample.needles) or task in ("cwe", "fwe")


def test_retrieval_documents_join_the_corpus_and_its_cache_key(corpus_dir, cache_dir):
    from engram.config import DataConfig
    from engram.data.corpus import load_documents
    from engram.data.prepare import cache_key
    from engram.longctx.evaluate import held_out_texts

    plain = DataConfig(source=str(corpus_dir), vocab_size=300, val_fraction=0.2, cache_dir=str(cache_dir))
    mixed = DataConfig(source=str(corpus_dir), vocab_size=300, val_fraction=0.2, cache_dir=str(cache_dir),
                       retrieval_docs=40)
    docs = load_documents(mixed)
    synthetic = [d for split in docs.values() for d in split if d.name.startswith("retrieval/")]
    assert len(synthetic) == 40 and cache_key(plain) != cache_key(mixed)
    real_val = {d.text for d in load_documents(plain)["val"]}
    for doc in synthetic:  # filler comes from the training split only: no held-out line is ever trained on
        lines = set(doc.text.splitlines())
        assert not any(line in lines for text in real_val for line in text.splitlines()
                       if line.strip() and not any(line in t for t in (d.text for d in docs["train"]
                                                                         if not d.name.startswith("retrieval/"))))
    assert set(held_out_texts(mixed)) == real_val  # haystacks: real held-out documents only

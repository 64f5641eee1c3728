"""In-context recall at CPU scale: the MQAR and induction generators, the recall documents mixed into a
corpus, and the two probes, checked against models whose answers are known (a copier, an oracle, a uniform
guesser)."""

import json
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.data.recall import induction, mqar, recall_documents
from engram.longctx.recall import induction_probe, markdown, mqar_accuracy, mqar_distance

FIXTURE = Path(__file__).parents[1] / "fixtures" / "v0_1" / "sharded_run"


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), pairs=st.integers(1, 40), data=st.data())
def test_mqar_asks_keys_of_the_context_and_answers_with_their_values(seed, pairs, data):
    queries = data.draw(st.integers(1, pairs))
    sample = mqar(seed, pairs, queries)
    assert sample == mqar(seed, pairs, queries) and sample.text == "".join(sample.parts)  # a pure function
    context, rest = sample.parts[0].split(" ;", 1)
    table = dict(pair.split("=") for pair in context.removeprefix("recall: ").split(" "))
    assert len(table) == pairs and len(set(table.values())) == pairs
    asked = [part.strip().rstrip("=") for part in (rest, *sample.parts[2::2][:-1])]
    assert len(sample.targets) == queries and len(set(asked)) == queries
    assert [table[k] for k in asked] == list(sample.targets)  # each target is its key's value
    assert sample.text.endswith("\n")


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), pairs=st.integers(1, 30), gap=st.integers(1, 400))
def test_a_gap_moves_the_queries_away_and_changes_nothing_else(seed, pairs, gap):
    near, far = mqar(seed, pairs), mqar(seed, pairs, gap=gap)
    assert far.targets == near.targets and far.parts[1:] == near.parts[1:]  # same pairs, queries, order
    pairs_text, rest = near.parts[0].split(" ;", 1)
    assert far.parts[0].startswith(pairs_text) and far.parts[0].endswith(" ;" + rest)
    filler = far.parts[0][len(pairs_text):-len(" ;" + rest)].split()
    assert len(filler) == gap and "=" not in "".join(filler)  # nothing in it looks like a pair


def test_mqar_refuses_a_negative_gap():
    with pytest.raises(ValueError, match="gap must be >= 0"):
        mqar(0, 4, gap=-1)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), words=st.integers(1, 60))
def test_induction_repeats_its_words(seed, words):
    sample = induction(seed, words)
    first = sample.parts[0].removeprefix("repeat: ").removesuffix(" | ").split(" ")
    assert first == list(sample.targets) and len(first) == words


def test_recall_documents_alternate_kinds_and_never_equal_an_evaluation_sample():
    docs = recall_documents(40, seed=3)
    assert [name.rsplit("-", 1)[1] for name, _ in docs] == ["mqar", "induction"] * 20
    assert docs == recall_documents(40, seed=3) and docs != recall_documents(40, seed=4)
    evaluation = {mqar(s, p).text for s in range(50) for p in range(2, 25)} | {induction(s, w).text
                                                                               for s in range(50) for w in range(4, 49)}
    assert not evaluation & {text for _, text in docs}


def test_recall_documents_join_the_corpus_and_old_corpora_keep_their_keys(tmp_path):
    from engram.data.config import DataConfig
    from engram.data.corpus import load_documents
    from engram.data.prepare import cache_key

    (tmp_path / "a.py").write_text("x = 1\n" * 20)
    (tmp_path / "b.py").write_text("y = 2\n" * 20)
    plain = DataConfig(source=str(tmp_path), val_fraction=0.5)
    mixed = DataConfig(source=str(tmp_path), val_fraction=0.5, recall_docs=30)
    names = [d.name for split in load_documents(mixed).values() for d in split]
    assert sum(n.startswith("recall/") for n in names) == 30
    assert cache_key(plain) != cache_key(mixed)
    assert cache_key(plain) == cache_key(DataConfig(source=str(tmp_path), val_fraction=0.5, recall_docs=0))


@dataclass
class Out:
    logits: torch.Tensor


class Uniform(torch.nn.Module):
    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return Out(torch.zeros(*ids.shape, self.vocab))


class Oracle(torch.nn.Module):
    """Teacher forcing lets it read the next token: it is right wherever it is allowed to be (``after``: only
    past the first occurrence of that token id, i.e. an ideal copier of the second copy)."""

    def __init__(self, vocab: int, after: int | None = None):
        super().__init__()
        self.vocab, self.after = vocab, after

    def forward(self, ids):
        logits = torch.zeros(*ids.shape, self.vocab)
        start = 0 if self.after is None else int((ids[0] == self.after).nonzero()[0])
        logits[0, torch.arange(start, ids.shape[1] - 1), ids[0, start + 1:]] = 50.0
        return Out(logits)


@pytest.fixture(scope="module")
def tokenizer():
    from engram.train import open_checkpoint

    return open_checkpoint(FIXTURE, check_hashes=False).tokenizer


def test_the_induction_probe_tells_a_copier_from_a_guesser(tokenizer):
    V = tokenizer.get_vocab_size()
    bar = tokenizer.encode(" |", add_special_tokens=False).ids[-1]  # where the copy starts
    copier = induction_probe(Oracle(V, after=bar), tokenizer, [6, 12], samples=4)
    guesser = induction_probe(Uniform(V), tokenizer, [6, 12], samples=4)
    for L in (6, 12):
        assert copier[L]["second_loss"] < 1e-6 and copier[L]["second_accuracy"] == 1.0
        assert math.isclose(copier[L]["first_loss"], math.log(V), rel_tol=1e-6)  # nothing to copy yet
        assert math.isclose(copier[L]["gain"], math.log(V), rel_tol=1e-6)
        assert math.isclose(guesser[L]["second_loss"], math.log(V), rel_tol=1e-6) and abs(guesser[L]["gain"]) < 1e-6
        assert guesser[L]["second_accuracy"] == 0.0
    assert induction_probe(Oracle(V, after=bar), tokenizer, [6], samples=4)[6] == copier[6]  # same seed, same


def test_mqar_accuracy_of_an_oracle_and_of_a_guesser(tokenizer):
    V = tokenizer.get_vocab_size()
    right = mqar_accuracy(Oracle(V), tokenizer, [2, 6], samples=4)
    wrong = mqar_accuracy(Uniform(V), tokenizer, [2, 6], samples=4)
    assert right[2]["accuracy"] == right[6]["accuracy"] == 1.0 and right[6]["value_loss"] < 1e-6
    assert wrong[2]["accuracy"] == 0.0 and math.isclose(wrong[6]["value_loss"], math.log(V), rel_tol=1e-6)
    assert right[6]["tokens"] > right[2]["tokens"]  # more pairs, longer samples


def test_mqar_at_a_distance_scores_the_same_task_over_more_tokens(tokenizer):
    V = tokenizer.get_vocab_size()
    right = mqar_distance(Oracle(V), tokenizer, 3, [0, 20, 60], samples=3)
    wrong = mqar_distance(Uniform(V), tokenizer, 3, [0, 60], samples=3)
    assert [right[g]["accuracy"] for g in (0, 20, 60)] == [1.0] * 3 and wrong[60]["accuracy"] == 0.0
    assert right[0]["tokens"] < right[20]["tokens"] < right[60]["tokens"]
    assert right[0] == mqar_accuracy(Oracle(V), tokenizer, [3], samples=3)[3]  # no gap: plain MQAR


def test_eval_recall_on_a_checkpoint_writes_its_tables(tmp_path, capsys):
    from engram.cli import main

    assert main(["eval", "recall", "--ckpt", str(FIXTURE), "--lengths", "1", "2", "40", "--pairs", "1", "30",
                 "--samples", "3", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    stored = json.loads((tmp_path / "recall.json").read_text())
    assert len(stored) == 1 and set(stored[0]["induction"]) == {"1", "2"} and stored[0]["skipped_lengths"] == [40]
    assert set(stored[0]["mqar"]) == {"1"} and stored[0]["skipped_pairs"] == [30]
    assert (tmp_path / "recall.md").read_text() == printed
    assert "L=40" in printed.splitlines()[-1] and "P=30" in printed.splitlines()[-1]  # too long for the context
    assert main(["eval", "recall", "--ckpt", str(FIXTURE), "--seq-len", "16"]) == 2
    assert "do not apply to `engram eval recall`" in capsys.readouterr().err
    assert main(["eval", "--ckpt", str(FIXTURE), "--pairs", "2"]) == 2
    assert main(["eval", "--ckpt", str(FIXTURE), "--gaps", "2"]) == 2
    assert main(["eval", "recall", "--ckpt", str(FIXTURE), "--gap-pairs", "2"]) == 2
    assert "give --gaps too" in capsys.readouterr().err


def test_eval_recall_at_a_distance_names_the_gaps_that_do_not_fit(tmp_path, capsys):
    from engram.cli import main

    assert main(["eval", "recall", "--ckpt", str(FIXTURE), "--lengths", "1", "--pairs", "1", "--gaps", "0",
                 "500", "--gap-pairs", "1", "--samples", "2", "--out", str(tmp_path)]) == 0
    stored = json.loads((tmp_path / "recall.json").read_text())[0]
    assert stored["gap_pairs"] == 1 and set(stored["mqar_gap"]) == {"0"} and stored["skipped_gaps"] == [500]
    printed = capsys.readouterr().out
    assert "MQAR at a distance: P=1" in printed and "G=500" in printed.splitlines()[-1]


def test_the_markdown_has_a_row_per_checkpoint():
    results = [{"step": s, "context": 64, "induction": {8: {"second_loss": 1.0 / s, "gain": s}},
                "mqar": {2: {"accuracy": 0.5, "value_loss": 2.0}}} for s in (10, 20)]
    text = markdown(results)
    assert "| 10 | 0.10 (+10.00) |" in text and "| 20 | 50% (2.00) |" in text

"""Knock-out probes: static-pattern mining, in-context identifiers, position scoring, the report."""

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engram.analysis.knockout import (identifier_spans, in_context_probes, knockout_report, mine_static_patterns,
                                      score_positions, static_probes, word_counts)
from engram.model.transformer import EngramLM
from engram.presets import get_preset

# a made-up vocabulary: the text of each token id (ids 0-2 are special)
WORDS = ["", "", "", " os", ".", "path", "join", "(", ")", "\n", "def", " foo", "_bar", " =", " x", " is",
         "instance", ",", ":", " y", " Widget", "Maker", " class", " return", " foo_bar", " __", "init", "__(",
         ".__", "doc", "__", "_", "to", "00", "b"]
PIECES = WORDS + [f" w{i}" for i in range(len(WORDS), 512)]
ID = {w: i for i, w in enumerate(WORDS)}


def encode(*words):
    return [ID[w] for w in words]


OS_JOIN = encode(" os", ".", "path", ".", "join", "(", " x", ")", "\n")
ISINSTANCE = encode(" is", "instance", "(", " x", ",", " y", ")", "\n")


def corpus(docs):
    """Documents (lists of ids) -> (ids, doc_starts), each document led by the BOS (id 1)."""
    ids, starts = [], []
    for d in docs:
        starts.append(len(ids))
        ids += [1] + d
    return np.array(ids, dtype=np.int64), np.array(starts, dtype=np.int64)


TRAIN = corpus([OS_JOIN * 3 + ISINSTANCE * 2 for _ in range(6)])


def test_mining_finds_frequent_identifier_like_ngrams():
    patterns = mine_static_patterns(*TRAIN, PIECES, top=50, min_count=5)
    texts = {p.text: p.count for p in patterns}
    assert texts["os.path.join"] == 18 and texts["os.path"] == 18 and texts["path.join("] == 18
    assert texts["isinstance(" ] == 12
    assert not any(t.startswith(".") or "\n" in t or ")" in t for t in texts)  # not identifier-like
    counts = [p.count for p in patterns]
    assert counts == sorted(counts, reverse=True)
    assert mine_static_patterns(*TRAIN, PIECES, top=2, min_count=5)[0].count == 18


def test_mining_ignores_ngrams_that_cross_documents():
    # " os" ends every document and "." "path" starts the next: never a pattern
    ids, starts = corpus([encode(".", "path", " os") for _ in range(20)])
    assert not [p for p in mine_static_patterns(ids, starts, PIECES, min_count=2) if p.text.startswith("os")]


def test_static_probes_target_the_last_token_and_prefer_the_longest_pattern():
    patterns = mine_static_patterns(*TRAIN, PIECES, top=50, min_count=5)
    val_ids, val_starts = corpus([encode(" y", " =") + OS_JOIN + ISINSTANCE])
    probes = static_probes(val_ids, val_starts, patterns)
    join = 1 + 2 + 4  # bos, " y", " =", then " os" . path . "join"
    by_target = {p.targets[0]: p.text for p in probes}
    assert by_target[join] == "os.path.join"  # not "path.join"
    assert by_target[join + 1] == "path.join("
    assert val_ids[join] == ID["join"]
    assert "isinstance(" in by_target.values()
    assert all(len(p.targets) == 1 for p in probes)


def test_identifier_spans_join_word_pieces():
    ids = np.array(encode("def", " foo", "_bar", "(", " x", ")", " Widget", "Maker", "."))
    assert identifier_spans(ids, PIECES) == [(0, 1, "def"), (1, 3, "foo_bar"), (4, 5, "x"), (6, 8, "WidgetMaker")]


def test_identifier_spans_leave_out_parts_of_names():
    # "def __init__(": the run " __" "init" is glued to "__("; ".__doc__": "doc" "__" is glued to ".__"
    ids = np.array(encode("def", " __", "init", "__(", " x", ".__", "doc", "__", " y"))
    assert identifier_spans(ids, PIECES) == [(0, 1, "def"), (4, 5, "x"), (8, 9, "y")]


def test_mining_skips_fragments_and_digits():
    ids, starts = corpus([encode("_", "to", "_", "\n", " x", "00", "b", "\n", " is", "instance", "(") for _ in range(8)])
    assert [p.text for p in mine_static_patterns(ids, starts, PIECES, min_count=2)] == ["isinstance("]


def test_in_context_probes_are_later_uses_of_rare_definitions_in_the_same_document():
    doc = encode("def", " foo", "_bar", "(", ")", ":", "\n", " y", " =", " foo", "_bar", "(", ")", "\n",
                 " return", " foo", "_bar", " foo_bar")
    other = encode(" return", " foo", "_bar")  # another document: the definition is not visible there
    ids, starts = corpus([doc, other])
    probes = in_context_probes(ids, starts, PIECES, Counter())
    assert [(p.text, p.targets) for p in probes] == [("foo_bar", [11]), ("foo_bar", [17])]
    assert all(ids[p.targets[0]] == ID["_bar"] for p in probes)  # the continuation token at the later use
    # "y = ..." is a definition too, but one token long at its uses: no continuation to predict
    assert in_context_probes(ids, starts, PIECES, Counter({"foo_bar": 3})) == []  # frequent in train
    assert len(in_context_probes(ids, starts, PIECES, Counter(), max_uses=1)) == 1
    assert word_counts(ids, PIECES)["foo_bar"] == 5


def test_class_and_assignment_definitions():
    doc = encode(" class", " Widget", "Maker", ":", "\n", " x", " =", " Widget", "Maker", "(", ")")
    ids, starts = corpus([doc])
    assert [(p.text, p.targets) for p in in_context_probes(ids, starts, PIECES, Counter())] == [("WidgetMaker", [9])]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return EngramLM(get_preset("tiny-engram")).eval()


def test_scores_of_a_short_split_equal_one_forward(model):
    ids, starts = corpus([list(range(3, 40)), list(range(100, 130))])
    scores = score_positions(model, ids, starts, seq_len=128)
    boundary = torch.zeros(1, len(ids), dtype=torch.bool)
    boundary[0, starts] = True
    with torch.no_grad():
        logp = F.log_softmax(model(torch.from_numpy(ids)[None], boundary=boundary).logits[0], dim=-1)
    expected = logp[:-1].gather(1, torch.from_numpy(ids[1:])[:, None])[:, 0]
    np.testing.assert_allclose(scores.logprob[1:], expected.numpy(), atol=1e-5)
    np.testing.assert_array_equal(scores.correct[1:], (logp[:-1].argmax(1) == torch.from_numpy(ids[1:])).numpy())
    assert not scores.scored[0] and scores.scored[1:].all()


def test_long_splits_score_every_position_once_with_half_a_window_of_context(model):
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 512, 203)
    starts = np.array([0, 90])
    scores = score_positions(model, ids, starts, seq_len=32, batch_size=3, gates=True)
    assert scores.scored[1:].all() and not np.isnan(scores.logprob[1:]).any()
    assert not np.isnan(scores.alpha[1][1:]).any()
    # position 100 is scored in the window starting at 80 (stride 16, >= 16 tokens of context)
    x = torch.from_numpy(ids[80:112])[None]
    boundary = torch.zeros_like(x, dtype=torch.bool)
    boundary[0, 10] = True  # the document start at 90
    with torch.no_grad():
        logp = F.log_softmax(model(x, boundary=boundary).logits[0], dim=-1)
    assert scores.logprob[100] == pytest.approx(float(logp[19, ids[100]]), abs=1e-5)
    needed = np.zeros(len(ids), dtype=bool)
    needed[150] = True
    sparse = score_positions(model, ids, starts, seq_len=32, needed=needed)
    assert sparse.scored[150] and sparse.scored.sum() == 16
    assert sparse.logprob[150] == pytest.approx(scores.logprob[150], abs=1e-5)


def _val():
    doc = encode("def", " foo", "_bar", "(", ")", ":", "\n") + OS_JOIN + encode(" y", " =", " foo", "_bar") + ISINSTANCE
    return corpus([doc, OS_JOIN + encode(" return", " foo", "_bar")])


def test_knockout_report_of_a_model_without_engram_output_retains_everything(model):
    with torch.no_grad():
        for layer in model.engram_layers.values():
            layer.value_proj.weight.zero_()
    report = knockout_report(model, PIECES, TRAIN, _val(), seq_len=16, min_count=5)
    for name in ("static", "in_context", "all"):
        r = report[name]
        assert r["targets"] > 0
        assert r["acc_with"] == r["acc_without"] and r["logprob_with"] == r["logprob_without"]
        assert r["retention"] in (1.0, None)  # None when nothing was right to begin with
    # os.path, os.path.join, path.join( in both OS_JOIN lines, isinstance( once
    assert report["static"]["probes"] == 7 and report["in_context"]["probes"] == 1
    assert set(report["static"]["alpha"]) == {"2"}


def test_knockout_report_samples_probes_and_needs_an_engram_model():
    torch.manual_seed(1)
    model = EngramLM(get_preset("tiny-engram")).eval()
    report = knockout_report(model, PIECES, TRAIN, _val(), max_probes=1, seq_len=16, min_count=5)
    assert report["static"]["probes"] == 1 and report["static"]["targets"] == 1
    with pytest.raises(ValueError, match="no Engram layer"):
        knockout_report(EngramLM(get_preset("tiny-moe")), PIECES, TRAIN, _val())


def test_retention_interval_brackets_the_ratio():
    from engram.analysis.knockout import retention_interval

    w = np.array([1.0] * 80 + [0.0] * 20)
    lo, hi = retention_interval(w, w * np.array([1.0, 0.0] * 50))  # half of the hits survive
    assert lo < 0.5 < hi and hi - lo < 0.4
    assert retention_interval(w, w) == [1.0, 1.0]

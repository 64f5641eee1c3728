"""Gate maps: one alpha per token, layer and branch; HTML with one escaped span per token; PNG; top n-grams."""

import html
import re

import numpy as np
import pytest
import torch

from engram.analysis.gates import gate_map, gate_map_html, plot_gate_map, top_ngrams
from engram.data.bpe import train_bpe
from engram.model.transformer import EngramLM
from engram.presets import get_preset

TEXT = "def alpha(x):\n    if x < 3 and y > 'q':\n        return \"<b>\" & x\n"


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([TEXT * 3, "import os.path\nos.path.join(a, b)\n" * 5], 300)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return EngramLM(get_preset("tiny-engram")).eval()  # Engram at block 2, G = 2 branches


def test_gate_map_has_one_value_per_token_layer_and_branch(model, tokenizer):
    gm = gate_map(model, tokenizer, TEXT)
    T = len(tokenizer.encode(TEXT).ids) + 1  # + <|bos|>
    assert len(gm.ids) == len(gm.pieces) == len(gm.starts) == T
    assert gm.ids[0] == tokenizer.token_to_id("<|bos|>") and gm.starts == [True] + [False] * (T - 1)
    assert "".join(gm.pieces[1:]) == TEXT  # the pieces are the text, token by token
    assert list(gm.gates) == [1] and gm.gates[1].shape == (T, 2)
    assert np.all((gm.gates[1] > 0) & (gm.gates[1] < 1))
    assert [label for label, _ in gm.rows()] == ["block 2 branch 0", "block 2 branch 1"]


def test_gate_map_matches_a_batched_forward(model, tokenizer):
    # the gates of a text do not depend on what else is in the batch (row 0 of a batch of two)
    from engram.analysis.hooks import capture_gates

    gm = gate_map(model, tokenizer, TEXT)
    x = torch.tensor([gm.ids, gm.ids[::-1]])
    boundary = torch.zeros_like(x, dtype=torch.bool)
    boundary[0, 0] = True
    with torch.no_grad(), capture_gates(model) as gates:
        model(x, boundary=boundary)
    np.testing.assert_allclose(gates[1][0][0].numpy(), gm.gates[1], atol=1e-6)


def test_html_has_one_escaped_span_per_token(model, tokenizer):
    gm = gate_map(model, tokenizer, TEXT)
    page = gate_map_html(gm, "map <of> gates", top_ngrams(gm, 5))
    spans = re.findall(r"<span class='tok[^']*' style='[^']*' title='[^']*'>(.*?)</span>", page, re.S)
    assert len(spans) == len(gm.ids) * 2  # one paragraph per layer and branch
    assert spans[1:len(gm.ids)] == [p.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                                    .replace('"', "&quot;").replace("'", "&#x27;") for p in gm.pieces[1:]]
    assert "<b>" not in page and "&lt;b&gt;" in page and "map &lt;of&gt; gates" in page
    assert "x < 3" not in page
    # the map shows exactly the text: nothing between the spans (the div keeps white space)
    maps = re.findall(r"<div class='map'>(.*?)</div>", page, re.S)
    assert len(maps) == 2
    assert html.unescape(re.sub(r"<[^>]+>", "", maps[0])) == "<|bos|>" + TEXT


def test_top_ngrams_are_sorted_distinct_and_end_at_their_token(model, tokenizer):
    gm = gate_map(model, tokenizer, TEXT)
    top = top_ngrams(gm, k=8)
    assert len(top) == 8
    alphas = [row["alpha"] for row in top]
    assert alphas == sorted(alphas, reverse=True)
    assert len({row["ngram"] for row in top}) == 8
    for row in top:
        assert row["position"] > 0 and row["ngram"].endswith(row["token"])
        # the hash reads the BOS as a predecessor (it belongs to the document), so the n-gram may show it
        assert row["ngram"] == "".join(gm.pieces[max(0, row["position"] - 2): row["position"] + 1])


def test_png_is_written(model, tokenizer, tmp_path):
    gm = gate_map(model, tokenizer, TEXT * 4)
    path = plot_gate_map(gm, tmp_path / "gates.png", per_line=40, max_tokens=100)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gate_map_refuses_models_without_engram_and_long_texts(model, tokenizer):
    with pytest.raises(ValueError, match="no Engram layer"):
        gate_map(EngramLM(get_preset("tiny-moe")), tokenizer, TEXT)
    with pytest.raises(ValueError, match="reads at most 256"):
        gate_map(model, tokenizer, TEXT * 40)
    assert len(gate_map(model, tokenizer, TEXT * 40, max_tokens=100).ids) == 100


def test_gate_map_starts_with_a_foreign_tokenizers_bos(model):
    """The BOS is found by its role (``special_ids``), as ``prepare_data`` found it: Llama spells it <s>."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    foreign = Tokenizer(WordLevel({"[UNK]": 0, "<s>": 1, "a": 2, "b": 3}, unk_token="[UNK]"))
    foreign.pre_tokenizer = Whitespace()
    gm = gate_map(model, foreign, "a b a")
    assert gm.ids == [1, 2, 3, 2] and gm.pieces[0] == "<s>"

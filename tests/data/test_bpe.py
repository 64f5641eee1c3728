import pytest
from tokenizers import Tokenizer, models

from engram.data.bpe import (BOS_ID, EOS_ID, PAD_ID, load_tokenizer, special_ids, tokenizer_sha256,
                             train_bpe)

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 5,
    "Ünïcödé: naïve café, 日本語のテキスト, emoji 🙂🚀, math ∑∫√.",
    "class Foo:\n    def __init__(self):\n        self.x = [i ** 2 for i in range(10)]\n",
] * 3


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(TEXTS, 350)


def test_special_ids_are_fixed(tokenizer):
    assert (PAD_ID, BOS_ID, EOS_ID) == (0, 1, 2)
    assert special_ids(tokenizer) == (0, 1, 2)
    assert [tokenizer.id_to_token(i) for i in range(3)] == ["<|pad|>", "<|bos|>", "<|eos|>"]
    assert tokenizer.get_vocab_size() <= 350


@pytest.mark.parametrize("text", ["héllo wörld", "  leading spaces\n\ttabs", "日本語 🙂", "x", "never seen: ß Ω ж"])
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text).ids
    assert min(ids) >= 3  # plain text never produces a special token
    assert tokenizer.decode(ids) == text


def test_training_is_deterministic(tokenizer):
    assert train_bpe(iter(TEXTS), 350).to_str() == tokenizer.to_str()


def test_vocab_too_small():
    with pytest.raises(ValueError, match="259"):
        train_bpe(TEXTS, 200)


def test_load_tokenizer_file_and_directory(tokenizer, tmp_path):
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    for path in (tmp_path, tmp_path / "tokenizer.json"):
        assert tokenizer_sha256(load_tokenizer(path)) == tokenizer_sha256(tokenizer)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "missing")


def test_special_ids_of_a_foreign_tokenizer():
    vocab = {"<unk>": 0, "</s>": 1, "<s>": 2, "a": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    assert special_ids(tok) == (None, 2, 1)


def test_special_ids_of_deepseek(deepseek_dir):
    assert special_ids(load_tokenizer(deepseek_dir)) == (2, 0, 1)  # pad, bos, eos

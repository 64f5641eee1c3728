import json
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, pre_tokenizers

from engram.data.corpus import Document
from engram.data.shards import TokenShards, dtype_for, write_split

BOS = 1


def word_tokenizer(n_words: int = 100) -> Tokenizer:
    """Word i (written "w{i}") is id i: documents with exactly known ids."""
    vocab = {"<|pad|>": 0, "<|bos|>": 1, "<|eos|>": 2, **{f"w{i}": i for i in range(3, n_words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


TOKENIZER = word_tokenizer()


def make_docs(lengths: list[int], seed: int = 0) -> tuple[list[Document], list[list[int]]]:
    rng = np.random.default_rng(seed)
    ids = [rng.integers(3, 100, size=n).tolist() for n in lengths]
    return [Document(f"d{i}", " ".join(f"w{t}" for t in doc)) for i, doc in enumerate(ids)], ids


def write(tmp, lengths, shard_tokens=1000, bos_id=BOS, split="train"):
    docs, ids = make_docs(lengths)
    write_split(docs, TOKENIZER, tmp, split, bos_id=bos_id, shard_tokens=shard_tokens, progress=False)
    return TokenShards(tmp, split), docs, ids


def check_layout(shards: TokenShards, ids: list[list[int]], shard_tokens: int, bos_id=BOS) -> None:
    expected = [([bos_id] if bos_id is not None else []) + doc for doc in ids]
    got = []
    for s in range(shards.n_shards):
        n = len(shards.tokens[s])
        tokens, boundary = shards.window(s, 0, n)
        starts = np.flatnonzero(boundary)
        assert starts.tolist() == shards.doc_starts[s].tolist() and (n == 0 or boundary[0])
        assert n <= shard_tokens or len(starts) == 1  # only a lone oversized document overflows
        for a, b in zip(starts, list(starts[1:]) + [n]):  # each shard holds whole documents, in order
            got.append(tokens[a:b].tolist())
    assert got == expected
    assert shards.n_docs == len(ids) and shards.n_tokens == sum(map(len, expected))


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(0, 30), min_size=1, max_size=20), shard_tokens=st.integers(1, 80))
def test_documents_round_trip_with_boundaries(lengths, shard_tokens):
    with tempfile.TemporaryDirectory() as tmp:
        shards, _, ids = write(tmp, lengths, shard_tokens)
        check_layout(shards, ids, shard_tokens)


def test_without_bos_empty_documents_are_dropped(tmp_path):
    shards, _, ids = write(tmp_path, [3, 0, 5], bos_id=None)
    check_layout(shards, [d for d in ids if d], 1000, bos_id=None)


def test_tiny_shards_never_split_a_document(tmp_path):
    shards, _, ids = write(tmp_path, [5, 5, 5, 20, 2], shard_tokens=13)
    assert [len(t) for t in shards.tokens] == [12, 6, 21, 3]  # 6+6 | 6 | 21 alone | 3
    check_layout(shards, ids, 13)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"train_{k:03d}{ext}" for k in range(4) for ext in (".bin", ".docs.npy")] + ["train.json"])


def test_manifest(tmp_path):
    docs = [Document("a", "w5 w6"), Document("b", "w7")]
    manifest = write_split(docs, TOKENIZER, tmp_path, "val", bos_id=BOS, progress=False)
    assert manifest == json.loads((tmp_path / "val.json").read_text())
    shards = TokenShards(tmp_path, "val")
    assert (shards.n_tokens, shards.n_docs, shards.n_bytes) == (5, 2, len("w5 w6") + len("w7"))
    assert shards.bytes_per_token == pytest.approx(7 / 5)
    assert manifest["vocab_size"] == 100 and manifest["dtype"] == "uint16" and len(manifest["tokenizer_sha256"]) == 64
    utf8 = [Document("c", "w5 é")]  # n_bytes counts UTF-8 bytes, not characters
    assert write_split(utf8, TOKENIZER, tmp_path, "x", bos_id=BOS, progress=False)["n_bytes"] == 5


def test_dtype_follows_vocab_size(tmp_path):
    assert dtype_for(65536) == np.uint16 and dtype_for(65537) == np.uint32
    big = word_tokenizer(70_000)
    write_split([Document("a", "w5 w69999 w65536")], big, tmp_path, "train", bos_id=BOS, progress=False)
    shards = TokenShards(tmp_path, "train")
    assert shards.dtype == np.uint32 and shards.window(0, 0, 4)[0].tolist() == [1, 5, 69999, 65536]


@pytest.fixture
def corpus(tmp_path):
    shards, _, _ = write(tmp_path, [40, 3, 70, 25, 9, 60, 33], shard_tokens=100)
    return shards


def test_batch_is_a_pure_function_of_seed_and_step(corpus):
    ids, boundary = corpus.batch(step=7, batch_size=6, seq_len=16, seed=3)
    assert ids.shape == boundary.shape == (6, 16) and ids.dtype == torch.int64 and boundary.dtype == torch.bool
    torch.manual_seed(123)
    np.random.seed(123)  # global RNG state must not matter
    again = corpus.batch(step=7, batch_size=6, seq_len=16, seed=3)
    assert torch.equal(ids, again[0]) and torch.equal(boundary, again[1])
    assert not torch.equal(ids, corpus.batch(step=8, batch_size=6, seq_len=16, seed=3)[0])
    assert not torch.equal(ids, corpus.batch(step=7, batch_size=6, seq_len=16, seed=4)[0])


def test_batch_rows_are_windows_inside_one_shard(corpus):
    seen = set()
    for step in range(50):
        windows = corpus.sample_windows(step, 4, 16, seed=0)
        ids, boundary = corpus.batch(step, 4, 16, seed=0)
        for row, (shard, start) in enumerate(windows):
            assert 0 <= start and start + 16 <= len(corpus.tokens[shard])
            w_ids, w_boundary = corpus.window(shard, start, 16)
            assert ids[row].tolist() == w_ids.tolist() and boundary[row].tolist() == w_boundary.tolist()
            seen.add(shard)
    assert seen == set(range(corpus.n_shards))


def test_batch_refuses_a_corpus_shorter_than_seq_len(tmp_path):
    shards, _, _ = write(tmp_path, [10, 10])
    with pytest.raises(ValueError, match="corpus too small for seq_len=64"):
        shards.batch(0, 2, 64, seed=0)
    assert shards.batch(0, 2, 22, seed=0)[0].shape == (2, 22)  # exactly one valid start


def test_eval_batches_are_fixed_and_disjoint(corpus):
    first = list(corpus.eval_batches(batch_size=2, seq_len=16, max_batches=3))
    second = list(corpus.eval_batches(batch_size=2, seq_len=16, max_batches=3))
    assert len(first) == 3 and all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    rows = torch.cat([ids for ids, _ in first])  # (6, 16): consecutive windows of shard 0, then shard 1
    s0 = len(corpus.tokens[0]) // 16
    expected = [corpus.window(0, 16 * i, 16)[0] for i in range(s0)] + [corpus.window(1, 16 * i, 16)[0]
                                                                        for i in range(6 - s0)]
    assert rows.tolist() == [e.tolist() for e in expected]
    everything = list(corpus.eval_batches(batch_size=4, seq_len=16, max_batches=1000))
    assert sum(len(ids) for ids, _ in everything) == sum(len(t) // 16 for t in corpus.tokens)


def test_eval_batches_small_split_gives_one_short_batch(tmp_path):
    shards, _, _ = write(tmp_path, [20])
    batches = list(shards.eval_batches(batch_size=8, seq_len=10, max_batches=4))
    assert len(batches) == 1 and batches[0][0].shape == (2, 10)
    assert list(shards.eval_batches(batch_size=8, seq_len=22, max_batches=4)) == []


def test_truncated_or_missing_shard_is_named(tmp_path):
    write(tmp_path, [50, 50], shard_tokens=60)
    path = tmp_path / "train_001.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"train_001.bin is 100 bytes, expected 102"):
        TokenShards(tmp_path, "train")
    path.unlink()
    with pytest.raises(ValueError, match=r"train_001.bin is missing"):
        TokenShards(tmp_path, "train")
    with pytest.raises(FileNotFoundError, match="val.json"):
        TokenShards(tmp_path, "val")


def test_window_out_of_range(corpus):
    with pytest.raises(ValueError, match="outside shard 0"):
        corpus.window(0, 90, 20)

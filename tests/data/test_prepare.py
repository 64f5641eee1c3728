import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

import engram.data.prepare as prepare_module
from engram.config import DataConfig
from engram.data.corpus import split_of
from engram.data.prepare import PREPARED, cache_key, prepare_data
from engram.tokenizer import CompressedTokenizer

WORDS = "alpha Beta gamma DELTA epsilon zeta eta Theta iota kappa lambda café naïve 日本".split()


@pytest.fixture
def corpus(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(60):
        words = rng.choice(WORDS, size=int(rng.integers(20, 60)))
        (root / f"doc{i:02d}.txt").write_text(" ".join(words) + "\n", encoding="utf-8")
    return root


def config(corpus, tmp_path, **kw):
    return DataConfig(source=str(corpus), vocab_size=300, val_fraction=0.2, cache_dir=str(tmp_path / "cache"), **kw)


def test_prepare_then_cached(corpus, tmp_path, monkeypatch):
    cfg = config(corpus, tmp_path)
    data = prepare_data(cfg)
    assert data.directory.name == cache_key(cfg) and (data.directory / PREPARED).is_file()
    assert (data.pad_id, data.bos_id, data.eos_id) == (0, 1, 2)
    assert data.vocab_size == data.tokenizer.get_vocab_size(with_added_tokens=True) <= 300
    assert data.compressed == CompressedTokenizer.from_pretrained(str(data.directory / "tokenizer.json"))
    assert data.compressed.vocab_size < data.vocab_size  # "Beta"/"beta"-style pieces merge
    for split, shards in (("train", data.train), ("val", data.val)):
        files = [p for p in sorted(corpus.iterdir()) if split_of(p.name, 0.2) == split]
        assert shards.n_docs == len(files) > 0
        assert shards.n_bytes == sum(len(p.read_bytes()) for p in files)
    first_ids, _ = data.train.window(0, 0, 20)
    assert first_ids[0] == 1  # every document starts with <|bos|>
    described = data.describe()
    assert described["train"]["tokens"] == data.train.n_tokens and json.dumps(described)

    def boom(*args, **kwargs):
        raise AssertionError("the cached call must not read or train anything")

    monkeypatch.setattr(prepare_module, "train_bpe", boom)
    monkeypatch.setattr(prepare_module, "load_documents", boom)
    again = prepare_data(cfg)
    assert again.directory == data.directory and again.compressed == data.compressed
    assert again.tokenizer.to_str() == data.tokenizer.to_str() and again.train.n_tokens == data.train.n_tokens


def test_interrupted_preparation_is_rebuilt(corpus, tmp_path, capsys):
    cfg = config(corpus, tmp_path)
    directory = prepare_data(cfg).directory
    (directory / PREPARED).unlink()
    (directory / "train_000.bin").write_bytes(b"half")
    capsys.readouterr()
    data = prepare_data(cfg)
    logged = capsys.readouterr()
    assert "removing incomplete preparation" in logged.err and "training BPE" in logged.err and not logged.out
    assert (directory / PREPARED).is_file() and data.train.n_tokens > 2


def test_cache_key_tracks_what_changes_the_shards(corpus, tmp_path):
    cfg = config(corpus, tmp_path)
    key = cache_key(cfg)
    assert key == cache_key(config(corpus, tmp_path)) and len(key) == 16
    assert key != cache_key(config(corpus, tmp_path, text_field="body"))
    assert cache_key(DataConfig(source=str(corpus), vocab_size=400, val_fraction=0.2)) != key
    assert cache_key(DataConfig(source=str(corpus), vocab_size=300, val_fraction=0.3)) != key
    (corpus / "doc00.txt").write_text("edited and longer than before")
    assert cache_key(cfg) != key
    with pytest.raises(FileNotFoundError, match="missing"):
        cache_key(DataConfig(source=str(tmp_path / "missing")))


def test_foreign_tokenizer_without_pad(corpus, tmp_path):
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    data = prepare_data(config(corpus, tmp_path, tokenizer=str(tmp_path)))
    assert (data.pad_id, data.bos_id, data.eos_id) == (1, None, 1)
    meta = json.loads((data.directory / PREPARED).read_text())
    assert "no pad token" in meta["pad_note"]
    assert data.train.window(0, 0, 3)[0].tolist()[0] != 1  # no bos prefix
    assert data.train.n_docs + data.val.n_docs == 60


def test_two_processes_preparing_one_new_config_both_succeed(corpus, tmp_path):
    """While one process prepares a key (here: this test, holding its lock over a half-built directory),
    others wait instead of deleting its work; then exactly one of them builds and all succeed (the
    second one used to delete the first one's directory mid-build and die on a missing file)."""
    import subprocess
    import sys
    import time

    from engram.fileio import FileLock

    cfg = config(corpus, tmp_path)
    directory = tmp_path / "cache" / cache_key(cfg)
    directory.mkdir(parents=True)
    (directory / "train_000.bin").write_bytes(b"in progress")
    lock = FileLock(directory.with_name(directory.name + ".lock")).acquire()
    script = ("import json, sys; from engram.config import DataConfig; from engram.data import prepare_data; "
              "d = prepare_data(DataConfig(**json.loads(sys.argv[1]))); print(d.directory, d.val.n_tokens)")
    logs = [tmp_path / f"err{i}.txt" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", script, json.dumps(cfg.to_dict())], stdout=subprocess.PIPE,
                              stderr=log.open("w"), text=True) for log in logs]
    deadline = time.time() + 120
    while not all("waiting for host" in log.read_text() for log in logs):
        assert all(p.poll() is None for p in procs) and time.time() < deadline
        time.sleep(0.1)
    assert (directory / "train_000.bin").read_bytes() == b"in progress"  # the holder's work is untouched
    lock.release()
    outs = [p.communicate(timeout=300)[0] for p in procs]
    errs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert len(set(outs)) == 1 and outs[0].startswith(str(directory))
    assert sum("training BPE" in err for err in errs) == 1  # one built, the other opened its result


def test_prepare_with_tokenizer_never_retrains(corpus, tmp_path):
    from engram.data import prepare_with_tokenizer

    first = prepare_data(config(corpus, tmp_path))
    tokenizer_file = tmp_path / "tok.json"
    first.tokenizer.save(str(tokenizer_file))
    assert prepare_with_tokenizer(config(corpus, tmp_path), first.tokenizer, tokenizer_file).directory == first.directory
    (corpus / "new.txt").write_text("zzz qqq " * 500)  # the corpus changes: a BPE trained now would differ
    again = prepare_with_tokenizer(config(corpus, tmp_path), first.tokenizer, tokenizer_file)
    assert again.directory != first.directory
    assert again.tokenizer.to_str() == first.tokenizer.to_str()

import numpy as np
import pytest
import torch

from engram.tokenizer import CompressedTokenizer, compress_vocabulary


def _check_golden(tok: CompressedTokenizer, golden: dict) -> None:
    assert tok.raw_vocab_size == golden["len_tokenizer"] == 129280
    assert tok.vocab_size == golden["compressed_vocab_size"] == 99092
    assert tok.sha256 == golden["lookup_table_sha256"]
    assert tok.lookup[:64].tolist() == golden["lookup_first_64"]
    for raw, comp in golden["lookup_selected"].items():
        assert int(tok.lookup[int(raw)]) == comp


def test_deepseek_directory_matches_golden(deepseek_compressed, golden):
    _check_golden(deepseek_compressed, golden)


def test_tokenizer_json_path_and_object(deepseek_dir, golden):
    from tokenizers import Tokenizer

    _check_golden(CompressedTokenizer.from_pretrained(f"{deepseek_dir}/tokenizer.json"), golden)
    _check_golden(CompressedTokenizer.from_pretrained(Tokenizer.from_file(f"{deepseek_dir}/tokenizer.json")), golden)


def test_transformers_object_matches_golden(deepseek_dir, golden):
    """The golden file was made with transformers' decode; that path must agree too."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(deepseek_dir)
    _check_golden(CompressedTokenizer.from_pretrained(tok), golden)


def test_case_accent_and_space_variants_share_an_id(deepseek_dir, deepseek_compressed):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(f"{deepseek_dir}/tokenizer.json")
    ids = [raw.token_to_id(t) for t in ["Apple", "apple", "ĠApple", "Ġapple", "APPLE"]]
    ids = [i for i in ids if i is not None]
    assert len(ids) >= 3
    assert len({int(deepseek_compressed.lookup[i]) for i in ids}) == 1


def test_normaliser_rules_on_synthetic_vocab():
    texts = ["A", "a", " a", "\ta\n", "É", "e", " ", "\n\n", "\t", "x\ufffd", "y\ufffd", "", "ﬁ", "fi"]
    raw = [f"raw{i}" for i in range(len(texts))]
    lookup, size = compress_vocabulary(texts, lambda i: raw[i])
    ids = lookup.tolist()
    assert ids[0] == ids[1] == ids[2] == ids[3]  # case and surrounding whitespace
    assert ids[4] == ids[5]  # NFD + accent stripping + lowercase: É -> e
    assert ids[6] == ids[7] == ids[8]  # whitespace-only tokens collapse to one space, not to ""
    assert ids[9] != ids[10]  # U+FFFD texts are keyed by their raw token, so stay apart
    assert ids[11] not in (ids[6],)  # an empty text keeps "" as its own key
    assert ids[12] == ids[13]  # NFKC folds the ligature
    assert size == len(set(ids)) and max(ids) == size - 1


def test_accents_are_stripped():
    lookup, _ = compress_vocabulary(["café", "cafe", "CAFÉ", "naïve", "naive"], lambda i: "")
    assert lookup[0] == lookup[1] == lookup[2]
    assert lookup[3] == lookup[4]


def test_first_seen_order():
    lookup, size = compress_vocabulary(["b", "a", "B", "c", "A"], lambda i: "")
    assert lookup.tolist() == [0, 1, 0, 2, 1] and size == 3


def test_call_maps_on_device_and_rejects_bad_ids():
    tok = CompressedTokenizer(np.array([0, 0, 1, 2, 1]), 3)
    assert tok(torch.tensor([[4, 3, 0]])).tolist() == [[1, 2, 0]]
    with pytest.raises(ValueError, match="token id 5 "):
        tok(torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="token id -1 "):
        tok(torch.tensor([-1, 2]))
    with pytest.raises(ValueError, match="integer"):
        tok(torch.tensor([0.5]))
    assert tok(torch.zeros(0, dtype=torch.long)).numel() == 0


def test_save_load_round_trip(tmp_path, deepseek_compressed):
    deepseek_compressed.save(tmp_path)
    again = CompressedTokenizer.load(tmp_path)
    assert again == deepseek_compressed and again.sha256 == deepseek_compressed.sha256


def test_load_refuses_missing_truncated_and_altered(tmp_path):
    tok = CompressedTokenizer(np.array([0, 1, 1, 2]), 3)
    with pytest.raises(FileNotFoundError):
        CompressedTokenizer.load(tmp_path)
    path = tok.save(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable"):
        CompressedTokenizer.load(tmp_path)
    # flip one lookup entry in place: the stored sha256 no longer matches
    blob = bytearray(data)
    blob[-8] ^= 1
    path.write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="corrupted|lookup values"):
        CompressedTokenizer.load(tmp_path)


def test_bad_construction():
    with pytest.raises(ValueError):
        CompressedTokenizer(np.array([0, 3]), 2)
    with pytest.raises(ValueError):
        CompressedTokenizer(np.array([], dtype=np.int64))
    with pytest.raises(TypeError):
        CompressedTokenizer.from_pretrained(42)
    with pytest.raises(FileNotFoundError):
        CompressedTokenizer.from_pretrained("/nonexistent/dir")


def test_identity():
    tok = CompressedTokenizer.identity(10)
    assert tok.vocab_size == 10 and tok(torch.arange(10)).tolist() == list(range(10))


def test_a_malformed_tokenizer_json_is_a_one_line_error(tmp_path, capsys):
    from engram.cli import main
    from engram.tokenizer import read_tokenizer_file

    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": ')  # cut off mid-file
    with pytest.raises(ValueError, match="tokenizer.json is not a readable tokenizer.json"):
        read_tokenizer_file(bad)
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        CompressedTokenizer.from_pretrained(tmp_path)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.py").write_text("x = 1\n" * 50)
    assert main(["data", "prepare", "--set", f"data.tokenizer={bad}", "--set", f"data.source={tmp_path / 'corpus'}",
                 "--set", f"data.cache_dir={tmp_path / 'cache'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "not a readable tokenizer.json" in err[-1] and "Traceback" not in "\n".join(err)

import json
import sys

import pytest

from engram.config import DataConfig
from engram.data.corpus import (MAX_PARAGRAPH_CHARS, Document, hf_documents, load_documents, split_of, stdlib_documents,
                                text_documents)


def test_split_of_is_pinned():
    """Fixed values (sha256, so every process and machine agrees; hash() would not): a change here
    silently moves documents between train and val."""
    assert [split_of(n, 0.5) for n in ["os.py", "json/decoder.py", "a", "b", "p"]] == [
        "train", "val", "train", "val", "val"]
    assert split_of("p", 0.09) == "val" and split_of("p", 0.08) == "train"  # u("p") = 0.0803


@pytest.mark.parametrize("fraction", [0.02, 0.1, 0.5])
def test_split_of_matches_fraction(fraction):
    n = 20_000
    val = sum(split_of(f"doc/{i}.txt", fraction) == "val" for i in range(n))
    assert abs(val / n - fraction) < 4 * (fraction * (1 - fraction) / n) ** 0.5 + 1e-3


def test_split_of_rejects_bad_fraction():
    with pytest.raises(ValueError, match="val_fraction"):
        split_of("a", 1.0)


def test_text_documents_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.md").write_text("# bee")
    (tmp_path / "sub" / "a.py").write_text("x = 1\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / ".hidden").mkdir()
    (tmp_path / ".hidden" / "c.txt").write_text("secret")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")  # Latin-1 byte: replaced, not fatal
    docs = text_documents(tmp_path)
    assert [d.name for d in docs] == ["b.md", "bad.txt", "sub/a.py"]
    assert docs[0] == Document("b.md", "# bee") and docs[1].text == "caf\ufffd"


def test_text_documents_single_file_any_suffix(tmp_path):
    path = tmp_path / "notes.log"
    path.write_text("hello")
    assert [d.text for d in text_documents(path)] == ["hello"]
    assert text_documents(path)[0].name.startswith("notes.log#")


def test_a_single_file_is_cut_into_paragraph_documents(tmp_path):
    text = "para one\nline two\n\n  \t\n\npara two\n\n" + "".join(f"long line {i}\n" for i in range(3000))
    path = tmp_path / "book.txt"
    path.write_text(text)
    docs = text_documents(path)
    assert [d.text for d in docs[:2]] == ["para one\nline two\n", "para two\n"]
    assert all(len(d.text) <= MAX_PARAGRAPH_CHARS for d in docs) and len(docs) > 3
    assert "".join(d.text for d in docs[2:]) == "".join(f"long line {i}\n" for i in range(3000))  # cut at line ends
    # names follow the text: editing one paragraph renames only that one
    path.write_text(text.replace("para one", "para 1"))
    assert {d.name for d in text_documents(path)} ^ {d.name for d in docs} == {docs[0].name, text_documents(path)[0].name}


def test_a_single_file_corpus_gets_both_splits(tmp_path):
    path = tmp_path / "plays.txt"
    path.write_text("\n\n".join(f"SCENE {i}. A speech of some length, number {i}." for i in range(200)))
    splits = load_documents(DataConfig(source=str(path), val_fraction=0.1, cache_dir=str(tmp_path)))
    assert 5 < len(splits["val"]) < 40 and len(splits["train"]) + len(splits["val"]) == 200


def test_a_directory_without_readable_files_lists_the_extensions(tmp_path):
    (tmp_path / "a.csv").write_text("x")
    (tmp_path / "b.html").write_text("y")
    with pytest.raises(ValueError, match=r"no file ending in \.txt, \.md, \.rst, \.py, \.json, \.jsonl .*found: "
                                         r"\.csv, \.html"):
        text_documents(tmp_path)


def test_text_documents_jsonl(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"body": "first"}, {"body": ""}, {"body": "third", "id": 3}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert text_documents(path, text_field="body") == [Document("d.jsonl:1", "first"), Document("d.jsonl:3", "third")]
    with pytest.raises(ValueError, match=r"d.jsonl:1 has no field 'text'"):
        text_documents(path)


def test_missing_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        text_documents(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_documents(DataConfig(source=str(tmp_path / "nowhere")))


def test_hf_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match="pip install datasets"):
        hf_documents("hf:wikitext:wikitext-2-raw-v1")
    with pytest.raises(ValueError, match="hf:NAME"):
        hf_documents("hf:")


def test_load_documents_splits_and_refuses_an_empty_split(tmp_path):
    for i in range(40):
        (tmp_path / f"{i}.txt").write_text(f"document {i}")
    splits = load_documents(DataConfig(source=str(tmp_path), val_fraction=0.25))
    assert {d.name for d in splits["val"]} == {f"{i}.txt" for i in range(40) if split_of(f"{i}.txt", 0.25) == "val"}
    assert len(splits["train"]) + len(splits["val"]) == 40 and splits["val"]
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.txt").write_text("alone")
    with pytest.raises(ValueError, match="none in the 'val' split"):
        load_documents(DataConfig(source=str(one)))


def test_stdlib_documents():
    docs = stdlib_documents()
    names = [d.name for d in docs]
    assert len(docs) > 300 and "os.py" in names and "json/decoder.py" in names
    assert names == sorted(names) and all(d.text for d in docs)
    parts = {p for n in names for p in n.split("/")[:-1]}
    assert not parts & {"test", "tests", "idle_test", "site-packages", "__pycache__"}

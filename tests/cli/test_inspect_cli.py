"""`engram inspect ...`: every tool runs end to end on a tiny checkpoint; errors are one line, exit code 2."""

import json

import pytest

from support import write_corpus
from engram.cli import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    corpus = write_corpus(root / "corpus")
    flags = ["--set", f"data.source={corpus}", "--set", "data.vocab_size=300", "--set", "data.val_fraction=0.2",
             "--set", f"data.cache_dir={root / 'cache'}", "--set", "train.max_steps=2", "--set", "train.batch_size=2",
             "--set", "train.seq_len=32", "--set", "train.eval_batches=1", "--set", "train.warmup_steps=1",
             "--no-progress"]
    out = {}
    for preset in ("tiny-engram", "tiny-moe"):
        out[preset] = root / preset
        assert main(["train", "--preset", preset, *flags, "--out", str(out[preset])]) == 0
    return out


WINDOWS = ["--batches", "1", "--batch-size", "2", "--seq-len", "32"]


def run(argv, capsys):
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_gates(runs, tmp_path, capsys):
    text = tmp_path / "text.py"
    text.write_text("def alpha_1(x):\n    return x < 2\n")
    result = run(["inspect", "gates", "--ckpt", str(runs["tiny-engram"]), "--file", str(text), "--out",
                  str(tmp_path / "out"), "--top", "3"], capsys)
    assert len(result["top_ngrams"]) == 3 and set(result["mean_alpha"]) == {"block 2 branch 0", "block 2 branch 1"}
    page = (tmp_path / "out" / "gates.html").read_text()
    assert page.count("<span class='tok") == 2 * result["tokens"] and "&lt;" in page and "x < 2" not in page
    assert (tmp_path / "out" / "gates.png").stat().st_size > 1000


def test_knockout(runs, tmp_path, capsys):
    result = run(["inspect", "knockout", "--ckpt", str(runs["tiny-engram"]), "--seq-len", "32", "--max-probes", "50",
                  "--out", str(tmp_path)], capsys)
    assert {"static", "in_context", "all", "top_patterns"} <= set(result)
    assert result["all"]["targets"] > 0 and result["all"]["acc_with"] >= 0
    assert json.loads((tmp_path / "knockout.json").read_text())["step"] == 2


def test_logit_lens(runs, tmp_path, capsys):
    result = run(["inspect", "logit-lens", "--ckpt", str(runs["tiny-engram"]), "--ckpt", str(runs["tiny-moe"]),
                  "--out", str(tmp_path), *WINDOWS], capsys)
    kls = [m["kl"] for m in result["models"].values()]
    assert len(kls) == 2 and all(len(k) == 4 and abs(k[-1]) < 1e-6 for k in kls)
    assert (tmp_path / "logit_lens.png").is_file()


def test_cka(runs, tmp_path, capsys):
    result = run(["inspect", "cka", "--base", str(runs["tiny-moe"]), "--engram", str(runs["tiny-engram"]),
                  "--out", str(tmp_path), "--minibatch", "31", *WINDOWS], capsys)
    assert len(result["cka"]) == 4 and len(result["cka"][0]) == 4 and len(result["alignment_index"]) == 4
    assert (tmp_path / "cka.png").is_file()
    same = run(["inspect", "cka", "--base", str(runs["tiny-engram"]), "--engram", str(runs["tiny-engram"]),
                "--out", str(tmp_path), "--minibatch", "31", *WINDOWS], capsys)
    assert all(abs(same["cka"][i][i] - 1) < 1e-3 for i in range(4))


def test_tables(runs, tmp_path, capsys):
    result = run(["inspect", "tables", "--ckpt", str(runs["tiny-engram"]), "--out", str(tmp_path), *WINDOWS], capsys)
    assert result["tokens"] == 64 and set(result["layers"]["2"]) == {"2", "3"}
    assert set(result["losses"]) == {"trained", "capacity_1", "shuffled", "knockout"}
    assert (tmp_path / "row_usage.png").is_file() and (tmp_path / "tables.json").is_file()


@pytest.mark.parametrize("argv,message", [
    (["gates", "--ckpt", "RUN:tiny-engram", "--out", "OUT"], "give exactly one of --text and --file"),
    (["gates", "--ckpt", "RUN:tiny-moe", "--text", "x", "--out", "OUT"], "no Engram layer"),
    (["knockout", "--ckpt", "/nonexistent/run"], "no checkpoint at /nonexistent/run"),
    (["tables", "--ckpt", "RUN:tiny-moe", "--out", "OUT"], "no Engram layer"),
    (["tables", "--ckpt", "RUN:tiny-engram", "--out", "OUT", "--batches", "0"], "argument --batches: expected an integer >= 1"),
])
def test_errors_are_one_line_with_exit_code_2(runs, tmp_path, capsys, argv, message):
    argv = [str(runs[a[4:]]) if a.startswith("RUN:") else str(tmp_path) if a == "OUT" else a for a in argv]
    capsys.readouterr()
    assert main(["inspect", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_help(capsys):
    for sub in ("gates", "knockout", "logit-lens", "cka", "tables"):
        with pytest.raises(SystemExit) as exit_:
            main(["inspect", sub, "--help"])
        assert exit_.value.code == 0 and "usage: engram inspect" in capsys.readouterr().out

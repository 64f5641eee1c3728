"""CLI smoke tests: every subcommand runs end to end on a tiny corpus, and errors are one clear line."""

import json
import subprocess
import sys

import pytest

from engram.cli import main


@pytest.fixture(scope="module")
def flags(corpus_dir, cache_dir):
    return ["--set", f"data.source={corpus_dir}", "--set", "data.vocab_size=300", "--set", "data.val_fraction=0.2",
            "--set", f"data.cache_dir={cache_dir}"]


@pytest.fixture(scope="module")
def trained(flags, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    steps = ["--set", "train.max_steps=3", "--set", "train.batch_size=2", "--set", "train.seq_len=32",
             "--set", "train.eval_batches=1", "--set", "train.warmup_steps=1"]
    assert main(["train", "--preset", "tiny-engram", *flags, *steps, "--out", str(out), "--no-progress"]) == 0
    return out


def test_train_prints_a_summary(trained, capsys):
    assert (trained / "checkpoints" / "latest").is_file()
    assert (trained / "metrics.jsonl").read_text().count('"kind": "eval"') == 1


def test_eval(trained, capsys):
    capsys.readouterr()
    assert main(["eval", "--ckpt", str(trained), "--batches", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 3 and result["val_loss"] > 0 and result["val_bpb"] > 0


def test_sample_streams_text(trained, capsys):
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(trained), "--prompt", "def alpha", "--max-new-tokens", "6",
                 "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("def alpha") and len(out) > len("def alpha\n")


def test_data_prepare(flags, capsys):
    assert main(["data", "prepare", "--preset", "tiny-dense", *flags]) == 0
    described = json.loads(capsys.readouterr().out)
    assert described["vocab_size"] == 300


def test_presets_lists_counts(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "demo-engram" in out and "tiny-moe" in out and "2,164,096" in out


@pytest.mark.parametrize("argv,message", [
    (["train", "--preset", "tiny-engram", "--set", "train.nope=1"], "unknown field 'nope'"),
    (["train", "--preset", "tiny-engram", "--set", "train.lr=-1"], "TrainConfig.lr: must be > 0"),
    (["train", "--preset", "no-such"], "unknown preset 'no-such'"),
    (["train", "--preset", "tiny-dense", "--set", "model.engram.seed=1"], "model.engram is null"),
    (["eval", "--ckpt", "/nonexistent/run"], "no checkpoint at /nonexistent/run"),
])
def test_errors_are_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_help_for_every_subcommand(capsys):
    done = subprocess.run([sys.executable, "-m", "engram.cli", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "usage: engram" in done.stdout  # the real entry point
    for sub in (["train"], ["eval"], ["sample"], ["generate"], ["export-tables"], ["export-hf"], ["data", "prepare"],
                ["demo"], ["presets"], ["bench", "offload"], ["lm-eval"]):
        try:  # argparse exits after --help; the passthrough commands return its code
            code = main([*sub, "--help"])
        except SystemExit as exit_:
            code = exit_.code
        assert code == 0
        out = capsys.readouterr().out
        assert ("usage: lm-eval" if sub == ["lm-eval"] else "usage: engram") in out


def test_every_flag_has_help():
    import argparse

    from engram.cli import build_parser

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, path + [name])
            elif not isinstance(action, argparse._HelpAction):
                yield path, action

    actions = list(walk(build_parser(), []))
    assert len(actions) > 20
    missing = [(" ".join(path), action.dest) for path, action in actions if not action.help]
    assert not missing

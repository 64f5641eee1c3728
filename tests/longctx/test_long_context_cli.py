"""`engram eval long-context` end to end on a tiny checkpoint: files, table, refusals."""

import json

import pytest

from support import tiny_run
from engram.cli import main
from engram.train import train


@pytest.fixture(scope="module")
def run_dir(corpus_dir, cache_dir, tmp_path_factory):
    run = tiny_run(corpus_dir, cache_dir, tmp_path_factory.mktemp("lc") / "run", max_steps=2, save_every=2,
                   eval_every=2)
    return train(run, progress=False).run_dir


def test_long_context_eval_writes_json_markdown_and_plot(run_dir, tmp_path, capsys):
    out = tmp_path / "lc"
    code = main(["eval", "long-context", "--ckpt", str(run_dir), "--lengths", "128", "256", "--tasks", "niah_single",
                 "vt", "fwe", "--samples", "3", "--out", str(out), "--no-progress", "--ppl-docs", "2"])
    assert code == 0
    result = json.loads((out / "long_context.json").read_text())
    assert set(result["accuracy"]) == {"niah_single", "vt", "fwe"}
    assert all(cell["n"] == 3 and 0 <= cell["exact"] <= 1 for row in result["accuracy"].values()
               for cell in row.values())
    assert set(result["perplexity"]) == {"128", "256"} and result["perplexity"]["128"]["docs"] >= 1
    assert (out / "long_context.png").stat().st_size > 0
    assert "| niah_single |" in (out / "long_context.md").read_text() and "| vt |" in capsys.readouterr().out
    assert all(e["prompt_tokens"] <= e["length"] for e in result["examples"])


def test_the_cli_lists_every_task():
    from engram.cli.commands import LONG_CONTEXT_TASKS
    from engram.data.retrieval import TASKS

    assert LONG_CONTEXT_TASKS == list(TASKS)


def test_refusals(run_dir, capsys):
    assert main(["eval", "long-context", "--ckpt", str(run_dir), "--lengths", "1024", "--no-progress"]) != 0
    assert "exceed the model's context of 256 tokens" in capsys.readouterr().err
    assert main(["eval", "--ckpt", str(run_dir), "--lengths", "64"]) != 0
    assert "belong to `engram eval long-context`" in capsys.readouterr().err
    assert main(["eval", "long-context", "--ckpt", str(run_dir), "--tasks", "niah_huge"]) == 2
    assert main(["eval", "--ckpt", str(run_dir), "--samples", "5"]) != 0
    assert "--samples belong to" in capsys.readouterr().err

"""Every Python snippet of README.md runs as written, in order, in one namespace (a reader's session).

The paths the snippets name stand for the reader's own files; the test puts real ones there first, in a
temporary working directory: a tokenizer at ``path/to/tokenizer_dir`` (DeepSeek-V4's), an exported model at
``runs/mine-hf`` (the 0.1 fixture checkpoint through ``engram export-hf``), a local lm-eval task in ``tasks/``
and a small random Llama with a tokenizer at ``path/to/model``. The bash snippets are the CLI, tested by
its own tests (several train for minutes), and are not run here."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("lm_eval")

ROOT = Path(__file__).parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "v0_1" / "sharded_run"


def snippets() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def prepare(workdir: Path, deepseek_dir: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from engram.cli import main
    from engram.data.bpe import train_bpe
    from engram.hf import hf_tokenizer

    (workdir / "path/to/tokenizer_dir").mkdir(parents=True)
    shutil.copy(Path(deepseek_dir) / "tokenizer.json", workdir / "path/to/tokenizer_dir/tokenizer.json")
    assert main(["export-hf", "--ckpt", str(FIXTURE), "--out", str(workdir / "runs/mine-hf")]) == 0
    (workdir / "tasks").mkdir()
    docs = [{"context": "import os\ndef f(x):", "choices": ["return x", "pass"], "label": 0},
            {"context": "class A:", "choices": ["def __init__(self):", "import json"], "label": 0}]
    (workdir / "tasks/mytask.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (workdir / "tasks/mytask.yaml").write_text(
        "task: mytask\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: tasks/mytask.jsonl\n"
        f"  cache_dir: {workdir / 'datasets'}\ntest_split: test\noutput_type: multiple_choice\n"
        "doc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    tokenizer = train_bpe(["import os\ndef main():\n    return os.getcwd()\n"] * 20 + ["a longer prompt"] * 5, 300)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                         pad_token_id=0, bos_token_id=1, eos_token_id=2))
    llama.save_pretrained(workdir / "path/to/model")
    hf_tokenizer(tokenizer).save_pretrained(str(workdir / "path/to/model"))


def test_every_python_snippet_runs_as_written(tmp_path, monkeypatch, deepseek_dir):
    found = snippets()
    assert len(found) >= 4  # the quick start, a real tokenizer, transformers, lm-eval, retrofit
    prepare(tmp_path, deepseek_dir)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    session: dict = {"__name__": "readme"}
    for i, code in enumerate(found):
        try:
            exec(compile(code, f"README.md python snippet {i + 1}", "exec"), session)
        except Exception as err:  # name the snippet: a reader would meet this error
            raise AssertionError(f"README python snippet {i + 1} fails as written: {type(err).__name__}: {err}\n"
                                 f"{code}") from err

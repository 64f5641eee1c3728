"""Training EngramForCausalLM through transformers' own tools: Trainer's loss under gradient accumulation equals
a plain Llama's behaviour, activation checkpointing gives the same gradients, hidden states and attention weights
come back when asked for, and the Auto classes know the model."""

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (AutoModel, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Trainer,  # noqa: E402
                          TrainingArguments)

import engram.hf as H  # noqa: E402
from engram.model.config import ModelConfig  # noqa: E402
from engram.model.transformer import EngramLM  # noqa: E402
from engram.presets import get_preset  # noqa: E402

VOCAB = 97


def engram_hf(preset="tiny-engram", **backbone) -> H.EngramForCausalLM:
    config = get_preset(preset).without_data().with_data(VOCAB, 0)
    if backbone:
        import dataclasses
        config = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, **backbone))
    torch.manual_seed(0)
    return H.to_hf(EngramLM(config, sparse_tables=False))


def llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def examples(n=4, T=12):
    """Rows with different numbers of labelled tokens, so a mean of means differs from the token mean."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (T,), generator=g)
        labels = ids.clone()
        labels[: 2 + 3 * i] = -100  # row i: T - 2 - 3i labelled tokens
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def one_step(model, tmp_path, batch: int, accumulation: int) -> dict:
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch,
                             gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1e-3,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, max_grad_norm=1e9,
                             dataloader_drop_last=False, seed=0, data_seed=0)

    class InOrder(Trainer):  # the same rows in the same order, whatever the batch size
        def _get_train_sampler(self, *a, **k):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    trainer = InOrder(model=model, args=args, train_dataset=examples())
    trainer.train()
    return next(r for r in trainer.state.log_history if "loss" in r)


@pytest.mark.parametrize("build", [llama, engram_hf], ids=["llama", "engram"])
def test_gradient_accumulation_scales_the_loss_like_a_plain_llama(tmp_path, build):
    whole = one_step(build(), tmp_path / "a", batch=4, accumulation=1)
    accumulated = one_step(build(), tmp_path / "b", batch=2, accumulation=2)
    # the same four rows: one batch of 4, or two of 2 accumulated; loss and gradient must not double
    assert math.isclose(accumulated["loss"], whole["loss"], rel_tol=1e-4)
    assert math.isclose(accumulated["grad_norm"], whole["grad_norm"], rel_tol=1e-4)


def test_the_loss_with_num_items_in_batch_is_a_sum_over_them():
    model = engram_hf().train()
    rows = examples()
    ids = torch.stack([r["input_ids"] for r in rows])
    labels = torch.stack([r["labels"] for r in rows])
    mean = model(ids, labels=labels).loss
    labelled = int((labels[:, 1:] != -100).sum())
    summed = model(ids, labels=labels, num_items_in_batch=torch.tensor(2 * labelled)).loss
    torch.testing.assert_close(summed, mean / 2)


def test_activation_checkpointing_gives_the_same_gradients():
    ids = torch.randint(1, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    grads = []
    for checkpointed in (False, True):
        model = engram_hf().train()
        if checkpointed:
            model.activation_checkpointing_enable()
            assert model.model.gradient_checkpointing
        recomputed = []
        model.model.layers[0].register_forward_pre_hook(lambda *a: recomputed.append(1))
        model(ids, labels=ids).loss.backward()
        assert len(recomputed) == (2 if checkpointed else 1)  # block 0 ran again in backward
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)


def mla_hf() -> H.EngramForCausalLM:
    from engram.config import MLAConfig

    mla = MLAConfig(q_lora_rank=20, kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10)
    return engram_hf("tiny-engram", mla=mla, n_kv_heads=None)


@pytest.mark.parametrize("preset", ["tiny-engram", "tiny-moe", "tiny-engram-v41", "mla"])
def test_hidden_states_and_attentions_come_back_when_asked(preset):
    model = (mla_hf() if preset == "mla" else engram_hf(preset)).eval()
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
    plain = model(ids, use_cache=False)
    assert plain.hidden_states is None and plain.attentions is None
    out = model(ids, use_cache=False, output_hidden_states=True, output_attentions=True)
    bb = model.config.model_config.backbone
    assert len(out.hidden_states) == bb.n_layers + 1 and len(out.attentions) == bb.n_layers
    assert all(h.shape == (2, 10, bb.d_model) for h in out.hidden_states)
    torch.testing.assert_close(model.model.output(out.hidden_states[-1]), plain.logits)  # the head reads the last
    torch.testing.assert_close(out.logits, plain.logits, atol=1e-5, rtol=0)  # written-out attention: same logits
    for weights in out.attentions:
        assert weights.shape == (2, bb.n_heads, 10, 10)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, bb.n_heads, 10))
        assert bool((weights.triu(1) == 0).all())  # causal
    # decoding with a cache: weights over every cached key
    model.config.output_attentions = True  # the config's default is used when the call does not say
    step = model(ids, use_cache=True)
    nxt = model(ids[:, :1], cache=step.cache, use_cache=True)
    assert nxt.attentions[0].shape == (2, bb.n_heads, 1, 11)


def test_activation_checkpointing_with_attention_weights_trains():
    """Attention weights written out under activation checkpointing: the recomputation takes the same path."""
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(6))
    grads = []
    for checkpointed in (False, True):
        model = engram_hf().train()
        if checkpointed:
            model.activation_checkpointing_enable()
        out = model(ids, labels=ids, output_attentions=True)
        out.loss.backward()
        assert len(out.attentions) == model.config.model_config.backbone.n_layers
        grads.append(model.model.layers[0].attn.wq.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_unknown_forward_arguments_are_refused():
    model = engram_hf()
    with pytest.raises(TypeError, match="unexpected arguments"):
        model(torch.ones(1, 4, dtype=torch.long), output_scores=True)


def test_auto_model_loads_the_folder(tmp_path):
    model = engram_hf()
    model.save_pretrained(tmp_path)
    assert type(AutoModel.from_pretrained(tmp_path)) is H.EngramForCausalLM
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path)) is H.EngramForCausalLM


# -- resize_token_embeddings ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(corpus_dir, cache_dir, tmp_path_factory):
    from support import tiny_run

    from engram.data import prepare_data

    return prepare_data(tiny_run(corpus_dir, cache_dir, tmp_path_factory.mktemp("resize")).data)


def trained_with_tokenizer(data, preset="tiny-engram"):
    config = get_preset(preset).without_data().with_data(data.vocab_size, data.pad_id)
    torch.manual_seed(0)
    return H.to_hf(EngramLM(config, data.compressed, sparse_tables=False), data.tokenizer)


def test_a_model_that_hashes_nothing_resizes_runs_and_reloads(tmp_path):
    model = engram_hf("tiny-moe").eval()
    ids = torch.randint(1, VOCAB, (1, 8), generator=torch.Generator().manual_seed(5))
    before = model(ids, use_cache=False).logits
    model.resize_token_embeddings(VOCAB + 5, pad_to_multiple_of=8)  # 102 -> 104
    assert model.config.vocab_size == 104 and model.config.model_config.backbone.vocab_size == 104
    after = model(torch.cat([ids, torch.tensor([[103]])], dim=1), use_cache=False).logits
    assert after.shape[-1] == 104
    torch.testing.assert_close(after[:, :8, :VOCAB], before)  # old rows untouched
    assert torch.isfinite(after).all()  # new rows initialised, never uninitialised memory
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded(torch.tensor([[103, 5]]), use_cache=False).logits,
                       model(torch.tensor([[103, 5]]), use_cache=False).logits)


def test_an_engram_model_resizes_only_when_no_row_moves(data, tmp_path):
    from tokenizers import Tokenizer

    model = trained_with_tokenizer(data)
    V = data.vocab_size
    with pytest.raises(ValueError, match="pass the tokenizer"):
        model.resize_token_embeddings(V + 1)
    # a token that normalises to a form the vocabulary has: V' is unchanged, the call goes through
    word = next(t for t in (data.tokenizer.decode([i]) for i in range(V)) if t.isalpha() and t.islower() and len(t) > 2)
    grown = Tokenizer.from_str(data.tokenizer.to_str())
    grown.add_tokens([word.upper()])
    ids = torch.tensor([data.tokenizer.encode("def alpha(x):\n    return x").ids])
    before = model(ids, use_cache=False).logits
    model.resize_token_embeddings(V + 1, tokenizer=grown)
    torch.testing.assert_close(model(ids, use_cache=False).logits[..., :V], before)
    new_id = torch.tensor([[V, *ids[0, :3].tolist()]])
    compressed = model.model.compressed_tokenizer
    assert compressed.raw_vocab_size == V + 1 and int(compressed.lookup[V]) == int(compressed.lookup[grown.token_to_id(word)])
    assert torch.isfinite(model(new_id, use_cache=False).logits).all()
    model.save_pretrained(tmp_path)  # the folder's tokenizer is the grown one and rebuilds the same table
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded(new_id, use_cache=False).logits, model(new_id, use_cache=False).logits)
    # a token with a new form would change V' and so every hash multiplier: refused, nothing changed
    other = Tokenizer.from_str(grown.to_str())
    other.add_tokens(["zqxv_never_seen"])
    with pytest.raises(ValueError, match="V'="):
        model.resize_token_embeddings(V + 2, tokenizer=other)
    assert model.config.vocab_size == V + 1 and model.model.tok_embeddings.weight.shape[0] == V + 1


def test_padding_the_vocabulary_of_an_engram_model_and_a_plain_models_tokenizer(data, tmp_path):
    from tokenizers import Tokenizer

    model = trained_with_tokenizer(data)
    V = data.vocab_size
    ids = torch.tensor([data.tokenizer.encode("def alpha(x):").ids])
    before = model(ids, use_cache=False).logits
    model.resize_token_embeddings(V, pad_to_multiple_of=64, tokenizer=data.tokenizer)  # padding ids only
    size = -(-V // 64) * 64
    assert model.config.vocab_size == size and model.model.compressed_tokenizer.raw_vocab_size == size
    torch.testing.assert_close(model(ids, use_cache=False).logits[..., :V], before)
    model.save_pretrained(tmp_path / "padded")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "padded")  # its tokenizer is shorter than its table
    assert torch.equal(loaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
    # a model that hashes nothing takes the tokenizer along: the folder it saves holds the grown one
    plain = H.to_hf(EngramLM(get_preset("tiny-moe").without_data().with_data(V, data.pad_id)), data.tokenizer)
    grown = Tokenizer.from_str(data.tokenizer.to_str())
    grown.add_tokens(["zqxv_never_seen"])
    plain.resize_token_embeddings(V + 1, tokenizer=grown)
    plain.save_pretrained(tmp_path / "plain")
    from transformers import AutoTokenizer
    assert len(AutoTokenizer.from_pretrained(tmp_path / "plain")) == V + 1


def test_a_refused_resize_changes_nothing(data):
    from tokenizers import Tokenizer

    model = trained_with_tokenizer(data)
    V = data.vocab_size
    other = Tokenizer.from_str(data.tokenizer.to_str())
    other.add_tokens(["zqxv_never_seen"])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layout = dict(model.config.hash_layout)
    with pytest.raises(ValueError, match="V'="):
        model.resize_token_embeddings(V + 1, tokenizer=other)
    assert model.config.hash_layout == layout and model.config.vocab_size == V
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

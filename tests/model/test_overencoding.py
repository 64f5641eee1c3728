"""OverEncoding: hashed n-gram embeddings averaged into the input embedding, at Engram's table memory."""

import pytest
import torch

from support import assert_causal, train_step
from engram.config import ModelConfig, OverEncodingConfig, TrainConfig
from engram.hashing import NgramHasher, layer_multipliers
from engram.model.accounting import count_parameters
from engram.model.engram import MultiHeadEmbedding
from engram.model.overencoding import OrderProjection, OverEncoding
from engram.model.transformer import EngramLM
from engram.presets import get_preset
from engram.tokenizer import CompressedTokenizer
from engram.train.optim import Optimizers, table_parameters


def oe_config(N=3, width=32, **fields) -> OverEncodingConfig:
    sizes = [1009, 1013, 1019][: N - 1]
    return OverEncodingConfig(engram_vocab_size=sizes, max_ngram_size=N, n_embed_per_ngram=width,
                              n_head_per_ngram=4, pad_id=2, **fields)


def with_oe(base="tiny-moe", engram=False, **kwargs) -> ModelConfig:
    config = get_preset("tiny-engram" if engram else base)
    return ModelConfig(backbone=config.backbone, engram=config.engram, overencoding=oe_config(**kwargs))


CASES = {
    "projected": with_oe(),
    "width-d-model": with_oe(width=64),  # E = D: no projection
    "4-grams": with_oe(N=4),
    "with-engram": with_oe(engram=True),
    "raw-ids": with_oe(compress=False),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_trains_one_step_is_causal_and_accounting_is_pinned(name):
    config = CASES[name]
    model = EngramLM(config, CompressedTokenizer(torch.arange(512) // 2, 256), sparse_tables=True)
    count = count_parameters(config)
    oe = model.overencoding
    assert count.with_embeddings == sum(p.numel() for p in model.parameters())
    assert count.overencoding_tables == oe.embedding.weight.numel()
    projections = sum(p.numel() for p in oe.proj.parameters())
    assert isinstance(oe.proj, OrderProjection) == (config.overencoding.n_embed_per_ngram != 64)
    # tables are sparse (P_tot only), projections active
    dense = ModelConfig(backbone=config.backbone, engram=config.engram)
    assert count.total - count_parameters(dense).total == count.overencoding_tables + projections
    assert count.active - count_parameters(dense).active == projections
    before = train_step(model, 512)
    after = dict(model.named_parameters())
    assert not torch.equal(before["overencoding.embedding.weight"], after["overencoding.embedding.weight"])
    assert_causal(model, 512)


def test_zero_tables_give_the_token_embedding_over_n():
    """With zeroed tables the input is E[x_t]/N: the baseline with its token embedding scaled by 1/N."""
    config = CASES["4-grams"]
    model = EngramLM(config).eval()
    base = EngramLM(ModelConfig(backbone=config.backbone)).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("overencoding.")}
    state["tok_embeddings.weight"] = state["tok_embeddings.weight"] / 4
    base.load_state_dict(state)
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        # a fresh model's tables are zero: untrained rows add nothing (see OverEncoding.init_weights)
        assert torch.count_nonzero(model.overencoding.embedding.weight) == 0
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-6, rtol=1e-6)
        model.overencoding.embedding.weight.normal_()
        assert not torch.allclose(model(ids).logits, base(ids).logits)
        model.overencoding.embedding.weight.zero_()
        torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-6, rtol=1e-6)


def test_input_is_the_mean_of_the_embeddings():
    model = EngramLM(CASES["width-d-model"])
    oe = model.overencoding
    with torch.no_grad():
        oe.embedding.weight.normal_()  # trained rows are not zero
    ids = torch.randint(0, 512, (1, 6))
    hash_ids = oe.hasher(ids)[oe.layer_id]  # (1, 6, H)
    rows = oe.embedding.weight[hash_ids + oe.embedding.offsets]  # (1, 6, H, d_h)
    bigram, trigram = rows[:, :, :4].flatten(2), rows[:, :, 4:].flatten(2)  # (1, 6, 4*16) each: E = D
    tok = model.tok_embeddings(ids)
    torch.testing.assert_close(oe(tok, hash_ids), (tok + bigram + trigram) / 3)


def test_documents_start_with_pad_ngrams():
    """At a document start the order-n embedding is that of (pad, ..., pad, x_t): no n-gram crosses it."""
    model = EngramLM(CASES["4-grams"])
    oe = model.overencoding
    ids = torch.randint(3, 512, (1, 16))
    boundary = torch.zeros(1, 16, dtype=torch.bool)
    boundary[0, 7] = True
    packed = model.hash(ids, boundary)[oe.layer_id]
    alone = model.hash(ids[:, 7:])[oe.layer_id]
    assert torch.equal(packed[:, 7:], alone)
    padded = model.hash(torch.tensor([[2, 2, 2, int(ids[0, 7])]]))[oe.layer_id]  # explicit pads before x_7
    assert torch.equal(packed[:, 7], padded[:, -1])
    assert not torch.equal(packed[:, 7], model.hash(ids)[oe.layer_id][:, 7])
    tok = model.tok_embeddings(ids)
    with torch.no_grad():
        torch.testing.assert_close(oe(tok, packed)[:, 7:], oe(tok[:, 7:], alone))


def test_hashing_is_engram_hashing_at_a_layer_no_block_has():
    config = CASES["with-engram"]
    model = EngramLM(config)
    oe = model.overencoding
    assert oe.layer_id == config.backbone.n_layers and oe.layer_id not in model.engram_layers
    expected = layer_multipliers(0, oe.layer_id, 3, model.hasher.compressed_vocab_size)
    assert oe.hasher.multipliers[oe.layer_id].tolist() == expected.tolist()
    assert oe.hasher.multipliers[oe.layer_id].tolist() != model.hasher.multipliers[1].tolist()
    # same fields as the Engram layer: same rows, same width
    assert oe.embedding.weight.shape == model.layers[1].engram.embedding.weight.shape
    ref = NgramHasher(config.overencoding, CompressedTokenizer.identity(512), layer_ids=[oe.layer_id])
    ids = torch.randint(0, 512, (2, 10))
    assert torch.equal(oe.hasher(ids)[oe.layer_id], ref(ids)[oe.layer_id])
    # both hashers run in one model.hash, keyed by layer id
    assert set(model.hash(ids)) == {1, oe.layer_id}


def test_tables_get_sparse_gradients_on_looked_up_rows_and_sparse_adam():
    model = EngramLM(CASES["with-engram"], sparse_tables=True)
    opt = Optimizers(model, TrainConfig(lr=1e-2))
    table = model.overencoding.embedding.weight
    assert any(p is table for p in table_parameters(model)) and len(table_parameters(model)) == 2
    assert all(not any(p is q for q in opt.dense_params) for p in table_parameters(model))
    assert opt.tables.param_groups[0]["lr"] == pytest.approx(1e-2 * 5.0)
    ids = torch.randint(0, 512, (2, 12))
    model(ids).logits.square().mean().backward()
    assert table.grad.is_sparse
    rows = set((model.hash(ids)[model.overencoding.layer_id] + model.overencoding.embedding.offsets).flatten().tolist())
    touched = set(table.grad.coalesce().indices()[0].tolist())
    assert touched == rows
    before = table.detach().clone()
    opt.step()
    moved = set(torch.nonzero((table.detach() != before).any(1)).flatten().tolist())
    assert moved <= rows and moved


def test_no_host_round_trips():
    oe = OverEncoding(oe_config(), 64, CompressedTokenizer.identity(512), 4).to("meta")
    ids = torch.empty(2, 8, dtype=torch.long, device="meta")
    hash_ids = oe.hasher(ids, torch.empty(2, 8, dtype=torch.bool, device="meta"))[4]
    assert oe(torch.empty(2, 8, 64, device="meta"), hash_ids).shape == (2, 8, 64)
    assert isinstance(oe.embedding, MultiHeadEmbedding)


def test_storage_tiers_refuse_an_overencoding_model():
    from engram.storage import apply_storage

    model = EngramLM(CASES["with-engram"]).eval()
    with pytest.raises(ValueError, match="OverEncoding"):
        apply_storage(model, "host")
    apply_storage(model, "device").close()  # a no-op: everything stays where it is

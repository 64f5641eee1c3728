"""The declared interfaces: every table placement answers ``HashedTable``'s questions (``trainable``,
``prefetch``), every model that holds tables declares ``TableHost`` and the placements take exactly those,
both Engram variants have one forward signature, and prompts are encoded one way."""

import inspect

import pytest
import torch
from torch import nn

from engram.model.engram import Engram
from engram.model.engram_v41 import EngramV41
from engram.model.tables import HashedTable, MultiHeadEmbedding, TableHost
from engram.model.transformer import EngramLM
from engram.presets import get_preset
from engram.storage import OffloadedEmbedding, apply_storage, export_tables


def tiny() -> EngramLM:
    torch.manual_seed(0)
    return EngramLM(get_preset("tiny-engram")).eval()


def test_every_table_placement_says_whether_it_holds_trainable_rows():
    model = tiny()
    tables = model.named_tables()
    assert tables and all(isinstance(t, MultiHeadEmbedding) and t.trainable for t in tables.values())
    with apply_storage(model, "host"):
        offloaded = model.named_tables()
        assert all(isinstance(t, OffloadedEmbedding) and not t.trainable for t in offloaded.values())
    assert not HashedTable().trainable


def test_a_device_table_prefetches_nothing_and_the_forward_does_not_probe_for_it():
    model = tiny()
    ids = torch.randint(0, model.config.backbone.vocab_size, (2, 9))
    calls = []
    for layer in model.engram_layers.values():  # the model calls prefetch on every table, declared on all
        layer.embedding.prefetch = lambda hash_ids, calls=calls: calls.append(tuple(hash_ids.shape))
    with torch.no_grad():
        model(ids)
    assert calls == [(2, 9, model.config.engram.n_heads)] * len(model.engram_layers)
    assert MultiHeadEmbedding.prefetch is HashedTable.prefetch  # the device table inherits the no-op


def test_models_that_hold_tables_declare_it_and_placements_take_only_those(tmp_path):
    model = tiny()
    assert isinstance(model, TableHost)
    with pytest.raises(TypeError, match="apply_storage takes a model holding Engram tables.*got Linear"):
        apply_storage(nn.Linear(2, 2), "host")
    with pytest.raises(TypeError, match="export_tables takes a model holding Engram tables.*got Sequential"):
        export_tables(nn.Sequential(), tmp_path / "t")


def test_an_hf_wrapper_is_a_table_host_through_its_model(tmp_path):
    pytest.importorskip("transformers")
    from engram.hf import to_hf

    model = tiny()
    hf = to_hf(model)
    assert isinstance(hf, TableHost) and hf.hasher is hf.model.hasher
    assert set(hf.engram_layers) == set(model.engram_layers)
    assert {f"model.{n}" for n in model.named_tables()} == set(hf.named_tables())
    assert all(dict(hf.named_modules())[name] is t for name, t in hf.named_tables().items())
    export_tables(hf, tmp_path / "hf")
    export_tables(model, tmp_path / "native")
    assert (tmp_path / "hf" / "layer_1.bin").read_bytes() == (tmp_path / "native" / "layer_1.bin").read_bytes()


def test_both_engram_variants_take_the_same_arguments():
    paper = inspect.signature(Engram.forward).parameters
    v41 = inspect.signature(EngramV41.forward).parameters
    assert list(paper) == list(v41) == ["self", "hidden", "hash_ids", "doc_ids", "cache", "token_mask"]


def test_a_token_mask_closes_the_paper_modules_gate_where_it_is_false():
    config = get_preset("tiny-engram").engram
    torch.manual_seed(0)
    module = Engram(config, 16, [37, 41, 43, 47, 53, 59, 61, 67][: config.n_heads], branches=2).eval()
    with torch.no_grad():
        module.conv_weight.normal_()  # the conv mixes positions: a closed gate must still zero the value
    hidden = torch.randn(1, 6, 2, 16)
    ids = torch.randint(0, 37, (1, 6, config.n_heads))
    mask = torch.tensor([[True, True, False, True, False, True]])
    with torch.no_grad():
        open_all = module(hidden, ids)
        masked = module(hidden, ids, token_mask=mask)
        none_open = module(hidden, ids, token_mask=torch.zeros_like(mask))
    assert torch.equal(module(hidden, ids, token_mask=torch.ones_like(mask)), open_all)
    assert torch.equal(none_open, torch.zeros_like(none_open))
    assert not torch.equal(masked, open_all)


def test_prompts_are_encoded_as_training_documents_start(corpus_dir, cache_dir):
    from support import tiny_run
    from engram.data import prepare_data, prompt_ids, special_ids, with_bos

    data = prepare_data(tiny_run(corpus_dir, cache_dir, "unused").data)
    tok = data.tokenizer
    bos = special_ids(tok).bos
    assert bos is not None
    assert prompt_ids(tok, "def f(x):") == [bos] + tok.encode("def f(x):").ids
    assert with_bos([5, 6], None) == [5, 6] and with_bos((5, 6), 1) == [1, 5, 6]
    first = data.train.tokens[0]  # a shard starts with its first document: [bos] + ids, as prompts do
    assert int(first[0]) == bos


def test_one_id_check_for_the_tokenizer_the_hasher_and_the_model():
    model = tiny()
    V = model.config.backbone.vocab_size
    bad = torch.tensor([[1, V + 3]])
    for call in (lambda: model(bad), lambda: model.hasher(bad), lambda: model.compressed_tokenizer(bad)):
        with pytest.raises(ValueError, match=f"token id {V + 3} is outside .*\\[0, {V}\\) \\(1 bad id"):
            call()
    with pytest.raises(ValueError, match="token ids must be an integer tensor"):
        model.compressed_tokenizer(torch.tensor([[1.0]]))

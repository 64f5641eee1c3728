"""Build, place, initialise: EngramLM builds on the meta device without allocating, ``to_empty`` +
``init_weights`` gives exactly the model a direct build gives, every parameter and buffer is set by
that one call, and a table's rows are filled once, from row blocks that shards reproduce."""

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.config import ModelConfig, OverEncodingConfig
from engram.model import tables as tables_module
from engram.model.tables import INIT_BLOCK_ROWS, MultiHeadEmbedding, normal_rows_
from engram.model.transformer import EngramLM
from engram.presets import PAPER_PRESETS, PRESETS, RUN_PRESETS, get_preset, get_run_preset
from engram.tokenizer import CompressedTokenizer


def _with_overencoding() -> ModelConfig:
    config = get_preset("tiny-engram")
    return dataclasses.replace(config, overencoding=OverEncodingConfig(
        engram_vocab_size=[211, 223], n_embed_per_ngram=16, n_head_per_ngram=2, pad_id=2))


CONFIGS = {name: get_preset(name) for name in PRESETS} | {"tiny-engram+overencoding": _with_overencoding()}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, persistent or not."""
    out = {f"param:{n}": p.detach() for n, p in model.named_parameters()}
    out |= {f"buffer:{n}": b for n, b in model.named_buffers()}
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_meta_build_then_init_equals_a_direct_build(name):
    config, tok = CONFIGS[name], CompressedTokenizer(torch.arange(512) // 2, 256)
    torch.manual_seed(3)
    direct = EngramLM(config, tok)
    with torch.device("meta"):
        model = EngramLM(config, tok)
    assert all(t.device.type == "meta" for t in _state(model).values())
    model.to_empty(device="cpu")
    for t in _state(model).values():  # poison: anything init_weights forgets stays NaN / -1
        t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-1)
    torch.manual_seed(3)
    model.init_weights()
    a, b = _state(direct), _state(model)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ids = torch.randint(0, 512, (2, 12))
    torch.testing.assert_close(direct(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_every_shipped_configuration_builds_on_meta_without_allocating():
    """The presets (the paper-scale ones too) and every model of the shipped sweep budgets (up to 18.5B
    table parameters)."""
    from engram.model.accounting import count_parameters
    from engram.sweeps.allocation import allocation_grid, with_rows_per_head
    from engram.sweeps.budgets import BUDGETS

    configs = [get_preset(n) for n in list(PRESETS) + list(PAPER_PRESETS)] + [get_run_preset(n).model for n in RUN_PRESETS]
    for budget in BUDGETS.values():
        base, template = budget.base_run().model, budget.engram_template()
        configs += [p.config for p in allocation_grid(base, template, budget.rhos)]
        configs.append(ModelConfig(backbone=base.backbone, engram=with_rows_per_head(template, max(budget.memory_rows))))
    largest = max(configs, key=lambda c: count_parameters(c).engram_tables)
    assert count_parameters(largest).engram_tables > 18e9
    for config in configs:
        with torch.device("meta"):
            model = EngramLM(config)
        assert all(t.device.type == "meta" for t in _state(model).values())
        assert sum(p.numel() for p in model.parameters()) == count_parameters(config).with_embeddings


def test_each_table_is_filled_once(monkeypatch):
    calls = []
    original = tables_module.normal_rows_

    def counting(weight, first_row, std, seed):
        calls.append((weight.shape, first_row))
        return original(weight, first_row, std, seed)

    monkeypatch.setattr(tables_module, "normal_rows_", counting)
    config = dataclasses.replace(get_preset("tiny-engram"), engram=dataclasses.replace(
        get_preset("tiny-engram").engram, layer_ids=[0, 2]))
    model = EngramLM(config)
    assert len(calls) == 2  # one fill per Engram table (OverEncoding tables start at zero)
    calls.clear()
    model.init_weights(tables=False)  # what loading a checkpoint does: the rows are left alone
    assert calls == []


def test_a_seed_fixes_the_model_and_another_seed_changes_every_table():
    config = get_preset("tiny-engram")
    torch.manual_seed(0)
    a = EngramLM(config)
    torch.manual_seed(0)
    b = EngramLM(config)
    torch.manual_seed(1)
    c = EngramLM(config)
    table = "layers.1.engram.embedding.weight"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa[table], sc[table])
    assert sa[table].std().item() == pytest.approx(config.engram.table_init_std, rel=0.02)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 3 * INIT_BLOCK_ROWS), data=st.data())
def test_any_row_range_gets_the_rows_of_the_whole_table(rows, data):
    """What a rank holding rows [start, stop) fills equals those rows of the whole table."""
    start = data.draw(st.integers(0, rows - 1))
    stop = data.draw(st.integers(start + 1, rows))
    whole = normal_rows_(torch.empty(rows, 2), 0, 0.5, seed=11)
    part = normal_rows_(torch.empty(stop - start, 2), start, 0.5, seed=11)
    assert torch.equal(part, whole[start:stop])


def test_table_init_statistics_and_zero_std():
    from engram.hashing import TableGeometry

    table = MultiHeadEmbedding(TableGeometry((20011, 20021)), 4)
    table.init_weights(1.0, seed=5)
    w = table.weight.detach()
    assert abs(w.mean().item()) < 0.01 and w.std().item() == pytest.approx(1.0, abs=0.01)
    blocks = w[: 2 * INIT_BLOCK_ROWS].view(2, -1)
    assert not torch.equal(blocks[0], blocks[1])  # blocks have their own streams
    table.init_weights(0.0, seed=5)
    assert not table.weight.detach().any()
    assert table.offsets.tolist() == [0, 20011] and table.num_rows == 40032 and math.isclose(table.dim, 4)


def test_a_model_whose_derived_fields_are_unset_is_refused():
    with pytest.raises(ValueError, match=r"backbone\.vocab_size, engram\.pad_id unset.*with_data"):
        EngramLM(get_preset("tiny-engram").without_data())


def test_table_init_std_is_a_recorded_option_and_the_reference_is_kept_by_name():
    """EngramConfig.table_init_std (the table-init study, docs/RESULTS.md §4): the default is N(0, 0.02); DeepSeek's N(0, 1)
    stays available as TABLE_INIT_REFERENCE and is reproducible (a seed draws the same rows, which are
    the default's rows times 50: one stream, scaled); 0 starts the rows at zero; the run config records it."""
    import dataclasses

    import pytest

    from engram.config import TABLE_INIT_REFERENCE, TABLE_INIT_STD, EngramConfig, RunConfig
    from engram.model.transformer import EngramLM
    from engram.presets import get_preset

    config = get_preset("tiny-engram")
    assert config.engram.table_init_std == TABLE_INIT_STD == 0.02 and TABLE_INIT_REFERENCE == 1.0
    reference_config = dataclasses.replace(config, engram=dataclasses.replace(config.engram,
                                                                              table_init_std=TABLE_INIT_REFERENCE))
    torch.manual_seed(5)
    default = EngramLM(config)
    tables = []
    for _ in range(2):
        torch.manual_seed(5)
        tables.append({n: t.weight.detach().clone() for n, t in EngramLM(reference_config).named_tables().items()})
    for name, table in default.named_tables().items():
        assert torch.equal(tables[0][name], tables[1][name]), name
        assert torch.allclose(table.weight * 50, tables[0][name], rtol=1e-5, atol=1e-6), name
        assert tables[0][name].std().item() == pytest.approx(1.0, abs=0.02)
    zero = dataclasses.replace(config, engram=dataclasses.replace(config.engram, table_init_std=0.0))
    torch.manual_seed(5)
    model = EngramLM(zero)
    assert all(bool((t.weight == 0).all()) for t in model.named_tables().values())
    assert RunConfig(model=zero).to_dict()["model"]["engram"]["table_init_std"] == 0.0
    for bad in (-1.0, float("inf"), True):
        with pytest.raises(ValueError, match="EngramConfig.table_init_std"):
            EngramConfig(table_init_std=bad)


def _twins():
    """An MoE and its Engram twin as the allocation solver makes them: 8 vs 6 routed experts, Engram at
    block 1, and a narrower dense FFN in block 0 (172 vs 150 hidden units)."""
    moe = get_preset("tiny-moe")
    moe = dataclasses.replace(moe, backbone=dataclasses.replace(
        moe.backbone, moe=dataclasses.replace(moe.backbone.moe, first_dense_layers=1)))
    engram = get_preset("tiny-engram")
    engram = dataclasses.replace(engram, backbone=dataclasses.replace(
        engram.backbone, ffn_hidden=150,
        moe=dataclasses.replace(engram.backbone.moe, n_routed_experts=6, first_dense_layers=1)))
    return moe, engram


@pytest.mark.parametrize("seed", [0, 7])
def test_a_seed_gives_twins_the_same_initial_weight_for_every_shared_parameter(seed):
    """Seed pairing: a parameter both models have (same name, same shape) starts equal,
    and so do the routed experts and router rows they share, whatever the other model holds besides
    (an Engram module, more experts); a weight's draw depends on its name, not on what came before."""
    moe_config, engram_config = _twins()
    torch.manual_seed(seed)
    moe = dict(EngramLM(moe_config).named_parameters())
    torch.manual_seed(seed)
    engram = dict(EngramLM(engram_config).named_parameters())
    shared = [n for n in moe if n in engram and moe[n].shape == engram[n].shape]
    assert len(shared) > 20 and any(n.startswith("layers.3.") for n in shared)
    for name in shared:
        assert torch.equal(moe[name], engram[name]), name
    resized = [n for n in moe if n in engram and moe[n].shape != engram[n].shape]
    assert resized and all(".ffn." in n for n in resized)
    for name in resized:  # router rows and experts 0..5 are the first six of eight; FFN units the first 150
        if name.endswith("ffn.w2.weight"):
            assert torch.equal(moe[name][:, :150], engram[name]), name
        else:
            k = engram[name].shape[0]
            assert torch.equal(moe[name][:k], engram[name]), name
    assert "layers.0.ffn.w1.weight" in resized
    torch.manual_seed(seed + 1)
    other = dict(EngramLM(moe_config).named_parameters())
    assert not torch.equal(other["layers.0.attn.wq.weight"], moe["layers.0.attn.wq.weight"])



def test_a_weight_does_not_depend_on_the_shapes_drawn_before_it():
    """Fewer KV heads change wk and wv, not wq or wo: each weight has its own stream."""
    config = get_preset("tiny-moe")
    fewer = dataclasses.replace(config, backbone=dataclasses.replace(config.backbone, n_kv_heads=1))
    torch.manual_seed(2)
    a = dict(EngramLM(config).named_parameters())
    torch.manual_seed(2)
    b = dict(EngramLM(fewer).named_parameters())
    assert a["layers.1.attn.wk.weight"].shape != b["layers.1.attn.wk.weight"].shape
    for name in ("layers.1.attn.wq.weight", "layers.1.attn.wo.weight", "layers.2.attn.wq.weight"):
        assert torch.equal(a[name], b[name]), name

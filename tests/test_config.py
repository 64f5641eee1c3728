import json

import pytest

from engram.config import BackboneConfig, EngramConfig, ModelConfig, MoEConfig, OverEncodingConfig
from engram.presets import PRESETS, get_preset


@pytest.mark.parametrize("kwargs,field", [
    ({"max_ngram_size": 1}, "max_ngram_size"),
    ({"engram_vocab_size": [100]}, "engram_vocab_size"),
    ({"engram_vocab_size": [100, 1]}, "engram_vocab_size"),
    ({"engram_vocab_size": 100}, "engram_vocab_size"),
    ({"engram_vocab_size": [100, 2.5]}, "engram_vocab_size"),
    ({"n_head_per_ngram": 0}, "n_head_per_ngram"),
    ({"n_embed_per_ngram": 500}, "n_embed_per_ngram"),
    ({"layer_ids": [-1]}, "layer_ids"),
    ({"layer_ids": [1, 1]}, "layer_ids"),
    ({"layer_ids": 3}, "layer_ids"),
    ({"pad_id": -1}, "pad_id"),
    ({"seed": -5}, "seed"),
    ({"kernel_size": 0}, "kernel_size"),
    ({"gate": "relu"}, "gate"),
    ({"n_head_per_ngram": True}, "n_head_per_ngram"),
    ({"compress": "no"}, "compress"),
    ({"short_conv": 0}, "short_conv"),
    ({"branch_keys": None}, "branch_keys"),
])
def test_engram_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"EngramConfig\.{field}:"):
        EngramConfig(**kwargs)


@pytest.mark.parametrize("cls,kwargs,field", [
    (BackboneConfig, {"d_model": 30, "n_heads": 4}, "d_model"),
    (BackboneConfig, {"d_model": 12, "n_heads": 4}, "d_model"),  # odd head width: no RoPE
    (BackboneConfig, {"n_kv_heads": 3}, "n_kv_heads"),
    (BackboneConfig, {"vocab_size": 1}, "vocab_size"),
    (BackboneConfig, {"norm_eps": 0}, "norm_eps"),
    (BackboneConfig, {"moe": 3}, "moe"),
    (MoEConfig, {"top_k": 9, "n_routed_experts": 8}, "top_k"),
    (MoEConfig, {"bias_update_rate": -1}, "bias_update_rate"),
    (MoEConfig, {"n_shared_experts": -1}, "n_shared_experts"),
])
def test_backbone_and_moe_errors(cls, kwargs, field):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{field}:"):
        cls(**kwargs)


def test_model_config_cross_checks():
    bb = BackboneConfig(n_layers=4, hc_mult=2)
    with pytest.raises(ValueError, match=r"engram\.layer_ids.*\[4\]"):
        ModelConfig(backbone=bb, engram=EngramConfig(layer_ids=[1, 4]))
    with pytest.raises(ValueError, match=r"engram\.pad_id"):
        ModelConfig(backbone=bb, engram=EngramConfig(layer_ids=[1], pad_id=600))


def test_the_number_of_branches_has_one_source():
    assert "hc_mult" not in EngramConfig().to_dict()
    with pytest.raises(TypeError):
        EngramConfig(hc_mult=2)
    config = get_preset("tiny-engram")
    assert config.branches == config.backbone.hc_mult == 2


def test_configs_that_repeated_the_branches_in_engram_load_when_they_agree():
    old = get_preset("tiny-engram").to_dict()
    old["engram"]["hc_mult"] = 2  # how 0.1 wrote it
    assert ModelConfig.from_dict(old) == get_preset("tiny-engram")
    old["engram"]["hc_mult"] = 1
    with pytest.raises(ValueError, match=r"engram\.hc_mult.*backbone\.hc_mult=2, got 1"):
        ModelConfig.from_dict(old)
    assert EngramConfig.from_dict({"layer_ids": [1], "hc_mult": 4}) == EngramConfig(layer_ids=[1])


def test_derived_fields_are_filled_from_the_data_never_overwritten():
    config = get_preset("tiny-engram")
    assert config.derived_fields() == {"backbone.vocab_size": 512, "engram.pad_id": 2}
    unset = config.without_data()
    assert unset.unresolved() == ["backbone.vocab_size", "engram.pad_id"]
    filled = unset.with_data(vocab_size=300, pad_id=0)
    assert (filled.backbone.vocab_size, filled.engram.pad_id) == (300, 0) and filled.unresolved() == []
    assert config.with_data(vocab_size=512, pad_id=2) == config  # set and agreeing: kept
    with pytest.raises(ValueError, match=r"model\.backbone\.vocab_size=512 but the data gives 300.*"
                                         r"model\.engram\.pad_id=2 but the data gives 0.*null"):
        config.with_data(vocab_size=300, pad_id=0)
    over = ModelConfig(backbone=BackboneConfig(vocab_size=None),
                       overencoding=OverEncodingConfig(engram_vocab_size=[11], max_ngram_size=2, pad_id=5))
    with pytest.raises(ValueError, match=r"overencoding\.pad_id=5 but the data gives 0"):
        over.with_data(vocab_size=300, pad_id=0)
    assert ModelConfig.from_dict(json.loads(json.dumps(unset.to_dict()))) == unset


def test_demo_field_names_and_defaults():
    """The official demo's EngramConfig fields, names and defaults."""
    c = EngramConfig()
    assert c.engram_vocab_size == [646400, 646400] and c.max_ngram_size == 3
    assert c.n_embed_per_ngram == 512 and c.n_head_per_ngram == 8 and c.layer_ids == [1, 15]
    assert c.pad_id == 2 and c.seed == 0 and c.kernel_size == 4 and c.gate == "signed_sqrt"
    assert (c.n_heads, c.head_dim, c.memory_dim, c.dilation) == (16, 64, 1024, 3)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
    config = get_preset(name)
    again = ModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and ModelConfig.from_name(name) == config


def test_from_dict_refuses_unknown_fields():
    data = get_preset("tiny-engram").to_dict()
    data["engram"]["n_heads_per_ngram"] = 8  # typo
    with pytest.raises(ValueError, match="unknown field.*n_heads_per_ngram"):
        ModelConfig.from_dict(data)
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        get_preset("nope")


@pytest.mark.parametrize("kwargs,field", [
    ({"max_ngram_size": 1}, "max_ngram_size"),
    ({"engram_vocab_size": [100]}, "engram_vocab_size"),
    ({"n_embed_per_ngram": 30}, "n_embed_per_ngram"),
    ({"pad_id": -1}, "pad_id"),
    ({"seed": -1}, "seed"),
    ({"compress": 1}, "compress"),
])
def test_overencoding_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"OverEncodingConfig\.{field}:"):
        OverEncodingConfig(**kwargs)


def test_switches_and_overencoding_round_trip():
    config = get_preset("tiny-engram")
    config.engram.gate, config.engram.compress, config.engram.short_conv, config.engram.branch_keys = (
        "none", False, False, False)
    config.overencoding = OverEncodingConfig(engram_vocab_size=[11], max_ngram_size=2, n_embed_per_ngram=8,
                                             n_head_per_ngram=2, compress=False)
    again = ModelConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config and isinstance(again.overencoding, OverEncodingConfig)
    assert not again.overencoding.compress
    with pytest.raises(ValueError, match=r"ModelConfig\.overencoding\.pad_id"):
        ModelConfig(backbone=BackboneConfig(vocab_size=100), overencoding=OverEncodingConfig(pad_id=100))


def test_configs_saved_before_the_switches_still_load():
    old = get_preset("tiny-engram").to_dict()
    for key in ("compress", "short_conv", "branch_keys"):
        del old["engram"][key]
    del old["overencoding"]
    config = ModelConfig.from_dict(old)
    assert config == get_preset("tiny-engram") and config.overencoding is None
    e = config.engram
    assert (e.compress, e.gate, e.short_conv, e.branch_keys) == (True, "signed_sqrt", True, True)

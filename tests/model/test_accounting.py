import dataclasses

import pytest
import torch

from engram.config import BackboneConfig, EngramConfig, MLAConfig, ModelConfig, MoEConfig, OverEncodingConfig
from engram.model.accounting import count_parameters, format_count
from engram.model.transformer import EngramLM
from engram.presets import get_preset

CONFIGS = {
    "tiny-dense": get_preset("tiny-dense"),
    "tiny-moe": get_preset("tiny-moe"),
    "tiny-engram": get_preset("tiny-engram"),
    "tiny-engram-v41": get_preset("tiny-engram-v41"),
    "g1-gqa-4gram-two-layers": ModelConfig(
        backbone=BackboneConfig(vocab_size=300, n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                                moe=MoEConfig(n_routed_experts=5, n_shared_experts=0, top_k=3, expert_hidden=16,
                                              first_dense_layers=0)),
        engram=EngramConfig(engram_vocab_size=[101, 103, 107], max_ngram_size=4, n_head_per_ngram=3,
                            n_embed_per_ngram=12, layer_ids=[0, 2], kernel_size=3)),
}
_G1 = CONFIGS["g1-gqa-4gram-two-layers"]
_TINY = get_preset("tiny-engram")  # G = 2
for _name, _switches in {"no-gate": {"gate": "none"}, "no-conv": {"short_conv": False},
                         "shared-keys": {"branch_keys": False}, "no-compression": {"compress": False},
                         "shared-keys-no-conv": {"branch_keys": False, "short_conv": False},
                         "no-gate-shared-keys": {"gate": "none", "branch_keys": False},
                         "demo-biases": {"proj_bias": True, "gate_norm_eps": None, "conv_norm_eps": 1e-5},
                         "no-gate-biases": {"gate": "none", "proj_bias": True},
                         "shared-keys-biases": {"branch_keys": False, "proj_bias": True}}.items():
    CONFIGS[f"G2-{_name}"] = ModelConfig(backbone=_TINY.backbone, engram=dataclasses.replace(_TINY.engram, **_switches))
    CONFIGS[f"G1-4gram-{_name}"] = ModelConfig(backbone=_G1.backbone, engram=dataclasses.replace(_G1.engram, **_switches))
_OE = OverEncodingConfig(engram_vocab_size=[101, 103, 107], max_ngram_size=4, n_head_per_ngram=3,
                         n_embed_per_ngram=12, pad_id=2)
CONFIGS["G1-4gram-overencoding"] = ModelConfig(backbone=_G1.backbone, engram=_G1.engram, overencoding=_OE)
CONFIGS["G2-overencoding-only"] = ModelConfig(backbone=_TINY.backbone, overencoding=dataclasses.replace(
    _OE, engram_vocab_size=[101, 103], max_ngram_size=3, n_embed_per_ngram=64, n_head_per_ngram=4))
_MLA = MLAConfig(q_lora_rank=0, kv_lora_rank=24, qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10)
CONFIGS["mla-dense"] = ModelConfig(backbone=dataclasses.replace(get_preset("tiny-dense").backbone, mla=_MLA,
                                                                n_kv_heads=None))
CONFIGS["G1-4gram-mla-low-rank-query"] = ModelConfig(
    backbone=dataclasses.replace(_G1.backbone, mla=dataclasses.replace(_MLA, q_lora_rank=20), n_kv_heads=None),
    engram=_G1.engram)


def _classify(model: EngramLM) -> dict[str, int]:
    """Count parameters by name, independently of the analytic formulas."""
    out = {"embedding": 0, "head": 0, "tables": 0, "oe_tables": 0, "routed": 0, "other": 0}
    for name, p in model.named_parameters():
        key = ("embedding" if name.startswith("tok_embeddings") else "head" if name.startswith("output")
               else "tables" if name.endswith("engram.embedding.weight") else "routed" if ".experts." in name
               else "oe_tables" if name == "overencoding.embedding.weight" else "other")
        out[key] += p.numel()
    return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_counts_match_the_built_model(name):
    config = CONFIGS[name]
    model = EngramLM(config)
    count = count_parameters(config)
    parts = _classify(model)
    assert count.with_embeddings == sum(p.numel() for p in model.parameters())
    assert (count.embedding, count.head, count.engram_tables, count.routed_experts, count.overencoding_tables) == (
        parts["embedding"], parts["head"], parts["tables"], parts["routed"], parts["oe_tables"])
    assert count.total == parts["tables"] + parts["oe_tables"] + parts["routed"] + parts["other"]
    assert count.sparse == count.total - count.active
    moe = config.backbone.moe
    inactive = 0
    if moe is not None:
        per_expert = parts["routed"] // moe.n_routed_experts
        inactive = (moe.n_routed_experts - moe.top_k) * per_expert
    assert count.active == count.total - parts["tables"] - parts["oe_tables"] - inactive
    engram_dense = sum(p.numel() for n, p in model.named_parameters()
                       if ".engram." in n and not n.endswith("embedding.weight"))
    assert count.engram_dense == engram_dense


@pytest.mark.parametrize("name", ["g1-gqa-4gram-two-layers", "G1-4gram-overencoding", "G1-4gram-no-gate-shared-keys",
                                  "G1-4gram-shared-keys-no-conv", "G1-4gram-demo-biases", "tiny-engram-v41",
                                  "G1-4gram-mla-low-rank-query"])
def test_active_parameters_are_what_one_token_touches(name):
    """One token's backward touches exactly P_act dense/expert weights plus H rows per hashed table."""
    config = CONFIGS[name]
    model = EngramLM(config, sparse_tables=False)  # dense table gradients, to count the rows they touch
    with torch.no_grad():
        for layer in model.engram_layers.values():
            if getattr(layer, "conv_weight", None) is not None:
                layer.conv_weight.normal_()
    model(torch.tensor([[7]])).logits.sum().backward()
    touched = 0
    for name, p in model.named_parameters():
        if name.startswith(("tok_embeddings", "output")) or p.grad is None:
            continue
        if name.endswith("engram.embedding.weight"):
            assert (p.grad.abs().sum(1) > 0).sum() == config.engram.n_heads
            continue
        if name == "overencoding.embedding.weight":
            assert (p.grad.abs().sum(1) > 0).sum() == config.overencoding.n_heads
            continue
        if ".experts." in name:  # whole experts are either used or not
            touched += p[0].numel() * int((p.grad.flatten(1).abs().sum(1) > 0).sum())
            continue
        touched += p.numel()
    assert touched == count_parameters(config).active


def test_flops_by_hand():
    config = ModelConfig(backbone=BackboneConfig(vocab_size=100, n_layers=2, d_model=8, n_heads=2, ffn_hidden=16,
                                                 max_seq_len=10))
    count = count_parameters(config, seq_len=10)
    per_block = 4 * 8 * 8 + 3 * 8 * 16 + 2 * 8
    assert count.active == 2 * per_block + 8
    attention = 2 * 2 * 2 * 8 * (10 + 1) // 2
    assert count.flops_per_token == 2 * (count.active + 8 * 100) + attention
    assert "P_tot" in format_count(count)


def test_engram_share_of_sparse():
    count = count_parameters(get_preset("tiny-engram"))
    assert 0 < count.engram_share_of_sparse < 1
    # 2 orders x 4 heads, primes from 1009 on, rows of width 32 / 4 = 8
    primes = [1009, 1013, 1019, 1021, 1031, 1033, 1039, 1049]  # search starts at size - 1
    assert count.engram_tables == sum(primes) * 8
    assert count.engram_share_of_sparse == pytest.approx(count.engram_tables / count.sparse)
    assert count_parameters(get_preset("tiny-moe")).engram_share_of_sparse == 0


def test_demo_presets_are_iso_parameter():
    """demo-engram vs demo-moe: P_act equal, P_tot within 0.1%, Engram 20% of the sparse budget; the
    backbones differ only in the routed experts and block 0's FFN width (which pays for Engram's dense
    weights)."""
    from engram.presets import get_run_preset

    moe_cfg, eng_cfg = get_run_preset("demo-moe").model, get_run_preset("demo-engram").model
    moe, eng = count_parameters(moe_cfg), count_parameters(eng_cfg)
    assert eng.active == moe.active and eng.flops_per_token == moe.flops_per_token
    assert abs(eng.total / moe.total - 1) <= 0.001
    assert 0.19 <= eng.engram_tables / eng.sparse <= 0.21
    same = lambda c: {k: v for k, v in c.backbone.to_dict().items() if k not in ("moe", "ffn_hidden")}  # noqa: E731
    assert same(moe_cfg) == same(eng_cfg)
    assert eng_cfg.backbone.moe.n_routed_experts < moe_cfg.backbone.moe.n_routed_experts
    assert {k: v for k, v in eng_cfg.backbone.moe.to_dict().items() if k != "n_routed_experts"} == \
        {k: v for k, v in moe_cfg.backbone.moe.to_dict().items() if k != "n_routed_experts"}


def test_the_demo_pair_is_the_tiny_budgets_pure_moe_and_its_rho_08_point():
    """So `make demo` and the `tiny` sweeps (docs/RESULTS.md) speak of the same models and data."""
    from engram.presets import get_run_preset
    from engram.sweeps.plan import plan

    twin, *engrams = plan("init", "tiny", seeds=1)
    reference = next(r for r in engrams if r.info["table_init_std"] == get_run_preset("demo-engram").model.engram.table_init_std)
    moe, eng = get_run_preset("demo-moe"), get_run_preset("demo-engram")
    assert moe.model == twin.run.model and moe.data == twin.run.data
    assert eng.model == reference.run.model and eng.data == reference.run.data
    for field in ("max_steps", "batch_size", "seq_len", "lr", "warmup_steps", "table_lr_mult", "eval_batches"):
        assert getattr(moe.train, field) == getattr(eng.train, field) == getattr(twin.run.train, field), field

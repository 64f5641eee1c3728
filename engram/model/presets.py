"""Named model presets: test-sized models (``PRESETS``) and the paper's Table 1 models (``PAPER_PRESETS``,
counted and built on meta, never materialised here). ``get_preset(name)`` (or ``ModelConfig.from_name``)
gives a fresh ``ModelConfig``; run presets (a model plus data and training) are ``engram.presets``.

A model preset describes a model you can build on its own, so its derived fields (the vocabulary and
the pad id) hold values.
"""

from __future__ import annotations

from engram.model.config import BackboneConfig, MLAConfig, MoEConfig, ModelConfig
from engram.model.table_config import EngramConfig


# -- model presets: unit-test sized (seconds on a CPU) ---------------------------------------------
def _tiny_backbone(moe: bool) -> BackboneConfig:
    return BackboneConfig(
        vocab_size=512, n_layers=4, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=172,
        max_seq_len=256, hc_mult=2,
        moe=MoEConfig(n_routed_experts=8, n_shared_experts=1, top_k=2, expert_hidden=32) if moe else None,
    )


def _tiny_engram() -> ModelConfig:
    return ModelConfig(
        backbone=_tiny_backbone(moe=True),
        engram=EngramConfig(engram_vocab_size=[1009, 1009], max_ngram_size=3, n_embed_per_ngram=32,
                            n_head_per_ngram=4, layer_ids=[1], pad_id=2),
    )


def _tiny_engram_v41() -> ModelConfig:
    """DeepSeek-V4.1's Engram variant (docs/ALGORITHM.md §2b) on the tiny backbone: orders 2..4 with 8 heads each, no
    conv, at the second and last blocks (V4.1 places it at its 2nd and 15th blocks). No barrier ids:
    the tiny vocabulary has no image tokens (set ``model.engram.barrier_ids`` to use them)."""
    return ModelConfig(
        backbone=_tiny_backbone(moe=True),
        engram=EngramConfig(engram_vocab_size=[1009, 1009, 1009], max_ngram_size=4, n_embed_per_ngram=64,
                            n_head_per_ngram=8, layer_ids=[1, 3], pad_id=2, variant="v4.1", short_conv=False,
                            gate_norm_eps=1e-20),  # V4.1's rms_norm_eps
    )


PRESETS = {
    "tiny-dense": lambda: ModelConfig(backbone=_tiny_backbone(moe=False)),
    "tiny-moe": lambda: ModelConfig(backbone=_tiny_backbone(moe=True)),
    "tiny-engram": _tiny_engram,
    "tiny-engram-v41": _tiny_engram_v41,
}


# -- paper-scale model presets (Table 1): described and counted here, built on a cluster -----------------
# What the paper gives (docs/ALGORITHM.md §3): 30 blocks, D = 2560, MLA with 32 heads, mHC with 4 branches, a
# 129,280-id vocabulary, sequence 4,096; DeepSeekMoE with 2 shared + 72 routed experts, top-6, the first block dense;
# Engram at the 2nd and 15th blocks over 2- and 3-grams, 8 heads per order, d_mem = 1280 (d_h = 80), and
# 2,262,400 (27B) / 7,239,680 (40B) nominal rows per head; Table 1's P_tot 4.1B / 26.7B / 26.7B / 39.5B, P_act
# 3.8B, Engram 5.7B / 18.5B. Table 1 counts P_tot with the embedding and the head and P_act without the
# embedding (``ParameterCount.paper_total`` / ``paper_active``; docs/ALGORITHM.md §4's sweeps count neither).
# INFERRED (the paper does not publish them; chosen because they reproduce Table 1 within 1%, see
# docs/DISTRIBUTED.md and tests/model/test_paper_presets.py):
#   - the expert width, 1536 (SwiGLU);
#   - the dense FFN width, 12,288 = 8 x 1536, the MoE's active FFN width (2 shared + 6 routed experts), for
#     Dense-4B's every block and the MoE models' first block;
#   - MLA's dimensions: no low-rank query (as DeepSeek-V2-Lite), a 512-wide KV latent (DeepSeek-V2/V3's),
#     head widths 80 = D / 32 for the no-RoPE query/key part and the value, and a 40-wide RoPE key (half of
#     it, DeepSeek's ratio);
#   - the Engram conv's kernel, 4 (the official demo's), and the pad id, 2 (the demo's).
PAPER_VOCAB = 129_280
PAPER_MLA = MLAConfig(q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=80, qk_rope_head_dim=40, v_head_dim=80)


def _paper_backbone(routed_experts: int | None) -> BackboneConfig:
    moe = None if routed_experts is None else MoEConfig(
        n_routed_experts=routed_experts, n_shared_experts=2, top_k=6, expert_hidden=1536, first_dense_layers=1)
    return BackboneConfig(vocab_size=PAPER_VOCAB, n_layers=30, d_model=2560, n_heads=32, ffn_hidden=12_288,
                          max_seq_len=4096, hc_mult=4, mla=PAPER_MLA, moe=moe)


def _paper_engram(rows_per_head: int) -> EngramConfig:
    return EngramConfig(engram_vocab_size=[rows_per_head, rows_per_head], max_ngram_size=3, n_embed_per_ngram=640,
                        n_head_per_ngram=8, layer_ids=[1, 14], pad_id=2, kernel_size=4)


def _dense_4b() -> ModelConfig:
    """Dense-4B (Table 1): a dense SwiGLU FFN in all 30 blocks.

    Inferred (not published): the FFN width 12,288 (= the MoE's active FFN width, 8 x 1536) and MLA's
    dimensions (``PAPER_MLA``)."""
    return ModelConfig(backbone=_paper_backbone(None))


def _moe_27b() -> ModelConfig:
    """MoE-27B (Table 1): 2 shared + 72 routed experts, top-6, the first block dense.

    Inferred (not published): the expert width 1536, the first block's FFN width 12,288 and MLA's
    dimensions (``PAPER_MLA``)."""
    return ModelConfig(backbone=_paper_backbone(72))


def _engram_27b() -> ModelConfig:
    """Engram-27B (Table 1): MoE-27B with 55 routed experts (rho = 49/66 = 74.2%) and Engram at blocks 2 and
    15: 2 orders x 8 heads of ~2,262,400 rows, d_h = 80.

    Inferred (not published): as MoE-27B, plus the conv kernel 4 and the pad id 2 (the official demo's).
    Its tables come to 5.79B parameters, which Table 1 prints as 5.7B."""
    return ModelConfig(backbone=_paper_backbone(55), engram=_paper_engram(2_262_400))


def _engram_40b() -> ModelConfig:
    """Engram-40B (Table 1): Engram-27B's backbone, 7,239,680 rows per head (18.53B table parameters).

    Inferred (not published): as Engram-27B."""
    return ModelConfig(backbone=_paper_backbone(55), engram=_paper_engram(7_239_680))


# Table 1 as the paper prints it (billions), for ``engram presets`` and the tests
PAPER_TABLE_1 = {
    "dense-4b": {"total": 4.1, "active": 3.8, "engram": None},
    "moe-27b": {"total": 26.7, "active": 3.8, "engram": None},
    "engram-27b": {"total": 26.7, "active": 3.8, "engram": 5.7},
    "engram-40b": {"total": 39.5, "active": 3.8, "engram": 18.5},
}
PAPER_PRESETS = {
    "dense-4b": _dense_4b,
    "moe-27b": _moe_27b,
    "engram-27b": _engram_27b,
    "engram-40b": _engram_40b,
}


def get_preset(name: str) -> ModelConfig:
    """A fresh ModelConfig for a named preset (a test-sized one or a paper-scale one); unknown names list
    the known ones."""
    if name in PRESETS:
        return PRESETS[name]()
    if name in PAPER_PRESETS:
        return PAPER_PRESETS[name]()
    raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS) + sorted(PAPER_PRESETS)}")

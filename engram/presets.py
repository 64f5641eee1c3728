"""Named presets: model presets (``get_preset``) and run presets (``get_run_preset``: a model plus its data
and training settings). ``engram presets`` lists them with their parameter counts.

A model preset describes a model you can build on its own, so its derived fields (the vocabulary and
the pad id) hold values. A run trains on data, which decides them: a run made from a model preset
leaves them unset (``ModelConfig.without_data``), while the demo presets set them to what their data
gives (a byte-level BPE of 4,096 ids whose pad id is 0), so a run with other data says so instead of
silently changing the model.
"""

from __future__ import annotations

from engram.config import BackboneConfig, DataConfig, EngramConfig, ModelConfig, MoEConfig, RunConfig, TrainConfig


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
    """DeepSeek-V4.1's Engram variant (SPEC §2b) on the tiny backbone: orders 2..4 with 8 heads each, no
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


def get_preset(name: str) -> ModelConfig:
    """A fresh ModelConfig for a named preset; unknown names list the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]()


# -- run presets: a model plus its data and training settings -------------------------------------
# The demo pair is the `tiny` sweep budget's pure MoE (rho = 1) and its rho = 0.8 allocation point
# (engram.sweeps.budgets; a test pins the equality of models, data and training but for the evaluation
# schedule): what `make demo` trains on three paired seeds in about 12 minutes with two single-thread
# workers on 2 CPU cores.
def _demo_backbone(n_routed_experts: int, ffn_hidden: int) -> BackboneConfig:
    return BackboneConfig(
        vocab_size=4096, n_layers=4, d_model=128, n_heads=4, ffn_hidden=ffn_hidden, max_seq_len=256, hc_mult=1,
        moe=MoEConfig(n_routed_experts=n_routed_experts, n_shared_experts=1, top_k=2, expert_hidden=64,
                      first_dense_layers=1),
    )


def _demo_train(out: str) -> TrainConfig:
    # the sweeps' 300 steps x 2,048 tokens = 614k tokens per run: about 4 minutes on one core, so six runs
    # take ~12 minutes on two; eval_batches=40 covers the whole validation split (evaluated 5 times)
    return TrainConfig(max_steps=300, batch_size=8, seq_len=256, lr=3e-3, warmup_steps=30, eval_every=60,
                       eval_batches=40, log_every=10, save_every=100, out_dir=out)


def _demo_moe() -> RunConfig:
    """1 shared + 22 routed experts (top-2) in blocks 1-3, a dense FFN in block 0: 2.16M parameters
    (0.69M active) besides the 4,096-id embedding and head."""
    return RunConfig(model=ModelConfig(backbone=_demo_backbone(22, 512)), data=DataConfig(vocab_size=4096),
                     train=_demo_train("runs/demo-moe"))


def _demo_engram() -> RunConfig:
    """demo-moe's iso-parameter twin: 4 of 22 routed experts per MoE block move into Engram tables at
    block 1 (rho = 0.8: 2 x 4 heads of 4,567 rows, width 8, over 2- and 3-grams, with the short conv;
    rows start at N(0, 0.02), the default since issue 17's study).
    Engram's dense weights come out of block 0's FFN (hidden 471), so P_act is equal, exactly, and P_tot
    within 0.01%."""
    engram = EngramConfig(engram_vocab_size=[4567, 4567], max_ngram_size=3, n_embed_per_ngram=32,
                          n_head_per_ngram=4, layer_ids=[1], pad_id=0, kernel_size=4)
    return RunConfig(model=ModelConfig(backbone=_demo_backbone(18, 471), engram=engram),
                     data=DataConfig(vocab_size=4096), train=_demo_train("runs/demo-engram"))


RUN_PRESETS = {
    "demo-moe": _demo_moe,
    "demo-engram": _demo_engram,
}


def get_run_preset(name: str) -> RunConfig:
    """A RunConfig by name: a run preset, or a model preset with default data and training settings
    (its vocabulary and pad id then come from the data)."""
    if name in RUN_PRESETS:
        return RUN_PRESETS[name]()
    if name in PRESETS:
        return RunConfig(model=PRESETS[name]().without_data(), train=TrainConfig(out_dir=f"runs/{name}"))
    raise ValueError(f"unknown preset {name!r}; known presets: {sorted(RUN_PRESETS) + sorted(PRESETS)}")

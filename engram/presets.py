"""Named presets: model presets (``get_preset``) and run presets (``get_run_preset``: a model plus its data
and training settings). ``engram presets`` lists them with their parameter counts.

A model preset describes a model you can build on its own, so its derived fields (the vocabulary and
the pad id) hold values. A run trains on data, which decides them: a run made from a model preset
leaves them unset (``ModelConfig.without_data``), while the demo presets set them to what their data
gives (a byte-level BPE of 8,192 ids whose pad id is 0), so a run with other data says so instead of
silently changing the model.
"""

from __future__ import annotations

from engram.config import BackboneConfig, EngramConfig, ModelConfig, MoEConfig, RunConfig, TrainConfig


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


PRESETS = {
    "tiny-dense": lambda: ModelConfig(backbone=_tiny_backbone(moe=False)),
    "tiny-moe": lambda: ModelConfig(backbone=_tiny_backbone(moe=True)),
    "tiny-engram": _tiny_engram,
}


def get_preset(name: str) -> ModelConfig:
    """A fresh ModelConfig for a named preset; unknown names list the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name]()


# -- run presets: a model plus its data and training settings -------------------------------------
def _demo_backbone(n_routed_experts: int) -> BackboneConfig:
    return BackboneConfig(
        vocab_size=8192, n_layers=6, d_model=192, n_heads=6, ffn_hidden=512, max_seq_len=512, hc_mult=1,
        moe=MoEConfig(n_routed_experts=n_routed_experts, n_shared_experts=1, top_k=2, expert_hidden=128,
                      first_dense_layers=1),
    )


def _demo_train(out: str) -> TrainConfig:
    # 400 steps x 2,048 tokens = 819k tokens: ~7 minutes per model on 2 CPU cores.
    return TrainConfig(max_steps=400, batch_size=8, seq_len=256, lr=3e-3, warmup_steps=40, eval_every=50,
                       eval_batches=8, log_every=10, save_every=100, out_dir=out)


def _demo_moe() -> RunConfig:
    return RunConfig(model=ModelConfig(backbone=_demo_backbone(16)), train=_demo_train("runs/demo/demo-moe"))


def _demo_engram() -> RunConfig:
    """demo-moe's iso-parameter twin: 3 of 16 routed experts per MoE block (1.11M parameters, 21% of the
    sparse budget) move into Engram tables at block 1; memory width 48 keeps P_act within 1%."""
    engram = EngramConfig(engram_vocab_size=[22613, 22613], max_ngram_size=3, n_embed_per_ngram=24,
                          n_head_per_ngram=3, layer_ids=[1], pad_id=0)
    return RunConfig(model=ModelConfig(backbone=_demo_backbone(13), engram=engram),
                     train=_demo_train("runs/demo/demo-engram"))


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

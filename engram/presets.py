"""Named presets: model presets (``get_preset``, defined in ``engram.model.presets``) and run presets
(``get_run_preset``: a model plus its data and training settings), and the paper's training recipe
(``paper_train``). ``engram presets`` lists them with their parameter counts.

A model preset describes a model you can build on its own, so its derived fields (the vocabulary and
the pad id) hold values. A run trains on data, which decides them: a run made from a model preset
leaves them unset (``ModelConfig.without_data``), while the demo presets set them to what their data
gives (a byte-level BPE of 4,096 ids whose pad id is 0), so a run with other data says so instead of
silently changing the model.
"""

from __future__ import annotations

from engram.data.config import DataConfig
from engram.model.config import BackboneConfig, MLAConfig, MoEConfig, ModelConfig  # noqa: F401 (MLAConfig: as before)
from engram.model.presets import PAPER_MLA, PAPER_PRESETS, PAPER_TABLE_1, PAPER_VOCAB, PRESETS, get_preset
from engram.model.table_config import EngramConfig
from engram.train.config import (CheckpointConfig, EvalConfig, OptimConfig, PlacementConfig, RunConfig,
                                 ScheduleConfig, TrainConfig)

__all__ = ["PAPER_MLA", "PAPER_PRESETS", "PAPER_TABLE_1", "PAPER_VOCAB", "PRESETS", "RUN_PRESETS", "get_preset",
           "get_run_preset", "paper_train"]


def paper_train(name: str) -> TrainConfig:
    """The paper's training recipe for a paper preset: Muon at base LR 4e-4 with weight decay 0.1 and step
    decay (tables: Adam at 5x, no decay), sequences of 4,096, 262B tokens, FSDP2 on CUDA. INFERRED: the
    global batch (1,024 sequences = 4.2M tokens, so 62,500 steps), warmup (2,000 steps) and the decay
    points (DeepSeek-V3's step decay at 80% and 90% by 0.316)."""
    return TrainConfig(max_steps=62_500, batch_size=1024, seq_len=4096, log_every=10, out_dir=f"runs/{name}",
                       optim=OptimConfig(name="muon", lr=4e-4, weight_decay=0.1),
                       schedule=ScheduleConfig(warmup_steps=2000), eval=EvalConfig(every=1000, batches=16),
                       checkpoint=CheckpointConfig(every=1000), placement=PlacementConfig(device="cuda", parallel="fsdp"))


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
    return TrainConfig(max_steps=300, batch_size=8, seq_len=256, log_every=10, out_dir=out,
                       optim=OptimConfig(lr=3e-3), schedule=ScheduleConfig(warmup_steps=30),
                       eval=EvalConfig(every=60, batches=40), checkpoint=CheckpointConfig(every=100))


def _demo_moe() -> RunConfig:
    """1 shared + 22 routed experts (top-2) in blocks 1-3, a dense FFN in block 0: 2.16M parameters
    (0.69M active) besides the 4,096-id embedding and head."""
    return RunConfig(model=ModelConfig(backbone=_demo_backbone(22, 512)), data=DataConfig(vocab_size=4096),
                     train=_demo_train("runs/demo-moe"))


def _demo_engram() -> RunConfig:
    """demo-moe's iso-parameter twin: 4 of 22 routed experts per MoE block move into Engram tables at
    block 1 (rho = 0.8: 2 x 4 heads of 4,567 rows, width 8, over 2- and 3-grams, with the short conv;
    rows start at N(0, 0.02), the default since the table-init study, docs/RESULTS.md §4).
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
    if name in PAPER_PRESETS:
        return RunConfig(model=PAPER_PRESETS[name]().without_data(), data=DataConfig(vocab_size=PAPER_VOCAB),
                         train=paper_train(name))
    raise ValueError(f"unknown preset {name!r}; known presets: "
                     f"{sorted(RUN_PRESETS) + sorted(PRESETS) + sorted(PAPER_PRESETS)}")

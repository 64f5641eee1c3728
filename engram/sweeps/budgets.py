"""Named budgets for the paper's experiments: a pure-MoE base run (rho = 1) plus the Engram template.

Within a budget P_tot, P_act, data and hyper-parameters are fixed (docs/ALGORITHM.md §4); the sweeps only move
weights between routed experts and Engram rows (allocation), grow the tables of a fixed backbone
(memory) or switch parts of the module off at a fixed table budget (ablation).

``tiny`` is sized for a 2-core CPU: one run is ~600k tokens and takes about 4 minutes on one core, so
the allocation sweep (7 rho values x 3 seeds) finishes in about 45 minutes with two workers. ``small``
and ``medium`` are defined for GPUs (bf16 autocast, longer runs); they have not been run on a CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from engram.data.config import DataConfig
from engram.model.config import BackboneConfig, MoEConfig, ModelConfig
from engram.model.table_config import EngramConfig
from engram.train.config import RunConfig, TrainConfig
from engram.model.accounting import count_parameters
from engram.presets import PAPER_MLA, PAPER_VOCAB


@dataclass(frozen=True)
class Budget:
    """A budget: the rho = 1 run, the Engram template and the grids of the sweeps.

    memory_rows: rows per head for the memory sweep (a log grid), added to the fixed rho = 1 backbone.
    ablation_rho: the allocation point whose Engram table budget the ablations keep fixed.
    """

    name: str
    description: str
    base: Callable[[], RunConfig]
    engram: Callable[[], EngramConfig]
    rhos: tuple[float, ...]
    memory_rows: tuple[int, ...]
    ablation_rho: float
    layer_sweep: tuple[int, ...]
    seeds: int = 3

    def base_run(self) -> RunConfig:
        return self.base()

    def engram_template(self) -> EngramConfig:
        return self.engram()


def _tiny_base() -> RunConfig:
    backbone = BackboneConfig(
        vocab_size=4096, n_layers=4, d_model=128, n_heads=4, ffn_hidden=512, max_seq_len=256, hc_mult=1,
        moe=MoEConfig(n_routed_experts=22, n_shared_experts=1, top_k=2, expert_hidden=64, first_dense_layers=1))
    # 300 steps x 2,048 tokens = 614k tokens per run.
    train = TrainConfig(max_steps=300, batch_size=8, seq_len=256, lr=3e-3, warmup_steps=30, eval_every=150,
                        eval_batches=40, log_every=10, save_every=100, device="cpu")
    return RunConfig(model=ModelConfig(backbone=backbone), data=DataConfig(vocab_size=4096), train=train)


def _tiny_engram() -> EngramConfig:
    # d_h = 8, H = 8 heads, memory width 64 = D/2 (the paper: 1280 for D = 2560)
    return EngramConfig(engram_vocab_size=[1000, 1000], max_ngram_size=3, n_embed_per_ngram=32, n_head_per_ngram=4,
                        layer_ids=[1], pad_id=0, kernel_size=4)


def _gpu_base(d_model: int, n_layers: int, n_heads: int, experts: int, expert_hidden: int, steps: int,
              batch: int) -> RunConfig:
    backbone = BackboneConfig(
        vocab_size=8192, n_layers=n_layers, d_model=d_model, n_heads=n_heads, ffn_hidden=4 * d_model,
        max_seq_len=1024, hc_mult=4,
        moe=MoEConfig(n_routed_experts=experts, n_shared_experts=2, top_k=6, expert_hidden=expert_hidden,
                      first_dense_layers=1))
    train = TrainConfig(max_steps=steps, batch_size=batch, seq_len=1024, lr=2e-3, warmup_steps=steps // 50,
                        eval_every=steps // 10, eval_batches=32, log_every=50, save_every=steps // 10,
                        device="cuda")
    return RunConfig(model=ModelConfig(backbone=backbone), data=DataConfig(vocab_size=8192), train=train)


def _gpu_engram(d_model: int) -> EngramConfig:
    # memory width D/2 as in the paper (16 heads of d_h = D/32); placeholder sizes are solved per rho
    return EngramConfig(engram_vocab_size=[1000, 1000], max_ngram_size=3, n_embed_per_ngram=d_model // 4,
                        n_head_per_ngram=8, layer_ids=[1], pad_id=0, kernel_size=4)


# -- the paper's two sparsity-allocation compute points (docs/ALGORITHM.md §3; Figure 3) ------------------------
# Given: C = 2e20 FLOPs with P_tot 5.7B, P_act 568M and 106 routed experts at rho = 1, and C = 6e20 with 9.9B,
# 993M and 99 experts (counted as docs/ALGORITHM.md §4 does: without the embedding and the head). INFERRED (not
# published; chosen to reproduce those counts within 0.1% in the paper models' family: the paper presets'
# MLA (80-wide heads), mHC with 4 branches, 2 shared experts, top-6, the first block dense, the 129,280-id
# vocabulary): the depth, the width, the expert width and the first block's FFN width (``_paper_budget``'s
# calls below). Tokens follow from C: steps = C / (3 x forward FLOPs per token x tokens per step).
def _paper_budget_base(flops: float, d_model: int, n_layers: int, experts: int, expert_hidden: int,
                       ffn_hidden: int) -> RunConfig:
    backbone = BackboneConfig(
        vocab_size=PAPER_VOCAB, n_layers=n_layers, d_model=d_model, n_heads=d_model // 80,  # 80-wide heads
        ffn_hidden=ffn_hidden, max_seq_len=4096, hc_mult=4, mla=PAPER_MLA,
        moe=MoEConfig(n_routed_experts=experts, n_shared_experts=2, top_k=6, expert_hidden=expert_hidden,
                      first_dense_layers=1))
    batch, seq = 256, 4096
    per_token = 3 * count_parameters(ModelConfig(backbone=backbone), seq).flops_per_token
    steps = round(flops / (per_token * batch * seq))
    train = TrainConfig(max_steps=steps, batch_size=batch, seq_len=seq, lr=4e-4, weight_decay=0.1,
                        warmup_steps=steps // 50, eval_every=steps // 10, eval_batches=32, log_every=50,
                        save_every=steps // 20, optimizer="muon", parallel="fsdp", device="cuda")
    return RunConfig(model=ModelConfig(backbone=backbone), data=DataConfig(vocab_size=PAPER_VOCAB), train=train)


def _paper_budget_engram(d_model: int) -> EngramConfig:
    # d_mem = D / 2 over 2 orders x 8 heads, at the 2nd block; placeholder rows are solved per rho
    return EngramConfig(engram_vocab_size=[1000, 1000], max_ngram_size=3, n_embed_per_ngram=d_model // 4,
                        n_head_per_ngram=8, layer_ids=[1], pad_id=2, kernel_size=4)


PAPER_BUDGETS = {  # name -> (FLOPs, given P_tot, given P_act, given routed experts at rho = 1)
    "paper-2e20": (2e20, 5.7e9, 568e6, 106),
    "paper-6e20": (6e20, 9.9e9, 993e6, 99),
}


def _paper_budget(name: str, d_model: int, n_layers: int, expert_hidden: int, ffn_hidden: int,
                  layer_sweep: tuple[int, ...]) -> Budget:
    """The budget of one of ``PAPER_BUDGETS``' compute points, with the inferred shape given here."""
    flops, total, active, experts = PAPER_BUDGETS[name]
    return Budget(
        name=name, description=f"the paper's {name.removeprefix('paper-')}-FLOPs point: D={d_model}, {n_layers} blocks, MLA, mHC G=4, "
                               f"2 shared + {experts} routed experts of {expert_hidden} (top-6); P_tot "
                               f"{total / 1e9:g}B, P_act {active / 1e6:g}M",
        base=lambda: _paper_budget_base(flops, d_model, n_layers, experts, expert_hidden, ffn_hidden),
        engram=lambda: _paper_budget_engram(d_model), rhos=(1.0, 0.9, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4),
        memory_rows=(16_384, 65_536, 262_144, 655_360), ablation_rho=0.8, layer_sweep=layer_sweep, seeds=1)


BUDGETS: dict[str, Budget] = {
    "tiny": Budget(
        name="tiny", description="CPU: D=128, 4 blocks, 22 routed experts (top-2), 614k tokens per run",
        base=_tiny_base, engram=_tiny_engram, rhos=(1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4),
        memory_rows=(1024, 4096, 16384, 65536), ablation_rho=0.8, layer_sweep=(0, 1, 2, 3), seeds=3),
    "small": Budget(
        name="small", description="GPU: D=512, 12 blocks, mHC G=4, 38 routed experts (top-6), 1.3B tokens",
        base=lambda: _gpu_base(512, 12, 8, 38, 256, steps=20_000, batch=64), engram=lambda: _gpu_engram(512),
        rhos=(1.0, 0.9, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4), memory_rows=(2**14, 2**16, 2**18, 2**20, 2**22),
        ablation_rho=0.8, layer_sweep=(0, 1, 2, 4, 6, 8), seeds=3),
    "medium": Budget(
        name="medium", description="GPU: D=1024, 16 blocks, mHC G=4, 38 routed experts (top-6), 5.2B tokens",
        base=lambda: _gpu_base(1024, 16, 16, 38, 512, steps=40_000, batch=128), engram=lambda: _gpu_engram(1024),
        rhos=(1.0, 0.9, 0.8, 0.75, 0.7, 0.6, 0.5, 0.4), memory_rows=(2**16, 2**18, 2**20, 2**22, 2**24),
        ablation_rho=0.8, layer_sweep=(0, 1, 2, 4, 8, 12), seeds=2),
    "paper-2e20": _paper_budget("paper-2e20", d_model=1280, n_layers=20, expert_hidden=704, ffn_hidden=7040,
                                layer_sweep=(1, 2, 5, 10)),
    "paper-6e20": _paper_budget("paper-6e20", d_model=1920, n_layers=14, expert_hidden=1280, ffn_hidden=8192,
                                layer_sweep=(1, 2, 4, 7)),
}


BUDGET_FIELDS = ("name", "description", "base", "engram", "rhos", "memory_rows", "ablation_rho", "layer_sweep", "seeds")


def budget_to_dict(budget: Budget) -> dict:
    """A budget as plain JSON (the form ``--budget FILE.json`` reads)."""
    return {"name": budget.name, "description": budget.description, "base": budget.base_run().to_dict(),
            "engram": budget.engram_template().to_dict(), "rhos": list(budget.rhos),
            "memory_rows": list(budget.memory_rows), "ablation_rho": budget.ablation_rho,
            "layer_sweep": list(budget.layer_sweep), "seeds": budget.seeds}


def budget_from_dict(data: dict) -> Budget:
    unknown = sorted(set(data) - set(BUDGET_FIELDS))
    missing = sorted(set(BUDGET_FIELDS) - set(data) - {"description", "seeds"})
    if unknown or missing:
        raise ValueError(f"budget: unknown field(s) {unknown}, missing field(s) {missing}; fields: {list(BUDGET_FIELDS)}")
    base, engram = RunConfig.from_dict(data["base"]), EngramConfig.from_dict(data["engram"])  # validate now
    name = data["name"]
    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"budget.name must be a non-empty string without '/', got {name!r}")
    return Budget(name=name, description=data.get("description", ""),
                  base=lambda: RunConfig.from_dict(base.to_dict()),
                  engram=lambda: EngramConfig.from_dict(engram.to_dict()),
                  rhos=tuple(float(r) for r in data["rhos"]), memory_rows=tuple(int(r) for r in data["memory_rows"]),
                  ablation_rho=float(data["ablation_rho"]), layer_sweep=tuple(int(x) for x in data["layer_sweep"]),
                  seeds=int(data.get("seeds", 3)))


def get_budget(name: str) -> Budget:
    """A named budget, or one read from a JSON file (``budget_to_dict``'s format) when ``name`` is a path."""
    if name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"budget file {name} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"budget file {name} is not valid JSON: {err}") from None
        return budget_from_dict(data)
    if name not in BUDGETS:
        raise ValueError(f"unknown budget {name!r}; known budgets: {sorted(BUDGETS)} (or a budget .json file)")
    return BUDGETS[name]

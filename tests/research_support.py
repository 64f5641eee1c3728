"""Helpers shared by the tests of the research tools (``engram.sweeps``, ``engram.analysis``), importable
as ``research_support`` (pyproject puts tests/ on pythonpath; see support.py for why not conftest)."""

import dataclasses
import math

import numpy as np
import torch

from engram.config import ModelConfig
from engram.model.transformer import EngramLM
from engram.presets import get_preset

# -- synthetic sweep results (what the runner writes to result.json) --------------------------------

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PARAMS = {"total": 1000, "active": 400, "sparse": 600, "routed_experts": 500, "engram_tables": 100,
          "overencoding_tables": 0}


def fake_run(sweep, point, seed, loss, **extra):
    return {"sweep": sweep, "budget": "tiny", "point": point, "seed": seed, "val_loss": float(loss),
            "val_bpb": loss / 2.7, "tokens": 614400, "train_seconds": 1.0, "params": dict(PARAMS), **extra}


def fake_allocation(curve, seeds=3, noise=0.0, rhos=(0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0), seed=1):
    rng = np.random.default_rng(seed)
    return [fake_run("allocation", f"rho={rho:.2f}", s, curve(rho) + noise * rng.standard_normal(), rho=rho)
            for rho in rhos for s in range(seeds)]


def fake_memory(seeds=2):
    out = [fake_run("memory", "none", s, 4.0 + 0.01 * s, method="none", table_params=0) for s in range(seeds)]
    for method, slope in (("engram", -0.02), ("overencoding", -0.01)):
        for rows in (1024, 4096, 16384):
            tp = rows * 64
            out += [fake_run("memory", f"{method}/rows={rows}", s, 3.9 + slope * math.log2(tp / 65536) + 0.01 * s,
                             method=method, table_params=tp) for s in range(seeds)]
    return out


def fake_ablation(seeds=2):
    out = [fake_run("ablation", "full", s, 3.90 + 0.02 * s, variant="full", group="component", layer=1)
           for s in range(seeds)]
    for name, d in (("no-gate", 0.05), ("no-conv", 0.005)):
        out += [fake_run("ablation", name, s, 3.90 + 0.02 * s + d, variant=name, group="component")
                for s in range(seeds)]
    for layer, d in ((0, 0.03), (2, -0.01), (10, 0.02)):
        out += [fake_run("ablation", f"layer={layer}", s, 3.90 + 0.02 * s + d, variant=f"layer={layer}",
                         group="layer") for s in range(seeds)]
    return out


def fake_init(seeds=range(3), effects=None):
    """The init sweep: a pure-MoE twin and three table inits, a per-seed offset common to every point."""
    effects = effects or {1.0: -0.03, 0.02: -0.05, 0.0: -0.04}
    out = [fake_run("init", "pure-moe", s, 4.30 + 0.02 * s, variant="pure-moe", table_init_std=None)
           for s in seeds]
    for std, d in effects.items():
        out += [fake_run("init", f"table_std={std:g}", s, 4.30 + 0.02 * s + d + 0.001 * (s % 2), variant=f"table_std={std:g}",
                         table_init_std=std) for s in seeds]
    return out


def is_png(path):
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_MAGIC


# -- tiny models for the analysis hooks -------------------------------------------------------------

def tiny_model(name="tiny-engram", **engram) -> EngramLM:
    config = get_preset(name)
    if engram:
        config = ModelConfig(backbone=config.backbone, engram=dataclasses.replace(config.engram, **engram))
    model = EngramLM(config).eval()
    with torch.no_grad():  # make the conv non-trivial so Y is not just the gated value
        for layer in model.engram_layers.values():
            if getattr(layer, "conv_weight", None) is not None:
                layer.conv_weight.normal_(std=0.3)
    return model


def random_ids(B=2, T=24):
    return torch.randint(3, 512, (B, T))

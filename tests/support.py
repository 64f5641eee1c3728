"""Helpers shared by test modules, importable as ``support`` (pyproject puts tests/ on pythonpath).

Test directories have no __init__.py, so ``from conftest import ...`` would resolve to whichever
conftest.py was imported first; helpers live here under a unique name instead.
"""

import random

import torch

from engram.config import DataConfig, RunConfig, TrainConfig, get_preset


def devices() -> list[str]:
    """CPU always; CUDA too when present (GPU cases skip cleanly otherwise)."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def write_corpus(root, n_files=24, seed=0):
    """A few KB of learnable, Python-like text in many small files (documents)."""
    rng = random.Random(seed)
    names = ["alpha", "beta", "gamma", "delta", "omega"]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = []
        for j in range(rng.randint(6, 12)):
            name = rng.choice(names)
            lines.append(f"def {name}_{j}(x):\n    return x + {j} * {name}_{j - 1}(x)\n")
        (root / f"mod_{i:03d}.py").write_text("".join(lines))
    return root


def tiny_run(corpus_dir, cache_dir, out_dir, **train) -> RunConfig:
    settings = dict(max_steps=12, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=4,
                    eval_batches=2, log_every=1, save_every=4, out_dir=str(out_dir))
    settings.update(train)
    return RunConfig(model=get_preset("tiny-engram"),
                     data=DataConfig(source=str(corpus_dir), vocab_size=300, val_fraction=0.2, cache_dir=str(cache_dir)),
                     train=TrainConfig(**settings))

import random

import pytest
import torch

from engram.config import DataConfig, RunConfig, TrainConfig, get_preset
from engram.model.transformer import EngramLM
from engram.storage import export_tables


def build_model(seed: int = 0) -> EngramLM:
    config = get_preset("tiny-engram")
    if seed:
        config.engram.seed = seed
    torch.manual_seed(seed)
    return EngramLM(config).eval()


@pytest.fixture(scope="session")
def model_builder():
    """build_model(seed) for tests (a fixture, so tests need not import this conftest by name)."""
    return build_model


@pytest.fixture(scope="session")
def tables(tmp_path_factory):
    """(the untouched model's state_dict, the tables directory exported from it)."""
    model = build_model()
    directory = tmp_path_factory.mktemp("tables")
    export_tables(model, directory)
    return model.state_dict(), directory


@pytest.fixture(scope="session")
def fresh_model(tables):
    """A new tiny Engram model equal to the exported one."""
    def make() -> EngramLM:
        model = build_model()
        model.load_state_dict(tables[0])
        return model
    return make


def write_corpus(root, n_files=24, seed=0):
    """A few KB of learnable, Python-like text in many small files (documents)."""
    rng = random.Random(seed)
    names = ["alpha", "beta", "gamma", "delta", "omega"]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = [f"def {(n := rng.choice(names))}_{j}(x):\n    return x + {j} * {n}_{j - 1}(x)\n"
                 for j in range(rng.randint(6, 12))]
        (root / f"mod_{i:03d}.py").write_text("".join(lines))
    return root


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """A tiny trained Engram checkpoint (a few steps: enough for non-trivial tables)."""
    from engram.train import train

    root = tmp_path_factory.mktemp("storage_run")
    run = RunConfig(model=get_preset("tiny-engram"),
                    data=DataConfig(source=str(write_corpus(root / "corpus")), vocab_size=300, val_fraction=0.2,
                                    cache_dir=str(root / "cache")),
                    train=TrainConfig(max_steps=4, batch_size=2, seq_len=32, lr=3e-3, warmup_steps=1, eval_every=4,
                                      eval_batches=1, log_every=1, save_every=4, out_dir=str(root / "run")))
    return train(run, progress=False).checkpoint

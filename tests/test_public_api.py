import torch

import engram


def test_top_level_names_work_together():
    config = engram.ModelConfig.from_name("tiny-engram")
    tok = engram.CompressedTokenizer.identity(config.backbone.vocab_size)
    model = engram.EngramLM(config, tok)
    ids = torch.randint(0, 512, (1, 8))
    out = model(ids, labels=ids)
    assert isinstance(out, engram.LMOutput) and out.logits.shape == (1, 8, 512) and out.loss.ndim == 0
    hashes = engram.NgramHasher(config.engram, tok)(ids)
    assert set(hashes) == set(config.engram.layer_ids)
    assert engram.count_parameters(config).with_embeddings == sum(p.numel() for p in model.parameters())
    assert set(engram.__all__) <= set(dir(engram))


def test_names_that_moved_still_resolve_or_say_where_they_went():
    import subprocess
    import sys

    import pytest

    import engram.config as config
    import engram.train
    from engram.model.matrices import MATRICES
    from engram.train import optim

    assert engram.train.checkpoint.__name__ == "engram.train.checkpoint"  # submodules, as when they loaded eagerly
    assert engram.train.loop.run_loop is engram.train.run_loop and "checkpoint" in dir(engram.train)
    assert optim.MATRICES is MATRICES
    assert config.ModelConfig.from_name("tiny-dense") == config.get_preset("tiny-dense")
    assert config.apply_overrides is __import__("engram.cli.overrides", fromlist=["x"]).apply_overrides
    with pytest.raises(AttributeError, match="engram.compat.deepseek.DEMO_MODULE"):
        from engram.model import engram as module

        module.DEMO_MODULE
    with pytest.raises(AttributeError, match="engram.model.table_config.TableConfig"):
        engram.hashing.TableConfig
    # a placement writes checkpoints whatever was imported first (the checkpoint files register on import)
    probe = ("import engram.distributed.parallelize as p, engram.distributed.checkpoint as c; "
             "print(type(c.registered_checkpoint_files()).__name__)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "CheckpointFiles"

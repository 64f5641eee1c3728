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

"""LogitLens (engram.analysis.logit_lens)."""

import pytest
import torch
from research_support import random_ids, tiny_model

from engram.analysis.logit_lens import logit_lens


@pytest.mark.parametrize("name", ["tiny-engram", "tiny-moe"])
def test_logit_lens_kl_of_the_last_block_is_zero(name):
    model = tiny_model(name)
    kl = logit_lens(model, [(random_ids(), None), (random_ids(1, 16), torch.zeros(1, 16, dtype=torch.bool))])
    assert len(kl) == 4
    assert abs(kl[-1]) < 1e-6
    assert all(k > 0 for k in kl[:-1])

"""Linear CKA with the unbiased HSIC, the alignment index, CKA between two models (engram.analysis.cka)."""

import numpy as np
import pytest
import torch
from research_support import random_ids, tiny_model

from engram.analysis.cka import MinibatchCKA, alignment_index, cka_between, linear_cka


def test_cka_of_a_representation_with_itself_is_one():
    x = torch.randn(300, 32)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-6)
    assert linear_cka(x, x, minibatch=100) == pytest.approx(1.0, abs=1e-6)


def test_cka_is_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    x = torch.randn(400, 24, dtype=torch.float64)
    y = x @ torch.randn(24, 16, dtype=torch.float64) + 0.5 * torch.randn(400, 16, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(24, 24, dtype=torch.float64))
    base = linear_cka(x, y, minibatch=100)
    assert 0.2 < base < 0.99
    assert linear_cka(x @ q, y, minibatch=100) == pytest.approx(base, abs=1e-9)
    assert linear_cka(7.5 * x, y, minibatch=100) == pytest.approx(base, abs=1e-9)
    assert linear_cka(x, 0.01 * y, minibatch=100) == pytest.approx(base, abs=1e-9)


def test_unbiased_cka_of_independent_features_is_near_zero():
    x, y = torch.randn(2048, 64), torch.randn(2048, 64)
    assert abs(linear_cka(x, y, minibatch=256)) < 0.02


def test_minibatch_cka_is_a_layer_by_layer_matrix():
    x = torch.randn(3, 128, 8)
    cka = MinibatchCKA()
    cka.update(x, x[[2, 0]])
    S = cka.compute()
    assert S.shape == (3, 2)
    torch.testing.assert_close(S[2, 0].item(), 1.0)
    torch.testing.assert_close(S[0, 1].item(), 1.0)
    with pytest.raises(ValueError, match="no minibatch"):
        MinibatchCKA().compute()


def test_alignment_index_on_a_hand_made_matrix():
    # rows: baseline layers 1..6, columns: Engram layers 1..2
    S = np.array([[0.9, 0.1],
                  [0.5, 0.2],
                  [0.2, 0.3],
                  [0.1, 0.4],
                  [0.0, 0.6],
                  [0.05, 0.8]])
    a = alignment_index(S)
    # column 1: top-5 rows 1,2,3,4,6 (0.05 beats 0.0)
    assert a[0] == pytest.approx((0.9 * 1 + 0.5 * 2 + 0.2 * 3 + 0.1 * 4 + 0.05 * 6) / (0.9 + 0.5 + 0.2 + 0.1 + 0.05))
    # column 2: top-5 rows 6,5,4,3,2
    assert a[1] == pytest.approx((0.8 * 6 + 0.6 * 5 + 0.4 * 4 + 0.3 * 3 + 0.2 * 2) / 2.3)
    assert alignment_index(S[:3], top=5)[0] == pytest.approx((0.9 + 1.0 + 0.6) / 1.6)  # fewer rows: all of them
    assert alignment_index(np.eye(4), top=1).tolist() == [1, 2, 3, 4]


def test_cka_between_a_model_and_itself_has_a_unit_diagonal():
    model = tiny_model()
    S = cka_between(model, model, [(random_ids(4, 33), None)], minibatch=64)
    assert S.shape == (4, 4)
    np.testing.assert_allclose(np.diag(S), 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="no batch holds a minibatch of 129 tokens"):
        cka_between(model, model, [(random_ids(4, 33), None)], minibatch=129)  # 4 x 32 tokens per batch

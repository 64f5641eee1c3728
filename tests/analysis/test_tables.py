"""Table statistics: Zipf fit, collision rates and their controls, n-gram tuples, functional controls."""

import dataclasses

import numpy as np
import pytest
import torch

from engram.analysis.tables import (collision_stats, expected_random_collision, fit_zipf, ngram_tuples, plot_row_usage,
                                    shared_rows, table_control, table_control_losses, table_statistics)
from engram.model.transformer import EngramLM
from engram.presets import get_preset


@pytest.fixture(scope="module")
def model():
    """Untrained, with N(0, 1) rows (the reference init) so that the controls move the loss visibly; the
    default N(0, 0.02) rows of an untrained model change it by less than the rounding of the losses."""
    config = get_preset("tiny-engram")  # block 2, orders 2-3, 4 heads each, ~1009 rows per head
    config = dataclasses.replace(config, engram=dataclasses.replace(config.engram, table_init_std=1.0))
    torch.manual_seed(0)
    return EngramLM(config).eval()


def batches(n=3, B=4, T=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        boundary = torch.zeros(B, T, dtype=torch.bool)
        boundary[:, 0] = boundary[:, T // 2] = True
        out.append((torch.randint(3, 512, (B, T), generator=g), boundary))
    return out


@pytest.mark.parametrize("s", [0.8, 1.0, 1.3])
def test_zipf_fit_recovers_a_known_exponent(s):
    ranks = np.arange(1, 3001)
    counts = np.round(1e6 * ranks ** -s)
    fit = fit_zipf(np.random.default_rng(0).permutation(counts))  # order does not matter
    assert fit.exponent == pytest.approx(s, abs=0.01)
    assert fit.ranks == int((counts >= 3).sum())
    assert np.isnan(fit_zipf(np.array([5, 1, 1])).exponent)  # too few ranks to fit


def test_shared_rows_and_collision_stats():
    assert shared_rows(np.array([4, 7, 4, 9])).tolist() == [True, False, True, False]
    rows = np.array([[0, 1], [0, 2], [3, 2], [5, 6]])
    stats = collision_stats(rows)
    assert stats["per_head"] == [0.5, 0.5] and stats["all_heads"] == 0.25  # only n-gram 1 collides in both
    assert stats["same_rows"] == 0  # ... but with two different n-grams, so the pair of rows tells it apart
    assert collision_stats(np.array([[0, 1], [0, 1], [3, 2]]))["same_rows"] == pytest.approx(2 / 3)


def test_controls_capacity_one_collides_always_a_huge_random_table_almost_never():
    m = 2000
    assert collision_stats(np.zeros((m, 4), dtype=np.int64)) == {"per_head": [1.0] * 4, "all_heads": 1.0,
                                                                 "same_rows": 1.0}
    huge = np.random.default_rng(0).integers(0, 10**12, (m, 4))
    stats = collision_stats(huge)
    assert max(stats["per_head"]) < 1e-3 and stats["all_heads"] == stats["same_rows"] == 0
    assert expected_random_collision(m, 10**12) < 1e-8
    assert expected_random_collision(2, 1) == 1.0


def test_ngram_tuples_are_the_compressed_suffixes_with_pads_at_document_starts(model):
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    boundary = torch.tensor([[True, False, False, True, False]])
    tup = ngram_tuples(model.hasher, ids, boundary)[0]
    c = model.hasher.compress(ids)[0].tolist()
    pad = model.hasher.compressed_pad_id
    assert tup.tolist() == [[c[0], pad, pad], [c[1], c[0], pad], [c[2], c[1], c[0]], [c[3], pad, pad],
                            [c[4], c[3], pad]]


def test_table_statistics_of_the_real_hash_match_a_random_one(model):
    stats = table_statistics(model, batches())
    usage = stats.pop("_usage")
    assert stats["tokens"] == 3 * 4 * 64 and list(stats["layers"]) == ["2"]
    for n in ("2", "3"):
        s = stats["layers"]["2"][n]
        assert s["distinct_ngrams"] > 300
        assert s["capacity_1"]["per_head"] == [1.0] * 4 and s["capacity_1"]["all_heads"] == 1.0
        for real, shuffled, expected in zip(s["collision"]["per_head"], s["shuffled_hash"]["per_head"],
                                            s["expected_random"]):
            assert 0.3 < expected < 0.7
            assert real == pytest.approx(expected, abs=0.08) and shuffled == pytest.approx(expected, abs=0.08)
        # heads of one order are independent: all four collide about as often as the product predicts
        assert s["collision"]["all_heads"] == pytest.approx(s["expected_random_all_heads"], abs=0.04)
        assert s["shuffled_hash"]["all_heads"] == pytest.approx(s["expected_random_all_heads"], abs=0.04)
        assert [h["rows"] for h in s["heads"]] == model.hasher.primes[1][int(n) - 2]
        assert all(0 < h["rows_used"] <= s["distinct_ngrams"] for h in s["heads"])
    assert sum(usage[1][(2, 0)]) == stats["tokens"]


def test_row_usage_plot(model, tmp_path):
    stats = table_statistics(model, batches(1))
    path = plot_row_usage(stats["_usage"], tmp_path / "usage.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_table_controls_change_the_lookup_and_restore_the_model(model):
    x, boundary = batches(1)[0]
    layer = model.engram_layers[1]
    h = model.hash(x, boundary)[1]
    with torch.no_grad():
        rows = layer.embedding(h)
        mean = torch.randn(8, 8)
        with table_control(model, "capacity_1", {1: mean}):
            flat = layer.embedding(h)
        with table_control(model, "shuffled", seed=3):
            shuffled = layer.embedding(h)
        torch.testing.assert_close(layer.embedding(h), rows, rtol=0, atol=0)
    assert torch.equal(flat, mean.expand_as(flat))
    assert not torch.equal(shuffled, rows)
    # a permutation within each head: equal ids still read equal rows, different ids different rows
    same = h[0, :, None, 0] == h[0, None, :, 0]
    assert torch.equal(same, (shuffled[0, :, None, 0] == shuffled[0, None, :, 0]).all(-1))
    with pytest.raises(ValueError, match="unknown table control"):
        with table_control(model, "nope"):
            pass
    assert not layer.embedding._forward_hooks and not layer.embedding._forward_pre_hooks


def test_table_control_losses(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = table_control_losses(model, batches(2))
    assert set(losses) == {"trained", "capacity_1", "shuffled", "knockout"}
    assert all(np.isfinite(v) for v in losses.values())
    assert losses["capacity_1"] != losses["trained"] != losses["knockout"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert table_control_losses(model, batches(2))["trained"] == losses["trained"]

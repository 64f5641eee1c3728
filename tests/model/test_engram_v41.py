"""DeepSeek-V4.1's Engram variant (docs/ALGORITHM.md §2b): the module against a reference written here,
the residual convention, barrier tokens (property tests on the hasher), tiers, training, the gate mask."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.analysis.hooks import knockout
from engram.config import EngramConfig, ModelConfig
from engram.hashing import NgramHasher, table_geometry
from engram.model.engram import Engram
from engram.model.engram_v41 import EngramV41
from engram.model.transformer import EngramLM
from engram.presets import get_preset
from engram.tokenizer import CompressedTokenizer

V41 = dict(variant="v4.1", short_conv=False)


def v41_model(G=2, barrier_ids=(), seed=0) -> EngramLM:
    config = get_preset("tiny-engram-v41")
    config = ModelConfig(backbone=dataclasses.replace(config.backbone, hc_mult=G),
                         engram=dataclasses.replace(config.engram, barrier_ids=list(barrier_ids)))
    torch.manual_seed(seed)
    model = EngramLM(config).eval()
    with torch.no_grad():  # trained-looking gains and projections
        for layer in model.engram_layers.values():
            layer.q_weight.normal_(1.0, 0.3)
            layer.k_weight.normal_(1.0, 0.3)
            layer.wkv.weight.normal_(0, 0.2)
    return model


def reference(layer: EngramV41, hidden, hash_ids, token_mask=None):
    """The release's definition (docs/ALGORITHM.md §2b), branch by branch, in fp32: keys are wkv's first G row
    blocks, the value its last; q is the branch itself; the two gains act as their fp32 product;
    score = sum(h * q_gain * k_gain * key) * rms(h)^-1 * rms(key)^-1 / sqrt(D), with the RMS eps inside the
    root; alpha = sigmoid(copysign(sqrt(max(|s|, 1e-6)), s)); a closed gate is set to 0, not multiplied;
    out = x + alpha * v."""
    B, T, G, D = hidden.shape
    e = layer.embedding.weight[hash_ids + layer.embedding.offsets].reshape(B, T, -1).float()
    W = layer.wkv.weight.float()  # ((G+1) D, M)
    value = e @ W[G * D:].T  # (B, T, D)
    eps = layer.eps
    out = []
    for g in range(G):
        h = hidden[:, :, g].float()
        key = e @ W[g * D:(g + 1) * D].T
        gain = layer.q_weight[g].float() * layer.k_weight[g].float()
        s = (h * gain * key).sum(-1, keepdim=True)
        s = s / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + eps) / torch.sqrt(key.pow(2).mean(-1, keepdim=True) + eps)
        s = s / math.sqrt(D)
        alpha = torch.sigmoid(torch.copysign(torch.sqrt(torch.clamp(s.abs(), min=1e-6)), s))
        if token_mask is not None:
            alpha = torch.where(token_mask[..., None], alpha, torch.zeros_like(alpha))
        out.append(h + alpha * value)
    return torch.stack(out, dim=2)


def small_layer(G, eps=None, seed=0) -> EngramV41:
    extra = {} if eps is None else {"gate_norm_eps": eps}
    config = EngramConfig(engram_vocab_size=[31, 37, 41], max_ngram_size=4, n_head_per_ngram=8, n_embed_per_ngram=32,
                          layer_ids=[0], pad_id=0, **V41, **extra)
    torch.manual_seed(seed)
    layer = EngramV41(config, 16, table_geometry(config, [0])[0], 1e-6, branches=G)
    with torch.no_grad():
        layer.q_weight.normal_(1.0, 0.3)
        layer.k_weight.normal_(1.0, 0.3)
        layer.wkv.weight.normal_(0, 0.3)
        layer.embedding.weight.normal_()
    return layer


@pytest.mark.parametrize("G", [1, 4])
@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_module_matches_the_reference(G, scale):
    layer = small_layer(G)
    hidden = torch.randn(2, 9, G, 16) * scale  # at stream RMS 1e-3 the eps matters (the release's is 1e-20)
    hash_ids = torch.randint(0, 31, (2, 9, 24))
    mask = torch.rand(2, 9) > 0.3
    torch.testing.assert_close(layer(hidden, hash_ids), reference(layer, hidden, hash_ids), atol=1e-5, rtol=0)
    out = layer(hidden, hash_ids, token_mask=mask)
    torch.testing.assert_close(out, reference(layer, hidden, hash_ids, mask), atol=1e-5, rtol=0)
    assert torch.equal(out[~mask], hidden[~mask])  # a closed gate passes the stream through exactly
    assert sum(p.numel() for p in layer.parameters()) == layer.embedding.weight.numel() + 32 * 3 * 16 * (G + 1) + 2 * G * 16


def test_the_defaults_are_the_releases():
    layer = small_layer(2)
    assert layer.config.gate_norm_eps == 1e-20 and layer.eps == 1e-20
    assert EngramConfig(**V41, gate_norm_eps="backbone").gate_norm_eps == "backbone"  # a saved config keeps its eps
    assert EngramConfig().gate_norm_eps == "backbone"  # the paper's module: the backbone's, as before
    hidden = torch.zeros(1, 3, 2, 16)  # score 0: the release's signed sqrt gives sqrt(1e-6), not 0
    with torch.no_grad():
        alpha = layer.gate(hidden, torch.randn(1, 3, layer.config.memory_dim))
    torch.testing.assert_close(alpha, torch.full_like(alpha, 1 / (1 + math.exp(-1e-3))), rtol=0, atol=1e-7)
    assert abs(alpha[0, 0, 0, 0].item() - 0.50025) < 1e-6
    # a stream that is inf at a closed position stays inf (a fill), where a product would give NaN
    hidden = torch.randn(1, 3, 2, 16)
    hidden[0, 1] = float("inf")
    out = layer(hidden, torch.randint(0, 31, (1, 3, 24)), token_mask=torch.tensor([[True, False, True]]))
    assert torch.isinf(out[0, 1]).all() and not torch.isnan(out[0, 1]).any()


def test_two_bf16_gains_compute_with_their_fp32_product():
    """A bf16 release holds q and k gains whose product mostly does not round to a bf16: one merged bf16
    gain could not represent it, two gains can, and the module multiplies them in fp32."""
    layer = small_layer(2)
    with torch.no_grad():
        layer.q_weight.copy_(layer.q_weight.to(torch.bfloat16))
        layer.k_weight.copy_(layer.k_weight.to(torch.bfloat16))
    product = layer.q_weight * layer.k_weight
    assert (product.to(torch.bfloat16).float() != product).float().mean() > 0.5
    sd = layer.to_release_state_dict(dtype="bfloat16")
    loaded = EngramV41.from_release_state_dict(sd, layer.config)
    assert torch.equal(loaded.q_weight, layer.q_weight) and torch.equal(loaded.k_weight, layer.k_weight)
    hidden, hash_ids = torch.randn(2, 9, 2, 16), torch.randint(0, 31, (2, 9, 24))
    torch.testing.assert_close(loaded(hidden, hash_ids), reference(loaded, hidden, hash_ids), atol=1e-5, rtol=0)


def test_a_state_dict_with_the_merged_gain_of_before_still_loads():
    layer = small_layer(2)
    state = {k: v for k, v in layer.state_dict().items() if k not in ("q_weight", "k_weight")}
    state["norm_weight"] = layer.q_weight.detach() * layer.k_weight.detach()
    other = small_layer(2, seed=1)
    other.load_state_dict(state)
    hidden, hash_ids = torch.randn(1, 5, 2, 16), torch.randint(0, 31, (1, 5, 24))
    torch.testing.assert_close(other(hidden, hash_ids), layer(hidden, hash_ids), atol=1e-6, rtol=0)


def test_a_block_never_adds_the_stream_twice():
    """With wkv's value rows zero the module returns x exactly, so the model equals one without Engram; a
    block that added x + (x + alpha*v) would double the stream."""
    model = v41_model()
    ids = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        for layer in model.engram_layers.values():
            layer.wkv.weight[-layer.dim:] = 0
        with_engram = model(ids).logits
        for blk in model.layers:
            blk.engram = None
        assert torch.equal(with_engram, model(ids).logits)
    assert EngramV41.adds_residual and not Engram.adds_residual


def test_knockout_leaves_the_stream_as_it_came():
    model = v41_model()
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        baseline = model(ids).logits
        with knockout(model):
            knocked = model(ids).logits
        for layer in model.engram_layers.values():
            layer.wkv.weight[-layer.dim:] = 0
        assert torch.equal(knocked, model(ids).logits)
        assert not torch.equal(knocked, baseline)


# -- barriers ------------------------------------------------------------------------------------------
VOCAB = 40


def hasher_with(barriers, N=4):
    config = EngramConfig(engram_vocab_size=[101] * (N - 1), max_ngram_size=N, n_head_per_ngram=2,
                          n_embed_per_ngram=4, layer_ids=[0, 2], pad_id=1, barrier_ids=list(barriers), **V41)
    return NgramHasher(config, CompressedTokenizer.identity(VOCAB))


sequences = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=30)


@settings(max_examples=80, deadline=None)
@given(sequences, st.sets(st.integers(0, VOCAB - 1), min_size=1, max_size=6), st.integers(2, 4))
def test_no_lookback_crosses_a_barrier_or_the_start(ids, barriers, N):
    """Each token hashes as its segment since the last barrier run alone (lookbacks past it are pad,
    sticky); a barrier hashes as a lone pad. Equivalently: no n-gram ever reads across a barrier."""
    hasher = hasher_with(barriers, N)
    x = torch.tensor([ids])
    got = hasher(x)
    pad_alone = hasher(torch.tensor([[1]]))
    last = -1
    for t, tok in enumerate(ids):
        if tok in barriers:
            last = t
            expected = pad_alone
            pos = 0
        else:
            expected = hasher(x[:, last + 1: t + 1])
            pos = t - last - 1
        for lid in got:
            assert torch.equal(got[lid][0, t], expected[lid][0, pos]), (t, lid)


@settings(max_examples=80, deadline=None)
@given(sequences, st.sets(st.integers(0, VOCAB - 1), max_size=6), st.integers(1, 5), st.booleans(), st.data())
def test_hashing_in_chunks_with_history_equals_one_pass(ids, barriers, chunk, with_boundary, data):
    """The decode history (the last N-1 ids, a barrier kept as DEAD) continues exactly."""
    hasher = hasher_with(barriers) if barriers else NgramHasher(
        EngramConfig(engram_vocab_size=[101] * 3, max_ngram_size=4, n_head_per_ngram=2, n_embed_per_ngram=4,
                     layer_ids=[0, 2], pad_id=1, **V41), CompressedTokenizer.identity(VOCAB))
    x = torch.tensor([ids])
    boundary = torch.tensor([data.draw(st.lists(st.booleans(), min_size=len(ids), max_size=len(ids)))])
    boundary[0, 0] = True  # document starts anywhere, as a packed batch has them
    full = hasher(x, boundary if with_boundary else None)
    history = torch.full((1, 3), hasher.compressed_pad_id)
    for s in range(0, len(ids), chunk):
        part = hasher.hash_with_history(x[:, s: s + chunk], history,
                                        boundary[:, s: s + chunk] if with_boundary else None)
        ids_part, history = part
        for lid in full:
            assert torch.equal(ids_part[lid], full[lid][:, s: s + chunk])


def test_barrier_positions_close_the_gate_in_the_model():
    """At a barrier the stream leaves the Engram layer as it entered (hooked), elsewhere it moves."""
    model = v41_model(barrier_ids=[7, 8])
    ids = torch.tensor([[5, 7, 9, 10, 8, 8, 11, 12]])
    seen = {}
    layer = model.engram_layers[1]
    handle = layer.register_forward_hook(lambda m, args, kwargs, out: seen.update(x=args[0], y=out), with_kwargs=True)
    with torch.no_grad():
        model(ids)
    handle.remove()
    barrier = torch.isin(ids[0], torch.tensor([7, 8]))
    assert torch.equal(seen["y"][0, barrier], seen["x"][0, barrier])
    assert (seen["y"][0, ~barrier] != seen["x"][0, ~barrier]).any(dim=-1).all()


def test_gate_maps_and_table_statistics_see_the_barriers():
    from engram.analysis.hooks import capture_gates
    from engram.analysis.tables import ngram_tuples

    model = v41_model(barrier_ids=[7])
    ids = torch.tensor([[5, 6, 7, 9, 10]])
    with torch.no_grad(), capture_gates(model) as gates:
        model(ids)
    assert (gates[1][0][0, 2] == 0).all() and (gates[1][0][0, [0, 1, 3, 4]] > 0).all()
    pad = model.hasher.compressed_pad_id
    tuples = ngram_tuples(model.hasher, ids, None)[0]  # (T, N): what each position's hash reads
    assert (tuples[2] == pad).all() and (tuples[3, 1:] == pad).all() and (tuples[4, 2:] == pad).all()
    assert tuples[1, 1] == model.hasher.compress(torch.tensor([[5]]))[0, 0]


def test_the_layout_records_barriers_and_old_layouts_still_match():
    with_barriers, without = hasher_with([4, 3]), hasher_with([])
    assert with_barriers.layout()["barrier_ids"] == [3, 4] and "barrier_ids" not in without.layout()
    hasher_with([3, 4]).check_layout(with_barriers.layout())  # a set of ids: their order does not matter
    with pytest.raises(ValueError, match="barrier_ids"):
        without.check_layout(with_barriers.layout())
    with pytest.raises(ValueError, match="reach outside"):
        hasher_with([VOCAB])


# -- config, placement, training -----------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, match", [
    (dict(variant="v4.1"), "short_conv"),
    (dict(variant="v4.1", short_conv=False, gate="sigmoid"), "gate"),
    (dict(variant="v4.1", short_conv=False, branch_keys=False), "branch_keys"),
    (dict(variant="v4.1", short_conv=False, proj_bias=True), "proj_bias"),
    (dict(variant="v5"), "variant"),
    (dict(barrier_ids=[3]), "barrier tokens belong to the v4.1 variant"),
    (dict(barrier_ids=[3, 3], **V41), "must not repeat"),
    (dict(barrier_ids=[-1], **V41), "raw token ids >= 0"),
])
def test_bad_configs_are_refused_by_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EngramConfig(**kwargs)


def test_tiers_are_bit_identical(tmp_path):
    from engram.storage import apply_storage, export_tables

    ids = torch.randint(0, 512, (2, 24))
    ids[0, 5] = ids[1, 9] = 30
    expected = v41_model(barrier_ids=[30])(ids).logits
    for tier in ("host", "disk"):
        model = v41_model(barrier_ids=[30])
        export_tables(model, tmp_path / tier)
        with torch.no_grad(), apply_storage(model, tier, tmp_path / tier if tier == "disk" else None, cache_rows=64):
            assert torch.equal(model(ids).logits, expected)


def test_it_trains_with_sparse_tables():
    from engram.config import TrainConfig
    from engram.train import Optimizers

    model = v41_model(barrier_ids=[30]).train()
    model = EngramLM(model.config, sparse_tables=True)
    opt = Optimizers(model, TrainConfig(lr=3e-3, warmup_steps=0, max_steps=30))
    ids = torch.randint(0, 64, (4, 32))
    losses = []
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert model.engram_layers[1].embedding.weight.grad is None or model.engram_layers[1].embedding.weight.grad.is_sparse

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.config import EngramConfig
from engram.hashing import document_ids
from engram.model.engram import Engram


def make_layer(G=2, D=16, N=3, K=2, kernel=4, gate="signed_sqrt", sizes=(11, 13)):
    config = EngramConfig(engram_vocab_size=list(sizes[: N - 1]) + [17] * max(0, N - 1 - len(sizes)),
                          max_ngram_size=N, n_head_per_ngram=K, n_embed_per_ngram=4 * K, layer_ids=[0],
                          kernel_size=kernel, gate=gate)
    table_sizes = [s + 2 * k for s in config.engram_vocab_size for k in range(K)]
    return Engram(config, D, table_sizes, branches=G)


def inputs(layer, B=2, T=20):
    H = layer.config.n_heads
    rows = layer.embedding.offsets.diff(append=torch.tensor([layer.embedding.num_rows]))
    hash_ids = (torch.rand(B, T, H) * rows).long()
    hidden = torch.randn(B, T, layer.branches, layer.dim)
    return hidden, hash_ids


def reference_forward(layer, hidden, hash_ids, doc_ids=None):
    """Per branch, per step, written from docs/ALGORITHM.md §2 steps 5-8 with F.conv1d for the conv."""
    c, D = layer.config, layer.dim
    B, T = hash_ids.shape[:2]
    e = layer.embedding.weight[hash_ids + layer.embedding.offsets].reshape(B, T, -1)
    outs = []
    for g in range(layer.branches):
        k = e @ layer.key_proj.weight[g].T
        q = F.rms_norm(hidden[:, :, g], (D,), eps=1e-6) * layer.norm_query.weight[g]
        kk = F.rms_norm(k, (D,), eps=1e-6) * layer.norm_key.weight[g]
        s = (q * kk).sum(-1, keepdim=True) / math.sqrt(D)
        if c.gate == "signed_sqrt":
            s = torch.sign(s) * torch.sqrt(torch.clamp(s.abs(), min=1e-6))
        v = torch.sigmoid(s) * (e @ layer.value_proj.weight.T)  # (B, T, D)
        u = F.rms_norm(v, (D,), eps=1e-6) * layer.norm_conv.weight[g]
        if doc_ids is None:
            pad = (c.kernel_size - 1) * c.dilation
            conv = F.conv1d(F.pad(u.transpose(1, 2), (pad, 0)), layer.conv_weight[g][:, None, :],
                            dilation=c.dilation, groups=D).transpose(1, 2)
        else:  # documents one at a time
            conv = torch.zeros_like(u)
            for b in range(B):
                for d in doc_ids[b].unique():
                    idx = (doc_ids[b] == d).nonzero().flatten()
                    seg = u[b, idx].T[None]
                    pad = (c.kernel_size - 1) * c.dilation
                    conv[b, idx] = F.conv1d(F.pad(seg, (pad, 0)), layer.conv_weight[g][:, None, :],
                                            dilation=c.dilation, groups=D)[0].T
        outs.append(v + F.silu(conv))
    return torch.stack(outs, dim=2)


def test_shapes_and_zero_conv_is_identity():
    layer = make_layer()
    hidden, hash_ids = inputs(layer)
    y = layer(hidden, hash_ids)
    assert y.shape == hidden.shape
    # conv weights start at zero: SiLU(0) = 0, so Y is exactly the gated value
    e = layer.embedding(hash_ids).flatten(2)
    value = layer.gate(hidden, e) * layer.value_proj(e)[:, :, None]
    assert torch.equal(y, value)
    assert torch.count_nonzero(layer.conv_weight) == 0


@pytest.mark.parametrize("gate", ["signed_sqrt", "sigmoid"])
@pytest.mark.parametrize("G", [1, 3])
def test_matches_reference_with_trained_conv(gate, G):
    layer = make_layer(G=G, gate=gate)
    with torch.no_grad():
        layer.conv_weight.normal_()
        for n in (layer.norm_query, layer.norm_key, layer.norm_conv):
            n.weight.uniform_(0.5, 1.5)
    hidden, hash_ids = inputs(layer)
    torch.testing.assert_close(layer(hidden, hash_ids), reference_forward(layer, hidden, hash_ids),
                               atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(2, 4), st.integers(1, 5), st.integers(1, 30), st.data())
def test_conv_resets_at_documents(G, N, kernel, T, data):
    layer = make_layer(G=G, N=N, kernel=kernel)
    with torch.no_grad():
        layer.conv_weight.normal_()
    hidden, hash_ids = inputs(layer, B=2, T=T)
    starts = data.draw(st.lists(st.lists(st.booleans(), min_size=T, max_size=T), min_size=2, max_size=2))
    boundary = torch.tensor(starts)
    doc_ids = document_ids(boundary, boundary.shape, boundary.device)
    torch.testing.assert_close(layer(hidden, hash_ids, doc_ids),
                               reference_forward(layer, hidden, hash_ids, doc_ids), atol=1e-5, rtol=1e-5)


def test_conv_receptive_field_is_dilated():
    """Y_t depends on the value at t-(K-1)*N but not at t-(K-1)*N-1 (docs/PITFALLS.md §8)."""
    layer = make_layer(G=1, N=3, kernel=4)
    with torch.no_grad():
        layer.conv_weight.normal_()
    hidden, hash_ids = inputs(layer, B=1, T=30)
    hidden.requires_grad_(True)
    layer(hidden, hash_ids)[0, 20].sum().backward()
    touched = (hidden.grad[0].abs().sum(dim=(1, 2)) > 0).nonzero().flatten().tolist()
    assert touched == [11, 14, 17, 20]


def test_gradients_reach_only_looked_up_rows():
    layer = make_layer()
    hidden, hash_ids = inputs(layer, B=2, T=9)
    layer(hidden, hash_ids).square().sum().backward()
    grad_rows = set(layer.embedding.weight.grad.abs().sum(1).nonzero().flatten().tolist())
    looked_up = set((hash_ids + layer.embedding.offsets).flatten().tolist())
    assert grad_rows == looked_up
    for p in (layer.key_proj.weight, layer.value_proj.weight, layer.conv_weight, layer.norm_query.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_sparse_gradient_matches_dense():
    layer = make_layer()
    hidden, hash_ids = inputs(layer)
    layer(hidden, hash_ids).sum().backward()
    dense = layer.embedding.weight.grad.clone()
    layer.zero_grad()
    layer.embedding.sparse = True
    layer(hidden, hash_ids).sum().backward()
    grad = layer.embedding.weight.grad
    assert grad.is_sparse
    torch.testing.assert_close(grad.to_dense(), dense)


def test_gate_is_fp32_and_finite_at_zero_score():
    layer = make_layer(D=8)
    layer = layer.to(torch.bfloat16)
    hidden = torch.zeros(1, 3, 2, 8, dtype=torch.bfloat16, requires_grad=True)
    e = torch.randn(1, 3, layer.config.memory_dim, dtype=torch.bfloat16, requires_grad=True)
    alpha = layer.gate(hidden, e)
    assert alpha.dtype == torch.float32
    torch.testing.assert_close(alpha, torch.full_like(alpha, 0.5))
    alpha.sum().backward()
    assert torch.isfinite(e.grad.float()).all() and torch.isfinite(hidden.grad.float()).all()


def test_branches_gate_independently():
    """Branch g's gate reads branch g's hidden state only."""
    layer = make_layer(G=3)
    hidden, hash_ids = inputs(layer)
    y = layer(hidden, hash_ids)
    hidden2 = hidden.clone()
    hidden2[:, :, 1] += 5 * torch.randn_like(hidden2[:, :, 1])
    y2 = layer(hidden2, hash_ids)
    assert torch.equal(y[:, :, 0], y2[:, :, 0]) and torch.equal(y[:, :, 2], y2[:, :, 2])
    assert not torch.equal(y[:, :, 1], y2[:, :, 1])


def test_parameter_names_are_stable():
    names = {n for n, _ in make_layer().named_parameters()}
    assert names == {"embedding.weight", "key_proj.weight", "value_proj.weight", "norm_query.weight",
                     "norm_key.weight", "norm_conv.weight", "conv_weight"}


def test_wrong_number_of_tables():
    config = EngramConfig(engram_vocab_size=[11, 13], n_head_per_ngram=2, n_embed_per_ngram=8, layer_ids=[0])
    with pytest.raises(ValueError, match="one table size per hash head"):
        Engram(config, 16, [11, 13])

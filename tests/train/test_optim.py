import pytest
import torch

from engram.config import TrainConfig
from engram.model.transformer import EngramLM
from engram.presets import get_preset
from engram.train.optim import Optimizers, learning_rate, table_parameters


def _batch():
    return torch.randint(0, 512, (2, 16))


def test_table_step_touches_only_looked_up_rows_and_matches_dense_adam():
    torch.manual_seed(0)
    model = EngramLM(get_preset("tiny-engram"), sparse_tables=True)
    config = TrainConfig(lr=1e-2, grad_clip=0.0)
    table = table_parameters(model)[0]
    opt = Optimizers(model, config)
    opt.set_lr(config.lr)
    ids = _batch()
    # the last position has no target, so rows looked up only there get a zero gradient and stay put
    rows = torch.unique(model.hash(ids)[1][:, :-1] + model.layers[1].engram.embedding.offsets)
    before = table.detach().clone()
    model(ids, labels=ids).loss.backward()
    assert table.grad.is_sparse
    grad = table.grad.coalesce().to_dense()
    opt.step()
    changed = torch.nonzero((table.detach() != before).any(dim=1)).flatten()
    assert torch.equal(changed, rows)  # exactly the looked-up rows moved
    # a dense Adam step over the whole table (Kingma & Ba's form, eps added before bias correction)
    b1, b2, lr = config.beta1, config.beta2, config.lr * config.table_lr_mult
    m, v = (1 - b1) * grad, (1 - b2) * grad * grad
    reference = before - lr * (1 - b2) ** 0.5 / (1 - b1) * m / (v.sqrt() + 1e-8)
    torch.testing.assert_close(table.detach(), reference, rtol=1e-6, atol=1e-7)


def test_untouched_rows_never_move_and_no_weight_decay_on_tables():
    torch.manual_seed(0)
    model = EngramLM(get_preset("tiny-engram"), sparse_tables=True)
    opt = Optimizers(model, TrainConfig(lr=1e-2, weight_decay=0.5))
    table = table_parameters(model)[0]
    before = table.detach().clone()
    touched = set()
    for _ in range(3):
        ids = _batch()
        touched |= set((model.hash(ids)[1] + model.layers[1].engram.embedding.offsets).flatten().tolist())
        model(ids, labels=ids).loss.backward()
        opt.clip_grad_norm(1.0)
        opt.step()
        opt.zero_grad()
    untouched = torch.ones(table.shape[0], dtype=torch.bool)
    untouched[list(touched)] = False
    assert torch.equal(table.detach()[untouched], before[untouched])
    assert opt.tables.param_groups[0]["lr"] == pytest.approx(1e-2 * 5.0)


def test_clip_includes_sparse_gradients():
    torch.manual_seed(0)
    model = EngramLM(get_preset("tiny-engram"), sparse_tables=True)
    opt = Optimizers(model, TrainConfig())
    ids = _batch()
    model(ids, labels=ids).loss.mul(100).backward()
    dense_sq = sum(p.grad.square().sum() for p in opt.dense_params if p.grad is not None)
    table_sq = sum(p.grad.coalesce()._values().square().sum() for p in opt.table_params)
    norm = opt.clip_grad_norm(1.0)
    assert norm == pytest.approx(float((dense_sq + table_sq).sqrt()), rel=1e-5)
    after = sum(p.grad.square().sum() for p in opt.dense_params if p.grad is not None)
    after = after + sum(p.grad.coalesce()._values().square().sum() for p in opt.table_params)
    assert float(after.sqrt()) == pytest.approx(1.0, rel=1e-4)


def test_schedule_warmup_then_step_decay():
    c = TrainConfig(lr=1.0, max_steps=100, warmup_steps=10, decay_at=[0.8, 0.9], decay_factor=0.5)
    assert learning_rate(0, c) == pytest.approx(0.1)
    assert learning_rate(9, c) == 1.0 and learning_rate(79, c) == 1.0
    assert learning_rate(80, c) == 0.5 and learning_rate(89, c) == 0.5 and learning_rate(90, c) == 0.25


def test_state_dict_round_trip():
    torch.manual_seed(0)
    model = EngramLM(get_preset("tiny-engram"), sparse_tables=True)
    opt = Optimizers(model, TrainConfig())
    ids = _batch()
    model(ids, labels=ids).loss.backward()
    opt.step()
    state = opt.state_dict()
    fresh = Optimizers(model, TrainConfig())
    fresh.load_state_dict(state)
    assert fresh.state_dict()["tables"]["state"].keys() == state["tables"]["state"].keys()
    baseline = Optimizers(EngramLM(get_preset("tiny-moe"), sparse_tables=True), TrainConfig())
    with pytest.raises(ValueError, match="sparse"):
        baseline.load_state_dict(state)


def test_sparsity_is_decided_when_the_model_is_built_never_by_the_optimizer():
    assert all(t.sparse for t in EngramLM(get_preset("tiny-engram")).named_tables().values())  # the default
    dense = EngramLM(get_preset("tiny-engram"), sparse_tables=False)
    assert not any(t.sparse for t in dense.named_tables().values())
    with pytest.raises(ValueError, match=r"layers\.1\.engram\.embedding.*sparse_tables=True"):
        Optimizers(dense, TrainConfig())
    assert not any(t.sparse for t in dense.named_tables().values())  # not flipped behind the caller's back
    sparse = EngramLM(get_preset("tiny-engram"), sparse_tables=True)
    opt = Optimizers(sparse, TrainConfig())
    assert [p for g in opt.tables.param_groups for p in g["params"]] == table_parameters(sparse)

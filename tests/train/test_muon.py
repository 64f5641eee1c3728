"""train.optimizer="muon": Muon for the hidden matrices (experts and other stacks matrix by matrix,
FSDP2-sharded ones whole), AdamW for the rest, SparseAdam for the tables; recorded in checkpoints, and
a run resumes bit-identically with the optimizer it started with."""

import dataclasses
import json
import math
import re

import pytest
import torch
from torch import nn

from support import spawn_group, tiny_run
from engram.cli import main
from engram.config import OverEncodingConfig, TrainConfig
from engram.model.transformer import EngramLM
from engram.presets import get_preset
from engram.train import latest_checkpoint, load_checkpoint, train
from engram.train.muon import Muon
from engram.train.optim import Optimizers, muon_parameters

MOMENTUM, NS_COEFFICIENTS, NS_STEPS = 0.95, (3.4445, -4.7750, 2.0315), 5


def reference_orthogonalise(update: torch.Tensor) -> torch.Tensor:
    """Newton-Schulz's quintic iteration in fp64 on update / ||update||_F, run on the wide orientation."""
    a, b, c = NS_COEFFICIENTS
    tall = update.shape[0] > update.shape[1]
    x = update.double().T if tall else update.double()
    x = x / x.norm()
    for _ in range(NS_STEPS):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def reference_muon(weight: torch.Tensor, grads: list[torch.Tensor], lr: float, weight_decay: float) -> torch.Tensor:
    """Muon's steps on one matrix: momentum kept as an average (m <- mu m + (1 - mu) g), the Nesterov
    update (1 - mu) g + mu m orthogonalised, decoupled weight decay at the base rate, and the update at
    the rate scaled by 0.2 sqrt(max(rows, cols)) (match_rms_adamw)."""
    w, m = weight.double(), torch.zeros_like(weight, dtype=torch.float64)
    scaled_lr = lr * 0.2 * math.sqrt(max(weight.shape))
    for g in grads:
        m = MOMENTUM * m + (1 - MOMENTUM) * g.double()
        nesterov = (1 - MOMENTUM) * g.double() + MOMENTUM * m
        w = w * (1 - lr * weight_decay) - scaled_lr * reference_orthogonalise(nesterov)
    return w


def test_steps_match_an_independent_muon_on_a_matrix_and_on_each_expert():
    model = EngramLM(get_preset("tiny-engram"))
    config = TrainConfig(optimizer="muon", lr=0.02, weight_decay=0.5)
    opt = Optimizers(model, config)
    opt.set_lr(config.lr)
    attn, experts = model.layers[0].attn.wk.weight, model.layers[-1].ffn.experts.w2  # (32, 64), (E, 64, 32)
    with torch.no_grad():  # unit-scale weights: a wrong weight decay shows well above the tolerance
        for p in (attn, experts):
            p.copy_(torch.randn_like(p))
    before = {p: p.detach().clone() for p in (attn, experts)}
    grads = {p: [torch.randn_like(p) for _ in range(2)] for p in (attn, experts)}
    for step in range(2):  # the second step sees momentum and Nesterov
        opt.zero_grad()
        for p in (attn, experts):
            p.grad = grads[p][step].clone()
        opt.step()
    # torch runs Newton-Schulz in bf16: after two steps the weights are within 1.5e-2 x the scaled rate of
    # fp64's; a step without Nesterov misses by 0.17 x, one decaying at the scaled rate by 1.3 x
    for p, matrices in ((attn, [slice(None)]), (experts, range(experts.shape[0]))):
        for i in matrices:
            want = reference_muon(before[p][i], [g[i] for g in grads[p]], config.lr, config.weight_decay)
            scaled_lr = config.lr * 0.2 * math.sqrt(max(want.shape))
            torch.testing.assert_close(p.detach()[i].double(), want, rtol=0, atol=3e-2 * scaled_lr)


def test_stacks_step_as_torch_muon_steps_each_matrix():
    """A 2-D parameter steps bit for bit as under torch.optim.Muon; a stack as torch.optim.Muon stepping
    each of its matrices as a parameter of its own."""
    torch.manual_seed(0)
    matrix, stack = torch.randn(12, 20), torch.randn(3, 20, 12)
    ours = [nn.Parameter(matrix.clone()), nn.Parameter(stack.clone())]
    theirs = [nn.Parameter(matrix.clone())] + [nn.Parameter(m.clone()) for m in stack]
    opt = Muon(ours, lr=0.02, weight_decay=0.1)
    ref = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                           adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        g_matrix, g_stack = torch.randn(12, 20), torch.randn(3, 20, 12)
        ours[0].grad, ours[1].grad = g_matrix, g_stack
        for p, g in zip(theirs, [g_matrix, *g_stack]):
            p.grad = g.clone()
        opt.step()
        ref.step()
    assert torch.equal(ours[0], theirs[0])
    assert all(torch.equal(ours[1][e], theirs[1 + e]) for e in range(3))
    assert torch.equal(opt.state[ours[1]]["momentum_buffer"][2], ref.state[theirs[3]]["momentum_buffer"])
    with pytest.raises(ValueError, match="AdamW"):
        Muon([nn.Parameter(torch.randn(4))], lr=0.02, weight_decay=0.1)


def _kinds(names) -> set[str]:
    return {re.sub(r"^layers\.\d+\.", "", n) for n in names}


def test_exactly_the_hidden_matrices_use_muon():
    model = EngramLM(get_preset("tiny-engram"))
    names = [n for n, _ in muon_parameters(model)]
    assert _kinds(names) == {
        "attn.wq.weight", "attn.wk.weight", "attn.wv.weight", "attn.wo.weight",
        "ffn.w1.weight", "ffn.w2.weight", "ffn.w3.weight",  # the dense FFN of block 0
        "ffn.router.weight", "ffn.experts.w1", "ffn.experts.w2", "ffn.experts.w3",
        "ffn.shared.w1.weight", "ffn.shared.w2.weight", "ffn.shared.w3.weight",
        "attn_res.proj.weight", "ffn_res.proj.weight",  # mHC's dynamic mapping (its biases and alpha stay AdamW's)
        "engram.key_proj.weight", "engram.value_proj.weight",
    }
    assert len(names) == len(set(names))
    every = dict(model.named_parameters())
    assert all(every[n].dim() >= 2 for n in names)
    for left in set(every) - set(names):  # embedding, head, norms, mHC scalars, tables, conv taps
        assert re.search(r"tok_embeddings|^output|norm|alpha|bias_|embedding\.weight|conv_weight", left), left

    opt = Optimizers(model, TrainConfig(optimizer="muon"))
    muon = [p for g in opt.matrices.param_groups for p in g["params"]]
    adamw = [p for g in opt.dense.param_groups for p in g["params"]]
    tables = [p for g in opt.tables.param_groups for p in g["params"]]
    assert [id(p) for p in muon] == [id(every[n]) for n in names]
    assert sorted(map(id, muon + adamw + tables)) == sorted(map(id, every.values()))  # each exactly once
    assert Optimizers(model, TrainConfig()).matrices is None  # the default: AdamW for every dense parameter

    v41 = _kinds(n for n, _ in muon_parameters(EngramLM(get_preset("tiny-engram-v41"))))
    assert "engram.wkv.weight" in v41 and "engram.norm_weight" not in v41


def test_overencoding_projections_use_muon():
    config = get_preset("tiny-dense")
    config = dataclasses.replace(config, overencoding=OverEncodingConfig(
        engram_vocab_size=[101, 103], max_ngram_size=3, n_embed_per_ngram=16, n_head_per_ngram=2, pad_id=2))
    names = [n for n, _ in muon_parameters(EngramLM(config))]
    assert "overencoding.proj.weight" in names and "overencoding.embedding.weight" not in names


def test_optimizer_state_of_the_other_optimizer_is_refused():
    model = EngramLM(get_preset("tiny-engram"))
    ids = torch.randint(0, 512, (2, 16))
    model(ids, labels=ids).loss.backward()
    adamw, muon = Optimizers(model, TrainConfig()), Optimizers(model, TrainConfig(optimizer="muon"))
    adamw.step()
    muon.step()
    assert set(adamw.state_dict()) == {"dense", "tables"}  # unchanged: earlier checkpoints load
    assert muon.state_dict()["optimizer"] == "muon"
    with pytest.raises(ValueError, match="adamw's but this run has train.optimizer=muon.*--init-from"):
        muon.load_state_dict(adamw.state_dict())
    with pytest.raises(ValueError, match="muon's but this run has train.optimizer=adamw"):
        adamw.load_state_dict(muon.state_dict())
    fresh = Optimizers(model, TrainConfig(optimizer="muon"))
    fresh.load_state_dict(muon.state_dict())
    assert all(torch.equal(fresh.matrices.state[p]["momentum_buffer"], muon.matrices.state[p]["momentum_buffer"])
               for p in muon.matrices.state)


@pytest.fixture(scope="module")
def muon_run(corpus_dir, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("muon") / "whole"
    return out, train(_muon_run(corpus_dir, cache_dir, out), progress=False)


def _muon_run(corpus_dir, cache_dir, out, **changes):
    settings = dict(max_steps=4, save_every=2, eval_every=4, optimizer="muon") | changes
    return tiny_run(corpus_dir, cache_dir, out, **settings)


def _losses(run_dir) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def test_kill_and_resume_is_bit_identical(muon_run, corpus_dir, cache_dir, tmp_path):
    whole_dir, whole = muon_run

    class Killed(Exception):
        pass

    def kill_at_3(step, metrics):
        if step == 3:
            raise Killed

    split = _muon_run(corpus_dir, cache_dir, tmp_path / "split")
    with pytest.raises(Killed):
        train(split, progress=False, on_step=kill_at_3)
    assert latest_checkpoint(tmp_path / "split").name == "step_0000002"  # resumed with 2 steps of momentum
    resumed = train(split, progress=False)

    assert _losses(whole_dir) == _losses(tmp_path / "split")
    assert whole.final_eval == resumed.final_eval
    a = load_checkpoint(whole.checkpoint)
    b = load_checkpoint(resumed.checkpoint)
    assert a.optimizer_state()["optimizer"] == "muon" and a.run_config.train.optimizer == "muon"
    a, b = a.model.state_dict(), b.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_with_another_optimizer_is_refused(muon_run, corpus_dir, cache_dir):
    whole_dir, whole = muon_run
    with pytest.raises(ValueError, match=r"another optimizer \(train.optimizer: 'muon' -> 'adamw'\).*--init-from"):
        train(_muon_run(corpus_dir, cache_dir, whole_dir, optimizer="adamw"), progress=False)
    assert latest_checkpoint(whole_dir) == whole.checkpoint  # nothing moved


def test_cli_trains_with_muon(corpus_dir, cache_dir, tmp_path):
    flags = [f"data.source={corpus_dir}", "data.vocab_size=300", "data.val_fraction=0.2", f"data.cache_dir={cache_dir}",
             "train.optimizer=muon", "train.max_steps=2", "train.batch_size=2", "train.seq_len=32",
             "train.eval_batches=1", "train.warmup_steps=1"]
    sets = [a for f in flags for a in ("--set", f)]
    assert main(["train", "--preset", "tiny-engram", *sets, "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    ckpt = load_checkpoint(tmp_path / "run")
    assert ckpt.run_config.train.optimizer == "muon" and ckpt.optimizer_state()["optimizer"] == "muon"


# -- FSDP2: parameters sharded on dim 0 (DTensors) ------------------------------------------------
class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 16, 16) / 4)  # 3 matrices: 2 on rank 0, 1 on rank 1

    def forward(self, x):
        return torch.einsum("bd,efd->bf", x, self.weight)


def _net():
    torch.manual_seed(0)  # 11 rows: 6 on rank 0, 5 on rank 1, so each rank holds part of every matrix
    return nn.Sequential(nn.Linear(16, 11, bias=False), nn.Linear(11, 16, bias=False), _Stack())


def _fsdp_worker() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    one, sharded = _net(), _net()
    mesh = init_device_mesh("cpu", (2,))
    for layer in sharded:
        fully_shard(layer, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    x = torch.randn(4, 16)
    for model in (one, sharded):
        opt = Muon(model.parameters(), lr=0.02, weight_decay=0.1)
        for _ in range(2):
            model(x).square().sum().backward()  # every rank the whole batch: FSDP's mean gradient is one's
            opt.step()
            opt.zero_grad()
    with torch.no_grad():
        for a, b in zip(one.parameters(), sharded.parameters()):
            torch.testing.assert_close(b.full_tensor(), a, rtol=0, atol=1e-6)


def test_fsdp2_sharded_muon_step_equals_one_process():
    spawn_group(2, _fsdp_worker)

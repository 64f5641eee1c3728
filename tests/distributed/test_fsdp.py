"""FSDP2 (``train.parallel = "fsdp"``): 2 gloo ranks with sharded dense weights and row-sharded tables
train the one-process run; their checkpoints load on 1 and on 4 ranks; the memory plan equals what the
ranks materialise. The tiny MoE + Engram preset with the sigmoid gate, as the DDP tests (see there why)."""

import dataclasses
import json
import shutil

import pytest
import torch
import torch.distributed as dist

from support import spawn_group, tiny_run, train_on_ranks, train_one_process
from engram.config import RunConfig
from engram.train import load_checkpoint, train

TOL = 1e-5


def _settings(**more):
    return dict(dict(max_steps=4, batch_size=4, grad_accum=2, eval_every=2, save_every=2, decay_at=[0.99],
                     parallel="fsdp"), **more)


def _run(dirs, out, **settings) -> RunConfig:
    run = tiny_run(*dirs, out, **_settings(**settings))
    engram = dataclasses.replace(run.model.engram, gate="sigmoid")
    return dataclasses.replace(run, model=dataclasses.replace(run.model, engram=engram))


def _train_worker(run: dict, out_dir: str, record: str) -> None:
    from torch.distributed.tensor import DTensor

    from engram.distributed.sharded import sharded_tables

    steps = []
    keys = ("step", "loss", "grad_norm", "sent_allgather_bytes", "sent_reduce_scatter_bytes", "sent_allreduce_bytes")
    seen = {}

    def on_step(step, metrics):
        steps.append({k: metrics.get(k) for k in keys})

    import engram.train.loop as loop

    original = loop.setup

    def setup(*args, **kwargs):  # look at the placement the trainer made
        state = original(*args, **kwargs)
        tables = {id(t.weight) for t in sharded_tables(state.model).values()}
        seen["dense_sharded"] = all(isinstance(p, DTensor) for p in state.model.parameters() if id(p) not in tables)
        seen["tables_sharded"] = bool(tables) and not any(
            isinstance(t.weight, DTensor) for t in sharded_tables(state.model).values())
        return state

    loop.setup = setup
    try:
        result = train(RunConfig.from_dict(run), out_dir=out_dir, progress=False, on_step=on_step)
    finally:
        loop.setup = original
    if dist.get_rank() == 0:
        with open(record, "w") as f:
            json.dump({"steps": steps, "final_eval": result.final_eval, **seen}, f)


def _run_ranks(world: int, run, out_dir, record) -> dict:
    return train_on_ranks(world, _train_worker, run, out_dir, record)


def _run_one(run, out_dir) -> dict:
    return train_one_process(run, out_dir)


def _assert_same_steps(got: list[dict], want: list[dict], tol: float = TOL) -> None:
    assert [s["step"] for s in got] == [s["step"] for s in want]
    for g, w in zip(got, want):
        assert abs(g["loss"] - w["loss"]) <= tol, (g, w)
        assert abs(g["grad_norm"] - w["grad_norm"]) <= 1e-4 * w["grad_norm"], (g, w)


@pytest.fixture(scope="module")
def reference(corpus_dir, cache_dir, tmp_path_factory):
    """One process, 4 steps of a batch of 4 rows in 2 micro-batches."""
    out = tmp_path_factory.mktemp("one")
    run = _run((corpus_dir, cache_dir), out)
    return run, out, _run_one(run, out)


@pytest.fixture(scope="module")
def two_ranks(reference, tmp_path_factory):
    run, _, _ = reference
    out = tmp_path_factory.mktemp("fsdp2")
    return out, _run_ranks(2, run, out / "run", out / "record.json")


def test_fsdp_on_two_ranks_matches_one_process(reference, two_ranks):
    _, one_dir, want = reference
    out, got = two_ranks
    assert got["dense_sharded"] and got["tables_sharded"]
    _assert_same_steps(got["steps"], want["steps"])
    assert abs(got["final_eval"]["val_loss"] - want["final_eval"]["val_loss"]) <= TOL
    # FSDP moves the weights (all-gathers) and the gradients (reduce-scatters), never an all-reduce
    assert all(s["sent_allgather_bytes"] > 0 and s["sent_reduce_scatter_bytes"] > 0 for s in got["steps"])
    assert all(s["sent_allreduce_bytes"] == 0 for s in got["steps"])
    a, b = load_checkpoint(one_dir).model.state_dict(), load_checkpoint(out / "run").model.state_dict()
    assert a.keys() == b.keys()
    for k in a:  # written by 2 FSDP ranks, loaded whole by one process
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4, msg=lambda m: f"{k}: {m}")


def test_an_fsdp_checkpoint_resumes_on_one_and_on_four_ranks(reference, corpus_dir, cache_dir, tmp_path):
    run, _, want = reference
    dirs = (corpus_dir, cache_dir)
    first_dir = tmp_path / "two"  # 2 FSDP ranks to step 2
    first = _run_ranks(2, _run(dirs, first_dir, max_steps=2), first_dir, tmp_path / "a.json")
    for name, continue_on in (("one", 1), ("four", 4)):  # its step-2 checkpoint, continued to step 4
        out = tmp_path / f"two_then_{name}"
        shutil.copytree(first_dir, out)
        # 4 ranks: FSDP splits the 2-row and 3-row parameters unevenly, some ranks hold none of them
        second = _run_one(_run(dirs, out), out) if continue_on == 1 else \
            _run_ranks(4, _run(dirs, out), out, tmp_path / "b.json")
        _assert_same_steps(first["steps"] + second["steps"], want["steps"])


def test_fsdp_with_muon_matches_one_process(corpus_dir, cache_dir, tmp_path):
    run = _run((corpus_dir, cache_dir), tmp_path / "one", optimizer="muon", max_steps=2, eval_every=2, save_every=2)
    want = _run_one(run, tmp_path / "one")
    got = _run_ranks(2, run, tmp_path / "two", tmp_path / "two.json")
    _assert_same_steps(got["steps"], want["steps"])


def _plan_worker(config: dict, record: str) -> None:
    """Build the tiny model under FSDP2 on this rank (rank 0 saves the gathered initial dense weights), take
    one Muon step and add up what it holds."""
    from torch.distributed.tensor import DTensor

    from engram.config import ModelConfig, TrainConfig
    from engram.distributed.fsdp import full_model_state
    from engram.distributed.parallelize import parallelize
    from engram.model.transformer import EngramLM
    from engram.train.optim import Optimizers

    model_config = ModelConfig.from_dict(config)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = EngramLM(model_config)
    par = parallelize(model, torch.device("cpu"), strategy="fsdp")
    opt = Optimizers(model, TrainConfig(optimizer="muon"), par.table_squares_reduce, par.dense_squares_reduce)
    tables = {id(t.weight) for t in model.named_tables().values()}
    initial = full_model_state(model, {f"{name}.weight" for name in model.named_tables()}, keep=dist.get_rank() == 0)
    if dist.get_rank() == 0:
        torch.save(initial, record + ".initial.pt")
    ids = torch.randint(0, model_config.backbone.vocab_size, (2, 16), generator=torch.Generator().manual_seed(dist.get_rank()))
    model(ids, labels=ids).loss.backward()
    held = {"table_params": 0, "dense_params": 0, "dense_grads": 0, "table_optimizer": 0, "dense_optimizer": 0}
    grad_storages = set()
    for p in model.parameters():
        if id(p) in tables:
            held["table_params"] += p.numel() * p.element_size()
            continue
        held["dense_params"] += p.to_local().untyped_storage().nbytes()  # FSDP's padded shard
        grad_storages.add((p.grad.to_local().untyped_storage().data_ptr(), p.grad.to_local().untyped_storage().nbytes()))
    held["dense_grads"] = sum(n for _, n in grad_storages)  # FSDP's reduce-scatter outputs (one per unit)
    opt.clip_grad_norm(1.0)
    opt.step()
    for o in opt.all:
        for p, state in o.state.items():
            for v in state.values():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    local = v.to_local() if isinstance(v, DTensor) else v
                    key = "table_optimizer" if id(p) in tables else "dense_optimizer"
                    held[key] += local.numel() * local.element_size()
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, held)
    if dist.get_rank() == 0:
        with open(record, "w") as f:
            json.dump(gathered, f)


def test_fsdp_builds_one_process_weights_and_the_memory_plan_is_what_the_ranks_materialise(tmp_path):
    from engram.distributed.plan import memory_plan
    from engram.model.transformer import EngramLM
    from engram.presets import get_preset

    config = get_preset("tiny-engram")
    spawn_group(2, _plan_worker, config.to_dict(), str(tmp_path / "held.json"))
    # built block by block on 2 ranks, the initial weights are one process's, bit for bit
    torch.manual_seed(0)
    whole = EngramLM(config).state_dict()
    initial = torch.load(str(tmp_path / "held.json") + ".initial.pt")
    assert initial.keys() == {k for k in whole if not k.endswith("engram.embedding.weight")}
    for k, v in initial.items():
        assert torch.equal(v, whole[k]), k
    held = json.loads((tmp_path / "held.json").read_text())
    plan = memory_plan(config, world=2, strategy="fsdp", optimizer="muon")
    for rank, got in enumerate(held):
        want = plan.ranks[rank]
        assert got == {k: getattr(want, k) for k in got}, (rank, got, want)


def test_a_model_without_tables_resumes_under_fsdp_with_muon(corpus_dir, cache_dir, tmp_path):
    """The MoE baseline: FSDP shards every weight, rank 0 writes the whole checkpoint, the resumed ranks
    cut the whole moments (AdamW's and Muon's momentum) back to their shards."""
    def moe(out, max_steps=3):  # step 3's loss follows update 2, which reads step 1's saved momentum
        run = tiny_run(corpus_dir, cache_dir, out, **_settings(max_steps=max_steps, eval_every=1, save_every=1,
                                                                optimizer="muon"))
        return dataclasses.replace(run, model=dataclasses.replace(run.model, engram=None))

    want = _run_one(moe(tmp_path / "one"), tmp_path / "one")
    first = _run_ranks(2, moe(tmp_path / "two", max_steps=1), tmp_path / "two", tmp_path / "a.json")
    second = _run_ranks(2, moe(tmp_path / "two"), tmp_path / "two", tmp_path / "b.json")
    assert not first["tables_sharded"] and first["dense_sharded"]
    _assert_same_steps(first["steps"] + second["steps"], want["steps"])
    assert abs(second["final_eval"]["val_loss"] - want["final_eval"]["val_loss"]) <= TOL


@pytest.mark.parametrize("world", [1500, 4099])
def test_a_plan_for_many_ranks_lists_one_rank_per_class_and_the_same_numbers(world, monkeypatch):
    """Past ALL_RANKS the plan lists one rank per run of equal ranks: every rank's numbers are still those of
    the listed rank before it, so the largest total is the one an all-rank plan gives."""
    from engram.distributed import plan as P
    from engram.presets import get_preset

    config = get_preset("tiny-engram")
    few = P.memory_plan(config, world, "fsdp", "adamw")
    assert not few.every_rank and len(few.ranks) < 200 and few.ranks[-1].rank == world - 1
    monkeypatch.setattr(P, "ALL_RANKS", world)
    every = P.memory_plan(config, world, "fsdp", "adamw")
    assert every.every_rank and len(every.ranks) == world
    listed = {r.rank: r for r in few.ranks}
    last = None
    for r in every.ranks:  # each rank equals the closest listed rank at or before it
        last = listed.get(r.rank, last)
        assert dataclasses.replace(r, rank=0) == dataclasses.replace(last, rank=0)
    assert few.to_dict()["max_total"] == every.to_dict()["max_total"]


def test_a_plan_for_a_billion_ranks_returns():
    from engram.distributed.plan import memory_plan
    from engram.presets import get_preset

    plan = memory_plan(get_preset("tiny-engram"), 10**9, "fsdp", "adamw")
    assert plan.world == 10**9 and plan.ranks[-1].rank == 10**9 - 1

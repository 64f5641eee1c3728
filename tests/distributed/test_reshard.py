"""Sharded checkpoints between world sizes: 2 ranks -> 1 process -> 4 ranks -> 2 ranks keeps every table
row and every SparseAdam moment bit for bit, and broken shards are refused by name."""

import pytest
import torch
from safetensors import safe_open

from support import spawn_group, tiny_run
from engram.distributed import Parallel, materialise, shard_tables
from engram.train import CheckpointError, Optimizers, load_checkpoint, open_checkpoint, save_checkpoint, train


def _train(run_dict, out_dir):
    from engram.config import RunConfig

    train(RunConfig.from_dict(run_dict), out_dir=out_dir, progress=False)


def _reshard(src, dst):
    """Load any checkpoint on this group's ranks and save it again, sharded over them: each rank
    allocates and reads only its own block of every table."""
    ckpt = open_checkpoint(src)
    model = ckpt.build_model()  # on meta
    shard_tables(model)
    materialise(model, torch.device("cpu"), init_tables=False)
    optimizers = Optimizers(model, ckpt.run_config.train)
    parallel = Parallel(model, torch.device("cpu"))
    parallel.restore(ckpt, optimizers)
    parallel.save_checkpoint(dst, ckpt.step, optimizers.state_dict(), ckpt.run_config, ckpt.tokenizer,
                             ckpt.trainer_state)


def _tables(path) -> dict[str, torch.Tensor]:
    """Every stored table tensor (rows and moments), whole, as one process loads them."""
    ckpt = load_checkpoint(path)
    state = ckpt.optimizer_state()["tables"]["state"]
    out = {}
    for i, (name, table) in enumerate(ckpt.model.named_tables().items()):
        out[f"{name}.weight"] = table.weight.detach()
        for m in ("exp_avg", "exp_avg_sq"):
            out[f"{name}.{m}"] = state[i][m]
    return out


def _shard_tensors(ckpt_dir) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted((ckpt_dir / "tables").glob("shard-*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out |= {f"{f.name}/{k}": st.get_tensor(k) for k in st.keys()}
    return out


def _train_recording_writers(run_dict, out_dir, marks):
    """``_train``, leaving a mark for every rank that writes a checkpoint file of its own."""
    from pathlib import Path

    import torch.distributed as dist
    from engram import fileio

    write_json = fileio.atomic_write_json

    def recording(path, data, *args, **kwargs):
        if "checkpoints" in str(path):
            Path(marks, f"rank{dist.get_rank()}").touch()
        return write_json(path, data, *args, **kwargs)

    fileio.atomic_write_json = recording
    _train(run_dict, out_dir)


def test_a_model_without_tables_is_saved_by_rank_0_alone(corpus_dir, cache_dir, tmp_path):
    """No sharded table makes no collective; every rank saving the whole checkpoint would race on it."""
    from engram.presets import get_preset

    run = tiny_run(corpus_dir, cache_dir, tmp_path / "run", max_steps=2, eval_every=2, save_every=1, batch_size=4)
    run.model = get_preset("tiny-moe").without_data()
    marks = tmp_path / "marks"
    marks.mkdir()
    spawn_group(2, _train_recording_writers, run.to_dict(), str(tmp_path / "run"), str(marks))
    assert sorted(p.name for p in marks.iterdir()) == ["rank0"]
    assert load_checkpoint(tmp_path / "run").step == 2


@pytest.fixture(scope="module")
def two_rank_checkpoint(corpus_dir, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    run = tiny_run(corpus_dir, cache_dir, out, max_steps=2, eval_every=2, save_every=2, batch_size=4)
    spawn_group(2, _train, run.to_dict(), str(out))
    return load_checkpoint(out).path


def test_round_trip_2_1_4_2_keeps_every_row(two_rank_checkpoint, tmp_path):
    original = _tables(two_rank_checkpoint)  # whole tables and moments, read from 2 shards
    assert any(v.abs().sum() > 0 for k, v in original.items() if k.endswith("exp_avg"))
    assert all(v.shape[0] % 4 for v in original.values())  # 4 ranks split the rows unevenly
    # 2 -> 1: one process loads whole tables and writes a plain checkpoint
    ckpt = load_checkpoint(two_rank_checkpoint)
    one = save_checkpoint(tmp_path / "one", ckpt.step, ckpt.model, ckpt.optimizer_state(), ckpt.run_config,
                          ckpt.tokenizer, ckpt.trainer_state)
    assert not (one / "tables").exists()
    # 1 -> 4 -> 2
    spawn_group(4, _reshard, str(one), str(tmp_path / "four"))
    four = load_checkpoint(tmp_path / "four").path
    assert len(list((four / "tables").glob("shard-*-of-00004.safetensors"))) == 4
    spawn_group(2, _reshard, str(four), str(tmp_path / "two_again"))
    again = load_checkpoint(tmp_path / "two_again").path

    for path in (one, four, again):
        got = _tables(path)
        assert got.keys() == original.keys()
        assert all(torch.equal(got[k], original[k]) for k in original), path
    # the shard files themselves are the same bytes' worth of tensors as the first ones
    a, b = _shard_tensors(two_rank_checkpoint), _shard_tensors(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # and the dense part survived too
    x, y = load_checkpoint(two_rank_checkpoint).model.state_dict(), load_checkpoint(again).model.state_dict()
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_a_damaged_shard_is_refused_by_name(two_rank_checkpoint, tmp_path):
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(two_rank_checkpoint, copy)
    shard = copy / "tables" / "shard-00001-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="shard-00001-of-00002.safetensors is corrupted"):
        load_checkpoint(copy)
    shard.unlink()
    with pytest.raises(CheckpointError, match="shard-00001-of-00002.safetensors is missing"):
        load_checkpoint(copy)

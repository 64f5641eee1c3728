"""`torchrun --nproc_per_node=2 -m engram.cli train` on the CPU (gloo): one run over 2 ranks, as one process would train it."""

import json
import os
import subprocess
import sys

import pytest

from engram.train import load_checkpoint


@pytest.mark.parametrize("parallel, placement", [("ddp", "dense weights replicated (DDP)"),
                                                 ("fsdp", "dense weights sharded by FSDP2")])
def test_torchrun_trains_with_sharded_tables(corpus_dir, cache_dir, tmp_path, parallel, placement):
    out = tmp_path / "run"
    flags = [f"data.source={corpus_dir}", "data.vocab_size=300", "data.val_fraction=0.2", f"data.cache_dir={cache_dir}",
             "train.max_steps=3", "train.batch_size=4", "train.seq_len=32", "train.eval_batches=1",
             "train.warmup_steps=1", f"train.parallel={parallel}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "engram.cli", "train", "--preset", "tiny-engram", "--out", str(out), "--no-progress"]
    for flag in flags:
        cmd += ["--set", flag]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])  # printed once, by rank 0
    assert summary["ranks"] == 2 and summary["steps"] == 3 and summary["val_loss"] > 0
    assert done.stderr.count("tables sharded by rows") == 1 and placement in done.stderr
    ckpt = load_checkpoint(out)
    assert ckpt.step == 3 and ckpt.sharded
    assert len(list((ckpt.path / "tables").glob("shard-*-of-00002.safetensors"))) == 2


def test_odd_global_batch_is_refused(corpus_dir, cache_dir, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "engram.cli", "train", "--preset", "tiny-engram", "--out", str(tmp_path / "run"), "--no-progress",
           "--set", f"data.source={corpus_dir}", "--set", "data.vocab_size=300", "--set", "data.val_fraction=0.2",
           "--set", f"data.cache_dir={cache_dir}", "--set", "train.batch_size=3"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode != 0
    assert "batch_size=3 is the global batch and must divide evenly over 2 ranks" in done.stderr

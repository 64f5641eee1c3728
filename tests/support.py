"""Helpers shared by test modules, importable as ``support`` (pyproject puts tests/ on pythonpath).

Test directories have no __init__.py, so ``from conftest import ...`` would resolve to whichever
conftest.py was imported first; helpers live here under a unique name instead.
"""

import os
import random
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import engram.distributed.runtime as runtime

from engram.config import DataConfig, RunConfig, TrainConfig
from engram.presets import get_preset


def assert_causal(model, vocab_size: int, T: int = 40, t: int = 23) -> None:
    """Changing tokens after t never changes logits at positions <= t, and does change later ones
    (docs/PITFALLS.md §17). Makes every Engram conv non-trivial first, so its causality is exercised too."""
    model.eval()
    with torch.no_grad():
        for layer in model.engram_layers.values():
            if getattr(layer, "conv_weight", None) is not None:
                layer.conv_weight.normal_()
    ids = torch.randint(0, vocab_size, (2, T))
    changed = ids.clone()
    changed[:, t + 1:] = torch.randint(0, vocab_size, (2, T - t - 1))
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], atol=1e-5, rtol=0)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def roughen_decode_state(model) -> None:
    """Trained-looking conv taps, MoE expert bias and OverEncoding rows (they start at zero or one), and
    sharper attention (at init q.k is near 0 and attention near uniform, so a wrong cached key would
    hardly move a logit): a decoder that dropped or misplaced any of its state gives other logits."""
    with torch.no_grad():
        for blk in model.layers:
            for name in ("wq", "wk", "wq_b", "wkv_a"):  # the query and key projections (GQA or MLA)
                if hasattr(blk.attn, name):
                    getattr(blk.attn, name).weight.mul_(10)
        for layer in model.engram_layers.values():
            if getattr(layer, "conv_weight", None) is not None:
                layer.conv_weight.normal_()
        for moe in model.moe_layers():
            moe.expert_bias.normal_(std=0.1)
        if model.overencoding is not None:
            model.overencoding.embedding.weight.normal_()


def decode_error(model, chunk: int, lengths=(7, 1, 13), new: int = 12, vocab_size: int = 512, pad_id: int = 2,
                 seed: int = 1) -> float:
    """Left-padded prompts of ``lengths`` (one shorter than the n-gram and conv lookbacks) through
    ``model.new_cache``: one prefill, then ``new`` tokens ``chunk`` at a time. Returns the worst absolute
    logit difference against one full forward of each whole sequence alone."""
    from engram.infer import left_pad

    model.eval()
    gen = torch.Generator().manual_seed(seed)
    sequences = [torch.randint(3, vocab_size, (n + new,), generator=gen).tolist() for n in lengths]
    ids, starts = left_pad([s[:n] for s, n in zip(sequences, lengths)], pad_id=pad_id)
    cache = model.new_cache(starts, ids.shape[1] + new)
    with torch.no_grad():
        prefill = model(ids, cache=cache).logits  # (B, T0, V)
        steps = []
        for s in range(0, new, chunk):
            block = torch.tensor([seq[n + s: n + min(s + chunk, new)] for seq, n in zip(sequences, lengths)])
            steps.append(model(block, cache=cache).logits)
        decoded = torch.cat(steps, dim=1)  # (B, new, V)
        worst = 0.0
        for b, (seq, n) in enumerate(zip(sequences, lengths)):
            ref = model(torch.tensor([seq])).logits[0]  # (T, V)
            worst = max(worst, (prefill[b, ids.shape[1] - n:] - ref[:n]).abs().max().item())
            # decoded[:, s] is the prediction after feeding token n+s, i.e. the full forward's position n+s
            worst = max(worst, (decoded[b] - ref[n: n + new]).abs().max().item())
    return worst


def assert_greedy_matches_recomputing(model, new: int = 10) -> None:
    """Cached greedy generation of three prompts of different lengths equals taking the argmax of one
    full forward of the whole prefix at every step."""
    from engram.infer import generate_batch

    prompts = [[5, 17, 99, 4], [300], [8, 9, 10, 11, 12, 13, 14, 15]]
    cached = generate_batch(model, prompts, new, temperature=0.0)
    for prompt, out in zip(prompts, cached):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(new):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        assert out == seq[len(prompt):]


def train_step(model, vocab_size: int, lr: float = 1e-2) -> dict[str, torch.Tensor]:
    """Forward + backward + one step of the project's optimizers; returns the parameters before it."""
    from engram.train.optim import Optimizers

    model.train()
    opt = Optimizers(model, TrainConfig(lr=lr, warmup_steps=0))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, vocab_size, (2, 16))
    loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    opt.clip_grad_norm(1.0)
    opt.step()
    opt.zero_grad()
    return before


def devices() -> list[str]:
    """CPU always; CUDA too when present (GPU cases skip cleanly otherwise)."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def write_corpus(root, n_files=24, seed=0):
    """A few KB of learnable, Python-like text in many small files (documents)."""
    rng = random.Random(seed)
    names = ["alpha", "beta", "gamma", "delta", "omega"]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = []
        for j in range(rng.randint(6, 12)):
            name = rng.choice(names)
            lines.append(f"def {name}_{j}(x):\n    return x + {j} * {name}_{j - 1}(x)\n")
        (root / f"mod_{i:03d}.py").write_text("".join(lines))
    return root


def tiny_run(corpus_dir, cache_dir, out_dir, **train) -> RunConfig:
    settings = dict(max_steps=12, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=4,
                    eval_batches=2, log_every=1, save_every=4, out_dir=str(out_dir))
    settings.update(train)
    return RunConfig(model=get_preset("tiny-engram").without_data(),
                     data=DataConfig(source=str(corpus_dir), vocab_size=300, val_fraction=0.2, cache_dir=str(cache_dir)),
                     train=TrainConfig(**settings))


def train_one_process(run: RunConfig, out_dir) -> dict:
    """``train`` in this process: each step's loss and gradient norm, and the final evaluation."""
    from engram.train import train

    steps = []
    result = train(run, out_dir=out_dir, progress=False,
                   on_step=lambda step, m: steps.append({k: m[k] for k in ("step", "loss", "grad_norm")}))
    return {"steps": steps, "final_eval": result.final_eval}


def train_on_ranks(world: int, worker, run: RunConfig, out_dir, record) -> dict:
    """``worker(run_dict, out_dir, record)`` on ``world`` spawned ranks; returns the JSON rank 0 wrote."""
    import json

    spawn_group(world, worker, run.to_dict(), str(out_dir), str(record))
    return json.loads(record.read_text())


def spawn_group(world: int, fn, *args, backend: str = "gloo") -> None:
    """Run ``fn(*args)`` in ``world`` fresh processes joined in one process group (one thread each);
    ``fn`` reads its rank from ``torch.distributed``. It must be a module-level function of a test
    module, so the spawned processes can import it. A failure in any process fails the call."""
    with socket.socket() as s:  # a free port for the group's rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_run_in_group, args=(world, port, backend, fn, args), nprocs=world)


def _run_in_group(rank: int, world: int, port: int, backend: str, fn, args) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        fn(*args)
    finally:
        runtime.shutdown()


def record_tensor_reads(monkeypatch, module) -> list[str]:
    """Replace ``module.safe_open`` (``safetensors``, or a module that imported it) with one that records
    the name of every tensor whose data is read: ``get_tensor``, or indexing a ``get_slice`` (opening a
    slice reads only its header). Returns the list it appends to."""
    read, real = [], module.safe_open

    class Slice:
        def __init__(self, name, inner):
            self.name, self.inner = name, inner

        def __getitem__(self, index):
            read.append(self.name)
            return self.inner[index]

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    class Recording:
        def __init__(self, *args, **kwargs):
            self.inner = real(*args, **kwargs)

        def __enter__(self):
            self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def get_slice(self, name):
            return Slice(name, self.inner.get_slice(name))

        def get_tensor(self, name):
            read.append(name)
            return self.inner.get_tensor(name)

    monkeypatch.setattr(module, "safe_open", Recording)
    return read

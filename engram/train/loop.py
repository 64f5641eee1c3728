"""The training loop: ``train(run_config)`` prepares data, builds the model, trains, evaluates, saves.

Determinism: the model is initialised from ``train.seed``; the batch of micro-step s is a pure
function of (seed, s) (``TokenShards.batch``); nothing else draws random numbers. Resuming from a
checkpoint therefore continues bit-identically (tested by killing a run and resuming it).

Data parallelism (``torchrun``, see docs/DISTRIBUTED.md): when ``train`` runs inside a process group of
W > 1 ranks, ``batch_size`` stays the *global* batch. Every rank draws the same global batch and
trains on its W-th of the rows; the hashed tables are row-sharded over the ranks (``shard_tables``)
and the dense parameters run under DistributedDataParallel. The run is then the single-process run
up to float rounding: same batches, averaged gradients, one global clipping norm, MoE balancing on
the summed load, and checkpoints that load on any number of ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from engram.config import ModelConfig, RunConfig
from engram.distributed import runtime as rt
from engram.distributed.sharded import TRAFFIC, shard_tables
from engram.model.accounting import count_parameters
from engram.model.transformer import EngramLM
from engram.train.allocator import fix_mmap_threshold
from engram.train.checkpoint import latest_checkpoint, load_checkpoint, restore_training_state, save_checkpoint
from engram.train.optim import Optimizers, learning_rate, named_tables


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    train_seconds: float
    tokens_per_s: float
    final_eval: dict
    evals: list[dict] = field(default_factory=list)
    checkpoint: Path | None = None
    parameters: dict = field(default_factory=dict)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"TrainConfig.device={name!r} but CUDA is not available")
    return device


def autocast(device: torch.device):
    """bf16 autocast on CUDA; fp32 on CPU (bf16 is emulated there and ~300x slower)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def evaluate(model: EngramLM, shards, batch_size: int, seq_len: int, max_batches: int,
             device: torch.device, distributed: bool = False) -> dict:
    """Mean next-token loss (nats) over fixed validation windows, and bits per byte.

    Bits per byte uses the split's average bytes per token, so it compares models across tokenizers.
    ``distributed``: every rank of the process group calls this and evaluates its share of each batch.
    """
    was_training = model.training
    model.eval()
    loss, count = mean_loss(model, shards.eval_batches(batch_size, seq_len, max_batches), device, distributed)
    model.train(was_training)
    if count == 0:
        raise ValueError("the validation split is too small for one evaluation window")
    return {"val_loss": loss, "val_bpb": loss / math.log(2) / shards.bytes_per_token, "val_tokens": count}


@torch.no_grad()
def mean_loss(model: EngramLM, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
              device: torch.device, distributed: bool = False) -> tuple[float, int]:
    """(mean next-token loss in nats, predicted tokens) over ``(ids, boundary)`` batches, each batch
    weighted by its B*(T-1) predictions; the model's train/eval mode is left as it is.

    ``distributed``: each rank takes its rows of every batch (all of them, counted once, when a batch
    has fewer rows than ranks: sharded tables need every rank in every forward) and the sums are
    all-reduced, so every rank returns the whole result."""
    world, rank = (rt.world_size(), rt.rank()) if distributed else (1, 0)
    total, count = 0.0, 0
    for ids, boundary in batches:
        counted = True
        if world > 1 and ids.shape[0] >= world:
            ids = ids.tensor_split(world)[rank]
            boundary = None if boundary is None else boundary.tensor_split(world)[rank]
        elif world > 1:
            counted = rank == 0
        ids = ids.to(device)
        boundary = None if boundary is None else boundary.to(device)
        with autocast(device):
            out = model(ids, labels=ids, boundary=boundary)
        if counted:
            n = ids.shape[0] * (ids.shape[1] - 1)
            total += out.loss.item() * n
            count += n
    if world > 1:
        total, count = rt.sum_over_ranks([total, float(count)], device)
        count = int(count)
    return (total / count if count else math.nan), count


class MetricsLog:
    """Append-only JSONL; on resume, entries after the resumed step are dropped (one history)."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def train(run: RunConfig, out_dir: str | Path | None = None, resume: bool = True, progress: bool = True,
          on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train ``run`` into ``out_dir`` (default ``run.train.out_dir``), resuming from its latest checkpoint.

    ``on_step(step, metrics)`` is called after every optimizer step (logging hooks, tests). Inside a
    process group of several ranks every rank calls ``train`` with the same arguments (see the module
    docstring); rank 0 alone prints, logs and writes the replicated checkpoint files.
    """
    from engram.data import prepare_data

    tc = run.train
    fix_mmap_threshold()  # consistent step times on glibc (see engram/train/allocator.py)
    distributed, world, rank = rt.is_distributed(), rt.world_size(), rt.rank()
    main = rank == 0
    if tc.batch_size % world:
        raise ValueError(f"train.batch_size={tc.batch_size} is the global batch and must divide evenly over "
                         f"{world} ranks")
    run_dir = Path(out_dir or tc.out_dir)
    device = rt.local_device(resolve_device(tc.device))
    if distributed:
        rt.check_backend(device)
    if main:  # rank 0 builds the tokenizer and token caches; the others then read them
        prepared = prepare_data(run.data)
    rt.barrier()
    if not main:
        prepared = prepare_data(run.data)
    run = dataclasses.replace(run, model=run.model.with_data(prepared.vocab_size, prepared.pad_id))

    ckpt_path = latest_checkpoint(run_dir) if resume else None
    # ranks build on the host and move only their block of each table to the device
    build_device = torch.device("cpu") if distributed else device
    if ckpt_path is not None:
        # ranks read only their own table rows, below; one process reads whole tables (any layout)
        ckpt = load_checkpoint(ckpt_path, device=build_device, tokenizer=prepared.tokenizer, tables=not distributed)
        if ckpt.run_config.model != run.model:
            raise ValueError(f"{run_dir} holds a checkpoint of a different model; use another --out or --no-resume")
        model, start = ckpt.model, ckpt.step
    else:
        torch.manual_seed(tc.seed)
        model, start = EngramLM(run.model, prepared.compressed).to(build_device), 0
    model.train()
    if distributed and named_tables(model):
        shard_tables(model)
    model.to(device)
    optimizers = Optimizers(model, tc)
    if ckpt_path is not None:
        state = restore_training_state(ckpt, model, optimizers)
        torch.set_rng_state(state["torch_rng"])
    net = rt.wrap_ddp(model, device) if distributed else model  # forward/backward go through net

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(run.to_dict(), indent=2) + "\n")
    log = MetricsLog(run_dir / "metrics.jsonl", start if ckpt_path is not None else None) if main else None
    counts = count_parameters(run.model, tc.seq_len).to_dict()
    if main:
        print(f"[engram] run {run_dir}: P_tot={counts['total']:,} P_act={counts['active']:,} "
              f"Engram tables={counts['engram_tables']:,}"
              + (f" OverEncoding tables={counts['overencoding_tables']:,}" if counts.get("overencoding_tables") else "")
              + f"; {tc.tokens_per_step:,} tokens/step, "
              f"{tc.max_steps} steps, device {device}" + (f", resuming at step {start}" if start else "")
              + (f"; {world} ranks ({tc.batch_size // world} rows each)" if distributed else "")
              + (", tables sharded by rows" if distributed and named_tables(model) else ""),
              file=sys.stderr)

    def save(step: int, last: dict) -> Path:
        state = {"tokens": step * tc.tokens_per_step, "last": last}
        return save_checkpoint(run_dir, step, model, optimizers.state_dict(), run, prepared.tokenizer, state)

    def evaluate_now() -> dict:
        return evaluate(model, prepared.val, tc.batch_size, tc.seq_len, tc.eval_batches, device, distributed)

    bar = None
    if progress and main:
        from tqdm import tqdm
        bar = tqdm(total=tc.max_steps, initial=start, desc=run_dir.name, unit="step", dynamic_ncols=True)
    evals: list[dict] = []
    train_seconds, trained_tokens, last_ckpt = 0.0, 0, ckpt_path
    metrics: dict = {}
    for step in range(start, tc.max_steps):
        t0 = time.perf_counter()
        sent_before = TRAFFIC.snapshot()
        lr = learning_rate(step, tc)
        optimizers.set_lr(lr)
        loss_sum = 0.0
        for micro in range(tc.grad_accum):
            ids, boundary = prepared.train.batch(step * tc.grad_accum + micro, tc.batch_size, tc.seq_len, tc.seed)
            if distributed:  # this rank's rows of the global batch
                ids, boundary = ids.chunk(world)[rank], boundary.chunk(world)[rank]
            ids, boundary = ids.to(device), boundary.to(device)
            # DDP all-reduces the dense gradients once per step, after the last micro-batch
            last_micro = micro == tc.grad_accum - 1
            with contextlib.nullcontext() if last_micro or not distributed else net.no_sync():
                with autocast(device):
                    loss = net(ids, labels=ids, boundary=boundary).loss
                (loss / tc.grad_accum).backward()
            loss_sum += loss.item()
        loss_value = rt.mean_over_ranks(loss_sum / tc.grad_accum, device)
        if not math.isfinite(loss_value):
            if bar is not None:
                bar.close()
            where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
            raise TrainingDiverged(f"loss is {loss_value} at step {step + 1} (lr {lr:.3g}); stopping. {where}")
        grad_norm = optimizers.clip_grad_norm(tc.grad_clip)
        optimizers.step()
        optimizers.zero_grad()
        rt.reduce_moe_load(model)  # the whole batch's expert load, so every rank moves the bias alike
        model.update_moe_bias()
        elapsed = time.perf_counter() - t0
        train_seconds += elapsed
        trained_tokens += tc.tokens_per_step
        done = step + 1
        metrics = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                   "tokens": done * tc.tokens_per_step, "tokens_per_s": tc.tokens_per_step / elapsed}
        if distributed:  # what this rank sent to the others during the step
            metrics |= {f"sent_{k}": v - sent_before[k] for k, v in TRAFFIC.snapshot().items()}
        if log is not None and (done % tc.log_every == 0 or done == tc.max_steps):
            log.write({"kind": "train", **metrics})
        if done % tc.eval_every == 0 or done == tc.max_steps:
            result = evaluate_now()
            evals.append({"step": done, "tokens": metrics["tokens"], **result})
            if log is not None:
                log.write({"kind": "eval", "step": done, "tokens": metrics["tokens"], **result})
            metrics.update(result)
        if done % tc.save_every == 0 or done == tc.max_steps:
            last_ckpt = save(done, metrics)
        if bar is not None:
            bar.update(1)
            shown = {"loss": f"{loss_value:.3f}", "tok/s": f"{trained_tokens / train_seconds:,.0f}"}
            if "val_loss" in metrics:
                shown["val"] = f"{metrics['val_loss']:.3f}"
            bar.set_postfix(shown)
        if on_step is not None:
            on_step(done, metrics)
    if bar is not None:
        bar.close()

    final = evals[-1] if evals else evaluate_now()
    return TrainResult(run_dir=run_dir, steps=tc.max_steps, tokens=tc.max_steps * tc.tokens_per_step,
                       train_seconds=train_seconds,
                       tokens_per_s=trained_tokens / train_seconds if train_seconds else 0.0,
                       final_eval=final, evals=evals, checkpoint=last_ckpt, parameters=counts)

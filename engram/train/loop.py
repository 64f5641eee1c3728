"""The training loop: ``train(run_config)`` prepares data, builds the model, trains, evaluates, saves.

Determinism: the model is initialised from ``train.seed``; the batch of micro-step s is a pure
function of (seed, s) (``TokenShards.batch``); nothing else draws random numbers. Resuming from a
checkpoint therefore continues bit-identically (tested by killing a run and resuming it).
"""

from __future__ import annotations

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
from engram.experiments.accounting import count_parameters
from engram.model.transformer import EngramLM
from engram.train.allocator import fix_mmap_threshold
from engram.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from engram.train.optim import Optimizers, learning_rate


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


def align_to_data(model: ModelConfig, vocab_size: int, pad_id: int) -> ModelConfig:
    """Fields the data decides: the raw vocabulary size and the Engram and OverEncoding pad ids."""
    backbone = dataclasses.replace(model.backbone, vocab_size=vocab_size)
    engram = None if model.engram is None else dataclasses.replace(model.engram, pad_id=pad_id)
    overencoding = None if model.overencoding is None else dataclasses.replace(model.overencoding, pad_id=pad_id)
    return ModelConfig(backbone=backbone, engram=engram, overencoding=overencoding)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; fp32 on CPU (bf16 is emulated there and ~300x slower)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def evaluate(model: EngramLM, shards, batch_size: int, seq_len: int, max_batches: int,
             device: torch.device) -> dict:
    """Mean next-token loss (nats) over fixed validation windows, and bits per byte.

    Bits per byte uses the split's average bytes per token, so it compares models across tokenizers.
    """
    was_training = model.training
    model.eval()
    loss, count = mean_loss(model, shards.eval_batches(batch_size, seq_len, max_batches), device)
    model.train(was_training)
    if count == 0:
        raise ValueError("the validation split is too small for one evaluation window")
    return {"val_loss": loss, "val_bpb": loss / math.log(2) / shards.bytes_per_token, "val_tokens": count}


@torch.no_grad()
def mean_loss(model: EngramLM, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
              device: torch.device) -> tuple[float, int]:
    """(mean next-token loss in nats, predicted tokens) over ``(ids, boundary)`` batches, each batch
    weighted by its B*(T-1) predictions; the model's train/eval mode is left as it is."""
    total, count = 0.0, 0
    for ids, boundary in batches:
        ids = ids.to(device)
        boundary = None if boundary is None else boundary.to(device)
        with autocast(device):
            out = model(ids, labels=ids, boundary=boundary)
        n = ids.shape[0] * (ids.shape[1] - 1)
        total += out.loss.item() * n
        count += n
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

    ``on_step(step, metrics)`` is called after every optimizer step (logging hooks, tests).
    """
    from engram.data import prepare_data

    tc = run.train
    fix_mmap_threshold()  # consistent step times on glibc (see engram/train/allocator.py)
    run_dir = Path(out_dir or tc.out_dir)
    device = resolve_device(tc.device)
    prepared = prepare_data(run.data)
    run = dataclasses.replace(run, model=align_to_data(run.model, prepared.vocab_size, prepared.pad_id))

    ckpt_path = latest_checkpoint(run_dir) if resume else None
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path, device=device, tokenizer=prepared.tokenizer)
        if ckpt.run_config.model != run.model:
            raise ValueError(f"{run_dir} holds a checkpoint of a different model; use another --out or --no-resume")
        model, start = ckpt.model, ckpt.step
    else:
        torch.manual_seed(tc.seed)
        model, start = EngramLM(run.model, prepared.compressed).to(device), 0
    model.train()
    optimizers = Optimizers(model, tc)
    if ckpt_path is not None:
        state = ckpt.optimizer_state()
        optimizers.load_state_dict(state)
        torch.set_rng_state(state["torch_rng"])

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(run.to_dict(), indent=2) + "\n")
    log = MetricsLog(run_dir / "metrics.jsonl", start if ckpt_path is not None else None)
    counts = count_parameters(run.model, tc.seq_len).to_dict()
    print(f"[engram] run {run_dir}: P_tot={counts['total']:,} P_act={counts['active']:,} "
          f"Engram tables={counts['engram_tables']:,}"
          + (f" OverEncoding tables={counts['overencoding_tables']:,}" if counts.get("overencoding_tables") else "")
          + f"; {tc.tokens_per_step:,} tokens/step, "
          f"{tc.max_steps} steps, device {device}" + (f", resuming at step {start}" if start else ""),
          file=sys.stderr)

    def save(step: int, last: dict) -> Path:
        state = {"tokens": step * tc.tokens_per_step, "last": last}
        return save_checkpoint(run_dir, step, model, optimizers.state_dict(), run, prepared.tokenizer, state)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=tc.max_steps, initial=start, desc=run_dir.name, unit="step", dynamic_ncols=True)
    evals: list[dict] = []
    train_seconds, trained_tokens, last_ckpt = 0.0, 0, ckpt_path
    metrics: dict = {}
    for step in range(start, tc.max_steps):
        t0 = time.perf_counter()
        lr = learning_rate(step, tc)
        optimizers.set_lr(lr)
        loss_sum = 0.0
        for micro in range(tc.grad_accum):
            ids, boundary = prepared.train.batch(step * tc.grad_accum + micro, tc.batch_size, tc.seq_len, tc.seed)
            ids, boundary = ids.to(device), boundary.to(device)
            with autocast(device):
                loss = model(ids, labels=ids, boundary=boundary).loss
            (loss / tc.grad_accum).backward()
            loss_sum += loss.item()
        loss_value = loss_sum / tc.grad_accum
        if not math.isfinite(loss_value):
            if bar is not None:
                bar.close()
            where = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
            raise TrainingDiverged(f"loss is {loss_value} at step {step + 1} (lr {lr:.3g}); stopping. {where}")
        grad_norm = optimizers.clip_grad_norm(tc.grad_clip)
        optimizers.step()
        optimizers.zero_grad()
        model.update_moe_bias()
        elapsed = time.perf_counter() - t0
        train_seconds += elapsed
        trained_tokens += tc.tokens_per_step
        done = step + 1
        metrics = {"step": done, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                   "tokens": done * tc.tokens_per_step, "tokens_per_s": tc.tokens_per_step / elapsed}
        if done % tc.log_every == 0 or done == tc.max_steps:
            log.write({"kind": "train", **metrics})
        if done % tc.eval_every == 0 or done == tc.max_steps:
            result = evaluate(model, prepared.val, tc.batch_size, tc.seq_len, tc.eval_batches, device)
            evals.append({"step": done, "tokens": metrics["tokens"], **result})
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

    final = evals[-1] if evals else evaluate(model, prepared.val, tc.batch_size, tc.seq_len, tc.eval_batches, device)
    return TrainResult(run_dir=run_dir, steps=tc.max_steps, tokens=tc.max_steps * tc.tokens_per_step,
                       train_seconds=train_seconds,
                       tokens_per_s=trained_tokens / train_seconds if train_seconds else 0.0,
                       final_eval=final, evals=evals, checkpoint=last_ckpt, parameters=counts)

"""``finetune``: train an Engram adapter on a frozen pretrained transformers model (``engram finetune``).

Only the adapter learns: SparseAdam for its tables at ``table_lr_mult`` x the rate, AdamW for the rest
(``engram.train.Optimizers``), the same schedule as ``engram train``. The run directory works as in
``engram train`` (``engram.train.rundir``, docs/RUNS.md): one process holds its lock, ``--no-resume``
archives the history, killed writes are cleaned up, Ctrl-C/SIGTERM save the last finished step, a NaN
loss stops before anything moves, metrics go to ``metrics.jsonl``. A checkpoint is

    checkpoints/step_NNNNNNN/
      adapter/              EngramAdapter.save: weights, adapter_config.json, hash_layout.json, compressed table
      optimizer.pt          the two optimizers' state and the torch RNG
      trainer_state.json    step, tokens, last metrics
      finetune_config.json  the FinetuneConfig
      manifest.json         every file's size and sha256, written last

The data is tokenized with the base model's own tokenizer (saved in the run as
``base_tokenizer/tokenizer.json``); batches are a pure function of (seed, step) as in ``engram train``, so
a resumed run continues bit-identically on one machine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from engram.config import DataConfig, TrainConfig, _Serialisable
from engram.fileio import atomic_write_json
from engram.retrofit import EngramAdapter, EngramAdapterConfig, attach_engram
from engram.train import checkpoint as ckpt_io
from engram.train.checkpoint import remove_staging
from engram.train import rundir
from engram.train.loop import MetricsLog, StopSignals, TrainingInterrupted, check_splits, evaluate
from engram.train.optim import Optimizers, learning_rate
from engram.train.step import TrainingDiverged


@dataclass
class FinetuneConfig(_Serialisable):
    """base: a transformers model folder (``from_pretrained``); gguf_file: a GGUF file in it to load
    instead (needs the ``gguf`` package); adapter, data, train: as their classes say (``data.tokenizer``
    is always the base model's)."""

    base: str = ""
    gguf_file: str | None = None
    adapter: EngramAdapterConfig = field(default_factory=EngramAdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, max_steps=200, out_dir="runs/finetune"))

    def __post_init__(self) -> None:
        for name, cls in (("adapter", EngramAdapterConfig), ("data", DataConfig), ("train", TrainConfig)):
            if isinstance(getattr(self, name), dict):
                setattr(self, name, cls.from_dict(getattr(self, name)))
        if not isinstance(self.base, str) or not self.base:
            raise ValueError("FinetuneConfig.base: the base model folder is required (--base DIR)")


def load_base(config: FinetuneConfig):
    """(model, tokenizer) of the base, in fp32, in eval mode (dropout off: the frozen base is a function)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    extra = {"gguf_file": config.gguf_file} if config.gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(config.base, **extra)
    model = AutoModelForCausalLM.from_pretrained(config.base, dtype=torch.float32, **extra)
    return model.eval(), tokenizer


class _Scored(torch.nn.Module):
    """The base model with its adapter as the ``model(ids, labels=, boundary=)`` that ``evaluate`` calls:
    the adapter resets its n-grams and conv at the document starts in ``boundary``."""

    def __init__(self, model, adapter: EngramAdapter):
        super().__init__()
        self.model = model
        self.__dict__["adapter"] = adapter  # not a submodule: it is attached to ``model`` already

    def forward(self, ids, labels=None, boundary=None):
        with self.adapter.documents(boundary):
            return self.model(input_ids=ids, labels=labels, use_cache=False)


def finetune(config: FinetuneConfig, out_dir: str | Path | None = None, resume: bool = True, progress: bool = True,
             on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train ``config.adapter`` on the frozen ``config.base`` into ``out_dir``; returns a summary."""
    tc = config.train
    run_dir = Path(out_dir or tc.out_dir)
    with rundir.lock_run(run_dir):
        for path in remove_staging(run_dir):
            print(f"[engram] removed {path}, a checkpoint a killed process did not finish", file=sys.stderr)
        latest = ckpt_io.latest_checkpoint(run_dir) if resume else None
        if resume and latest is None and ckpt_io.list_checkpoints(run_dir):
            raise ckpt_io.CheckpointError(f"{run_dir} holds checkpoints but no 'latest' pointer; "
                                          f"{ckpt_io.recovery_hint(run_dir)}")
        if latest is not None:
            ckpt_io.verify_checkpoint(latest)
        if not config.adapter.freeze_base:
            raise ValueError("adapter.freeze_base=false: engram finetune trains and saves the adapter only; "
                             "train the base too with your own loop (attach_engram(..., freeze_base=False))")
        from engram.train.loop import resolve_device

        device = resolve_device(tc.device)
        model, tokenizer = load_base(config)
        model.to(device)
        data = _prepare(config, tokenizer, run_dir)
        if not resume:
            moved = rundir.start_fresh(run_dir)
            if moved is not None:
                print(f"[engram] --no-resume: the previous history of {run_dir} is kept in {moved}", file=sys.stderr)
        torch.manual_seed(tc.seed)
        if latest is None:
            adapter = attach_engram(model, tokenizer, config.adapter, seed=tc.seed)
        else:
            adapter = EngramAdapter.load(model, latest / "adapter", tokenizer)
        optimizers = Optimizers(adapter, tc)
        step = 0
        if latest is not None:
            stored = torch.load(latest / "optimizer.pt", map_location="cpu", weights_only=True)
            optimizers.load_state_dict(stored["optimizers"])
            torch.set_rng_state(stored["torch_rng"])
            step = json.loads((latest / "trainer_state.json").read_text())["step"]
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", config.to_dict())
        return _loop(config, model, adapter, optimizers, data, run_dir, step, latest, progress, on_step)


def _prepare(config: FinetuneConfig, tokenizer, run_dir: Path):
    """The corpus tokenized by the base model's tokenizer (its file kept in the run)."""
    from engram.data import prepare_data

    file = run_dir / "base_tokenizer" / "tokenizer.json"
    file.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.save(str(file))
    data = prepare_data(dataclasses.replace(config.data, tokenizer=str(file)))
    check_splits(data, config.train.seq_len)
    return data


def _save(run_dir: Path, step: int, adapter: EngramAdapter, optimizers: Optimizers, config: FinetuneConfig,
          metrics: dict) -> Path:
    tmp = ckpt_io.stage(run_dir, step)
    try:
        adapter.save(tmp / "adapter")
        torch.save({"optimizers": optimizers.state_dict(), "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
        atomic_write_json(tmp / "trainer_state.json", {"step": step, "tokens": step * config.train.tokens_per_step,
                                                       "last": metrics}, sort_keys=True)
        atomic_write_json(tmp / "finetune_config.json", config.to_dict(), sort_keys=True)
        return ckpt_io.publish(tmp, step)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _loop(config, model, adapter, optimizers, data, run_dir, step, latest, progress, on_step) -> dict:
    tc = config.train
    log = MetricsLog(run_dir / "metrics.jsonl", step if latest is not None else None)
    device = next(model.parameters()).device
    scored = _Scored(model, adapter).eval()  # the frozen base runs in eval mode (no dropout); evaluate restores it

    def evaluate_now() -> dict:
        return evaluate(scored, data.val, tc.batch_size, tc.seq_len, tc.eval_batches, device)

    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=tc.max_steps, initial=step, desc=run_dir.name, unit="step", dynamic_ncols=True)
    checkpoint, saved, metrics, evals, stopped = latest, step if latest is not None else None, {}, [], 0
    seconds, tokens = 0.0, 0
    with StopSignals(verbose=True) as stop:
        try:
            while step < tc.max_steps:
                start = time.perf_counter()
                lr = learning_rate(step, tc)
                optimizers.set_lr(lr)
                loss_sum = 0.0
                for micro in range(tc.grad_accum):
                    ids, boundary = data.train.batch(step * tc.grad_accum + micro, tc.batch_size, tc.seq_len,
                                                     tc.seed)
                    loss = scored(ids.to(device), labels=ids.to(device), boundary=boundary.to(device)).loss
                    (loss / tc.grad_accum).backward()
                    loss_sum += float(loss.detach())
                loss_value = loss_sum / tc.grad_accum
                if not math.isfinite(loss_value):
                    optimizers.zero_grad()
                    raise TrainingDiverged(f"loss is {loss_value} at step {step + 1} (lr {lr:g}); nothing was "
                                           f"updated; the last checkpoint is {checkpoint}")
                norm = optimizers.clip_grad_norm(tc.grad_clip)
                optimizers.step()
                optimizers.zero_grad()
                step += 1
                seconds += time.perf_counter() - start
                tokens += tc.tokens_per_step
                metrics = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": norm,
                           "tokens": step * tc.tokens_per_step, "tokens_per_s": tokens / seconds}
                if step % tc.log_every == 0 or step == tc.max_steps:
                    log.write({"kind": "train", **metrics})
                if step % tc.eval_every == 0 or step == tc.max_steps:
                    result = evaluate_now()
                    evals.append({"step": step, **result})
                    log.write({"kind": "eval", "step": step, **result})
                    metrics.update(result)
                if step % tc.save_every == 0 or step == tc.max_steps:
                    checkpoint, saved = _save(run_dir, step, adapter, optimizers, config, metrics), step
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({"loss": f"{loss_value:.3f}", "tok/s": f"{tokens / seconds:,.0f}"})
                if on_step is not None:
                    on_step(step, metrics)
                if stop.signum:
                    stopped = stop.signum
                    break
            if stopped and saved != step:
                checkpoint = _save(run_dir, step, adapter, optimizers, config, metrics)
        finally:
            if bar is not None:
                bar.close()
    if stopped:
        raise TrainingInterrupted(stopped, step, checkpoint)
    final = evals[-1] if evals else evaluate_now()
    return {"run_dir": str(run_dir), "steps": step, "tokens": step * tc.tokens_per_step,
            "tokens_per_s": tokens / seconds if seconds else 0.0, "checkpoint": str(checkpoint),
            "adapter_parameters": sum(p.numel() for p in adapter.parameters()), **{k: final[k] for k in final}}

"""The training loop: ``setup`` (data, model, resume, placement) -> ``train_step`` per step -> evaluation,
logging and saving. ``train(run_config)`` is the three together.

Determinism: the model is initialised from ``train.seed``; the batch of micro-step s is a pure
function of (seed, s) (``TokenShards.batch``); nothing else draws random numbers. Resuming from a
checkpoint therefore continues bit-identically (tested by killing a run and resuming it).

Data parallelism (``torchrun``, see docs/DISTRIBUTED.md): when ``train`` runs inside a process group of
W > 1 ranks, ``batch_size`` stays the *global* batch. Every rank draws the same global batch and
trains on its W-th of the rows; ``engram.distributed.parallelize`` row-shards the hashed tables (each
rank allocates only its block) and puts the dense parameters under DistributedDataParallel. The run is
then the single-process run up to float rounding: same batches, averaged gradients, one global
clipping norm, MoE balancing on the summed load, and checkpoints that load on any number of ranks.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from engram.config import RunConfig
from engram.distributed import runtime as rt
from engram.distributed.parallelize import parallelize
from engram.fileio import atomic_write_json, atomic_write_text
from engram.model.accounting import count_parameters
from engram.model.transformer import EngramLM
from engram.train.allocator import fix_mmap_threshold
from engram.train.checkpoint import latest_checkpoint, open_checkpoint
from engram.train.optim import Optimizers
from engram.train.step import TrainingDiverged, TrainState, autocast, train_step

__all__ = ["MetricsLog", "TrainResult", "TrainState", "TrainingDiverged", "evaluate", "mean_loss",
           "resolve_device", "setup", "train", "train_step"]


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
            atomic_write_text(path, "")
        elif path.exists():  # rewritten whole: a crash here keeps the old history, never half of it
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def setup(run: RunConfig, out_dir: str | Path | None = None, resume: bool = True) -> TrainState:
    """Everything before the first step: data (rank 0 prepares it first), the config's derived fields
    from the data, the model built on meta and placed (``parallelize``: sharded, materialised,
    initialised once), the optimizers, and the latest checkpoint of ``out_dir`` when ``resume``."""
    from engram.data import prepare_data

    tc = run.train
    fix_mmap_threshold()  # consistent step times on glibc (see engram/train/allocator.py)
    world = rt.world_size()
    if tc.batch_size % world:
        raise ValueError(f"train.batch_size={tc.batch_size} is the global batch and must divide evenly over "
                         f"{world} ranks")
    run_dir = Path(out_dir or tc.out_dir)
    device = rt.local_device(resolve_device(tc.device))
    if rt.is_main():  # rank 0 builds the tokenizer and token caches; the others then read them
        data = prepare_data(run.data)
    rt.barrier()
    if not rt.is_main():
        data = prepare_data(run.data)
    run = dataclasses.replace(run, model=run.model.with_data(data.vocab_size, data.pad_id))

    ckpt_path = latest_checkpoint(run_dir) if resume else None
    ckpt = None
    if ckpt_path is not None:
        ckpt = open_checkpoint(ckpt_path, tokenizer=data.tokenizer)
        if ckpt.run_config.model != run.model:
            raise ValueError(f"{run_dir} holds a checkpoint of a different model; use another --out or --no-resume")
    torch.manual_seed(tc.seed)
    with torch.device("meta"):
        model = EngramLM(run.model, data.compressed, sparse_tables=True)
    parallel = parallelize(model, device, init_tables=ckpt is None)
    model.train()
    optimizers = Optimizers(model, tc, reduce_table_sq=parallel.table_squares_reduce)
    state = TrainState(run=run, run_dir=run_dir, device=device, data=data, model=model, parallel=parallel,
                       optimizers=optimizers, step=0, last_checkpoint=ckpt_path)
    if ckpt is not None:
        stored = parallel.restore(ckpt, optimizers)
        torch.set_rng_state(stored["torch_rng"])
        state.step = ckpt.step
    return state


def _announce(state: TrainState, counts: dict) -> None:
    tc, par = state.run.train, state.parallel
    print(f"[engram] run {state.run_dir}: P_tot={counts['total']:,} P_act={counts['active']:,} "
          f"Engram tables={counts['engram_tables']:,}"
          + (f" OverEncoding tables={counts['overencoding_tables']:,}" if counts.get("overencoding_tables") else "")
          + f"; {tc.tokens_per_step:,} tokens/step, "
          f"{tc.max_steps} steps, device {state.device}" + (f", resuming at step {state.step}" if state.step else "")
          + (f"; {par.world} ranks ({tc.batch_size // par.world} rows each)" if par.distributed else "")
          + (", tables sharded by rows" if par.tables_sharded else ""),
          file=sys.stderr)


def train(run: RunConfig, out_dir: str | Path | None = None, resume: bool = True, progress: bool = True,
          on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Train ``run`` into ``out_dir`` (default ``run.train.out_dir``), resuming from its latest checkpoint.

    ``on_step(step, metrics)`` is called after every optimizer step (logging hooks, tests). Inside a
    process group of several ranks every rank calls ``train`` with the same arguments (see the module
    docstring); rank 0 alone prints, logs and writes the replicated checkpoint files.
    """
    state = setup(run, out_dir, resume)
    run, tc, par, model = state.run, state.run.train, state.parallel, state.model
    start = state.step
    if par.is_main:
        state.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(state.run_dir / "config.json", run.to_dict())
    log = MetricsLog(state.run_dir / "metrics.jsonl", start if state.last_checkpoint is not None else None) \
        if par.is_main else None
    counts = count_parameters(run.model, tc.seq_len).to_dict()
    if par.is_main:
        _announce(state, counts)

    def evaluate_now() -> dict:
        return evaluate(model, state.data.val, tc.batch_size, tc.seq_len, tc.eval_batches, state.device,
                        par.distributed)

    bar = None
    if progress and par.is_main:
        from tqdm import tqdm
        bar = tqdm(total=tc.max_steps, initial=start, desc=state.run_dir.name, unit="step", dynamic_ncols=True)
    evals: list[dict] = []
    train_seconds, trained_tokens = 0.0, 0
    try:
        while state.step < tc.max_steps:
            metrics = train_step(state)
            done = state.step
            train_seconds += metrics.pop("seconds")
            trained_tokens += tc.tokens_per_step
            if log is not None and (done % tc.log_every == 0 or done == tc.max_steps):
                log.write({"kind": "train", **metrics})
            if done % tc.eval_every == 0 or done == tc.max_steps:
                result = evaluate_now()
                evals.append({"step": done, "tokens": metrics["tokens"], **result})
                if log is not None:
                    log.write({"kind": "eval", "step": done, "tokens": metrics["tokens"], **result})
                metrics.update(result)
            if done % tc.save_every == 0 or done == tc.max_steps:
                trainer_state = {"tokens": done * tc.tokens_per_step, "last": metrics}
                state.last_checkpoint = par.save_checkpoint(state.run_dir, done, state.optimizers.state_dict(), run,
                                                            state.data.tokenizer, trainer_state)
            if bar is not None:
                bar.update(1)
                shown = {"loss": f"{metrics['loss']:.3f}", "tok/s": f"{trained_tokens / train_seconds:,.0f}"}
                if "val_loss" in metrics:
                    shown["val"] = f"{metrics['val_loss']:.3f}"
                bar.set_postfix(shown)
            if on_step is not None:
                on_step(done, metrics)
    finally:
        if bar is not None:
            bar.close()

    final = evals[-1] if evals else evaluate_now()
    par.close()  # the DDP wrapper goes now, not at interpreter exit (see Parallel.close)
    return TrainResult(run_dir=state.run_dir, steps=tc.max_steps, tokens=tc.max_steps * tc.tokens_per_step,
                       train_seconds=train_seconds,
                       tokens_per_s=trained_tokens / train_seconds if train_seconds else 0.0,
                       final_eval=final, evals=evals, checkpoint=state.last_checkpoint, parameters=counts)

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
import os
import signal
import sys
import threading
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
import engram.train.rundir as rundir
from engram.train.allocator import fix_mmap_threshold
from engram.train.checkpoint import (CheckpointError, latest_checkpoint, list_checkpoints, open_checkpoint,
                                     recovery_hint, remove_staging)
from engram.train.optim import Optimizers
from engram.train.step import TrainingDiverged, TrainState, autocast, train_step

__all__ = ["MetricsLog", "StopSignals", "TrainResult", "TrainState", "TrainingDiverged", "TrainingInterrupted",
           "check_splits", "config_changes",
           "evaluate", "mean_loss", "resolve_device", "setup", "train", "train_step"]

# train fields that say where and how fast, not what is learned: never reported as changed on resume
_NOT_COMPARED = {"train.out_dir", "train.device"}


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
        raise ValueError(f"the evaluation data holds no window of {seq_len} tokens (no document, or shard, is that "
                         "long); use a shorter sequence length or more text")
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
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            kept = []
            for number, line in enumerate(lines, start=1):
                try:
                    record = json.loads(line)
                except ValueError:
                    if number == len(lines):  # a line cut by a crash mid-write: it was never complete
                        print(f"[engram] dropping the torn last line of {path}", file=sys.stderr)
                        break
                    raise ValueError(f"{path}:{number} is not valid JSON; repair or remove that line") from None
                if record.get("step", 0) <= resume_step:
                    kept.append(line)
            atomic_write_text(path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path, tail_bytes: int | None = None) -> list[dict]:
    """The records of a metrics log, oldest first. A line that does not parse (a write cut by a crash,
    or the cut first line of a tail) is skipped. ``tail_bytes``: read only the file's last bytes, for
    the latest records of a long log."""
    with open(path, "rb") as f:
        if tail_bytes is not None:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - tail_bytes))
        lines = f.read().decode("utf-8", "replace").splitlines()
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(stored: RunConfig, now: RunConfig) -> list[tuple[str, object, object]]:
    """(dotted field, stored value, new value) for every field that differs, paths compared resolved
    (give both with their data paths absolute); ``train.out_dir`` and ``train.device`` are not compared."""
    a, b = _flatten(stored.to_dict()), _flatten(now.to_dict())
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in _NOT_COMPARED and a.get(k) != b.get(k)]


def _describe(changes) -> str:
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes)


INIT_ONLY_FIELDS = ("table_init_std",)


def _check_resume(ckpt, run: RunConfig, run_dir: Path) -> RunConfig:
    """Refuse a checkpoint of another model or optimizer, naming the fields; report other changed fields.
    Returns the run to continue: a model field that only decides the initial weights (``INIT_ONLY_FIELDS``) cannot
    change a run that has started, so it keeps the checkpoint's value (and says so)."""
    kept = []
    for section in ("engram", "overencoding"):
        old, new = getattr(ckpt.run_config.model, section), getattr(run.model, section)
        if old is None or new is None:
            continue
        for name in INIT_ONLY_FIELDS:
            if hasattr(old, name) and getattr(old, name) != getattr(new, name):
                kept.append(f"model.{section}.{name}={getattr(old, name)!r} (asked {getattr(new, name)!r})")
                new = dataclasses.replace(new, **{name: getattr(old, name)})
        run = dataclasses.replace(run, model=dataclasses.replace(run.model, **{section: new}))
    if kept and rt.is_main():
        print(f"[engram] resuming: keeping the checkpoint's {', '.join(kept)}; it only decides the initial "
              "weights, which this run already has", file=sys.stderr)
    now = dataclasses.replace(run, data=run.data.resolved())
    stored = dataclasses.replace(ckpt.run_config, data=ckpt.data_config)
    changes = config_changes(stored, now)
    model = [c for c in changes if c[0].startswith("model.")]
    if model:
        hint = ""
        if any(k == "model.backbone.document_mask" and old is False for k, old, _ in model):
            hint = ("; it was trained before document-masked attention: --set model.backbone.document_mask=false "
                    "continues it as it was trained")
        raise ValueError(f"{run_dir} holds a checkpoint ({ckpt.path.name}) of a different model ({_describe(model)}); "
                         "use another --out, or --no-resume to start afresh (the old history is moved to "
                         f"{run_dir / rundir.ARCHIVE}){hint}")
    optimizer = [c for c in changes if c[0] == "train.optimizer"]
    if optimizer:  # the checkpoint's optimizer state is the old optimizer's
        raise ValueError(f"{run_dir} holds a checkpoint ({ckpt.path.name}) trained with another optimizer "
                         f"({_describe(optimizer)}): a run resumes with the optimizer it started with; to switch, "
                         "start a new run (another --out) with --init-from this checkpoint")
    if changes and rt.is_main():
        print(f"[engram] resuming {ckpt.path.name} with changed settings (allowed; the run is no longer one "
              f"uninterrupted run of a single config; data is tokenized with the checkpoint's tokenizer): "
              f"{_describe(changes)}", file=sys.stderr)
    return run


# model fields a run started with --init-from may change: the context (YaRN extension), the attention's
# document mask, and what only decided the source run's initial weights
INIT_FROM_MAY_CHANGE = ("model.backbone.max_seq_len", "model.backbone.rope_scaling", "model.backbone.document_mask",
                        "model.engram.table_init_std", "model.overencoding.table_init_std")


def _check_init_from(init, run: RunConfig, run_dir: Path, resume: bool) -> None:
    """Refuse ``init`` (a checkpoint) whose model is another architecture than ``run``'s, naming the fields;
    a YaRN extension whose original length is not the source's context; a source inside the run
    directory that ``--no-resume`` is about to archive."""
    if not resume and Path(init.path).resolve().is_relative_to(Path(run_dir).resolve()):
        raise ValueError(f"train.init_from={run.train.init_from!r} lies inside {run_dir}, whose history --no-resume "
                         "moves to the archive first; copy the checkpoint elsewhere or use another --out")
    source_context = init.run_config.model.backbone.max_seq_len
    scaling, context = run.model.backbone.rope_scaling, run.model.backbone.max_seq_len
    if scaling is not None and scaling.original_max_seq_len != source_context:
        raise ValueError(f"model.backbone.rope_scaling.original_max_seq_len={scaling.original_max_seq_len} but "
                         f"{init.path} was trained with a context of {source_context} tokens; set it to "
                         f"{source_context}")
    if context < source_context:
        raise ValueError(f"model.backbone.max_seq_len={context} is below the context of {init.path} "
                         f"({source_context}); an extension keeps or grows it")
    changed = [c for c in config_changes(init.run_config, run)
               if c[0].startswith("model.") and not c[0].startswith(INIT_FROM_MAY_CHANGE)]
    if changed:
        raise ValueError(f"train.init_from={run.train.init_from!r} ({init.path}) holds another architecture "
                         f"({_describe(changed)}); only {', '.join(f.split('.', 1)[1] for f in INIT_FROM_MAY_CHANGE)} "
                         "may differ")


def check_splits(data, seq_len: int) -> None:
    """Both splits must hold at least one window of ``seq_len`` tokens, before any step is spent."""
    for name, shards in (("training", data.train), ("validation", data.val)):
        longest = max((len(t) for t in shards.tokens), default=0)
        if longest < seq_len:
            raise ValueError(f"the {name} split of {data.directory} has no window of train.seq_len={seq_len} tokens "
                             f"(its longest shard holds {longest}); lower train.seq_len"
                             + (", raise data.val_fraction" if name == "validation" else "")
                             + " or use more text")


def _checkpoint_to_resume(run_dir: Path, resume: bool, resume_from: int | None) -> Path | None:
    """Which checkpoint the run continues from; reads the directory, changes nothing."""
    if not resume:
        return None
    steps = list_checkpoints(run_dir)
    if resume_from is not None:
        chosen = dict(steps).get(resume_from)
        if chosen is None:
            have = ", ".join(str(s) for s, _ in steps) or "none"
            raise CheckpointError(f"{run_dir} has no checkpoint of step {resume_from} (steps: {have})")
        return chosen
    latest = latest_checkpoint(run_dir)
    if latest is None and steps:
        raise CheckpointError(f"{run_dir} holds checkpoints (steps {', '.join(str(s) for s, _ in steps)}) but no "
                              f"'latest' pointer, so which history to continue is unknown; {recovery_hint(run_dir)}; "
                              "or --no-resume to move them to the archive and start afresh")
    return latest


def _prepare(config, ckpt):
    """The run's data: prepared as configured for a new run; for a resumed run, tokenized by the
    checkpoint's own tokenizer (a BPE is never trained again: changed data keeps the run's ids)."""
    from engram.data import load_tokenizer, prepare_data, prepare_with_tokenizer
    from engram.tokenizer import CompressedTokenizer

    if ckpt is None:
        return prepare_data(config)
    if config.tokenizer != "bpe":
        named = CompressedTokenizer.from_pretrained(load_tokenizer(config.tokenizer))
        if named != ckpt.compressed:
            raise CheckpointError(
                f"data.tokenizer={config.tokenizer!r} compresses to V'={named.vocab_size} (sha256 "
                f"{named.sha256[:12]}) but {ckpt.path}'s tables were addressed with V'={ckpt.compressed.vocab_size} "
                f"(sha256 {ckpt.compressed.sha256[:12]}); refusing to resume with another tokenizer")
    return prepare_with_tokenizer(config, ckpt.tokenizer, ckpt.path / "tokenizer" / "tokenizer.json")


def _apply_run_dir(run_dir: Path, resume: bool, resume_from: int | None) -> None:
    """Rank 0, under the run's lock, once every check has passed: archive the history
    (``resume=False``) or rewind to ``resume_from``."""
    if not resume:
        moved = rundir.start_fresh(run_dir)
        if moved is not None:
            print(f"[engram] --no-resume: the previous history of {run_dir} is kept in {moved}", file=sys.stderr)
    elif resume_from is not None:
        _, moved = rundir.rewind(run_dir, resume_from, verify=False)  # setup verified it when opening it
        if moved is not None:
            rundir.copy_metrics(run_dir, moved)
            print(f"[engram] resuming from step {resume_from}: the later checkpoints are kept in {moved.parent}",
                  file=sys.stderr)


def setup(run: RunConfig, out_dir: str | Path | None = None, resume: bool = True,
          resume_from: int | None = None) -> TrainState:
    """Everything before the first step: the checkpoint to continue from (verified), data (rank 0
    prepares it first; a resumed run's with the checkpoint's tokenizer), the config's derived fields
    from the data, the checks (splits, changed settings), then the run directory (see
    ``engram.train.rundir``; hold its lock, as ``train`` does; nothing in it changes before every check
    passed), the model built on meta and placed (``parallelize``: sharded, materialised, initialised
    once), the optimizers and the restored state. The checkpoint is the latest when ``resume``, step
    ``resume_from`` when given (later steps are archived), none when not ``resume`` (the old history is
    archived)."""
    tc = run.train
    if resume_from is not None and not resume:
        raise ValueError("resume_from (--resume-from) and resume=False (--no-resume) contradict each other")
    fix_mmap_threshold()  # consistent step times on glibc (see engram/train/allocator.py)
    world = rt.world_size()
    if tc.batch_size % world:
        raise ValueError(f"train.batch_size={tc.batch_size} is the global batch and must divide evenly over "
                         f"{world} ranks")
    run_dir = Path(out_dir or tc.out_dir)
    device = rt.local_device(resolve_device(tc.device))
    if rt.is_main():
        for path in remove_staging(run_dir):
            print(f"[engram] removed {path}, a checkpoint a killed process did not finish", file=sys.stderr)
    ckpt_path = _checkpoint_to_resume(run_dir, resume, resume_from)
    ckpt = open_checkpoint(ckpt_path) if ckpt_path is not None else None
    if ckpt is not None and ckpt.step > tc.max_steps:
        raise ValueError(f"train.max_steps={tc.max_steps} is below the step of {ckpt.path} ({ckpt.step}): nothing "
                         "to train; raise train.max_steps, or --resume-from an earlier step")
    # a new run that starts from another run's weights (context extension); a started run just resumes
    init = open_checkpoint(tc.init_from) if ckpt is None and tc.init_from is not None else None
    if rt.is_main():  # rank 0 builds the tokenizer and token caches; the others then read them
        data = _prepare(run.data, ckpt or init)
    rt.barrier()
    if not rt.is_main():
        data = _prepare(run.data, ckpt or init)
    run = dataclasses.replace(run, model=run.model.with_data(data.vocab_size, data.pad_id))
    check_splits(data, tc.seq_len)
    if ckpt is not None:
        run = _check_resume(ckpt, run, run_dir)
    if init is not None:
        _check_init_from(init, run, run_dir, resume)
    if rt.is_main():
        _apply_run_dir(run_dir, resume, resume_from)
    rt.barrier()

    torch.manual_seed(tc.seed)
    with torch.device("meta"):
        model = EngramLM(run.model, data.compressed, sparse_tables=True)
    parallel = parallelize(model, device, init_tables=ckpt is None and init is None, strategy=tc.parallel)
    if init is not None:
        parallel.load_weights(init)
        if rt.is_main():
            print(f"[engram] starting from the weights of {init.path} (step {init.step}) with a new optimizer and "
                  "schedule", file=sys.stderr)
    model.train()
    optimizers = Optimizers(model, tc, reduce_table_sq=parallel.table_squares_reduce,
                            reduce_dense_sq=parallel.dense_squares_reduce)
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
          + (", tables sharded by rows" if par.tables_sharded else "")
          + (", dense weights sharded by FSDP2" if par.fsdp else ", dense weights replicated (DDP)" if par.distributed
             else "") + (", Muon for the matrices" if tc.optimizer == "muon" else ""),
          file=sys.stderr)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on SIGINT or SIGTERM after a finished step, with that step saved. A
    ``KeyboardInterrupt``, so code that stops on Ctrl-C stops on it too; the CLI exits 128 + ``signum``."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint {checkpoint} "
                         "holds it; to continue, train into the same directory again without --no-resume or "
                         "--resume-from (resume=True, the default)")


class StopSignals:
    """SIGINT and SIGTERM ask for a stop at the end of the current step, which is then saved; a second
    SIGINT stops at once (KeyboardInterrupt, nothing saved). Installed only in the main thread (Python
    delivers signals there); elsewhere signals keep their handlers."""

    def __init__(self, verbose: bool):
        self.signum = 0
        self.verbose = verbose
        self._old: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signum and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        if self.verbose:
            print(f"\n[engram] {signal.Signals(signum).name}: stopping after this step and saving it "
                  "(Ctrl-C again stops at once, unsaved)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _stored(run: RunConfig, run_dir: Path) -> RunConfig:
    """``run`` as a run stores it: data paths relative to the run directory."""
    return dataclasses.replace(run, data=run.data.relative_to(run_dir))


def train(run: RunConfig, out_dir: str | Path | None = None, resume: bool = True, progress: bool = True,
          on_step: Callable[[int, dict], None] | None = None, resume_from: int | None = None) -> TrainResult:
    """Train ``run`` into ``out_dir`` (default ``run.train.out_dir``): from its latest checkpoint
    (``resume``), from checkpoint ``resume_from``, or afresh (``resume=False``; see ``engram.train.rundir``
    for what happens to the old history). The run directory is locked while training: a second trainer
    is refused. SIGINT/SIGTERM save the last finished step and raise ``TrainingInterrupted``.

    ``on_step(step, metrics)`` is called after every optimizer step (logging hooks, tests). Inside a
    process group of several ranks every rank calls ``train`` with the same arguments (see the module
    docstring); rank 0 alone locks the directory, prints, logs and writes the replicated checkpoint files.
    """
    import contextlib

    run_dir = Path(out_dir or run.train.out_dir)
    with rundir.lock_run(run_dir) if rt.is_main() else contextlib.nullcontext():
        return _train_locked(run, run_dir, resume, progress, on_step, resume_from)


def _train_locked(run: RunConfig, run_dir: Path, resume: bool, progress: bool, on_step, resume_from) -> TrainResult:
    state = setup(run, run_dir, resume, resume_from)
    run, tc, par, model = state.run, state.run.train, state.parallel, state.model
    stored_run = _stored(run, state.run_dir)
    start = state.step
    if par.is_main:
        state.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(state.run_dir / "config.json", stored_run.to_dict())
    log = MetricsLog(state.run_dir / "metrics.jsonl", start if state.last_checkpoint is not None else None) \
        if par.is_main else None
    counts = count_parameters(run.model, tc.seq_len).to_dict()
    if par.is_main:
        _announce(state, counts)

    def evaluate_now() -> dict:
        return evaluate(model, state.data.val, tc.batch_size, tc.seq_len, tc.eval_batches, state.device,
                        par.distributed)

    saved_step = start if state.last_checkpoint is not None else None

    def save(done: int, metrics: dict) -> None:
        nonlocal saved_step
        trainer_state = {"tokens": done * tc.tokens_per_step, "last": metrics, "paths_relative_to": "run_dir"}
        state.last_checkpoint = par.save_checkpoint(state.run_dir, done, state.optimizers.state_dict(), stored_run,
                                                    state.data.tokenizer, trainer_state, tc.keep_checkpoints)
        saved_step = done

    bar = None
    if progress and par.is_main:
        from tqdm import tqdm
        bar = tqdm(total=tc.max_steps, initial=start, desc=state.run_dir.name, unit="step", dynamic_ncols=True)
    evals: list[dict] = []
    train_seconds, trained_tokens = 0.0, 0
    metrics: dict = {}
    stopped = 0
    with StopSignals(verbose=par.is_main) as stop:
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
                    save(done, metrics)
                if bar is not None:
                    bar.update(1)
                    shown = {"loss": f"{metrics['loss']:.3f}", "tok/s": f"{trained_tokens / train_seconds:,.0f}"}
                    if "val_loss" in metrics:
                        shown["val"] = f"{metrics['val_loss']:.3f}"
                    bar.set_postfix(shown)
                if on_step is not None:
                    on_step(done, metrics)
                stopped = par.max_over_ranks(stop.signum)  # every rank stops at the same step
                if stopped:
                    break
            if stopped and saved_step != state.step:
                save(state.step, metrics)
        finally:
            if bar is not None:
                bar.close()
    if stopped:
        par.close()
        raise TrainingInterrupted(stopped, state.step, state.last_checkpoint)

    final = evals[-1] if evals else evaluate_now()
    par.close()  # the DDP wrapper goes now, not at interpreter exit (see Parallel.close)
    return TrainResult(run_dir=state.run_dir, steps=tc.max_steps, tokens=tc.max_steps * tc.tokens_per_step,
                       train_seconds=train_seconds,
                       tokens_per_s=trained_tokens / train_seconds if train_seconds else 0.0,
                       final_eval=final, evals=evals, checkpoint=state.last_checkpoint, parameters=counts)

"""Everything before the first step of ``engram train``: ``setup(run)`` -> a ``TrainState``.

Determinism: the model is initialised from ``train.seed``; the batch of micro-step s is a pure
function of (seed, s) (``TokenShards.batch``); nothing else draws random numbers. Resuming from a
checkpoint therefore continues bit-identically (tested by killing a run and resuming it).

Data parallelism (``torchrun``, see docs/DISTRIBUTED.md): inside a process group of W > 1 ranks,
``batch_size`` stays the *global* batch. Every rank draws the same global batch and trains on its W-th
of the rows; ``engram.distributed.parallelize`` row-shards the hashed tables (each rank allocates only
its block) and puts the dense parameters under DDP or FSDP2. The run is then the single-process run up
to float rounding: same batches, averaged gradients, one global clipping norm, MoE balancing on the
summed load, and checkpoints that load on any number of ranks.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from engram.data import load_tokenizer, prepare_data, prepare_text, prepare_with_tokenizer
from engram.distributed import runtime as rt
from engram.distributed.parallelize import parallelize
from engram.model.transformer import EngramLM
from engram.train.allocator import fix_mmap_threshold
from engram.train.checkpoint import CHECKPOINT_FILES, Checkpoint, CheckpointError, open_checkpoint, remove_staging
from engram.train.config import RunConfig
from engram.train.device import resolve_device
from engram.train.optim import Optimizers
from engram.train.resume import apply_run_dir, check_init_from, check_resume, checkpoint_to_resume
from engram.train.step import TrainState
from engram.tokenizer import CompressedTokenizer


def _same_source(a: str | None, b: str) -> bool:
    """Whether two ``init_from`` values name one checkpoint (a run directory or its latest step, relative or
    absolute); the stored one may no longer exist."""
    from engram.train.checkpoint_files import resolve_checkpoint

    if a is None:
        return False
    if a == b:
        return True
    try:
        return resolve_checkpoint(a).resolve() == resolve_checkpoint(b).resolve()
    except (OSError, ValueError):
        return Path(a).resolve() == Path(b).resolve()


def check_splits(data, seq_len: int) -> None:
    """Both splits must hold at least one window of ``seq_len`` tokens, before any step is spent."""
    for name, shards in (("training", data.train), ("validation", data.val)):
        longest = max((len(t) for t in shards.tokens), default=0)
        if longest < seq_len:
            raise ValueError(f"the {name} split of {data.directory} has no window of train.seq_len={seq_len} tokens "
                             f"(its longest shard holds {longest}); lower train.seq_len"
                             + (", raise data.val_fraction" if name == "validation" else "")
                             + " or use more text")


def checkpoint_data(checkpoint: Checkpoint):
    """The run's corpus tokenized by ``checkpoint``'s own tokenizer (``prepare_with_tokenizer``): the
    training cache when it was made with it, else tokenized again; never a retrained BPE."""
    return prepare_with_tokenizer(checkpoint.data_config, checkpoint.tokenizer,
                                  checkpoint.path / "tokenizer" / "tokenizer.json")


def checkpoint_text(checkpoint: Checkpoint, source: str):
    """Every document of ``source`` tokenized by ``checkpoint``'s tokenizer, as one split (TokenShards)."""
    data = checkpoint.data_config
    return prepare_text(source, checkpoint.tokenizer, checkpoint.path / "tokenizer" / "tokenizer.json",
                        data.cache_dir, data.text_field)


def _prepare(config, ckpt):
    """The run's data: prepared as configured for a new run; for a resumed run, tokenized by the
    checkpoint's own tokenizer (a BPE is never trained again: changed data keeps the run's ids)."""
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
    device = rt.local_device(resolve_device(tc.placement.device))
    if rt.is_main():
        for path in remove_staging(run_dir):
            print(f"[engram] removed {path}, a checkpoint a killed process did not finish", file=sys.stderr)
    ckpt_path = checkpoint_to_resume(run_dir, resume, resume_from)
    ckpt = open_checkpoint(ckpt_path) if ckpt_path is not None else None
    if ckpt is not None and ckpt.step > tc.max_steps:
        raise ValueError(f"train.max_steps={tc.max_steps} is below the step of {ckpt.path} ({ckpt.step}): nothing "
                         "to train; raise train.max_steps, or --resume-from an earlier step")
    # a new run that starts from another run's weights (context extension); a started run just resumes
    init_from = tc.checkpoint.init_from
    started_from = ckpt.run_config.train.checkpoint.init_from if ckpt is not None else None
    if ckpt is not None and init_from is not None and not _same_source(started_from, init_from):
        raise ValueError(f"{run_dir} already holds checkpoints (step {ckpt.step}), so it resumes and "
                         f"train.init_from={init_from!r} would be ignored; start the new run in another --out, or "
                         "--no-resume to move this history to the archive first")
    init = open_checkpoint(init_from) if ckpt is None and init_from is not None else None
    if rt.is_main():  # rank 0 builds the tokenizer and token caches; the others then read them
        data = _prepare(run.data, ckpt or init)
    rt.barrier()
    if not rt.is_main():
        data = _prepare(run.data, ckpt or init)
    run = dataclasses.replace(run, model=run.model.with_data(data.vocab_size, data.pad_id))
    check_splits(data, tc.seq_len)
    if ckpt is not None:
        run = check_resume(ckpt, run, run_dir)
    if init is not None:
        check_init_from(init, run, run_dir, resume)
    if rt.is_main():
        apply_run_dir(run_dir, resume, resume_from)
    rt.barrier()

    torch.manual_seed(tc.seed)
    with torch.device("meta"):
        model = EngramLM(run.model, data.compressed, sparse_tables=True)
    parallel = parallelize(model, device, init_tables=ckpt is None and init is None, strategy=tc.placement.parallel,
                           files=CHECKPOINT_FILES)
    if init is not None:
        parallel.load_weights(init)
        if rt.is_main():
            print(f"[engram] starting from the weights of {init.path} (step {init.step}) with a new optimizer and "
                  "schedule", file=sys.stderr)
    model.train()
    optimizers = Optimizers(model, tc, reduce_table_sq=parallel.table_squares_reduce,
                            reduce_dense_sq=parallel.dense_squares_reduce)
    state = TrainState(run=run, run_dir=run_dir, device=device, data=data, model=model, parallel=parallel,
                       optimizers=optimizers, step=0, last_checkpoint=ckpt_path, save=save_run_checkpoint)
    if ckpt is not None:
        stored = parallel.restore(ckpt, optimizers)
        torch.set_rng_state(stored["torch_rng"])
        state.step = ckpt.step
    return state


def stored_run(run: RunConfig, run_dir: Path) -> RunConfig:
    """``run`` as a run stores it: data paths relative to the run directory."""
    return dataclasses.replace(run, data=run.data.relative_to(run_dir))


def save_run_checkpoint(state: TrainState, step: int, metrics: dict) -> Path:
    """``engram train``'s checkpoint writer (``TrainState.save``): by this process, or by every rank together."""
    tc = state.train
    trainer_state = {"tokens": step * tc.tokens_per_step, "last": metrics, "paths_relative_to": "run_dir"}
    return state.parallel.save_checkpoint(state.run_dir, step, state.optimizers.state_dict(),
                                          stored_run(state.run, state.run_dir), state.data.tokenizer, trainer_state,
                                          tc.checkpoint.keep)

"""``finetune``: train an Engram adapter on a frozen pretrained transformers model (``engram finetune``).

Only the adapter learns: SparseAdam for its tables at ``table_lr_mult`` x the rate, AdamW for the rest
(``engram.train.Optimizers``), the same schedule, step and loop as ``engram train``
(``engram.train.step.train_step``, ``engram.train.loop.run_loop``). The run directory works as in
``engram train`` (``engram.train.rundir``, docs/RUNS.md): one process holds its lock, ``--no-resume``
archives the history, killed writes are cleaned up, Ctrl-C/SIGTERM save the last finished step, a NaN
loss stops before anything moves, metrics go to ``metrics.jsonl``. A checkpoint is

    checkpoints/step_NNNNNNN/
      adapter/              EngramAdapter.save: weights, adapter_config.json, hash_layout.json, compressed table
      optimizer.pt          the two optimizers' state and the torch RNG
      trainer_state.json    step, tokens, last metrics
      finetune_config.json  the FinetuneConfig
      base.json             the base model it was trained on (engram.hf.base_model.describe_base), checked on resume
      manifest.json         every file's size and sha256, written last

The data is tokenized with the base model's own tokenizer (saved in the run as
``base_tokenizer/tokenizer.json``); batches are a pure function of (seed, step) as in ``engram train``, so
a resumed run continues bit-identically on one machine.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from engram.data.config import DataConfig
from engram.distributed.parallelize import Parallel
from engram.fileio import atomic_write_json
from engram.hf.base_model import check_same_base, describe_base, load_model, load_tokenizer
from engram.hf.retrofit import EngramAdapter, EngramAdapterConfig, attach_engram
from engram.schema import Serialisable
from engram.train import checkpoint as ckpt_io
from engram.train import rundir
from engram.train.checkpoint import remove_staging
from engram.train.config import TrainConfig
from engram.train.device import resolve_device
from engram.train.loop import run_loop
from engram.train.optim import Optimizers
from engram.train.resume import (INIT_ONLY_FIELDS, apply_run_dir, checkpoint_to_resume, config_changes,
                                 describe_changes)
from engram.train.startup import check_splits
from engram.train.step import TrainState


@dataclass
class FinetuneConfig(Serialisable):
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
    return load_model(config), load_tokenizer(config)


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
             on_step: Callable[[int, dict], None] | None = None, resume_from: int | None = None) -> dict:
    """Train ``config.adapter`` on the frozen ``config.base`` into ``out_dir``; returns a summary.

    Everything that can be refused is refused before the base's weights load: a damaged or missing
    checkpoint, ``freeze_base=false``, an Engram model as base, a tokenizer larger than the base's vocabulary,
    data without a usable validation split, and a resume on another base or adapter (``base.json`` and
    ``finetune_config.json`` of the checkpoint). ``resume_from``: continue from that step's checkpoint (later
    ones are moved to the archive), e.g. when the latest is damaged."""
    tc = config.train
    run_dir = Path(out_dir or tc.out_dir)
    with rundir.lock_run(run_dir):
        for path in remove_staging(run_dir):
            print(f"[engram] removed {path}, a checkpoint a killed process did not finish", file=sys.stderr)
        latest = checkpoint_to_resume(run_dir, resume, resume_from)
        if latest is not None:
            ckpt_io.verify_checkpoint(latest)
        if not config.adapter.freeze_base:
            raise ValueError("adapter.freeze_base=false: engram finetune trains and saves the adapter only; "
                             "train the base too with your own loop (attach_engram(..., freeze_base=False))")
        tokenizer = load_tokenizer(config)
        base = describe_base(config, tokenizer)
        if latest is not None:
            _check_resume(latest, config, base)
        device = resolve_device(tc.placement.device)
        data = _prepare(config, tokenizer, run_dir)
        model = load_model(config).to(device)
        apply_run_dir(run_dir, resume, resume_from)
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
        scored = _Scored(model, adapter).eval()  # the frozen base runs in eval mode (no dropout)
        device = next(model.parameters()).device
        state = TrainState(run=config, run_dir=run_dir, device=device, data=data, model=scored,
                           parallel=Parallel(scored, device), optimizers=optimizers, step=step, last_checkpoint=latest,
                           save=functools.partial(_save, adapter=adapter, base=base))
        result = run_loop(state, progress, on_step)
        return {"run_dir": str(run_dir), "steps": result.steps, "tokens": result.tokens,
                "tokens_per_s": result.tokens_per_s, "checkpoint": str(result.checkpoint),
                "adapter_parameters": sum(p.numel() for p in adapter.parameters()), **result.final_eval}


# FinetuneConfig fields a resumed run may change: where and how long, never what the adapter is
_MAY_CHANGE = ("base", "gguf_file", "train.out_dir", "train.placement.device", "train.max_steps", "train.log_every",
               "train.eval.", "train.checkpoint.", "data.cache_dir", "data.source")


def _check_resume(checkpoint: Path, config: FinetuneConfig, base: dict) -> None:
    """Refuse to continue ``checkpoint`` on another base, or with another adapter or optimizer."""
    stored_base = checkpoint / "base.json"
    if stored_base.is_file():
        check_same_base(json.loads(stored_base.read_text()), base, checkpoint)
    else:
        print(f"[engram] {checkpoint} records no base model (written by an earlier version): the base is not "
              "checked", file=sys.stderr)
    # read through today's schema: a file written before a field existed holds its default
    stored = FinetuneConfig.from_dict(json.loads((checkpoint / "finetune_config.json").read_text()))
    changed = [c for c in config_changes(stored, config) if not c[0].startswith(_MAY_CHANGE)]
    init_only = tuple(f".{name}" for name in INIT_ONLY_FIELDS)  # decided the first weights only: the checkpoint's stand
    fixed = [c for c in changed if c[0].startswith(("adapter.", "train.optim.name", "data.tokenizer"))
             and not c[0].endswith(init_only)]
    if fixed:
        raise ValueError(f"{checkpoint} was trained with another adapter or optimizer ({describe_changes(fixed)}); "
                         "use another --out, or --no-resume to start afresh")
    if changed:
        print(f"[engram] resuming {checkpoint.name} with changed settings: {describe_changes(changed)}",
              file=sys.stderr)


def _prepare(config: FinetuneConfig, tokenizer, run_dir: Path):
    """The corpus tokenized by the base model's tokenizer (its file kept in the run)."""
    from engram.data import prepare_data

    file = run_dir / "base_tokenizer" / "tokenizer.json"
    file.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.backend_tokenizer.save(str(file))
    data = prepare_data(dataclasses.replace(config.data, tokenizer=str(file)))
    check_splits(data, config.train.seq_len)
    return data


def _save(state: TrainState, step: int, metrics: dict, adapter: EngramAdapter, base: dict) -> Path:
    """``engram finetune``'s checkpoint writer (``TrainState.save``): the adapter folder, not the base."""
    config = state.run
    tmp = ckpt_io.stage(state.run_dir, step)
    try:
        adapter.save(tmp / "adapter")
        torch.save({"optimizers": state.optimizers.state_dict(), "torch_rng": torch.get_rng_state()},
                   tmp / "optimizer.pt")
        atomic_write_json(tmp / "trainer_state.json", {"step": step, "tokens": step * config.train.tokens_per_step,
                                                       "last": metrics}, sort_keys=True)
        atomic_write_json(tmp / "finetune_config.json", config.to_dict(), sort_keys=True)
        atomic_write_json(tmp / "base.json", base, sort_keys=True)
        return ckpt_io.publish(tmp, step, config.train.checkpoint.keep)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

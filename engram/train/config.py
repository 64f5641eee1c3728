"""The training run's configs: ``TrainConfig`` in sections (optimizer, schedule, evaluation, checkpoints,
placement) and ``RunConfig`` (model + data + training).

Tokens per step = batch_size * seq_len * grad_accum. Until the sections existed ``TrainConfig`` held its
24 fields flat; the old names are still read from files (``config.json``, ``run_config.json``, sweep
plans), accepted by ``--set`` (``train.lr=1e-3`` sets ``train.optim.lr``), taken by the constructor and
read as attributes, so code and files written before keep working (``TrainConfig.MOVED``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from engram.data.config import DataConfig
from engram.distributed.runtime import PARALLEL
from engram.model.config import ModelConfig
from engram.model.matrices import OPTIMIZERS
from engram.schema import Serialisable, is_int, nested, pos_int, require


def _check(ok: bool, section: str, name: str, why: str) -> None:
    """A section's errors name the field by its flat name of before, which users know from their configs,
    and its place now: ``TrainConfig.lr: must be > 0, got -1 (train.optim.lr)``."""
    old = next((k for k, v in MOVED.items() if v == f"{section}.{name}"), None)
    require(ok, "TrainConfig", old or f"{section}.{name}", why + (f" (train.{section}.{name})" if old else ""))


def _int(section: str, name: str, value: Any, minimum: int = 1) -> None:
    _check(is_int(value), section, name, f"must be an int, got {value!r}")
    _check(value >= minimum, section, name, f"must be >= {minimum}, got {value}")


def _number(section: str, name: str, value: Any, low: float, high: float | None = None,
            low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value > low if low_open else value >= low)
    if high is not None:
        ok = ok and value < high
    interval = f"in [{low:g}, {high:g})" if high is not None else (f"> {low:g}" if low_open else f">= {low:g}")
    _check(ok, section, name, f"must be {interval}, got {value!r}")


@dataclass
class OptimConfig(Serialisable):
    """The optimizers (the paper's section 3 recipe; ``engram.train.optim``).

    name: "adamw" (every dense parameter) or "muon" (``torch.optim.Muon`` for the hidden weight matrices:
        attention, FFN, experts, routers, Engram's projections; AdamW for vectors, the embedding, the head
        and anything else that is not a matrix). Recorded in checkpoints; a run resumes with the optimizer
        it started with.
    lr: the base learning rate; table_lr_mult: the hashed tables' rate is this multiple of it (sparse,
        lazy Adam, no weight decay). weight_decay, beta1, beta2: AdamW's. grad_clip: the global norm over
        every gradient, tables included (0 disables clipping).
    """

    name: str = "adamw"
    lr: float = 3e-3
    table_lr_mult: float = 5.0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0

    def __post_init__(self) -> None:
        _check(self.name in OPTIMIZERS, "optim", "name", f"must be one of {OPTIMIZERS}, got {self.name!r}")
        for name in ("lr", "table_lr_mult"):
            _number("optim", name, getattr(self, name), 0, low_open=True)
        for name in ("weight_decay", "grad_clip"):
            _number("optim", name, getattr(self, name), 0)
        for name in ("beta1", "beta2"):
            _number("optim", name, getattr(self, name), 0, 1)


@dataclass
class ScheduleConfig(Serialisable):
    """The learning rate over steps: linear warm-up for ``warmup_steps``, then constant, multiplied by
    ``decay_factor`` at each fraction of ``max_steps`` in ``decay_at`` (step decay)."""

    warmup_steps: int = 20
    decay_at: list[float] = field(default_factory=lambda: [0.8, 0.9])
    decay_factor: float = 0.316

    def __post_init__(self) -> None:
        _int("schedule", "warmup_steps", self.warmup_steps, minimum=0)
        _check(isinstance(self.decay_at, (list, tuple)) and all(
            isinstance(f, (int, float)) and 0 < f < 1 for f in self.decay_at), "schedule", "decay_at",
            f"must be a list of fractions in (0, 1), got {self.decay_at!r}")
        self.decay_at = sorted(self.decay_at)
        _number("schedule", "decay_factor", self.decay_factor, 0, low_open=True)


@dataclass
class EvalConfig(Serialisable):
    """Validation: every ``every`` steps (and at the last), over ``batches`` fixed windows."""

    every: int = 50
    batches: int = 8

    def __post_init__(self) -> None:
        for name in ("every", "batches"):
            _int("eval", name, getattr(self, name))


@dataclass
class CheckpointConfig(Serialisable):
    """every: save every this many steps (and at the last, and when stopped by a signal).
    keep: the newest checkpoints kept in the run directory (0 keeps every one, e.g. to extend or compare
        an earlier step).
    init_from: a checkpoint (or run directory) whose weights a new run starts from, with a new optimizer
        and schedule from step 0 (context extension: a longer ``seq_len`` and ``model.backbone.max_seq_len``
        with ``rope_scaling``). Its model must be this run's except for the context fields
        (``engram.train.resume.INIT_FROM_MAY_CHANGE``). Ignored once the run has checkpoints of its own.
    """

    every: int = 100
    keep: int = 2
    init_from: str | None = None

    def __post_init__(self) -> None:
        _int("checkpoint", "every", self.every)
        _int("checkpoint", "keep", self.keep, minimum=0)
        _check(self.init_from is None or (isinstance(self.init_from, str) and self.init_from), "checkpoint",
               "init_from", f"must be a checkpoint or run directory, got {self.init_from!r}")


@dataclass
class PlacementConfig(Serialisable):
    """device: "auto" (CUDA when present), "cpu", "cuda[:N]" or "mps".
    parallel: how the dense part is placed under torchrun: "ddp" (replicated on every rank) or "fsdp"
        (``fully_shard``: parameters, gradients and optimizer state sharded over the ranks). The tables
        are row-sharded either way. Ignored in a single process."""

    device: str = "auto"
    parallel: str = "ddp"

    def __post_init__(self) -> None:
        _check(isinstance(self.device, str) and (self.device == "auto" or self.device.split(":")[0] in
                                                 ("cpu", "cuda", "mps")), "placement", "device",
               f"must be 'auto', 'cpu', 'cuda[:N]' or 'mps', got {self.device!r}")
        _check(self.parallel in PARALLEL, "placement", "parallel", f"must be one of {PARALLEL}, got {self.parallel!r}")


SECTIONS = {"optim": OptimConfig, "schedule": ScheduleConfig, "eval": EvalConfig, "checkpoint": CheckpointConfig,
            "placement": PlacementConfig}

# the flat names TrainConfig had before its sections -> where each lives now
MOVED = {"optimizer": "optim.name", "lr": "optim.lr", "table_lr_mult": "optim.table_lr_mult",
         "weight_decay": "optim.weight_decay", "beta1": "optim.beta1", "beta2": "optim.beta2",
         "grad_clip": "optim.grad_clip", "warmup_steps": "schedule.warmup_steps", "decay_at": "schedule.decay_at",
         "decay_factor": "schedule.decay_factor", "eval_every": "eval.every", "eval_batches": "eval.batches",
         "save_every": "checkpoint.every", "keep_checkpoints": "checkpoint.keep",
         "init_from": "checkpoint.init_from", "device": "placement.device", "parallel": "placement.parallel"}


# TrainConfig's fields in the order they had when they were flat (positional construction still follows it)
FLAT_ORDER = ("max_steps", "batch_size", "seq_len", "grad_accum", "lr", "table_lr_mult", "weight_decay", "beta1", "beta2",
              "warmup_steps", "decay_at", "decay_factor", "grad_clip", "eval_every", "eval_batches", "log_every",
              "save_every", "seed", "device", "out_dir", "init_from", "keep_checkpoints", "optimizer", "parallel")


def _moved_field(old: str):
    """The old flat name as a property of ``TrainConfig``, reading and writing its new place."""
    section, name = MOVED[old].split(".")

    def get(self):
        return getattr(getattr(self, section), name)

    def put(self, value):
        setattr(self, section, dataclasses.replace(getattr(self, section), **{name: value}))

    return property(get, put, doc=f"The old name of ``{MOVED[old]}``.")


@dataclass(init=False)
class TrainConfig(Serialisable):
    """What is trained, for how long and where it goes; the rest in sections.

    max_steps, batch_size (the global batch, split over ranks), seq_len, grad_accum: optimizer steps and
    the tokens of each (batch_size * seq_len * grad_accum). seed: the initial weights and the batches.
    out_dir: the run directory. log_every: a metrics line every this many steps.
    optim (``OptimConfig``), schedule (``ScheduleConfig``), eval (``EvalConfig``), checkpoint
    (``CheckpointConfig``), placement (``PlacementConfig``): as their classes say.

    The constructor also takes the flat names of before (``TrainConfig(lr=1e-3, eval_every=10)``), and
    they read as attributes (``tc.lr`` is ``tc.optim.lr``).
    """

    max_steps: int = 200
    batch_size: int = 8
    seq_len: int = 256
    grad_accum: int = 1
    seed: int = 0
    out_dir: str = "runs/train"
    log_every: int = 10
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)

    NESTED = SECTIONS
    MOVED = MOVED

    def __init__(self, *args: Any, **values: Any) -> None:
        fields = {f.name: f for f in dataclasses.fields(self)}
        if len(args) > len(FLAT_ORDER):
            raise TypeError(f"TrainConfig takes at most {len(FLAT_ORDER)} positional arguments, got {len(args)}")
        for name, value in zip(FLAT_ORDER, args):  # the flat fields' order of before
            if name in values:
                raise TypeError(f"TrainConfig got {name!r} both by position and by name")
            values[name] = value
        flat = {k: values.pop(k) for k in list(values) if k in MOVED}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise TypeError(f"TrainConfig got unknown field(s) {unknown}; known: {sorted(fields)} (and the old "
                            f"flat names {sorted(MOVED)})")
        for name, f in fields.items():
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            setattr(self, name, values.get(name, default))
        by_section: dict[str, dict] = {}
        for old, value in flat.items():
            section, name = MOVED[old].split(".")
            given = values.get(section)
            if isinstance(given, dict) and name in given:  # (a section object, as replace() passes, may be overridden)
                raise ValueError(f"TrainConfig: {old!r} and 'train.{MOVED[old]}' are the same field (its old and new "
                                 "name); give it once")
            by_section.setdefault(section, {})[name] = value
        for section, cls in SECTIONS.items():
            current = nested(self, section, cls, "TrainConfig")
            if section in by_section:
                setattr(self, section, dataclasses.replace(current, **by_section[section]))
        self.__post_init__()

    def __post_init__(self) -> None:
        c = "TrainConfig"
        for name in ("max_steps", "batch_size", "grad_accum", "log_every"):
            pos_int(c, name, getattr(self, name))
        pos_int(c, "seq_len", self.seq_len, minimum=2)  # one prediction needs two tokens
        pos_int(c, "seed", self.seed, minimum=0)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len * self.grad_accum


for _old in MOVED:
    setattr(TrainConfig, _old, _moved_field(_old))


@dataclass
class RunConfig(Serialisable):
    """Everything one training run needs: the model, the data and the optimisation."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    NESTED = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}

    def __post_init__(self) -> None:
        for name, cls in self.NESTED.items():
            nested(self, name, cls, "RunConfig")
        context = self.model.backbone.max_seq_len
        require(self.train.seq_len <= context, "RunConfig", "train.seq_len",
                f"is {self.train.seq_len}, above the model's context model.backbone.max_seq_len={context}; "
                "lower train.seq_len or raise the context")

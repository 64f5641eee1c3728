"""Training: configs (``config``), optimizers and schedule (``optim``), one step (``step``), what comes before
it (``setup``: data, model, placement, resume under the ``resume`` policy), the loop (``loop``: evaluation,
the ``metrics`` log, saving, signals), checkpoints and the run directory that holds them.

The names below are imported on first use, so ``engram.train.config`` (what presets and configs need)
loads without the trainer and its optimizers.
"""

import importlib

# the checkpoint file steps register themselves with the placements (engram.distributed) on import, so any
# use of engram.train makes parallelize(...).save_checkpoint work without naming them (a light module)
import engram.train.checkpoint_files  # noqa: F401,E402

_SUBMODULES = {"allocator", "checkpoint", "checkpoint_files", "config", "device", "evaluation", "loop", "metrics",
               "muon", "optim", "resume", "rundir", "startup", "step"}
_HOME = {
    "checkpoint": ("Checkpoint", "CheckpointError", "last_intact_checkpoint", "latest_checkpoint", "list_checkpoints",
                   "load_checkpoint", "open_checkpoint", "restore_training_state", "save_checkpoint",
                   "verify_checkpoint"),
    "config": ("RunConfig", "TrainConfig"),
    "device": ("resolve_device",),
    "evaluation": ("evaluate",),
    "loop": ("TrainingInterrupted", "TrainResult", "run_loop", "train"),
    "metrics": ("read_metrics",),
    "optim": ("Optimizers", "learning_rate"),
    "rundir": ("RunDirectoryBusy",),
    "startup": ("setup",),
    "step": ("TrainingDiverged", "TrainState", "train_step"),
}
_WHERE = {name: module for module, names in _HOME.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"engram.train.{_WHERE[name]}"), name)
    if name in _SUBMODULES:  # ``import engram.train; engram.train.checkpoint`` as when they loaded eagerly
        return importlib.import_module(f"engram.train.{name}")
    raise AttributeError(f"module 'engram.train' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_WHERE) | _SUBMODULES)

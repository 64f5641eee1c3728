"""Training: configs (``config``), optimizers and schedule (``optim``), one step (``step``), what comes before
it (``setup``: data, model, placement, resume under the ``resume`` policy), the loop (``loop``: evaluation,
the ``metrics`` log, saving, signals), checkpoints and the run directory that holds them.

The names below are imported on first use, so ``engram.train.config`` (what presets and configs need)
loads without the trainer and its optimizers.
"""

import importlib

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
    raise AttributeError(f"module 'engram.train' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_WHERE))

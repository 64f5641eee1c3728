"""Training: optimizers and schedule, one step (``train_step``), the loop (``setup`` + ``train``),
checkpoints and the run directory that holds them."""

from engram.train.checkpoint import (Checkpoint, CheckpointError, last_intact_checkpoint, latest_checkpoint,
                                     list_checkpoints, load_checkpoint, open_checkpoint, restore_training_state,
                                     save_checkpoint, verify_checkpoint)
from engram.train.loop import TrainingInterrupted, TrainResult, evaluate, read_metrics, resolve_device, setup, train
from engram.train.optim import Optimizers, learning_rate
from engram.train.rundir import RunDirectoryBusy
from engram.train.step import TrainingDiverged, TrainState, train_step

__all__ = ["Checkpoint", "CheckpointError", "Optimizers", "RunDirectoryBusy", "TrainResult", "TrainState",
           "TrainingDiverged", "TrainingInterrupted", "evaluate", "last_intact_checkpoint", "latest_checkpoint",
           "learning_rate", "list_checkpoints", "load_checkpoint", "open_checkpoint", "read_metrics", "resolve_device",
           "restore_training_state", "save_checkpoint", "setup", "train", "train_step", "verify_checkpoint"]

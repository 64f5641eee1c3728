"""Training: optimizers and schedule, one step (``train_step``), the loop (``setup`` + ``train``),
checkpoints."""

from engram.train.checkpoint import (Checkpoint, CheckpointError, latest_checkpoint, load_checkpoint, open_checkpoint,
                                     restore_training_state, save_checkpoint, verify_checkpoint)
from engram.train.loop import TrainResult, evaluate, resolve_device, setup, train
from engram.train.optim import Optimizers, learning_rate
from engram.train.step import TrainingDiverged, TrainState, train_step

__all__ = ["Checkpoint", "CheckpointError", "Optimizers", "TrainResult", "TrainState", "TrainingDiverged", "evaluate",
           "latest_checkpoint", "learning_rate", "load_checkpoint", "open_checkpoint", "resolve_device",
           "restore_training_state", "save_checkpoint", "setup", "train", "train_step", "verify_checkpoint"]

"""Training: optimizers and schedule, the loop, checkpoints."""

from engram.train.checkpoint import (Checkpoint, CheckpointError, latest_checkpoint, load_checkpoint,
                                     restore_training_state, save_checkpoint, verify_checkpoint)
from engram.train.loop import TrainingDiverged, TrainResult, evaluate, resolve_device, train
from engram.train.optim import Optimizers, learning_rate

__all__ = ["Checkpoint", "CheckpointError", "Optimizers", "TrainResult", "TrainingDiverged", "evaluate",
           "latest_checkpoint", "learning_rate", "load_checkpoint", "resolve_device", "restore_training_state", "save_checkpoint", "train",
           "verify_checkpoint"]

"""Training: the loop, optimizer and schedule, precision, checkpoints."""

from toolkit.train.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from toolkit.train.loop import TrainingError, train

__all__ = ["CheckpointError", "TrainingError", "load_checkpoint", "model_from_checkpoint", "train"]

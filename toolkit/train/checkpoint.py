"""Checkpoint files: written atomically, loadable with `torch.load(weights_only=True)`.

A checkpoint is a dict of plain containers and tensors:

    format, version       "toolkit-checkpoint", 1
    model                 state dict: backbone, neck and the full C × D class matrix
    optimizer, scaler     state dicts (scaler is {} without fp16); optimizer has no state
                          for the class matrix, which is in head_optimizer
    head_optimizer        the class matrix's optimizer state by name, such as
                          {"momentum_buffer": (C, D)}; tensors with C rows are re-split by
                          class range when a run resumes on another number of processes
    scheduler             LR scheduler state dict (its position is the optimizer step)
    step, epoch           optimizer steps done; epoch the next step belongs to
    epoch_step            optimizer steps done inside that epoch
    world_size            processes that trained the run when it was saved
    rng                   {"torch": ByteTensor, "cuda": [ByteTensor, ...]} of rank 0
    classes               class names; index = label
    config                the resolved TrainConfig as a dict (paths as strings)
    best_top1             best validation top-1 so far (-1.0 before the first validation)
    counters              skipped samples, skipped non-finite steps, repeated samples and
                          samples left out, summed over processes
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from toolkit.config import ConfigError, TrainConfig, build

FORMAT = "toolkit-checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or not written by toolkit."""


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """Return settings as TOML- and weights_only-safe plain values."""
    values = {}
    for key, value in dataclasses.asdict(config).items():
        if isinstance(value, Path):
            value = str(value)
        values[key] = value
    return values


def config_from_dict(values: dict[str, Any], source: Path) -> TrainConfig:
    try:
        return build(TrainConfig, values, f"the settings stored in {source}")
    except ConfigError as error:
        raise CheckpointError(str(error)) from None


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` through a temporary file, so a crash never leaves half a checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save({"format": FORMAT, "version": FORMAT_VERSION, **state}, temporary)
    with open(temporary, "rb") as file:
        os.fsync(file.fileno())
    os.replace(temporary, path)


def load_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint onto the CPU without unpickling arbitrary objects.

    mmap=True maps the file instead of reading it, so tensors are read from disk when used:
    a process that keeps only some rows of the class matrix reads only those.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch.load raises many types for a damaged or foreign file
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from None
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a toolkit checkpoint; pass a file from RUN/checkpoints/")
    if checkpoint.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {checkpoint.get('version')}; this toolkit reads version {FORMAT_VERSION}"
        )
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any], source: Path) -> tuple[torch.nn.Module, list[str], TrainConfig]:
    """Rebuild the trained model on the CPU in eval mode, with its class list and settings."""
    from toolkit.model import build_model

    config = config_from_dict(checkpoint["config"], source)
    # The weights come from the checkpoint, so no pretrained file is needed to rebuild the model.
    config = dataclasses.replace(config, pretrained=None, checkpointing="none")
    classes = list(checkpoint["classes"])
    model = build_model(config, len(classes))
    model.load_state_dict(checkpoint["model"])
    model.eval()
    return model, classes, config

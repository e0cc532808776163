"""Optimizer and learning-rate schedule for training."""

from __future__ import annotations

import math

import torch
from torch import nn

from toolkit.config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into a decayed group and one without decay for norm layers and biases.

    One-dimensional parameters are the biases and the norm layers' scales and shifts, as in
    timm's `param_groups_weight_decay`.
    """
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim <= 1:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Create SGD with momentum or AdamW over the model's parameter groups."""
    groups = parameter_groups(model, config.weight_decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr)
    raise ValueError(f"invalid optimizer {config.optimizer!r}; expected 'sgd' or 'adamw'")


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_factor: float) -> float:
    """Return the LR multiplier at an optimizer step: linear warmup, then cosine decay to min_factor."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Create a per-optimizer-step schedule; a warmup longer than the run is cut to the run."""
    warmup = min(config.warmup_steps, total_steps)
    min_factor = config.min_lr / config.lr if config.lr > 0 else 0.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, total_steps, min_factor)
    )

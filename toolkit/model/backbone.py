"""torchvision ResNet trunk with optional activation checkpointing that keeps BatchNorm statistics correct.

Activation checkpointing drops the activations inside a checkpointed module after the forward pass
and recomputes them in the backward pass. The recomputation runs every BatchNorm layer a second time
in training mode, which would update `running_mean`, `running_var` and `num_batches_tracked` twice
per step. `checkpoint_module` restores those buffers after each recomputation, so a checkpointed
model ends a step with the same statistics and gradients as a plain one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import get_args

import torch
import torchvision
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from toolkit.config import Arch, Checkpointing

logger = logging.getLogger(__name__)

ARCHS: tuple[str, ...] = get_args(Arch)
CHECKPOINTING_MODES: tuple[str, ...] = get_args(Checkpointing)
STAGES = ("layer1", "layer2", "layer3", "layer4")

# SyncBatchNorm derives from none of these, so it is listed on its own.
BATCH_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class BatchNormStatsGuard:
    """Context manager that restores the BatchNorm buffers of a module when it exits.

    Each entry takes a fresh snapshot, so one instance serves a recomputation per backward pass
    (for example `backward(retain_graph=True)` followed by a second backward).
    """

    def __init__(self, module: nn.Module) -> None:
        self.norms = [
            norm for norm in module.modules() if isinstance(norm, BATCH_NORM_TYPES) and norm.track_running_stats
        ]
        self._snapshots: list[list[tuple[Tensor, ...]]] = []

    def __enter__(self) -> BatchNormStatsGuard:
        snapshot = [
            (norm.running_mean.clone(), norm.running_var.clone(), norm.num_batches_tracked.clone())
            for norm in self.norms
        ]
        self._snapshots.append(snapshot)
        return self

    def __exit__(self, *exc_info: object) -> None:
        snapshot = self._snapshots.pop()
        with torch.no_grad():
            for norm, (mean, var, count) in zip(self.norms, snapshot):
                norm.running_mean.copy_(mean)
                norm.running_var.copy_(var)
                norm.num_batches_tracked.copy_(count)


def _checkpoint_contexts(module: nn.Module) -> tuple[contextlib.nullcontext, BatchNormStatsGuard]:
    # The first forward pass updates BatchNorm statistics as usual, but the recomputation must not.
    return contextlib.nullcontext(), BatchNormStatsGuard(module)


def checkpoint_module(module: nn.Module, x: Tensor) -> Tensor:
    """Run `module(x)` under non-reentrant activation checkpointing without double BatchNorm updates.

    Only the input is kept for the backward pass, and the module's activations are recomputed
    there. The RNG state is not saved and restored because ResNet blocks draw no random numbers.
    """
    return checkpoint(
        module,
        x,
        use_reentrant=False,
        preserve_rng_state=False,
        context_fn=functools.partial(_checkpoint_contexts, module),
    )


class ResNetTrunk(nn.Module):
    """torchvision ResNet without its `fc` layer, returning pooled features (B, F).

    The submodules keep torchvision's names (conv1, bn1, layer1 … layer4), so the state dict keys
    equal a torchvision ResNet's keys without `fc.*` whatever the checkpointing mode.
    Inputs should be channels_last like the model's weights. Other layouts work, but convolutions
    then convert them, which costs time and memory.
    """

    def __init__(self, resnet: torchvision.models.ResNet, checkpointing: str = "none") -> None:
        super().__init__()
        self.conv1 = resnet.conv1
        self.bn1 = resnet.bn1
        self.relu = resnet.relu
        self.maxpool = resnet.maxpool
        self.layer1 = resnet.layer1
        self.layer2 = resnet.layer2
        self.layer3 = resnet.layer3
        self.layer4 = resnet.layer4
        self.avgpool = resnet.avgpool
        self.feature_dim: int = resnet.fc.in_features
        self.checkpointing = checkpointing

    @property
    def checkpointing(self) -> str:
        """Activation checkpointing mode: none, stage (each of layer1..4) or block (each residual block)."""
        return self._checkpointing

    @checkpointing.setter
    def checkpointing(self, mode: str) -> None:
        if mode not in CHECKPOINTING_MODES:
            raise ValueError(
                f"invalid checkpointing mode {mode!r}; expected one of {', '.join(CHECKPOINTING_MODES)}"
            )
        self._checkpointing = mode

    def forward(self, images: Tensor) -> Tensor:
        B, _, H, W = images.shape

        # stem, never checkpointed
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))

        # residual stages
        for name in STAGES:
            x = self._run_stage(getattr(self, name), x)

        x = self.avgpool(x)  # (B, F, 1, 1)
        return torch.flatten(x, 1)  # (B, F)

    def _run_stage(self, stage: nn.Sequential, x: Tensor) -> Tensor:
        # checkpointing pays off only when a backward pass follows, so eval and no_grad run plainly
        if self.checkpointing == "none" or not self.training or not torch.is_grad_enabled():
            return stage(x)
        if self.checkpointing == "stage":
            return checkpoint_module(stage, x)
        for block in stage:
            x = checkpoint_module(block, x)
        return x


def build_backbone(arch: str = "resnet50", checkpointing: str = "none") -> ResNetTrunk:
    """Build a randomly initialised torchvision ResNet trunk. No weights are downloaded."""
    if arch not in ARCHS:
        raise ValueError(f"invalid arch {arch!r}; expected one of {', '.join(ARCHS)}")
    resnet = getattr(torchvision.models, arch)(weights=None)
    return ResNetTrunk(resnet, checkpointing)


__all__ = [
    "ARCHS",
    "BATCH_NORM_TYPES",
    "CHECKPOINTING_MODES",
    "BatchNormStatsGuard",
    "ResNetTrunk",
    "build_backbone",
    "checkpoint_module",
]

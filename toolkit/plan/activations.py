"""Measure, unit by unit, the activation memory a training step holds, by running the model on the CPU.

The planner needs more than one total. During the backward pass the units of the network are
visited in reverse order: each unit's saved tensors are freed after its backward step, its
parameter gradients appear, and a checkpointed region recomputes its forward pass first. So this
module records, for every unit in forward order (the stem, each residual block, then the tail of
pooling, neck and loss):

- `saved`: bytes saved for backward in the planned checkpointing mode, including the input that
  a checkpointed region keeps for its recomputation;
- `recomputed`: bytes the unit saves when it runs without checkpointing, which its
  recomputation keeps alive during the backward pass;
- `largest`: the largest single tensor the unit saves without checkpointing, which bounds the
  gradients that flow through it.

A saved tensor counts once per storage, by the storage's full size. Parameters, buffers and
copies made from one parameter alone (the 16-bit weights that autocast makes) do not count; the
planner adds those copies from the parameter shapes. The counts come from
`torch.autograd.graph.saved_tensors_hooks` during one forward pass of a small real batch on the
CPU, at two batch sizes, so each quantity is a line `fixed + per_sample * batch`. bf16 and fp16
save tensors of the same size, so both are measured with bf16 autocast.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from toolkit.model import ClassHead, build_backbone, build_neck
from toolkit.model.backbone import STAGES
from toolkit.model.memory import copies_parameter

logger = logging.getLogger(__name__)

# Two batch sizes give the per-sample slope and the batch-independent part (BatchNorm statistics).
PROFILE_BATCHES = (2, 3)
# The class count does not change what the backbone, neck and loss save, so a small head is measured.
PROFILE_CLASSES = 8

STEM = "stem"
TAIL = "tail"


@dataclass(frozen=True)
class ProfileKey:
    """Settings that the saved activations depend on, and the key of the cache of measured profiles."""

    arch: str
    image_size: int
    checkpointing: str
    autocast: bool  # 16-bit autocast (bf16 or fp16) instead of fp32
    embedding_dim: int
    head: str


@dataclass(frozen=True)
class Line:
    """Bytes as a function of the batch size: fixed + per_sample * batch."""

    fixed: float
    per_sample: float

    def at(self, batch_size: int) -> int:
        return max(0, round(self.fixed + self.per_sample * batch_size))

    @classmethod
    def through(cls, points: dict[int, int]) -> Line:
        """Return the line through two (batch size, bytes) points."""
        (b1, y1), (b2, y2) = sorted(points.items())
        per_sample = (y2 - y1) / (b2 - b1)
        return cls(fixed=y1 - per_sample * b1, per_sample=per_sample)


ZERO = Line(0.0, 0.0)


@dataclass(frozen=True)
class UnitProfile:
    """Measured activation bytes of one unit; see the module docstring for the three lines."""

    name: str
    saved: Line
    recomputed: Line
    largest: Line
    # Checkpointed region the unit is recomputed with: its stage in "stage" mode, itself in
    # "block" mode, None when the unit is not checkpointed.
    region: str | None


@dataclass(frozen=True)
class ActivationProfile:
    """Measured activation bytes of every unit of one model, in forward order."""

    key: ProfileKey
    units: tuple[UnitProfile, ...]

    def saved_bytes(self, batch_size: int) -> int:
        """Return the bytes that one training forward pass of `batch_size` images saves for backward."""
        return sum(unit.saved.at(batch_size) for unit in self.units)

    def per_sample_bytes(self) -> float:
        return sum(unit.saved.per_sample for unit in self.units)


_PROFILES: dict[ProfileKey, ActivationProfile] = {}


def activation_profile(key: ProfileKey) -> ActivationProfile:
    """Return the profile for `key`, measuring what is not cached yet on the CPU (seconds for ResNet50)."""
    profile = _PROFILES.get(key)
    if profile is None:
        profile = measure_profile(key)
        _PROFILES[key] = profile
    return profile


def measure_profile(key: ProfileKey) -> ActivationProfile:
    """Measure the profile for `key` with forward passes of PROFILE_BATCHES random images on the CPU.

    The backbone runs on images and the neck and loss on random features of the backbone's
    output shape and dtype, so that backbone passes serve every embedding size and head. Passes
    already measured in this process are reused. The global RNG is left as it was, so a
    training run that plans first draws the same numbers.
    """
    plain = {batch: _backbone_pass(key, batch, "none") for batch in PROFILE_BATCHES}
    planned = {batch: _backbone_pass(key, batch, key.checkpointing) for batch in PROFILE_BATCHES}
    for batch in PROFILE_BATCHES:
        saved, largest = _head_pass(key, batch)
        pool_saved, pool_largest = planned[batch][TAIL]
        planned[batch] = {**planned[batch], TAIL: (pool_saved + saved, max(pool_largest, largest))}
        plain[batch] = {**plain[batch], TAIL: planned[batch][TAIL]}

    units = []
    for name in plain[PROFILE_BATCHES[0]]:
        region = _region(name, key.checkpointing)
        units.append(
            UnitProfile(
                name=name,
                saved=Line.through({batch: planned[batch][name][0] for batch in PROFILE_BATCHES}),
                recomputed=(
                    Line.through({batch: plain[batch][name][0] for batch in PROFILE_BATCHES}) if region else ZERO
                ),
                largest=Line.through({batch: plain[batch][name][1] for batch in PROFILE_BATCHES}),
                region=region,
            )
        )
    return ActivationProfile(key, tuple(units))


# passes already measured: of the backbone keyed by (arch, image size, autocast, checkpointing,
# batch), so that the plain pass serves every checkpointing mode, and of neck and loss keyed by
# (arch, embedding size, head, autocast, batch)
_BACKBONE_PASSES: dict[tuple, dict[str, tuple[int, int]]] = {}
_HEAD_PASSES: dict[tuple, tuple[int, int]] = {}


def _backbone_pass(key: ProfileKey, batch_size: int, checkpointing: str) -> dict[str, tuple[int, int]]:
    """Return {unit: (saved bytes, largest saved tensor)} of the backbone; the tail contains the pooling's."""
    cache_key = (key.arch, key.image_size, key.autocast, checkpointing, batch_size)
    if cache_key not in _BACKBONE_PASSES:
        logger.info(
            "measuring the activations of %s at %d px, batch %d (checkpointing %s, %s) on the CPU",
            key.arch, key.image_size, batch_size, checkpointing, "16-bit autocast" if key.autocast else "fp32",
        )
        backbone = _measured_backbone(key.arch)
        generator = torch.Generator().manual_seed(0)
        images = torch.randn(batch_size, 3, key.image_size, key.image_size, generator=generator)  # (B, 3, H, W)
        images = images.contiguous(memory_format=torch.channels_last)
        blocks = [block for stage in STAGES for block in getattr(backbone, stage)]
        names = [STEM, *(f"{stage}.{index}" for stage in STAGES for index in range(len(getattr(backbone, stage)))), TAIL]
        with _checkpointing(backbone, checkpointing):
            _BACKBONE_PASSES[cache_key] = _saved_by_unit(
                backbone, lambda: backbone(images), key.autocast, names, [backbone.maxpool, *blocks]
            )
    return _BACKBONE_PASSES[cache_key]


def _head_pass(key: ProfileKey, batch_size: int) -> tuple[int, int]:
    """Return (saved bytes, largest saved tensor) of the neck and the loss on the backbone's features."""
    cache_key = (key.arch, key.embedding_dim, key.head, key.autocast, batch_size)
    if cache_key not in _HEAD_PASSES:
        backbone = _measured_backbone(key.arch)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            neck = build_neck(backbone.feature_dim, key.embedding_dim)
            head = ClassHead(PROFILE_CLASSES, key.embedding_dim or backbone.feature_dim, head_type=key.head)
        tail = nn.ModuleDict({"neck": neck, "head": head})

        # features as the backbone returns them: 16-bit under autocast, where pooling keeps the dtype
        generator = torch.Generator().manual_seed(0)
        dtype = torch.bfloat16 if key.autocast else torch.float32
        features = torch.randn(batch_size, backbone.feature_dim, generator=generator).to(dtype)  # (B, F)
        features.requires_grad_()
        labels = torch.randint(PROFILE_CLASSES, (batch_size,), generator=generator)  # (B,)
        units = _saved_by_unit(tail, lambda: head.loss(neck(features), labels), key.autocast, [TAIL], [])
        _HEAD_PASSES[cache_key] = units[TAIL]
    return _HEAD_PASSES[cache_key]


@functools.lru_cache(maxsize=1)
def _measured_backbone(arch: str) -> nn.Module:
    """Return a randomly initialised backbone to measure; the global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_backbone(arch)


def unit_modules(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Return the modules that contain each unit's parameters; the head's class matrix is not included."""
    backbone = model.backbone
    modules: dict[str, list[nn.Module]] = {STEM: [backbone.conv1, backbone.bn1]}
    for stage in STAGES:
        for index, block in enumerate(getattr(backbone, stage)):
            modules[f"{stage}.{index}"] = [block]
    modules[TAIL] = [model.neck]
    return modules


def _region(name: str, checkpointing: str) -> str | None:
    if name in (STEM, TAIL) or checkpointing == "none":
        return None
    return name.split(".")[0] if checkpointing == "stage" else name


def _saved_by_unit(
    module: nn.Module,
    forward: Callable[[], object],
    autocast: bool,
    names: list[str],
    enders: list[nn.Module],
) -> dict[str, tuple[int, int]]:
    """Return {unit: (saved bytes, largest saved tensor)} of one training forward pass on the CPU.

    `module` contains the parameters, and `forward` runs the pass. Unit `names[i + 1]` starts where
    module `enders[i]` returns. A tensor saved between the end of one unit and the end of the
    next belongs to the next, so the input that a checkpointed block keeps goes with that block.
    """
    saved: dict[str, dict[int, int]] = {name: {} for name in names}
    current = {"unit": 0}
    handles = [
        ender.register_forward_hook(lambda ender, args, output, index=index: current.update(unit=index + 1))
        for index, ender in enumerate(enders)
    ]

    model_storages = {tensor.untyped_storage()._cdata for tensor in itertools.chain(module.parameters(), module.buffers())}
    parameter_ids = {id(parameter) for parameter in module.parameters()}
    seen: set[int] = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storage_id = storage._cdata  # the address of the storage, unique while it is alive
        if storage_id not in seen and storage_id not in model_storages and not copies_parameter(tensor, parameter_ids):
            seen.add(storage_id)
            saved[names[current["unit"]]][storage_id] = storage.nbytes()
        return tensor

    training = module.training
    autocast_context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    try:
        with torch.enable_grad():
            module.train()
            with saved_tensors_hooks(pack, _unpack), autocast_context:
                forward()
    finally:
        module.train(training)
        for handle in handles:
            handle.remove()

    return {name: (sum(sizes.values()), max(sizes.values(), default=0)) for name, sizes in saved.items()}


@contextlib.contextmanager
def _checkpointing(backbone: nn.Module, mode: str) -> Iterator[None]:
    previous = backbone.checkpointing
    backbone.checkpointing = mode
    try:
        yield
    finally:
        backbone.checkpointing = previous


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def clear_cache() -> None:
    """Forget measured profiles and passes, so the next plan measures again."""
    _PROFILES.clear()
    _BACKBONE_PASSES.clear()
    _HEAD_PASSES.clear()
    _measured_backbone.cache_clear()


__all__ = [
    "PROFILE_BATCHES",
    "ActivationProfile",
    "Line",
    "ProfileKey",
    "UnitProfile",
    "activation_profile",
    "clear_cache",
    "measure_profile",
    "unit_modules",
]

"""Measure the activation memory that one training forward pass keeps for the backward pass."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from toolkit.model.classifier import Classifier


def saved_activation_bytes(
    model: Classifier,
    image_size: int,
    batch_size: int = 2,
    *,
    autocast_dtype: torch.dtype | None = None,
) -> int:
    """Return the bytes of tensors saved for backward by one training forward pass of `batch_size` images.

    The pass runs `model(images, labels)` (backbone, neck and loss) in training mode on the
    model's device, with random channels_last images of `image_size` pixels square. With
    `autocast_dtype` (torch.bfloat16 or torch.float16) it runs under autocast. A saved tensor
    counts once per storage, by the storage's full size. The model's parameters and buffers do
    not count, and neither do copies made from one parameter alone, such as the low-precision
    weights that autocast creates. With activation checkpointing only the checkpointed modules'
    inputs count, because their insides are recomputed during backward.

    The result is for the whole batch. Divide by `batch_size` for bytes per sample.
    Training mode, BatchNorm statistics and the global RNG are left as they were.

    NOTE: with checkpointing, the backward pass also keeps the recomputed activations of one
    checkpointed module at a time. That peak is not part of this count.
    """
    if batch_size < 2:
        raise ValueError(
            f"invalid batch_size {batch_size}; expected at least 2, because BatchNorm in training mode "
            "needs more than one value per channel"
        )
    if image_size < 1:
        raise ValueError(f"invalid image_size {image_size}; expected a positive number of pixels")
    device = next(model.parameters()).device

    # inputs from a private generator, so the global RNG stream is untouched
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, image_size, image_size, generator=generator)  # (B, 3, H, W)
    images = images.to(device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(model.num_classes, (batch_size,), generator=generator).to(device)  # (B,)

    # record every saved storage that is not a parameter, a buffer or a copy of a parameter
    model_storages = {tensor.untyped_storage().data_ptr() for tensor in itertools.chain(model.parameters(), model.buffers())}
    parameter_ids = {id(parameter) for parameter in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in model_storages and not copies_parameter(tensor, parameter_ids):
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    # one forward pass; the graph and its saved tensors are freed on return
    autocast = (
        torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    with _restore_training_state(model), torch.enable_grad():
        model.train()
        with saved_tensors_hooks(pack, _unpack), autocast:
            model(images, labels)

    return sum(saved.values())


def _unpack(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def copies_parameter(tensor: torch.Tensor, parameter_ids: set[int], max_depth: int = 8) -> bool:
    """Return whether `tensor` comes from one model parameter through single-input ops only.

    Such a tensor (a cast, transpose or view of a weight) does not depend on the batch. The walk
    follows autograd nodes with exactly one input, like ToCopyBackward0 and TBackward0, down to
    the AccumulateGrad node of a parameter.
    """
    node = tensor.grad_fn
    for _ in range(max_depth):
        if node is None:
            return False
        variable = getattr(node, "variable", None)  # only AccumulateGrad nodes have one
        if variable is not None:
            return id(variable) in parameter_ids
        # Count inputs that need no gradient too: conv1(images) has one differentiable input, the
        # weight, yet depends on the batch.
        if len(node.next_functions) != 1:
            return False
        node = node.next_functions[0][0]
    return False


@contextlib.contextmanager
def _restore_training_state(model: nn.Module) -> Iterator[None]:
    """Restore every module's training flag and every buffer (BatchNorm statistics) on exit."""
    modes = [(module, module.training) for module in model.modules()]
    buffers = [(buffer, buffer.clone()) for buffer in model.buffers()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)


__all__ = ["saved_activation_bytes"]

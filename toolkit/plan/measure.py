"""Measure the peak memory of a real training step on the CPU, where no allocator statistics exist.

PyTorch's CPU allocator keeps no statistics like torch.cuda.max_memory_allocated, so
`LiveTensorCounter` counts instead: a TorchDispatchMode receives every tensor an operator returns
(in the forward pass, in the autograd engine's backward pass, inside activation checkpointing's
recomputation and in the optimizer), records its storage's size once, and subtracts it when a
weak-reference callback reports that the storage was freed. The peak of that sum is the peak of
live tensor bytes, the CPU counterpart of max_memory_allocated. It does not see memory that
kernels allocate outside tensors, such as oneDNN's scratch buffers.

`measure_training_peak` runs one full step (forward, backward, optimizer step) of the model
that `toolkit train` builds in one process, as the training loop does, under the counter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from toolkit.config import TrainConfig
from toolkit.model import build_model
from toolkit.train.distributed import build_model_shard, wrap_model
from toolkit.train.head_optim import RowOptimizer, uses_row_optimizer
from toolkit.train.optim import build_optimizer


class LiveTensorCounter(TorchDispatchMode):
    """Dispatch mode that tracks the bytes of live tensor storages and their peak.

    Only tensors created while the mode is active are seen, so enter it before building the
    model. `reset_peak()` starts a new peak from the current live bytes.
    """

    def __init__(self) -> None:
        super().__init__()
        self._sizes: dict[int, int] = {}
        self.live_bytes = 0
        self.peak_bytes = 0

    def reset_peak(self) -> None:
        self.peak_bytes = self.live_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        output = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(output):
            if isinstance(leaf, torch.Tensor):
                self._track(leaf)
        return output

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        storage_id = storage._cdata  # the address of the storage, unique while it is alive
        if storage_id in self._sizes:
            return  # a view, or an in-place result
        size = storage.nbytes()
        self._sizes[storage_id] = size
        self.live_bytes += size
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        # PyTorch keeps one Python object per storage alive as long as the storage, so the
        # callback runs when the storage is freed
        weakref.finalize(storage, self._release, storage_id)

    def _release(self, storage_id: int) -> None:
        self.live_bytes -= self._sizes.pop(storage_id)


@dataclass(frozen=True)
class MeasuredPeak:
    """Peak live tensor bytes of one training step on the CPU, by phase."""

    before_step: int  # parameters, buffers, optimizer state and the input batch
    forward_backward: int  # peak during the forward and backward pass
    optimizer_step: int  # peak during optimizer.step()

    @property
    def peak_bytes(self) -> int:
        return max(self.forward_backward, self.optimizer_step)


def measure_training_peak(
    config: TrainConfig, num_classes: int, batch_size: int, *, autocast_dtype: torch.dtype | None = None
) -> MeasuredPeak:
    """Measure the peak live tensor bytes of one training step of `config` in one process on the CPU.

    The model, optimizers and step are those of `toolkit train`: the class matrix goes to a
    RowOptimizer with class sampling or the fused head update, and to torch.optim otherwise. A
    first step on zero gradients creates torch.optim's state, as the first real step would, so
    the measured step is a steady one: random channels_last fp32 images, the loss under autocast
    when `autocast_dtype` is set, backward, torch.optim's step, the row optimizer's step on the
    sampled rows, and zero_grad(set_to_none=True). The global RNG is left as it was.
    """
    config = dataclasses.replace(config, batch_size=batch_size, pretrained=None)
    device = torch.device("cpu")
    autocast = (
        torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype is not None else contextlib.nullcontext()
    )
    with torch.random.fork_rng(devices=[]), LiveTensorCounter() as counter:
        torch.manual_seed(0)
        model, head = build_model_shard(lambda: build_model(config, num_classes), config, None)
        model = wrap_model(model, head, None, device)
        model.train()
        optimizer = build_optimizer(model, config)
        head_optimizer = RowOptimizer(head.weight, config) if head is not None and uses_row_optimizer(config) else None
        if head_optimizer is not None and config.fused_head_update:
            head.row_update = head_optimizer.update

        # create torch.optim's state, as the first step would
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.grad = torch.zeros_like(parameter)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        images = torch.randn(batch_size, 3, config.image_size, config.image_size)  # (B, 3, H, W)
        images = images.contiguous(memory_format=torch.channels_last)
        labels = torch.randint(num_classes, (batch_size,))  # (B,)
        before = counter.live_bytes

        # forward and backward
        counter.reset_peak()
        with autocast:
            loss = model(images, labels)
        loss.backward()
        del loss
        forward_backward = counter.peak_bytes

        # optimizer step: torch.optim, then the row optimizer on the sampled rows
        counter.reset_peak()
        sampled = []
        if head is not None:
            sampled = [(part.rows, part.weight_rows.grad) for part in head.take_sampled() if part.weight_rows.grad is not None]
        optimizer.step()
        if head_optimizer is not None:
            head_optimizer.step(sampled)
        step = counter.peak_bytes
        optimizer.zero_grad(set_to_none=True)

    return MeasuredPeak(before_step=before, forward_backward=forward_backward, optimizer_step=step)


__all__ = ["LiveTensorCounter", "MeasuredPeak", "measure_training_peak"]

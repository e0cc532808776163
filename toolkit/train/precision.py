"""Device and mixed-precision choice shared by train, eval and predict."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from toolkit.config import ConfigError


def resolve_device(name: str) -> torch.device:
    """Return the device for "auto" (CUDA when available, else CPU) or a torch device string."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"invalid device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


@dataclass(frozen=True)
class Precision:
    """The autocast dtype (None for fp32) and whether fp16 needs a GradScaler."""

    name: str
    dtype: torch.dtype | None
    device_type: str

    @property
    def uses_scaler(self) -> bool:
        return self.dtype == torch.float16 and self.device_type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


def cpu_supports_bf16() -> bool:
    """Return whether the CPU has native bf16 instructions; elsewhere bf16 is emulated and slow."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe and probe())


def resolve_precision(name: str, device: torch.device) -> Precision:
    """Resolve auto|bf16|fp16|fp32 for a device.

    auto picks bf16 where the device supports it natively, else fp16 on CUDA (with a GradScaler),
    else fp32. bf16 on a CPU without native support still works when asked for explicitly.
    """
    if name == "auto":
        if device.type == "cuda":
            name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            name = "bf16" if cpu_supports_bf16() else "fp32"
    if name == "fp32":
        return Precision("fp32", None, device.type)
    if name == "bf16":
        return Precision("bf16", torch.bfloat16, device.type)
    if name == "fp16":
        if device.type != "cuda":
            raise ConfigError("precision fp16 needs a CUDA device; on the CPU use bf16 or fp32")
        return Precision("fp16", torch.float16, device.type)
    raise ConfigError(f"invalid precision {name!r}; expected auto, bf16, fp16 or fp32")

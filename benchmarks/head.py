"""Time and measure the classification head: plain F.linear + F.cross_entropy beside the chunked loss.

Both variants run forward + backward for a (B, D) batch of embeddings against a (C, D) class
matrix, in one process, alternating repeat by repeat so that a change in machine load hits both.
The time is the median of the repeats after warm-up. The logit workspace is the peak memory
beyond the inputs, the weights and the (C, D) weight gradient:

- on CUDA, torch.cuda.max_memory_allocated() during one step, minus the memory allocated
  before it and minus the weight gradient;
- on the CPU, the peak bytes of tensor storages alive at once during one step, tracked by a
  TorchDispatchMode that receives every operator's outputs, minus the weight gradient. Buffers
  that BLAS libraries allocate inside a matmul are not tensors and are not counted.

The weight gradient is subtracted from the peak even where the peak comes before the gradient
exists, so the workspace is the memory a step needs on top of inputs, weights and gradient.

Usage: python benchmarks/head.py [--batch 256] [--dims 512 2048] [--classes 300000]
"""

from __future__ import annotations

import argparse
import statistics
import time
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from toolkit.ops import chunked_cross_entropy

# Targets: the chunked loss keeps at most this share of the plain workspace, and takes at most
# this multiple of the plain time. Recomputing each chunk's logits makes 4/3 the floor, because
# the chunked step runs four (B, D) × (D, C) sized matmuls where the plain one runs three.
WORKSPACE_TARGET = 0.10
TIME_TARGET = 1.4
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256, help="batch size B (rows of embeddings)")
    parser.add_argument("--dims", type=int, nargs="+", default=[512, 2048], help="embedding widths D to run")
    parser.add_argument("--classes", type=int, default=300_000, help="number of classes C")
    parser.add_argument("--chunk-size", type=int, default=8192, help="classes per chunk of the chunked loss")
    parser.add_argument("--repeats", type=int, default=5, help="timed forward + backward steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant before timing")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto picks cuda when available")
    parser.add_argument("--amp", choices=list(AMP_DTYPES), default="none", help="autocast dtype for both variants")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads, or 0 for torch's default")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# the two variants


def plain_loss(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
    return F.cross_entropy(F.linear(x, weight), labels)


def chunked_loss(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk_size: int) -> torch.Tensor:
    return chunked_cross_entropy(x, weight, labels, chunk_size=chunk_size)


VARIANTS: dict[str, Callable[..., torch.Tensor]] = {"plain": plain_loss, "chunked": chunked_loss}


def make_inputs(B: int, D: int, C: int, device: torch.device, seed: int):
    generator = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, D, device=device, generator=generator).requires_grad_()
    # scaled in place, so no temporary (C, D) copy raises the peak memory before a step
    weight = torch.randn(C, D, device=device, generator=generator).mul_(D**-0.5).requires_grad_()
    labels = torch.randint(0, C, (B,), device=device, generator=generator)
    return x, weight, labels


def run_step(variant: str, x, weight, labels, args: argparse.Namespace) -> None:
    """Run forward + backward once, leaving fresh gradients in x.grad and weight.grad."""
    x.grad = None
    weight.grad = None
    amp_dtype = AMP_DTYPES[args.amp]
    with torch.autocast(device_type=x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        loss = VARIANTS[variant](x, weight, labels, args.chunk_size)
    loss.backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# time


def time_variants(D: int, device: torch.device, args: argparse.Namespace) -> dict[str, float]:
    """Return the median seconds per forward + backward of each variant."""
    x, weight, labels = make_inputs(args.batch, D, args.classes, device, args.seed)
    for _ in range(args.warmup):
        for variant in VARIANTS:
            run_step(variant, x, weight, labels, args)

    samples: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for _ in range(args.repeats):
        for variant in VARIANTS:
            start = time.perf_counter()
            run_step(variant, x, weight, labels, args)
            samples[variant].append(time.perf_counter() - start)
    return {variant: statistics.median(times) for variant, times in samples.items()}


# ---------------------------------------------------------------------------------------------
# workspace


def weight_grad_bytes(D: int, args: argparse.Namespace) -> int:
    return args.classes * D * torch.finfo(torch.float32).bits // 8


def cuda_workspace(variant: str, D: int, device: torch.device, args: argparse.Namespace) -> int:
    """Return the peak bytes allocated by one step beyond what existed before it and the weight gradient."""
    x, weight, labels = make_inputs(args.batch, D, args.classes, device, args.seed)
    run_step(variant, x, weight, labels, args)  # warm-up: cuBLAS workspaces, kernels
    x.grad = None
    weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run_step(variant, x, weight, labels, args)
    peak = torch.cuda.max_memory_allocated(device)
    return peak - before - weight_grad_bytes(D, args)


class LiveTensorBytes(TorchDispatchMode):
    """Track the bytes of tensor storages that operators create while the mode is active.

    A storage is counted once when an operator first returns it and released when its last
    reference dies (a weakref finalizer on the storage), so `peak` is the most tensor memory
    alive at once. The storages of `existing` tensors are never counted, even when an operator
    returns a view of them.
    """

    def __init__(self, *existing: torch.Tensor) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._tracked: set[int] = set()
        # The set keeps ids, so the tensors themselves must outlive the mode.
        self._existing = {id(tensor.untyped_storage()) for tensor in existing}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._track(tensor.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = id(storage)
        if key in self._tracked or key in self._existing or storage.nbytes() == 0:
            return
        self._tracked.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key, storage.nbytes())

    def _release(self, key: int, nbytes: int) -> None:
        self._tracked.discard(key)
        self.live -= nbytes


def cpu_workspace(variant: str, D: int, args: argparse.Namespace) -> int:
    """Return the peak bytes of tensors alive during one step, minus the weight gradient."""
    x, weight, labels = make_inputs(args.batch, D, args.classes, torch.device("cpu"), args.seed)
    x.grad = None
    weight.grad = None
    with LiveTensorBytes(x, weight, labels) as tracker:
        run_step(variant, x, weight, labels, args)
    return tracker.peak - weight_grad_bytes(D, args)


# ---------------------------------------------------------------------------------------------
# report


def verdict(value: float, target: float) -> str:
    return "PASS" if value <= target else "FAIL"


def report(D: int, times: dict[str, float], workspace: dict[str, int]) -> None:
    time_ratio = times["chunked"] / times["plain"]
    workspace_ratio = workspace["chunked"] / workspace["plain"]
    print(f"\nD = {D}")
    print(f"  {'variant':<8} {'fwd+bwd ms':>11} {'workspace MiB':>14}")
    for variant in VARIANTS:
        print(f"  {variant:<8} {times[variant] * 1e3:>11.1f} {workspace[variant] / MIB:>14.1f}")
    print(f"  time ratio chunked/plain      {time_ratio:6.3f}  target <= {TIME_TARGET}  {verdict(time_ratio, TIME_TARGET)}")
    print(
        f"  workspace ratio chunked/plain {workspace_ratio:6.3f}  target <= {WORKSPACE_TARGET}  "
        f"{verdict(workspace_ratio, WORKSPACE_TARGET)}"
    )


def pick_device(choice: str) -> torch.device:
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was requested but torch.cuda.is_available() is False. Use --device cpu.")
    return torch.device(choice)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
        memory_note = "torch.cuda.max_memory_allocated() during one step"
    else:
        machine = f"CPU, {torch.get_num_threads()} torch threads"
        memory_note = "peak bytes of live tensors during one step, tracked by a TorchDispatchMode"
    print(f"head benchmark: B={args.batch} C={args.classes} chunk={args.chunk_size} amp={args.amp} on {machine}")
    print(f"time: median of {args.repeats} forward + backward steps after {args.warmup} warm-up, variants alternating")
    print(f"workspace: {memory_note}, minus the (C, D) float32 weight gradient")

    for D in args.dims:
        times = time_variants(D, device, args)
        if device.type == "cuda":
            workspace = {variant: cuda_workspace(variant, D, device, args) for variant in VARIANTS}
        else:
            workspace = {variant: cpu_workspace(variant, D, args) for variant in VARIANTS}
        report(D, times, workspace)


if __name__ == "__main__":
    main()

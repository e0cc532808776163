"""Check on one GPU that the reference recipe fits in 11 GiB, keeps its speed at 300,000 classes, and matches the plan.

Two cases train with toolkit's model, optimizer and step (forward under autocast, backward,
optimizer step, zero_grad(set_to_none=True), as `toolkit train` does), in one process, on
random channels_last images that stay on the device, so data loading is not measured:

- baseline: the reference recipe (pipelines/reference-300k.toml: ResNet50 at 224 px, 512-d
  neck, stage checkpointing, bf16 or fp16 autocast, SGD, batch 128) with 1,000 classes;
- reference: the same recipe with 300,000 classes.

For each case it prints the training throughput (images per second over the timed steps after
warm-up), the peak memory torch.cuda.max_memory_allocated() over the timed steps, and the
memory planner's peak (toolkit.plan.plan_memory) beside it. The reference case runs with the
caching allocator capped at 11 GiB minus the memory the process holds outside the allocator
(CUDA context, library handles), so a reference run that completes is one that fits an
11 GiB GPU. Targets, each printed as PASS or FAIL:

- throughput: the reference case reaches at least 0.9× the baseline's images per second;
- fit: the reference case runs at batch 128 or more within the 11 GiB cap;
- plan: the planned peak is within 15% of the measured peak in both cases.

`--device cpu --tiny` runs the same script on the CPU with ResNet18 at 64 px, batch 8, fp32 and
20,000 classes instead of 300,000. There the measured peak is the peak of live tensor bytes
from toolkit.plan.measure (the CPU allocator keeps no statistics), measured in a separate step
so that counting does not slow the timed steps. Only the plan target applies to it.

Usage: benchmarks/gpu_check.sh [--steps 20] [--warmup 5]
       benchmarks/gpu_check.sh --device cpu --tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from toolkit.config import TrainConfig, resolve
from toolkit.model import build_model
from toolkit.plan import Plan, PlanInputs, inputs_from_config, largest_batch, plan_memory
from toolkit.plan.measure import measure_training_peak
from toolkit.train.optim import build_optimizer
from toolkit.train.precision import resolve_precision

RECIPE = Path(__file__).resolve().parent.parent / "pipelines" / "reference-300k.toml"
GiB = 1024**3
MiB = 1024**2

TARGET_THROUGHPUT_RATIO = 0.9
TARGET_MEMORY_BYTES = 11 * GiB
TARGET_MIN_BATCH = 128
TARGET_PLAN_ERROR = 0.15


@dataclass(frozen=True)
class Case:
    name: str
    classes: int
    config: TrainConfig


@dataclass
class Measurement:
    images_per_s: float = 0.0
    peak_bytes: int = 0  # torch.cuda.max_memory_allocated, or the CPU's peak live tensor bytes
    reserved_bytes: int = 0  # torch.cuda.max_memory_reserved; 0 on the CPU
    out_of_memory: str = ""  # the error message when the case ran out of memory


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cuda runs the check; cpu needs --tiny")
    parser.add_argument("--tiny", action="store_true", help="ResNet18 at 64 px, batch 8, 20,000 classes: a quick run of the script itself")
    parser.add_argument("--recipe", type=Path, default=RECIPE, help="TOML recipe whose [train] table both cases use")
    parser.add_argument("--steps", type=int, help="timed training steps per case (default 20, 3 with --tiny)")
    parser.add_argument("--warmup", type=int, help="untimed steps per case before timing (default 5, 1 with --tiny)")
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 3 if args.tiny else 20
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 5
    if args.steps < 1 or args.warmup < 1:
        parser.error(f"--steps and --warmup must be at least 1, got {args.steps} and {args.warmup}")
    if args.device == "cpu" and not args.tiny:
        parser.error("--device cpu needs --tiny: the full check trains ResNet50 at 224 px, which takes hours on a CPU")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device found; run on a machine with a GPU, or use --device cpu --tiny")
    return args


def make_cases(args: argparse.Namespace) -> tuple[Case, Case]:
    """Return the baseline and reference cases from the recipe, scaled down with --tiny."""
    config = resolve(TrainConfig, args.recipe, {}, "train")
    config = dataclasses.replace(config, pretrained=None, device=args.device)
    reference_classes = 300_000
    if args.tiny:
        config = dataclasses.replace(config, arch="resnet18", image_size=64, batch_size=8, precision="fp32")
        reference_classes = 20_000
    return Case("baseline", 1000, config), Case("reference", reference_classes, config)


# ---------------------------------------------------------------------------------------------
# measurement


def train_steps(model, optimizer, scaler, precision, images, labels, steps: int) -> None:
    """Run `steps` training steps the way the training loop does."""
    for _ in range(steps):
        with precision.autocast():
            loss = model(images, labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)


def measure_case(case: Case, device: torch.device, args: argparse.Namespace) -> Measurement:
    """Time the case's training steps and read its peak memory; an out-of-memory error is recorded."""
    config = case.config
    precision = resolve_precision(config.precision, device)
    torch.manual_seed(0)
    try:
        model = build_model(config, case.classes).to(device)
        optimizer = build_optimizer(model, config)
        scaler = torch.amp.GradScaler(device.type, enabled=precision.uses_scaler)
        B, S = config.batch_size, config.image_size
        images = torch.randn(B, 3, S, S, device=device).contiguous(memory_format=torch.channels_last)  # (B, 3, S, S)
        labels = torch.randint(case.classes, (B,), device=device)  # (B,)

        # warm up, then time the steps and read the peak over them
        train_steps(model, optimizer, scaler, precision, images, labels, args.warmup)
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        train_steps(model, optimizer, scaler, precision, images, labels, args.steps)
        synchronize(device)
        elapsed = time.perf_counter() - start
    except torch.cuda.OutOfMemoryError as error:
        return Measurement(out_of_memory=str(error).splitlines()[0])

    measurement = Measurement(images_per_s=args.steps * B / elapsed)
    if device.type == "cuda":
        measurement.peak_bytes = torch.cuda.max_memory_allocated(device)
        measurement.reserved_bytes = torch.cuda.max_memory_reserved(device)
    else:
        del model, optimizer, images, labels
        measurement.peak_bytes = measure_training_peak(config, case.classes, B).peak_bytes
    return measurement


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    """Return cached blocks to the driver and reset the peak, so the next case starts clean."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def memory_outside_allocator(device: torch.device) -> int:
    """Return the device memory this process uses outside PyTorch's caching allocator (context, handles).

    NOTE: the driver's count of used memory includes other processes on the same GPU, so run
    the check on an otherwise idle GPU.
    """
    free, total = torch.cuda.mem_get_info(device)
    return (total - free) - torch.cuda.memory_reserved(device)


def cap_allocator(device: torch.device, limit_bytes: int) -> None:
    """Make the caching allocator raise OutOfMemoryError beyond `limit_bytes`."""
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(limit_bytes / total, device)


# ---------------------------------------------------------------------------------------------
# plan


def plan_inputs(case: Case, device: torch.device) -> PlanInputs:
    precision = resolve_precision(case.config.precision, device).name
    return inputs_from_config(case.config, case.classes, precision=precision, device_type=device.type)


def plan_case(case: Case, device: torch.device) -> Plan:
    return plan_memory(plan_inputs(case, device))


# ---------------------------------------------------------------------------------------------
# report


def report(
    cases: tuple[Case, Case],
    measurements: dict[str, Measurement],
    plans: dict[str, Plan],
    device: torch.device,
    args: argparse.Namespace,
    cap_bytes: int,
    outside_bytes: int,
) -> bool:
    """Print the table and the targets; return whether every target that applies passed."""
    print(f"{'case':<10} {'classes':>8} {'batch':>6} {'img/s':>9} {'measured peak':>14} {'planned peak':>13} {'plan/measured':>14} {'reserved':>10}")
    for case in cases:
        measurement, plan = measurements[case.name], plans[case.name]
        if measurement.out_of_memory:
            print(f"{case.name:<10} {case.classes:>8} {case.config.batch_size:>6} out of memory: {measurement.out_of_memory}")
            continue
        ratio = plan.peak_bytes / measurement.peak_bytes
        reserved = f"{measurement.reserved_bytes / MiB:>6.0f} MiB" if device.type == "cuda" else f"{'-':>10}"
        print(
            f"{case.name:<10} {case.classes:>8} {case.config.batch_size:>6} {measurement.images_per_s:>9.1f} "
            f"{measurement.peak_bytes / MiB:>10.0f} MiB {plan.peak_bytes / MiB:>9.0f} MiB {ratio:>14.3f} {reserved}"
        )

    baseline, reference = (measurements[case.name] for case in cases)
    results = []

    # throughput
    if device.type == "cuda" and not (baseline.out_of_memory or reference.out_of_memory):
        ratio = reference.images_per_s / baseline.images_per_s
        results.append(("throughput", ratio >= TARGET_THROUGHPUT_RATIO,
                        f"{cases[1].classes:,} classes reach {ratio:.2f}x the {cases[0].classes:,}-class rate (target >= {TARGET_THROUGHPUT_RATIO}x)"))
    elif device.type == "cuda":
        results.append(("throughput", False, "a case ran out of memory"))
    else:
        results.append(("throughput", None, "applies to the GPU run only"))

    # fit in 11 GiB
    if device.type == "cuda":
        batch = cases[1].config.batch_size
        passed = not reference.out_of_memory and batch >= TARGET_MIN_BATCH
        results.append(("fit", passed,
                        f"batch {batch} {'ran' if not reference.out_of_memory else 'did not run'} with the allocator capped at "
                        f"{cap_bytes / GiB:.2f} GiB (11 GiB minus {outside_bytes / MiB:.0f} MiB outside the allocator); "
                        f"target: batch >= {TARGET_MIN_BATCH}"))
    else:
        results.append(("fit", None, "applies to the GPU run only"))

    # plan accuracy
    errors = []
    for case in cases:
        measurement = measurements[case.name]
        if measurement.out_of_memory:
            errors.append((case.name, None))
        else:
            errors.append((case.name, plans[case.name].peak_bytes / measurement.peak_bytes - 1))
    passed = all(error is not None and abs(error) <= TARGET_PLAN_ERROR for _, error in errors)
    detail = ", ".join(f"{name} {error:+.1%}" if error is not None else f"{name} not measured" for name, error in errors)
    results.append(("plan", passed, f"planned peak vs measured: {detail} (target within {TARGET_PLAN_ERROR:.0%})"))

    # the plan's own view of the reference case on an 11 GiB GPU
    if device.type == "cuda":
        inputs = plan_inputs(cases[1], device)
        print(f"plan for an 11 GiB GPU: {plans[cases[1].name].total_bytes / GiB:.2f} GiB with overhead at batch "
              f"{cases[1].config.batch_size}; largest batch {largest_batch(inputs, TARGET_MEMORY_BYTES)}")

    for name, passed, detail in results:
        verdict = "n/a " if passed is None else "PASS" if passed else "FAIL"
        print(f"{verdict} {name}: {detail}")
    return all(passed is not False for _, passed, _ in results)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    cases = make_cases(args)
    started = time.perf_counter()
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}; torch {torch.__version__}")

    # the plan first, so its measurement on the CPU does not overlap the timed steps
    plans = {case.name: plan_case(case, device) for case in cases}

    # baseline, then the reference case under the 11 GiB cap
    measurements = {cases[0].name: measure_case(cases[0], device, args)}
    release(device)
    cap_bytes = outside_bytes = 0
    if device.type == "cuda":
        outside_bytes = memory_outside_allocator(device)
        cap_bytes = TARGET_MEMORY_BYTES - outside_bytes
        cap_allocator(device, cap_bytes)
    measurements[cases[1].name] = measure_case(cases[1], device, args)

    passed = report(cases, measurements, plans, device, args, cap_bytes, outside_bytes)
    print(f"finished in {time.perf_counter() - started:.0f} s")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())

"""Plans from settings: the `toolkit plan` command's work, and the check `toolkit train` runs at start."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path

import torch

from toolkit.config import PlanConfig, TrainConfig
from toolkit.plan.fit import MAX_BATCH, PlanResult, evaluate
from toolkit.plan.planner import PlanError, inputs_from_config, naive_inputs
from toolkit.plan.sizes import format_size, parse_size

logger = logging.getLogger(__name__)

MEMINFO = Path("/proc/meminfo")


def plan_run(train: TrainConfig, settings: PlanConfig, num_classes: int) -> PlanResult:
    """Plan `train` on one GPU of `settings.gpu_memory` (default: the current CUDA device's memory).

    Precision "auto" becomes what the current CUDA device would use, or bf16 on a machine without
    CUDA; fp16 needs the same memory as bf16.
    """
    budget, device_note = gpu_budget(settings.gpu_memory)
    precision, precision_note = planned_precision(train.precision)
    inputs = inputs_from_config(
        train,
        num_classes,
        precision=precision,
        device_type="cuda",
        world_size=settings.world_size,
    )
    if settings.naive:
        notes = (device_note,) if device_note else ()
        return evaluate(naive_inputs(inputs), budget, suggest=False, notes=notes)
    notes = tuple(note for note in (device_note, precision_note) if note)
    return evaluate(inputs, budget, notes=notes)


def gpu_budget(gpu_memory: str | None) -> tuple[int, str]:
    """Return the planned GPU's memory in bytes and where the number comes from."""
    if gpu_memory is not None:
        return parse_size(gpu_memory), ""
    if not torch.cuda.is_available():
        raise PlanError(
            "no CUDA device on this machine to read the GPU memory from; pass the memory of the GPU "
            "to plan for, such as --gpu-memory 11GiB"
        )
    index = torch.cuda.current_device()
    properties = torch.cuda.get_device_properties(index)
    return properties.total_memory, f"GPU memory of cuda:{index} ({properties.name})"


def planned_precision(name: str) -> tuple[str, str]:
    """Resolve "auto" for the GPU being planned; return the precision and a note when it was assumed."""
    if name != "auto":
        return name, ""
    if torch.cuda.is_available():
        return _resolve_precision("auto", torch.device("cuda")), ""
    return "bf16", "precision auto planned as bf16, because no CUDA device is here to ask; fp16 needs the same memory"


# ---------------------------------------------------------------------------------------------
# the check at the start of training


def check_plan(
    config: TrainConfig,
    num_classes: int,
    device: torch.device,
    max_batch: int | None = None,
    world_size: int = 1,
) -> PlanResult:
    """Plan `config` on `device`, one of `world_size` ranks, and check it against the device's memory.

    On CUDA the budget is the device's total memory. On the CPU it is the memory available when
    the run starts (MemAvailable of /proc/meminfo, else the free physical pages), so that the
    check also warns a CPU run that would swap or be killed. The largest batch is searched up to
    `max_batch` when it is given.
    """
    # NOTE: ranks on the CPU of one machine share its RAM, but each checks against all of it
    precision = _resolve_precision(config.precision, device)
    inputs = inputs_from_config(
        config, num_classes, precision=precision, device_type=_device_type(device), world_size=world_size
    )
    budget = device_memory_bytes(device)
    return evaluate(inputs, budget, suggest=False, max_batch=MAX_BATCH if max_batch is None else max_batch)


def plan_training(
    config: TrainConfig,
    num_classes: int,
    device: torch.device,
    max_batch: int | None = None,
    world_size: int = 1,
) -> TrainConfig:
    """Log the memory plan of a run, warn when it exceeds the device, and apply --auto-batch.

    Returns `config`, with `batch_size` set to the largest batch that fits (up to `max_batch`)
    when `config.auto_batch` is set and the run is not resumed. A resumed run keeps the batch it
    started with. A plan that cannot be made only logs a warning, unless auto_batch needs it.
    Then PlanError is raised, as it is when batch 1 does not fit.
    """
    choose_batch = config.auto_batch and not config.resume
    try:
        result = check_plan(config, num_classes, device, max_batch, world_size)
    except PlanError as error:
        if choose_batch:
            raise
        logger.warning("no memory plan for this run: %s", error)
        return config

    plan = result.plan
    logger.info(
        "memory plan: %s at batch %d (peak %s during the %s, plus %s overhead) of %s on %s",
        format_size(plan.total_bytes), config.batch_size, format_size(plan.peak_bytes), plan.peak_moment,
        format_size(plan.overhead_bytes), format_size(result.budget_bytes), device,
    )

    if choose_batch:
        if result.largest_batch == 0:
            raise PlanError(
                f"--auto-batch found no batch that fits {format_size(result.budget_bytes)} on {device}: batch 1 "
                "alone needs more; run `toolkit plan` with these settings to see which changes make it fit"
            )
        logger.info(
            "--auto-batch: batch %d, the largest that the memory plan fits in %s on %s",
            result.largest_batch, format_size(result.budget_bytes), device,
        )
        return dataclasses.replace(config, batch_size=result.largest_batch)
    if config.auto_batch:
        logger.info("--auto-batch keeps batch %d of the resumed run", config.batch_size)

    if not result.fits:
        logger.warning(
            "the memory plan needs %s at batch %d but %s has %s, so the run may run out of memory; "
            "the largest batch that fits is %d (--auto-batch picks it), and `toolkit plan` lists other changes",
            format_size(plan.total_bytes), config.batch_size, device, format_size(result.budget_bytes),
            result.largest_batch,
        )
    return config


def device_memory_bytes(device: torch.device) -> int:
    """Return the memory budget of `device`: CUDA total memory, or the RAM available on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        return available_ram_bytes()
    raise PlanError(f"cannot read the memory of device {device}; toolkit plans CUDA and CPU devices")


def available_ram_bytes() -> int:
    """Return MemAvailable from /proc/meminfo, or the free physical pages where that file is missing."""
    try:
        for line in MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024  # the file gives kB
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _resolve_precision(name: str, device: torch.device) -> str:
    # imported here because toolkit.train imports this module to plan at the start of a run
    from toolkit.train.precision import resolve_precision

    return resolve_precision(name, device).name


def _device_type(device: torch.device) -> str:
    if device.type not in ("cuda", "cpu"):
        raise PlanError(f"cannot plan device {device}; toolkit plans CUDA and CPU devices")
    return device.type


__all__ = [
    "available_ram_bytes",
    "check_plan",
    "device_memory_bytes",
    "gpu_budget",
    "plan_run",
    "plan_training",
    "planned_precision",
]

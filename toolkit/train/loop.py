"""The training loop: stream batches, step the optimizer, validate, log and checkpoint."""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from toolkit.config import TrainConfig, to_toml
from toolkit.data import build_eval_loader, build_train_loader, normalize_batch, steps_per_epoch
from toolkit.dataset import Dataset, load_dataset
from toolkit.eval.inference import evaluate
from toolkit.model import build_model
from toolkit.plan import PlanError, plan_training
from toolkit.train.checkpoint import config_to_dict, load_checkpoint, save_checkpoint
from toolkit.train.optim import build_optimizer, build_scheduler
from toolkit.train.precision import Precision, resolve_device, resolve_precision

logger = logging.getLogger(__name__)

# Settings that may change when a run is resumed; every other setting must match the checkpoint.
RESUMABLE_CHANGES = frozenset({"workers", "device", "log_every", "save_every", "val_every", "resume", "epochs", "steps"})

ProgressCallback = Callable[[dict[str, Any]], None]


class TrainingError(RuntimeError):
    """A run that cannot start or cannot go on; the message says why and what to do."""


@dataclass
class RunState:
    """Where the run is: what a checkpoint stores besides the model and optimizer."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    best_top1: float = -1.0
    skipped_samples: int = 0
    skipped_steps: int = 0
    bad_steps_in_row: int = 0
    last_val: dict[str, Any] = field(default_factory=dict)


@dataclass
class Trainer:
    """Everything one run needs, built once by `prepare`."""

    config: TrainConfig
    dataset: Dataset
    run_dir: Path
    device: torch.device
    precision: Precision
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    total_steps: int
    epoch_steps: int
    state: RunState

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"


def train(
    dataset_dir: Path,
    run_dir: Path,
    config: TrainConfig,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Train on DATASET into RUN and return the final state and last validation."""
    trainer = prepare(dataset_dir, run_dir, config)
    report = progress or (lambda event: None)
    report({"kind": "start", "total_steps": trainer.total_steps, "step": trainer.state.step, "device": str(trainer.device), "precision": trainer.precision.name})

    with open(run_dir / "metrics.jsonl", "a") as metrics:
        while trainer.state.step < trainer.total_steps:
            run_epoch(trainer, metrics, report)

        # validate once more unless the last step already did
        if trainer.state.last_val.get("step") != trainer.state.step:
            validate(trainer, metrics, report)
        save(trainer, "last.pt")

    report({"kind": "end", "step": trainer.state.step})
    return {"step": trainer.state.step, "epoch": trainer.state.epoch, "best_top1": trainer.state.best_top1, **trainer.state.last_val}


def prepare(dataset_dir: Path, run_dir: Path, config: TrainConfig) -> Trainer:
    """Load the dataset, build model and optimizer, and restore the last checkpoint on resume."""
    # dataset and run directory
    dataset = load_dataset(dataset_dir)
    last = run_dir / "checkpoints" / "last.pt"
    checkpoint = None
    if config.resume:
        checkpoint = load_checkpoint(last)
        check_resume_settings(checkpoint["config"], config, last)
        if list(checkpoint["classes"]) != list(dataset.classes):
            raise TrainingError(f"the class list in {last} differs from {dataset_dir}; resume with the dataset the run started on")
    elif last.exists():
        raise TrainingError(f"{run_dir} already holds a run; pass --resume to continue it or choose a new RUN directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.toml").write_text(to_toml(config, "train"))

    # device, precision, model, optimizer
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    torch.manual_seed(config.seed)
    model = build_model(config, dataset.num_classes).to(device)

    # memory plan: warn when the run may not fit the device; --auto-batch picks the largest batch
    # that fits, at most the train split, and config.toml records it
    try:
        max_batch = max(1, dataset.split("train").samples // config.grad_accum)
        planned = plan_training(config, dataset.num_classes, device, max_batch=max_batch)
    except PlanError as error:
        raise TrainingError(str(error)) from None
    if planned.batch_size != config.batch_size:
        config = planned
        (run_dir / "config.toml").write_text(to_toml(config, "train"))

    optimizer = build_optimizer(model, config)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.uses_scaler)

    # run length: optimizer steps, each of grad_accum micro-batches
    epoch_steps = steps_per_epoch(dataset, config) // config.grad_accum
    if epoch_steps == 0:
        raise TrainingError(
            f"the train split of {dataset_dir} has {dataset.split('train').samples} samples, fewer than one step of "
            f"{config.batch_size * config.grad_accum}; lower --batch-size or --grad-accum"
        )
    total_steps = config.steps if config.steps > 0 else config.epochs * epoch_steps
    scheduler = build_scheduler(optimizer, config, total_steps)

    state = RunState()
    if checkpoint is not None:
        state = restore(checkpoint, model, optimizer, scheduler, scaler)
        logger.info("resumed %s at step %d (epoch %d)", last, state.step, state.epoch)

    logger.info(
        "training %s on %d classes, %d train samples: %d steps of batch %d on %s (%s)",
        config.arch, dataset.num_classes, dataset.split("train").samples, total_steps,
        config.batch_size * config.grad_accum, device, precision.name,
    )
    return Trainer(config, dataset, run_dir, device, precision, model, optimizer, scheduler, scaler, total_steps, epoch_steps, state)


def check_resume_settings(stored: dict[str, Any], config: TrainConfig, source: Path) -> None:
    """Raise TrainingError when a setting that shapes the run differs from the checkpoint's."""
    current = config_to_dict(config)
    changed = sorted(key for key in current if key not in RESUMABLE_CHANGES and stored.get(key) != current[key])
    if changed:
        details = ", ".join(f"{key}: {stored.get(key)!r} -> {current[key]!r}" for key in changed)
        raise TrainingError(f"settings differ from the run in {source} ({details}); resume with the same settings")


def run_epoch(trainer: Trainer, metrics, report: ProgressCallback) -> None:
    """Run the rest of the current epoch (or of the run), validating and saving on schedule."""
    config, state, model = trainer.config, trainer.state, trainer.model
    model.train()
    loader = build_train_loader(trainer.dataset, config, state.epoch)

    # on resume, skip the micro-batches this epoch already consumed; the stream is deterministic per epoch
    skip = state.epoch_step * config.grad_accum
    window = StepWindow()
    micro = 0
    seen = 0
    wait_start = time.perf_counter()
    for batch in loader:
        seen += 1
        state.skipped_samples += batch.skipped
        if skip > 0:
            skip -= 1
            continue
        window.data_wait += time.perf_counter() - wait_start

        # forward and backward of one micro-batch
        images = normalize_batch(batch.images, trainer.device)
        labels = batch.labels.to(trainer.device, non_blocking=True)
        with trainer.precision.autocast():
            loss = model(images, labels)
        finite = bool(torch.isfinite(loss))
        window.all_finite &= finite
        if finite:
            trainer.scaler.scale(loss / config.grad_accum).backward()
            window.loss_sum += float(loss.detach())
            window.loss_count += 1
        window.images += labels.shape[0]
        micro += 1

        # optimizer step once every grad_accum micro-batches
        if micro % config.grad_accum == 0:
            optimizer_step(trainer, window.all_finite)
            window.all_finite = True
            after_step(trainer, window, metrics, report)
            if state.epoch_step >= trainer.epoch_steps or state.step >= trainer.total_steps:
                break
        wait_start = time.perf_counter()

    if seen == 0:
        raise TrainingError(
            f"the train stream of {trainer.dataset.root} produced no batch in epoch {state.epoch}; "
            "check that the shards are readable (see the warnings above)"
        )

    # the epoch is over when the stream ran out or reached its length
    if state.epoch_step >= trainer.epoch_steps or state.step < trainer.total_steps:
        state.epoch += 1
        state.epoch_step = 0
        if config.val_every == 0 and state.step < trainer.total_steps:
            validate(trainer, metrics, report)
            save(trainer, "last.pt")


def optimizer_step(trainer: Trainer, all_finite: bool) -> None:
    """Apply the accumulated gradients, or skip the step when a loss was not finite."""
    config, state = trainer.config, trainer.state
    if all_finite:
        if config.clip_grad > 0:
            trainer.scaler.unscale_(trainer.optimizer)
            torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), config.clip_grad)
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
        state.bad_steps_in_row = 0
    else:
        state.skipped_steps += 1
        state.bad_steps_in_row += 1
        logger.warning("non-finite loss at step %d; the step is skipped (%d in a row)", state.step, state.bad_steps_in_row)
        if state.bad_steps_in_row >= config.max_bad_steps:
            raise TrainingError(
                f"the loss was not finite for {state.bad_steps_in_row} steps in a row (step {state.step}); "
                "lower --lr, enable --clip-grad, or try --precision fp32. The last good checkpoint is "
                f"{trainer.checkpoint_dir / 'last.pt'}"
            )
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.scheduler.step()
    state.step += 1
    state.epoch_step += 1


@dataclass
class StepWindow:
    """Sums over the steps since the last log line."""

    started: float = field(default_factory=time.perf_counter)
    data_wait: float = 0.0
    loss_sum: float = 0.0
    loss_count: int = 0
    images: int = 0
    all_finite: bool = True

    def reset(self) -> None:
        self.__init__()


def after_step(trainer: Trainer, window: StepWindow, metrics, report: ProgressCallback) -> None:
    """Log, validate and save when their intervals come due."""
    config, state = trainer.config, trainer.state

    # log
    if state.step % config.log_every == 0 or state.step == trainer.total_steps:
        elapsed = max(time.perf_counter() - window.started, 1e-9)
        record = {
            "kind": "train",
            "step": state.step,
            "epoch": state.epoch,
            "loss": window.loss_sum / window.loss_count if window.loss_count else math.nan,
            "lr": trainer.optimizer.param_groups[0]["lr"],
            "images_per_s": window.images / elapsed,
            "data_wait": window.data_wait / elapsed,
            "memory_bytes": memory_in_use(trainer.device),
            "skipped_samples": state.skipped_samples,
            "skipped_steps": state.skipped_steps,
        }
        write_metrics(metrics, record)
        window.reset()
        report(record)
    else:
        report({"kind": "step", "step": state.step})

    # validate and save
    if config.val_every > 0 and state.step % config.val_every == 0:
        validate(trainer, metrics, report)
    if config.save_every > 0 and state.step % config.save_every == 0:
        save(trainer, "last.pt")


def validate(trainer: Trainer, metrics, report: ProgressCallback) -> None:
    """Measure top-1, top-5 and loss on the val split and keep best.pt by top-1."""
    config, state = trainer.config, trainer.state
    if trainer.dataset.split("val").samples == 0:
        logger.warning("the val split is empty; skipping validation")
        return
    loader = build_eval_loader(
        trainer.dataset, "val", batch_size=config.batch_size, workers=config.workers, image_size=config.image_size
    )
    trainer.model.eval()
    result = evaluate(trainer.model, loader, trainer.device, trainer.precision)
    trainer.model.train()

    record = {"kind": "val", "step": state.step, "epoch": state.epoch, **result}
    state.last_val = record
    write_metrics(metrics, record)
    report(record)
    if result["top1"] > state.best_top1:
        state.best_top1 = result["top1"]
        save(trainer, "best.pt")


def save(trainer: Trainer, name: str) -> None:
    state = trainer.state
    save_checkpoint(
        trainer.checkpoint_dir / name,
        {
            "model": trainer.model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "scaler": trainer.scaler.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "step": state.step,
            "epoch": state.epoch,
            "epoch_step": state.epoch_step,
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "classes": list(trainer.dataset.classes),
            "config": config_to_dict(trainer.config),
            "best_top1": state.best_top1,
            "counters": {"skipped_samples": state.skipped_samples, "skipped_steps": state.skipped_steps},
            "last_val": dict(state.last_val),
        },
    )


def restore(checkpoint: dict[str, Any], model, optimizer, scheduler, scaler) -> RunState:
    """Load model, optimizer, scheduler, scaler and RNG state from a checkpoint."""
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint["scaler"]:
        scaler.load_state_dict(checkpoint["scaler"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if checkpoint["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])
    counters = checkpoint["counters"]
    return RunState(
        step=checkpoint["step"],
        epoch=checkpoint["epoch"],
        epoch_step=checkpoint["epoch_step"],
        best_top1=checkpoint["best_top1"],
        skipped_samples=counters["skipped_samples"],
        skipped_steps=counters["skipped_steps"],
        last_val=dict(checkpoint.get("last_val", {})),
    )


def write_metrics(metrics, record: dict[str, Any]) -> None:
    metrics.write(json.dumps(record) + "\n")
    metrics.flush()


def memory_in_use(device: torch.device) -> int:
    """Return peak CUDA memory allocated, or the process's peak resident size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024



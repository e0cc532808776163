"""The training loop: stream batches, step the optimizer, validate, log and checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.config import TrainConfig, to_toml
from toolkit.data import build_eval_loader, build_train_loader, normalize_batch, steps_per_epoch
from toolkit.dataset import Dataset, load_dataset
from toolkit.eval.inference import evaluate
from toolkit.model import build_model
from toolkit.model.sharded_head import ShardedClassHead
from toolkit.plan import PlanError, plan_training
from toolkit.train import distributed
from toolkit.train.checkpoint import config_to_dict, load_checkpoint, save_checkpoint
from toolkit.train.distributed import DistContext
from toolkit.train.head_optim import RowOptimizer, check_head_update, uses_row_optimizer
from toolkit.train.optim import build_optimizer, build_scheduler
from toolkit.train.precision import Precision, resolve_device, resolve_precision

logger = logging.getLogger(__name__)

# Settings that may change when a run is resumed; every other setting must match the checkpoint.
RESUMABLE_CHANGES = frozenset({"workers", "device", "log_every", "save_every", "val_every", "resume", "epochs", "steps"})

ProgressCallback = Callable[[dict[str, Any]], None]


class TrainingError(RuntimeError):
    """A run that cannot start or cannot continue; the message gives the reason and the fix."""


@dataclass
class RunState:
    """The run's position and counters: what a checkpoint stores besides the model and optimizer."""

    step: int = 0
    epoch: int = 0
    epoch_step: int = 0
    best_top1: float = -1.0
    skipped_samples: int = 0  # this rank's corrupt samples; on rank 0 plus the total over ranks before the last resume
    skipped_steps: int = 0
    bad_steps_in_row: int = 0
    repeated_samples: int = 0  # this rank's samples repeated to fill batches, counted like skipped_samples
    left_out_samples: int = 0  # train samples no rank read in the epochs started so far
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
    dist: DistContext | None = None  # None in one process
    head: ShardedClassHead | None = None  # the class matrix (this rank's rows) when split or updated by rows
    head_optimizer: RowOptimizer | None = None  # updates the class matrix with class sampling or the fused update

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    @property
    def rank(self) -> int:
        return self.dist.rank if self.dist is not None else 0

    @property
    def world_size(self) -> int:
        return self.dist.world_size if self.dist is not None else 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def train(
    dataset_dir: str | Path,
    run_dir: Path,
    config: TrainConfig,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Train on DATASET into RUN and return the final state and last validation.

    DATASET is a directory or a URL root that `toolkit.dataset.load_dataset` accepts.

    Under torchrun every process calls this; they share the work (`toolkit.train.distributed`),
    and only rank 0 writes files and calls `progress`.
    """
    ctx = distributed.setup_distributed(config.device)
    try:
        trainer = prepare(dataset_dir, run_dir, config, ctx)
        return run_training(trainer, progress if trainer.is_main else None)
    finally:
        distributed.teardown_distributed(ctx)


def run_training(trainer: Trainer, progress: ProgressCallback | None) -> dict[str, Any]:
    """Run a prepared trainer to its last step, validate and save."""
    report = progress or (lambda event: None)
    report({"kind": "start", "total_steps": trainer.total_steps, "step": trainer.state.step, "device": str(trainer.device), "precision": trainer.precision.name})

    # only rank 0 writes metrics; the other ranks compute the same records
    metrics_path = trainer.run_dir / "metrics.jsonl" if trainer.is_main else os.devnull
    with open(metrics_path, "a") as metrics:
        while trainer.state.step < trainer.total_steps:
            run_epoch(trainer, metrics, report)

        # validate once more unless the last step already did
        if trainer.state.last_val.get("step") != trainer.state.step:
            validate(trainer, metrics, report)
        save(trainer, "last.pt")

    report({"kind": "end", "step": trainer.state.step})
    return {"step": trainer.state.step, "epoch": trainer.state.epoch, "best_top1": trainer.state.best_top1, **trainer.state.last_val}


def prepare(dataset_dir: str | Path, run_dir: Path, config: TrainConfig, ctx: DistContext | None = None) -> Trainer:
    """Load the dataset, build model and optimizer, and restore the last checkpoint on resume.

    ctx: this process's place among the ranks that torchrun started, or None for one process.
    """
    main = ctx is None or ctx.is_main
    world_size = ctx.world_size if ctx is not None else 1

    # dataset and run directory
    dataset = load_dataset(dataset_dir)
    last = run_dir / "checkpoints" / "last.pt"
    checkpoint = None
    if config.resume:
        # every rank reads the checkpoint; memory-mapped, each reads only its rows of the class matrix
        checkpoint = load_checkpoint(last, mmap=ctx is not None)
        if config.auto_batch:
            # the run goes on with the batch that --auto-batch picked when it started
            config = dataclasses.replace(config, batch_size=checkpoint["config"]["batch_size"])
        check_resume_settings(checkpoint["config"], config, last)
        if list(checkpoint["classes"]) != list(dataset.classes):
            raise TrainingError(f"the class list in {last} differs from {dataset_dir}; resume with the dataset the run started on")
    elif last.exists():
        raise TrainingError(f"{run_dir} already contains a run; pass --resume to continue it or choose a new RUN directory")
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.toml").write_text(to_toml(config, "train"))

    # device, precision, model, optimizer
    device = ctx.device if ctx is not None else resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    check_head_update(config, precision)

    def build() -> torch.nn.Module:
        torch.manual_seed(config.seed)
        return build_model(config, dataset.num_classes)

    # every rank builds the same model and keeps its rows of the class matrix
    model, head = distributed.build_model_shard(build, config, ctx)

    # memory plan: warn when the run may not fit the device; --auto-batch picks the largest batch
    # that fits, at most the train split, and config.toml records it
    try:
        max_batch = max(1, dataset.split("train").samples // (config.grad_accum * world_size))
        planned = plan_training(config, dataset.num_classes, device, max_batch=max_batch, world_size=world_size)
    except PlanError as error:
        raise TrainingError(str(error)) from None
    if ctx is not None and config.auto_batch:
        # ranks measure free memory at different moments, so every rank takes rank 0's batch
        chosen = torch.tensor([planned.batch_size], device=device)
        torch.distributed.broadcast(chosen, src=0)
        planned = dataclasses.replace(planned, batch_size=int(chosen))
    if planned.batch_size != config.batch_size:
        config = planned
        if main:
            (run_dir / "config.toml").write_text(to_toml(config, "train"))

    # backbone and neck replicated over ranks, the class matrix split or updated by rows
    model = distributed.wrap_model(model, head, ctx, device)
    optimizer = build_optimizer(model, config)
    head_optimizer = RowOptimizer(head.weight, config) if head is not None and uses_row_optimizer(config) else None
    if head_optimizer is not None and config.fused_head_update:
        head.row_update = head_optimizer.update
    scaler = torch.amp.GradScaler(device.type, enabled=precision.uses_scaler)

    # run length: optimizer steps, each of grad_accum micro-batches on every rank
    epoch_steps = steps_per_epoch(dataset, config, world_size) // config.grad_accum
    if epoch_steps == 0:
        raise TrainingError(
            f"the train split of {dataset_dir} has {dataset.split('train').samples} samples, fewer than one step of "
            f"{config.batch_size * config.grad_accum} x {world_size} process(es); lower --batch-size or --grad-accum"
        )
    total_steps = config.steps if config.steps > 0 else config.epochs * epoch_steps
    scheduler = build_scheduler(optimizer, config, total_steps)

    trainer = Trainer(
        config, dataset, run_dir, device, precision, model, optimizer, scheduler, scaler, total_steps, epoch_steps,
        RunState(), dist=ctx, head=head, head_optimizer=head_optimizer,
    )
    if checkpoint is not None:
        trainer.state = restore(trainer, checkpoint)
        logger.info("resumed %s at step %d (epoch %d)", last, trainer.state.step, trainer.state.epoch)

    logger.info(
        "training %s on %d classes, %d train samples: %d steps of batch %d x %d process(es) on %s (%s)",
        config.arch, dataset.num_classes, dataset.split("train").samples, total_steps,
        config.batch_size * config.grad_accum, world_size, device, precision.name,
    )
    return trainer


def check_resume_settings(stored: dict[str, Any], config: TrainConfig, source: Path) -> None:
    """Raise TrainingError when a setting that shapes the run differs from the checkpoint's."""
    current = config_to_dict(config)
    # a setting added after the checkpoint was written had its default value then
    stored = {**config_to_dict(TrainConfig()), **stored}
    changed = sorted(key for key in current if key not in RESUMABLE_CHANGES and stored.get(key) != current[key])
    if changed:
        details = ", ".join(f"{key}: {stored.get(key)!r} -> {current[key]!r}" for key in changed)
        raise TrainingError(f"settings differ from the run in {source} ({details}); resume with the same settings")


def run_epoch(trainer: Trainer, metrics, report: ProgressCallback) -> None:
    """Run the rest of the current epoch (or of the run), validating and saving on schedule."""
    config, state, model = trainer.config, trainer.state, trainer.model
    model.train()
    loader = build_train_loader(trainer.dataset, config, state.epoch, trainer.rank, trainer.world_size)
    if state.epoch_step == 0:
        state.left_out_samples += loader.left_out
    repeated_before = state.repeated_samples

    # on resume, skip the micro-batches this epoch already consumed; the stream is deterministic per epoch
    skip = state.epoch_step * config.grad_accum
    window = StepWindow()
    micro = 0
    seen = 0
    wait_start = time.perf_counter()
    for batch in loader:
        seen += 1
        state.skipped_samples += batch.skipped
        state.repeated_samples = repeated_before + loader.repeated
        if skip > 0:
            skip -= 1
            continue
        window.data_wait += time.perf_counter() - wait_start

        # forward and backward of one micro-batch; across ranks, gradients are summed on the last one
        images = normalize_batch(batch.images, trainer.device)
        labels = batch.labels.to(trainer.device, non_blocking=True)
        prepare_head(trainer, micro)
        last_micro = (micro + 1) % config.grad_accum == 0
        with contextlib.nullcontext() if last_micro else distributed.no_sync(model):
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


def prepare_head(trainer: Trainer, micro: int) -> None:
    """Give the class matrix's own optimizer this step's learning rate and seed the class sampling.

    Neither exists in one process without class sampling or the fused head update. The fused
    update happens in the backward pass that follows, so the rate is set before it.
    """
    if trainer.head_optimizer is not None:
        trainer.head_optimizer.lr = trainer.optimizer.param_groups[0]["lr"]
    if trainer.head is not None and trainer.config.class_sample_rate < 1.0:
        # a seed of (run seed, step, micro-batch, rank) samples the same classes after a resume
        entropy = [trainer.config.seed % 2**63, trainer.state.step, micro, trainer.rank]
        seed = int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0] % 2**63)
        trainer.head.seed_sampling(seed)


def optimizer_step(trainer: Trainer, all_finite: bool) -> None:
    """Apply the accumulated gradients, or skip the step when a loss was not finite."""
    config, state = trainer.config, trainer.state
    sampled = sampled_gradients(trainer)
    if all_finite:
        if trainer.dist is not None and trainer.scaler.is_enabled():
            distributed.agree_on_overflow(class_gradients(trainer, sampled), trainer.dist)
        if config.clip_grad > 0:
            trainer.scaler.unscale_(trainer.optimizer)
            clip_gradients(trainer, sampled)
        trainer.scaler.step(trainer.optimizer)
        if trainer.head_optimizer is not None:
            trainer.head_optimizer.step(sampled)
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


def sampled_gradients(trainer: Trainer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Take the (rows, gradient) pairs of the step's sampled loss calls; empty without class sampling."""
    if trainer.head is None:
        return []
    return [(part.rows, part.weight_rows.grad) for part in trainer.head.take_sampled() if part.weight_rows.grad is not None]


def class_gradients(trainer: Trainer, sampled: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Return this rank's gradients of class rows: the sampled rows', or the shard's gradient."""
    if sampled:
        return [grad for _, grad in sampled]
    if trainer.head is not None and trainer.head.weight.grad is not None:
        return [trainer.head.weight.grad]
    return []


def clip_gradients(trainer: Trainer, sampled: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Clip by the norm of all gradients, the class rows of every rank included."""
    if trainer.head is None:
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.config.clip_grad)
        return
    weight = trainer.head.weight
    replicated = [p.grad for p in trainer.model.parameters() if p is not weight and p.grad is not None]
    distributed.clip_grad_norm(replicated, class_gradients(trainer, sampled), trainer.config.clip_grad, trainer.dist)


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

    # log; every rank computes the record, because the counters are summed over ranks
    if state.step % config.log_every == 0 or state.step == trainer.total_steps:
        elapsed = max(time.perf_counter() - window.started, 1e-9)
        skipped, repeated = distributed.reduce_counts([state.skipped_samples, state.repeated_samples], trainer.dist)
        record = {
            "kind": "train",
            "step": state.step,
            "epoch": state.epoch,
            "loss": window.loss_sum / window.loss_count if window.loss_count else math.nan,
            "lr": trainer.optimizer.param_groups[0]["lr"],
            "images_per_s": window.images * trainer.world_size / elapsed,
            "data_wait": window.data_wait / elapsed,
            "memory_bytes": memory_in_use(trainer.device),
            "skipped_samples": skipped,
            "skipped_steps": state.skipped_steps,
            "repeated_samples": repeated,
            "left_out_samples": state.left_out_samples,
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
        trainer.dataset, "val", batch_size=config.batch_size, workers=config.workers, image_size=config.image_size,
        rank=trainer.rank, world_size=trainer.world_size,
    )
    trainer.model.eval()
    if trainer.dist is not None:
        # each rank scores its part of the split; the counts are summed over ranks
        distributed.broadcast_buffers(trainer.model, trainer.dist)
        result = distributed.evaluate_sharded(trainer.model, loader, trainer.device, trainer.precision, trainer.dist)
    else:
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
    """Write a checkpoint with the full class matrix; every rank takes part, rank 0 writes."""
    state, ctx = trainer.state, trainer.dist
    model_state = distributed.full_model_state(trainer.model, ctx)
    optimizer_state, head_state = distributed.full_optimizer_states(
        trainer.optimizer, class_matrix(trainer), trainer.dataset.num_classes, trainer.head_optimizer, ctx
    )
    skipped, repeated = distributed.reduce_counts([state.skipped_samples, state.repeated_samples], ctx)
    if not trainer.is_main:
        return
    save_checkpoint(
        trainer.checkpoint_dir / name,
        {
            "model": model_state,
            "optimizer": optimizer_state,
            "head_optimizer": head_state,
            "scaler": trainer.scaler.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "step": state.step,
            "epoch": state.epoch,
            "epoch_step": state.epoch_step,
            "world_size": trainer.world_size,
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
            "classes": list(trainer.dataset.classes),
            "config": config_to_dict(trainer.config),
            "best_top1": state.best_top1,
            "counters": {
                "skipped_samples": skipped,
                "skipped_steps": state.skipped_steps,
                "repeated_samples": repeated,
                "left_out_samples": state.left_out_samples,
            },
            "last_val": dict(state.last_val),
        },
    )


def restore(trainer: Trainer, checkpoint: dict[str, Any]) -> RunState:
    """Load model, optimizer, scheduler, scaler and RNG state from a checkpoint of any world size."""
    ctx = trainer.dist
    distributed.load_model_state(trainer.model, checkpoint["model"], ctx)
    distributed.load_optimizer_states(
        trainer.optimizer, class_matrix(trainer), trainer.dataset.num_classes, trainer.head_optimizer,
        checkpoint["optimizer"], checkpoint.get("head_optimizer"), ctx,
    )
    trainer.scheduler.load_state_dict(checkpoint["scheduler"])
    if checkpoint["scaler"]:
        trainer.scaler.load_state_dict(checkpoint["scaler"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if checkpoint["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(checkpoint["rng"]["cuda"])

    saved_world_size = checkpoint.get("world_size", 1)
    if saved_world_size != trainer.world_size and trainer.is_main:
        logger.warning(
            "the checkpoint was written by %d process(es) and the run resumes with %d: the global batch changes "
            "from %d to %d, and the rest of epoch %d is read in another order, so some of its samples may be read "
            "twice or not at all",
            saved_world_size, trainer.world_size, saved_world_size * trainer.config.batch_size,
            trainer.world_size * trainer.config.batch_size, checkpoint["epoch"],
        )

    # rank 0 carries the totals over ranks so far; each rank adds its own counts from here
    counters = checkpoint["counters"]
    carried = trainer.is_main
    return RunState(
        step=checkpoint["step"],
        epoch=checkpoint["epoch"],
        epoch_step=checkpoint["epoch_step"],
        best_top1=checkpoint["best_top1"],
        skipped_samples=counters["skipped_samples"] if carried else 0,
        skipped_steps=counters["skipped_steps"],
        repeated_samples=counters.get("repeated_samples", 0) if carried else 0,
        left_out_samples=counters.get("left_out_samples", 0),
        last_val=dict(checkpoint.get("last_val", {})),
    )


def class_matrix(trainer: Trainer) -> torch.nn.Parameter:
    """Return the class matrix parameter this process holds: its rows, or the whole matrix."""
    if trainer.head is not None:
        return trainer.head.weight
    return trainer.model.head.weight


def write_metrics(metrics, record: dict[str, Any]) -> None:
    metrics.write(json.dumps(record) + "\n")
    metrics.flush()


def memory_in_use(device: torch.device) -> int:
    """Return peak CUDA memory allocated, or the process's peak resident size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024



"""`toolkit eval`: score a checkpoint on one split of a dataset and build the report."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from toolkit.config import EvalConfig
from toolkit.data import Batch, build_eval_loader
from toolkit.data.batch import SkippedSample
from toolkit.dataset import Dataset, load_dataset
from toolkit.eval.classes import ClassMapping, match_classes
from toolkit.eval.inference import score_batches
from toolkit.eval.metrics import EvalCounts
from toolkit.eval.report import EvalReport, class_range_rows, extreme_classes, shard_rows
from toolkit.train.checkpoint import load_checkpoint, model_from_checkpoint
from toolkit.train.distributed import reduce_eval_counts, setup_distributed, teardown_distributed
from toolkit.train.precision import Precision, resolve_device, resolve_precision

logger = logging.getLogger(__name__)

# Called after each batch with the samples read so far (evaluated and skipped) and the samples listed.
ProgressCallback = Callable[[int, int], None]


class EvalError(ValueError):
    """A dataset or settings problem that stops `toolkit eval`; the message names it and the fix."""


def run_eval(
    checkpoint_path: str | Path,
    dataset_path: str | Path,
    config: EvalConfig,
    progress: ProgressCallback | None = None,
) -> EvalReport:
    """Evaluate a checkpoint on `config.split` of a dataset and return the report.

    Raises CheckpointError, DatasetError, ClassListMismatch or EvalError before any image is
    read when a file is missing or invalid, the class lists differ or the split is empty.
    """
    checkpoint_path = Path(checkpoint_path)
    _check_settings(config)

    # checkpoint, dataset and class lists, compared before the model is built
    checkpoint = load_checkpoint(checkpoint_path)
    dataset = load_dataset(dataset_path)
    mapping = match_classes(checkpoint["classes"], dataset.classes)
    split = dataset.split(config.split)
    if split.samples == 0:
        raise EvalError(f"the {config.split!r} split of {dataset.root} has no samples; choose another --split")
    model, classes, train_config = model_from_checkpoint(checkpoint, checkpoint_path)

    # device and precision; under torchrun each process scores its part of the split
    ctx = setup_distributed(config.device)
    device = ctx.device if ctx is not None else resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    image_size = config.image_size or train_config.image_size
    model.to(device)
    logger.info(
        "evaluating %s on %d %s samples of %s (%s, %s, %d px)",
        checkpoint_path, split.samples, config.split, dataset.root, device, precision.name, image_size,
    )

    # score every batch
    loader = build_eval_loader(
        dataset, config.split, batch_size=config.batch_size, workers=config.workers, image_size=image_size,
        rank=ctx.rank if ctx is not None else 0, world_size=ctx.world_size if ctx is not None else 1,
    )
    counts = evaluate_split(model, loader, dataset, config.split, mapping, device, precision, progress)
    if ctx is not None:
        counts = reduce_eval_counts(counts, ctx)
        teardown_distributed(ctx)

    # tables
    settings = {
        **dataclasses.asdict(config),
        "report": str(config.report) if config.report else None,
        "device": str(device),
        "precision": precision.name,
        "image_size": image_size,
        "arch": train_config.arch,
        "head": train_config.head,
    }
    return build_report(counts, checkpoint_path, dataset, config, mapping, classes, settings)


def evaluate_split(
    model: torch.nn.Module,
    loader: Iterable[Batch],
    dataset: Dataset,
    split: str,
    mapping: ClassMapping,
    device: torch.device,
    precision: Precision,
    progress: ProgressCallback | None = None,
) -> EvalCounts:
    """Score every batch of `loader` and count hits overall, per shard and per class (checkpoint order)."""
    shard_names = _shard_name_lookup(dataset, split)
    counts = EvalCounts(num_classes=model.num_classes)
    batches = _prepare_batches(loader, dataset, split, mapping, shard_names, counts, progress)
    model.eval()
    for scored in score_batches(model, batches, device, precision):
        counts.add(scored, [shard_names.get(shard, shard) for shard in scored.batch.shards])

    if counts.loss is not None and not math.isfinite(counts.loss):
        logger.warning("the mean loss is %s; the report stores it as null", counts.loss)
    return counts


def build_report(
    counts: EvalCounts,
    checkpoint_path: Path,
    dataset: Dataset,
    config: EvalConfig,
    mapping: ClassMapping,
    classes: list[str],
    settings: dict,
) -> EvalReport:
    """Turn the counts into the per-shard, per-class-range and worst/best tables."""
    split = dataset.split(config.split)
    worst, best = extreme_classes(counts, classes, config.top_classes)
    report = EvalReport(
        checkpoint=str(checkpoint_path),
        dataset=str(dataset.root),
        split=config.split,
        class_order="remapped" if mapping.reordered else "same",
        classes=classes,
        samples_listed=split.samples,
        counts=counts,
        shards=shard_rows(counts, split.shards, config.sort_shards),
        class_ranges=class_range_rows(counts, config.class_block),
        worst_classes=worst,
        best_classes=best,
        settings=settings,
    )
    _log_exclusions(report)
    return report


def _prepare_batches(
    loader: Iterable[Batch],
    dataset: Dataset,
    split: str,
    mapping: ClassMapping,
    shard_names: dict[str, str],
    counts: EvalCounts,
    progress: ProgressCallback | None,
) -> Iterator[Batch]:
    """Record each batch's skipped samples and remap its labels to the checkpoint's order.

    The loader has already skipped samples whose label is outside the dataset's class list.
    Skipped samples are recorded here rather than from the scored batches, because a batch whose
    samples were all skipped has no labels and is never scored.
    """
    listed = dataset.split(split).samples
    read = 0
    for batch in loader:
        for sample in _skipped_samples(batch):
            counts.skipped.append(dataclasses.replace(sample, shard=shard_names.get(sample.shard, sample.shard)))
        read += int(batch.labels.numel()) + int(batch.skipped)
        if progress is not None:
            progress(read, listed)
        if batch.labels.numel() == 0:
            continue
        yield dataclasses.replace(batch, labels=mapping.apply(batch.labels))


def _skipped_samples(batch: Batch) -> list[SkippedSample]:
    """Return the entries for the samples the loader skipped before this batch, checked against its count."""
    named = batch.skipped_samples
    if sum(sample.count for sample in named) != batch.skipped:
        # The report's "excluded" count (listed minus evaluated samples) still covers them.
        logger.warning("the loader skipped %d samples but named %d", batch.skipped, sum(s.count for s in named))
    return named


def _shard_name_lookup(dataset: Dataset, split: str) -> dict[str, str]:
    """Map each shard URL the loader may report to the shard's name in the manifest."""
    lookup = {}
    for url, shard in zip(dataset.shard_urls(split), dataset.split(split).shards):
        lookup[url] = shard.name
        lookup[shard.name] = shard.name
    return lookup


def _log_exclusions(report: EvalReport) -> None:
    if report.excluded == 0:
        return
    logger.warning(
        "%d of %d listed samples were excluded from the metrics (%d skipped as unreadable and named in the report)",
        report.excluded, report.samples_listed, report.counts.skipped_count,
    )


def _check_settings(config: EvalConfig) -> None:
    for name in ("batch_size", "class_block"):
        if getattr(config, name) < 1:
            raise EvalError(f"invalid {name} {getattr(config, name)}; expected a positive integer")
    for name in ("workers", "image_size", "top_classes"):
        if getattr(config, name) < 0:
            raise EvalError(f"invalid {name} {getattr(config, name)}; expected 0 or more")

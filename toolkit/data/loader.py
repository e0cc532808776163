"""Train and eval loaders: one epoch of one rank's Batches, from DataLoader workers.

Epoch length for training comes from the manifest: steps_per_epoch = train samples //
(batch_size * world_size), as with drop_last=True. The samples after the first steps *
batch_size * world_size of the epoch's shard order are left out (`EpochLoader.left_out`, fewer
than batch_size * world_size), and since the order changes per epoch, so do the samples left out.

Every rank yields exactly `steps` full batches, so ranks stay in step even when corrupt samples
are skipped. A worker that skipped samples ends with a partial batch, and the loader joins such
partial batches into full ones. If the epoch is then short, the loader fills the missing batches
by repeating samples of the epoch's last batch (`EpochLoader.repeated`, logged as a warning).
The eval loader yields every sample of its rank once, and its last batch can be partial.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from toolkit.config import ConfigError, TrainConfig
from toolkit.data.batch import Batch, SkippedSample, concat_batches
from toolkit.data.sharding import ShardFile, epoch_shard_order, eval_span, split_evenly
from toolkit.data.stream import ShardStream, StreamSpec
from toolkit.dataset import Dataset, DatasetError
from toolkit.sources import is_url

logger = logging.getLogger(__name__)

# Batches each worker decodes ahead of the consumer (DataLoader's prefetch_factor).
PREFETCH_BATCHES = 2


# ---------------------------------------------------------------------------------------------
# public entry points


def steps_per_epoch(dataset: Dataset, config: TrainConfig, world_size: int = 1) -> int:
    """Return the batches each rank yields per epoch: train samples // (batch_size * world_size)."""
    check_settings(config.batch_size, config.workers, config.image_size, config.shuffle_buffer)
    check_rank(0, world_size)
    return dataset.split("train").samples // (config.batch_size * world_size)


def build_train_loader(
    dataset: Dataset, config: TrainConfig, epoch: int, rank: int = 0, world_size: int = 1
) -> EpochLoader:
    """Return the loader of one training epoch for one rank; it yields steps_per_epoch full Batches.

    Uses config.image_size, batch_size, workers, shuffle_buffer (raw samples per worker) and
    seed. The shard order, the shuffle and the crops depend only on (seed, epoch, rank,
    workers), so the same arguments give the same batches.
    """
    check_settings(config.batch_size, config.workers, config.image_size, config.shuffle_buffer)
    check_rank(rank, world_size)
    split = dataset.split("train")
    steps = steps_per_epoch(dataset, config, world_size)
    if steps == 0:
        raise ConfigError(
            f"the train split of {dataset.root} has {split.samples} samples, fewer than one step of "
            f"batch_size {config.batch_size} x {world_size} rank(s); lower batch_size"
        )

    if not 0.0 < config.crop_scale_min <= 1.0:
        raise ConfigError(f"invalid crop_scale_min {config.crop_scale_min}; expected a number in (0, 1]")

    shards = epoch_shard_order(shard_files(dataset, "train"), config.seed, epoch)
    spec = StreamSpec(
        shards=tuple(shards),
        batch_size=config.batch_size,
        image_size=config.image_size,
        num_classes=dataset.num_classes,
        rank=rank,
        world_size=world_size,
        train=True,
        steps=steps,
        shuffle_buffer=config.shuffle_buffer,
        seed=config.seed,
        epoch=epoch,
        crop_scale=(config.crop_scale_min, 1.0),
        flip=config.hflip,
    )
    left_out = split.samples - steps * config.batch_size * world_size
    if rank == 0:
        logger.info(
            "epoch %d: %d steps of %d samples x %d rank(s); %d of %d train samples left out",
            epoch,
            steps,
            config.batch_size,
            world_size,
            left_out,
            split.samples,
        )
    return EpochLoader(
        ShardStream(spec), config.workers, batches=steps, samples=steps * config.batch_size, left_out=left_out
    )


def build_eval_loader(
    dataset: Dataset,
    split: str,
    *,
    batch_size: int,
    workers: int,
    image_size: int,
    rank: int = 0,
    world_size: int = 1,
) -> EpochLoader:
    """Return a loader over one split that yields every sample of this rank's part once, in order
    within each worker, with the evaluation resize and centre crop."""
    check_settings(batch_size, workers, image_size)
    check_rank(rank, world_size)
    total = dataset.split(split).samples
    spec = StreamSpec(
        shards=shard_files(dataset, split),
        batch_size=batch_size,
        image_size=image_size,
        num_classes=dataset.num_classes,
        rank=rank,
        world_size=world_size,
        train=False,
    )
    samples = split_evenly(total, world_size)[rank]
    worker_count = max(workers, 1)
    batches = 0
    for worker in range(worker_count):
        begin, end = eval_span(total, batch_size, rank, world_size, worker, worker_count)
        batches += -(-(end - begin) // batch_size)
    return EpochLoader(ShardStream(spec), workers, batches=batches, samples=samples, left_out=0)


# ---------------------------------------------------------------------------------------------
# checks


def check_settings(batch_size: int, workers: int, image_size: int, shuffle_buffer: int = 0) -> None:
    """Raise ConfigError naming the first input setting out of range."""
    for name, value, minimum in (
        ("batch_size", batch_size, 1),
        ("workers", workers, 0),
        ("image_size", image_size, 1),
        ("shuffle_buffer", shuffle_buffer, 0),
    ):
        if value < minimum:
            raise ConfigError(f"invalid {name} {value}; it must be at least {minimum}")


def check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world_size {world_size}; expected 0 <= rank < world_size")


def shard_files(dataset: Dataset, split: str) -> tuple[ShardFile, ...]:
    """Return the split's shards, raising DatasetError that names any local shard file not found.

    Shards under a URL or pipe: root are not checked here: one that cannot be read is skipped
    and counted when the stream reaches it, with the URL or command and the error in the reason.
    """
    shards = dataset.split(split).shards
    paths = dataset.shard_urls(split)
    if is_url(dataset.root):
        return tuple(ShardFile(shard.name, path, shard.samples) for shard, path in zip(shards, paths))
    missing = [shard.name for shard, path in zip(shards, paths) if not Path(path).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise DatasetError(
            f"{len(missing)} shard file(s) of split {split!r} not found under {dataset.root}: {shown}; "
            "restore them or pack the dataset again"
        )
    return tuple(ShardFile(shard.name, path, shard.samples) for shard, path in zip(shards, paths))


# ---------------------------------------------------------------------------------------------
# the epoch iterable


@dataclass
class EpochCounts:
    skipped: int = 0  # corrupt samples skipped in this epoch
    repeated: int = 0  # samples repeated to fill batches that skipped samples cost
    unreported: int = 0  # skipped samples not yet attached to a yielded batch
    unreported_samples: list[SkippedSample] = field(default_factory=list)  # the named entries behind `unreported`


class EpochLoader:
    """One epoch of Batches for one rank.

    `len()` is the number of batches: exact for training; for evaluation an upper bound that
    is reached unless a whole batch of samples is corrupt. After iteration, `skipped` and
    `repeated` hold the epoch's counts. Each iteration starts fresh workers and yields the
    same epoch again.
    """

    def __init__(self, stream: ShardStream, workers: int, batches: int, samples: int, left_out: int) -> None:
        self.stream = stream
        self.workers = workers
        self.batches = batches
        self.samples = samples  # samples this rank plans to yield, repeats excluded
        self.left_out = left_out  # train samples no rank reads this epoch
        self.counts = EpochCounts()

    @property
    def skipped(self) -> int:
        return self.counts.skipped

    @property
    def repeated(self) -> int:
        return self.counts.repeated

    def __len__(self) -> int:
        return self.batches

    def __iter__(self) -> Iterator[Batch]:
        self.counts = EpochCounts()
        loader = DataLoader(
            self.stream,
            batch_size=None,  # workers yield collated Batches
            num_workers=self.workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
            prefetch_factor=PREFETCH_BATCHES if self.workers > 0 else None,
        )
        batches = receive(loader, self.counts)
        if self.stream.spec.train:
            batches = whole_batches(batches, self.batches, self.stream.spec, self.counts)
        else:
            batches = (batch for batch in batches if len(batch) > 0)
        return attach_skipped(batches, self.counts)


def receive(batches: Iterable[Batch], counts: EpochCounts) -> Iterator[Batch]:
    """Move each incoming batch's skipped count into `counts`."""
    for batch in batches:
        counts.skipped += batch.skipped
        counts.unreported += batch.skipped
        counts.unreported_samples.extend(batch.skipped_samples)
        batch.skipped = 0
        batch.skipped_samples = []
        yield batch


def whole_batches(batches: Iterable[Batch], steps: int, spec: StreamSpec, counts: EpochCounts) -> Iterator[Batch]:
    """Yield exactly `steps` full batches from worker batches, some of them partial."""
    batch_size = spec.batch_size
    parts: list[Batch] = []
    last: Batch | None = None
    emitted = 0

    # pass full batches through and join the partial ones that workers send after skips
    for batch in batches:
        if len(batch) < batch_size:
            parts.append(batch)
            if sum(len(part) for part in parts) < batch_size:
                continue
            joined = concat_batches(parts)
            batch = joined.select(range(batch_size))
            parts = [joined.select(range(batch_size, len(joined)))]
        yield batch
        emitted += 1
        last = batch

    # fill the batches that skipped samples cost, so that every rank takes `steps` steps
    missing = steps - emitted
    if missing > 0:
        leftover = concat_batches(parts) if parts else None
        yield from repeat_fill(leftover, last, missing, spec, counts)


def repeat_fill(
    leftover: Batch | None, last: Batch | None, missing: int, spec: StreamSpec, counts: EpochCounts
) -> Iterator[Batch]:
    """Yield `missing` batches: the leftover samples first, then repeats of the last full batch."""
    pool_parts = [batch for batch in (leftover, last) if batch is not None and len(batch) > 0]
    if not pool_parts:
        raise DatasetError(
            f"rank {spec.rank} decoded no train sample this epoch: all {counts.skipped} planned samples "
            "were corrupt or missing; see the warnings above and repack the dataset"
        )
    pool = concat_batches(pool_parts)
    fresh = len(leftover) if leftover is not None else 0

    # fresh samples once, then cycle through the pool starting after them
    indices = itertools.chain(range(fresh), ((fresh + k) % len(pool) for k in itertools.count()))
    total = missing * spec.batch_size
    order = list(itertools.islice(indices, total))
    counts.repeated += total - fresh
    logger.warning(
        "rank %d: %d skipped sample(s) left the epoch %d batch(es) short; repeated %d sample(s) "
        "so that every rank takes the same number of steps",
        spec.rank,
        counts.skipped,
        missing,
        total - fresh,
    )
    for start in range(0, total, spec.batch_size):
        yield pool.select(order[start : start + spec.batch_size])


def attach_skipped(batches: Iterable[Batch], counts: EpochCounts) -> Iterator[Batch]:
    """Set each batch's skipped to the count received since the previous batch.

    Holds one batch back so that the last batch also carries counts that arrive after it.
    """
    held: Batch | None = None
    for batch in batches:
        if held is not None:
            held.skipped, counts.unreported = counts.unreported, 0
            held.skipped_samples, counts.unreported_samples = counts.unreported_samples, []
            yield held
        held = batch
    if held is not None:
        held.skipped, counts.unreported = counts.unreported, 0
        held.skipped_samples, counts.unreported_samples = counts.unreported_samples, []
        yield held
    elif counts.skipped:
        logger.warning("the loader yielded no batch; %d corrupt sample(s) were skipped", counts.skipped)

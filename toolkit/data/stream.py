"""The per-worker stream: read shard ranges, shuffle raw bytes, decode, augment, batch.

Each DataLoader worker (or the main process when there are no workers) runs one
webdataset.DataPipeline of small stages:

    shard ranges -> read_ranges -> shuffle (training only) -> decode_samples -> batch_samples

The shuffle buffer contains raw samples (the undecoded bytes of `.jpg` and `.cls`), never decoded
images, so a buffer of thousands of samples costs tens of megabytes.

Only `.jpg` and `.cls` members are read. Any other member, `.json` and `.pyd` or `.pth` pickles
included, is streamed past without being read, so nothing in a shard is ever unpickled.

Corrupt data is skipped and counted, never raised: a sample with a missing or duplicate
`.jpg`/`.cls` member, an invalid label, or JPEG bytes that fail to decode is dropped, and a
shard that ends early or cannot be read loses the rest of its planned samples. Each case is
logged as a warning with its shard and key, and the count travels in `Batch.skipped`.
Programming errors (TypeError and the like) are not caught.
"""

from __future__ import annotations

import logging
import random
import tarfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from toolkit.data.batch import Batch, SkippedSample
from toolkit.data.decode import CorruptSampleError, parse_label
from toolkit.data.sharding import ShardFile, ShardRange, eval_span, ranges_in_span, train_span
from toolkit.data.transforms import decode_eval_crop, decode_train_crop
from toolkit.sources import open_source

logger = logging.getLogger(__name__)

MEMBERS = ("jpg", "cls")

# Each worker logs this many skipped samples one by one, then only counts them.
MAX_SKIP_WARNINGS = 20

# A member larger than this is not read, and its sample is skipped. A JPEG at MAX_PIXELS
# (about 89 megapixels) is well below it at any ordinary quality setting.
MAX_MEMBER_BYTES = 256 * 2**20


@dataclass
class RawSample:
    """One sample's undecoded members, as read from its shard."""

    key: str
    shard: str
    members: dict[str, bytes] = field(default_factory=dict)
    problem: str | None = None


@dataclass
class DecodedSample:
    """One sample after decoding and augmentation."""

    image: torch.Tensor  # (3, S, S) uint8
    label: int
    key: str
    shard: str


class SkipCounter:
    """Counts and logs the samples one worker skips; `take` hands the count to the next batch.

    `take_samples` hands over the named entries behind that count, so eval can list them.
    """

    def __init__(self, where: str) -> None:
        self.where = where
        self.pending = 0
        self.pending_samples: list[SkippedSample] = []
        self.total = 0

    def skip(self, shard: str, key: str, reason: str, count: int = 1) -> None:
        before = self.total
        self.pending += count
        self.pending_samples.append(SkippedSample(shard=shard, key=key, reason=reason, count=count))
        self.total += count
        if before < MAX_SKIP_WARNINGS:
            logger.warning("skipped %d sample(s) at %s in shard %s: %s", count, key, shard, reason)
        if before < MAX_SKIP_WARNINGS <= self.total:
            logger.warning("%s: further skipped samples are counted without a warning each", self.where)

    def take(self) -> int:
        count, self.pending = self.pending, 0
        return count

    def take_samples(self) -> list[SkippedSample]:
        samples, self.pending_samples = self.pending_samples, []
        return samples


# ---------------------------------------------------------------------------------------------
# stages


def iter_shard_samples(task: ShardRange) -> Iterator[RawSample]:
    """Yield samples [start, stop) of one shard, reading only their `.jpg` and `.cls` members.

    Members are grouped into samples by key, the name up to the first dot of its last path
    component, as webdataset does. Reading stops at `stop`, so samples beyond the manifest's
    count are never read. The shard is a local path, an http(s) URL or a `pipe:` command
    (toolkit.sources). Raises tarfile.TarError or OSError on a damaged or unreadable shard.
    """
    index = -1
    key = None
    current: RawSample | None = None
    with open_source(task.path) as file, tarfile.open(fileobj=file, mode="r|") as tar:
        for info in tar:
            tar.members = []  # a streaming TarFile otherwise keeps every header it has read
            if not info.isreg():
                continue
            member_key, extension = base_plus_ext(info.name)
            if member_key is None:
                continue

            # a new key starts the next sample
            if member_key != key:
                if current is not None:
                    yield current
                current = None
                key = member_key
                index += 1
                if index >= task.stop:
                    return
                if index >= task.start:
                    current = RawSample(key=key, shard=task.shard)
            if current is None:
                continue

            # keep the members the stream decodes; skip the data of all others unread
            extension = extension.lower()
            if extension not in MEMBERS:
                continue
            if extension in current.members:
                current.problem = f"duplicate member {info.name}"
                continue
            if info.size > MAX_MEMBER_BYTES:
                current.problem = f"member {info.name} is {info.size} bytes, more than the limit of {MAX_MEMBER_BYTES}"
                continue
            current.members[extension] = tar.extractfile(info).read()
    if current is not None:
        yield current


def read_ranges(ranges: Iterable[ShardRange], counter: SkipCounter) -> Iterator[RawSample]:
    """Yield the raw samples of each range; count planned samples a damaged shard did not give."""
    for task in ranges:
        produced = 0
        try:
            for sample in iter_shard_samples(task):
                produced += 1
                yield sample
        except (tarfile.TarError, OSError) as error:
            # name the path, URL or command unless the error already does
            detail = str(error) if task.path in str(error) else f"{task.path}: {error}"
            reason = f"shard unreadable after {produced} of {task.samples} planned samples: {detail}"
        else:
            reason = f"shard ended after {produced} of {task.samples} planned samples; the manifest lists more"
        if produced < task.samples:
            where = f"samples {task.start + produced}-{task.stop - 1}"
            counter.skip(task.shard, where, reason, count=task.samples - produced)


def decode_samples(
    samples: Iterable[RawSample],
    transform: Callable[[bytes], torch.Tensor],
    num_classes: int,
    counter: SkipCounter,
) -> Iterator[DecodedSample]:
    """Decode each sample's label and image, skipping and counting corrupt ones."""
    for sample in samples:
        try:
            if sample.problem is not None:
                raise CorruptSampleError(sample.problem)
            for extension in MEMBERS:
                if extension not in sample.members:
                    raise CorruptSampleError(f"missing member {sample.key}.{extension}")
            label = parse_label(sample.members["cls"], num_classes)
            image = transform(sample.members["jpg"])
        except CorruptSampleError as error:
            counter.skip(sample.shard, sample.key, str(error))
            continue
        yield DecodedSample(image=image, label=label, key=sample.key, shard=sample.shard)


def collate(
    samples: list[DecodedSample], image_size: int, skipped: int, skipped_samples: list[SkippedSample] | None = None
) -> Batch:
    """Stack decoded samples into a Batch of uint8 images and int64 labels."""
    images = torch.empty((len(samples), 3, image_size, image_size), dtype=torch.uint8)
    for i, sample in enumerate(samples):
        images[i].copy_(sample.image)
    return Batch(
        images=images,
        labels=torch.tensor([sample.label for sample in samples], dtype=torch.int64),
        keys=[sample.key for sample in samples],
        shards=[sample.shard for sample in samples],
        skipped=skipped,
        skipped_samples=skipped_samples or [],
    )


def batch_samples(
    samples: Iterable[DecodedSample], batch_size: int, image_size: int, counter: SkipCounter
) -> Iterator[Batch]:
    """Yield full batches, then one last partial batch if samples remain or skips are uncounted.

    The last batch can be empty: it then only carries the skipped count to the consumer.
    """
    pending: list[DecodedSample] = []
    for sample in samples:
        pending.append(sample)
        if len(pending) == batch_size:
            yield collate(pending, image_size, counter.take(), counter.take_samples())
            pending = []
    if pending or counter.pending:
        yield collate(pending, image_size, counter.take(), counter.take_samples())
    if counter.total:
        logger.warning("%s skipped %d corrupt sample(s) in this epoch", counter.where, counter.total)


# ---------------------------------------------------------------------------------------------
# the dataset each worker iterates


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs to build its part of one epoch; picklable."""

    shards: tuple[ShardFile, ...]  # in this epoch's order
    batch_size: int
    image_size: int
    num_classes: int
    rank: int
    world_size: int
    train: bool
    steps: int = 0  # training: whole batches per rank
    shuffle_buffer: int = 0  # training: raw samples per worker
    seed: int = 0
    epoch: int = 0
    crop_scale: tuple[float, float] = (0.08, 1.0)  # training: bounds of the crop's share of the area
    flip: bool = True  # training: random horizontal flip

    def worker_ranges(self, worker: int, num_workers: int) -> list[ShardRange]:
        """Return the shard ranges that one worker of this rank reads."""
        if self.train:
            begin, end = train_span(self.steps, self.batch_size, self.rank, worker, num_workers)
        else:
            total = sum(shard.samples for shard in self.shards)
            begin, end = eval_span(total, self.batch_size, self.rank, self.world_size, worker, num_workers)
        return ranges_in_span(self.shards, begin, end)


def worker_generators(spec: StreamSpec, worker: int) -> tuple[np.random.Generator, random.Random]:
    """Return the (augmentation, shuffle) generators of one worker, seeded by seed, epoch, rank, worker."""
    augment_seed, shuffle_seed = np.random.SeedSequence([spec.seed % 2**64, spec.epoch, spec.rank, worker]).spawn(2)
    shuffle_state = int(shuffle_seed.generate_state(1, dtype=np.uint64)[0])
    return np.random.default_rng(augment_seed), random.Random(shuffle_state)


class ShardStream(IterableDataset):
    """Yields the Batches of one rank's epoch; each DataLoader worker reads its own span."""

    def __init__(self, spec: StreamSpec) -> None:
        super().__init__()
        self.spec = spec

    def __iter__(self) -> Iterator[Batch]:
        spec = self.spec
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        ranges = spec.worker_ranges(worker, num_workers)
        counter = SkipCounter(f"rank {spec.rank} worker {worker}")
        logger.debug(
            "rank %d worker %d reads %d samples from %d shard range(s)",
            spec.rank,
            worker,
            sum(task.samples for task in ranges),
            len(ranges),
        )

        # DataPipeline would splice a list argument into its stages, so the source is a callable
        stages: list = [partial(iter, ranges), partial(read_ranges, counter=counter)]

        # training shuffles raw bytes and draws crops from per-worker seeded generators
        if spec.train:
            augment_rng, shuffle_rng = worker_generators(spec, worker)
            if spec.shuffle_buffer > 1:
                stages.append(wds.shuffle(spec.shuffle_buffer, initial=spec.shuffle_buffer, rng=shuffle_rng))
            transform = partial(
                decode_train_crop, image_size=spec.image_size, rng=augment_rng, scale=spec.crop_scale, flip=spec.flip
            )
        else:
            transform = partial(decode_eval_crop, image_size=spec.image_size)
        stages.append(partial(decode_samples, transform=transform, num_classes=spec.num_classes, counter=counter))
        stages.append(partial(batch_samples, batch_size=spec.batch_size, image_size=spec.image_size, counter=counter))
        return iter(wds.DataPipeline(*stages))

"""Assignment of each epoch's samples to ranks and DataLoader workers.

The split's shards are laid end to end (in a seeded per-epoch order for training, in manifest
order for evaluation) and the resulting sequence of samples is cut into contiguous spans, one
per rank and then one per worker. A span can start or end inside a shard. The worker then
reads only that part of the shard, streaming past the samples before it without decoding
them. The manifest's per-shard sample counts make the cut exact, so every sample belongs to
exactly one worker of one rank, for any worker count.

Training spans are whole batches: rank r takes batches [r * steps, (r + 1) * steps) of the
sequence, and its workers share those `steps` batches as evenly as possible. The samples after
steps * batch_size * world_size (fewer than batch_size * world_size of them) are left out of
the epoch. Because the shard order changes every epoch, the samples left out change too.
Evaluation spans cover every sample: the ranks share the samples as evenly as possible and
each rank's workers share its batches, so only the last worker's last batch can be partial.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ShardFile:
    """A shard as the stream needs it: its manifest name, path and sample count."""

    name: str
    path: str
    samples: int


@dataclass(frozen=True)
class ShardRange:
    """Samples [start, stop) of one shard, counted in the order the shard stores them."""

    shard: str
    path: str
    start: int
    stop: int

    @property
    def samples(self) -> int:
        return self.stop - self.start


def epoch_shard_order(shards: Sequence[ShardFile], seed: int, epoch: int) -> list[ShardFile]:
    """Return the shards in this epoch's order: a permutation seeded by (seed, epoch)."""
    rng = np.random.default_rng([seed % 2**64, epoch])
    return [shards[i] for i in rng.permutation(len(shards))]


def split_evenly(total: int, parts: int) -> list[int]:
    """Split `total` into `parts` counts that differ by at most one, larger counts first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def ranges_in_span(shards: Sequence[ShardFile], begin: int, end: int) -> list[ShardRange]:
    """Return the shard ranges that hold samples [begin, end) of the shards laid end to end."""
    ranges = []
    offset = 0
    for shard in shards:
        low = max(begin, offset)
        high = min(end, offset + shard.samples)
        if low < high:
            ranges.append(ShardRange(shard.name, shard.path, low - offset, high - offset))
        offset += shard.samples
    return ranges


def train_span(steps: int, batch_size: int, rank: int, worker: int, num_workers: int) -> tuple[int, int]:
    """Return the [begin, end) samples of one training worker: a whole number of batches."""
    worker_batches = split_evenly(steps, num_workers)
    begin = (rank * steps + sum(worker_batches[:worker])) * batch_size
    return begin, begin + worker_batches[worker] * batch_size


def eval_span(
    total: int, batch_size: int, rank: int, world_size: int, worker: int, num_workers: int
) -> tuple[int, int]:
    """Return the [begin, end) samples of one evaluation worker; all spans together cover `total`."""
    rank_samples = split_evenly(total, world_size)
    rank_begin = sum(rank_samples[:rank])
    rank_end = rank_begin + rank_samples[rank]

    # whole batches per worker, so that only the rank's last batch is partial
    batches = -(-rank_samples[rank] // batch_size)
    worker_batches = split_evenly(batches, num_workers)
    begin = rank_begin + sum(worker_batches[:worker]) * batch_size
    end = min(rank_end, begin + worker_batches[worker] * batch_size)
    return begin, max(begin, end)

"""The batch type that the train and eval loaders yield."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch


@dataclass(frozen=True)
class SkippedSample:
    """A corrupt sample the stream skipped: its shard, its key, why, and how many samples it stands for.

    A shard that ends early or cannot be read is one entry whose key names the range of sample
    positions it lost, such as "samples 40-49", with `count` set to their number.
    """

    shard: str
    key: str
    reason: str
    count: int = 1


@dataclass
class Batch:
    """Decoded, augmented samples collated in a worker.

    `skipped` counts corrupt samples the loader skipped since its previous batch. The last
    batch of an epoch also carries any skipped after it, so the sum over an epoch is exact.
    """

    images: torch.Tensor  # (B, 3, H, W) uint8, contiguous
    labels: torch.Tensor  # (B,) int64
    keys: list[str]
    shards: list[str]  # the shard name of each sample, as the manifest lists it
    skipped: int = 0
    skipped_samples: list[SkippedSample] = field(default_factory=list)  # the skipped samples counted in `skipped`

    def __len__(self) -> int:
        return len(self.keys)

    def pin_memory(self) -> Batch:
        """Return a copy in page-locked memory; DataLoader(pin_memory=True) calls this."""
        # NOTE: runs only where CUDA is available, so the CPU test suite does not cover it.
        return replace(self, images=self.images.pin_memory(), labels=self.labels.pin_memory())

    def select(self, indices: Sequence[int]) -> Batch:
        """Return the samples at `indices`, in that order, with skipped set to 0."""
        index = torch.as_tensor(list(indices), dtype=torch.int64)
        return Batch(
            images=self.images.index_select(0, index),
            labels=self.labels.index_select(0, index),
            keys=[self.keys[i] for i in indices],
            shards=[self.shards[i] for i in indices],
        )


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """Join batches in order; the result's skipped is the sum of theirs."""
    return Batch(
        images=torch.cat([batch.images for batch in batches]),
        labels=torch.cat([batch.labels for batch in batches]),
        keys=[key for batch in batches for key in batch.keys],
        shards=[shard for batch in batches for shard in batch.shards],
        skipped=sum(batch.skipped for batch in batches),
        skipped_samples=[sample for batch in batches for sample in batch.skipped_samples],
    )

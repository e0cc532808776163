"""Counts gathered during `toolkit eval`: overall, per shard and per class, plus the skipped samples.

Per-class counts are (C,) int64 tensors filled with torch.bincount, so memory grows with the
number of classes and never with samples × classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from toolkit.data.batch import SkippedSample
from toolkit.eval.inference import Scored


@dataclass
class HitCounts:
    """Samples and top-1 / top-5 hits of one group (a shard, a class range or the whole split)."""

    samples: int = 0
    top1_hits: int = 0
    top5_hits: int = 0

    @property
    def top1(self) -> float | None:
        """Top-1 accuracy, or None for a group without samples."""
        return self.top1_hits / self.samples if self.samples else None

    @property
    def top5(self) -> float | None:
        """Top-5 accuracy, or None for a group without samples."""
        return self.top5_hits / self.samples if self.samples else None


@dataclass
class EvalCounts:
    """Running counts over scored batches whose labels are already in the checkpoint's class order."""

    num_classes: int
    overall: HitCounts = field(default_factory=HitCounts)
    loss_sum: float = 0.0
    shards: dict[str, HitCounts] = field(default_factory=dict)
    skipped: list[SkippedSample] = field(default_factory=list)  # shard names as the manifest lists them
    class_samples: torch.Tensor = field(init=False)
    class_top1: torch.Tensor = field(init=False)
    class_top5: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.class_samples = torch.zeros(self.num_classes, dtype=torch.int64)
        self.class_top1 = torch.zeros(self.num_classes, dtype=torch.int64)
        self.class_top5 = torch.zeros(self.num_classes, dtype=torch.int64)

    @property
    def skipped_count(self) -> int:
        """Samples behind the skipped entries; an entry for a damaged shard stands for several."""
        return sum(sample.count for sample in self.skipped)

    @property
    def loss(self) -> float | None:
        """Mean loss per evaluated sample, or None when nothing was evaluated."""
        return self.loss_sum / self.overall.samples if self.overall.samples else None

    def add(self, scored: Scored, shard_names: list[str]) -> None:
        """Count one scored batch; `shard_names` gives each sample's shard."""
        labels = scored.batch.labels.view(-1)  # (B,)
        B = labels.shape[0]
        hits = scored.topk == labels.view(-1, 1)  # (B, k)
        hit1 = hits[:, :1].any(dim=1)  # (B,)
        hit5 = hits[:, :5].any(dim=1)  # (B,)

        # overall
        self.overall.samples += B
        self.overall.top1_hits += int(hit1.sum())
        self.overall.top5_hits += int(hit5.sum())
        self.loss_sum += scored.loss_sum

        # per class
        self.class_samples += torch.bincount(labels, minlength=self.num_classes)
        self.class_top1 += torch.bincount(labels[hit1], minlength=self.num_classes)
        self.class_top5 += torch.bincount(labels[hit5], minlength=self.num_classes)

        # per shard
        for shard, top1, top5 in zip(shard_names, hit1.tolist(), hit5.tolist()):
            counts = self.shards.setdefault(shard, HitCounts())
            counts.samples += 1
            counts.top1_hits += int(top1)
            counts.top5_hits += int(top5)

    def class_range(self, first: int, stop: int) -> HitCounts:
        """Return the counts of classes first..stop-1 (0-based, stop exclusive)."""
        return HitCounts(
            samples=int(self.class_samples[first:stop].sum()),
            top1_hits=int(self.class_top1[first:stop].sum()),
            top5_hits=int(self.class_top5[first:stop].sum()),
        )

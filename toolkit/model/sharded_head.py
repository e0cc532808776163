"""Class head whose C × D matrix is split by class range across the ranks of a process group.

Rank r of W ranks keeps the rows [start_r, stop_r) from `class_range`. The classes are split
as evenly as possible, and the first C mod W ranks get one row more. The loss and top-k gather
every rank's embeddings and combine the ranks' results (`toolkit.ops.sharded_ce`), so every
rank must call them together. With `group=None` the head holds all rows in one process; it
then also serves the options a plain `ClassHead` lacks: class sampling and a row update during
backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from toolkit.model.head import ClassHead
from toolkit.ops.sharded_ce import RowUpdate, SampledLoss, sampled_cross_entropy, sharded_cross_entropy, sharded_topk

def class_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Return the [start, stop) rows of the class matrix that `rank` keeps."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world_size {world_size}; expected 0 <= rank < world_size")
    if num_classes < world_size:
        raise ValueError(
            f"{num_classes} classes cannot be split over {world_size} ranks; every rank needs at least one class, "
            "so use at most as many processes as classes"
        )
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class ShardedClassHead(nn.Module):
    """This rank's rows of the class matrix, with a loss and top-k over the rows of all ranks.

    `weight` is (stop - start, D); `num_classes` is C of the whole matrix. In training mode every
    rank passes batches of the same size. In eval mode batch sizes may differ between ranks and
    may be 0, which costs one more small all-gather per call.

    sample_rate < 1 samples classes in training (`sampled_cross_entropy`); the kept rows and
    their weight copies are appended to `sampled` for an optimizer to apply. `row_update`, when
    set, receives each chunk's weight gradient during backward, so no weight gradient is kept.
    """

    def __init__(
        self,
        weight: Tensor,
        num_classes: int,
        class_start: int,
        *,
        group: dist.ProcessGroup | None = None,
        head_type: str = "linear",
        margin: float = 0.2,
        scale: float = 30.0,
        chunk_size: int = 8192,
        label_smoothing: float = 0.0,
        sample_rate: float = 1.0,
    ) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"invalid class_sample_rate {sample_rate}; expected a fraction in (0, 1], such as 0.1")
        self.weight = nn.Parameter(weight)
        self.total_classes = num_classes
        self.class_start = class_start
        self.group = group
        self.head_type = head_type
        self.margin = float(margin)
        self.scale = float(scale)
        self.chunk_size = chunk_size
        self.label_smoothing = float(label_smoothing)
        self.sample_rate = float(sample_rate)
        self.generator: torch.Generator | None = None
        self.row_update: RowUpdate | None = None
        self.sampled: list[SampledLoss] = []

    @classmethod
    def from_head(
        cls,
        head: ClassHead,
        *,
        rank: int = 0,
        world_size: int = 1,
        group: dist.ProcessGroup | None = None,
        sample_rate: float = 1.0,
    ) -> ShardedClassHead:
        """Return a sharded head with a copy of `rank`'s rows of `head`'s matrix, and its settings."""
        start, stop = class_range(head.num_classes, rank, world_size)
        return cls(
            head.weight.detach()[start:stop].clone(),
            head.num_classes,
            start,
            group=group,
            head_type=head.head_type,
            margin=head.margin,
            scale=head.scale,
            chunk_size=head.chunk_size,
            label_smoothing=head.label_smoothing,
            sample_rate=sample_rate,
        )

    @property
    def num_classes(self) -> int:
        return self.total_classes

    @property
    def class_stop(self) -> int:
        return self.class_start + self.weight.shape[0]

    @property
    def normalize(self) -> bool:
        """Whether logits are scaled cosines, that is whether the head is cosface or arcface."""
        return self.head_type != "linear"

    @property
    def samples_classes(self) -> bool:
        """Whether the next loss call in training samples classes."""
        return self.sample_rate < 1.0 and self.training and torch.is_grad_enabled()

    def seed_sampling(self, seed: int) -> None:
        """Seed the generator of the sampled classes, for example from (run seed, step, rank)."""
        if self.generator is None:
            self.generator = torch.Generator(device=self.weight.device)
        self.generator.manual_seed(seed)

    def loss(self, embeddings: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
        """Return the cross-entropy of this rank's (B, D) embeddings and (B,) labels.

        "mean" and "sum" cover the global batch, the same value on every rank, and "none"
        returns this rank's (B,) losses. Sampling applies only to "mean" in training.
        """
        margin_options = self._margin_options()
        training = self.training and torch.is_grad_enabled()
        if self.samples_classes and reduction == "mean":
            sampled = sampled_cross_entropy(
                embeddings, self.weight, labels, class_start=self.class_start, num_classes=self.total_classes,
                group=self.group, sample_rate=self.sample_rate, generator=self.generator,
                chunk_size=self.chunk_size, label_smoothing=self.label_smoothing,
                row_update=self.row_update, **margin_options,
            )
            self.sampled.append(sampled)
            return sampled.loss
        return sharded_cross_entropy(
            embeddings, self.weight, labels, class_start=self.class_start, num_classes=self.total_classes,
            group=self.group, chunk_size=self.chunk_size, label_smoothing=self.label_smoothing,
            reduction=reduction, uneven=not self.training,
            row_update=self.row_update if training else None, **margin_options,
        )

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.loss(embeddings, labels)

    @torch.no_grad()
    def topk(self, embeddings: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Return the k largest logits (B, k) and their global class indices (B, k) for this rank's rows."""
        values, indices = sharded_topk(
            embeddings, self.weight, k, class_start=self.class_start, num_classes=self.total_classes,
            group=self.group, chunk_size=self.chunk_size, normalize=self.normalize, uneven=not self.training,
        )
        if self.normalize:
            values = values * self.scale  # cosines to logits
        return values, indices

    def logits(self, embeddings: Tensor) -> Tensor:
        """Return all (B, C) logits, which only a head with every row can compute."""
        if self.group is not None:
            raise NotImplementedError(
                "a head split over ranks has no single (B, C) logit matrix; use topk, or evaluate a saved checkpoint"
            )
        weight = self.weight.to(embeddings.dtype)
        if not self.normalize:
            return embeddings @ weight.T  # (B, C)
        cosines = nn.functional.normalize(embeddings, dim=1) @ nn.functional.normalize(weight, dim=1).T  # (B, C)
        return self.scale * cosines

    def take_sampled(self) -> list[SampledLoss]:
        """Return and forget the sampled rows of the loss calls since the last call."""
        sampled, self.sampled = self.sampled, []
        return sampled

    def extra_repr(self) -> str:
        text = (
            f"rows=[{self.class_start}, {self.class_stop}) of num_classes={self.total_classes}, "
            f"embedding_dim={self.weight.shape[1]}, head_type={self.head_type}"
        )
        if self.normalize:
            text += f", scale={self.scale}, margin={self.margin}"
        if self.sample_rate < 1.0:
            text += f", sample_rate={self.sample_rate}"
        return text

    def _margin_options(self) -> dict:
        if not self.normalize:
            return {}
        return {"normalize": True, "scale": self.scale, "margin": self.margin, "margin_type": self.head_type}


__all__ = ["ShardedClassHead", "class_range"]

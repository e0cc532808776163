"""Class head: the C × D class matrix and the loss, top-k and logits computed from it.

Three head types share one matrix and the chunked cross-entropy:

- linear: logits x · wᵀ;
- cosface: logits s · cos θ, and s · (cos θ − m) for the target class;
- arcface: logits s · cos θ, and s · cos(θ + m) for the target class (m in radians).

θ is the angle between the embedding and a class row, s is `scale` and m is `margin`. The margin
only enters the loss; `logits` and `topk` return s · cos θ for cosine heads.
"""

from __future__ import annotations

import math
from typing import get_args

import torch
from torch import Tensor, nn

from toolkit.config import HeadType
from toolkit.ops import chunked_cross_entropy, chunked_topk

HEAD_TYPES: tuple[str, ...] = get_args(HeadType)
INIT_STD = 0.01


class ClassHead(nn.Module):
    """C × D class matrix with a linear, CosFace or ArcFace loss computed over class chunks."""

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        head_type: str = "linear",
        margin: float = 0.2,
        scale: float = 30.0,
        chunk_size: int = 8192,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        _check_settings(num_classes, embedding_dim, head_type, margin, scale, chunk_size, label_smoothing)
        self.head_type = head_type
        self.margin = float(margin)
        self.scale = float(scale)
        self.chunk_size = chunk_size
        self.label_smoothing = float(label_smoothing)

        # Small normal rows point in uniformly random directions. That suits cosine heads too,
        # because they use only each row's direction.
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.normal_(self.weight, std=INIT_STD)

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    @property
    def normalize(self) -> bool:
        """Whether logits are scaled cosines, that is whether the head is cosface or arcface."""
        return self.head_type != "linear"

    def loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Return the mean cross-entropy of (B, D) embeddings against (B,) int64 labels."""
        if not self.normalize:
            return chunked_cross_entropy(
                embeddings,
                self.weight,
                labels,
                chunk_size=self.chunk_size,
                label_smoothing=self.label_smoothing,
            )
        return chunked_cross_entropy(
            embeddings,
            self.weight,
            labels,
            chunk_size=self.chunk_size,
            label_smoothing=self.label_smoothing,
            normalize=True,
            scale=self.scale,
            margin=self.margin,
            margin_type=self.head_type,
        )

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return self.loss(embeddings, labels)

    @torch.no_grad()
    def topk(self, embeddings: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Return the k largest logits (B, k) and their class indices (B, k), one class chunk at a time."""
        values, indices = chunked_topk(
            embeddings, self.weight, k, chunk_size=self.chunk_size, normalize=self.normalize
        )
        if self.normalize:
            values = values * self.scale  # cosines to logits
        return values, indices

    def logits(self, embeddings: Tensor) -> Tensor:
        """Return all (B, C) logits at once. Use it only for small C, because the matrix has B × C entries."""
        B, D = embeddings.shape
        weight = self.weight.to(embeddings.dtype)
        if not self.normalize:
            return embeddings @ weight.T  # (B, C)
        cosines = nn.functional.normalize(embeddings, dim=1) @ nn.functional.normalize(weight, dim=1).T  # (B, C)
        return self.scale * cosines

    def extra_repr(self) -> str:
        text = f"num_classes={self.num_classes}, embedding_dim={self.weight.shape[1]}, head_type={self.head_type}"
        if self.normalize:
            text += f", scale={self.scale}, margin={self.margin}"
        return text


def _check_settings(
    num_classes: int,
    embedding_dim: int,
    head_type: str,
    margin: float,
    scale: float,
    chunk_size: int,
    label_smoothing: float,
) -> None:
    """Raise ValueError naming the first invalid head setting, so a bad config fails before training."""
    if head_type not in HEAD_TYPES:
        raise ValueError(f"invalid head {head_type!r}; expected one of {', '.join(HEAD_TYPES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}; check the dataset's class list")
    if embedding_dim < 1:
        raise ValueError(f"invalid embedding width {embedding_dim} for the class matrix; expected a positive number")
    if chunk_size < 1:
        raise ValueError(f"invalid class_chunk {chunk_size}; expected a positive number of classes")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"invalid label_smoothing {label_smoothing}; expected a value in [0, 1)")
    if head_type == "linear":
        return
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"invalid scale {scale} for the {head_type} head; expected a positive number such as 30")
    if head_type == "arcface" and not 0.0 <= margin < math.pi:
        raise ValueError(f"invalid margin {margin} for the arcface head; expected an angle in radians in [0, π)")
    if head_type == "cosface" and not math.isfinite(margin):
        raise ValueError(f"invalid margin {margin} for the cosface head; expected a finite number such as 0.35")


__all__ = ["HEAD_TYPES", "ClassHead"]

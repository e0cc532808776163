"""The classifier: ResNet trunk, embedding neck and class head, built from TrainConfig."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from toolkit.config import TrainConfig
from toolkit.model.backbone import ResNetTrunk, build_backbone
from toolkit.model.head import ClassHead
from toolkit.model.pretrained import load_pretrained

logger = logging.getLogger(__name__)


def build_neck(feature_dim: int, embedding_dim: int) -> nn.Module:
    """Return Linear(F → D, no bias) + BatchNorm1d(D), or nn.Identity when embedding_dim is 0."""
    if embedding_dim < 0:
        raise ValueError(f"invalid embedding_dim {embedding_dim}; expected 0 (no neck) or a positive width such as 512")
    if embedding_dim == 0:
        return nn.Identity()
    # the BatchNorm that follows makes a bias redundant
    return nn.Sequential(nn.Linear(feature_dim, embedding_dim, bias=False), nn.BatchNorm1d(embedding_dim))


class Classifier(nn.Module):
    """Image classifier over many classes: backbone (B, F) → neck (B, D) → class head (C × D).

    Images are (B, 3, H, W) float tensors that should be channels_last, like the model after
    `build_model`. `embed` converts other layouts, which costs a copy per batch. In training mode
    the neck's BatchNorm needs at least two samples per batch.
    """

    def __init__(self, backbone: ResNetTrunk, neck: nn.Module, head: ClassHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.head = head
        self.feature_dim: int = backbone.feature_dim
        self.embedding_dim: int = head.weight.shape[1]
        self.num_classes: int = head.weight.shape[0]

    def embed(self, images: Tensor) -> Tensor:
        """Return the (B, D) embeddings of (B, 3, H, W) images."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (B, 3, H, W), got {tuple(images.shape)}")
        images = images.contiguous(memory_format=torch.channels_last)  # no copy when already channels_last
        features = self.backbone(images)  # (B, F)
        return self.neck(features)  # (B, D)

    def loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Return the mean cross-entropy of (B, D) embeddings against (B,) labels, over class chunks."""
        return self.head.loss(embeddings, labels)

    def forward(self, images: Tensor, labels: Tensor) -> Tensor:
        return self.loss(self.embed(images), labels)

    def topk(self, embeddings: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Return the (B, k) largest logits and their class indices. Cosine heads give scale · cos θ."""
        return self.head.topk(embeddings, k)

    def logits(self, embeddings: Tensor) -> Tensor:
        """Return all (B, C) logits. Use it only for small C, because the matrix has B × C entries."""
        return self.head.logits(embeddings)


def build_model(config: TrainConfig, num_classes: int) -> Classifier:
    """Build the classifier described by `config` for `num_classes` classes, in channels_last format.

    Backbone weights come from the local file `config.pretrained` when it is set and are random
    otherwise. Nothing is downloaded. Neck and class matrix always start random.
    """
    # backbone, optionally pretrained
    backbone = build_backbone(config.arch, config.checkpointing)
    if config.pretrained is not None:
        load_pretrained(backbone, config.pretrained)

    # neck and head
    neck = build_neck(backbone.feature_dim, config.embedding_dim)
    embedding_dim = config.embedding_dim or backbone.feature_dim
    head = ClassHead(
        num_classes,
        embedding_dim,
        head_type=config.head,
        margin=config.margin,
        scale=config.scale,
        chunk_size=config.class_chunk,
        label_smoothing=config.label_smoothing,
    )

    model = Classifier(backbone, neck, head)
    logger.debug(
        "built %s: %d features, %d-dim embeddings, %d classes, %s head, checkpointing %s",
        config.arch,
        model.feature_dim,
        model.embedding_dim,
        num_classes,
        config.head,
        config.checkpointing,
    )
    return model.to(memory_format=torch.channels_last)


__all__ = ["Classifier", "build_model", "build_neck"]

"""Batched inference over an eval loader: the shared core of validation in `train` and of `eval`."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from toolkit.data import Batch, normalize_batch

if TYPE_CHECKING:
    # toolkit.train imports this module for validation, so a runtime import would be circular
    from toolkit.train.precision import Precision


@dataclass
class Scored:
    """One batch with its predictions: top-k class indices and the summed loss."""

    batch: Batch
    topk: torch.Tensor  # (B, k) int64 on the CPU, best first
    loss_sum: float


@dataclass
class Totals:
    """Running top-1, top-5 and loss over scored batches."""

    samples: int = 0
    top1: int = 0
    top5: int = 0
    loss_sum: float = 0.0
    skipped: int = 0

    def add(self, scored: Scored) -> None:
        labels = scored.batch.labels.view(-1, 1)  # (B, 1)
        hits = scored.topk == labels  # (B, k)
        self.samples += labels.shape[0]
        self.top1 += int(hits[:, :1].any(dim=1).sum())
        self.top5 += int(hits[:, :5].any(dim=1).sum())
        self.loss_sum += scored.loss_sum
        self.skipped += scored.batch.skipped

    def as_dict(self) -> dict[str, float | int]:
        samples = max(self.samples, 1)
        return {
            "samples": self.samples,
            "top1": self.top1 / samples,
            "top5": self.top5 / samples,
            "loss": self.loss_sum / samples,
            "skipped": self.skipped,
        }


@torch.no_grad()
def score_batches(
    model: torch.nn.Module,
    loader: Iterable[Batch],
    device: torch.device,
    precision: Precision,
    k: int = 5,
) -> Iterator[Scored]:
    """Yield each batch with its top-k predictions and summed loss; the model must be in eval mode."""
    k = min(k, model.num_classes)
    for batch in loader:
        if batch.labels.numel() == 0:
            continue
        images = normalize_batch(batch.images, device)
        labels = batch.labels.to(device, non_blocking=True)
        with precision.autocast():
            embeddings = model.embed(images)
            loss = model.loss(embeddings, labels)
        _, indices = model.topk(embeddings.float(), k)
        yield Scored(batch=batch, topk=indices.cpu(), loss_sum=float(loss) * labels.shape[0])


def evaluate(
    model: torch.nn.Module,
    loader: Iterable[Batch],
    device: torch.device,
    precision: Precision,
) -> dict[str, float | int]:
    """Return samples, top-1, top-5, mean loss and skipped samples over a loader."""
    totals = Totals()
    for scored in score_batches(model, loader, device, precision):
        totals.add(scored)
    return totals.as_dict()

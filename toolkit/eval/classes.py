"""Class-list check between a checkpoint and a dataset: identical, reordered (remapped) or mismatched."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

# Names listed per side in a mismatch message; the counts are always complete.
DIFF_NAMES_SHOWN = 5


class ClassListMismatch(ValueError):
    """The checkpoint and the dataset name different sets of classes."""


@dataclass(frozen=True)
class ClassMapping:
    """Translation of dataset labels to checkpoint class indices.

    `remap` is None when both lists are identical. Otherwise it is a (C,) int64 tensor with
    remap[dataset_label] = checkpoint_index.
    """

    remap: torch.Tensor | None

    @property
    def reordered(self) -> bool:
        return self.remap is not None

    def apply(self, labels: torch.Tensor) -> torch.Tensor:
        """Return labels in the checkpoint's class order."""
        if self.remap is None:
            return labels
        return self.remap[labels]


def match_classes(checkpoint_classes: Sequence[str], dataset_classes: Sequence[str]) -> ClassMapping:
    """Compare the class lists and return the label mapping, or raise ClassListMismatch with a short diff.

    The same names in another order are remapped by name, so every metric is computed in the
    checkpoint's class order. Different sets are never evaluated.
    """
    checkpoint_classes = list(checkpoint_classes)
    dataset_classes = list(dataset_classes)
    if checkpoint_classes == dataset_classes:
        return ClassMapping(remap=None)

    _check_unique(checkpoint_classes, "checkpoint")
    _check_unique(dataset_classes, "dataset")
    checkpoint_set = set(checkpoint_classes)
    dataset_set = set(dataset_classes)
    if checkpoint_set != dataset_set:
        raise ClassListMismatch(describe_difference(checkpoint_classes, dataset_classes))

    index = {name: position for position, name in enumerate(checkpoint_classes)}
    remap = torch.tensor([index[name] for name in dataset_classes], dtype=torch.int64)
    moved = int((remap != torch.arange(len(dataset_classes))).sum())
    logger.warning(
        "the dataset lists the checkpoint's %d classes in another order (%d at other positions); "
        "labels are remapped by class name",
        len(dataset_classes),
        moved,
    )
    return ClassMapping(remap=remap)


def describe_difference(checkpoint_classes: Sequence[str], dataset_classes: Sequence[str]) -> str:
    """Return a short message with the counts and the first few names on each side of the difference."""
    checkpoint_set = set(checkpoint_classes)
    dataset_set = set(dataset_classes)
    missing = [name for name in checkpoint_classes if name not in dataset_set]
    extra = [name for name in dataset_classes if name not in checkpoint_set]
    lines = [
        f"the dataset's classes differ from the checkpoint's: checkpoint has {len(checkpoint_classes)}, "
        f"dataset has {len(dataset_classes)}, {len(checkpoint_set & dataset_set)} in common"
    ]
    if missing:
        lines.append(f"  checkpoint classes not in the dataset ({len(missing)}): {_preview(missing)}")
    if extra:
        lines.append(f"  dataset classes not in the checkpoint ({len(extra)}): {_preview(extra)}")
    lines.append("Evaluate on a dataset packed with the checkpoint's classes (toolkit pack --classes FILE).")
    return "\n".join(lines)


def _preview(names: list[str]) -> str:
    text = ", ".join(repr(name) for name in names[:DIFF_NAMES_SHOWN])
    if len(names) > DIFF_NAMES_SHOWN:
        text += f", ... ({len(names) - DIFF_NAMES_SHOWN} more)"
    return text


def _check_unique(names: list[str], side: str) -> None:
    if len(set(names)) != len(names):
        seen: set[str] = set()
        repeated = next(name for name in names if name in seen or seen.add(name))
        raise ClassListMismatch(f"the {side} class list names {repeated!r} more than once, so labels cannot be matched by name")

"""Duplicate detection, split assignment and shard order, from the content hash of each image.

Duplicates (files with identical bytes):
- Within one class, the first file in listing order is packed and the others are counted as
  "same-class" duplicates and listed in rejects.csv.
- Under different classes, every copy is packed under its own label, because each label may be
  right (the same photo filed under two related classes is common). They are counted as
  "cross-class" (number of files involved) and named in a warning.

Splits:
- Each image gets a point in [0, 1) from sha256(split_seed, content sha256). A point below
  test_fraction goes to test, below test_fraction + val_fraction to val, and the rest to train.
  The point depends only on the bytes and the seed, so adding images later never moves an
  image that was already assigned. The expected share of each class in test and val is
  test_fraction and val_fraction, and the exact count per class varies with the hash. Classes
  that end up with no val or no test image are named in a warning.
- A class with fewer images than the number of splits it should fill (3 with the default
  fractions) goes to train whole and is named in a warning. When such a class grows past that
  size, its images are split by their points like any other class.
- A split given in a CSV `split` column overrides the point.
- Identical bytes never land in two splits: copies under other classes follow a CSV split
  given for any copy, otherwise they all go to train when the small-class rule separated them.

Order in the shards: train is shuffled by sha256(shuffle_seed, path), so every shard mixes
classes. Val and test stay sorted by label, then listing order. Both orders use only hashlib
and sorting, so they do not change between NumPy versions.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np

from toolkit.dataset import SPLITS
from toolkit.pack import PackError
from toolkit.pack.scan import AUTO_SPLIT

logger = logging.getLogger(__name__)

TRAIN, VAL, TEST = (SPLITS.index(name) for name in ("train", "val", "test"))
NOT_PACKED = -1

# Number of names that a warning lists before it gives only the count.
WARN_NAMES = 5


@dataclass
class Duplicates:
    """Identical bytes among the hashed entries."""

    keep: np.ndarray  # (N,) bool: False for rejected entries and same-class copies
    original: np.ndarray  # (N,) int64: for a same-class copy, the entry that is packed; else -1
    cross_class: list[list[int]]  # groups of packed entries with identical bytes and different labels


@dataclass
class SplitPlan:
    """The entries of each split in shard order, and what the assignment reported."""

    order: dict[str, np.ndarray]  # split name -> entry indices, in the order they are written
    split_of: np.ndarray  # (N,) int8: index into SPLITS, or NOT_PACKED
    small_classes: list[int]
    straddling_groups: int  # cross-class groups that CSV splits put in more than one split


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Raise PackError unless both fractions are in [0, 1] and their sum is at most 1."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value <= 1.0:
            raise PackError(f"invalid {name} {value}; use a fraction between 0 and 1")
    if val_fraction + test_fraction > 1.0:
        raise PackError(
            f"val_fraction {val_fraction} + test_fraction {test_fraction} is more than 1; lower one of them"
        )


def find_duplicates(shas: np.ndarray, labels: np.ndarray, valid: np.ndarray, num_classes: int) -> Duplicates:
    """Group entries by content hash; keep the first copy per class, flag copies across classes.

    `shas` is (N, 32) uint8, `labels` (N,) int and `valid` (N,) bool (False for entries rejected
    before hashing). Entries are compared in index order, which is the listing order.
    """
    N = len(labels)
    keep = np.zeros(N, dtype=bool)
    original = np.full(N, -1, dtype=np.int64)
    indices = np.flatnonzero(valid)
    if len(indices) == 0:
        return Duplicates(keep, original, [])

    # one group per distinct content, then one pair per (content, label)
    _, group = np.unique(shas[indices], axis=0, return_inverse=True)
    group = group.reshape(-1).astype(np.int64)  # (V,)
    pair = group * num_classes + labels[indices]
    unique_pairs, first, pair_of = np.unique(pair, return_index=True, return_inverse=True)
    kept_entry = indices[first[pair_of.reshape(-1)]]  # (V,) the first entry with the same pair

    # same class: the first copy stays
    keep[indices] = kept_entry == indices
    copies = kept_entry != indices
    original[indices[copies]] = kept_entry[copies]

    # other classes: groups with more than one label among the pairs
    labels_per_group = np.bincount(unique_pairs // num_classes)
    multi_label = labels_per_group[group] > 1  # (V,)
    members = indices[multi_label & ~copies]
    member_groups = group[multi_label & ~copies]
    groups: dict[int, list[int]] = {}
    for entry, group_id in zip(members.tolist(), member_groups.tolist()):
        groups.setdefault(group_id, []).append(entry)
    cross_class = sorted(groups.values(), key=lambda entries: entries[0])
    return Duplicates(keep, original, cross_class)


def split_points(shas: np.ndarray, seed: int) -> np.ndarray:
    """Map each content hash to a point in [0, 1) with sha256(seed, content hash)."""
    N = len(shas)
    prefix = f"toolkit-split:{seed}:".encode()
    values = np.fromiter(
        (int.from_bytes(hashlib.sha256(prefix + row.tobytes()).digest()[:8], "big") for row in shas),
        dtype=np.uint64,
        count=N,
    )
    # the top 53 bits fill a float64 mantissa, so the point is exact and below 1
    return (values >> np.uint64(11)).astype(np.float64) / float(2**53)


def required_images(val_fraction: float, test_fraction: float) -> int:
    """Return how many images a class needs to reach every split with a non-zero share."""
    shares = (1.0 - val_fraction - test_fraction, val_fraction, test_fraction)
    return sum(1 for share in shares if share > 0)


def assign_splits(
    points: np.ndarray,
    labels: np.ndarray,
    explicit: np.ndarray,
    duplicates: Duplicates,
    num_classes: int,
    val_fraction: float,
    test_fraction: float,
) -> tuple[np.ndarray, list[int], int]:
    """Return (split per entry, small classes, straddling groups) for the entries that are kept."""
    keep = duplicates.keep

    # by point, per class thresholds
    split = np.full(len(labels), TRAIN, dtype=np.int8)
    split[points < test_fraction + val_fraction] = VAL
    split[points < test_fraction] = TEST

    # small classes go to train whole
    sizes = np.bincount(labels[keep], minlength=num_classes)
    small = (sizes > 0) & (sizes < required_images(val_fraction, test_fraction))
    split[small[labels]] = TRAIN

    # CSV split column
    given = explicit != AUTO_SPLIT
    split[given] = explicit[given]

    # identical bytes share one split
    straddling = 0
    for group in duplicates.cross_class:
        group_given = [entry for entry in group if given[entry]]
        if group_given:
            target = split[group_given[0]]
            straddling += len({int(split[entry]) for entry in group_given}) > 1
        elif len({int(split[entry]) for entry in group}) > 1:
            target = TRAIN
        else:
            continue
        for entry in group:
            if not given[entry]:
                split[entry] = target

    split[~keep] = NOT_PACKED
    return split, np.flatnonzero(small).tolist(), straddling


def classes_without(split_of: np.ndarray, labels: np.ndarray, code: int, small: list[int]) -> list[int]:
    """Return the labels that have packed entries but none in split CODE, leaving out the SMALL classes."""
    packed = split_of != NOT_PACKED
    size = int(labels.max()) + 1 if len(labels) else 0
    present = np.bincount(labels[packed], minlength=size) > 0
    in_split = np.bincount(labels[split_of == code], minlength=size) > 0
    missing = present & ~in_split
    missing[small] = False
    return np.flatnonzero(missing).tolist()


def shuffle_keys(paths: list[str], entries: np.ndarray, seed: int) -> np.ndarray:
    """Return a uint64 sort key per entry from sha256(seed, path)."""
    prefix = f"toolkit-shuffle:{seed}:".encode()
    return np.fromiter(
        (int.from_bytes(hashlib.sha256(prefix + paths[entry].encode()).digest()[:8], "big") for entry in entries.tolist()),
        dtype=np.uint64,
        count=len(entries),
    )


def order_split(name: str, entries: np.ndarray, labels: np.ndarray, paths: list[str], shuffle_seed: int) -> np.ndarray:
    """Return ENTRIES in shard order: shuffled for train, by label then listing order otherwise."""
    if name == "train":
        keys = shuffle_keys(paths, entries, shuffle_seed)
        return entries[np.lexsort((entries, keys))]
    return entries[np.lexsort((entries, labels[entries]))]


def plan_splits(
    shas: np.ndarray,
    labels: np.ndarray,
    explicit: np.ndarray,
    paths: list[str],
    duplicates: Duplicates,
    classes: list[str],
    val_fraction: float,
    test_fraction: float,
    split_seed: int,
    shuffle_seed: int,
) -> SplitPlan:
    """Assign every kept entry to a split and put each split in shard order."""
    points = split_points(shas, split_seed)
    split_of, small, straddling = assign_splits(
        points, labels, explicit, duplicates, len(classes), val_fraction, test_fraction
    )
    order = {
        name: order_split(name, np.flatnonzero(split_of == code), labels, paths, shuffle_seed)
        for code, name in enumerate(SPLITS)
    }

    if small:
        names = ", ".join(classes[label] for label in small[:WARN_NAMES])
        logger.warning(
            "classes with fewer than %d images go to train whole (%d): %s%s",
            required_images(val_fraction, test_fraction),
            len(small),
            names,
            ", ..." if len(small) > WARN_NAMES else "",
        )
    for code, name, fraction in ((VAL, "val", val_fraction), (TEST, "test", test_fraction)):
        missing = classes_without(split_of, labels, code, small) if fraction > 0 else []
        if missing:
            names = ", ".join(classes[label] for label in missing[:WARN_NAMES])
            logger.warning(
                "%d classes have no %s image, because each image's split comes from a hash of its bytes and the "
                "share per class holds only on average: %s%s. Give these classes a split column in a CSV "
                "list if each needs %s images",
                len(missing), name, names, ", ..." if len(missing) > WARN_NAMES else "", name,
            )
    if straddling:
        logger.warning(
            "%d groups of identical files are in more than one split because the CSV split column puts them there",
            straddling,
        )
    return SplitPlan(order=order, split_of=split_of, small_classes=small, straddling_groups=straddling)

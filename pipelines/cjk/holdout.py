"""Design groups and the choice of whole designs held out for validation and test.

Accuracy on the test split should measure recognition in typefaces the model never saw, so a
split never shares a design with another. Faces join one design group when either

- their family names agree after dropping region, encoding, spacing and weight words
  (`fonts.design_key`), as for all weights and regions of Noto Sans CJK; or
- their glyphs match: the mean intersection-over-union of the normalised DESIGN_PROBE bitmaps
  (at least MIN_COMMON_PROBES characters in common) reaches `min_iou`. This joins faces that
  share outlines under other names, such as Droid Sans Fallback and WenQuanYi Micro Hei, AR PL
  KaitiM Big5 and AR PL UKai, or the proportional and fixed-width IPA faces.

Groups are transitive (union-find). Measured with this module's probe on the Debian 12 CJK font
packages, the pairs that glyphs join score at least 0.83 (AR PL SungtiL GB against BabelStone
Han). Faces of different designs score at most 0.75 (Noto Sans CJK SC Medium against WenQuanYi
Micro Hei), so the default threshold of 0.80 sits between. Weights of one family can score far
lower (0.28 for Noto Sans CJK Thin against Black), which is why the name rule comes first.

Held-out groups are chosen among the groups that cover at least `min_coverage` of the
characters that any face covers, so val and test have samples for nearly every class. They are
ranked by the SHA-256 of "SEED:GROUP NAME", which depends only on the seed and the group, not on
which other fonts are installed. The first `test_count` go to test, the next `val_count` to val,
and at least one group always stays for training. Groups named with `test_names`/`val_names`
(case-insensitive substrings of the group name) replace the ranked choice for that split.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import numpy as np

from pipelines.cjk.fonts import Face
from pipelines.cjk.glyphs import Coverage

logger = logging.getLogger(__name__)

MIN_COMMON_PROBES = 8
DEFAULT_MIN_IOU = 0.80
TRAIN, VAL, TEST = "train", "val", "test"
SPLIT_ORDER = (TRAIN, VAL, TEST)


class HoldoutError(ValueError):
    """A held-out family name that matches no group, or a choice that leaves nothing to train on."""


@dataclass(frozen=True)
class DesignGroup:
    """Faces that share one design, named by their sorted design keys joined with " + "."""

    name: str
    faces: tuple[str, ...]
    covered: int  # candidate characters that at least one face of the group covers


# ---------------------------------------------------------------------------------------------
# grouping


def probe_similarity(first: dict[str, np.ndarray], second: dict[str, np.ndarray]) -> float | None:
    """Return the mean IoU of the probe bitmaps two faces share, or None with too few in common."""
    common = sorted(set(first) & set(second))
    if len(common) < MIN_COMMON_PROBES:
        return None
    a = np.stack([first[character] for character in common])  # (K, G, G)
    b = np.stack([second[character] for character in common])  # (K, G, G)
    intersection = (a & b).sum(axis=(1, 2))
    union = np.maximum((a | b).sum(axis=(1, 2)), 1)
    return float(np.mean(intersection / union))


def group_designs(faces: list[Face], coverages: dict[str, Coverage], min_iou: float = DEFAULT_MIN_IOU) -> list[DesignGroup]:
    """Join faces with the same design key or matching probe glyphs into groups, sorted by name."""
    parent = list(range(len(faces)))

    def find(index: int) -> int:
        while parent[index] != index:
            parent[index] = parent[parent[index]]
            index = parent[index]
        return index

    def join(first: int, second: int) -> None:
        parent[find(first)] = find(second)

    # same design key
    first_of_key: dict[str, int] = {}
    for index, face in enumerate(faces):
        join(index, first_of_key.setdefault(face.design, index))

    # matching glyphs
    for first in range(len(faces)):
        for second in range(first + 1, len(faces)):
            if find(first) == find(second):
                continue
            similarity = probe_similarity(coverages[faces[first].name].probes, coverages[faces[second].name].probes)
            if similarity is not None and similarity >= min_iou:
                logger.debug("same design: %s and %s (probe IoU %.3f)", faces[first].name, faces[second].name, similarity)
                join(first, second)

    # collect
    members: dict[int, list[int]] = {}
    for index in range(len(faces)):
        members.setdefault(find(index), []).append(index)
    groups = []
    for indices in members.values():
        keys = sorted({faces[index].design for index in indices})
        covered = set()
        for index in indices:
            covered.update(coverages[faces[index].name].code_points.tolist())
        groups.append(DesignGroup(" + ".join(keys), tuple(faces[index].name for index in indices), len(covered)))
    return sorted(groups, key=lambda group: group.name)


# ---------------------------------------------------------------------------------------------
# held-out choice


def holdout_rank(seed: int, group: DesignGroup) -> str:
    """Return the sort key of a group in the held-out ranking: SHA-256 of "SEED:NAME"."""
    return hashlib.sha256(f"{seed}:{group.name}".encode()).hexdigest()


def match_groups(patterns: list[str], groups: list[DesignGroup], option: str) -> list[DesignGroup]:
    """Return the groups whose names contain any pattern, raising HoldoutError for a pattern matching none."""
    chosen = []
    for pattern in patterns:
        matched = [group for group in groups if pattern.lower() in group.name.lower()]
        if not matched:
            names = "; ".join(group.name for group in groups)
            raise HoldoutError(f"{option} {pattern!r} matches no font design group; the groups are: {names}")
        chosen += [group for group in matched if group not in chosen]
    return chosen


def choose_holdout(
    groups: list[DesignGroup],
    seed: int,
    test_count: int,
    val_count: int,
    test_names: list[str] = (),
    val_names: list[str] = (),
    min_coverage: float = 0.9,
) -> dict[str, str]:
    """Return the split of every group, by group name."""
    # named groups
    test = match_groups(list(test_names), groups, "--test-family")
    val = match_groups(list(val_names), groups, "--val-family")
    both = [group.name for group in test if group in val]
    if both:
        raise HoldoutError(f"font design group(s) {', '.join(both)} are named for both val and test; name each once")
    if len(test) + len(val) >= len(groups) and (test or val):
        raise HoldoutError(
            f"the named val and test families take all {len(groups)} font design groups; leave at least one for training"
        )

    # ranked choice among groups with enough coverage
    union = max((group.covered for group in groups), default=0)
    eligible = [group for group in groups if group.covered >= min_coverage * union and group not in test + val]
    eligible.sort(key=lambda group: holdout_rank(seed, group))
    room = max(len(groups) - 1 - len(test) - len(val), 0)  # one group stays for training
    if not test_names:
        test = eligible[: min(test_count, room)]
        eligible = eligible[len(test) :]
        room -= len(test)
        if len(test) < test_count:
            logger.warning(
                "only %d of the %d requested test font groups are available (%d groups, %d cover %.0f%% of the "
                "characters); install more CJK fonts for a stronger test",
                len(test), test_count, len(groups), len(eligible) + len(test), 100 * min_coverage,
            )
    if not val_names:
        val = eligible[: min(val_count, room)]
        if len(val) < val_count:
            logger.warning("only %d of the %d requested val font groups are available", len(val), val_count)

    splits = {group.name: TRAIN for group in groups}
    splits.update({group.name: TEST for group in test})
    splits.update({group.name: VAL for group in val})
    return splits


def split_of_faces(groups: list[DesignGroup], group_splits: dict[str, str]) -> dict[str, str]:
    """Return the split of every face, by face name."""
    return {face: group_splits[group.name] for group in groups for face in group.faces}

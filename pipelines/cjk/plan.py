"""The build plan: which faces draw which character, how often, and in which split.

For each candidate character the faces that cover it are visited train first, then val, then
test (by face name within a split). A face whose probe bitmap of the character equals one
already visited is skipped for that character, so the same glyph is rendered once:

- inside a split this removes repeats such as the JP/KR/SC/TC/HK faces of Noto CJK, which share
  most outlines ("same-glyph" in the counts);
- a val or test glyph equal to a train glyph is dropped ("held-out-glyph-in-train"), so held-out
  samples never repeat a shape the model trained on.

A character is kept when at least `min_faces` distinct train glyphs remain, because a class needs
several shapes to learn from. The others are counted as "too-few-faces". `limit` keeps the first
N kept classes in class-set order.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from pipelines.cjk.fonts import Face
from pipelines.cjk.glyphs import Coverage
from pipelines.cjk.holdout import SPLIT_ORDER, TRAIN


@dataclass(frozen=True)
class FacePlan:
    """One face's part in one character: the face's position in the face list, its split and sample count."""

    face: int
    split: str
    count: int


@dataclass(frozen=True)
class CharacterPlan:
    """Everything the builder renders for one class."""

    character: str
    faces: tuple[FacePlan, ...]


@dataclass
class Plan:
    """The characters to render, in class order, and what was left out."""

    characters: list[CharacterPlan]
    dropped_characters: Counter = field(default_factory=Counter)  # reason -> characters
    skipped_glyphs: Counter = field(default_factory=Counter)  # reason -> (character, face) pairs

    def samples(self) -> Counter:
        """Return the planned sample count per split."""
        counts: Counter = Counter()
        for character in self.characters:
            for face in character.faces:
                counts[face.split] += face.count
        return counts


def hash_table(faces: list[Face], coverages: dict[str, Coverage], candidates: list[int]) -> np.ndarray:
    """Return the (faces, candidates) uint64 table of probe hashes, 0 where a face lacks a character."""
    column = {code_point: index for index, code_point in enumerate(candidates)}
    table = np.zeros((len(faces), len(candidates)), dtype=np.uint64)
    for row, face in enumerate(faces):
        coverage = coverages[face.name]
        columns = np.fromiter((column[code_point] for code_point in coverage.code_points.tolist()), dtype=np.int64)
        table[row, columns] = coverage.hashes
    return table


def build_plan(
    faces: list[Face],
    coverages: dict[str, Coverage],
    face_splits: dict[str, str],
    candidates: list[str],
    images_per_face: int,
    eval_images_per_face: int,
    min_faces: int,
    limit: int = 0,
) -> Plan:
    """Plan the samples of every candidate character; see the module docstring for the rules."""
    code_points = [ord(character) for character in candidates]
    table = hash_table(faces, coverages, code_points)  # (F, N)
    order = sorted(range(len(faces)), key=lambda row: (SPLIT_ORDER.index(face_splits[faces[row].name]), faces[row].name))
    table = table[order]  # rows in visiting order
    splits = [face_splits[faces[row].name] for row in order]

    plan = Plan(characters=[])
    for column, character in enumerate(candidates):
        # visit covering faces, train first, keeping one face per distinct bitmap
        seen: dict[int, str] = {}
        chosen = []
        for position in np.flatnonzero(table[:, column]).tolist():
            digest = int(table[position, column])
            split = splits[position]
            if digest in seen:
                reason = "same-glyph" if seen[digest] == split else "held-out-glyph-in-train"
                plan.skipped_glyphs[reason] += 1
                continue
            seen[digest] = split
            count = images_per_face if split == TRAIN else eval_images_per_face
            chosen.append(FacePlan(order[position], split, count))

        # keep classes with enough distinct train glyphs
        train_glyphs = sum(1 for face in chosen if face.split == TRAIN)
        if train_glyphs < min_faces:
            reason = "not-in-any-face" if not chosen else "too-few-faces"
            plan.dropped_characters[reason] += 1
            continue
        if limit and len(plan.characters) >= limit:
            plan.dropped_characters["over-limit"] += 1
            continue
        plan.characters.append(CharacterPlan(character, tuple(face for face in chosen if face.count > 0)))
    return plan

"""The dataset-directory contract: what `toolkit pack` writes and every other command reads.

    DATASET/
      manifest.json   format version, classes, pack options, per split: samples and shards
                      (name, samples, bytes, sha256), reject and duplicate counts
      classes.txt     one class name per line; line number = label index
      _info.json      the split and shard facts in the form timm's WebDataset reader expects
      rejects.csv     path,reason for every input file that was not packed
      train/ val/ test/   SPLIT-000000.tar ...

Each sample has a dot-free key, unique in the dataset, and three members: `KEY.jpg` (JPEG
bytes), `KEY.cls` (label index as ASCII digits) and `KEY.json` (original path, class name,
width, height, sha256 of the source file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT = "toolkit-dataset"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
CLASSES = "classes.txt"
TIMM_INFO = "_info.json"
REJECTS = "rejects.csv"


class DatasetError(ValueError):
    """A dataset directory that is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class ShardInfo:
    """One tar shard: its path relative to the dataset root, sample count, size and digest."""

    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class SplitInfo:
    """The shards of one split, in order."""

    samples: int
    shards: tuple[ShardInfo, ...]


@dataclass(frozen=True)
class Dataset:
    """A packed dataset directory, validated on load."""

    root: Path
    classes: tuple[str, ...]
    splits: dict[str, SplitInfo]
    pack_options: dict[str, Any] = field(default_factory=dict)
    rejects: dict[str, int] = field(default_factory=dict)
    duplicates: dict[str, int] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> SplitInfo:
        """Return one split, raising DatasetError when the dataset has none of that name."""
        if name not in self.splits:
            raise DatasetError(f"dataset {self.root} has no {name!r} split; it has {sorted(self.splits)}")
        return self.splits[name]

    def shard_urls(self, split: str) -> list[str]:
        """Return the split's shard paths (or URLs when the root is a URL prefix), in order."""
        root = str(self.root).rstrip("/")
        return [f"{root}/{shard.name}" for shard in self.split(split).shards]


def load_dataset(root: str | Path) -> Dataset:
    """Read and validate DATASET/manifest.json and classes.txt."""
    root = Path(root)
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise DatasetError(
            f"{manifest_path} not found; DATASET must be a directory written by `toolkit pack` "
            "(the manifest is written last, so a pack that did not finish has none)"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise DatasetError(f"invalid JSON in {manifest_path}: {error}") from None

    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise DatasetError(
            f"{manifest_path} has format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"this toolkit reads {FORMAT!r} version {FORMAT_VERSION}. Repack the dataset with this version."
        )

    classes = tuple(manifest["classes"])
    classes_path = root / CLASSES
    if classes_path.is_file():
        listed = tuple(classes_path.read_text(encoding="utf-8").splitlines())
        if listed != classes:
            raise DatasetError(f"{classes_path} does not match the class list in {manifest_path}; repack the dataset")

    splits = {}
    for name, split in manifest["splits"].items():
        shards = tuple(ShardInfo(**shard) for shard in split["shards"])
        counted = sum(shard.samples for shard in shards)
        if counted != split["samples"]:
            raise DatasetError(
                f"{manifest_path}: split {name!r} lists {split['samples']} samples but its shards hold {counted}"
            )
        splits[name] = SplitInfo(samples=split["samples"], shards=shards)

    return Dataset(
        root=root,
        classes=classes,
        splits=splits,
        pack_options=manifest.get("pack_options", {}),
        rejects=manifest.get("rejects", {}),
        duplicates=manifest.get("duplicates", {}),
    )


def read_classes(path: str | Path) -> list[str]:
    """Read a class list with one name per line, rejecting blank lines and duplicates."""
    path = Path(path)
    names = path.read_text(encoding="utf-8").splitlines()
    seen: dict[str, int] = {}
    for number, name in enumerate(names, start=1):
        if not name.strip():
            raise DatasetError(f"{path}:{number}: empty class name; remove the blank line")
        if name in seen:
            raise DatasetError(f"{path}:{number}: class {name!r} repeats line {seen[name]}")
        seen[name] = number
    return names

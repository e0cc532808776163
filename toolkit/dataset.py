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

A dataset can also be read, never written, from an http(s) URL prefix or a `pipe:` command
(toolkit.sources): `load_dataset` then reads manifest.json and classes.txt through that source,
and `Dataset.shard_urls` gives the shards' URLs or commands.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.sources import SourceError, check_root, is_url, read_source_bytes, source_url

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
    """A packed dataset, validated on load."""

    root: Path | str  # a local directory, or an http(s) URL prefix or pipe: command (toolkit.sources)
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
        """Return the split's shard paths, URLs or `pipe:` commands, in order."""
        return [source_url(self.root, shard.name) for shard in self.split(split).shards]


def load_dataset(root: str | Path) -> Dataset:
    """Read and validate manifest.json and classes.txt of a dataset.

    ROOT is a directory, an http(s) URL prefix or a `pipe:` command with `{}` for the file's
    path (toolkit.sources describes the forms). A URL root stays a string in `Dataset.root`.
    """
    root = dataset_root(root)

    # manifest
    manifest_where = _where(root, MANIFEST)
    manifest_text = _read_text(root, MANIFEST, optional=False)
    try:
        manifest = json.loads(manifest_text)
    except json.JSONDecodeError as error:
        raise DatasetError(f"invalid JSON in {manifest_where}: {error}") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise DatasetError(
            f"{manifest_where} has format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"this toolkit reads {FORMAT!r} version {FORMAT_VERSION}. Repack the dataset with this version."
        )

    # class list, checked against classes.txt when there is one
    classes = tuple(manifest["classes"])
    listed_text = _read_text(root, CLASSES, optional=True)
    if listed_text is not None and tuple(listed_text.splitlines()) != classes:
        raise DatasetError(
            f"{_where(root, CLASSES)} does not match the class list in {manifest_where}; repack the dataset"
        )

    # splits and their shards
    splits = {}
    for name, split in manifest["splits"].items():
        shards = tuple(ShardInfo(**shard) for shard in split["shards"])
        counted = sum(shard.samples for shard in shards)
        if counted != split["samples"]:
            raise DatasetError(
                f"{manifest_where}: split {name!r} lists {split['samples']} samples but its shards hold {counted}"
            )
        for shard in shards:
            _check_shard_name(root, shard.name, manifest_where)
        splits[name] = SplitInfo(samples=split["samples"], shards=shards)

    return Dataset(
        root=root,
        classes=classes,
        splits=splits,
        pack_options=manifest.get("pack_options", {}),
        rejects=manifest.get("rejects", {}),
        duplicates=manifest.get("duplicates", {}),
    )


def dataset_root(root: str | Path) -> str | Path:
    """Return a URL root as its string and anything else as a Path, raising DatasetError for an invalid root."""
    try:
        check_root(root)
    except ValueError as error:
        raise DatasetError(str(error)) from None
    return root if is_url(root) else Path(root)


def _where(root: str | Path, name: str) -> str | Path:
    """Return the path or URL of one file of the dataset, for reading and for messages."""
    return root / name if isinstance(root, Path) else source_url(root, name)


def _read_text(root: str | Path, name: str, optional: bool) -> str | None:
    """Return the UTF-8 text of one file of the dataset, or None when an optional file does not exist.

    Over http a 404 or 410 counts as not existing. A pipe: command that fails raises, because
    its exit status cannot tell a missing file from another failure.
    """
    where = _where(root, name)
    if isinstance(where, Path):
        if where.is_file():
            data = where.read_bytes()
        elif optional:
            return None
        else:
            raise DatasetError(
                f"{where} not found; DATASET must be a directory written by `toolkit pack` "
                "(the manifest is written last, so a pack that did not finish has none)"
            )
    else:
        try:
            data = read_source_bytes(where)
        except SourceError as error:
            if optional and error.not_found:
                return None
            raise DatasetError(
                f"reading {name} of the dataset at {root} failed: {error}. DATASET must be a URL prefix or "
                "pipe: command under which a dataset written by `toolkit pack` lives"
            ) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{where} is not UTF-8 text: {error}") from None


def _check_shard_name(root: str | Path, name: str, manifest_where: str | Path) -> None:
    try:
        source_url(root, name)
    except ValueError as error:
        raise DatasetError(f"{manifest_where}: {error}; repack the dataset") from None


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

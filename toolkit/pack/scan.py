"""Listing of a pack source: an image folder with one sub-folder per class, or a CSV/TSV file.

The scan reads directory entries and CSV rows only, never image bytes. It keeps one
(path, label, split) entry per candidate image in compact arrays, so a source of millions of
files costs little more than the path strings.

Folder sources (SRC/CLASS/.../IMAGE):
- Class names are the sub-folder names, sorted with plain `sorted()` like torchvision's
  `ImageFolder` ("1", "10", "100", "2"). A class file fixes another order, and a folder missing
  from it is an error. An empty class folder still takes a label.
- Images may sit in nested folders inside a class folder. Each directory is read with
  `os.scandir` and sorted by name, so the listing order is the same on every run.
- Some entries are ignored and counted, never packed. These are names starting with "."
  (.DS_Store, ._x.jpg, .ipynb_checkpoints/) and `__MACOSX` folders ("hidden"), files whose
  lower-cased extension is not in IMAGE_EXTENSIONS ("non-image"), and files directly in SRC
  ("outside-class-folder"). Entries that are neither a file nor a folder, such as broken links,
  count as "not-a-file". Hidden top-level folders are not classes, unlike in torchvision's
  `find_classes`.

CSV/TSV sources (a header row, then `path,label[,split]` in any column order):
- The delimiter is a tab for a `.tsv` file and a comma for a `.csv` file. Paths are relative to
  the folder of the file. Rows are not filtered by extension or hidden names, because the file
  lists them on purpose.
- Class names are every non-empty label, sorted like folder names, unless a class file is given.
- A row is rejected, with its line number in the reason, for one of these reasons:
  "malformed-row" (the wrong number of fields), "empty-path", "empty-label", "invalid-split"
  (a split other than train, val, test or empty), "missing-file", or "conflicting-duplicate"
  (other rows list the same path with a different label or split). Every row of a conflicting
  path is rejected, because none of them can be trusted. Exact repeats of a row are packed
  once and counted as repeated rows.
"""

from __future__ import annotations

import csv
import logging
import os
import posixpath
from array import array
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.dataset import SPLITS, DatasetError, read_classes
from toolkit.pack import PackError
from toolkit.pack.images import IMAGE_EXTENSIONS

logger = logging.getLogger(__name__)

# Split code of an entry that the split stage assigns; other codes index SPLITS.
AUTO_SPLIT = -1

CSV_COLUMNS = ("path", "label", "split")


@dataclass(frozen=True)
class Reject:
    """An input file or CSV row that was not packed: its path, a short reason code and detail."""

    path: str
    reason: str
    detail: str = ""

    def csv_reason(self) -> str:
        """Return the rejects.csv reason: the code, then the detail after a colon when there is one."""
        return f"{self.reason}: {self.detail}" if self.detail else self.reason


@dataclass
class Listing:
    """The candidate images of a source, one entry per index across `paths`, `labels`, `splits`."""

    kind: str  # "folder" or "csv"
    root: Path  # entry paths are relative to this folder
    classes: list[str]
    paths: list[str] = field(default_factory=list)
    labels: array = field(default_factory=lambda: array("i"))
    splits: array = field(default_factory=lambda: array("b"))  # AUTO_SPLIT or an index into SPLITS
    rejects: list[Reject] = field(default_factory=list)
    ignored: Counter = field(default_factory=Counter)
    repeated_rows: int = 0

    def __len__(self) -> int:
        return len(self.paths)

    def add(self, path: str, label: int, split: int = AUTO_SPLIT) -> None:
        self.paths.append(path)
        self.labels.append(label)
        self.splits.append(split)


def scan_source(src: Path, classes_file: Path | None = None) -> Listing:
    """List SRC, a class-per-folder tree or a .csv/.tsv file, in a deterministic order."""
    class_order = load_class_order(classes_file)
    if src.is_dir():
        listing = scan_folder(src, class_order, classes_file)
    elif src.is_file() and src.suffix.lower() in (".csv", ".tsv"):
        listing = scan_csv(src, class_order, classes_file)
    elif src.is_file():
        raise PackError(
            f"unsupported source file {src}; SRC must be a folder with one sub-folder per class "
            "or a .csv/.tsv file with a path,label[,split] header"
        )
    else:
        raise PackError(f"source {src} not found; pass a folder with one sub-folder per class or a .csv/.tsv file")

    logger.info(
        "found %d candidate images in %d classes in %s (%d rows or files rejected, %d ignored)",
        len(listing),
        len(listing.classes),
        src,
        len(listing.rejects),
        sum(listing.ignored.values()),
    )
    return listing


def load_class_order(classes_file: Path | None) -> list[str] | None:
    """Read the class file that fixes label order, or return None for sorted names."""
    if classes_file is None:
        return None
    try:
        names = read_classes(classes_file)
    except FileNotFoundError:
        raise PackError(f"class file {classes_file} not found") from None
    except DatasetError as error:
        raise PackError(str(error)) from None
    if not names:
        raise PackError(f"class file {classes_file} is empty; list one class name per line")
    return names


def is_hidden(name: str) -> bool:
    """Return True for names that pack skips: dot files and folders, and macOS `__MACOSX` folders."""
    return name.startswith(".") or name == "__MACOSX"


# ---------------------------------------------------------------------------------------------
# folder sources


def scan_folder(root: Path, class_order: list[str] | None, classes_file: Path | None) -> Listing:
    """List ROOT/CLASS/**/IMAGE, one class per sub-folder of ROOT."""
    folders = list_class_folders(root)
    listing = Listing(kind="folder", root=root, classes=list(class_order or folders.names))

    # every folder must have a label
    label_of = {name: label for label, name in enumerate(listing.classes)}
    unknown = [name for name in folders.names if name not in label_of]
    if unknown:
        raise PackError(
            f"class folder(s) {', '.join(repr(name) for name in unknown[:5])} in {root} are not in "
            f"the class file {classes_file} ({len(unknown)} in all); add them to the file or move them out of SRC"
        )
    listing.ignored.update(folders.ignored)

    # walk each class folder in label order
    for name in folders.names:
        top = root / name
        for path in iter_image_files(top, name, listing.ignored, frozenset({_identity(top)})):
            listing.add(path, label_of[name])
    return listing


@dataclass
class ClassFolders:
    """The class folder names in SRC, sorted, and the counts of top-level entries skipped."""

    names: list[str]
    ignored: Counter


def list_class_folders(root: Path) -> ClassFolders:
    """Return the sorted class folder names of ROOT and count what else sits there."""
    names = []
    ignored: Counter = Counter()
    with open_folder(root) as entries:
        for entry in entries:
            if is_hidden(entry.name):
                ignored["hidden"] += 1
            elif entry.is_dir():
                names.append(entry.name)
            else:
                ignored["outside-class-folder"] += 1
    return ClassFolders(sorted(names), ignored)


def iter_image_files(folder: Path, prefix: str, ignored: Counter, ancestors: frozenset) -> Iterator[str]:
    """Yield the paths (relative to SRC, "/"-separated) of candidate images under FOLDER.

    `ancestors` contains the (device, inode) of the folders above, so a link back to one of them
    is skipped instead of recursing forever.
    """
    with open_folder(folder) as iterator:
        entries = sorted(iterator, key=lambda entry: entry.name)
    for entry in entries:
        if is_hidden(entry.name):
            ignored["hidden"] += 1
            continue
        relative = f"{prefix}/{entry.name}"
        if entry.is_dir():
            identity = _identity(Path(entry.path))
            if identity in ancestors:
                logger.warning("skipping %s: it links back to a folder above it", relative)
                ignored["link-loop"] += 1
                continue
            yield from iter_image_files(Path(entry.path), relative, ignored, ancestors | {identity})
        elif entry.is_file():
            if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                yield relative
            else:
                ignored["non-image"] += 1
        else:
            ignored["not-a-file"] += 1


@contextmanager
def open_folder(folder: Path) -> Iterator[Iterator[os.DirEntry]]:
    """Yield `os.scandir(folder)`, raising PackError that names the folder when it cannot be read."""
    try:
        iterator = os.scandir(folder)
    except OSError as error:
        raise PackError(
            f"cannot read folder {folder}: {error.strerror}; fix its permissions or move it out of SRC"
        ) from None
    with iterator:
        yield iterator


def _identity(folder: Path) -> tuple[int, int]:
    status = folder.stat()
    return status.st_dev, status.st_ino


# ---------------------------------------------------------------------------------------------
# CSV sources


def scan_csv(path: Path, class_order: list[str] | None, classes_file: Path | None) -> Listing:
    """List the rows of a CSV/TSV file with a header naming path, label and optionally split."""
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    rows = CsvRows(path, class_order, classes_file)
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file, delimiter=delimiter)
            header = next(reader, None)
            rows.set_header(header)
            for fields in reader:
                if fields and any(value.strip() for value in fields):
                    rows.add(reader.line_num, fields)
    except UnicodeDecodeError as error:
        raise PackError(f"{path} is not UTF-8 text ({error}); save it as UTF-8") from None
    except csv.Error as error:
        raise PackError(f"{path}: invalid CSV ({error})") from None
    return rows.finish()


class CsvRows:
    """Collects CSV rows into a Listing, rejecting bad rows and merging repeated paths."""

    def __init__(self, path: Path, class_order: list[str] | None, classes_file: Path | None) -> None:
        self.path = path
        self.root = path.parent
        self.classes_file = classes_file
        self.class_order = class_order
        # labels are numbered in order of first appearance until finish() maps them to classes
        self.label_numbers: dict[str, int] = {}
        if class_order is not None:
            self.label_numbers = {name: label for label, name in enumerate(class_order)}
        self.listing = Listing(kind="csv", root=self.root, classes=[])
        self.rejects: list[tuple[int, Reject]] = []
        self.seen: dict[str, int] = {}  # path -> entry index, or -1 for a missing file
        self.lines = array("i")  # CSV line of each entry
        self.repeats: dict[str, list[int]] = {}  # path -> lines of every row, for repeated paths
        self.conflicting: set[str] = set()
        self.columns: dict[str, int] = {}

    def set_header(self, header: list[str] | None) -> None:
        """Map column names to positions, raising PackError on a missing or unknown column."""
        if not header:
            raise PackError(f"{self.path} is empty; it needs a header row such as path,label,split")
        names = [name.strip().lower() for name in header]
        unknown = [name for name in names if name not in CSV_COLUMNS]
        missing = [name for name in ("path", "label") if name not in names]
        if unknown or missing or len(set(names)) != len(names):
            raise PackError(
                f"{self.path}: invalid header {','.join(header)!r}; expected the columns path,label "
                "and optionally split, in any order"
            )
        self.columns = {name: index for index, name in enumerate(names)}

    def add(self, line: int, fields: list[str]) -> None:
        """Add one data row, or record why it is rejected."""
        if len(fields) != len(self.columns):
            self.reject(line, "", "malformed-row", f"line {line} has {len(fields)} fields, the header {len(self.columns)}")
            return
        path = fields[self.columns["path"]].strip()
        label = fields[self.columns["label"]].strip()
        split_name = fields[self.columns["split"]].strip() if "split" in self.columns else ""

        # row fields
        if not path:
            self.reject(line, "", "empty-path", f"line {line} has no path")
            return
        path = posixpath.normpath(path)
        if not label:
            self.reject(line, path, "empty-label", f"line {line} has no label")
            return
        label_number = self.number_label(label, line)
        if split_name and split_name not in SPLITS:
            self.reject(line, path, "invalid-split", f"line {line} has split {split_name!r}; use train, val, test or leave it empty")
            return
        split = SPLITS.index(split_name) if split_name else AUTO_SPLIT

        # repeated paths
        index = self.seen.get(path)
        if index is not None:
            self.repeats.setdefault(path, [self.lines[index]] if index >= 0 else []).append(line)
            if index < 0:
                self.reject(line, path, "missing-file", f"line {line}; file not found in {self.root}")
            elif (self.listing.labels[index], self.listing.splits[index]) != (label_number, split):
                self.conflicting.add(path)
            return

        # new paths
        if not os.path.isfile(os.path.join(self.root, path)):
            self.seen[path] = -1
            self.reject(line, path, "missing-file", f"line {line}; file not found in {self.root}")
            return
        self.seen[path] = len(self.listing)
        self.lines.append(line)
        self.listing.add(path, label_number, split)

    def number_label(self, label: str, line: int) -> int:
        number = self.label_numbers.get(label)
        if number is not None:
            return number
        if self.class_order is not None:
            raise PackError(
                f"{self.path}:{line}: label {label!r} is not in the class file {self.classes_file}; "
                "add it to the file or fix the row"
            )
        number = self.label_numbers[label] = len(self.label_numbers)
        return number

    def reject(self, line: int, path: str, reason: str, detail: str) -> None:
        self.rejects.append((line, Reject(path, reason, detail)))

    def finish(self) -> Listing:
        """Drop conflicting paths, map label numbers to sorted classes and return the listing."""
        old = self.listing

        # classes, in file order or sorted
        if self.class_order is not None:
            classes = list(self.class_order)
            class_of_number = list(range(len(classes)))
        else:
            classes = sorted(self.label_numbers)
            label_of = {name: label for label, name in enumerate(classes)}
            names_by_number = sorted(self.label_numbers, key=self.label_numbers.__getitem__)
            class_of_number = [label_of[name] for name in names_by_number]

        # entries without conflicts; repeats of a kept path are counted once
        listing = Listing(kind="csv", root=self.root, classes=classes)
        for index, path in enumerate(old.paths):
            if path in self.conflicting:
                continue
            listing.add(path, class_of_number[old.labels[index]], old.splits[index])
        for path, lines in self.repeats.items():
            if path in self.conflicting:
                listed = ", ".join(str(line) for line in lines)
                for line in lines:
                    detail = f"line {line}; lines {listed} list this path with different labels or splits"
                    self.reject(line, path, "conflicting-duplicate", detail)
            elif self.seen[path] >= 0:
                listing.repeated_rows += len(lines) - 1

        listing.rejects = [reject for _, reject in sorted(self.rejects, key=lambda item: item[0])]
        return listing

"""Deterministic tar shards, the resume state of finished shards, and the dataset's index files.

Shards: OUT/SPLIT/SPLIT-000000.tar, in ustar format. Every member has mtime 0, uid and gid 0,
empty user and group names and mode 0o644, and each sample's members come in the order
KEY.cls, KEY.jpg, KEY.json, so the same samples always give the same bytes.

A split's shard order is cut into blocks of `shard_max_samples` positions before packing starts,
and each block becomes one shard, written whole by one worker process. So the output does not
depend on which worker packs which block, and a rejected file leaves its block's shard one
sample short instead of moving every later sample. A block whose samples pass `shard_max_bytes`
(the size of the finished tar file, padding included) closes its shard before the sample that
would pass it and goes on in another. A single sample larger than `shard_max_bytes` gets a shard
of its own. A worker writes each shard as SPLIT/SPLIT-at-POSITION.tar.partial, and the main
process records it and renames it to the next shard name of the split.

Resume state, OUT/.pack-state/ (kept after a run, so a rerun of a finished pack only checks):
- options.json: the pack options and a digest of the plan (every path, label and content hash
  in shard order). A rerun with other options or another plan does not resume.
- segments.jsonl: one line per finished shard with the split positions it consumed
  [start, end), its ShardInfo and the files rejected in that range. A block whose files were
  all rejected ends with a segment without a shard.
A rerun keeps each split's finished shards while their size and sha256 match the record, and
packs the rest from the end of the last one kept.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.dataset import CLASSES, FORMAT, FORMAT_VERSION, MANIFEST, REJECTS, SPLITS, TIMM_INFO, ShardInfo
from toolkit.pack.images import PackedImage
from toolkit.pack.scan import Reject

logger = logging.getLogger(__name__)

STATE_DIR = ".pack-state"
STATE_OPTIONS = "options.json"
STATE_SEGMENTS = "segments.jsonl"
PARTIAL_SUFFIX = ".partial"
MEMBER_ORDER = ("cls", "jpg", "json")


def shard_name(split: str, index: int) -> str:
    """Return the shard path relative to OUT, such as "train/train-000000.tar"."""
    return f"{split}/{split}-{index:06d}.tar"


def block_shard_name(split: str, position: int) -> str:
    """Return the name, relative to OUT, under which a worker writes the shard that starts at POSITION.

    The file itself is NAME.partial until the main process renames it to a `shard_name`.
    """
    return f"{split}/{split}-at-{position:09d}.tar"


def is_shard_file(split: str, name: str) -> bool:
    """Return True for file names that pack writes in a split folder, finished or partial."""
    finished = rf"{re.escape(split)}-\d{{6,}}\.tar({re.escape(PARTIAL_SUFFIX)})?"
    partial = rf"{re.escape(split)}-at-\d{{9,}}\.tar{re.escape(PARTIAL_SUFFIX)}"
    return re.fullmatch(finished, name) is not None or re.fullmatch(partial, name) is not None


def sample_key(split: str, position: int) -> str:
    """Return the dot-free key of the sample at POSITION of SPLIT, unique in the dataset."""
    return f"{split}_{position:09d}"


# ---------------------------------------------------------------------------------------------
# samples and tar files


@dataclass(frozen=True)
class Sample:
    """The members of one sample, in tar order."""

    key: str
    members: tuple[tuple[str, bytes], ...]  # (extension, data)

    @property
    def tar_bytes(self) -> int:
        """Size in the tar file: a 512-byte header per member plus its data padded to 512 bytes."""
        return sum(tarfile.BLOCKSIZE + _round_up(len(data), tarfile.BLOCKSIZE) for _, data in self.members)


def encode_sample(key: str, label: int, class_name: str, path: str, sha256: str, image: PackedImage) -> Sample:
    """Build the KEY.cls, KEY.jpg and KEY.json members of one sample."""
    meta = {"path": path, "class": class_name, "width": image.width, "height": image.height, "sha256": sha256}
    members = {
        "cls": str(label).encode("ascii"),
        "jpg": image.jpeg,
        "json": json.dumps(meta, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8"),
    }
    return Sample(key, tuple((extension, members[extension]) for extension in MEMBER_ORDER))


def archive_bytes(member_bytes: int) -> int:
    """Return the size of a tar file whose members take MEMBER_BYTES, with tarfile's end padding."""
    return _round_up(member_bytes + 2 * tarfile.BLOCKSIZE, tarfile.RECORDSIZE)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class _HashingFile:
    """A write-only file wrapper that keeps the sha256 and length of what passes through."""

    def __init__(self, file: io.BufferedWriter) -> None:
        self.file = file
        self.digest = hashlib.sha256()
        self.length = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.length += len(data)
        return self.file.write(data)

    def tell(self) -> int:
        return self.length


def ustar_header(name: str, size: int) -> bytes:
    """Return the 512-byte ustar header of a regular file as pack writes it.

    The bytes equal what `tarfile` writes in USTAR_FORMAT for a TarInfo with mode 0o644, uid and
    gid 0, empty user and group names and mtime 0. Building them directly is faster than
    tarfile's generic header code, which cost about as much as the decode in passthrough packing.
    """
    encoded = name.encode("utf-8")
    if len(encoded) > 100:
        raise ValueError(f"tar member name {name!r} is longer than the 100 bytes of a ustar header")
    header = bytearray(
        encoded.ljust(100, b"\0")
        + b"0000644\0" + b"0000000\0" + b"0000000\0"  # mode, uid, gid
        + b"%011o\0" % size + b"00000000000\0"  # size, mtime
        + b"        "  # checksum placeholder: eight spaces while summing
        + b"0" + b"\0" * 100  # type flag (regular file), link name
        + b"ustar\x0000" + b"\0" * 32 + b"\0" * 32  # magic and version, user and group names
        + b"\0" * 16 + b"\0" * 155  # device numbers (unset for regular files), name prefix
    ).ljust(tarfile.BLOCKSIZE, b"\0")
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header)


class ShardFile:
    """One tar shard being written under a temporary name, OUT/NAME.partial."""

    def __init__(self, out: Path, name: str) -> None:
        self.out = out
        self.name = name
        self.path = out / name
        self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.partial, "wb", buffering=1 << 20)
        self.hashing = _HashingFile(self.file)
        self.samples = 0
        self.member_bytes = 0

    def add(self, sample: Sample) -> None:
        for extension, data in sample.members:
            padding = _round_up(len(data), tarfile.BLOCKSIZE) - len(data)
            self.hashing.write(ustar_header(f"{sample.key}.{extension}", len(data)))
            self.hashing.write(data)
            self.hashing.write(b"\0" * padding)
        self.samples += 1
        self.member_bytes += sample.tar_bytes

    def close(self, rename: bool = True) -> ShardInfo:
        """Finish the tar file, sync it to disk and rename it to NAME.

        With `rename` False the file keeps its temporary name, for the main process to record
        and rename (see `commit_segment`).
        """
        # tarfile's end of archive: two zero blocks, then zeros up to a whole record
        end = archive_bytes(self.member_bytes) - self.member_bytes
        self.hashing.write(b"\0" * end)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        info = ShardInfo(name=self.name, samples=self.samples, bytes=self.hashing.length, sha256=self.hashing.digest.hexdigest())
        if rename:
            os.replace(self.partial, self.path)
        return info


# ---------------------------------------------------------------------------------------------
# segments: finished shards and the split positions they consumed


@dataclass
class Segment:
    """A finished range [start, end) of a split's order: its shard (if any) and its rejects."""

    split: str
    start: int
    end: int
    shard: ShardInfo | None
    rejects: list[tuple[int, Reject]] = field(default_factory=list)  # (position, reject)

    def to_json(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "start": self.start,
            "end": self.end,
            "shard": dataclasses.asdict(self.shard) if self.shard else None,
            "rejects": [[position, r.path, r.reason, r.detail] for position, r in self.rejects],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Segment:
        return cls(
            split=data["split"],
            start=data["start"],
            end=data["end"],
            shard=ShardInfo(**data["shard"]) if data["shard"] else None,
            rejects=[(position, Reject(path, reason, detail)) for position, path, reason, detail in data["rejects"]],
        )


class PackState:
    """OUT/.pack-state: the options and plan of the current pack and its finished segments."""

    def __init__(self, out: Path) -> None:
        self.dir = out / STATE_DIR

    def read_options(self) -> dict[str, Any] | None:
        """Return {"options": ..., "plan": ...} from the last run, or None when there is none."""
        path = self.dir / STATE_OPTIONS
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            logger.warning("ignoring unreadable %s", path)
            return None

    def write_options(self, options: dict[str, Any], plan: str | None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_atomic(self.dir / STATE_OPTIONS, json_bytes({"options": options, "plan": plan}))

    def read_segments(self) -> list[Segment]:
        """Return the recorded segments; a last line cut short by a crash is dropped."""
        path = self.dir / STATE_SEGMENTS
        if not path.exists():
            return []
        segments = []
        for line in path.read_text().splitlines():
            try:
                segments.append(Segment.from_json(json.loads(line)))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                logger.warning("ignoring a damaged line in %s and everything after it", path)
                break
        return segments

    def write_segments(self, segments: list[Segment]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(segment.to_json()) + "\n" for segment in segments)
        write_atomic(self.dir / STATE_SEGMENTS, text.encode())

    def append_segment(self, segment: Segment) -> None:
        with open(self.dir / STATE_SEGMENTS, "a") as file:
            file.write(json.dumps(segment.to_json()) + "\n")
            file.flush()
            os.fsync(file.fileno())

    def clear(self) -> None:
        for name in (STATE_OPTIONS, STATE_SEGMENTS):
            (self.dir / name).unlink(missing_ok=True)


def keep_finished(out: Path, segments: list[Segment]) -> dict[str, list[Segment]]:
    """Return, per split, the recorded segments that continue each other and whose shards check out.

    A segment is kept when it starts where the previous one ended, its shard has the next
    index, and the file on disk has the recorded size and sha256. The first segment that fails
    ends its split's list. Shard files of a split that are not kept are deleted.
    """
    kept: dict[str, list[Segment]] = {split: [] for split in SPLITS}
    stopped: set[str] = set()
    for segment in segments:
        if segment.split not in kept or segment.split in stopped:
            continue
        previous = kept[segment.split]
        start = previous[-1].end if previous else 0
        shards = sum(1 for done in previous if done.shard)
        if segment.start != start or not _shard_matches(out, segment, shards):
            stopped.add(segment.split)
            continue
        previous.append(segment)

    # files that no kept segment names are leftovers of an interrupted run
    for split in SPLITS:
        names = {segment.shard.name for segment in kept[split] if segment.shard}
        folder = out / split
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if is_shard_file(split, path.name) and f"{split}/{path.name}" not in names:
                logger.debug("removing unfinished or unrecorded shard %s", path)
                path.unlink()
    return kept


def _shard_matches(out: Path, segment: Segment, index: int) -> bool:
    if segment.shard is None:
        return True
    if segment.shard.name != shard_name(segment.split, index):
        return False
    path = out / segment.shard.name
    if not path.is_file() or path.stat().st_size != segment.shard.bytes:
        logger.warning("shard %s is missing or has another size than recorded; packing it again", path)
        return False
    if file_sha256(path) != segment.shard.sha256:
        logger.warning("shard %s has another sha256 than recorded; packing it again", path)
        return False
    return True


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# writing one block


def block_bounds(start: int, length: int, max_samples: int) -> list[tuple[int, int]]:
    """Return the blocks [begin, end) that cover positions START to LENGTH of a split.

    Blocks are fixed by position: block k covers [k * max_samples, (k + 1) * max_samples), so a
    resumed run that starts inside a block packs the rest of that block first.
    """
    bounds = []
    begin = start
    while begin < length:
        end = min((begin // max_samples + 1) * max_samples, length)
        bounds.append((begin, end))
        begin = end
    return bounds


class BlockWriter:
    """Writes the samples of one block into shards under temporary names, in a worker process.

    `finish` returns the block's segments; each names its shard by the temporary path, which
    `commit_segment` in the main process records and renames.
    """

    def __init__(self, out: Path, split: str, start: int, max_bytes: int) -> None:
        self.out = out
        self.split = split
        self.max_bytes = max_bytes
        self.start = start
        self.segments: list[Segment] = []
        self.shard: ShardFile | None = None
        self.rejects: list[tuple[int, Reject]] = []

    def add(self, position: int, sample: Sample) -> None:
        """Write the sample at POSITION, first closing the open shard if the sample would not fit."""
        if self.shard is not None and not self._fits(sample):
            self._close_segment(end=position)
        if self.shard is None:
            self.shard = ShardFile(self.out, block_shard_name(self.split, position))
            if archive_bytes(sample.tar_bytes) > self.max_bytes:
                logger.warning(
                    "sample %s takes %d bytes, more than shard_max_bytes %d; it gets a shard of its own",
                    sample.key, sample.tar_bytes, self.max_bytes,
                )
        self.shard.add(sample)

    def reject(self, position: int, reject: Reject) -> None:
        self.rejects.append((position, reject))

    def finish(self, end: int) -> list[Segment]:
        """Close the last segment at END, the end of the block, and return the block's segments."""
        if self.shard is not None or self.rejects:
            self._close_segment(end)
        return self.segments

    def _fits(self, sample: Sample) -> bool:
        """Return True when the open shard can take SAMPLE within shard_max_bytes."""
        shard = self.shard
        assert shard is not None
        return archive_bytes(shard.member_bytes + sample.tar_bytes) <= self.max_bytes

    def _close_segment(self, end: int) -> None:
        info = None if self.shard is None else self.shard.close(rename=False)
        self.segments.append(Segment(self.split, self.start, end, info, self.rejects))
        self.shard = None
        self.rejects = []
        self.start = end


def commit_segment(out: Path, state: PackState, segment: Segment, index: int) -> Segment:
    """Record a segment a worker wrote and rename its shard to shard number INDEX of its split.

    Returns the segment with the shard's final name. The record comes before the rename, so
    every finished shard on disk has one.
    """
    if segment.shard is None:
        state.append_segment(segment)
        return segment
    partial = out / (segment.shard.name + PARTIAL_SUFFIX)
    final = dataclasses.replace(segment, shard=dataclasses.replace(segment.shard, name=shard_name(segment.split, index)))
    state.append_segment(final)
    os.replace(partial, out / final.shard.name)
    return final


# ---------------------------------------------------------------------------------------------
# dataset files


def json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def write_atomic(path: Path, data: bytes) -> None:
    """Write PATH through a temporary file in the same folder and os.replace, so readers never see half of it."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def split_shards(segments: list[Segment]) -> list[ShardInfo]:
    return [segment.shard for segment in segments if segment.shard is not None]


def build_manifest(
    classes: list[str],
    options: dict[str, Any],
    segments: dict[str, list[Segment]],
    rejects: dict[str, int],
    duplicates: dict[str, int],
) -> dict[str, Any]:
    """Return the manifest.json document of the dataset contract in toolkit.dataset."""
    splits = {}
    for split in SPLITS:
        shards = split_shards(segments[split])
        splits[split] = {
            "samples": sum(shard.samples for shard in shards),
            "shards": [dataclasses.asdict(shard) for shard in shards],
        }
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "classes": classes,
        "pack_options": options,
        "splits": splits,
        "rejects": dict(sorted(rejects.items())),
        "duplicates": dict(sorted(duplicates.items())),
    }


def build_timm_info(num_classes: int, segments: dict[str, list[Segment]]) -> dict[str, Any]:
    """Return _info.json in the form of timm's WebDataset reader (timm/data/readers/reader_wds.py).

    That reader looks up info["splits"][SPLIT] and reads "num_samples", "filenames" (joined to
    the dataset root) and "shard_lengths" from it.
    """
    splits = {}
    for split in SPLITS:
        shards = split_shards(segments[split])
        splits[split] = {
            "name": split,
            "num_samples": sum(shard.samples for shard in shards),
            "filenames": [shard.name for shard in shards],
            "shard_lengths": [shard.samples for shard in shards],
        }
    return {"name": FORMAT, "num_classes": num_classes, "splits": splits}


def rejects_csv(rejects: list[Reject]) -> bytes:
    """Return rejects.csv: a path,reason header and one row per file or CSV row not packed."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "reason"])
    for reject in rejects:
        writer.writerow([reject.path, reject.csv_reason()])
    return buffer.getvalue().encode("utf-8")


def write_dataset_files(out: Path, manifest: dict[str, Any], timm_info: dict[str, Any]) -> None:
    """Write classes.txt, _info.json and, last, manifest.json, each atomically."""
    write_atomic(out / CLASSES, "".join(f"{name}\n" for name in manifest["classes"]).encode("utf-8"))
    write_atomic(out / TIMM_INFO, json_bytes(timm_info))
    write_atomic(out / MANIFEST, json_bytes(manifest))


OUTPUT_FILES = (MANIFEST, CLASSES, TIMM_INFO, REJECTS)


def clear_output(out: Path) -> None:
    """Delete what pack writes in OUT (index files, shard files, resume state) and nothing else."""
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
        (out / f".{name}.tmp").unlink(missing_ok=True)
    for split in SPLITS:
        folder = out / split
        if folder.is_dir():
            for path in folder.iterdir():
                if is_shard_file(split, path.name):
                    path.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()
    state = PackState(out)
    state.clear()
    for path in (state.dir / f".{STATE_OPTIONS}.tmp", state.dir / f".{STATE_SEGMENTS}.tmp"):
        path.unlink(missing_ok=True)
    if state.dir.is_dir() and not any(state.dir.iterdir()):
        state.dir.rmdir()


def is_output_entry(name: str) -> bool:
    """Return True for the top-level names pack writes in OUT."""
    return name in OUTPUT_FILES or name in SPLITS or name == STATE_DIR or name in {f".{file}.tmp" for file in OUTPUT_FILES}

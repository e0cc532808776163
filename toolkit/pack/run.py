"""Orchestration of `toolkit pack`: scan, hash, split, write shards, then the index files.

Two passes over the files run in worker processes, and both send paths, not bytes, so each
worker reads its own files:
1. hash: sha256 of every candidate file, for splits and duplicate detection;
2. pack: each task is one block of a split's shard order (see toolkit.pack.shards); the worker
   decodes, normalizes and re-encodes its images and writes the block's shard itself. This
   process only records each finished shard and renames it, in order, so it leaves the cores
   to the workers.
Results come back in order through `Pool.imap`, with at most a fixed window of tasks in flight,
so memory stays bounded whatever the number of files. With one worker, both passes run in
this process.

Bad files never stop a run: they are listed in OUT/rejects.csv and counted. With `strict`
any reject fails the run after rejects.csv is written, and no manifest is written.
OUT/rejects.csv is written before the manifest, and the manifest is written last.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from toolkit.config import PackConfig
from toolkit.dataset import MANIFEST, REJECTS, SPLITS
from toolkit.pack import PackError
from toolkit.pack.images import ImageOptions, PackedImage, RejectedImage, normalize_image
from toolkit.pack.report import PackSummary, SplitSummary
from toolkit.pack.scan import Listing, Reject, scan_source
from toolkit.pack.shards import (
    BlockWriter,
    PackState,
    Segment,
    block_bounds,
    build_manifest,
    build_timm_info,
    clear_output,
    commit_segment,
    encode_sample,
    is_output_entry,
    keep_finished,
    rejects_csv,
    sample_key,
    write_atomic,
    write_dataset_files,
)
from toolkit.pack.split import WARN_NAMES, Duplicates, SplitPlan, check_fractions, find_duplicates, plan_splits

logger = logging.getLogger(__name__)

# Version of what pack writes for given input and options; a change refuses to resume old output.
PACK_LAYOUT = 1

# Files per task in the hash pass, and hash tasks in flight per worker.
HASH_CHUNK = 256
CHUNKS_IN_FLIGHT = 4
# Blocks in flight per worker in the pack pass: one being packed and one waiting.
BLOCKS_IN_FLIGHT = 2
# Images a worker packs between updates of the shared progress count.
PROGRESS_EVERY = 16
# Seconds between checks of the workers, and progress updates, while this process waits for a result.
PROGRESS_POLL = 0.2

DUPLICATE = "duplicate"


def run_pack(
    src: str | Path,
    out: str | Path,
    settings: PackConfig,
    show_progress: bool = False,
    console: Console | None = None,
) -> PackSummary:
    """Pack SRC (a class-per-folder tree or a CSV/TSV list) into the dataset directory OUT.

    Reruns with the same options resume: finished shards are kept and the result is the same,
    byte for byte, as an uninterrupted run. `console` is where the progress bar goes when
    `show_progress` is set (a new stderr console when None).
    """
    started = time.monotonic()
    src, out = Path(src), Path(out)

    # settings and paths
    check_settings(settings)
    check_paths(src, out)
    options = pack_options(settings)
    workers = settings.workers or os.cpu_count() or 1

    # output folder: new, resumed or refused
    prepare_output(out, options, settings.overwrite)
    state = PackState(out)

    # scan
    listing = scan_source(src, settings.classes_file)
    if len(listing) == 0:
        raise PackError(no_images_message(src, listing))

    packed = multiprocessing.Value("q", 0)  # images packed so far, counted by the workers
    with (
        removing_partial_shards(out),
        worker_pool(workers, ImageOptions.from_config(settings), packed) as pool,
        open_progress(show_progress, console) as progress,
    ):
        # pass 1: content hashes
        hashes = hash_entries(listing, pool, workers, progress)

        # duplicates, splits and shard order
        labels = np.array(listing.labels, dtype=np.int64)
        duplicates = find_duplicates(hashes.shas, labels, hashes.valid, len(listing.classes))
        plan = plan_splits(
            hashes.shas,
            labels,
            np.array(listing.splits, dtype=np.int8),
            listing.paths,
            duplicates,
            listing.classes,
            settings.val_fraction,
            settings.test_fraction,
            settings.split_seed,
            settings.shuffle_seed,
        )
        warn_cross_class(listing, duplicates)

        # resume what an earlier run with the same plan finished
        digest = plan_digest(listing, labels, hashes.shas, plan)
        finished = resume_segments(out, state, options, digest, settings.overwrite)

        # pass 2: shards
        planned = sum(len(order) for order in plan.order.values())
        logger.info("packing %d images into %s with %d worker(s)", planned, out, workers)
        segments = write_shards(
            out, listing, labels, hashes.shas, plan, finished, settings, state, pool, workers, packed, progress
        )

    # rejects.csv, then the index files with the manifest last
    rejects = listing.rejects + hashes.rejects + duplicate_rejects(listing, duplicates)
    rejects += [reject for split in SPLITS for segment in segments[split] for _, reject in segment.rejects]
    write_atomic(out / REJECTS, rejects_csv(rejects))
    reject_counts = dict(Counter(reject.reason for reject in rejects if reject.reason != DUPLICATE))
    duplicate_counts = count_duplicates(listing, duplicates)
    failure = ""
    if settings.strict and reject_counts:
        failure = (
            f"{sum(reject_counts.values())} input files or rows were rejected and strict is set, so no manifest "
            f"was written; see {out / REJECTS}, fix or remove them and run pack again"
        )
        logger.error("%s", failure)
    else:
        manifest = build_manifest(listing.classes, options, segments, reject_counts, duplicate_counts)
        write_dataset_files(out, manifest, build_timm_info(len(listing.classes), segments))

    # summary
    summary = summarize(src, out, listing, labels, duplicates, plan, segments, reject_counts, duplicate_counts, finished)
    summary.seconds = time.monotonic() - started
    summary.failed = bool(failure)
    summary.failure = failure
    if summary.empty_classes:
        names = ", ".join(summary.empty_classes[:WARN_NAMES])
        more = ", ..." if len(summary.empty_classes) > WARN_NAMES else ""
        logger.warning("classes without a packed image (%d): %s%s", len(summary.empty_classes), names, more)
    return summary


# ---------------------------------------------------------------------------------------------
# settings, paths and the output folder


def check_settings(settings: PackConfig) -> None:
    """Raise PackError for option values that pack cannot use."""
    check_fractions(settings.val_fraction, settings.test_fraction)
    if settings.shard_max_samples < 1:
        raise PackError(f"invalid shard_max_samples {settings.shard_max_samples}; use 1 or more")
    minimum_bytes = 2 * 10240  # an empty tar file takes 10240 bytes
    if settings.shard_max_bytes < minimum_bytes:
        raise PackError(f"invalid shard_max_bytes {settings.shard_max_bytes}; use at least {minimum_bytes}")
    if settings.workers < 0:
        raise PackError(f"invalid workers {settings.workers}; use 0 for one per core, or a positive count")
    if settings.resize != "keep" and settings.size < 1:
        raise PackError(f"resize {settings.resize!r} needs a size in pixels; pass --size")
    if not 1 <= settings.jpeg_quality <= 100:
        raise PackError(f"invalid jpeg_quality {settings.jpeg_quality}; use 1 to 100")


def check_paths(src: Path, out: Path) -> None:
    """Raise PackError unless SRC exists and OUT neither contains SRC nor sits inside a folder SRC."""
    if not src.exists():
        raise PackError(f"source {src} not found")
    src_real, out_real = src.resolve(), out.resolve()
    if src_real.is_relative_to(out_real):
        raise PackError(f"OUT {out} contains SRC {src}; pack never writes into its source, so choose another OUT")
    if src.is_dir() and out_real.is_relative_to(src_real):
        raise PackError(f"OUT {out} is inside SRC {src}; pack never writes into its source, so choose another OUT")


def pack_options(settings: PackConfig) -> dict[str, Any]:
    """Return the options that decide the output bytes, as stored in the manifest and compared on resume."""
    classes_sha256 = None
    if settings.classes_file is not None:
        try:
            classes_sha256 = hashlib.sha256(Path(settings.classes_file).read_bytes()).hexdigest()
        except OSError as error:
            raise PackError(f"cannot read class file {settings.classes_file}: {error.strerror}") from None
    options = {
        "layout": PACK_LAYOUT,
        "classes_file_sha256": classes_sha256,
        "val_fraction": settings.val_fraction,
        "test_fraction": settings.test_fraction,
        "split_seed": settings.split_seed,
        "resize": settings.resize,
        "size": settings.size,
        "jpeg_quality": settings.jpeg_quality,
        "max_pixels": settings.max_pixels,
        "background": list(settings.background),
        "shard_max_samples": settings.shard_max_samples,
        "shard_max_bytes": settings.shard_max_bytes,
        "shuffle_seed": settings.shuffle_seed,
    }
    return json.loads(json.dumps(options))  # the same types as after reading it back


def previous_options(out: Path, state: PackState) -> dict[str, Any] | None:
    """Return the options of the pack in OUT, from its resume state or else its manifest.

    A state without a plan belongs to a run that stopped before writing any shard, so there is
    nothing to keep and it returns None.
    """
    recorded = state.read_options()
    if recorded is not None:
        return recorded.get("options") if recorded.get("plan") else None
    try:
        return json.loads((out / MANIFEST).read_text()).get("pack_options")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def prepare_output(out: Path, options: dict[str, Any], overwrite: bool) -> None:
    """Create OUT, or check that it may be resumed or replaced, and record the options."""
    if out.exists() and not out.is_dir():
        raise PackError(f"OUT {out} is a file; pass a folder for the dataset")
    out.mkdir(parents=True, exist_ok=True)
    state = PackState(out)
    previous = previous_options(out, state)
    foreign = sorted(path.name for path in out.iterdir() if not is_output_entry(path.name))

    if previous is None:
        if foreign and not overwrite:
            raise PackError(
                f"OUT {out} is not empty ({', '.join(foreign[:5])}) and contains no dataset written by toolkit pack; "
                "choose a new or empty folder, or pass --overwrite to write the dataset beside these files"
            )
        clear_output(out)
    elif previous != options:
        if not overwrite:
            raise PackError(
                f"OUT {out} contains a dataset packed with other options ({describe_changes(previous, options)}); "
                "pass --overwrite to replace it, or choose another OUT"
            )
        logger.info("replacing the dataset in %s (--overwrite)", out)
        clear_output(out)
    elif state.read_options() is None:
        # a dataset without resume state cannot be checked shard by shard, so it is packed again
        clear_output(out)
    else:
        logger.info("resuming the pack in %s", out)
        return
    state.write_options(options, plan=None)


def describe_changes(previous: dict[str, Any], current: dict[str, Any]) -> str:
    keys = sorted(set(previous) | set(current))
    changes = [f"{key} {previous.get(key)!r} -> {current.get(key)!r}" for key in keys if previous.get(key) != current.get(key)]
    return ", ".join(changes)


def resume_segments(
    out: Path, state: PackState, options: dict[str, Any], digest: str, overwrite: bool
) -> dict[str, list[Segment]]:
    """Return the finished segments to keep, per split, after checking the plan digest."""
    recorded = state.read_options() or {}
    plan = recorded.get("plan")
    if plan is not None and plan != digest:
        if not overwrite:
            raise PackError(
                f"the files in SRC changed since OUT {out} was packed (images added, removed, moved or edited); "
                "pass --overwrite to pack OUT again from the start, or choose another OUT"
            )
        logger.info("SRC changed since %s was packed; packing it again (--overwrite)", out)
        clear_output(out)
    segments = state.read_segments() if plan == digest else []

    # the manifest is rewritten at the end; until then OUT must not look complete
    (out / MANIFEST).unlink(missing_ok=True)
    finished = keep_finished(out, segments)
    state.write_options(options, plan=digest)
    state.write_segments([segment for split in SPLITS for segment in finished[split]])
    return finished


def plan_digest(listing: Listing, labels: np.ndarray, shas: np.ndarray, plan: SplitPlan) -> str:
    """Return a sha256 over the classes and every (path, label, content hash) in shard order."""
    digest = hashlib.sha256(json.dumps(listing.classes).encode())
    for split in SPLITS:
        digest.update(f"\n{split}\n".encode())
        for entry in plan.order[split].tolist():
            digest.update(f"{listing.paths[entry]}\0{labels[entry]}\0".encode())
            digest.update(shas[entry].tobytes())
    return digest.hexdigest()


def no_images_message(src: Path, listing: Listing) -> str:
    counts = Counter(reject.reason for reject in listing.rejects) + listing.ignored
    skipped = ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items()))
    layout = "SRC/CLASS/IMAGE" if listing.kind == "folder" else "a path,label[,split] row per image"
    return f"no candidate images in {src} ({skipped or 'nothing found'}); expected {layout}"


# ---------------------------------------------------------------------------------------------
# worker processes


_image_options: ImageOptions | None = None
_packed_count: Any = None  # a shared multiprocessing.Value: images packed by all workers


def init_worker(options: ImageOptions, packed: Any, in_process: bool = False) -> None:
    """Set the image options and progress count of this worker, which leaves Ctrl-C to the parent."""
    global _image_options, _packed_count
    _image_options = options
    _packed_count = packed
    if not in_process:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


class HashResult(NamedTuple):
    sha256: bytes | None  # None when the file is rejected
    reason: str = ""
    detail: str = ""


class PackResult(NamedTuple):
    image: PackedImage | None  # None when the file is rejected
    sha256: str = ""
    reason: str = ""
    detail: str = ""


def hash_file(path: str) -> HashResult:
    """Return the sha256 of a file's bytes, or the reason it cannot be read or is empty."""
    try:
        with open(path, "rb") as file:
            digest = hashlib.file_digest(file, "sha256")
            size = file.tell()
    except OSError as error:
        return HashResult(None, "unreadable", error.strerror or str(error))
    if size == 0:
        return HashResult(None, "empty", "the file is empty")
    return HashResult(digest.digest())


class HashChunk(NamedTuple):
    """The hashes of consecutive files: 32 bytes each, zeros for a rejected file."""

    digests: bytes
    rejects: list[tuple[int, str, str]]  # (offset in the chunk, reason, detail)


def hash_files(paths: list[str]) -> HashChunk:
    """Hash consecutive files, returning one message so the main process does little per file."""
    digests = bytearray(32 * len(paths))
    rejects = []
    for offset, path in enumerate(paths):
        result = hash_file(path)
        if result.sha256 is None:
            rejects.append((offset, result.reason, result.detail))
        else:
            digests[32 * offset : 32 * offset + 32] = result.sha256
    return HashChunk(bytes(digests), rejects)


def pack_file(path: str) -> PackResult:
    """Read, hash and normalize one image file."""
    assert _image_options is not None, "init_worker sets the image options first"
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as error:
        return PackResult(None, "", "unreadable", error.strerror or str(error))
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        image = normalize_image(data, _image_options)
    except RejectedImage as error:
        return PackResult(None, sha256, error.reason, str(error))
    return PackResult(image, sha256)


@contextmanager
def worker_pool(workers: int, options: ImageOptions, packed: Any) -> Iterator[Pool | None]:
    """Yield a process pool of WORKERS, or None to run in this process when WORKERS is 1.

    PACKED is a shared multiprocessing.Value the workers add their packed images to.
    """
    if workers <= 1:
        init_worker(options, packed, in_process=True)
        yield None
        return
    pool = multiprocessing.Pool(workers, initializer=init_worker, initargs=(options, packed))
    try:
        yield pool
    except BaseException:
        pool.terminate()
        pool.join()
        raise
    pool.close()
    pool.join()


def worker_ids(pool: Pool) -> set[int]:
    """Return the process ids of the pool's current workers.

    Reads Pool's private worker list. The workers of a Pool without maxtasksperchild never
    exit on their own, so a changed set means one died.
    """
    return {process.pid for process in pool._pool}  # type: ignore[attr-defined]


class BoundedImap:
    """`pool.imap` in order, one task per message, with at most `window` tasks sent and not yet consumed.

    Pool.imap alone reads its whole input and queues every result, so a slow consumer would
    hold them all in memory. Here the input generator, which runs in the pool's task thread,
    waits for a permit that each consumed result returns. Without a pool, the tasks run here.

    Pool replaces a worker that dies (for example killed by the kernel for memory) but never
    finishes its task, so imap alone would wait forever. While waiting for a result this checks
    every PROGRESS_POLL seconds that the pool's workers are still the ones it started with, and
    raises PackError when one has gone. It also calls `waiting`, if given, at each check.
    """

    def __init__(
        self,
        pool: Pool | None,
        function: Callable,
        tasks: Iterable,
        window: int,
        waiting: Callable[[], None] | None = None,
    ) -> None:
        self.pool = pool
        self.function = function
        self.tasks = tasks
        self.permits = threading.Semaphore(max(window, 1))
        self.stopped = threading.Event()
        self.waiting = waiting

    def __enter__(self) -> BoundedImap:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # the task thread checks this flag, so the pool can be terminated without a hang
        self.stopped.set()

    def __iter__(self) -> Iterator:
        if self.pool is None:
            yield from map(self.function, self.tasks)
            return
        workers = worker_ids(self.pool)
        results = self.pool.imap(self.function, self._gated_tasks())
        while True:
            try:
                result = results.next(timeout=PROGRESS_POLL)
            except StopIteration:
                return
            except multiprocessing.TimeoutError:
                if worker_ids(self.pool) != workers:
                    raise PackError(
                        "a pack worker process exited before finishing its task (the kernel may have killed it "
                        "for memory; see `dmesg`); run the same command again to resume, with fewer --workers "
                        "if memory is short"
                    ) from None
                if self.waiting is not None:
                    self.waiting()
                continue
            self.permits.release()
            yield result

    def _gated_tasks(self) -> Iterator:
        for task in self.tasks:
            while not self.permits.acquire(timeout=0.1):
                if self.stopped.is_set():
                    return
            if self.stopped.is_set():
                return
            yield task


# ---------------------------------------------------------------------------------------------
# progress


class RateColumn(ProgressColumn):
    """Images per second."""

    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} images/s" if speed else "- images/s", style="progress.data.speed")


class NoProgress:
    """Stands in for rich's Progress when no bar is shown."""

    def add_task(self, description: str, total: float | None = None, completed: int = 0) -> int:
        return 0

    def advance(self, task: int, advance: float = 1) -> None:
        pass

    def update(self, task: int, completed: float | None = None) -> None:
        pass


@contextmanager
def open_progress(show: bool, console: Console | None) -> Iterator[Progress | NoProgress]:
    """Yield a transient progress bar with images/s and ETA on stderr, or a no-op when SHOW is False."""
    if not show:
        yield NoProgress()
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        transient=True,
    )
    with progress:
        yield progress


# ---------------------------------------------------------------------------------------------
# pass 1: hashes


@dataclass
class Hashes:
    """Content hashes of the listing's entries."""

    shas: np.ndarray  # (N, 32) uint8; zero rows for rejected entries
    valid: np.ndarray  # (N,) bool
    rejects: list[Reject]


def hash_entries(listing: Listing, pool: Pool | None, workers: int, progress: Progress | NoProgress) -> Hashes:
    """Hash every listed file in the worker processes.

    NOTE: a resumed run hashes every file again, because the plan digest that decides what
    can be kept needs the content hashes. No hash cache is kept in OUT/.pack-state.
    """
    N = len(listing)
    shas = np.zeros((N, 32), dtype=np.uint8)
    valid = np.zeros(N, dtype=bool)
    rejects = []
    task = progress.add_task("hashing", total=N)
    root = str(listing.root)
    chunks = (
        [os.path.join(root, path) for path in listing.paths[start : start + HASH_CHUNK]] for start in range(0, N, HASH_CHUNK)
    )
    start = 0
    with BoundedImap(pool, hash_files, chunks, workers * CHUNKS_IN_FLIGHT) as results:
        for chunk in results:
            count = len(chunk.digests) // 32
            shas[start : start + count] = np.frombuffer(chunk.digests, dtype=np.uint8).reshape(count, 32)
            valid[start : start + count] = True
            for offset, reason, detail in chunk.rejects:
                rejects.append(Reject(listing.paths[start + offset], reason, detail))
                valid[start + offset] = False
            start += count
            progress.advance(task, count)
    return Hashes(shas, valid, rejects)


# ---------------------------------------------------------------------------------------------
# pass 2: shards


class BlockTask(NamedTuple):
    """One block of a split's shard order: positions [start, end) and what each sample needs."""

    out: str
    split: str
    start: int
    end: int
    max_bytes: int
    root: str
    entries: list[tuple[str, int, str, str]]  # (path relative to the root, label, class name, sha256 hex)


def block_tasks(
    out: Path,
    listing: Listing,
    labels: np.ndarray,
    shas: np.ndarray,
    plan: SplitPlan,
    starts: dict[str, int],
    settings: PackConfig,
) -> Iterator[BlockTask]:
    """Yield the blocks of every split from its START on, in split and shard order."""
    root = str(listing.root)
    for split in SPLITS:
        order = plan.order[split]
        for begin, end in block_bounds(starts[split], len(order), settings.shard_max_samples):
            entries = []
            for entry in order[begin:end].tolist():
                label = int(labels[entry])
                entries.append((listing.paths[entry], label, listing.classes[label], shas[entry].tobytes().hex()))
            yield BlockTask(str(out), split, begin, end, settings.shard_max_bytes, root, entries)


def pack_block(task: BlockTask) -> list[Segment]:
    """Pack one block into shards under temporary names and return its segments (worker side).

    After an error the main process deletes the temporary files (`removing_partial_shards`).
    """
    writer = BlockWriter(Path(task.out), task.split, task.start, task.max_bytes)
    unreported = 0
    for position, (path, label, class_name, sha256) in zip(range(task.start, task.end), task.entries):
        result = pack_file(os.path.join(task.root, path))
        if result.image is None:
            writer.reject(position, Reject(path, result.reason, result.detail))
        elif result.sha256 != sha256:
            writer.reject(position, Reject(path, "changed", "the file changed between hashing and packing; pack again"))
        else:
            key = sample_key(task.split, position)
            writer.add(position, encode_sample(key, label, class_name, path, result.sha256, result.image))
        unreported += 1
        if unreported == PROGRESS_EVERY:
            count_packed(unreported)
            unreported = 0
    count_packed(unreported)
    return writer.finish(task.end)


def count_packed(images: int) -> None:
    with _packed_count.get_lock():
        _packed_count.value += images


def write_shards(
    out: Path,
    listing: Listing,
    labels: np.ndarray,
    shas: np.ndarray,
    plan: SplitPlan,
    finished: dict[str, list[Segment]],
    settings: PackConfig,
    state: PackState,
    pool: Pool | None,
    workers: int,
    packed: Any,
    progress: Progress | NoProgress,
) -> dict[str, list[Segment]]:
    """Pack every block after the finished shards and return all segments per split.

    Workers write the blocks' shards. This process records each finished block and renames its
    shards in split and shard order, so the shard numbers do not depend on the workers.
    """
    total = sum(len(order) for order in plan.order.values())
    done = sum(finished[split][-1].end for split in SPLITS if finished[split])
    task = progress.add_task("packing", total=total, completed=done)
    segments = {split: list(finished[split]) for split in SPLITS}
    next_index = {split: sum(1 for segment in finished[split] if segment.shard) for split in SPLITS}
    starts = {split: finished[split][-1].end if finished[split] else 0 for split in SPLITS}

    def show_progress() -> None:
        progress.update(task, completed=done + packed.value)

    tasks = block_tasks(out, listing, labels, shas, plan, starts, settings)
    with BoundedImap(pool, pack_block, tasks, workers * BLOCKS_IN_FLIGHT, show_progress) as results:
        for block in results:
            for segment in block:
                split = segment.split
                segments[split].append(commit_segment(out, state, segment, next_index[split]))
                next_index[split] += segment.shard is not None
            show_progress()
    return segments


@contextmanager
def removing_partial_shards(out: Path) -> Iterator[None]:
    """On an error or interrupt, delete the temporary shard files of blocks not committed.

    Entered before the worker pool, so the workers have stopped when it runs. Finished shards
    stay for the next run to resume from.
    """
    try:
        yield
    except BaseException:
        for split in SPLITS:
            for path in (out / split).glob("*.partial"):
                path.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------
# duplicates and the summary


def duplicate_rejects(listing: Listing, duplicates: Duplicates) -> list[Reject]:
    copies = np.flatnonzero(duplicates.original >= 0).tolist()
    return [
        Reject(listing.paths[entry], DUPLICATE, f"same bytes as {listing.paths[duplicates.original[entry]]}")
        for entry in copies
    ]


def count_duplicates(listing: Listing, duplicates: Duplicates) -> dict[str, int]:
    counts = {
        "cross-class": sum(len(group) for group in duplicates.cross_class),
        "repeated-row": listing.repeated_rows,
        "same-class": int(np.count_nonzero(duplicates.original >= 0)),
    }
    return {kind: count for kind, count in counts.items() if count}


def warn_cross_class(listing: Listing, duplicates: Duplicates) -> None:
    groups = duplicates.cross_class
    if not groups:
        return
    examples = "; ".join(" = ".join(listing.paths[entry] for entry in group) for group in groups[:WARN_NAMES])
    logger.warning(
        "%d files have the same bytes as a file under another class; each is packed under its own label: %s%s",
        sum(len(group) for group in groups),
        examples,
        "; ..." if len(groups) > WARN_NAMES else "",
    )


def summarize(
    src: Path,
    out: Path,
    listing: Listing,
    labels: np.ndarray,
    duplicates: Duplicates,
    plan: SplitPlan,
    segments: dict[str, list[Segment]],
    reject_counts: dict[str, int],
    duplicate_counts: dict[str, int],
    finished: dict[str, list[Segment]],
) -> PackSummary:
    """Count classes, samples, shards, bytes, rejects and duplicates per split."""
    C = len(listing.classes)
    packed_per_class = np.zeros(C, dtype=np.int64)
    copies = np.flatnonzero(duplicates.original >= 0)
    copy_splits = plan.split_of[duplicates.original[copies]]
    splits = {}
    for code, split in enumerate(SPLITS):
        order = plan.order[split]
        packed = np.ones(len(order), dtype=bool)
        rejected = [position for segment in segments[split] for position, _ in segment.rejects]
        packed[rejected] = False
        class_counts = np.bincount(labels[order[packed]], minlength=C)
        packed_per_class += class_counts
        shards = [segment.shard for segment in segments[split] if segment.shard]
        splits[split] = SplitSummary(
            classes=int(np.count_nonzero(class_counts)),
            samples=sum(shard.samples for shard in shards),
            shards=len(shards),
            bytes=sum(shard.bytes for shard in shards),
            rejects=len(rejected),
            duplicates=int(np.count_nonzero(copy_splits == code)),
        )
    return PackSummary(
        source=str(src),
        output=str(out),
        classes=C,
        splits=splits,
        rejects=dict(sorted(reject_counts.items())),
        duplicates=dict(sorted(duplicate_counts.items())),
        ignored=dict(sorted(listing.ignored.items())),
        empty_classes=[listing.classes[label] for label in np.flatnonzero(packed_per_class == 0).tolist()],
        small_classes=[listing.classes[label] for label in plan.small_classes],
        resumed_shards=sum(1 for split in SPLITS for segment in finished[split] if segment.shard),
    )

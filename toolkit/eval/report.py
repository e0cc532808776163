"""Tables of an eval run (per shard, per class range, worst and best classes), report files and their rendering.

Class ranges are shown as 1-based inclusive positions in the checkpoint's class list, so the
first block of 20,000 is "1–20,000". Per-class rows carry `index`, the 0-based position in
that list, which is the label the model predicts. A group without samples has accuracy None
(null in JSON, empty in CSV) and never a division by zero.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from rich.console import Console
from rich.table import Table

from toolkit.data.batch import SkippedSample
from toolkit.dataset import ShardInfo
from toolkit.eval.metrics import EvalCounts

# A shard is flagged as low when its top-1 is this far (absolute) below the median shard's.
LOW_SHARD_MARGIN = 0.10
# Skipped samples listed on screen; the report file lists all of them.
SKIPPED_SHOWN = 20

ShardSort = Literal["name", "top1"]


@dataclass
class ShardRow:
    """One shard: samples listed in the manifest, evaluated and skipped, and its accuracy."""

    name: str
    listed: int
    samples: int
    skipped: int
    top1: float | None
    top5: float | None
    low: bool = False


@dataclass
class ClassRangeRow:
    """A block of consecutive classes, `first` to `last` as 1-based inclusive positions."""

    first: int
    last: int
    classes_with_samples: int
    samples: int
    top1: float | None
    top5: float | None


@dataclass
class ClassRow:
    """One class with samples in the split; `index` is its 0-based position in the checkpoint."""

    index: int
    name: str
    samples: int
    top1: float
    top5: float


@dataclass
class EvalReport:
    """Everything `toolkit eval` reports; `to_dict` is the JSON report."""

    checkpoint: str
    dataset: str
    split: str
    class_order: Literal["same", "remapped"]
    classes: Sequence[str]
    samples_listed: int
    counts: EvalCounts
    shards: list[ShardRow]
    class_ranges: list[ClassRangeRow]
    worst_classes: list[ClassRow]
    best_classes: list[ClassRow]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return self.counts.overall.samples

    @property
    def excluded(self) -> int:
        """Samples listed in the manifest but not evaluated."""
        return self.samples_listed - self.samples

    @property
    def skipped(self) -> list[SkippedSample]:
        return self.counts.skipped

    @property
    def classes_with_samples(self) -> int:
        return int((self.counts.class_samples > 0).sum())

    def overall(self) -> dict[str, Any]:
        """Samples, top-1, top-5 and mean loss; a non-finite loss becomes None, because JSON has no NaN."""
        counts = self.counts
        loss = counts.loss
        return {
            "samples": self.samples,
            "top1": counts.overall.top1,
            "top5": counts.overall.top5,
            "loss": loss if loss is not None and math.isfinite(loss) else None,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint,
            "dataset": self.dataset,
            "split": self.split,
            "num_classes": len(self.classes),
            "class_order": self.class_order,
            "overall": self.overall(),
            "excluded": {
                "samples_listed": self.samples_listed,
                "count": self.excluded,
                "named": self.counts.skipped_count,
                "samples": [asdict(sample) for sample in self.skipped],
            },
            "classes_with_samples": self.classes_with_samples,
            "classes_without_samples": len(self.classes) - self.classes_with_samples,
            "shards": [asdict(row) for row in self.shards],
            "class_ranges": [asdict(row) for row in self.class_ranges],
            "worst_classes": [asdict(row) for row in self.worst_classes],
            "best_classes": [asdict(row) for row in self.best_classes],
            "settings": self.settings,
        }


# ---------------------------------------------------------------------------------------------
# tables


def shard_rows(counts: EvalCounts, listed: Sequence[ShardInfo], sort: ShardSort = "name") -> list[ShardRow]:
    """Return a row per shard of the manifest (and any other shard that produced samples), low ones flagged."""
    skipped_per_shard: Counter[str] = Counter()
    for sample in counts.skipped:
        skipped_per_shard[sample.shard] += sample.count
    names = [shard.name for shard in listed]
    listed_samples = {shard.name: shard.samples for shard in listed}
    names += sorted(set(counts.shards) - set(listed_samples))

    rows = []
    for name in names:
        hits = counts.shards.get(name)
        rows.append(
            ShardRow(
                name=name,
                listed=listed_samples.get(name, 0),
                samples=hits.samples if hits else 0,
                skipped=skipped_per_shard.get(name, 0),
                top1=hits.top1 if hits else None,
                top5=hits.top5 if hits else None,
            )
        )
    flag_low_shards(rows)
    if sort == "top1":
        # worst first; shards without samples go last
        rows.sort(key=lambda row: (row.top1 is None, row.top1 if row.top1 is not None else 0.0, row.name))
    return rows


def flag_low_shards(rows: list[ShardRow], margin: float = LOW_SHARD_MARGIN) -> None:
    """Set `low` on shards whose top-1 is more than `margin` below the median top-1 of all shards."""
    scores = [row.top1 for row in rows if row.top1 is not None]
    if len(scores) < 2:
        return
    median = statistics.median(scores)
    for row in rows:
        row.low = row.top1 is not None and row.top1 < median - margin


def class_range_rows(counts: EvalCounts, block: int) -> list[ClassRangeRow]:
    """Return one row per block of `block` consecutive classes; the last block may be shorter."""
    if block < 1:
        raise ValueError(f"invalid class block {block}; expected a positive number of classes")
    rows = []
    for start in range(0, counts.num_classes, block):
        stop = min(start + block, counts.num_classes)
        hits = counts.class_range(start, stop)
        rows.append(
            ClassRangeRow(
                first=start + 1,
                last=stop,
                classes_with_samples=int((counts.class_samples[start:stop] > 0).sum()),
                samples=hits.samples,
                top1=hits.top1,
                top5=hits.top5,
            )
        )
    return rows


def extreme_classes(counts: EvalCounts, classes: Sequence[str], n: int) -> tuple[list[ClassRow], list[ClassRow]]:
    """Return the n worst and n best classes by top-1 (ties: top-5, then more samples, then index).

    Only classes with samples in the split are ranked.
    """
    samples = counts.class_samples.numpy()
    present = np.flatnonzero(samples > 0)
    if n < 1 or present.size == 0:
        return [], []
    top1 = counts.class_top1.numpy()[present] / samples[present]
    top5 = counts.class_top5.numpy()[present] / samples[present]
    size = samples[present]

    # np.lexsort sorts by the last key first
    worst = present[np.lexsort((present, -size, top5, top1))][:n]
    best = present[np.lexsort((present, -size, -top5, -top1))][:n]
    return [class_row(counts, classes, int(i)) for i in worst], [class_row(counts, classes, int(i)) for i in best]


def class_row(counts: EvalCounts, classes: Sequence[str], index: int) -> ClassRow:
    samples = int(counts.class_samples[index])
    return ClassRow(
        index=index,
        name=classes[index],
        samples=samples,
        top1=int(counts.class_top1[index]) / samples,
        top5=int(counts.class_top5[index]) / samples,
    )


# ---------------------------------------------------------------------------------------------
# files


def report_paths(path: Path) -> tuple[Path, Path, Path]:
    """Return the JSON report path and the per-shard and per-class CSV paths next to it."""
    return path, path.with_name(f"{path.stem}-shards.csv"), path.with_name(f"{path.stem}-classes.csv")


def write_report(report: EvalReport, path: Path) -> list[Path]:
    """Write the JSON report and the per-shard and per-class CSV files; return their paths."""
    json_path, shards_path, classes_path = report_paths(path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(json_path, json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n")
    _write_csv(shards_path, ["shard", "listed", "samples", "skipped", "top1", "top5", "low"], _shard_csv_rows(report))
    _write_csv(
        classes_path,
        ["index", "class", "samples", "top1_hits", "top5_hits", "top1", "top5"],
        _class_csv_rows(report),
    )
    return [json_path, shards_path, classes_path]


def _shard_csv_rows(report: EvalReport):
    for row in report.shards:
        yield [row.name, row.listed, row.samples, row.skipped, _csv_rate(row.top1), _csv_rate(row.top5), int(row.low)]


def _class_csv_rows(report: EvalReport):
    counts = report.counts
    samples = counts.class_samples.tolist()
    top1 = counts.class_top1.tolist()
    top5 = counts.class_top5.tolist()
    for index, name in enumerate(report.classes):
        n = samples[index]
        yield [
            index,
            name,
            n,
            top1[index],
            top5[index],
            _csv_rate(top1[index] / n if n else None),
            _csv_rate(top5[index] / n if n else None),
        ]


def _csv_rate(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _write_csv(path: Path, header: list[str], rows) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    os.replace(temporary, path)


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


# ---------------------------------------------------------------------------------------------
# screen


def format_rate(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.2f}%"


def render_report(report: EvalReport, console: Console) -> None:
    """Print the overall numbers and every table of the report with Rich."""
    console.print(overall_table(report))
    console.print(shard_table(report))
    console.print(class_range_table(report))
    if report.worst_classes:
        console.print(class_table(f"{len(report.worst_classes)} worst classes", report.worst_classes))
        console.print(class_table(f"{len(report.best_classes)} best classes", report.best_classes))
    if report.skipped:
        console.print(skipped_table(report))


def overall_table(report: EvalReport) -> Table:
    overall = report.overall()
    loss = report.counts.loss  # shown even when it is not finite
    table = Table(title=f"{report.split} split of {report.dataset}", title_justify="left")
    for column in ("samples", "top-1", "top-5", "loss", "excluded", "classes with samples", "class order"):
        table.add_column(column, justify="left" if column == "class order" else "right")
    table.add_row(
        f"{report.samples:,}",
        format_rate(overall["top1"]),
        format_rate(overall["top5"]),
        "–" if loss is None else f"{loss:.4f}",
        f"{report.excluded:,}",
        f"{report.classes_with_samples:,} of {len(report.classes):,}",
        report.class_order,
    )
    return table


def shard_table(report: EvalReport) -> Table:
    table = Table(title=f"per shard (red: top-1 more than {100 * LOW_SHARD_MARGIN:.0f} points below the median)", title_justify="left")
    table.add_column("shard")
    for column in ("listed", "samples", "skipped", "top-1", "top-5"):
        table.add_column(column, justify="right")
    for row in report.shards:
        table.add_row(
            row.name,
            f"{row.listed:,}",
            f"{row.samples:,}",
            f"{row.skipped:,}",
            format_rate(row.top1),
            format_rate(row.top5),
            style="bold red" if row.low else None,
        )
    return table


def class_range_table(report: EvalReport) -> Table:
    table = Table(title="per class range (positions in the checkpoint's class list)", title_justify="left")
    for column in ("classes", "with samples", "samples", "top-1", "top-5"):
        table.add_column(column, justify="right")
    for row in report.class_ranges:
        table.add_row(
            f"{row.first:,}–{row.last:,}",
            f"{row.classes_with_samples:,}",
            f"{row.samples:,}",
            format_rate(row.top1),
            format_rate(row.top5),
        )
    return table


def class_table(title: str, rows: list[ClassRow]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("index", justify="right")
    table.add_column("class")
    for column in ("samples", "top-1", "top-5"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(str(row.index), row.name, f"{row.samples:,}", format_rate(row.top1), format_rate(row.top5))
    return table


def skipped_table(report: EvalReport) -> Table:
    entries = report.skipped[:SKIPPED_SHOWN]
    title = f"skipped samples: {report.counts.skipped_count}"
    if len(entries) < len(report.skipped):
        title += f" (first {len(entries)} of {len(report.skipped)} entries; the report file lists all)"
    table = Table(title=title, title_justify="left")
    for column in ("shard", "key", "samples", "reason"):
        table.add_column(column, justify="right" if column == "samples" else "left")
    for sample in entries:
        table.add_row(sample.shard, sample.key, str(sample.count), sample.reason)
    return table

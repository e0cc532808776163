"""The result of a pack run: counts per split, rejects, duplicates and warnings, as a table or JSON."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

# Number of class names the rendered summary lists before it gives only the count.
SHOW_NAMES = 10


@dataclass
class SplitSummary:
    """Counts of one split."""

    classes: int = 0  # classes with at least one sample in the split
    samples: int = 0
    shards: int = 0
    bytes: int = 0
    rejects: int = 0  # files assigned to the split that normalize_image rejected
    duplicates: int = 0  # same-class copies of files packed in the split


@dataclass
class PackSummary:
    """Counts of what a pack run wrote and skipped; `to_dict()` returns them as JSON-ready data."""

    source: str
    output: str
    classes: int
    splits: dict[str, SplitSummary]
    rejects: dict[str, int] = field(default_factory=dict)  # reason -> files or rows not packed
    duplicates: dict[str, int] = field(default_factory=dict)  # kind -> count, see toolkit.pack.split
    ignored: dict[str, int] = field(default_factory=dict)  # reason -> files skipped by the scan
    empty_classes: list[str] = field(default_factory=list)  # classes without a packed sample
    small_classes: list[str] = field(default_factory=list)  # classes sent to train whole
    resumed_shards: int = 0  # finished shards kept from an earlier run
    seconds: float = 0.0
    failed: bool = False
    failure: str = ""

    @property
    def samples(self) -> int:
        return sum(split.samples for split in self.splits.values())

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["samples"] = self.samples
        return data


def render_summary(summary: PackSummary, console: Console) -> None:
    """Print a table per split with totals, then rejects, duplicates, ignored files and warnings."""
    console.print(split_table(summary))

    for title, counts in (("rejected", summary.rejects), ("duplicates", summary.duplicates), ("ignored", summary.ignored)):
        if counts:
            listed = ", ".join(f"{reason} {count}" for reason, count in sorted(counts.items()))
            console.print(f"{title}: {listed}", highlight=False)
    if summary.rejects or summary.duplicates.get("same-class"):
        console.print(f"files and rows that were not packed are listed in {summary.output}/rejects.csv", highlight=False)
    for title, names in (
        ("classes without a packed image", summary.empty_classes),
        ("classes too small to split, packed as train", summary.small_classes),
    ):
        if names:
            shown = ", ".join(names[:SHOW_NAMES]) + (", ..." if len(names) > SHOW_NAMES else "")
            console.print(f"[yellow]{title} ({len(names)}):[/] {shown}", highlight=False)
    if summary.resumed_shards:
        console.print(f"kept {summary.resumed_shards} shards finished by an earlier run", highlight=False)

    if summary.failed:
        console.print(f"[bold red]failed:[/] {summary.failure}", highlight=False)
    else:
        console.print(
            f"packed {summary.samples} images of {summary.classes} classes into {summary.output} "
            f"in {summary.seconds:.1f} s",
            highlight=False,
        )


def split_table(summary: PackSummary) -> Table:
    table = Table(title="toolkit pack")
    for column in ("split", "classes", "samples", "shards", "bytes", "rejects", "duplicates"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for name, split in summary.splits.items():
        table.add_row(
            name,
            str(split.classes),
            str(split.samples),
            str(split.shards),
            format_bytes(split.bytes),
            str(split.rejects),
            str(split.duplicates),
        )
    table.add_row(
        "total",
        str(summary.classes),
        str(summary.samples),
        str(sum(split.shards for split in summary.splits.values())),
        format_bytes(sum(split.bytes for split in summary.splits.values())),
        str(sum(summary.rejects.values())),
        str(sum(summary.duplicates.values())),
        style="bold",
    )
    return table


def format_bytes(count: int) -> str:
    """Return COUNT bytes in binary units, such as "3.2 MiB"."""
    if count < 1024:
        return f"{count} B"
    value = count / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            break
        value /= 1024
    return f"{value:.1f} {unit}"

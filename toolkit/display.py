"""Rich rendering of training progress for the command line and the demo."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TiB"


class TrainDisplay:
    """A progress bar with loss, LR, img/s, data wait and memory; prints a line per validation."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=console,
            transient=False,
        )
        self.task = None

    def __enter__(self) -> TrainDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["kind"]
        if kind == "start":
            self.task = self.progress.add_task("train", total=event["total_steps"], completed=event["step"], status=f"{event['device']} {event['precision']}")
        elif kind in ("step", "train") and self.task is not None:
            self.progress.update(self.task, completed=event["step"])
            if kind == "train":
                status = (
                    f"loss {event['loss']:.3f}  lr {event['lr']:.3g}  {event['images_per_s']:.0f} img/s  "
                    f"data wait {100 * event['data_wait']:.0f}%  mem {format_bytes(event['memory_bytes'])}"
                )
                self.progress.update(self.task, status=status)
        elif kind == "val":
            self.progress.console.print(
                f"val @ step {event['step']}: top-1 {100 * event['top1']:.2f}%  top-5 {100 * event['top5']:.2f}%  "
                f"loss {event['loss']:.3f}  ({event['samples']} samples, {event['skipped']} skipped)"
            )

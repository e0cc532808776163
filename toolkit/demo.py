"""The demo: the main job, end to end, on a generated dataset small enough for a CPU."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from rich.console import Console

from toolkit.config import PackConfig
from toolkit.pack import run_pack
from toolkit.pack.report import render_summary
from toolkit.synthetic import write_image_folder

logger = logging.getLogger(__name__)


def run_demo(directory: Path, num_classes: int, images_per_class: int, console: Console) -> None:
    """Generate DIRECTORY/images, pack it into DIRECTORY/dataset and print the summary."""
    images = directory / "images"
    dataset = directory / "dataset"

    # generate the image folder once; a rerun reuses it
    marker = images / ".complete"
    if not marker.exists():
        shutil.rmtree(images, ignore_errors=True)
        logger.info("generating %d classes x %d images in %s", num_classes, images_per_class, images)
        write_image_folder(images, num_classes, images_per_class)
        marker.touch()

    # pack
    console.rule("toolkit pack")
    summary = run_pack(images, dataset, PackConfig(overwrite=True), show_progress=True)
    render_summary(summary, console)

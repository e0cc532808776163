"""The demo: the main job, end to end, on a generated dataset small enough for a CPU."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from rich.console import Console

from toolkit.config import EvalConfig, PackConfig, TrainConfig
from toolkit.display import TrainDisplay
from toolkit.eval import render_report, run_eval, write_report
from toolkit.pack import run_pack
from toolkit.pack.report import render_summary
from toolkit.synthetic import write_image_folder
from toolkit.train import train

logger = logging.getLogger(__name__)

# The same recipe as pipelines/cpu-quick.toml: ResNet18 at 64 px, a few minutes on two cores.
DEMO_TRAIN = TrainConfig(
    arch="resnet18",
    embedding_dim=128,
    image_size=64,
    batch_size=32,
    workers=2,
    optimizer="adamw",
    lr=0.002,
    weight_decay=0.05,
    warmup_steps=30,
    epochs=8,
    label_smoothing=0.1,
    log_every=10,
    save_every=200,
    device="cpu",
    precision="fp32",
)
DEMO_EVAL = EvalConfig(split="test", batch_size=64, workers=2, device="cpu", precision="fp32")


def run_demo(directory: Path, num_classes: int, images_per_class: int, console: Console) -> None:
    """Generate DIRECTORY/images, then pack, train and evaluate into DIRECTORY/{dataset,run}.

    The eval report goes to DIRECTORY/run/eval-test.json with its CSV tables beside it.

    A rerun reuses the generated images and starts the pack and the run afresh.
    """
    images = directory / "images"
    dataset = directory / "dataset"
    run = directory / "run"

    # generate the image folder once
    marker = directory / ".images-complete"
    expected = f"{num_classes} {images_per_class}"
    if not marker.exists() or marker.read_text() != expected:
        shutil.rmtree(images, ignore_errors=True)
        logger.info("generating %d classes x %d images in %s", num_classes, images_per_class, images)
        write_image_folder(images, num_classes, images_per_class)
        marker.write_text(expected)

    # pack
    console.rule("toolkit pack")
    # small shards, so that the eval report's per-shard table has several rows
    summary = run_pack(images, dataset, PackConfig(overwrite=True, shard_max_samples=200), show_progress=True, console=console)
    render_summary(summary, console)

    # train
    console.rule("toolkit train")
    shutil.rmtree(run, ignore_errors=True)
    with TrainDisplay(console) as display:
        result = train(dataset, run, DEMO_TRAIN, progress=display)
    chance = 1 / num_classes
    console.print(
        f"val top-1 {100 * result['top1']:.1f}% after {result['step']} steps "
        f"(chance is {100 * chance:.1f}%); checkpoints in {run / 'checkpoints'}"
    )

    # evaluate the best checkpoint on the test split
    console.rule("toolkit eval")
    report = run_eval(run / "checkpoints" / "best.pt", dataset, DEMO_EVAL)
    render_report(report, console)
    written = write_report(report, run / "eval-test.json")
    console.print(f"wrote {', '.join(str(path) for path in written)}")

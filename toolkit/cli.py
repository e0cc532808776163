"""The `toolkit` command line: one thin function per command.

Each function resolves its settings (defaults, then `--config`, then flags), calls the library
and renders the result. Only this module prints or installs a log handler.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from toolkit.config import ConfigError, PackConfig, TrainConfig, resolve
from toolkit.dataset import DatasetError

logger = logging.getLogger(__name__)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
console = Console(stderr=True)
stdout = Console()

ConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", help="TOML file with a table per command; flags override it.", exists=True, dir_okay=False),
]


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False) -> None:
    """Train one image classifier over hundreds of thousands of classes."""
    level = logging.DEBUG if verbose else logging.INFO
    if not is_rank_zero():
        level = logging.WARNING  # under torchrun the other processes log warnings and errors only
    logging.basicConfig(
        level=level,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
        force=True,
    )


def is_rank_zero() -> bool:
    """Return whether this process shows progress and results: always in one process, rank 0 under torchrun."""
    return os.environ.get("RANK", "0") == "0"


def fail(message: str) -> typer.Exit:
    """Print an error on stderr and return the exit to raise."""
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code=1)


@app.command()
def pack(
    src: Annotated[Path, typer.Argument(help="A folder with one sub-folder per class, or a CSV/TSV file with path,label[,split].", exists=True)],
    out: Annotated[Path, typer.Argument(help="Dataset directory to write.")],
    config: ConfigOption = None,
    classes: Annotated[Optional[Path], typer.Option("--classes", help="File with one class name per line, fixing the label order.", exists=True, dir_okay=False)] = None,
    val_fraction: Annotated[Optional[float], typer.Option(help="Fraction of each class for validation.", min=0.0, max=1.0)] = None,
    test_fraction: Annotated[Optional[float], typer.Option(help="Fraction of each class for test.", min=0.0, max=1.0)] = None,
    split_seed: Annotated[Optional[int], typer.Option(help="Seed of the per-image split hash.")] = None,
    resize: Annotated[Optional[str], typer.Option(help="keep, shorter (shorter side to SIZE), fit (inside SIZE×SIZE) or center-crop (SIZE×SIZE).")] = None,
    size: Annotated[Optional[int], typer.Option(help="Target size in pixels for --resize.", min=0)] = None,
    jpeg_quality: Annotated[Optional[int], typer.Option(help="JPEG quality of re-encoded images.", min=1, max=100)] = None,
    max_pixels: Annotated[Optional[int], typer.Option(help="Reject images with more pixels than this (decompression bombs).", min=1)] = None,
    shard_max_samples: Annotated[Optional[int], typer.Option(help="Maximum samples per shard.", min=1)] = None,
    shard_max_bytes: Annotated[Optional[int], typer.Option(help="Maximum bytes per shard.", min=1)] = None,
    shuffle_seed: Annotated[Optional[int], typer.Option(help="Seed of the order of train samples across shards.")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Worker processes; 0 uses every core.", min=0)] = None,
    strict: Annotated[Optional[bool], typer.Option("--strict", help="Fail when any input file is rejected.")] = None,
    overwrite: Annotated[Optional[bool], typer.Option("--overwrite", help="Replace a dataset in OUT that was packed with other options.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
) -> None:
    """Pack an image folder or CSV list into validated, split WebDataset shards."""
    # the option values, read before the imports below add their names to locals()
    overrides = dict(locals())
    for name in ("src", "out", "config", "as_json"):
        overrides.pop(name)
    overrides["classes_file"] = overrides.pop("classes")

    from toolkit.pack import PackError, run_pack
    from toolkit.pack.report import render_summary

    try:
        settings = resolve(PackConfig, config, overrides, "pack")
        summary = run_pack(src, out, settings, show_progress=not as_json, console=console)
    except (ConfigError, DatasetError, PackError) as error:
        raise fail(str(error)) from None

    if as_json:
        stdout.print_json(json.dumps(summary.to_dict()))
    else:
        render_summary(summary, stdout)
    if summary.failed:
        raise typer.Exit(code=1)


@app.command()
def train(
    dataset: Annotated[str, typer.Argument(help="Dataset written by `toolkit pack`: a directory, an http(s):// URL prefix, or pipe:COMMAND where COMMAND writes the file named by {} (its path under the dataset) to stdout.")],
    run: Annotated[Path, typer.Argument(help="Run directory for config.toml, metrics.jsonl and checkpoints/.")],
    config: ConfigOption = None,
    arch: Annotated[Optional[str], typer.Option(help="torchvision ResNet: resnet18, resnet34, resnet50, resnet101 or resnet152.")] = None,
    pretrained: Annotated[Optional[Path], typer.Option(help="Local file with backbone weights (a torchvision ResNet state dict).", exists=True, dir_okay=False)] = None,
    embedding_dim: Annotated[Optional[int], typer.Option(help="Embedding size D of the neck; 0 uses the raw backbone features.", min=0)] = None,
    head: Annotated[Optional[str], typer.Option(help="Class head: linear, cosface or arcface.")] = None,
    margin: Annotated[Optional[float], typer.Option(help="Additive margin of the cosface/arcface head.")] = None,
    scale: Annotated[Optional[float], typer.Option(help="Logit scale of the cosface/arcface head.")] = None,
    checkpointing: Annotated[Optional[str], typer.Option(help="Activation checkpointing: none, stage or block.")] = None,
    class_chunk: Annotated[Optional[int], typer.Option(help="Classes per chunk of the cross-entropy.", min=1)] = None,
    label_smoothing: Annotated[Optional[float], typer.Option(help="Label smoothing of the loss.", min=0.0, max=1.0)] = None,
    class_sample_rate: Annotated[Optional[float], typer.Option(help="Fraction of the classes each step uses: the batch's classes plus random others (an approximate loss); 1 uses all.", min=0.0, max=1.0)] = None,
    fused_head_update: Annotated[Optional[bool], typer.Option("--fused-head-update", help="Apply SGD to the class matrix chunk by chunk inside the loss's backward pass, so no class matrix gradient is kept; needs --optimizer sgd, --grad-accum 1, no --clip-grad and no fp16.")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Training crop size in pixels.", min=16)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per micro-batch (per process under torchrun).", min=1)] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader worker processes.", min=0)] = None,
    crop_scale_min: Annotated[Optional[float], typer.Option(help="Smallest share of the image area a random resized crop takes.", min=0.0, max=1.0)] = None,
    hflip: Annotated[Optional[bool], typer.Option("--hflip/--no-hflip", help="Flip training images left to right at random.")] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="sgd (with momentum) or adamw.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate after warmup.", min=0.0)] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Weight decay (not applied to norm layers and biases).", min=0.0)] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Optimizer steps of linear warmup.", min=0)] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="Micro-batches per optimizer step.", min=1)] = None,
    clip_grad: Annotated[Optional[float], typer.Option(help="Clip the gradient norm to this value; 0 disables.", min=0.0)] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto, bf16, fp16 or fp32.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs to train.", min=1)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps to train; overrides --epochs.", min=1)] = None,
    val_every: Annotated[Optional[int], typer.Option(help="Validate every N steps; 0 validates once per epoch.", min=0)] = None,
    save_every: Annotated[Optional[int], typer.Option(help="Save last.pt every N steps.", min=1)] = None,
    log_every: Annotated[Optional[int], typer.Option(help="Log a metrics line every N steps.", min=1)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of initialisation, shuffling and augmentation.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
    resume: Annotated[Optional[bool], typer.Option("--resume", help="Continue the run in RUN from checkpoints/last.pt, with the settings in RUN/config.toml unless --config is given.")] = None,
    auto_batch: Annotated[Optional[bool], typer.Option("--auto-batch", help="Use the largest batch that the memory plan fits on the device; the choice is logged.")] = None,
) -> None:
    """Train a classifier on a packed dataset."""
    # the option values, read before the imports below add their names to locals()
    overrides = dict(locals())
    for name in ("dataset", "run", "config"):
        overrides.pop(name)

    from toolkit.display import TrainDisplay
    from toolkit.train import CheckpointError, TrainingError, train as run_training

    # a resumed run starts from the settings it recorded, unless a config file is given
    if resume and config is None and (run / "config.toml").is_file():
        config = run / "config.toml"
        logger.info("resuming with the settings in %s; options given here override them", config)

    try:
        settings = resolve(TrainConfig, config, overrides, "train")
        with TrainDisplay(console) if is_rank_zero() else contextlib.nullcontext() as display:
            result = run_training(dataset, run, settings, progress=display)
    except (ConfigError, DatasetError, CheckpointError, TrainingError) as error:
        raise fail(str(error)) from None
    if not is_rank_zero():
        return
    stdout.print(
        f"finished at step {result['step']}: val top-1 {100 * result.get('top1', 0.0):.2f}%, "
        f"best {100 * max(result['best_top1'], 0.0):.2f}%; checkpoints in {run / 'checkpoints'}"
    )


@app.command()
def demo(
    directory: Annotated[Path, typer.Argument(help="Where to write the generated images, dataset and run.")] = Path("demo-output"),
    classes: Annotated[int, typer.Option(help="Number of generated classes.", min=2)] = 200,
    images_per_class: Annotated[int, typer.Option(help="Generated images per class.", min=3)] = 15,
) -> None:
    """Generate a small image folder and run the main job on it, on the CPU if need be."""
    from toolkit.demo import run_demo

    try:
        run_demo(directory, classes, images_per_class, stdout)
    except (ConfigError, DatasetError) as error:
        raise fail(str(error)) from None


@app.command("eval")
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file written by `toolkit train` (RUN/checkpoints/best.pt).", exists=True, dir_okay=False)],
    dataset: Annotated[str, typer.Argument(help="Dataset written by `toolkit pack`: a directory, an http(s):// URL prefix, or pipe:COMMAND where COMMAND writes the file named by {} (its path under the dataset) to stdout.")],
    config: ConfigOption = None,
    split: Annotated[Optional[str], typer.Option(help="Split to evaluate: test, val or train.")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per batch.", min=1)] = None,
    workers: Annotated[Optional[int], typer.Option(help="DataLoader worker processes.", min=0)] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Eval crop size in pixels; 0 uses the checkpoint's training size.", min=0)] = None,
    class_block: Annotated[Optional[int], typer.Option(help="Classes per row of the per-class-range table.", min=1)] = None,
    top_classes: Annotated[Optional[int], typer.Option(help="Number of worst and of best classes to list.", min=0)] = None,
    sort_shards: Annotated[Optional[str], typer.Option(help="Order of the per-shard table: name, or top1 (worst first).")] = None,
    report: Annotated[Optional[Path], typer.Option(help="JSON report to write; the per-shard and per-class tables go to STEM-shards.csv and STEM-classes.csv next to it.", dir_okay=False)] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto, bf16, fp16 or fp32.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
) -> None:
    """Evaluate a checkpoint on a dataset split: overall, per shard, per class range, worst and best classes."""
    # the option values, read before the imports below add their names to locals()
    overrides = dict(locals())
    for name in ("checkpoint", "dataset", "config"):
        overrides.pop(name)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from toolkit.config import EvalConfig
    from toolkit.eval import ClassListMismatch, EvalError, render_report, run_eval, write_report
    from toolkit.train import CheckpointError

    try:
        settings = resolve(EvalConfig, config, overrides, "eval")
        columns = (TextColumn("[bold]eval"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True, disable=not is_rank_zero()) as bar:
            task = bar.add_task("eval", total=None)
            result = run_eval(
                checkpoint, dataset, settings, progress=lambda done, total: bar.update(task, completed=done, total=total)
            )
    except (ConfigError, DatasetError, CheckpointError, ClassListMismatch, EvalError) as error:
        raise fail(str(error)) from None

    # under torchrun every process has the summed counts, and rank 0 shows and writes them
    if not is_rank_zero():
        raise typer.Exit(code=1 if result.samples == 0 else 0)
    render_report(result, stdout)
    if settings.report is not None:
        written = write_report(result, settings.report)
        console.print(f"wrote {', '.join(str(path) for path in written)}", highlight=False)
    if result.samples == 0:
        raise fail(f"no sample of the {settings.split!r} split could be decoded; see the skipped samples above")


@app.command()
def predict(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file written by `toolkit train`.", exists=True, dir_okay=False)],
    inputs: Annotated[list[Path], typer.Argument(help="Image files, and folders searched recursively for image files.")],
    config: ConfigOption = None,
    top_k: Annotated[Optional[int], typer.Option(help="Classes to list per image.", min=1)] = None,
    output: Annotated[Optional[Path], typer.Option(help="Write the predictions to this .json or .csv file instead of the screen.", dir_okay=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per batch.", min=1)] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto, bf16, fp16 or fp32.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N.")] = None,
) -> None:
    """Print the top-k classes with probabilities for each image, in any format `pack` accepts.

    A file that cannot be read gets a one-line error on stderr, the other files are still predicted, and the exit code is 1.
    """
    # the option values, read before the imports below add their names to locals()
    overrides = dict(locals())
    for name in ("checkpoint", "inputs", "config"):
        overrides.pop(name)

    from toolkit.config import PredictConfig
    from toolkit.eval import PredictError, find_images, load_predictor, write_predictions
    from toolkit.train import CheckpointError

    try:
        settings = resolve(PredictConfig, config, overrides, "predict")
        predictor = load_predictor(checkpoint, settings)
    except (ConfigError, CheckpointError, PredictError) as error:
        raise fail(str(error)) from None
    items = find_images(inputs)
    if not items:
        raise fail(f"no image files found in {', '.join(str(path) for path in inputs)}")

    # predict, printing each result as it comes unless it goes to a file
    results = []
    for result in predictor.predict(items):
        results.append(result)
        if result.error is not None:
            console.print(f"[bold red]error:[/] {escape(f'{result.path}: {result.error}')}", highlight=False, soft_wrap=True)
        elif settings.output is None:
            stdout.print(str(result.path), markup=False, highlight=False, soft_wrap=True)
            for rank, score in enumerate(result.top, start=1):
                stdout.print(f"  {rank}. {100 * score.probability:6.2f}%  {score.name}", markup=False, highlight=False, soft_wrap=True)

    failed = sum(result.error is not None for result in results)
    if settings.output is not None:
        write_predictions(results, settings.output, checkpoint, settings.top_k)
        errors = "error" if failed == 1 else "errors"
        console.print(f"wrote {len(results) - failed} predictions and {failed} {errors} to {settings.output}", highlight=False)
    if failed:
        raise fail(f"{failed} of {len(results)} files could not be predicted")


@app.command()
def plan(
    dataset: Annotated[Optional[str], typer.Argument(help="Dataset (a directory, http(s) URL prefix or pipe: command, as for `train`) whose manifest gives the number of classes; or pass --classes.")] = None,
    classes: Annotated[Optional[int], typer.Option("--classes", help="Number of classes, instead of a DATASET.", min=1)] = None,
    config: ConfigOption = None,
    arch: Annotated[Optional[str], typer.Option(help="torchvision ResNet: resnet18, resnet34, resnet50, resnet101 or resnet152.")] = None,
    embedding_dim: Annotated[Optional[int], typer.Option(help="Embedding size D of the neck; 0 uses the raw backbone features.", min=0)] = None,
    head: Annotated[Optional[str], typer.Option(help="Class head: linear, cosface or arcface.")] = None,
    checkpointing: Annotated[Optional[str], typer.Option(help="Activation checkpointing: none, stage or block.")] = None,
    class_chunk: Annotated[Optional[int], typer.Option(help="Classes per chunk of the cross-entropy.", min=1)] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Training crop size in pixels.", min=16)] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per micro-batch.", min=1)] = None,
    optimizer: Annotated[Optional[str], typer.Option(help="sgd (with momentum) or adamw.")] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="Weight decay; 0 lets SGD skip a copy of the gradients.", min=0.0)] = None,
    grad_accum: Annotated[Optional[int], typer.Option(help="Micro-batches per optimizer step.", min=1)] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto, bf16, fp16 or fp32.")] = None,
    gpu_memory: Annotated[Optional[str], typer.Option(help="Memory of one GPU, such as 11GiB, 11GB or 11000MiB; default: the current CUDA device's total memory.")] = None,
    world_size: Annotated[Optional[int], typer.Option(help="GPUs that share the class matrix by class range; the plan is per GPU.", min=1)] = None,
    class_sample_rate: Annotated[Optional[float], typer.Option(help="Fraction of each GPU's classes one step uses; shrinks the class gradient and loss work, not the class matrix or its optimizer state.", min=0.0, max=1.0)] = None,
    fused_head_update: Annotated[Optional[bool], typer.Option("--fused-head-update", help="Apply SGD to the class matrix inside the loss's backward pass, so no class matrix gradient exists.")] = None,
    naive: Annotated[Optional[bool], typer.Option("--naive", help="Plan a plain run instead: full linear layer with all B x C logits, fp32 Adam, no checkpointing.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON on stdout; sizes in bytes.")] = False,
) -> None:
    """Plan the GPU memory of a training run: memory by part, whether it fits, the largest batch, and changes that make it fit.

    Reads the train and plan tables of --config. Exits with 1 when the run does not fit.
    """
    # the option values, read before the imports below add their names to locals()
    options = dict(locals())
    plan_keys = ("gpu_memory", "world_size", "naive")
    plan_overrides = {key: options.pop(key) for key in plan_keys}
    train_overrides = {key: value for key, value in options.items() if key not in ("dataset", "classes", "config", "as_json")}

    from toolkit.config import PlanConfig
    from toolkit.dataset import load_dataset
    from toolkit.plan import PlanError, SizeError, plan_run
    from toolkit.plan.render import render_plan

    try:
        if (dataset is None) == (classes is None):
            raise ConfigError("pass either a DATASET directory or --classes N, to give the number of classes")
        num_classes = classes if classes is not None else load_dataset(dataset).num_classes
        train_settings = resolve(TrainConfig, config, train_overrides, "train")
        plan_settings = resolve(PlanConfig, config, plan_overrides, "plan")
        result = plan_run(train_settings, plan_settings, num_classes)
    except (ConfigError, DatasetError, PlanError, SizeError) as error:
        raise fail(str(error)) from None

    if as_json:
        stdout.print_json(json.dumps(result.to_dict()))
    else:
        render_plan(result, stdout)
    if not result.fits:
        raise typer.Exit(code=1)

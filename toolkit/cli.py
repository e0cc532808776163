"""The `toolkit` command line: one thin function per command.

Each function resolves its settings (defaults, then `--config`, then flags), calls the library
and renders the result. Only this module prints or installs a log handler.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler

from toolkit.config import ConfigError, PackConfig, resolve
from toolkit.dataset import DatasetError

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
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False, rich_tracebacks=False)],
        force=True,
    )


def fail(message: str) -> typer.Exit:
    """Print an error on stderr and return the exit to raise."""
    console.print(f"[bold red]error:[/] {message}", highlight=False)
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
    from toolkit.pack import PackError, run_pack
    from toolkit.pack.report import render_summary

    overrides = dict(locals())
    for name in ("src", "out", "config", "as_json"):
        overrides.pop(name)
    overrides["classes_file"] = overrides.pop("classes")
    try:
        settings = resolve(PackConfig, config, overrides, "pack")
        summary = run_pack(src, out, settings, show_progress=not as_json)
    except (ConfigError, DatasetError, PackError) as error:
        raise fail(str(error)) from None

    if as_json:
        stdout.print_json(json.dumps(summary.to_dict()))
    else:
        render_summary(summary, stdout)
    if summary.failed:
        raise typer.Exit(code=1)


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

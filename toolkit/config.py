"""Typed settings for each command, resolved from defaults, a TOML file and command-line flags.

A config file contains one table per command (`[pack]`, `[train]`, `[eval]`, `[predict]`,
`[plan]`). A command reads its own table, and `plan` also reads `[train]` because it plans a
training run. Flags given on the command line win over the file, and the file wins over the
defaults. A key that the command does not know is an error, so a typo never goes unnoticed.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import tomli_w

SECTIONS = ("pack", "train", "eval", "predict", "plan")


class ConfigError(ValueError):
    """An invalid config file or option value; the message names the key and the fix."""


# ---------------------------------------------------------------------------------------------
# settings


ResizeMode = Literal["keep", "shorter", "fit", "center-crop"]


@dataclass
class PackConfig:
    """Settings of `toolkit pack`."""

    # sources
    classes_file: Path | None = None
    # splits, as fractions of each class
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    split_seed: int = 0
    # images
    resize: ResizeMode = "keep"
    size: int = 0
    jpeg_quality: int = 90
    max_pixels: int = 89_478_485  # Pillow's own decompression-bomb limit
    background: tuple[int, int, int] = (255, 255, 255)
    # shards
    shard_max_samples: int = 10_000
    shard_max_bytes: int = 1_000_000_000
    shuffle_seed: int = 0
    # run control
    workers: int = 0  # 0 means one worker per core
    strict: bool = False
    overwrite: bool = False


Arch = Literal["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
Precision = Literal["auto", "bf16", "fp16", "fp32"]
Checkpointing = Literal["none", "stage", "block"]
HeadType = Literal["linear", "cosface", "arcface"]
OptimizerName = Literal["sgd", "adamw"]


@dataclass
class TrainConfig:
    """Settings of `toolkit train`."""

    # model
    arch: Arch = "resnet50"
    pretrained: Path | None = None
    embedding_dim: int = 512  # 0 uses the backbone's raw features without a neck
    head: HeadType = "linear"
    margin: float = 0.2
    scale: float = 30.0
    checkpointing: Checkpointing = "none"
    # loss
    class_chunk: int = 8192
    label_smoothing: float = 0.0
    class_sample_rate: float = 1.0  # fraction of the classes one step uses (sampled softmax); 1 uses all
    fused_head_update: bool = False  # SGD on the class matrix chunk by chunk inside the loss's backward pass
    # input
    image_size: int = 224
    batch_size: int = 64
    workers: int = 4
    shuffle_buffer: int = 2000
    crop_scale_min: float = 0.08  # smallest share of the image area a random resized crop takes
    hflip: bool = True  # random horizontal flip; turn off for images a mirror changes, such as text
    # optimisation
    optimizer: OptimizerName = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-5
    warmup_steps: int = 500
    min_lr: float = 0.0
    grad_accum: int = 1
    clip_grad: float = 0.0  # 0 disables clipping
    max_bad_steps: int = 10
    precision: Precision = "auto"
    # run length and control
    epochs: int = 10
    steps: int = 0  # when > 0, overrides epochs
    val_every: int = 0  # steps between validations; 0 means once per epoch
    save_every: int = 1000
    log_every: int = 20
    seed: int = 0
    device: str = "auto"
    resume: bool = False
    auto_batch: bool = False  # use the largest batch that the memory plan fits on the device


@dataclass
class EvalConfig:
    """Settings of `toolkit eval`."""

    split: Literal["train", "val", "test"] = "test"
    batch_size: int = 128
    workers: int = 4
    image_size: int = 0  # 0 uses the size the checkpoint was trained at
    class_block: int = 20_000
    top_classes: int = 10
    sort_shards: Literal["name", "top1"] = "name"
    report: Path | None = None
    precision: Precision = "auto"
    device: str = "auto"


@dataclass
class PredictConfig:
    """Settings of `toolkit predict`."""

    top_k: int = 5
    output: Path | None = None
    batch_size: int = 32
    precision: Precision = "auto"
    device: str = "auto"


@dataclass
class PlanConfig:
    """Settings of `toolkit plan` besides the `[train]` settings it plans."""

    gpu_memory: str | None = None  # such as "11GiB"; None reads the current CUDA device's memory
    world_size: int = 1  # GPUs that share the class matrix by class range
    naive: bool = False  # plan a plain run instead: full linear layer and logits, fp32 Adam


# ---------------------------------------------------------------------------------------------
# resolution


def load_toml(path: Path) -> dict[str, Any]:
    """Read a config file, raising ConfigError that names the file on a syntax error."""
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"invalid TOML in {path}: {error}") from None


def resolve(
    cls: type,
    config_file: Path | None,
    overrides: dict[str, Any],
    section: str,
    extra_sections: tuple[str, ...] = (),
) -> Any:
    """Build a settings object: defaults, then the file's tables, then non-None overrides."""
    values: dict[str, Any] = {}
    if config_file is not None:
        document = load_toml(config_file)
        _check_sections(document, config_file)
        for name in (*extra_sections, section):
            values.update(document.get(name, {}))
    values.update({key: value for key, value in overrides.items() if value is not None})
    where = f"[{section}] in {config_file}" if config_file else "the command line"
    return build(cls, values, where)


def build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Create `cls` from a mapping, checking every key and value against the field types."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(
            f"unknown option(s) {', '.join(unknown)} in {where}; "
            f"valid options are: {', '.join(sorted(known))}"
        )
    kwargs = {key: _coerce(value, hints[key], key, where) for key, value in values.items()}
    return cls(**kwargs)


def to_toml(settings: Any, section: str) -> str:
    """Return settings as a TOML document with one table, skipping unset optional values."""
    table = {}
    for key, value in dataclasses.asdict(settings).items():
        if value is None:
            continue
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, tuple):
            value = list(value)
        table[key] = value
    return tomli_w.dumps({section: table})


def _check_sections(document: dict[str, Any], path: Path) -> None:
    for key, value in document.items():
        if key not in SECTIONS:
            raise ConfigError(
                f"unknown table or key {key!r} in {path}; put options under one of "
                + ", ".join(f"[{name}]" for name in SECTIONS)
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{key!r} in {path} must be a table such as [{key}]")


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """Convert a TOML or CLI value to the field type, or raise ConfigError naming the key."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)

    if origin in (types.UnionType, typing.Union):
        if value is None:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _coerce(value, inner, key, where)

    if origin is Literal:
        if value not in args:
            allowed = ", ".join(repr(arg) for arg in args)
            raise ConfigError(f"invalid value {value!r} for {key} in {where}; expected one of {allowed}")
        return value

    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"invalid value {value!r} for {key} in {where}; expected {len(args)} numbers")
        return tuple(_coerce(item, arg, key, where) for item, arg in zip(value, args))

    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"invalid value {value!r} for {key} in {where}; expected true or false")
        return value

    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"invalid value {value!r} for {key} in {where}; expected an integer")
        return value

    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"invalid value {value!r} for {key} in {where}; expected a number")
        return float(value)

    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"invalid value {value!r} for {key} in {where}; expected a string")
        return value

    if hint is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"invalid value {value!r} for {key} in {where}; expected a path")
        return Path(value)

    raise TypeError(f"unsupported settings type {hint!r} for {key}")


__all__ = [
    "ConfigError",
    "EvalConfig",
    "PackConfig",
    "PlanConfig",
    "PredictConfig",
    "TrainConfig",
    "build",
    "load_toml",
    "resolve",
    "to_toml",
]

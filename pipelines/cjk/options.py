"""Options and results of a CJK build, and the checks made before any work starts."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipelines.cjk import charsets, holdout


class BuildError(ValueError):
    """An option, font set or output folder that stops the build; the message names the fix."""


@dataclass
class BuildOptions:
    """Settings of one build. Every field except `workers`, `overwrite` and `dry_run` shapes the output."""

    out: Path
    classes: str = charsets.GB2312_LEVEL1
    images_per_face: int = 2
    eval_images_per_face: int = 1
    size: int = 250
    seed: int = 0
    min_faces: int = 3
    limit: int = 0
    font_dirs: list[Path] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)
    test_families: int = 2
    val_families: int = 1
    test_family: list[str] = field(default_factory=list)
    val_family: list[str] = field(default_factory=list)
    min_face_coverage: float = 0.05
    holdout_coverage: float = 0.9
    design_iou: float = holdout.DEFAULT_MIN_IOU
    label: str = "char"
    workers: int = 0
    overwrite: bool = False
    dry_run: bool = False

    def recorded(self) -> dict:
        """Return the options that shape the output, as JSON-ready values."""
        values = asdict(self)
        for name in ("out", "workers", "overwrite", "dry_run"):
            values.pop(name)
        values["font_dirs"] = [str(folder) for folder in self.font_dirs]
        return values


@dataclass
class BuildSummary:
    """The counts of a finished build."""

    out: Path
    classes: int
    samples: dict[str, int]
    faces: dict[str, int]  # split -> faces used
    groups: dict[str, list[str]]  # split -> design group names
    rendered: int
    reused: int
    seconds: float
    dropped_characters: dict[str, int]
    skipped_glyphs: dict[str, int]
    skipped_faces: dict[str, int]

    def to_dict(self) -> dict:
        values = asdict(self)
        values["out"] = str(self.out)
        return values


def check_options(options: BuildOptions) -> None:
    """Raise BuildError for an option value the build cannot use, before any work starts."""
    if options.size < 32:
        raise BuildError(f"--size {options.size} is too small; use at least 32 pixels")
    if options.images_per_face < 1:
        raise BuildError(f"--images-per-face {options.images_per_face} must be at least 1")
    if options.eval_images_per_face < 0:
        raise BuildError(f"--eval-images-per-face {options.eval_images_per_face} must be 0 or more")
    if options.min_faces < 1:
        raise BuildError(f"--min-faces {options.min_faces} must be at least 1")
    if options.limit < 0:
        raise BuildError(f"--limit {options.limit} must be 0 (no limit) or more")
    if options.label not in ("char", "codepoint"):
        raise BuildError(f"invalid --label {options.label!r}; use char or codepoint")
    for name in ("min_face_coverage", "holdout_coverage", "design_iou"):
        value = getattr(options, name)
        if not 0.0 <= value <= 1.0:
            raise BuildError(f"--{name.replace('_', '-')} {value} must lie between 0 and 1")
    for pattern in options.exclude:
        try:
            re.compile(pattern)
        except re.error as error:
            raise BuildError(f"invalid --exclude pattern {pattern!r}: {error}") from None
    try:
        charsets.load_charset(options.classes)
    except charsets.CharsetError as error:
        raise BuildError(str(error)) from None

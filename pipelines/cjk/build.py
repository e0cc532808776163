"""Build a CJK character-recognition image set from the installed fonts.

    python -m pipelines.cjk.build --classes gb2312-1 --out data/cjk-3755

Writes, in OUT:

    images/U+XXXX/FACE-I.jpg   sample I of the character U+XXXX drawn with face FACE
    list.csv                   path,label,split for `toolkit pack` (paths relative to OUT)
    classes.txt                the class names in class-set order, for `toolkit pack --classes`
    faces.csv                  every usable face: file, index, family, design group, split, coverage
    build.json                 the options and fonts, then the counts of the finished build
    coverage-cache/            the coverage of each face, reused by later builds

The stages live in the other modules of pipelines.cjk: see its package docstring.

list.csv is written last, under a temporary name renamed when complete, so a build that stopped
early has none. Running the same command again resumes: images already on disk are kept, since
the same options and fonts give the same bytes. Other options need --overwrite.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import multiprocessing
import os
import struct
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Iterator, Optional

import numpy as np
import typer
from fontTools.ttLib import TTLibError

from pipelines.cjk import charsets, fonts, glyphs, holdout, render
from pipelines.cjk.options import BuildError, BuildOptions, BuildSummary, check_options
from pipelines.cjk.output import (
    COVERAGE_CACHE,
    check_out,
    prepare_out,
    write_atomic,
    write_classes,
    write_faces_csv,
    write_list,
    write_record,
)
from pipelines.cjk.plan import CharacterPlan, Plan, build_plan

logger = logging.getLogger(__name__)

PROGRESS_SECONDS = 30.0

__all__ = ["BuildError", "BuildOptions", "BuildSummary", "app", "run_build"]


# ---------------------------------------------------------------------------------------------
# the build


def run_build(options: BuildOptions) -> BuildSummary:
    """Find the fonts, plan, render every sample and write the outputs; see the module docstring."""
    started = time.monotonic()
    check_options(options)
    if not options.dry_run:
        check_out(options)
    skipped_faces: Counter = Counter()

    # class set and faces
    candidates = charsets.load_charset(options.classes)
    logger.info("class set %s: %d candidate characters", options.classes, len(candidates))
    faces = fonts.find_faces(options.font_dirs or None, exclude=options.exclude, skipped=skipped_faces)
    min_mapped = math.ceil(options.min_face_coverage * len(candidates))
    coverages = measure_faces(faces, candidates, options.workers, options.out / COVERAGE_CACHE, min_mapped)
    faces = usable_faces(faces, coverages, len(candidates), options.min_face_coverage, skipped_faces)
    if not faces:
        searched = ", ".join(map(str, options.font_dirs or fonts.default_font_dirs()))
        raise BuildError(
            f"no face covers {100 * options.min_face_coverage:g}% of the {len(candidates)} characters of "
            f"{options.classes} in {searched}; install CJK fonts (on Debian: apt-get install fonts-noto-cjk "
            "fonts-arphic-ukai fonts-wqy-zenhei, see docs/cjk.md) or pass --font-dir"
        )

    # held-out designs
    groups = holdout.group_designs(faces, coverages, options.design_iou)
    group_splits = holdout.choose_holdout(
        groups,
        options.seed,
        options.test_families,
        options.val_families,
        options.test_family,
        options.val_family,
        options.holdout_coverage,
    )
    face_splits = holdout.split_of_faces(groups, group_splits)
    log_groups(groups, group_splits)

    # plan
    plan = build_plan(
        faces,
        coverages,
        face_splits,
        candidates,
        options.images_per_face,
        options.eval_images_per_face,
        options.min_faces,
        options.limit,
    )
    if not plan.characters:
        raise BuildError(
            f"no character of {options.classes} has {options.min_faces} distinct training faces "
            f"({dict(plan.dropped_characters)}); lower --min-faces or install more CJK fonts"
        )
    planned = plan.samples()
    logger.info(
        "plan: %d classes, %d samples (%s); dropped characters %s; glyphs drawn once %s",
        len(plan.characters),
        sum(planned.values()),
        ", ".join(f"{split} {planned[split]}" for split in holdout.SPLIT_ORDER),
        dict(plan.dropped_characters) or "none",
        dict(plan.skipped_glyphs) or "none",
    )

    # outputs
    fonts_record = [{"name": face.name, "path": face.path, "index": face.index} for face in faces]
    rendered = reused = 0
    if not options.dry_run:
        prepare_out(options, fonts_record)
        write_classes(options.out / "classes.txt", plan, options.label)
        write_faces_csv(options.out / "faces.csv", faces, coverages, groups, face_splits, plan)
        rendered, reused = render_all(plan, faces, options)
        write_list(options.out / "list.csv", plan, faces, options.label)

    summary = BuildSummary(
        out=options.out,
        classes=len(plan.characters),
        samples={split: planned[split] for split in holdout.SPLIT_ORDER},
        faces={split: sum(1 for face in faces if face_splits[face.name] == split) for split in holdout.SPLIT_ORDER},
        groups={split: [name for name, chosen in group_splits.items() if chosen == split] for split in holdout.SPLIT_ORDER},
        rendered=rendered,
        reused=reused,
        seconds=round(time.monotonic() - started, 1),
        dropped_characters=dict(plan.dropped_characters),
        skipped_glyphs=dict(plan.skipped_glyphs),
        skipped_faces=dict(skipped_faces),
    )
    if not options.dry_run:
        write_record(options, fonts_record, summary)
    return summary


# ---------------------------------------------------------------------------------------------
# coverage


def measure_faces(
    faces: list[fonts.Face],
    candidates: list[str],
    workers: int,
    cache_dir: Path | None = None,
    min_mapped: int = 0,
) -> dict[str, glyphs.Coverage]:
    """Measure the coverage of every face, in worker processes, reusing results cached in CACHE_DIR."""
    code_points = [ord(character) for character in candidates]
    coverages = {}
    missing = []
    for face in faces:
        path = cache_dir / f"{glyphs.cache_key(face, code_points, min_mapped)}.npz" if cache_dir else None
        if path is not None and path.is_file():
            coverage = glyphs.load_coverage(path)
            coverages[face.name] = dataclasses.replace(coverage, face=face.name)
        else:
            missing.append((face, path))

    logger.info(
        "checking %d faces against %d characters (%d more from the cache)", len(missing), len(code_points), len(coverages)
    )
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
    tasks = [(face, code_points, min_mapped) for face, _ in missing]
    for number, coverage in enumerate(run_tasks(measure_task, tasks, workers), start=1):
        face, path = missing[number - 1]
        coverages[face.name] = coverage
        if path is not None and not coverage.error:
            glyphs.save_coverage(path, coverage)
        logger.debug("face %d/%d %s covers %d characters", number, len(missing), face.name, len(coverage.code_points))
    return coverages


def measure_task(task: tuple[fonts.Face, list[int], int]) -> glyphs.Coverage:
    """Measure one face; a face whose tables fail to parse comes back empty with the error."""
    face, code_points, min_mapped = task
    try:
        return glyphs.measure_face(face, code_points, min_mapped)
    except (TTLibError, OSError, struct.error, ValueError, KeyError) as error:
        empty = np.zeros(0, dtype=np.int64)
        return glyphs.Coverage(face.name, empty, empty.astype(np.uint64), error=f"{type(error).__name__}: {error}")


def usable_faces(
    faces: list[fonts.Face],
    coverages: dict[str, glyphs.Coverage],
    candidates: int,
    min_fraction: float,
    skipped: Counter,
) -> list[fonts.Face]:
    """Return the faces covering at least MIN_FRACTION of the candidates; count and log the others."""
    kept = []
    for face in faces:
        coverage = coverages[face.name]
        covered = len(coverage.code_points)
        if coverage.error:
            skipped["unreadable-face"] += 1
            logger.warning("skipping face %s in %s: %s", face.name, face.path, coverage.error)
            continue
        if covered < max(min_fraction * candidates, 1):
            skipped["low-coverage"] += 1
            if coverage.mapped:
                logger.info("skipping face %s: its cmap has %d of %d characters", face.name, coverage.mapped, candidates)
            continue
        if coverage.notdef or coverage.blank:
            logger.info(
                "face %s: %d characters map to .notdef and %d draw no ink; they are not rendered with it",
                face.name, coverage.notdef, coverage.blank,
            )
        kept.append(face)
    logger.info("%d faces cover enough characters (%d skipped)", len(kept), skipped["low-coverage"])
    return kept


def log_groups(groups: list[holdout.DesignGroup], group_splits: dict[str, str]) -> None:
    for group in groups:
        logger.info("design %s: %d faces, %s", group.name, len(group.faces), group_splits[group.name])


# ---------------------------------------------------------------------------------------------
# rendering


_worker_faces: list[fonts.Face] = []
_worker_fonts: dict[int, object] = {}
_worker_settings: dict = {}


def init_render_worker(faces: list[fonts.Face], out: Path, size: int, seed: int) -> None:
    """Store what every render task of this process needs; fonts are opened on first use."""
    global _worker_faces, _worker_fonts, _worker_settings
    _worker_faces = faces
    _worker_fonts = {}
    _worker_settings = {"out": out, "size": size, "seed": seed}


def render_character(character_plan: CharacterPlan) -> tuple[int, int]:
    """Render and write every planned sample of one character; return (rendered, reused) counts."""
    character = character_plan.character
    code_point = ord(character)
    folder = _worker_settings["out"] / "images" / charsets.codepoint_name(character)
    folder.mkdir(parents=True, exist_ok=True)
    rendered = reused = 0
    for face_plan in character_plan.faces:
        face = _worker_faces[face_plan.face]
        glyph = None
        for index in range(face_plan.count):
            path = folder / f"{face.name}-{index}.jpg"
            if path.exists():
                reused += 1
                continue
            if glyph is None:
                font = _worker_fonts.get(face_plan.face)
                if font is None:
                    font = _worker_fonts[face_plan.face] = glyphs.open_font(face, render.BASE_EM)
                glyph = render.draw_glyph(font, character)
                if glyph is None:
                    raise BuildError(f"face {face.name} drew U+{code_point:04X} at the probe size but not at {render.BASE_EM} px")
            rng = render.sample_rng(_worker_settings["seed"], code_point, face.name, index)
            pixels, quality = render.render_sample(glyph, rng, _worker_settings["size"])
            write_atomic(path, render.encode_jpeg(pixels, quality))
            rendered += 1
    return rendered, reused


def render_all(plan: Plan, faces: list[fonts.Face], options: BuildOptions) -> tuple[int, int]:
    """Render the plan in worker processes, logging progress; return (rendered, reused) counts."""
    total = sum(plan.samples().values())
    logger.info("rendering %d samples of %d classes into %s", total, len(plan.characters), options.out / "images")
    rendered = reused = 0
    started = last_log = time.monotonic()
    initializer_args = (faces, options.out, options.size, options.seed)
    tasks = run_tasks(render_character, plan.characters, options.workers, init_render_worker, initializer_args)
    for done, (new, old) in enumerate(tasks, start=1):
        rendered += new
        reused += old
        now = time.monotonic()
        if now - last_log >= PROGRESS_SECONDS or done == len(plan.characters):
            last_log = now
            finished = rendered + reused
            rate = rendered / max(now - started, 1e-9)
            remaining = (total - finished) / rate if rate > 0 else 0.0
            logger.info(
                "%d/%d classes, %d/%d samples (%.1f%%), %.0f images/s, about %.0f min left",
                done, len(plan.characters), finished, total, 100 * finished / max(total, 1), rate, remaining / 60,
            )
    return rendered, reused


def run_tasks(function, tasks: list, workers: int, initializer=None, initargs: tuple = ()) -> Iterator:
    """Yield FUNCTION(task) for every task in order, in a pool of WORKERS processes (0: one per core).

    With one worker everything runs in this process, which keeps tests and debugging simple.
    """
    count = workers or os.cpu_count() or 1
    count = min(count, max(len(tasks), 1))
    if count == 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(function, tasks)
        return
    # spawn starts clean interpreters, so no lock or font handle is inherited mid-use
    context = multiprocessing.get_context("spawn")
    with context.Pool(count, initializer=initializer, initargs=initargs) as pool:
        yield from pool.imap(function, tasks, chunksize=1)


# ---------------------------------------------------------------------------------------------
# command line


app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    out: Annotated[Path, typer.Option("--out", help="Folder for images/, list.csv, classes.txt, faces.csv and build.json.")],
    classes: Annotated[str, typer.Option("--classes", help="gb2312-1 (3,755 characters), uro (U+4E00..U+9FFF) or a UTF-8 file with one character per line.")] = charsets.GB2312_LEVEL1,
    images_per_face: Annotated[int, typer.Option(help="Augmented samples per character for each training face.", min=1)] = 2,
    eval_images_per_face: Annotated[int, typer.Option(help="Samples per character for each val or test face.", min=0)] = 1,
    size: Annotated[int, typer.Option(help="Side of the square images in pixels.", min=32)] = 250,
    seed: Annotated[int, typer.Option(help="Seed of the rendering and of the held-out font choice.")] = 0,
    min_faces: Annotated[int, typer.Option(help="Keep a character only if this many distinct training glyphs draw it.", min=1)] = 3,
    limit: Annotated[int, typer.Option(help="Keep only the first N classes; 0 keeps all.", min=0)] = 0,
    font_dir: Annotated[Optional[list[Path]], typer.Option("--font-dir", help="Search only this font folder (repeatable); default: the system and user font folders.")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option("--exclude", help="Leave out faces whose name, family or file matches this regular expression (repeatable).")] = None,
    test_families: Annotated[int, typer.Option(help="Font design groups held out for test.", min=0)] = 2,
    val_families: Annotated[int, typer.Option(help="Font design groups held out for val.", min=0)] = 1,
    test_family: Annotated[Optional[list[str]], typer.Option("--test-family", help="Hold out for test the design groups whose name contains this text (repeatable); replaces --test-families.")] = None,
    val_family: Annotated[Optional[list[str]], typer.Option("--val-family", help="Hold out for val the design groups whose name contains this text (repeatable); replaces --val-families.")] = None,
    min_face_coverage: Annotated[float, typer.Option(help="Skip faces covering less than this fraction of the class set.", min=0.0, max=1.0)] = 0.05,
    holdout_coverage: Annotated[float, typer.Option(help="Hold out only design groups covering this fraction of what all fonts cover.", min=0.0, max=1.0)] = 0.9,
    design_iou: Annotated[float, typer.Option(help="Probe-glyph IoU at which two faces count as one design.", min=0.0, max=1.0)] = holdout.DEFAULT_MIN_IOU,
    label: Annotated[str, typer.Option(help="Class names: char (the character itself) or codepoint (U+XXXX).")] = "char",
    workers: Annotated[int, typer.Option(help="Worker processes; 0 uses one per core.", min=0)] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a build in OUT that used other options or fonts.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Plan and print the counts without rendering; only OUT/coverage-cache is written.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
) -> None:
    """Render a CJK character-recognition image set from the installed fonts, with held-out fonts for val and test."""
    from rich.console import Console
    from rich.logging import RichHandler

    console = Console(stderr=True)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False)],
        force=True,
    )
    options = BuildOptions(
        out=out,
        classes=classes,
        images_per_face=images_per_face,
        eval_images_per_face=eval_images_per_face,
        size=size,
        seed=seed,
        min_faces=min_faces,
        limit=limit,
        font_dirs=list(font_dir or []),
        exclude=list(exclude or []),
        test_families=test_families,
        val_families=val_families,
        test_family=list(test_family or []),
        val_family=list(val_family or []),
        min_face_coverage=min_face_coverage,
        holdout_coverage=holdout_coverage,
        design_iou=design_iou,
        label=label,
        workers=workers,
        overwrite=overwrite,
        dry_run=dry_run,
    )
    try:
        summary = run_build(options)
    except (BuildError, fonts.FontError, holdout.HoldoutError, charsets.CharsetError) as error:
        console.print(f"[bold red]error:[/] {error}", highlight=False)
        raise typer.Exit(code=1) from None
    print(json.dumps(summary.to_dict(), indent=1, ensure_ascii=False))


if __name__ == "__main__":
    app()

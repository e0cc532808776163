"""The files of a build folder: the checks before a build, and the writers of each output.

    images/U+XXXX/FACE-I.jpg   sample I of the character U+XXXX drawn with face FACE
    list.csv                   path,label,split for `toolkit pack` (paths relative to OUT)
    classes.txt                the class names in class-set order, for `toolkit pack --classes`
    faces.csv                  every usable face: file, index, family, design group, split, coverage
    build.json                 the options and fonts, then the counts of the finished build
    coverage-cache/            the coverage of each face, reused by later builds
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path

from pipelines.cjk import charsets, fonts, glyphs, holdout
from pipelines.cjk.options import BuildError, BuildOptions, BuildSummary
from pipelines.cjk.plan import Plan

logger = logging.getLogger(__name__)

OUTPUT_NAMES = ("images", "list.csv", "classes.txt", "faces.csv", "build.json")
# Coverage of each face, keyed by the font file, face and class set; --overwrite keeps it.
COVERAGE_CACHE = "coverage-cache"


def write_atomic(path: Path, data: bytes) -> None:
    """Write DATA under a temporary name in the same folder, then rename it to PATH."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def check_out(options: BuildOptions) -> None:
    """Raise BuildError when OUT contains files this build may not resume or replace."""
    out = options.out
    record_path = out / "build.json"
    if record_path.is_file():
        try:
            recorded = json.loads(record_path.read_text()).get("options", {})
        except json.JSONDecodeError as error:
            raise BuildError(f"invalid JSON in {record_path} ({error}); pass --overwrite to replace the build") from None
        current = options.recorded()
        changed = sorted(key for key in set(recorded) | set(current) if recorded.get(key) != current.get(key))
        if changed and not options.overwrite:
            raise BuildError(
                f"{out} contains a build with other options ({', '.join(changed)}); "
                "pass --overwrite to replace it or choose another --out"
            )
    elif out.exists() and (not out.is_dir() or any(path.name != COVERAGE_CACHE for path in out.iterdir())):
        raise BuildError(f"{out} is not an empty folder and contains no build.json; choose an empty or new folder for --out")


def prepare_out(options: BuildOptions, fonts_record: list[dict]) -> None:
    """Create OUT, resume the build recorded there, or clear it when options or fonts changed.

    `check_out` has already rejected changed options without --overwrite.
    """
    out = options.out
    record_path = out / "build.json"
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("options") == options.recorded() and record.get("fonts") == fonts_record:
            logger.info("resuming the build in %s; images already written are kept", out)
            (out / "list.csv").unlink(missing_ok=True)
            return
        if not options.overwrite:
            raise BuildError(
                f"{out} contains a build made with other fonts (installed or removed since); "
                "pass --overwrite to replace it or choose another --out"
            )
        logger.info("removing the previous build in %s", out)
        for name in OUTPUT_NAMES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)

    out.mkdir(parents=True, exist_ok=True)
    record_path.write_text(json.dumps({"options": options.recorded(), "fonts": fonts_record}, indent=1, ensure_ascii=False))


def write_classes(path: Path, plan: Plan, label_format: str) -> None:
    names = [charsets.class_name(item.character, label_format) for item in plan.characters]
    path.write_text("".join(f"{name}\n" for name in names), encoding="utf-8")


def write_faces_csv(
    path: Path,
    faces: list[fonts.Face],
    coverages: dict[str, glyphs.Coverage],
    groups: list[holdout.DesignGroup],
    face_splits: dict[str, str],
    plan: Plan,
) -> None:
    """Write one row per usable face: where it is, its design group, split and sample count."""
    group_of = {face: group.name for group in groups for face in group.faces}
    samples: Counter = Counter()
    for character in plan.characters:
        for face_plan in character.faces:
            samples[faces[face_plan.face].name] += face_plan.count
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["name", "path", "index", "family", "style", "group", "split", "covered", "notdef", "blank", "samples"])
        for face in faces:
            coverage = coverages[face.name]
            writer.writerow([
                face.name, face.path, face.index, face.family, face.style, group_of[face.name],
                face_splits[face.name], len(coverage.code_points), coverage.notdef, coverage.blank, samples[face.name],
            ])


def write_list(path: Path, plan: Plan, faces: list[fonts.Face], label_format: str) -> None:
    """Write path,label,split for every sample in class order, under a temporary name first."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["path", "label", "split"])
        for character_plan in plan.characters:
            folder = f"images/{charsets.codepoint_name(character_plan.character)}"
            label = charsets.class_name(character_plan.character, label_format)
            for face_plan in character_plan.faces:
                name = faces[face_plan.face].name
                for index in range(face_plan.count):
                    writer.writerow([f"{folder}/{name}-{index}.jpg", label, face_plan.split])
    os.replace(temporary, path)


def write_record(options: BuildOptions, fonts_record: list[dict], summary: BuildSummary) -> None:
    record = {"options": options.recorded(), "fonts": fonts_record, "summary": summary.to_dict()}
    write_atomic(options.out / "build.json", json.dumps(record, indent=1, ensure_ascii=False).encode())

"""Font discovery: the font files under the standard font folders and every face inside them.

A .ttc/.otc collection contains several faces: NotoSansCJK-Regular.ttc contains JP, KR, SC, TC
and HK faces and their Mono variants. Each face becomes its own `Face` with its index in the
collection. A file is treated as a collection when it starts with the `ttcf` tag, whatever
its extension. Files reached through several links are read once.

A file that fontTools cannot parse is skipped with a warning and counted, because one broken
font in a system folder should not stop a build.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import struct
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from fontTools.ttLib import TTLibError
from fontTools.ttLib.ttCollection import TTCollection
from fontTools.ttLib.ttFont import TTFont

logger = logging.getLogger(__name__)

FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")
COLLECTION_TAG = b"ttcf"
OUTLINE_TABLES = frozenset({"glyf", "CFF ", "CFF2"})

# Words dropped from a family name to form its design key, so that variants of one design share
# the key. They are region and script variants (Noto CJK JP/KR/SC/TC/HK, AR PL UKai CN/HK/TW/TW
# MBE), encodings (AR PL KaitiM GB/Big5), spacing variants (Mono, WenQuanYi Zen Hei Sharp) and
# weight names.
DESIGN_NOISE_WORDS = frozenset(
    """
    jp kr sc tc hk cn tw mbe mono sharp big5 gb
    regular normal book roman medium bold light thin black heavy
    demilight semilight extralight ultralight semibold demibold extrabold ultrabold
    """.split()
)


class FontError(ValueError):
    """A font folder that was not found."""


@dataclass(frozen=True)
class Face:
    """One face of a font file, with the names that identify it."""

    path: str  # resolved path of the font file
    index: int  # face index inside a collection, 0 for a single-face file
    name: str  # unique, filesystem-safe name used in image file names
    family: str  # typographic family from the name table (name ID 16, else 1)
    style: str  # subfamily from the name table, such as Regular or Bold
    design: str  # family lower-cased without region, encoding, spacing and weight words


# ---------------------------------------------------------------------------------------------
# font files


def default_font_dirs() -> list[Path]:
    """Return the existing standard font folders of this system, user folders first."""
    home = Path.home()
    data_home = Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share")
    data_dirs = os.environ.get("XDG_DATA_DIRS") or "/usr/local/share:/usr/share"
    candidates = [data_home / "fonts", home / ".fonts"]
    candidates += [Path(folder) / "fonts" for folder in data_dirs.split(":") if folder]
    if sys.platform == "darwin":
        candidates += [home / "Library" / "Fonts", Path("/Library/Fonts"), Path("/System/Library/Fonts")]
    if sys.platform == "win32":
        candidates.append(Path(os.environ.get("WINDIR", "C:\\Windows")) / "Fonts")

    folders: list[Path] = []
    for folder in candidates:
        if folder.is_dir() and folder.resolve() not in [known.resolve() for known in folders]:
            folders.append(folder)
    return folders


def find_font_files(font_dirs: list[Path], use_fontconfig: bool = False) -> list[Path]:
    """Return the resolved font files under FONT_DIRS (and from fc-list if asked), sorted."""
    files: set[Path] = set()
    for folder in font_dirs:
        if not folder.is_dir():
            raise FontError(f"font folder {folder} not found; pass an existing folder to --font-dir")
        for root, _, names in os.walk(folder, followlinks=True):
            for name in names:
                if name.lower().endswith(FONT_SUFFIXES):
                    path = Path(root, name)
                    if path.is_file():
                        files.add(path.resolve())
    if use_fontconfig:
        files.update(list_fontconfig_files())
    return sorted(files)


def list_fontconfig_files() -> set[Path]:
    """Return the font files that fontconfig's fc-list reports, or nothing when it is missing."""
    program = shutil.which("fc-list")
    if program is None:
        return set()
    try:
        output = subprocess.run(
            [program, "--format", "%{file}\n"], capture_output=True, text=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("fc-list failed (%s); using the font folders only", error)
        return set()
    files = set()
    for line in output.splitlines():
        path = Path(line.strip())
        if line.strip().lower().endswith(FONT_SUFFIXES) and path.is_file():
            files.add(path.resolve())
    return files


# ---------------------------------------------------------------------------------------------
# faces


def read_faces(path: Path, unreadable: Counter | None = None) -> list[Face]:
    """Return the faces of one font file with provisional names, or none if it cannot be parsed."""
    try:
        with open(path, "rb") as file:
            is_collection = file.read(4) == COLLECTION_TAG
        if is_collection:
            with TTCollection(str(path), lazy=True) as collection:
                return [describe_face(path, index, font) for index, font in enumerate(collection.fonts)]
        with TTFont(str(path), lazy=True) as font:
            return [describe_face(path, 0, font)]
    except (TTLibError, OSError, struct.error, ValueError, KeyError) as error:
        logger.warning("skipping font file %s: %s", path, error)
        if unreadable is not None:
            unreadable["unreadable-font-file"] += 1
        return []


def describe_face(path: Path, index: int, font: TTFont) -> Face:
    """Read the family, style and PostScript names of one face from its name table.

    Raises TTLibError when the face lacks a character map or outlines, which every face the
    builder draws with needs.
    """
    tables = set(font.reader.keys())
    if "cmap" not in tables or not tables & OUTLINE_TABLES:
        raise TTLibError(f"face {index} has no cmap table or no outlines (glyf, CFF or CFF2)")
    names = font["name"] if "name" in font else None
    family = (names.getBestFamilyName() if names else None) or path.stem
    style = (names.getBestSubFamilyName() if names else None) or ""
    postscript = (names.getDebugName(6) if names else None) or f"{path.stem}-{index}"
    return Face(
        path=str(path),
        index=index,
        name=safe_name(postscript),
        family=family,
        style=style,
        design=design_key(family),
    )


def safe_name(text: str) -> str:
    """Return TEXT with every character outside [A-Za-z0-9_] replaced by an underscore."""
    return re.sub(r"[^A-Za-z0-9_]", "_", text).strip("_") or "face"


def design_key(family: str) -> str:
    """Return the family name lower-cased, without region, encoding, spacing and weight words."""
    words = [word for word in re.split(r"[\s_\-]+", family.lower()) if word]
    kept = [word for word in words if word not in DESIGN_NOISE_WORDS]
    return " ".join(kept or words)


def unique_names(faces: list[Face]) -> list[Face]:
    """Return FACES with repeated names suffixed _2, _3 ... in the order given."""
    counts: Counter = Counter()
    renamed = []
    for face in faces:
        counts[face.name] += 1
        if counts[face.name] > 1:
            face = Face(face.path, face.index, f"{face.name}_{counts[face.name]}", face.family, face.style, face.design)
        renamed.append(face)
    return renamed


def find_faces(
    font_dirs: list[Path] | None = None,
    use_fontconfig: bool = True,
    exclude: list[str] = (),
    skipped: Counter | None = None,
) -> list[Face]:
    """Return every face of every font file found, ordered by file and index, with unique names.

    With no FONT_DIRS the standard font folders and fc-list (when installed) are searched.
    A face is left out when any EXCLUDE pattern (a regular expression, case-insensitive) matches
    its name, family or file path.
    """
    searched = font_dirs if font_dirs else default_font_dirs()
    files = find_font_files(searched, use_fontconfig=use_fontconfig and not font_dirs)
    patterns = [re.compile(pattern, re.IGNORECASE) for pattern in exclude]

    faces = []
    for path in files:
        for face in read_faces(path, skipped):
            if any(pattern.search(text) for pattern in patterns for text in (face.name, face.family, face.path)):
                if skipped is not None:
                    skipped["excluded"] += 1
                continue
            faces.append(face)
    logger.info("found %d faces in %d font files under %s", len(faces), len(files), ", ".join(map(str, searched)))
    return unique_names(faces)

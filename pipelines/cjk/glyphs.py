"""Coverage of each face: which candidate characters it really draws, and what they look like.

A character counts as covered by a face only when two checks pass. The face's character map
(cmap, read with fontTools) must map it to a glyph other than glyph 0, the .notdef "tofu" box.
fontTools 4.68 already leaves out cmap entries that point to glyph 0, and FreeType would draw the
box for them. The glyph must also leave ink when FreeType draws it, because some fonts map
characters to empty placeholder glyphs.

Every covered glyph is drawn once at PROBE_EM pixels on a fixed canvas, and a 64-bit hash of that
bitmap is kept. Equal hashes mean the same outline at the same place. That is the case for most
characters in the JP/KR/SC/TC/HK faces of a Noto CJK collection, and the build renders such a
glyph once. The DESIGN_PROBE characters are also kept as small normalised bitmaps, which
`holdout` compares to find faces that share a design under different names.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from fontTools.ttLib.ttFont import TTFont
from PIL import Image, ImageDraw, ImageFont

from pipelines.cjk.fonts import Face

PROBE_EM = 64  # pixels per em of the coverage and probe rendering
PROBE_CANVAS = 96  # side of the square canvas the probe glyph is centred on
PROBE_GRID = 32  # side of the normalised bitmap compared between faces

# Common characters of Chinese and Japanese text, so faces of either can be compared. All are in
# Big5 and JIS X 0208, and all but 見 and 長 are in GB2312.
DESIGN_PROBE = (
    "一二三四五六七八九十百千人大天日月山水火木金土上下中小口目耳手足心田力工子女"
    "王玉石竹米羽雨光年本文字生出入立正右左白赤青花草林森村川空先見名前後高長明"
)


@dataclass
class Coverage:
    """The covered candidates of one face, their bitmap hashes and the design probe bitmaps."""

    face: str
    code_points: np.ndarray  # (N,) int64, in candidate order
    hashes: np.ndarray  # (N,) uint64, never 0
    notdef: int = 0  # candidates the cmap maps to glyph 0
    blank: int = 0  # candidates whose glyph draws no ink
    mapped: int = 0  # candidates the cmap maps to a real glyph, drawn or not
    error: str = ""  # why the face could not be read, when it could not
    probes: dict[str, np.ndarray] = field(default_factory=dict)  # character -> (PROBE_GRID, PROBE_GRID) bool


def open_font(face: Face, size: int) -> ImageFont.FreeTypeFont:
    """Open FACE with Pillow at SIZE pixels per em, without text shaping (one glyph at a time)."""
    return ImageFont.truetype(face.path, size, index=face.index, layout_engine=ImageFont.Layout.BASIC)


def draw_probe(font: ImageFont.FreeTypeFont, character: str) -> Image.Image:
    """Draw CHARACTER centred on a PROBE_CANVAS square "L" image, white ink on black."""
    image = Image.new("L", (PROBE_CANVAS, PROBE_CANVAS), 0)
    ImageDraw.Draw(image).text((PROBE_CANVAS / 2, PROBE_CANVAS / 2), character, font=font, fill=255, anchor="mm")
    return image


def bitmap_hash(image: Image.Image) -> int:
    """Return a non-zero 64-bit hash of the image's pixels (0 marks "not covered" elsewhere)."""
    digest = hashlib.blake2b(image.tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") or 1


def normalise_probe(image: Image.Image, bbox: tuple[int, int, int, int]) -> np.ndarray:
    """Crop the ink box, scale it to PROBE_GRID squared and threshold it: (PROBE_GRID, PROBE_GRID) bool."""
    cropped = image.crop(bbox).resize((PROBE_GRID, PROBE_GRID), Image.Resampling.BILINEAR)
    return np.asarray(cropped) > 100


def mapped_glyphs(face: Face, code_points: Sequence[int]) -> tuple[list[int], set[int]]:
    """Return the code points that FACE's cmap maps to a real glyph, and those it maps to glyph 0."""
    with TTFont(face.path, fontNumber=face.index, lazy=True) as font:
        cmap = font.getBestCmap() or {}
        mapped = []
        notdef = set()
        for code_point in code_points:
            glyph_name = cmap.get(code_point)
            if glyph_name is None:
                continue
            if font.getGlyphID(glyph_name) == 0:
                notdef.add(code_point)
            else:
                mapped.append(code_point)
    return mapped, notdef


def measure_face(face: Face, candidates: Sequence[int], min_mapped: int = 0) -> Coverage:
    """Check FACE's cmap against the candidates and draw each mapped glyph once.

    The design probe characters are drawn too when they are not candidates, because they
    describe the design whatever the class set is. A face whose cmap maps fewer than MIN_MAPPED
    candidates is not drawn at all and comes back with no covered characters.
    """
    candidate_set = set(candidates)
    extra_probes = [ord(character) for character in DESIGN_PROBE if ord(character) not in candidate_set]
    mapped, notdef = mapped_glyphs(face, [*candidates, *extra_probes])
    mapped_candidates = sum(1 for code_point in mapped if code_point in candidate_set)
    if mapped_candidates < min_mapped:
        empty = np.zeros(0, dtype=np.int64)
        return Coverage(face.name, empty, empty.astype(np.uint64), len(notdef & candidate_set), 0, mapped_candidates)
    font = open_font(face, PROBE_EM)
    probe_set = set(DESIGN_PROBE)

    code_points = []
    hashes = []
    blank = 0
    probes = {}
    for code_point in mapped:
        character = chr(code_point)
        image = draw_probe(font, character)
        bbox = image.getbbox()
        is_candidate = code_point in candidate_set
        if bbox is None:
            blank += is_candidate
            continue
        if is_candidate:
            code_points.append(code_point)
            hashes.append(bitmap_hash(image))
        if character in probe_set:
            probes[character] = normalise_probe(image, bbox)

    return Coverage(
        face=face.name,
        code_points=np.asarray(code_points, dtype=np.int64),
        hashes=np.asarray(hashes, dtype=np.uint64),
        notdef=len(notdef & candidate_set),
        blank=blank,
        mapped=mapped_candidates,
        probes=probes,
    )


# ---------------------------------------------------------------------------------------------
# cache

CACHE_VERSION = 1  # raise when the probe rendering or the Coverage fields change


def cache_key(face: Face, candidates: Sequence[int], min_mapped: int) -> str:
    """Return a digest of everything a face's coverage depends on: file identity, face and candidates."""
    status = Path(face.path).stat()
    text = json.dumps([CACHE_VERSION, face.path, face.index, status.st_size, status.st_mtime_ns, PROBE_EM, min_mapped])
    digest = hashlib.sha256(text.encode())
    digest.update(np.asarray(candidates, dtype=np.int64).tobytes())
    return digest.hexdigest()[:32]


def save_coverage(path: Path, coverage: Coverage) -> None:
    """Write a coverage to an .npz file under a temporary name, then rename it."""
    characters = sorted(coverage.probes)
    bitmaps = np.stack([coverage.probes[c] for c in characters]) if characters else np.zeros((0, PROBE_GRID, PROBE_GRID), bool)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(
        temporary,
        face=coverage.face,
        code_points=coverage.code_points,
        hashes=coverage.hashes,
        counts=np.asarray([coverage.notdef, coverage.blank, coverage.mapped], dtype=np.int64),
        probe_characters="".join(characters),
        probe_bitmaps=bitmaps,
    )
    os.replace(temporary, path)


def load_coverage(path: Path) -> Coverage:
    """Read a coverage written by `save_coverage`."""
    with np.load(path) as data:
        notdef, blank, mapped = data["counts"].tolist()
        characters = str(data["probe_characters"])
        bitmaps = data["probe_bitmaps"]
        return Coverage(
            face=str(data["face"]),
            code_points=data["code_points"],
            hashes=data["hashes"],
            notdef=notdef,
            blank=blank,
            mapped=mapped,
            probes={character: bitmaps[index] for index, character in enumerate(characters)},
        )

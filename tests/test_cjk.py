"""Tests of the CJK font-rendering dataset builder (pipelines/cjk).

Most tests use small TrueType fonts that fontTools builds here, so they need no installed font:
each glyph is a few rectangles, one glyph draws nothing, one character maps to .notdef, and one
file is a two-face .ttc collection. One test renders with a real CJK font from the system and
is skipped where none is installed.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import struct
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from fontTools.fontBuilder import FontBuilder
from fontTools.pens.ttGlyphPen import TTGlyphPen
from fontTools.ttLib import TTFont
from fontTools.ttLib.tables.DefaultTable import DefaultTable
from fontTools.ttLib.ttCollection import TTCollection
from PIL import Image
from typer.testing import CliRunner

from pipelines.cjk import charsets, fonts, glyphs, holdout, render
from pipelines.cjk.build import BuildError, BuildOptions, app, run_build

# The ten numerals are DESIGN_PROBE characters, enough for the glyph comparison of `holdout`.
NUMERALS = "一二三四五六七八九十"
MISSING_IN_BETA = "大"
BLANK = "口"  # mapped to a glyph without contours in the Alpha faces
NOTDEF = "日"  # mapped to glyph 0 in the Alpha faces
CHARACTERS = NUMERALS + MISSING_IN_BETA


# ---------------------------------------------------------------------------------------------
# generated fonts


def rectangles(design: int, character: str, bold: int) -> list[tuple[int, int, int, int]]:
    """Return the rectangles of a glyph: 3 to 5 boxes fixed by (design, character), widened by BOLD units."""
    rng = np.random.default_rng([design, ord(character)])
    boxes = []
    for _ in range(int(rng.integers(3, 6))):
        x, y = rng.integers(50, 650, size=2)
        width, height = rng.integers(120, 300, size=2)
        boxes.append((int(x) - bold, int(y) - bold, int(x + width) + bold, int(y + height) + bold))
    return boxes


def make_font(family: str, style: str, design: int, characters: str, bold: int = 0, blank: str = "", notdef: str = "") -> TTFont:
    """Build a TrueType font whose glyphs are the rectangles of DESIGN for CHARACTERS.

    BLANK is mapped to a glyph without contours and NOTDEF to glyph 0 (.notdef).
    """
    names = [".notdef"] + [f"uni{ord(c):04X}" for c in characters] + (["blank"] if blank else [])
    builder = FontBuilder(unitsPerEm=1000, isTTF=True)
    builder.setupGlyphOrder(names)
    cmap = {ord(c): f"uni{ord(c):04X}" for c in characters}
    if blank:
        cmap[ord(blank)] = "blank"
    builder.setupCharacterMap(cmap)

    outlines = {}
    for name in names:
        pen = TTGlyphPen(None)
        if name == ".notdef":
            boxes = [(100, 0, 900, 60), (100, 740, 900, 800), (100, 0, 160, 800), (840, 0, 900, 800)]
        elif name == "blank":
            boxes = []
        else:
            boxes = rectangles(design, chr(int(name[3:], 16)), bold)
        for left, bottom, right, top in boxes:
            pen.moveTo((left, bottom))
            pen.lineTo((left, top))
            pen.lineTo((right, top))
            pen.lineTo((right, bottom))
            pen.closePath()
        outlines[name] = pen.glyph()
    builder.setupGlyf(outlines)
    builder.setupHorizontalMetrics({name: (1000, 0) for name in names})
    builder.setupHorizontalHeader(ascent=880, descent=-120)
    postscript = f"{family.replace(' ', '')}-{style}"
    builder.setupNameTable({"familyName": family, "styleName": style, "psName": postscript})
    builder.setupOS2(sTypoAscender=880, sTypoDescender=-120, usWinAscent=880, usWinDescent=120)
    builder.setupPost()
    font = builder.font
    if notdef:
        # fontTools never writes a cmap entry for glyph 0, so the table is written by hand
        glyph_ids = {code_point: font.getGlyphID(name) for code_point, name in cmap.items()}
        glyph_ids[ord(notdef)] = 0
        table = DefaultTable("cmap")
        table.data = cmap_format4(glyph_ids)
        font["cmap"] = table
    return font


def cmap_format4(glyph_ids: dict[int, int]) -> bytes:
    """Return a cmap table with one Windows Unicode BMP format 4 subtable, one segment per code point."""
    segments = [(code, code, (glyph_ids[code] - code) % 65536) for code in sorted(glyph_ids)]
    segments.append((0xFFFF, 0xFFFF, 1))
    count = len(segments)
    body = struct.pack(">4H", 2 * count, 0, 0, 0)  # searchRange, entrySelector, rangeShift: 0 works with FreeType
    body += b"".join(struct.pack(">H", end) for _, end, _ in segments) + b"\0\0"
    body += b"".join(struct.pack(">H", start) for start, _, _ in segments)
    body += b"".join(struct.pack(">H", delta) for _, _, delta in segments)
    body += b"".join(struct.pack(">H", 0) for _ in segments)
    subtable = struct.pack(">3H", 4, 6 + len(body), 0) + body
    return struct.pack(">2H", 0, 1) + struct.pack(">2HI", 3, 1, 12) + subtable


@pytest.fixture(scope="module")
def font_dir(tmp_path_factory) -> Path:
    """A folder of generated fonts: four designs in six faces, two of them in one .ttc."""
    folder = tmp_path_factory.mktemp("fonts")
    make_font("Test Alpha", "Regular", 1, CHARACTERS, blank=BLANK, notdef=NOTDEF).save(folder / "alpha.ttf")
    make_font("Test Alpha", "Bold", 1, CHARACTERS, bold=40, blank=BLANK, notdef=NOTDEF).save(folder / "alpha-bold.ttf")
    collection = TTCollection()
    collection.fonts = [
        make_font("Test Beta", "Regular", 2, NUMERALS),
        make_font("Test Gamma", "Regular", 3, CHARACTERS),
    ]
    collection.save(folder / "pair.ttc")
    make_font("Test Delta", "Regular", 4, CHARACTERS).save(folder / "delta.ttf")
    # Echo is Delta's design under another name, as a font derived from another can be
    make_font("Test Echo", "Regular", 4, CHARACTERS).save(folder / "echo.otf")
    (folder / "readme.txt").write_text("not a font")
    return folder


@pytest.fixture(scope="module")
def charset_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("charset") / "characters.txt"
    path.write_text("\n".join(CHARACTERS + BLANK + NOTDEF) + "\n", encoding="utf-8")
    return path


def options_for(out: Path, font_dir: Path, charset_file: Path, **changes) -> BuildOptions:
    values = dict(
        out=out,
        classes=str(charset_file),
        font_dirs=[font_dir],
        images_per_face=2,
        eval_images_per_face=1,
        min_faces=1,
        test_families=1,
        val_families=1,
        workers=1,
    )
    values.update(changes)
    return BuildOptions(**values)


def read_list(out: Path) -> list[dict]:
    with open(out / "list.csv", newline="", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def face_of(row: dict) -> str:
    """Return the face name of a list.csv row: the image file name without "-INDEX.jpg"."""
    return Path(row["path"]).stem.rsplit("-", 1)[0]


def file_digests(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and path.name != "build.json" and "coverage-cache" not in path.parts
    }


# ---------------------------------------------------------------------------------------------
# class sets


def test_gb2312_level1_size():
    characters = charsets.gb2312_level1()
    assert len(characters) == 3755
    assert len(set(characters)) == 3755
    assert characters[0] == "啊"
    assert characters[-1] == "座"


def test_gb2312_level1_codes():
    codes = [character.encode("gb2312") for character in charsets.gb2312_level1()]
    assert all(0xB0A1 <= int.from_bytes(code, "big") <= 0xD7F9 for code in codes)
    assert codes == sorted(codes)


def test_uro_block():
    characters = charsets.unified_ideographs()
    assert len(characters) == 0x9FFF - 0x4E00 + 1
    assert characters[0] == "\u4e00"
    assert characters[-1] == "\u9fff"


def test_charset_file_rejects_comma(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("一\n,\n", encoding="utf-8")
    with pytest.raises(charsets.CharsetError, match=r"bad.txt:2"):
        charsets.read_charset_file(path)


def test_charset_file_rejects_repeat(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("一\n二\n一\n", encoding="utf-8")
    with pytest.raises(charsets.CharsetError, match=r"bad.txt:3.*repeats line 1"):
        charsets.read_charset_file(path)


def test_charset_unknown_name():
    with pytest.raises(charsets.CharsetError, match="gb2312-1 or uro"):
        charsets.load_charset("gb2312-2")


# ---------------------------------------------------------------------------------------------
# fonts and coverage


def test_find_faces_reads_collection(font_dir):
    faces = fonts.find_faces([font_dir])
    by_family = {face.family: face for face in faces}
    assert len(faces) == 6
    assert by_family["Test Beta"].path.endswith("pair.ttc")
    assert by_family["Test Beta"].index == 0
    assert by_family["Test Gamma"].path.endswith("pair.ttc")
    assert by_family["Test Gamma"].index == 1
    assert len({face.name for face in faces}) == 6


def test_find_faces_link_read_once(font_dir, tmp_path):
    (tmp_path / "link.ttf").symlink_to(font_dir / "delta.ttf")
    shutil.copy(font_dir / "alpha.ttf", tmp_path / "copy.ttf")
    faces = fonts.find_faces([font_dir, tmp_path])
    assert sum(face.family == "Test Delta" for face in faces) == 1
    # a second copy of a file is a second face, with a name made unique
    alpha = sorted(face.name for face in faces if face.family == "Test Alpha" and face.style == "Regular")
    assert alpha == ["TestAlpha_Regular", "TestAlpha_Regular_2"]


def test_find_faces_exclude(font_dir):
    faces = fonts.find_faces([font_dir], exclude=["gamma", r"echo\.otf$"])
    families = {face.family for face in faces}
    assert "Test Gamma" not in families
    assert "Test Echo" not in families
    assert "Test Beta" in families


def test_find_faces_skips_broken_file(font_dir, tmp_path):
    shutil.copy(font_dir / "delta.ttf", tmp_path / "delta.ttf")
    (tmp_path / "broken.ttf").write_bytes(b"\x00\x01\x00\x00" + b"\x00" * 20)
    skipped = Counter()
    faces = fonts.find_faces([tmp_path], skipped=skipped)
    assert [face.family for face in faces] == ["Test Delta"]
    assert skipped["unreadable-font-file"] == 1


def test_missing_font_dir(tmp_path):
    with pytest.raises(fonts.FontError, match="not found"):
        fonts.find_faces([tmp_path / "absent"])


def test_design_key_drops_variants():
    assert fonts.design_key("Noto Sans Mono CJK SC") == "noto sans cjk"
    assert fonts.design_key("AR PL UKai TW MBE") == "ar pl ukai"
    assert fonts.design_key("AR PL KaitiM Big5") == fonts.design_key("AR PL KaitiM GB")
    assert fonts.design_key("LXGW WenKai Mono") == "lxgw wenkai"


def test_coverage_checks_cmap(font_dir):
    faces = {face.family + " " + face.style: face for face in fonts.find_faces([font_dir])}
    candidates = [ord(c) for c in CHARACTERS + BLANK + NOTDEF]

    alpha = glyphs.measure_face(faces["Test Alpha Regular"], candidates)
    assert set(alpha.code_points.tolist()) == {ord(c) for c in CHARACTERS}
    assert alpha.blank == 1
    assert alpha.mapped == len(CHARACTERS) + 1

    beta = glyphs.measure_face(faces["Test Beta Regular"], candidates)
    assert ord(MISSING_IN_BETA) not in beta.code_points.tolist()
    assert set(beta.code_points.tolist()) == {ord(c) for c in NUMERALS}
    assert beta.blank == 0


def test_coverage_skips_notdef_entry(font_dir):
    face = next(face for face in fonts.find_faces([font_dir]) if face.name == "TestAlpha_Regular")
    # FreeType follows the entry and draws the .notdef box, so ink alone would accept it
    drawn = glyphs.draw_probe(glyphs.open_font(face, glyphs.PROBE_EM), NOTDEF)
    assert drawn.getbbox() is not None
    coverage = glyphs.measure_face(face, [ord(NOTDEF)])
    assert coverage.code_points.tolist() == []
    assert coverage.mapped == 0


def test_coverage_hash_same_outline(font_dir):
    faces = {face.family: face for face in fonts.find_faces([font_dir])}
    candidates = [ord(c) for c in CHARACTERS]
    delta = glyphs.measure_face(faces["Test Delta"], candidates)
    echo = glyphs.measure_face(faces["Test Echo"], candidates)
    gamma = glyphs.measure_face(faces["Test Gamma"], candidates)
    assert delta.hashes.tolist() == echo.hashes.tolist()
    assert all(a != b for a, b in zip(delta.hashes.tolist(), gamma.hashes.tolist()))
    assert 0 not in delta.hashes.tolist()


def test_coverage_skips_sparse_face(font_dir):
    face = next(face for face in fonts.find_faces([font_dir]) if face.family == "Test Beta")
    coverage = glyphs.measure_face(face, [ord(c) for c in CHARACTERS], min_mapped=len(CHARACTERS))
    assert len(coverage.code_points) == 0
    assert coverage.mapped == len(NUMERALS)


def test_coverage_cache_roundtrip(font_dir, tmp_path):
    face = next(face for face in fonts.find_faces([font_dir]) if face.family == "Test Alpha")
    coverage = glyphs.measure_face(face, [ord(c) for c in CHARACTERS + BLANK + NOTDEF])
    glyphs.save_coverage(tmp_path / "face.npz", coverage)
    loaded = glyphs.load_coverage(tmp_path / "face.npz")
    assert loaded.code_points.tolist() == coverage.code_points.tolist()
    assert loaded.hashes.tolist() == coverage.hashes.tolist()
    assert (loaded.notdef, loaded.blank, loaded.mapped) == (coverage.notdef, coverage.blank, coverage.mapped)
    assert sorted(loaded.probes) == sorted(coverage.probes)
    assert all(np.array_equal(loaded.probes[c], coverage.probes[c]) for c in coverage.probes)


# ---------------------------------------------------------------------------------------------
# design groups and held-out choice


@pytest.fixture(scope="module")
def measured(font_dir):
    faces = fonts.find_faces([font_dir])
    candidates = [ord(c) for c in CHARACTERS]
    return faces, {face.name: glyphs.measure_face(face, candidates) for face in faces}


def test_groups_join_weights_and_copies(measured):
    faces, coverages = measured
    groups = {group.name: set(group.faces) for group in holdout.group_designs(faces, coverages)}
    assert groups == {
        "test alpha": {"TestAlpha_Regular", "TestAlpha_Bold"},
        "test beta": {"TestBeta_Regular"},
        "test delta + test echo": {"TestDelta_Regular", "TestEcho_Regular"},
        "test gamma": {"TestGamma_Regular"},
    }


def test_probe_similarity_needs_common_characters():
    bitmap = np.ones((glyphs.PROBE_GRID, glyphs.PROBE_GRID), dtype=bool)
    few = {c: bitmap for c in NUMERALS[: holdout.MIN_COMMON_PROBES - 1]}
    enough = {c: bitmap for c in NUMERALS[: holdout.MIN_COMMON_PROBES]}
    assert holdout.probe_similarity(few, few) is None
    assert holdout.probe_similarity(enough, enough) == 1.0


def test_holdout_same_seed_same_choice(measured):
    faces, coverages = measured
    groups = holdout.group_designs(faces, coverages)
    first = holdout.choose_holdout(groups, seed=5, test_count=1, val_count=1)
    second = holdout.choose_holdout(list(reversed(groups)), seed=5, test_count=1, val_count=1)
    assert first == second
    assert sorted(first.values()).count("test") == 1
    assert sorted(first.values()).count("val") == 1


def test_holdout_keeps_one_group_for_training(measured):
    faces, coverages = measured
    groups = holdout.group_designs(faces, coverages)
    splits = holdout.choose_holdout(groups, seed=0, test_count=3, val_count=3)
    assert list(splits.values()).count("train") == 1


def test_holdout_skips_low_coverage_group(measured):
    faces, coverages = measured
    groups = holdout.group_designs(faces, coverages)
    # Beta lacks one of the eleven characters, so it is not eligible at full coverage
    for seed in range(8):
        splits = holdout.choose_holdout(groups, seed=seed, test_count=3, val_count=0, min_coverage=1.0)
        assert splits["test beta"] == "train"


def test_holdout_named_family(measured):
    faces, coverages = measured
    groups = holdout.group_designs(faces, coverages)
    splits = holdout.choose_holdout(groups, seed=0, test_count=2, val_count=0, test_names=["ECHO"])
    assert splits["test delta + test echo"] == "test"
    assert list(splits.values()).count("test") == 1


def test_holdout_unknown_family(measured):
    faces, coverages = measured
    groups = holdout.group_designs(faces, coverages)
    with pytest.raises(holdout.HoldoutError, match="'zeta' matches no font design group"):
        holdout.choose_holdout(groups, seed=0, test_count=1, val_count=0, test_names=["zeta"])


# ---------------------------------------------------------------------------------------------
# rendering


def test_render_sample_shape():
    glyph = Image.new("L", (180, 120), 0)
    glyph.paste(255, (20, 20, 160, 100))
    pixels, quality = render.render_sample(glyph, render.sample_rng(0, 0x4E00, "face", 0), 250)
    assert pixels.shape == (250, 250, 3)
    assert pixels.dtype == np.uint8
    assert render.QUALITY_RANGE[0] <= quality <= render.QUALITY_RANGE[1]


def test_render_sample_deterministic():
    glyph = Image.new("L", (100, 100), 0)
    glyph.paste(255, (10, 40, 90, 60))
    first, _ = render.render_sample(glyph, render.sample_rng(3, 0x4E00, "face", 1), 64)
    again, _ = render.render_sample(glyph, render.sample_rng(3, 0x4E00, "face", 1), 64)
    other, _ = render.render_sample(glyph, render.sample_rng(3, 0x4E00, "face", 2), 64)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_change_stroke_dilates_and_erodes():
    mask = Image.new("L", (40, 40), 0)
    mask.paste(255, (10, 10, 30, 30))  # a 20x20 square
    bolder = np.asarray(render.change_stroke(mask, 2)) > 127
    lighter = np.asarray(render.change_stroke(mask, -1)) > 127
    assert bolder.sum() == 24 * 24
    assert lighter.sum() == 18 * 18


def test_change_stroke_keeps_thin_strokes():
    mask = Image.new("L", (40, 40), 0)
    mask.paste(255, (5, 19, 35, 21))  # a line two pixels high
    assert np.array_equal(np.asarray(render.change_stroke(mask, -1)), np.asarray(mask))


def test_transform_mask_fits():
    mask = Image.new("L", (300, 40), 255)
    for index in range(20):
        placed = render.transform_mask(mask, render.sample_rng(0, 1, "face", index), 64)
        assert placed.width <= 64
        assert placed.height <= 64


def test_place_mask_keeps_margin():
    mask = Image.new("L", (300, 300), 255)
    margin = int(np.ceil(render.MARGIN * 250))
    for index in range(20):
        rng = render.sample_rng(0, 2, "face", index)
        alpha = render.place_mask(render.transform_mask(mask, rng, 250), rng, 250)
        rows, columns = np.nonzero(alpha > 0.5)
        assert rows.min() >= margin
        assert columns.min() >= margin
        assert rows.max() < 250 - margin
        assert columns.max() < 250 - margin


# ---------------------------------------------------------------------------------------------
# builds


@pytest.fixture(scope="module")
def built(font_dir, charset_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "cjk"
    summary = run_build(options_for(out, font_dir, charset_file))
    return out, summary


def test_build_outputs(built):
    out, summary = built
    rows = read_list(out)
    assert (out / "classes.txt").read_text(encoding="utf-8").splitlines() == list(CHARACTERS)
    assert {row["label"] for row in rows} == set(CHARACTERS)
    assert len(rows) == sum(summary.samples.values())
    assert summary.rendered == len(rows)
    assert all(row["path"].startswith(f"images/U+{ord(row['label']):04X}/") for row in rows)


def test_build_images_rgb_250(built):
    out, _ = built
    for row in read_list(out):
        with Image.open(out / row["path"]) as image:
            assert image.format == "JPEG"
            assert image.mode == "RGB"
            assert image.size == (250, 250)


def test_build_skips_missing_glyphs(built):
    out, _ = built
    rows = read_list(out)
    faces_of = defaultdict(set)
    for row in rows:
        faces_of[row["label"]].add(face_of(row))
    assert "TestBeta_Regular" in faces_of[NUMERALS[0]]
    assert "TestBeta_Regular" not in faces_of[MISSING_IN_BETA]
    assert "TestAlpha_Regular" in faces_of[MISSING_IN_BETA]
    assert BLANK not in faces_of
    assert NOTDEF not in faces_of
    assert not (out / "images" / f"U+{ord(MISSING_IN_BETA):04X}" / "TestBeta_Regular-0.jpg").exists()


def test_build_holds_out_whole_faces(built):
    out, summary = built
    rows = read_list(out)
    splits_of_face = defaultdict(set)
    for row in rows:
        splits_of_face[face_of(row)].add(row["split"])
    assert all(len(splits) == 1 for splits in splits_of_face.values())
    assert {row["split"] for row in rows} == {"train", "val", "test"}
    # faces of one design group share a split
    with open(out / "faces.csv", newline="", encoding="utf-8") as file:
        faces = list(csv.DictReader(file))
    splits_of_group = defaultdict(set)
    for face in faces:
        splits_of_group[face["group"]].add(face["split"])
    assert all(len(splits) == 1 for splits in splits_of_group.values())
    assert len(summary.groups["test"]) == 1
    assert len(summary.groups["val"]) == 1


def test_build_sample_counts(built):
    out, _ = built
    rows = read_list(out)
    per_face_class = defaultdict(int)
    split_of = {}
    for row in rows:
        per_face_class[(face_of(row), row["label"])] += 1
        split_of[face_of(row)] = row["split"]
    for (face, _), count in per_face_class.items():
        assert count == (2 if split_of[face] == "train" else 1)


def test_build_draws_same_glyph_once(built):
    out, summary = built
    rows = read_list(out)
    faces = {face_of(row) for row in rows}
    # Delta and Echo draw identical bitmaps, so only one of the two is rendered
    assert len(faces & {"TestDelta_Regular", "TestEcho_Regular"}) == 1
    assert summary.skipped_glyphs["same-glyph"] == len(CHARACTERS)


def test_build_same_seed_same_bytes(built, font_dir, charset_file, tmp_path):
    out, _ = built
    again = tmp_path / "again"
    run_build(options_for(again, font_dir, charset_file, workers=2))
    assert file_digests(again) == file_digests(out)


def test_build_other_seed_other_bytes(built, font_dir, charset_file, tmp_path):
    out, _ = built
    other = tmp_path / "other"
    run_build(options_for(other, font_dir, charset_file, seed=1, test_family=["beta"], val_family=["gamma"]))
    first = file_digests(out / "images")
    second = file_digests(other / "images")
    common = set(first) & set(second)
    assert common
    assert all(first[name] != second[name] for name in common)


def test_build_limit(font_dir, charset_file, tmp_path):
    summary = run_build(options_for(tmp_path / "out", font_dir, charset_file, limit=3))
    assert (tmp_path / "out" / "classes.txt").read_text(encoding="utf-8").splitlines() == list(CHARACTERS[:3])
    assert summary.classes == 3
    assert summary.dropped_characters["over-limit"] == len(CHARACTERS) - 3


def test_build_min_faces_drops_rare(font_dir, charset_file, tmp_path):
    # train faces are Beta and Delta (Echo repeats Delta), so the character Beta lacks has one glyph
    options = options_for(tmp_path / "out", font_dir, charset_file, min_faces=2, test_family=["gamma"], val_family=["alpha"])
    summary = run_build(options)
    assert summary.classes == len(NUMERALS)
    assert summary.dropped_characters == {"too-few-faces": 1, "not-in-any-face": 2}  # blank and .notdef
    assert MISSING_IN_BETA not in (tmp_path / "out" / "classes.txt").read_text(encoding="utf-8")


def test_build_min_faces_none_left(font_dir, charset_file, tmp_path):
    options = options_for(tmp_path / "out", font_dir, charset_file, min_faces=3, test_family=["gamma"], val_family=["alpha"])
    with pytest.raises(BuildError, match="no character .* has 3 distinct training faces"):
        run_build(options)


def test_build_codepoint_labels(font_dir, charset_file, tmp_path):
    run_build(options_for(tmp_path / "out", font_dir, charset_file, label="codepoint", limit=2))
    labels = {row["label"] for row in read_list(tmp_path / "out")}
    assert labels == {"U+4E00", "U+4E8C"}


def test_build_dry_run_writes_no_images(font_dir, charset_file, tmp_path):
    summary = run_build(options_for(tmp_path / "out", font_dir, charset_file, dry_run=True))
    assert summary.classes == len(CHARACTERS)
    assert summary.samples["train"] > 0
    assert summary.rendered == 0
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["coverage-cache"]


def test_build_resume_reuses_images(font_dir, charset_file, tmp_path):
    options = options_for(tmp_path / "out", font_dir, charset_file, limit=2)
    first = run_build(options)
    removed = tmp_path / "out" / read_list(tmp_path / "out")[0]["path"]
    removed.unlink()
    second = run_build(options)
    assert second.rendered == 1
    assert second.reused == first.rendered - 1
    assert removed.is_file()


def test_build_rejects_changed_options(font_dir, charset_file, tmp_path):
    run_build(options_for(tmp_path / "out", font_dir, charset_file, limit=2))
    with pytest.raises(BuildError, match=r"other options \(images_per_face\)"):
        run_build(options_for(tmp_path / "out", font_dir, charset_file, limit=2, images_per_face=3))
    summary = run_build(options_for(tmp_path / "out", font_dir, charset_file, limit=2, images_per_face=3, overwrite=True))
    assert summary.reused == 0


def test_build_rejects_foreign_folder(font_dir, charset_file, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")
    with pytest.raises(BuildError, match="not an empty folder"):
        run_build(options_for(tmp_path / "out", font_dir, charset_file))
    assert (tmp_path / "out" / "notes.txt").read_text() == "keep me"


def test_build_no_cjk_font(tmp_path, charset_file):
    (tmp_path / "fonts").mkdir()
    with pytest.raises(BuildError, match="no face covers"):
        run_build(options_for(tmp_path / "out", tmp_path / "fonts", charset_file))


def test_build_single_design_all_train(font_dir, charset_file, tmp_path):
    (tmp_path / "fonts").mkdir()
    shutil.copy(font_dir / "alpha.ttf", tmp_path / "fonts")
    shutil.copy(font_dir / "alpha-bold.ttf", tmp_path / "fonts")
    summary = run_build(options_for(tmp_path / "out", tmp_path / "fonts", charset_file))
    assert summary.samples["val"] == 0
    assert summary.samples["test"] == 0
    assert {row["split"] for row in read_list(tmp_path / "out")} == {"train"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"size": 16}, "--size 16 is too small"),
        ({"images_per_face": 0}, "--images-per-face 0 must be at least 1"),
        ({"min_faces": 0}, "--min-faces 0 must be at least 1"),
        ({"label": "pinyin"}, "invalid --label 'pinyin'"),
        ({"design_iou": 1.5}, "--design-iou 1.5 must lie between 0 and 1"),
        ({"exclude": ["(noto"]}, r"invalid --exclude pattern '\(noto'"),
    ],
)
def test_build_rejects_bad_option(font_dir, charset_file, tmp_path, change, message):
    with pytest.raises(BuildError, match=message):
        run_build(options_for(tmp_path / "out", font_dir, charset_file, **change))
    assert not (tmp_path / "out").exists()


def test_cli_build(font_dir, charset_file, tmp_path):
    arguments = ["--out", str(tmp_path / "out"), "--classes", str(charset_file), "--font-dir", str(font_dir)]
    arguments += ["--min-faces", "1", "--limit", "2", "--workers", "1", "--size", "64"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert summary["classes"] == 2
    with Image.open(tmp_path / "out" / read_list(tmp_path / "out")[0]["path"]) as image:
        assert image.size == (64, 64)


def test_cli_unknown_class_set(tmp_path):
    result = CliRunner().invoke(app, ["--out", str(tmp_path / "out"), "--classes", "big5"])
    assert result.exit_code == 1
    assert "unknown class set 'big5'" in result.output
    assert not (tmp_path / "out").exists()


def test_pack_reads_list(built, tmp_path):
    import webdataset

    from toolkit.config import PackConfig
    from toolkit.dataset import load_dataset
    from toolkit.pack import run_pack

    out, summary = built
    run_pack(out / "list.csv", tmp_path / "dataset", PackConfig(workers=1), show_progress=False)
    dataset = load_dataset(tmp_path / "dataset")
    assert list(dataset.classes) == sorted(CHARACTERS)
    for split in ("train", "val", "test"):
        assert dataset.split(split).samples == summary.samples[split]
    samples = list(webdataset.WebDataset(dataset.shard_urls("test"), shardshuffle=False, empty_check=False).decode("pil"))
    test_rows = {row["path"]: row["label"] for row in read_list(out) if row["split"] == "test"}
    assert len(samples) == len(test_rows)
    for sample in samples:
        assert sample["json"]["class"] == test_rows[sample["json"]["path"]]
        assert dataset.classes[int(sample["cls"])] == sample["json"]["class"]
        assert sample["jpg"].size == (250, 250)


# ---------------------------------------------------------------------------------------------
# installed fonts


def smallest_cjk_font() -> Path | None:
    """Return the smallest installed font file with a face that draws 永, preferring collections."""
    files = fonts.find_font_files(fonts.default_font_dirs())
    files.sort(key=lambda path: (path.suffix.lower() not in (".ttc", ".otc"), path.stat().st_size))
    for path in files:
        for face in fonts.read_faces(path):
            mapped, _ = glyphs.mapped_glyphs(face, [ord("永")])
            if mapped:
                return path
    return None


def test_installed_font_renders(tmp_path):
    path = smallest_cjk_font()
    if path is None:
        searched = ", ".join(map(str, fonts.default_font_dirs())) or "the standard font folders"
        pytest.skip(f"no CJK font found in {searched}; on Debian: apt-get install fonts-wqy-microhei")
    (tmp_path / "fonts").mkdir()
    (tmp_path / "fonts" / path.name).symlink_to(path)
    characters = tmp_path / "characters.txt"
    characters.write_text("永\n字\n", encoding="utf-8")

    summary = run_build(BuildOptions(out=tmp_path / "out", classes=str(characters), font_dirs=[tmp_path / "fonts"], min_faces=1, workers=1))

    faces = fonts.read_faces(path)
    rows = read_list(tmp_path / "out")
    assert summary.classes >= 1
    assert rows
    for row in rows:
        with Image.open(tmp_path / "out" / row["path"]) as image:
            assert image.size == (250, 250)
            assert image.mode == "RGB"
            # the character leaves ink: the image is not one flat colour
            assert np.asarray(image).std() > 5.0
    with open(tmp_path / "out" / "faces.csv", newline="", encoding="utf-8") as file:
        listed = {(row["path"], int(row["index"])) for row in csv.DictReader(file)}
    assert listed <= {(face.path, face.index) for face in faces}
    if len(faces) > 1:
        assert any(index > 0 for _, index in listed)

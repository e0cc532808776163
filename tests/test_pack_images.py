"""Tests of toolkit.pack.images: decoding, colour conversion, orientation, limits and resizing.

Every image is generated here. Pixel checks compare against an independent reference (Pillow's
own decode and conversion, numpy formulas or torchvision's size rules) and state their
tolerance. JPEG re-encoding is the only lossy step, so exact checks use `decode_image`, which
returns the pixels just before encoding.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
import simplejpeg
from PIL import ExifTags, Image, ImageCms, ImageFile, ImageOps

from toolkit.config import PackConfig
from toolkit.pack import images
from toolkit.pack.images import (
    IMAGE_EXTENSIONS,
    ImageOptions,
    RejectedImage,
    decode_image,
    is_image_path,
    normalize_image,
)
from toolkit.synthetic import encode_jpeg, render_image

KEEP = ImageOptions()


# ---------------------------------------------------------------------------------------------
# helpers


def _picture(width: int = 64, height: int = 48, label: int = 5, seed: int = 0) -> Image.Image:
    """An RGB test picture of any size, not symmetric, so flips and rotations show."""
    side = max(width, height)
    image = render_image(label, np.random.default_rng(seed), size=side)
    return image.crop((0, 0, width, height))


def _save(image: Image.Image, format: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **params)
    return buffer.getvalue()


def _png_bytes(width: int, height: int, color_type: int, bit_depth: int, rows: list[bytes]) -> bytes:
    """Build a PNG by hand, for sample layouts Pillow does not write (16-bit RGB)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    pixels = b"".join(b"\x00" + row for row in rows)  # filter type 0 on every row
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(pixels)) + chunk(b"IEND", b"")


def _pillow_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _reason(data: bytes, options: ImageOptions = KEEP) -> str:
    with pytest.raises(RejectedImage) as caught:
        normalize_image(data, options)
    assert str(caught.value), "a rejection carries a detail message"
    return caught.value.reason


def _srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _swapped_primaries_profile() -> bytes:
    """The sRGB profile with its red and blue colorants swapped: RGB (r, g, b) shows as sRGB (b, g, r)."""
    profile = bytearray(_srgb_profile())
    (count,) = struct.unpack_from(">I", profile, 128)
    entries = {}
    for index in range(count):
        signature, offset, size = struct.unpack_from(">4sII", profile, 132 + 12 * index)
        entries[signature] = (index, offset, size)
    red_index, red_offset, red_size = entries[b"rXYZ"]
    blue_index, blue_offset, blue_size = entries[b"bXYZ"]
    struct.pack_into(">4sII", profile, 132 + 12 * red_index, b"rXYZ", blue_offset, blue_size)
    struct.pack_into(">4sII", profile, 132 + 12 * blue_index, b"bXYZ", red_offset, red_size)
    return bytes(profile)


def _with_exif_app1(jpeg: bytes, orientation: int, byte_order: str) -> bytes:
    """Insert an APP1 EXIF segment holding only the Orientation tag right after SOI."""
    prefix = "<" if byte_order == "II" else ">"
    tiff = byte_order.encode() + struct.pack(prefix + "HI", 42, 8)
    tiff += struct.pack(prefix + "H", 1)  # one IFD0 entry
    tiff += struct.pack(prefix + "HHIHH", 0x0112, 3, 1, orientation, 0)
    tiff += struct.pack(prefix + "I", 0)  # no next IFD
    body = b"Exif\0\0" + tiff
    segment = b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body
    return jpeg[:2] + segment + jpeg[2:]


# transpose that stores an upright picture so that EXIF orientation N shows it upright again
_STORE_FOR_ORIENTATION = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return exif


# ---------------------------------------------------------------------------------------------
# extensions and options


def test_extensions_lower_case_with_dot():
    assert all(ext.startswith(".") and ext == ext.lower() for ext in IMAGE_EXTENSIONS)
    for ext in (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"):
        assert ext in IMAGE_EXTENSIONS, ext


def test_extensions_upper_case_path():
    assert is_image_path("photos/DSC_0001.JPG")
    assert is_image_path("scan.TiFf")
    assert is_image_path("a/b/c.Png")
    assert not is_image_path("notes.txt")
    assert not is_image_path("README")
    assert not is_image_path("archive.jpg.zip")


def test_options_from_config():
    config = PackConfig(resize="center-crop", size=128, jpeg_quality=80, max_pixels=1000, background=[1, 2, 3])
    options = ImageOptions.from_config(config)
    assert options.resize == "center-crop"
    assert options.size == 128
    assert options.jpeg_quality == 80
    assert options.max_pixels == 1000
    assert options.background == (1, 2, 3)


@pytest.mark.parametrize(
    "fields",
    [
        {"resize": "stretch", "size": 10},
        {"resize": "shorter", "size": 0},
        {"jpeg_quality": 0},
        {"jpeg_quality": 101},
        {"max_pixels": 0},
        {"background": (0, 0)},
        {"background": (0, 0, 256)},
    ],
)
def test_options_invalid(fields):
    with pytest.raises(ValueError):
        ImageOptions(**fields)


# ---------------------------------------------------------------------------------------------
# JPEG passthrough


def test_jpeg_passthrough_bytes():
    data = encode_jpeg(render_image(7, np.random.default_rng(1)))
    packed = normalize_image(data, KEEP)
    assert packed.jpeg == data
    assert (packed.width, packed.height) == (250, 250)


def test_progressive_jpeg_passthrough():
    data = _save(_picture(80, 60), "JPEG", quality=90, progressive=True)
    packed = normalize_image(data, KEEP)
    assert packed.jpeg == data
    assert (packed.width, packed.height) == (80, 60)


@pytest.mark.parametrize(
    "options",
    [
        ImageOptions(resize="shorter", size=60),
        ImageOptions(resize="fit", size=100),
        ImageOptions(resize="center-crop", size=60),
    ],
)
def test_passthrough_size_already_right(options):
    data = encode_jpeg(_picture(60, 60))
    assert normalize_image(data, options).jpeg == data


def test_passthrough_srgb_icc():
    data = _save(_picture(), "JPEG", quality=90, icc_profile=_srgb_profile())
    assert normalize_image(data, KEEP).jpeg == data


def test_trailing_data_reencoded():
    source = encode_jpeg(_picture())
    data = source + b"vendor trailer"
    packed = normalize_image(data, KEEP)
    assert packed.jpeg != data
    assert np.array_equal(decode_image(data, KEEP), _pillow_rgb(source))


def test_multi_picture_reencoded():
    first, second = _picture(label=1), _picture(label=2)
    data = _save(first, "MPO", save_all=True, append_images=[second])
    assert b"MPF\0" in data[:1000]
    packed = normalize_image(data, KEEP)
    # the second picture after the first one's end-of-image marker is not stored
    assert len(packed.jpeg) < len(data)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "MPO"
        first_frame = np.asarray(image.convert("RGB"))
    assert np.array_equal(decode_image(data, KEEP), first_frame)


def test_truncated_loading_stays_off():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decode_matches_pillow():
    data = encode_jpeg(_picture(90, 70))
    assert np.array_equal(decode_image(data, KEEP), _pillow_rgb(data))


# ---------------------------------------------------------------------------------------------
# format sniffing


def test_png_named_jpg(tmp_path):
    picture = _picture()
    path = tmp_path / "photo.jpg"
    path.write_bytes(_save(picture, "PNG"))
    data = path.read_bytes()
    assert is_image_path(path)
    assert np.array_equal(decode_image(data, KEEP), np.asarray(picture))
    packed = normalize_image(data, KEEP)
    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(packed.jpeg)
    assert (width, height) == (64, 48)
    assert colorspace == "YCbCr"


def test_jpeg_named_png(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(encode_jpeg(_picture()))
    data = path.read_bytes()
    assert normalize_image(data, KEEP).jpeg == data


@pytest.mark.parametrize("format", ["BMP", "TIFF", "WEBP", "PPM", "TGA"])
def test_lossless_formats_exact(format):
    picture = _picture()
    params = {"lossless": True} if format == "WEBP" else {}
    data = _save(picture, format, **params)
    assert np.array_equal(decode_image(data, KEEP), np.asarray(picture))


def test_gif_first_frame():
    first = _picture(label=1).quantize(64)
    second = _picture(label=2).quantize(64)
    data = _save(first, "GIF", save_all=True, append_images=[second])
    assert np.array_equal(decode_image(data, KEEP), np.asarray(first.convert("RGB")))


# ---------------------------------------------------------------------------------------------
# colour conversion


def test_grayscale_png():
    gray = _picture().convert("L")
    pixels = decode_image(_save(gray, "PNG"), KEEP)
    assert pixels.shape == (48, 64, 3)
    assert np.array_equal(pixels[..., 0], np.asarray(gray))
    assert np.array_equal(pixels[..., 1], np.asarray(gray))
    assert np.array_equal(pixels[..., 2], np.asarray(gray))


def test_grayscale_jpeg():
    data = encode_jpeg(_picture().convert("L"))
    assert simplejpeg.decode_jpeg_header(data)[2] == "Gray"
    pixels = decode_image(data, KEEP)
    with Image.open(io.BytesIO(data)) as reference:
        gray = np.asarray(reference)  # Pillow decodes it as mode L
    assert np.array_equal(pixels[..., 0], gray)
    assert np.array_equal(pixels[..., 1], gray)
    assert np.array_equal(pixels[..., 2], gray)
    packed = normalize_image(data, KEEP)
    assert simplejpeg.decode_jpeg_header(packed.jpeg)[2] == "YCbCr"


def test_bilevel_png():
    bilevel = _picture().convert("1")
    pixels = decode_image(_save(bilevel, "PNG"), KEEP)
    expected = np.where(np.asarray(bilevel), 255, 0)
    assert set(np.unique(pixels)) <= {0, 255}
    assert np.array_equal(pixels[..., 0], expected)
    assert np.array_equal(pixels[..., 2], expected)


def test_palette_png():
    palette = _picture().quantize(16)
    pixels = decode_image(_save(palette, "PNG"), KEEP)
    colours = np.array(palette.getpalette()[: 16 * 3]).reshape(16, 3)
    expected = colours[np.asarray(palette)]
    assert np.array_equal(pixels, expected)


def test_palette_transparency():
    palette = _picture().quantize(16)
    background = (10, 200, 30)
    data = _save(palette, "PNG", transparency=3)  # palette index 3 is fully transparent
    pixels = decode_image(data, ImageOptions(background=background))
    indices = np.asarray(palette)
    colours = np.array(palette.getpalette()[: 16 * 3]).reshape(16, 3)
    expected = colours[indices]
    expected[indices == 3] = background
    assert (indices == 3).any()
    assert np.array_equal(pixels, expected)


def test_gray16_gradient():
    width = 300
    ramp = np.linspace(0, 65535, width).round().astype(np.uint16)
    image = Image.fromarray(np.tile(ramp, (4, 1)))
    assert image.mode == "I;16"
    pixels = decode_image(_save(image, "PNG"), KEEP)
    row = pixels[0, :, 0].astype(int)
    assert np.all(np.diff(row) >= 0), "a 16-bit gradient stays monotonic"
    assert row.min() == 0
    assert row.max() == 255
    assert np.array_equal(row, np.round(ramp / 65535 * 255).astype(int))


def test_rgb16_gradient():
    width = 300
    ramp = np.linspace(0, 65535, width).round().astype(np.uint16)
    samples = np.stack([ramp, ramp[::-1], np.full(width, 32768, np.uint16)], axis=-1)  # (W, 3)
    row_bytes = samples.astype(">u2").tobytes()
    data = _png_bytes(width, 4, color_type=2, bit_depth=16, rows=[row_bytes] * 4)
    pixels = decode_image(data, KEEP).astype(int)
    red = pixels[0, :, 0]
    assert np.all(np.diff(red) >= 0)
    assert red.min() == 0
    assert red.max() == 255
    assert np.all(np.diff(pixels[0, :, 1]) <= 0)
    # 8-bit value within 1 level of v * 255 / 65535
    assert np.abs(pixels[0] - samples / 65535 * 255).max() <= 1


def test_pgm16_gradient():
    width = 256
    ramp = np.linspace(0, 65535, width).round().astype(np.uint16)
    data = f"P5 {width} 2 65535\n".encode() + np.tile(ramp, (2, 1)).astype(">u2").tobytes()
    pixels = decode_image(data, KEEP).astype(int)
    assert pixels[0, 0, 0] == 0
    assert pixels[0, -1, 0] == 255
    assert np.abs(pixels[0, :, 0] - ramp / 65535 * 255).max() <= 1


def test_rgba_over_background():
    picture = np.asarray(_picture())
    alpha = np.tile(np.linspace(0, 255, 64).round().astype(np.uint8), (48, 1))
    rgba = Image.fromarray(np.dstack([picture, alpha]))
    background = np.array([10, 200, 30])
    pixels = decode_image(_save(rgba, "PNG"), ImageOptions(background=(10, 200, 30)))
    weight = alpha[..., None] / 255.0
    expected = picture * weight + background * (1 - weight)
    assert np.abs(pixels - expected).max() <= 1


def test_la_default_white():
    gray = np.asarray(_picture().convert("L"))
    alpha = np.tile(np.linspace(0, 255, 64).round().astype(np.uint8), (48, 1))
    data = _save(Image.fromarray(np.dstack([gray, alpha])), "PNG")
    pixels = decode_image(data, KEEP)
    weight = alpha / 255.0
    expected = gray * weight + 255 * (1 - weight)
    for channel in range(3):
        assert np.abs(pixels[..., channel] - expected).max() <= 1
    assert np.array_equal(pixels[:, 0], np.full((48, 3), 255)), "alpha 0 shows the white background"


def test_cmyk_jpeg_adobe():
    picture = _picture(label=4)
    data = _save(picture.convert("CMYK"), "JPEG", quality=95)
    assert simplejpeg.decode_jpeg_header(data)[2] == "CMYK"
    assert b"Adobe" in data[:200]
    pixels = decode_image(data, KEEP).astype(int)
    error = np.abs(pixels - np.asarray(picture))
    # JPEG at quality 95 changes a few levels; inverted CMYK would be off by ~200
    assert error.mean() < 3
    assert np.percentile(error, 99) < 20


def test_ycck_jpeg():
    picture = _picture(label=4)
    # Photoshop stores inverted CMYK (Adobe APP14); libjpeg-turbo writes what it is given
    inverted = 255 - np.asarray(picture.convert("CMYK"))
    data = simplejpeg.encode_jpeg(np.ascontiguousarray(inverted), quality=95, colorspace="CMYK")
    assert simplejpeg.decode_jpeg_header(data)[2] == "YCCK"
    pixels = decode_image(data, KEEP).astype(int)
    error = np.abs(pixels - np.asarray(picture))
    # four lossy channels and the naive CMYK -> RGB step lose a few levels; inverted would be ~200
    assert error.mean() < 5
    assert np.percentile(error, 99) < 20


def test_icc_png_converted():
    picture = _picture()
    data = _save(picture, "PNG", icc_profile=_swapped_primaries_profile())
    pixels = decode_image(data, KEEP).astype(int)
    swapped = np.asarray(picture)[..., ::-1]
    assert np.abs(pixels - swapped).max() <= 1


def test_icc_jpeg_converted():
    picture = _picture()
    data = _save(picture, "JPEG", quality=95, icc_profile=_swapped_primaries_profile())
    packed = normalize_image(data, KEEP)
    assert packed.jpeg != data
    pixels = decode_image(data, KEEP).astype(int)
    swapped = _pillow_rgb(data)[..., ::-1]
    assert np.abs(pixels - swapped).max() <= 1


def test_icc_srgb_png_unchanged():
    picture = _picture()
    data = _save(picture, "PNG", icc_profile=_srgb_profile())
    assert np.array_equal(decode_image(data, KEEP), np.asarray(picture))


def test_icc_invalid_falls_back(caplog):
    picture = _picture()
    data = _save(picture, "PNG", icc_profile=b"not an ICC profile " * 8)
    with caplog.at_level(logging.WARNING, logger="toolkit.pack.images"):
        pixels = decode_image(data, KEEP)
    assert np.array_equal(pixels, np.asarray(picture))
    assert any("ICC profile" in record.getMessage() for record in caplog.records)


# ---------------------------------------------------------------------------------------------
# EXIF orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_png_twin(orientation):
    upright = _picture(40, 24)
    store = _STORE_FOR_ORIENTATION[orientation]
    stored = upright.transpose(store) if store is not None else upright
    rotated_file = _save(stored, "PNG", exif=_exif(orientation))
    twin_file = _save(upright, "PNG")
    assert np.array_equal(decode_image(rotated_file, KEEP), np.asarray(upright))
    assert normalize_image(rotated_file, KEEP).jpeg == normalize_image(twin_file, KEEP).jpeg


@pytest.mark.parametrize("orientation", range(2, 9))
def test_exif_jpeg_matches_pillow(orientation):
    data = _save(_picture(40, 24), "JPEG", quality=90, exif=_exif(orientation))
    with Image.open(io.BytesIO(data)) as image:
        expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    assert np.array_equal(decode_image(data, KEEP), expected)
    packed = normalize_image(data, KEEP)
    assert packed.jpeg != data
    assert (packed.width, packed.height) == (expected.shape[1], expected.shape[0])


@pytest.mark.parametrize("byte_order", ["II", "MM"])
def test_exif_byte_order(byte_order):
    data = _with_exif_app1(encode_jpeg(_picture(40, 24)), 6, byte_order)
    with Image.open(io.BytesIO(data)) as image:
        assert image.getexif()[ExifTags.Base.Orientation] == 6
        expected = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    assert expected.shape == (40, 24, 3)
    assert np.array_equal(decode_image(data, KEEP), expected)


def test_exif_rotate_then_resize():
    upright = _picture(120, 60)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # 60 wide, 120 high
    data = _save(stored, "PNG", exif=_exif(6))
    options = ImageOptions(resize="center-crop", size=30)
    twin = _save(upright, "PNG")
    assert normalize_image(data, options).jpeg == normalize_image(twin, options).jpeg


@pytest.mark.parametrize("mode", ["shorter", "fit"])
def test_exif_jpeg_rotate_then_resize(mode):
    stored = _picture(120, 240).transpose(Image.Transpose.ROTATE_90)  # upright is 120 x 240
    data = _save(stored, "JPEG", quality=95, exif=_exif(6))
    options = ImageOptions(resize=mode, size=60)
    pixels = decode_image(data, options).astype(float)
    with Image.open(io.BytesIO(data)) as image:
        upright = ImageOps.exif_transpose(image).convert("RGB")
    size = (60, 120) if mode == "shorter" else (30, 60)
    expected = np.asarray(upright.resize(size, Image.Resampling.BICUBIC)).astype(float)
    assert pixels.shape == expected.shape
    # for shorter the 1/2 DCT-domain scale gives the target size by itself, and its filter
    # differs from bicubic by a few levels on this noisy picture
    assert np.abs(pixels - expected).mean() < 3.0


# ---------------------------------------------------------------------------------------------
# rejects


def test_reject_empty():
    assert _reason(b"") == "empty"


def test_reject_text():
    assert _reason(b"just some text, not an image\n" * 20) == "not-an-image"


def test_reject_random_bytes():
    assert _reason(np.random.default_rng(0).bytes(4096)) == "not-an-image"


@pytest.mark.parametrize("keep_fraction", [0.5, 0.9])
def test_reject_truncated_jpeg(keep_fraction):
    data = encode_jpeg(_picture(120, 90))
    assert _reason(data[: int(len(data) * keep_fraction)]) == "truncated"


@pytest.mark.parametrize("progressive", [False, True])
def test_reject_damaged_jpeg_kept(progressive):
    # the end marker stays, so the JPEG would be kept byte for byte if its check passed
    data = bytearray(_save(_picture(120, 90), "JPEG", quality=90, progressive=progressive))
    middle = len(data) // 2
    data[middle : middle + 40] = bytes([0xFF, 0x00] * 20)
    assert data.endswith(b"\xff\xd9")
    assert _reason(bytes(data)) == "decode-error"


def test_reject_truncated_jpeg_header():
    data = encode_jpeg(_picture())
    assert _reason(data[:40]) == "truncated"


def test_reject_truncated_png():
    data = _save(_picture(120, 90), "PNG")
    assert _reason(data[: len(data) // 2]) == "truncated"


def test_reject_damaged_jpeg():
    data = bytearray(encode_jpeg(_picture(120, 90)))
    middle = data.find(b"\xff\xda") + 1000
    data[middle : middle + 2] = b"\xff\xd3"  # a restart marker where none belongs
    assert _reason(bytes(data)) == "decode-error"


def test_reject_cut_scan_before_eoi():
    # ends with EOI like a complete file, so it takes the stored-unchanged check
    data = encode_jpeg(_picture(120, 90))
    assert _reason(data[: len(data) // 2] + b"\xff\xd9") == "decode-error"


def test_reject_damaged_png():
    data = bytearray(_save(_picture(), "PNG"))
    data[data.find(b"IDAT") + 40] ^= 0xFF
    assert _reason(bytes(data)) == "decode-error"


def test_reject_float_tiff():
    data = _save(Image.fromarray(np.ones((8, 8), np.float32)), "TIFF")
    assert _reason(data) == "unsupported-format"


def test_reject_unlisted_format():
    data = _save(_picture(), "DDS")  # Pillow reads it, pack does not accept it
    assert _reason(data) == "unsupported-format"


# ---------------------------------------------------------------------------------------------
# pixel limit


def test_limit_before_decode(monkeypatch):
    data = _save(_picture(50, 50), "PNG")

    def fail_load(self):
        raise AssertionError("the pixel data was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", fail_load)
    assert _reason(data, ImageOptions(max_pixels=2499)) == "too-many-pixels"


def test_limit_jpeg_header():
    data = encode_jpeg(_picture(50, 50))
    assert _reason(data, ImageOptions(max_pixels=2499)) == "too-many-pixels"
    assert normalize_image(data, ImageOptions(max_pixels=2500)).jpeg == data


def test_limit_above_pillow_default(monkeypatch):
    # Pillow raises DecompressionBombError over 2 * MAX_IMAGE_PIXELS, a larger max_pixels wins
    data = _save(_picture(100, 50), "PNG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert decode_image(data, ImageOptions(max_pixels=5000)).shape == (50, 100, 3)
    assert _reason(data, ImageOptions(max_pixels=4999)) == "too-many-pixels"


def _bomb_png() -> bytes:
    """A 100000 x 100000 RGB PNG header followed by a few compressed rows of zeros."""
    side = 100_000
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    rows = zlib.compress(bytes(3 * side + 1) * 8, 9)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def _bomb_jpeg() -> bytes:
    """A small JPEG whose frame header (SOF0) declares 65000 x 65000 pixels."""
    data = bytearray(encode_jpeg(_picture(16, 16)))
    frame = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, frame + 5, 65000, 65000)
    return bytes(data)


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc and sets RLIMIT_AS")
@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_bomb_rejected_small_memory(tmp_path, kind):
    path = tmp_path / f"bomb.{kind}"
    path.write_bytes(_bomb_png() if kind == "png" else _bomb_jpeg())
    assert path.stat().st_size < 100_000
    # The child caps its address space at 512 MiB above what its imports use. Decoding a
    # 100000 x 100000 (or 65000 x 65000) RGB image would need over 12 GB.
    script = textwrap.dedent(
        """
        import re, resource, sys
        from toolkit.pack.images import ImageOptions, RejectedImage, normalize_image

        data = open(sys.argv[1], "rb").read()
        status = open("/proc/self/status").read()
        used = int(re.search(r"VmSize:\\s+(\\d+) kB", status).group(1)) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (used + 512 * 2**20, resource.RLIM_INFINITY))
        try:
            normalize_image(data, ImageOptions())
        except RejectedImage as error:
            print(error.reason)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "too-many-pixels"


# ---------------------------------------------------------------------------------------------
# resizing


def _torchvision_size(width: int, height: int, mode: str, N: int) -> tuple[int, int]:
    import torch
    from torchvision.transforms import functional as F

    tensor = F.resize(torch.zeros(1, height, width), N, antialias=False)
    if mode == "center-crop":
        tensor = F.center_crop(tensor, N)
    return tensor.shape[2], tensor.shape[1]


def _pillow_fit_size(width: int, height: int, N: int) -> tuple[int, int]:
    image = Image.new("L", (width, height))
    image.thumbnail((N, N))
    return image.size


SIZES = [(800, 600), (600, 800), (100, 50), (33, 250), (250, 250), (1000, 8), (999, 997)]


@pytest.mark.parametrize("source_format", ["JPEG", "PNG"])
@pytest.mark.parametrize("mode", ["keep", "shorter", "fit", "center-crop"])
def test_resize_output_size(mode, source_format):
    N = 100
    options = ImageOptions(resize=mode, size=N) if mode != "keep" else KEEP
    for width, height in SIZES:
        if source_format == "JPEG" and min(width, height) < 8:
            continue
        data = _save(Image.new("RGB", (width, height), (90, 120, 150)), source_format)
        packed = normalize_image(data, options)
        if mode == "keep":
            expected = (width, height)
        elif mode == "fit":
            expected = _pillow_fit_size(width, height, N)
        else:
            expected = _torchvision_size(width, height, mode, N)
        assert (packed.width, packed.height) == expected, (width, height)
        assert simplejpeg.decode_jpeg_header(packed.jpeg)[:2] == (expected[1], expected[0])


def test_fit_never_upscales():
    data = encode_jpeg(_picture(60, 40))
    packed = normalize_image(data, ImageOptions(resize="fit", size=500))
    assert (packed.width, packed.height) == (60, 40)


def test_shorter_upscales():
    data = encode_jpeg(_picture(60, 40))
    packed = normalize_image(data, ImageOptions(resize="shorter", size=80))
    assert (packed.width, packed.height) == (120, 80)


def test_resize_uses_dct_scaling(monkeypatch):
    decoded_shapes = []
    real_decode = simplejpeg.decode_jpeg

    def spy(data, *args, **kwargs):
        pixels = real_decode(data, *args, **kwargs)
        decoded_shapes.append(pixels.shape)
        return pixels

    monkeypatch.setattr(images.simplejpeg, "decode_jpeg", spy)
    data = encode_jpeg(_picture(800, 600))
    packed = normalize_image(data, ImageOptions(resize="shorter", size=250))
    assert (packed.width, packed.height) == (333, 250)
    assert decoded_shapes == [(300, 400, 3)], "libjpeg-turbo decodes at 1/2 scale"


@pytest.mark.parametrize("mode", ["shorter", "fit", "center-crop"])
def test_resize_pixels_match_pillow(mode):
    picture = _picture(800, 600)
    data = encode_jpeg(picture, quality=95)
    N = 250
    pixels = decode_image(data, ImageOptions(resize=mode, size=N)).astype(float)

    # reference: Pillow full decode, one bicubic resize, crop at torchvision's offsets
    with Image.open(io.BytesIO(data)) as image:
        reference = image.convert("RGB")
    width, height = (N, round(N * 600 / 800)) if mode == "fit" else (int(N * 800 / 600), N)
    reference = reference.resize((width, height), Image.Resampling.BICUBIC)
    if mode == "center-crop":
        left, top = int(round((width - N) / 2)), int(round((height - N) / 2))
        reference = reference.crop((left, top, left + N, top + N))
    expected = np.asarray(reference).astype(float)

    assert pixels.shape == expected.shape
    # DCT-domain scaling plus a second resize differs from one resize by a few levels
    assert np.abs(pixels - expected).mean() < 2.0
    assert np.abs(pixels.mean(axis=(0, 1)) - expected.mean(axis=(0, 1))).max() < 1.0


def test_resize_extreme_aspect_rejected():
    data = _save(Image.new("RGB", (2000, 2), (90, 120, 150)), "PNG")
    # the shorter side 2 -> 100 makes the longer side 100000, over JPEG's 65500 limit
    assert _reason(data, ImageOptions(resize="shorter", size=100)) == "too-many-pixels"
    assert normalize_image(data, ImageOptions(resize="fit", size=100)).width == 100


def test_resize_output_over_limit():
    data = encode_jpeg(_picture(40, 40))
    options = ImageOptions(resize="shorter", size=100, max_pixels=9999)
    assert _reason(data, options) == "too-many-pixels"


def test_output_quality_option():
    picture = _picture(120, 90)
    source = np.asarray(picture).astype(int)
    data = _save(picture, "PNG")
    low = normalize_image(data, ImageOptions(jpeg_quality=30)).jpeg
    high = normalize_image(data, ImageOptions(jpeg_quality=95)).jpeg
    low_error = np.abs(simplejpeg.decode_jpeg(low) - source).mean()
    high_error = np.abs(simplejpeg.decode_jpeg(high) - source).mean()
    # reference: Pillow's encoder at the same quality with 4:2:0 chroma subsampling
    reference = _save(picture, "JPEG", quality=95, subsampling="4:2:0")
    reference_error = np.abs(_pillow_rgb(reference) - source).mean()
    assert len(low) < len(high)
    assert high_error < low_error
    assert abs(high_error - reference_error) < 0.5

"""One augmented sample of a glyph: a SIZE x SIZE RGB image and the JPEG quality to save it at.

The glyph is drawn once per (character, face) at BASE_EM pixels per em, cropped to its ink, and
every sample is derived from that mask in this order:

    stroke weight   dilate (bolder) or erode (lighter) the mask with a square max/min filter;
                    an erosion that would remove more than MAX_ERODED_INK of the ink is skipped
    geometry        the longer side of the transformed ink box becomes SCALE_RANGE of SIZE, with
                    a horizontal stretch, shear and rotation
    position        uniform over the places where the box stays MARGIN away from every edge, so
                    a centre crop of 87.5% (the evaluation crop of timm and of toolkit.data)
                    keeps every stroke
    blur            with BLUR_PROBABILITY a Gaussian blur of the glyph's edges
    colour          a light background with dark ink, or with INVERT_PROBABILITY the reverse; the
                    luma ranges keep at least 80 levels between ink and background before the
                    gradient
    background      with GRADIENT_PROBABILITY a linear brightness ramp in a random direction
    resolution      with LOW_RES_PROBABILITY a down- and up-scale, as in a low-resolution scan
    noise           with NOISE_PROBABILITY Gaussian pixel noise
    JPEG quality    uniform in QUALITY_RANGE

Every draw comes from a generator seeded with (seed, code point, face, index), so one sample is
the same whatever else is rendered and however the work is spread over processes.
"""

from __future__ import annotations

import functools
import hashlib
import math

import numpy as np
import simplejpeg
from PIL import Image, ImageDraw, ImageFilter, ImageFont

BASE_EM = 256  # pixels per em of the glyph mask that samples are scaled down from
STROKE_STEPS = (-1, 0, 0, 0, 1, 2, 3)  # filter radius at BASE_EM; negative erodes
MAX_ERODED_INK = 0.4
SCALE_RANGE = (0.45, 0.85)
MARGIN = 0.0625  # fraction of SIZE kept free on each side; 1 - 2 * MARGIN = 0.875
STRETCH_RANGE = (0.85, 1.15)
SHEAR_RANGE = (-0.12, 0.12)
ROTATION_DEGREES = 8.0
INVERT_PROBABILITY = 0.25
LIGHT_LUMA = (175, 255)
DARK_LUMA = (0, 95)
COLOUR_SPREAD = 40.0  # maximum standard deviation of a colour's channels around its luma
GRADIENT_PROBABILITY = 0.4
GRADIENT_AMPLITUDE = 40.0
LOW_RES_PROBABILITY = 0.2
LOW_RES_RANGE = (0.35, 0.7)
BLUR_PROBABILITY = 0.4
BLUR_RADIUS = (0.3, 1.5)
NOISE_PROBABILITY = 0.7
NOISE_SIGMA = (1.0, 10.0)
NOISE_FIELD_SIDE = 1024
NOISE_FIELD_SEED = 20240521
QUALITY_RANGE = (55, 95)


def draw_glyph(font: ImageFont.FreeTypeFont, character: str) -> Image.Image | None:
    """Draw CHARACTER with a font opened at BASE_EM and crop it to its ink: an "L" mask, or None if blank."""
    side = int(BASE_EM * 1.6)
    image = Image.new("L", (side, side), 0)
    ImageDraw.Draw(image).text((side / 2, side / 2), character, font=font, fill=255, anchor="mm")
    bbox = image.getbbox()
    return image.crop(bbox) if bbox else None


def sample_rng(seed: int, code_point: int, face_name: str, index: int) -> np.random.Generator:
    """Return the generator of one sample, seeded with (seed, code point, face name, index)."""
    face_key = int.from_bytes(hashlib.sha256(face_name.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, code_point, face_key, index])


def render_sample(glyph: Image.Image, rng: np.random.Generator, size: int) -> tuple[np.ndarray, int]:
    """Return one augmented (size, size, 3) uint8 image of GLYPH and its JPEG quality."""
    mask = change_stroke(glyph, int(rng.choice(STROKE_STEPS)))
    mask = transform_mask(mask, rng, size)
    alpha = place_mask(mask, rng, size)  # (size, size) float32 in [0, 1]

    background, ink = pick_colours(rng)
    canvas = paint_background(background, rng, size)  # (size, size, 3)
    pixels = canvas + alpha[:, :, None] * (ink - canvas)
    pixels = lower_resolution(pixels, rng, size)
    if rng.random() < NOISE_PROBABILITY:
        pixels = pixels + rng.uniform(*NOISE_SIGMA) * noise_patch(rng, size)
    quality = int(rng.integers(QUALITY_RANGE[0], QUALITY_RANGE[1] + 1))
    return np.clip(pixels, 0, 255).astype(np.uint8), quality


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """Encode an (H, W, 3) uint8 RGB array as a baseline JPEG with 4:2:0 chroma subsampling."""
    return simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=quality, colorspace="RGB", colorsubsampling="420")


# ---------------------------------------------------------------------------------------------
# steps


def change_stroke(mask: Image.Image, radius: int) -> Image.Image:
    """Dilate the mask by RADIUS pixels, or erode it for a negative radius unless too much ink goes."""
    if radius == 0:
        return mask
    if radius > 0:
        padded = np.pad(np.asarray(mask), radius)
        return Image.fromarray(square_filter(padded, radius, np.maximum))
    pixels = np.asarray(mask)
    eroded = square_filter(pixels, -radius, np.minimum)
    before = np.count_nonzero(pixels > 127)
    after = np.count_nonzero(eroded > 127)
    return Image.fromarray(eroded) if after >= (1.0 - MAX_ERODED_INK) * before else mask


def square_filter(pixels: np.ndarray, radius: int, reduce) -> np.ndarray:
    """Return the max (or min) of PIXELS over a (2 * radius + 1) square, as two 1-D passes.

    Pixels outside the array do not count, so the border keeps its own values.
    """
    result = pixels.copy()
    for axis in (1, 0):
        source = result.copy()
        for shift in range(1, radius + 1):
            head = [slice(None)] * 2
            tail = [slice(None)] * 2
            head[axis], tail[axis] = slice(shift, None), slice(None, -shift)
            reduce(result[tuple(head)], source[tuple(tail)], out=result[tuple(head)])
            reduce(result[tuple(tail)], source[tuple(head)], out=result[tuple(tail)])
    return result


def transform_mask(mask: Image.Image, rng: np.random.Generator, size: int) -> Image.Image:
    """Scale, stretch, shear and rotate the mask so its bounding box fits in SIZE."""
    stretch = rng.uniform(*STRETCH_RANGE)
    shear = rng.uniform(*SHEAR_RANGE)
    angle = math.radians(rng.uniform(-ROTATION_DEGREES, ROTATION_DEGREES))
    cos, sin = math.cos(angle), math.sin(angle)
    # rotation times shear, applied after the scale: output = linear @ input
    linear = np.array([[cos, -sin], [sin, cos]]) @ np.array([[1.0, shear], [0.0, 1.0]])

    # scale so the longer side of the transformed box is the drawn fraction of SIZE
    width, height = mask.width * stretch, mask.height
    corners = linear @ np.array([[0, width, 0, width], [0, 0, height, height]])  # (2, 4)
    extent = corners.max(axis=1) - corners.min(axis=1)
    scale = rng.uniform(*SCALE_RANGE) * size / max(extent.max(), 1.0)
    scaled_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    scaled = mask.resize(scaled_size, Image.Resampling.BILINEAR)  # antialiased when shrinking

    # rotate and shear about the origin, then shift the box to start at (0, 0)
    corners = linear @ np.array([[0, scaled.width, 0, scaled.width], [0, 0, scaled.height, scaled.height]])
    low = corners.min(axis=1)
    out_width, out_height = (np.ceil(corners.max(axis=1) - low).astype(int) + 1).tolist()
    inverse = np.linalg.inv(linear)
    offset = inverse @ low  # the input point that lands on output (0, 0)
    data = (inverse[0, 0], inverse[0, 1], offset[0], inverse[1, 0], inverse[1, 1], offset[1])
    return scaled.transform((out_width, out_height), Image.Transform.AFFINE, data, Image.Resampling.BILINEAR)


def place_mask(mask: Image.Image, rng: np.random.Generator, size: int) -> np.ndarray:
    """Paste the mask at a uniform position inside the margins, blur it sometimes, and return the alpha.

    Blurring the alpha alone costs a third of blurring the RGB image and looks the same, because
    the background under it is flat or a linear ramp.
    """
    canvas = Image.new("L", (size, size), 0)
    margin = math.ceil(MARGIN * size)
    x = int(rng.integers(margin, max(size - margin - mask.width, margin) + 1))
    y = int(rng.integers(margin, max(size - margin - mask.height, margin) + 1))
    canvas.paste(mask, (x, y))
    if rng.random() < BLUR_PROBABILITY:
        canvas = canvas.filter(ImageFilter.GaussianBlur(rng.uniform(*BLUR_RADIUS)))
    return np.asarray(canvas, dtype=np.float32) / 255.0  # (size, size)


def pick_colours(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return (background, ink) RGB float32 colours whose lumas are at least 80 levels apart."""
    light = tinted(rng, rng.uniform(*LIGHT_LUMA))
    dark = tinted(rng, rng.uniform(*DARK_LUMA))
    if rng.random() < INVERT_PROBABILITY:
        return dark, light
    return light, dark


def tinted(rng: np.random.Generator, luma: float) -> np.ndarray:
    """Return an RGB colour near the grey of LUMA with a random tint, as float32."""
    spread = rng.uniform(0.0, COLOUR_SPREAD)
    colour = luma + rng.normal(0.0, spread, size=3)
    # keep the luma (Rec. 601 weights) where clipping allows
    colour += luma - float(np.dot([0.299, 0.587, 0.114], colour))
    return np.clip(colour, 0, 255).astype(np.float32)


def paint_background(colour: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Return a (size, size, 3) float32 background: flat, or with a linear brightness ramp."""
    canvas = np.broadcast_to(colour, (size, size, 3)).astype(np.float32)
    if rng.random() < GRADIENT_PROBABILITY:
        direction = rng.uniform(0, 2 * math.pi)
        amplitude = rng.uniform(-GRADIENT_AMPLITUDE, GRADIENT_AMPLITUDE)
        coordinates = np.linspace(-0.5, 0.5, size, dtype=np.float32)
        ramp = math.cos(direction) * coordinates[None, :] + math.sin(direction) * coordinates[:, None]  # (size, size)
        canvas = canvas + amplitude * ramp[:, :, None]
    return canvas


def lower_resolution(pixels: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """Sometimes scale the (size, size, 3) float image down and back up, as a low-resolution scan does."""
    if rng.random() >= LOW_RES_PROBABILITY:
        return pixels
    low = max(8, round(size * rng.uniform(*LOW_RES_RANGE)))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    image = image.resize((low, low), Image.Resampling.BILINEAR).resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


@functools.cache
def noise_field() -> np.ndarray:
    """Return a fixed (NOISE_FIELD_SIDE, NOISE_FIELD_SIDE, 3) float32 field of standard normal noise."""
    rng = np.random.default_rng(NOISE_FIELD_SEED)
    return rng.standard_normal((NOISE_FIELD_SIDE, NOISE_FIELD_SIDE, 3), dtype=np.float32)


def noise_patch(rng: np.random.Generator, size: int) -> np.ndarray:
    """Return a (size, size, 3) window of the noise field at a random offset.

    Drawing fresh normal noise for each image cost more than the rest of the sample when
    measured. Windows of one fixed field, at random offsets and flips, vary enough for augmentation.
    """
    field = noise_field()
    if size > NOISE_FIELD_SIDE:
        return rng.standard_normal((size, size, 3), dtype=np.float32)
    y, x = rng.integers(0, NOISE_FIELD_SIDE - size + 1, size=2)
    patch = field[y : y + size, x : x + size]
    if rng.random() < 0.5:
        patch = patch[::-1]
    if rng.random() < 0.5:
        patch = patch[:, ::-1]
    return patch

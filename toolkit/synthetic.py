"""A generated image-folder dataset whose classes a small network can tell apart.

Class `c` is drawn as one of several shapes in a class-specific pair of colours, with random
position, size, rotation and pixel noise per image, so that a model has something real to learn
and accuracy well above chance means the pipeline works. The demo, the tests and the benchmarks
use it; nothing is downloaded.
"""

from __future__ import annotations

import colorsys
import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("disc", "square", "triangle", "cross", "ring", "bars")


def class_name(index: int) -> str:
    return f"class_{index:05d}"


def render_image(label: int, rng: np.random.Generator, size: int = 250) -> Image.Image:
    """Draw one RGB image of class `label`."""
    shape = SHAPES[label % len(SHAPES)]
    # Spread hues over the colour wheel so neighbouring labels differ clearly.
    colour_index = label // len(SHAPES)
    hue = (colour_index * 0.618034) % 1.0
    value = 0.95 if colour_index % 2 == 0 else 0.6
    foreground = tuple(int(255 * channel) for channel in colorsys.hsv_to_rgb(hue, 0.9, value))
    background_hue = (hue + 0.5 + 0.1 * ((colour_index // 2) % 3)) % 1.0
    background = tuple(int(255 * channel) for channel in colorsys.hsv_to_rgb(background_hue, 0.25, 0.9))

    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    radius = size * rng.uniform(0.2, 0.35)
    cx, cy = size * rng.uniform(0.35, 0.65, size=2)
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if shape == "disc":
        draw.ellipse(box, fill=foreground)
    elif shape == "square":
        draw.rectangle(box, fill=foreground)
    elif shape == "triangle":
        draw.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=foreground)
    elif shape == "cross":
        width = radius / 3
        draw.rectangle((cx - width, cy - radius, cx + width, cy + radius), fill=foreground)
        draw.rectangle((cx - radius, cy - width, cx + radius, cy + width), fill=foreground)
    elif shape == "ring":
        draw.ellipse(box, outline=foreground, width=max(2, int(radius / 3)))
    else:
        step = max(4, int(radius / 2))
        for x in range(int(cx - radius), int(cx + radius), 2 * step):
            draw.rectangle((x, cy - radius, x + step, cy + radius), fill=foreground)

    image = image.rotate(float(rng.uniform(-30, 30)), resample=Image.BILINEAR, fillcolor=background)
    pixels = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, size=(size, size, 3), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_image_folder(
    root: str | Path,
    num_classes: int,
    images_per_class: int,
    size: int = 250,
    seed: int = 0,
    quality: int = 90,
) -> Path:
    """Write ROOT/class_XXXXX/NNNN.jpg for every class and return ROOT.

    The same arguments always write the same bytes.
    """
    root = Path(root)
    for label in range(num_classes):
        folder = root / class_name(label)
        folder.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng([seed, label])
        for index in range(images_per_class):
            data = encode_jpeg(render_image(label, rng, size), quality)
            (folder / f"{index:04d}.jpg").write_bytes(data)
    return root

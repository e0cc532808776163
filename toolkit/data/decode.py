"""Decoding of the two sample members the stream reads: `KEY.jpg` with simplejpeg and `KEY.cls`.

Nothing here unpickles or `torch.load`s anything. Shards may come from elsewhere, so members
such as `.pyd` or `.pth` are never read at all (see `toolkit.data.stream`).
"""

from __future__ import annotations

import numpy as np
import simplejpeg

# Pillow's default decompression-bomb limit, the same default as PackConfig.max_pixels.
MAX_PIXELS = 89_478_485

# libjpeg-turbo can shrink an image by n/8 while it decodes (DCT-domain scaling). simplejpeg's
# documentation warns that factors below 2 may decode slower than no scaling, so a decode is
# either full size or shrunk by 2 or more; with min_factor=2, simplejpeg falls back to full size
# when no such factor keeps the requested minimum size.
MIN_DCT_FACTOR = 2.0


class CorruptSampleError(ValueError):
    """A sample whose members are missing or cannot be decoded; the stream skips and counts it."""


def read_jpeg_size(jpeg: bytes) -> tuple[int, int]:
    """Return (height, width) from a JPEG header, rejecting images over MAX_PIXELS."""
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
    except ValueError as error:
        raise CorruptSampleError(f"invalid JPEG header: {error}") from None
    if height * width > MAX_PIXELS:
        raise CorruptSampleError(f"image is {width}x{height}, more than the limit of {MAX_PIXELS} pixels")
    return height, width


def decode_image(jpeg: bytes, min_height: int = 0, min_width: int = 0) -> np.ndarray:
    """Decode JPEG bytes to an RGB array (H, W, 3) uint8.

    When min_height or min_width is positive, the image is shrunk in the DCT domain by the
    largest factor of 2 or more that keeps it at least that high and wide, or not at all when no
    such factor exists. Grey and CMYK JPEGs come back as RGB too.
    """
    read_jpeg_size(jpeg)
    try:
        return simplejpeg.decode_jpeg(
            jpeg,
            colorspace="RGB",
            min_height=min_height,
            min_width=min_width,
            min_factor=MIN_DCT_FACTOR,
            strict=True,
        )
    except ValueError as error:
        raise CorruptSampleError(f"invalid JPEG data: {error}") from None


def parse_label(cls: bytes, num_classes: int) -> int:
    """Parse a `.cls` member (the label index as ASCII digits) and check it against num_classes."""
    try:
        text = cls.decode("ascii").strip()
    except UnicodeDecodeError:
        text = ""
    if not text.isdigit():
        raise CorruptSampleError(f"invalid .cls value {cls[:20]!r}; expected a label index in ASCII digits")
    label = int(text)
    if label >= num_classes:
        raise CorruptSampleError(f"label {label} is out of range for {num_classes} classes")
    return label

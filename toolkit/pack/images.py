"""Image normalisation for `toolkit pack`: each input file becomes 8-bit RGB JPEG bytes.

`normalize_image` decodes every image in full, so a damaged file is rejected at pack time and
never reaches training. It reads the format from the bytes, never from the file name, and
rejects an image with more pixels than `ImageOptions.max_pixels` from its header, before any
pixel buffer exists.

Two paths share the work:

- JPEG (bytes start with FF D8 FF) is decoded with simplejpeg (libjpeg-turbo). When the target
  size is at most half the source, libjpeg-turbo scales in the DCT domain while decoding, and
  Pillow resizes the rest of the way. A YCbCr JPEG that needs no change (no EXIF rotation, no
  resize, no colour conversion, no second picture or other data after its end-of-image marker)
  is stored byte for byte after a full decode has checked it. That check decodes to gray at 1/8
  scale: every coefficient of every scan is still entropy-decoded, which is where damage shows,
  and only the unused pixel output is cut short.
  CMYK and YCCK JPEGs, grayscale JPEGs with an ICC profile, and JPEGs that libjpeg-turbo cannot
  decode go to the Pillow path.
- Every other format is decoded with Pillow, first frame only for animated or multi-page files.

Colour: palette, grayscale, 16-bit and CMYK images are converted to 8-bit RGB. 16-bit samples
are scaled to 8 bits (65535 maps to 255). Transparency is flattened onto
`ImageOptions.background`, white by default. Pixels with an embedded ICC profile are converted
to sRGB with LittleCMS (PIL.ImageCms), unless the profile changes no colour by more than one
level. A profile that LittleCMS cannot use is logged once per process and the pixels are
converted without colour management. The output is JPEG with 4:2:0 chroma subsampling at
`ImageOptions.jpeg_quality`.

Resize modes (`ImageOptions.resize`, with N = `ImageOptions.size`):

- keep: no resize.
- shorter: the shorter side becomes N and the aspect ratio is kept. Smaller images are scaled
  up, as torchvision's `Resize(N)` does, and the longer side is truncated to an integer the way
  torchvision computes it.
- fit: the image is scaled down to fit inside N×N with the aspect ratio kept. Images that
  already fit are never scaled up.
- center-crop: as `shorter`, then the centred N×N square is cut out, so every output is N×N.

EXIF orientation is applied before resizing, so the result equals that of a file whose pixels
were stored upright.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import simplejpeg
from PIL import ExifTags, Image, ImageCms, ImageOps, UnidentifiedImageError, features

from toolkit.config import PackConfig, ResizeMode

logger = logging.getLogger(__name__)

RESIZE_MODES = ("keep", "shorter", "fit", "center-crop")
REJECT_REASONS = (
    "empty",
    "truncated",
    "not-an-image",
    "too-many-pixels",
    "unsupported-format",
    "decode-error",
)

# Pillow format names that pack accepts, each with the file extensions that make a file a
# candidate.
_FORMAT_EXTENSIONS = {
    "JPEG": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "MPO": (),  # multi-picture JPEG from cameras; the files are named .jpg
    "PNG": (".png", ".apng"),
    "GIF": (".gif",),
    "BMP": (".bmp", ".dib"),
    "DIB": (),
    "TIFF": (".tif", ".tiff"),
    "WEBP": (".webp",),
    "PPM": (".ppm", ".pgm", ".pbm", ".pnm"),
    "TGA": (".tga",),
    "ICO": (".ico",),
    "PCX": (".pcx",),
    "QOI": (".qoi",),
    "SGI": (".sgi",),
}
# Formats whose codec is optional in Pillow builds: format -> (Pillow feature name, extensions).
# They count only when this Pillow build has the codec.
_OPTIONAL_FORMAT_EXTENSIONS = {
    "AVIF": ("avif", (".avif", ".avifs")),
    "JPEG2000": ("jpg_2000", (".jp2", ".j2k", ".jpx", ".jpf", ".j2c")),
}
_FORMAT_EXTENSIONS.update(
    (name, extensions)
    for name, (feature, extensions) in _OPTIONAL_FORMAT_EXTENSIONS.items()
    if features.check(feature)
)

SUPPORTED_FORMATS = frozenset(_FORMAT_EXTENSIONS)
IMAGE_EXTENSIONS = frozenset(ext for exts in _FORMAT_EXTENSIONS.values() for ext in exts)

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_SUBSAMPLING = "420"
JPEG_MAX_SIDE = 65_500  # libjpeg-turbo's largest width or height
# Pillow widens its filters by the downscaling factor, so even bilinear antialiases. A JPEG's
# DCT scaling leaves at most a factor of 2 to it, where bilinear (a triangle filter) looks
# close to bicubic and costs about 15% less of the whole resize path.
_RESAMPLE = Image.Resampling.BILINEAR

# EXIF orientation value -> the transpose that shows the image upright, as in
# PIL.ImageOps.exif_transpose.
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


# ---------------------------------------------------------------------------------------------
# public interface


@dataclass(frozen=True)
class ImageOptions:
    """Settings of `normalize_image`: resize mode and size, JPEG quality, pixel limit, background."""

    resize: ResizeMode = "keep"
    size: int = 0
    jpeg_quality: int = 90
    max_pixels: int = 89_478_485
    background: tuple[int, int, int] = (255, 255, 255)

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"invalid resize mode {self.resize!r}; use one of {', '.join(RESIZE_MODES)}")
        if self.resize != "keep" and self.size < 1:
            raise ValueError(f"resize mode {self.resize!r} needs size >= 1, got size={self.size}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"invalid jpeg_quality {self.jpeg_quality}; use a value from 1 to 100")
        if self.max_pixels < 1:
            raise ValueError(f"invalid max_pixels {self.max_pixels}; use a positive pixel count")
        background = tuple(self.background)
        if len(background) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in background):
            raise ValueError(f"invalid background {self.background!r}; use three integers from 0 to 255 (R, G, B)")
        object.__setattr__(self, "background", background)

    @classmethod
    def from_config(cls, config: PackConfig) -> ImageOptions:
        return cls(
            resize=config.resize,
            size=config.size,
            jpeg_quality=config.jpeg_quality,
            max_pixels=config.max_pixels,
            background=tuple(config.background),
        )


@dataclass(frozen=True)
class PackedImage:
    """A normalised image: JPEG bytes of an 8-bit RGB image and its size in pixels."""

    jpeg: bytes
    width: int
    height: int


class RejectedImage(Exception):
    """An input that cannot be packed. `reason` is one of REJECT_REASONS and str() gives the detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def is_image_path(path: str | Path) -> bool:
    """Return whether the file's extension, in any letter case, is in IMAGE_EXTENSIONS."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def normalize_image(data: bytes, options: ImageOptions) -> PackedImage:
    """Decode `data` in full and return it as RGB JPEG bytes, or raise RejectedImage.

    A JPEG that needs no change is returned as the same bytes object.
    """
    pixels, width, height = _decode(data, options, keep_source=True)
    if pixels is None:
        return PackedImage(data, width, height)
    jpeg = simplejpeg.encode_jpeg(
        pixels, quality=options.jpeg_quality, colorspace="RGB", colorsubsampling=_JPEG_SUBSAMPLING
    )
    return PackedImage(jpeg, width, height)


def decode_image(data: bytes, options: ImageOptions) -> np.ndarray:
    """Decode, orient, convert and resize `data` as `normalize_image` does, before JPEG encoding.

    Returns the (H, W, 3) uint8 RGB pixels, and raises RejectedImage where normalize_image does.
    """
    pixels, _, _ = _decode(data, options, keep_source=False)
    assert pixels is not None  # keep_source=False always returns pixels
    return pixels


# ---------------------------------------------------------------------------------------------
# shared steps


def _decode(data: bytes, options: ImageOptions, keep_source: bool) -> tuple[np.ndarray | None, int, int]:
    """Return the (H, W, 3) RGB pixels and the output width and height.

    With `keep_source`, pixels is None when `data` itself is the output, a JPEG that needs no
    change. That JPEG is still decoded in full to check it.
    """
    if not data:
        raise RejectedImage("empty", "the file is empty (0 bytes)")
    if data.startswith(_JPEG_MAGIC):
        decoded = _decode_jpeg(data, options, keep_source)
        if decoded is not None:
            return decoded
    pixels = _decode_with_pillow(data, options)
    H, W, _ = pixels.shape
    return pixels, W, H


def _check_size(width: int, height: int, options: ImageOptions) -> None:
    """Reject, from the header size alone, an image too large to decode, resize or encode."""
    pixels = width * height
    if pixels > options.max_pixels:
        raise RejectedImage(
            "too-many-pixels",
            f"the image is {width}x{height} = {pixels} pixels, over the limit of "
            f"{options.max_pixels} (max_pixels); raise max_pixels to pack it",
        )
    resized_width, resized_height = _resized_size(width, height, options)
    if resized_width * resized_height > options.max_pixels or max(resized_width, resized_height) > JPEG_MAX_SIDE:
        raise RejectedImage(
            "too-many-pixels",
            f"resizing the {width}x{height} image ({options.resize}, size {options.size}) gives "
            f"{resized_width}x{resized_height} pixels, over max_pixels ({options.max_pixels}) or "
            f"over the largest JPEG side ({JPEG_MAX_SIDE})",
        )


def _resized_size(width: int, height: int, options: ImageOptions) -> tuple[int, int]:
    """Return the (width, height) after resizing and before any centre crop."""
    N = options.size
    if options.resize == "keep":
        return width, height
    if options.resize == "fit":
        if max(width, height) <= N:
            return width, height
        if width >= height:
            return N, max(1, round(height * N / width))
        return max(1, round(width * N / height)), N
    # shorter and center-crop: torchvision's Resize(N) output size
    if width <= height:
        return N, int(N * height / width)
    return int(N * width / height), N


def _needs_resize(width: int, height: int, options: ImageOptions) -> bool:
    if options.resize == "center-crop":
        return (width, height) != (options.size, options.size)
    return _resized_size(width, height, options) != (width, height)


def _resize(image: Image.Image, target: tuple[int, int], options: ImageOptions) -> Image.Image:
    """Resize an upright image to `target` (width, height), then centre-crop for center-crop.

    `target` comes from the source size, because a JPEG may arrive already scaled down by
    libjpeg-turbo to a size that would round differently.
    """
    if target != image.size:
        image = image.resize(target, _RESAMPLE, reducing_gap=3.0)
    if options.resize == "center-crop":
        N = options.size
        # offsets rounded as torchvision's center_crop rounds them
        left = int(round((image.width - N) / 2.0))
        top = int(round((image.height - N) / 2.0))
        image = image.crop((left, top, left + N, top + N))
    return image


def _finish(image: Image.Image, target: tuple[int, int], options: ImageOptions) -> np.ndarray:
    """Resize an upright RGB image and return its pixels as a C-contiguous (H, W, 3) array."""
    image = _resize(image, target, options)
    return np.asarray(image)


# ---------------------------------------------------------------------------------------------
# JPEG path


@dataclass(frozen=True)
class _JpegMarkers:
    """Facts read from a JPEG's marker segments before the first scan."""

    orientation: int
    icc_profile: bytes | None
    multi_picture: bool


def _decode_jpeg(data: bytes, options: ImageOptions, keep_source: bool) -> tuple[np.ndarray | None, int, int] | None:
    """Decode a JPEG with simplejpeg as `_decode` does, or return None to hand it to Pillow."""
    markers = _read_jpeg_markers(data)
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    _check_size(width, height, options)
    if colorspace not in ("YCbCr", "Gray", "RGB"):
        return None  # CMYK and YCCK: Pillow handles Adobe's inverted CMYK
    if colorspace == "Gray" and markers.icc_profile is not None:
        return None  # a gray ICC profile applies to one channel, so Pillow keeps the L mode

    # decide what has to change
    transform = _srgb_transform(markers.icc_profile, "RGB") if markers.icc_profile else None
    resize = _needs_resize(width, height, options)
    unchanged = (
        colorspace == "YCbCr"
        and markers.orientation == 1
        and transform is None
        and not markers.multi_picture
        and not resize
        and data.endswith(b"\xff\xd9")  # no trailer after the end-of-image marker
    )

    # decode in full. The check of a kept JPEG discards the pixels, so it decodes to gray at 1/8
    # scale. libjpeg-turbo still entropy-decodes every coefficient of every scan, which is where
    # truncation and damage show. Only the colour output and most of the inverse DCT are skipped.
    if unchanged and keep_source:
        if _decode_jpeg_pixels(data, colorspace="GRAY", min_width=1, min_height=1, min_factor=8) is None:
            return None
        return None, width, height
    scale = {}
    if resize:
        # scale in the DCT domain when the target is at most half the source
        target_width, target_height = _resized_size(width, height, options)
        scale = {"min_width": target_width, "min_height": target_height, "min_factor": 2}
    pixels = _decode_jpeg_pixels(data, **scale)  # (h, w, 3)
    if pixels is None:
        return None
    if transform is None and markers.orientation == 1 and not resize:
        return pixels, width, height  # grayscale, RGB-coded or multi-picture: re-encode only

    # convert colours, orient upright, then resize
    image = Image.fromarray(pixels)
    if transform is not None:
        image = ImageCms.applyTransform(image, transform)
    target = _resized_size(width, height, options)
    if markers.orientation in _ORIENTATION_TRANSPOSE:
        image = image.transpose(_ORIENTATION_TRANSPOSE[markers.orientation])
        if markers.orientation >= 5:  # a quarter turn swaps width and height
            target = target[::-1]
    pixels = _finish(image, target, options)
    H, W, _ = pixels.shape
    return pixels, W, H


def _decode_jpeg_pixels(data: bytes, colorspace: str = "RGB", **options) -> np.ndarray | None:
    """Decode with simplejpeg to (h, w, 3) RGB, or (h, w, 1) for GRAY; None means Pillow should try instead."""
    try:
        return simplejpeg.decode_jpeg(data, colorspace=colorspace, **options)
    except ValueError as error:
        message = str(error)
        if "Premature end of JPEG file" in message:
            raise RejectedImage("truncated", f"the JPEG data ends before the image is complete ({message})") from None
        if message.startswith("Corrupt JPEG data"):
            raise RejectedImage("decode-error", f"the JPEG data is damaged ({message})") from None
        logger.debug("simplejpeg cannot decode this JPEG (%s); trying Pillow", message)
        return None


def _read_jpeg_markers(data: bytes) -> _JpegMarkers:
    """Read EXIF orientation, ICC profile and MPF segments up to the first scan (SOS).

    Raises RejectedImage("truncated") when the data ends inside the header segments. Stops
    early on malformed marker bytes and leaves those to the decoder, which reports them.
    """
    orientation = 0
    icc_chunks: dict[int, bytes] = {}
    multi_picture = False
    position, end = 2, len(data)
    while True:
        if position + 4 > end:
            raise RejectedImage("truncated", f"the JPEG data ends after {end} bytes, inside its header")
        if data[position] != 0xFF:
            break
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            position += 2
            continue
        if marker == 0xD9:  # end of image before any scan
            break
        (length,) = struct.unpack_from(">H", data, position + 2)
        start, stop = position + 4, position + 2 + length
        if length < 2:
            break
        if stop > end:
            raise RejectedImage("truncated", f"the JPEG data ends after {end} bytes, inside its header")
        if marker == 0xDA:  # start of scan: the entropy-coded data follows
            break
        if marker == 0xE1 and orientation == 0 and data.startswith(b"Exif\0\0", start):
            orientation = _exif_orientation(data, start + 6, stop)
        elif marker == 0xE2 and data.startswith(b"ICC_PROFILE\0", start) and stop - start > 14:
            sequence = data[start + 12]
            icc_chunks[sequence] = data[start + 14 : stop]
        elif marker == 0xE2 and data.startswith(b"MPF\0", start):
            multi_picture = True
        position = stop
    icc_profile = b"".join(icc_chunks[key] for key in sorted(icc_chunks)) or None
    return _JpegMarkers(max(orientation, 1), icc_profile, multi_picture)


def _exif_orientation(data: bytes, start: int, stop: int) -> int:
    """Return the Orientation tag (1 to 8) of IFD0 in the TIFF block data[start:stop], or 1.

    A malformed block counts as orientation 1, so the image is kept as stored.
    """
    byte_order = data[start : start + 2]
    if byte_order == b"II":
        prefix = "<"
    elif byte_order == b"MM":
        prefix = ">"
    else:
        return 1
    try:
        (ifd_offset,) = struct.unpack_from(prefix + "I", data, start + 4)
        ifd = start + ifd_offset
        (count,) = struct.unpack_from(prefix + "H", data, ifd)
        for index in range(count):
            entry = ifd + 2 + 12 * index
            if entry + 12 > stop:
                break
            tag, kind = struct.unpack_from(prefix + "HH", data, entry)
            if tag == ExifTags.Base.Orientation and kind == 3:  # SHORT
                (value,) = struct.unpack_from(prefix + "H", data, entry + 8)
                return value if 1 <= value <= 8 else 1
    except struct.error:
        return 1
    return 1


# ---------------------------------------------------------------------------------------------
# Pillow path


def _decode_with_pillow(data: bytes, options: ImageOptions) -> np.ndarray:
    """Decode any supported format with Pillow and return upright, resized (H, W, 3) RGB pixels."""
    image = _open_with_pillow(data, options)
    kind = image.format or "image"

    # decode the first frame in full; Image.LOAD_TRUNCATED_IMAGES stays False
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as error:
        raise _load_error(error, kind) from None

    # orient upright, convert to RGB, resize
    if _pillow_orientation(image) in _ORIENTATION_TRANSPOSE:
        image = ImageOps.exif_transpose(image)
    image = _to_rgb(image, options, kind)
    return _finish(image, _resized_size(image.width, image.height, options), options)


def _pillow_orientation(image: Image.Image) -> int:
    """Return the EXIF orientation of a loaded image, or 1 when its EXIF data cannot be read."""
    try:
        return image.getexif().get(ExifTags.Base.Orientation, 1)
    except (OSError, SyntaxError, ValueError, struct.error) as error:
        logger.debug("ignoring unreadable EXIF data (%s)", error)
        return 1


def _open_with_pillow(data: bytes, options: ImageOptions) -> Image.Image:
    """Open `data` reading only its header, and check its format and pixel count."""
    _allow_pixels(options.max_pixels)
    try:
        with warnings.catch_warnings():
            # pixel counts are checked against options.max_pixels below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise RejectedImage("too-many-pixels", f"{error}; raise max_pixels to pack it") from None
    except UnidentifiedImageError:
        raise _unidentified_error(data) from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as error:
        raise _load_error(error, "image") from None

    if image.format not in SUPPORTED_FORMATS:
        raise RejectedImage(
            "unsupported-format",
            f"{image.format} images are not supported; convert the file to one of "
            f"{', '.join(sorted(SUPPORTED_FORMATS))}",
        )
    _check_size(image.width, image.height, options)
    return image


def _allow_pixels(max_pixels: int) -> None:
    """Raise Pillow's own decompression-bomb limit to `max_pixels` when that is higher.

    Pillow rejects images over twice Image.MAX_IMAGE_PIXELS inside Image.open, which would
    otherwise override a larger max_pixels. NOTE: this changes a process-wide Pillow setting.
    """
    if Image.MAX_IMAGE_PIXELS is not None and max_pixels > Image.MAX_IMAGE_PIXELS:
        logger.debug("raising Image.MAX_IMAGE_PIXELS from %d to %d", Image.MAX_IMAGE_PIXELS, max_pixels)
        Image.MAX_IMAGE_PIXELS = max_pixels


def _unidentified_error(data: bytes) -> RejectedImage:
    if data.startswith(_JPEG_MAGIC):
        return RejectedImage("decode-error", "the file starts like a JPEG, but neither libjpeg-turbo nor Pillow can read it")
    if data.startswith(_PNG_MAGIC):
        if len(data) < 33:  # signature and IHDR chunk
            return RejectedImage("truncated", f"the PNG data ends after {len(data)} bytes, inside its header")
        return RejectedImage("decode-error", "the file starts like a PNG, but Pillow cannot read its header")
    return RejectedImage("not-an-image", "the data is not an image in any format that Pillow reads")


def _load_error(error: Exception, kind: str) -> RejectedImage:
    """Classify an exception from Pillow's decoder as a reject reason."""
    message = str(error) or type(error).__name__
    lowered = message.lower()
    if isinstance(error, EOFError) or "truncated" in lowered or "premature end" in lowered:
        return RejectedImage("truncated", f"the {kind} data ends before the image is complete ({message})")
    if "decoder" in lowered and "not available" in lowered:
        return RejectedImage("unsupported-format", f"this Pillow build cannot decode the {kind} data ({message})")
    return RejectedImage("decode-error", f"the {kind} data cannot be decoded ({message})")


# ---------------------------------------------------------------------------------------------
# colour conversion


def _to_rgb(image: Image.Image, options: ImageOptions, kind: str) -> Image.Image:
    """Convert any Pillow mode to 8-bit sRGB, flattening transparency onto the background."""
    icc_profile = image.info.get("icc_profile") or None

    # bring the samples to 8 bits and expand palettes
    mode = image.mode
    if mode.startswith("I"):
        image = _scale_16bit(image)
    elif mode == "F":
        raise RejectedImage(
            "unsupported-format",
            f"the {kind} image holds 32-bit floating-point samples, which have no standard "
            "8-bit mapping; convert it to 8 or 16 bits per sample",
        )
    elif mode == "1":
        image = image.convert("L")
    elif mode in ("P", "PA"):
        image = image.convert("RGBA" if image.has_transparency_data else "RGB")
    elif mode in ("L", "RGB") and "transparency" in image.info:
        image = image.convert("LA" if mode == "L" else "RGBA")
    elif mode in ("La", "RGBa"):
        image = image.convert(mode.upper())

    # split off the alpha channel
    alpha = None
    if image.mode in ("LA", "RGBA"):
        alpha = image.getchannel("A")
        image = image.convert(image.mode[:-1])
    if image.mode not in ("L", "RGB", "CMYK"):
        try:
            image = image.convert("RGB")
        except ValueError as error:
            raise RejectedImage("unsupported-format", f"the {kind} image's mode {image.mode} cannot be converted to RGB ({error})") from None

    # convert colours to sRGB, then flatten
    transform = _srgb_transform(icc_profile, image.mode) if icc_profile else None
    if transform is not None:
        image = ImageCms.applyTransform(image, transform)
    else:
        image = image.convert("RGB")
    if alpha is not None:
        image = _flatten(image, alpha, options.background)
    return image


def _scale_16bit(image: Image.Image) -> Image.Image:
    """Map 16-bit samples (I;16 modes, or I holding 0..65535) to 8 bits: 65535 -> 255.

    Pillow's own I;16 -> L conversion clips every value above 255 to white, so it is not used.
    NOTE: an I-mode image is assumed to hold 16-bit samples. Values outside 0..65535 are clipped.
    """
    samples = np.asarray(image)  # (H, W), uint16 or int32
    if samples.dtype != np.uint16:
        samples = np.clip(samples, 0, 65535)
    scaled = (samples.astype(np.uint32) * 255 + 32767) // 65535
    return Image.fromarray(scaled.astype(np.uint8))


def _flatten(image: Image.Image, alpha: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Composite an RGB image with its alpha channel over a solid background colour."""
    flat = Image.new("RGB", image.size, background)
    flat.paste(image, mask=alpha)
    return flat


class _ProfileCache:
    """Transforms from embedded ICC profiles to sRGB, built once per distinct profile and mode."""

    def __init__(self, capacity: int = 64) -> None:
        self.capacity = capacity
        self.entries: dict[tuple[bytes, str], ImageCms.ImageCmsTransform | None] = {}
        self.srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))

    def transform(self, icc_profile: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
        key = (icc_profile, mode)
        if key not in self.entries:
            if len(self.entries) >= self.capacity:
                self.entries.pop(next(iter(self.entries)))
            self.entries[key] = self._build(icc_profile, mode)
        return self.entries[key]

    def _build(self, icc_profile: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
        """Return the transform, or None when the profile is sRGB in effect or cannot be used."""
        try:
            source = ImageCms.ImageCmsProfile(io.BytesIO(icc_profile))
            transform = ImageCms.buildTransform(source, self.srgb, mode, "RGB", ImageCms.Intent.PERCEPTUAL)
        except (ImageCms.PyCMSError, OSError, ValueError) as error:
            logger.warning(
                "cannot use an embedded ICC profile of %d bytes for %s images (%s); converting "
                "images with this profile to RGB without colour management",
                len(icc_profile),
                mode,
                error,
            )
            return None
        if mode == "RGB" and _is_identity(transform):
            return None
        return transform


def _is_identity(transform: ImageCms.ImageCmsTransform) -> bool:
    """Return whether an RGB -> sRGB transform changes no colour by more than 1 level.

    Tested on a 17x17x17 grid of colours, so a profile counts as sRGB by what it does, not by
    its name.
    """
    levels = np.minimum(np.arange(0, 257, 16), 255).astype(np.uint8)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), axis=-1)  # (17, 17, 17, 3)
    probe = Image.fromarray(np.ascontiguousarray(grid.reshape(17, 17 * 17, 3)))
    result = np.asarray(ImageCms.applyTransform(probe, transform))
    difference = np.abs(result.astype(np.int16) - np.asarray(probe).astype(np.int16))
    return int(difference.max()) <= 1


_PROFILES = _ProfileCache()


def _srgb_transform(icc_profile: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    return _PROFILES.transform(icc_profile, mode)

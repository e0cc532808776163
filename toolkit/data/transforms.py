"""Image transforms on uint8 pixels, and normalisation on the device.

Training takes a random resized crop with torchvision's RandomResizedCrop semantics (scale
(0.08, 1) by default, ratio (3/4, 4/3), ten tries, then a central crop) and, unless turned off,
a horizontal flip. Evaluation resizes the shorter side to floor(image_size / 0.875) and takes a central image_size crop, as
timm does with its default crop_pct of 0.875. Every step before `normalize_batch` works on
uint8, so workers never build float images and batches cross process boundaries at 1 byte per
channel.

The `decode_*` functions work on JPEG bytes and pick a DCT-domain downscale (see
`toolkit.data.decode.decode_image`) that keeps the region they crop at no less than the output
resolution. The other transforms take an RGB array that is already decoded.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.data.decode import decode_image, read_jpeg_size

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
# timm's default crop_pct: evaluation resizes the shorter side to image_size / 0.875, then crops.
EVAL_CROP_FRACTION = 0.875

Box = tuple[int, int, int, int]  # top, left, height, width in pixels


class Draws(Protocol):
    """The two draws a crop needs; numpy.random.Generator provides both."""

    def uniform(self, low: float, high: float) -> float: ...

    def integers(self, low: int, high: int) -> int: ...


# ---------------------------------------------------------------------------------------------
# geometry


def random_resized_crop_box(height: int, width: int, rng: Draws, scale: tuple[float, float] = CROP_SCALE) -> Box:
    """Sample a crop box the way torchvision's RandomResizedCrop.get_params does.

    The same draws in the same order give the same box, so a source that forwards to torch's
    generator reproduces torchvision exactly.
    """
    area = height * width
    log_low, log_high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_low, log_high))
        crop_width = int(round(math.sqrt(target_area * aspect)))
        crop_height = int(round(math.sqrt(target_area / aspect)))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            top = int(rng.integers(0, height - crop_height + 1))
            left = int(rng.integers(0, width - crop_width + 1))
            return top, left, crop_height, crop_width

    # fall back to a central crop with the aspect ratio clamped into CROP_RATIO
    aspect = width / height
    if aspect < CROP_RATIO[0]:
        crop_width = width
        crop_height = int(round(crop_width / CROP_RATIO[0]))
    elif aspect > CROP_RATIO[1]:
        crop_height = height
        crop_width = int(round(crop_height * CROP_RATIO[1]))
    else:
        crop_width, crop_height = width, height
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def eval_resize_shape(height: int, width: int, image_size: int) -> tuple[int, int]:
    """Return the (height, width) whose shorter side is floor(image_size / 0.875).

    The longer side follows torchvision's Resize(int): int(short_target * long / short).
    """
    short_target = math.floor(image_size / EVAL_CROP_FRACTION)
    if width <= height:
        return int(short_target * height / width), short_target
    return short_target, int(short_target * width / height)


def scale_box(box: Box, source: tuple[int, int], target: tuple[int, int]) -> Box:
    """Map a box from an image of shape `source` onto the same image resized to `target`."""
    top, left, height, width = box
    scale_y = target[0] / source[0]
    scale_x = target[1] / source[1]
    new_top = min(round(top * scale_y), target[0] - 1)
    new_left = min(round(left * scale_x), target[1] - 1)
    new_bottom = max(min(round((top + height) * scale_y), target[0]), new_top + 1)
    new_right = max(min(round((left + width) * scale_x), target[1]), new_left + 1)
    return new_top, new_left, new_bottom - new_top, new_right - new_left


# ---------------------------------------------------------------------------------------------
# pixel operations


def as_image_tensor(rgb: np.ndarray) -> torch.Tensor:
    """View an RGB array (H, W, 3) uint8 as a tensor (1, 3, H, W) without copying it."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB image array of shape (H, W, 3) and dtype uint8, got {rgb.shape} {rgb.dtype}")
    if not rgb.flags.writeable:
        rgb = rgb.copy()  # torch.from_numpy warns on read-only arrays such as np.asarray(PIL image)
    return torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)  # (1, 3, H, W), channels_last strides


def resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize a uint8 tensor (1, 3, H, W) with antialiased bilinear interpolation, staying uint8."""
    return F.interpolate(image, size=(height, width), mode="bilinear", antialias=True, align_corners=False)


def resized_crop(image: torch.Tensor, box: Box, size: int) -> torch.Tensor:
    """Crop `box` from a uint8 tensor (1, 3, H, W) and resize it to (3, size, size)."""
    top, left, height, width = box
    region = image[:, :, top : top + height, left : left + width]
    return resize(region, size, size)[0]


def center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Take a central (3, size, size) crop of a tensor (1, 3, H, W), rounding as torchvision does."""
    _, _, H, W = image.shape
    top = int(round((H - size) / 2.0))
    left = int(round((W - size) / 2.0))
    return image[0, :, top : top + size, left : left + size]


def random_flip(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Flip a (3, H, W) tensor left to right with probability 0.5."""
    if rng.random() < 0.5:
        return image.flip(-1)
    return image


# ---------------------------------------------------------------------------------------------
# transforms on decoded arrays


def train_transform(rgb: np.ndarray, image_size: int, rng: np.random.Generator) -> torch.Tensor:
    """Apply the training augmentation to an RGB array: (H, W, 3) uint8 -> (3, S, S) uint8."""
    image = as_image_tensor(rgb)
    _, _, H, W = image.shape
    box = random_resized_crop_box(H, W, rng)
    return random_flip(resized_crop(image, box, image_size), rng).contiguous()


def eval_transform(rgb: np.ndarray, image_size: int) -> torch.Tensor:
    """Resize and centre-crop an RGB array: (H, W, 3) uint8 -> (3, S, S) uint8, deterministic."""
    image = as_image_tensor(rgb)
    _, _, H, W = image.shape
    height, width = eval_resize_shape(H, W, image_size)
    return center_crop(resize(image, height, width), image_size).contiguous()


# ---------------------------------------------------------------------------------------------
# transforms on JPEG bytes, with DCT-domain downscaling


def decode_train_crop(
    jpeg: bytes,
    image_size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = CROP_SCALE,
    flip: bool = True,
) -> torch.Tensor:
    """Decode JPEG bytes and apply the training augmentation: -> (3, S, S) uint8.

    `scale` bounds the crop's share of the image area, and `flip=False` turns off the
    horizontal flip (for images such as characters that a mirror changes).

    The crop box is drawn on the full image size from the header. The decode then shrinks the
    image only as far as keeps that box at least image_size pixels high and wide, so the result
    matches a full decode up to resampling differences.
    """
    height, width = read_jpeg_size(jpeg)
    box = random_resized_crop_box(height, width, rng, scale)

    # shrink while the crop box stays >= image_size on both sides
    _, _, box_height, box_width = box
    min_height = math.ceil(height * image_size / box_height)
    min_width = math.ceil(width * image_size / box_width)
    rgb = decode_image(jpeg, min_height=min_height, min_width=min_width)

    image = as_image_tensor(rgb)
    box = scale_box(box, (height, width), rgb.shape[:2])
    crop = resized_crop(image, box, image_size)
    return (random_flip(crop, rng) if flip else crop).contiguous()


def decode_eval_crop(jpeg: bytes, image_size: int) -> torch.Tensor:
    """Decode JPEG bytes and apply the evaluation resize and centre crop: -> (3, S, S) uint8.

    The resize target comes from the full image size in the header, so a DCT-shrunk decode
    gives the same geometry as a full one.
    """
    height, width = read_jpeg_size(jpeg)
    target_height, target_width = eval_resize_shape(height, width, image_size)
    rgb = decode_image(jpeg, min_height=target_height, min_width=target_width)
    image = resize(as_image_tensor(rgb), target_height, target_width)
    return center_crop(image, image_size).contiguous()


# ---------------------------------------------------------------------------------------------
# normalisation on the device


def normalize_batch(
    images_uint8: torch.Tensor,
    device: torch.device | str,
    channels_last: bool = True,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Move a uint8 batch (B, 3, H, W) to `device`, then convert it and apply ImageNet mean and std.

    The copy to the device moves 1 byte per channel. The float conversion and the arithmetic
    happen on the device in float32, and the result is cast to `dtype` at the end.
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or images_uint8.shape[1] != 3:
        raise ValueError(
            f"expected a uint8 image batch of shape (B, 3, H, W), got {tuple(images_uint8.shape)} {images_uint8.dtype}"
        )
    B, C, H, W = images_uint8.shape

    # move uint8, then lay it out for the model before the float copy exists
    images = images_uint8.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)

    mean = torch.tensor(IMAGENET_MEAN, device=images.device).mul_(255.0).view(1, C, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).mul_(255.0).view(1, C, 1, 1)
    normalized = images.float().sub_(mean).div_(std)  # (B, 3, H, W), memory format kept
    return normalized.to(dtype)

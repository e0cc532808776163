"""WebDataset streaming for training and evaluation.

Shards are split across ranks and DataLoader workers by sample ranges (`sharding`), read and
shuffled as raw bytes, decoded with simplejpeg and augmented on uint8 in the workers
(`stream`, `transforms`), and normalised on the device (`normalize_batch`).
"""

from toolkit.data.batch import Batch
from toolkit.data.decode import CorruptSampleError, decode_image
from toolkit.data.loader import EpochLoader, build_eval_loader, build_train_loader, steps_per_epoch
from toolkit.data.sharding import epoch_shard_order
from toolkit.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    decode_eval_crop,
    decode_train_crop,
    eval_transform,
    normalize_batch,
    train_transform,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Batch",
    "CorruptSampleError",
    "EpochLoader",
    "build_eval_loader",
    "build_train_loader",
    "decode_eval_crop",
    "decode_image",
    "decode_train_crop",
    "epoch_shard_order",
    "eval_transform",
    "normalize_batch",
    "steps_per_epoch",
    "train_transform",
]

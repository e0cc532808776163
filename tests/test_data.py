"""Tests of toolkit.data: shard splitting, decoding, transforms, skip counting and the loaders.

Every test writes its own tiny shards with webdataset.TarWriter in the dataset contract
(KEY.jpg, KEY.cls, KEY.json) plus a manifest, so nothing here depends on `toolkit pack`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2 as v2
import torchvision.transforms.v2.functional as TF
import webdataset as wds
from PIL import Image
from torchvision.transforms import RandomResizedCrop

import toolkit.data.stream as stream_module
import toolkit.data.transforms as transforms_module
from toolkit.config import ConfigError, TrainConfig
from toolkit.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CorruptSampleError,
    build_eval_loader,
    build_train_loader,
    decode_eval_crop,
    decode_image,
    decode_train_crop,
    epoch_shard_order,
    eval_transform,
    normalize_batch,
    steps_per_epoch,
    train_transform,
)
from toolkit.data.decode import parse_label
from toolkit.data.sharding import ShardFile, eval_span, ranges_in_span, split_evenly, train_span
from toolkit.data.transforms import random_resized_crop_box, resized_crop, as_image_tensor
from toolkit.dataset import DatasetError, load_dataset

NUM_CLASSES = 5
IMAGE_SIZE = 16

# Three workers on a two-core machine is the point of some tests, not a mistake.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")


# ---------------------------------------------------------------------------------------------
# helpers


def make_jpeg(seed: int, height: int = 24, width: int = 32, grey: bool = False) -> bytes:
    """Encode a smooth random image, so that resampling differences stay small."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, height)[:, None, None]
    x = np.linspace(0, 1, width)[None, :, None]
    colours = rng.uniform(0, 255, size=(3, 1, 1, 3))
    pixels = colours[0] * (1 - y) * (1 - x) + colours[1] * y + colours[2] * x * (1 - y)
    array = np.clip(pixels, 0, 255).astype(np.uint8)
    image = Image.fromarray(array[:, :, 0] if grey else array)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_dataset(root: Path, shard_sizes: dict[str, list[int]], edit=None) -> dict[str, tuple[int, str]]:
    """Write shards and a manifest under root; return {key: (label, shard name)} of every sample.

    `edit(split, shard_index, index, sample)` may return a changed sample dict (or None to
    write it unchanged), to plant corrupt or extra members.
    """
    truth: dict[str, tuple[int, str]] = {}
    splits = {}
    for split, sizes in shard_sizes.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        shards = []
        for shard_index, count in enumerate(sizes):
            name = f"{split}/{split}-{shard_index:06d}.tar"
            with wds.TarWriter(str(root / name)) as writer:
                for index in range(count):
                    key = f"{split}{shard_index:02d}x{index:04d}"
                    label = (shard_index * 7 + index) % NUM_CLASSES
                    sample = {
                        "__key__": key,
                        "jpg": make_jpeg(len(truth) + 1000 * len(splits)),
                        "cls": str(label).encode(),
                        "json": json.dumps({"path": f"{key}.jpg", "class": f"c{label}"}).encode(),
                    }
                    if edit is not None:
                        sample = edit(split, shard_index, index, sample) or sample
                    writer.write(sample)
                    truth[key] = (label, name)
            data = (root / name).read_bytes()
            shards.append({"name": name, "samples": count, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        splits[split] = {"samples": sum(sizes), "shards": shards}
    manifest = {
        "format": "toolkit-dataset",
        "version": 1,
        "classes": [f"c{i}" for i in range(NUM_CLASSES)],
        "pack_options": {},
        "splits": splits,
        "rejects": {},
        "duplicates": {},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return truth


def train_config(**overrides) -> TrainConfig:
    settings = dict(image_size=IMAGE_SIZE, batch_size=4, workers=0, shuffle_buffer=8, seed=0)
    settings.update(overrides)
    return TrainConfig(**settings)


def reference_keys(dataset, split: str) -> list[str]:
    """Read every key with webdataset's own reader, as an independent reference."""
    reader = wds.WebDataset(dataset.shard_urls(split), shardshuffle=False, empty_check=False)
    return [sample["__key__"] for sample in reader]


def all_keys(batches) -> list[str]:
    return [key for batch in batches for key in batch.keys]


class TorchDraws:
    """Draws from torch's global generator in the order torchvision's get_params makes them."""

    def uniform(self, low: float, high: float) -> float:
        return torch.empty(1).uniform_(low, high).item()

    def integers(self, low: int, high: int) -> int:
        return torch.randint(low, high, size=(1,)).item()


def corrupt_edit(split, shard_index, index, sample):
    """Plant one corrupt sample of each kind in shard 1."""
    if shard_index != 1:
        return None
    if index == 0:
        sample["jpg"] = b"not a jpeg at all"
    elif index == 1:
        del sample["cls"]
    elif index == 2:
        sample["cls"] = b"seven"
    elif index == 3:
        sample["cls"] = str(NUM_CLASSES + 2).encode()
    elif index == 4:
        sample["jpg"] = sample["jpg"][: len(sample["jpg"]) // 2]
    elif index == 5:
        del sample["jpg"]
    return sample


CORRUPT_KEYS = {f"train01x{i:04d}" for i in range(6)} | {f"val01x{i:04d}" for i in range(6)}


# ---------------------------------------------------------------------------------------------
# sharding


def test_split_evenly_counts():
    assert split_evenly(10, 3) == [4, 3, 3]
    assert split_evenly(2, 4) == [1, 1, 0, 0]
    assert split_evenly(0, 2) == [0, 0]


def expand(ranges) -> list[tuple[str, int]]:
    return [(task.shard, index) for task in ranges for index in range(task.start, task.stop)]


@pytest.mark.parametrize("sizes", [[7], [5, 9, 1, 12], [3, 3, 3, 3, 3, 3, 3]])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("workers", [1, 2, 5])
def test_train_spans_partition(sizes, world_size, workers):
    shards = [ShardFile(f"s{i}", f"p{i}", n) for i, n in enumerate(sizes)]
    batch_size = 2
    steps = sum(sizes) // (batch_size * world_size)
    seen = []
    for rank in range(world_size):
        rank_samples = 0
        for worker in range(workers):
            begin, end = train_span(steps, batch_size, rank, worker, workers)
            assert (end - begin) % batch_size == 0
            ranges = ranges_in_span(shards, begin, end)
            rank_samples += sum(task.samples for task in ranges)
            seen += expand(ranges)
        assert rank_samples == steps * batch_size
    assert len(seen) == steps * batch_size * world_size
    assert len(set(seen)) == len(seen)


@pytest.mark.parametrize("sizes", [[7], [5, 9, 1, 12], [1, 1]])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("workers", [1, 2, 5])
def test_eval_spans_cover(sizes, world_size, workers):
    shards = [ShardFile(f"s{i}", f"p{i}", n) for i, n in enumerate(sizes)]
    total = sum(sizes)
    seen = []
    for rank in range(world_size):
        for worker in range(workers):
            seen += expand(ranges_in_span(shards, *eval_span(total, 3, rank, world_size, worker, workers)))
    expected = [(shard.name, index) for shard in shards for index in range(shard.samples)]
    assert sorted(seen) == sorted(expected)
    assert len(seen) == total


def test_shard_order_per_epoch():
    shards = [ShardFile(f"s{i}", f"p{i}", 1) for i in range(8)]
    first = epoch_shard_order(shards, seed=3, epoch=0)
    assert first == epoch_shard_order(shards, seed=3, epoch=0)
    assert first != epoch_shard_order(shards, seed=3, epoch=1)
    assert first != epoch_shard_order(shards, seed=4, epoch=0)
    assert sorted(shard.name for shard in first) == [shard.name for shard in shards]


# ---------------------------------------------------------------------------------------------
# decoding and transforms


def test_parse_label_values():
    assert parse_label(b"3", NUM_CLASSES) == 3
    assert parse_label(b" 4\n", NUM_CLASSES) == 4
    for bad in (b"x", b"-1", b"", b"\xff", str(NUM_CLASSES).encode()):
        with pytest.raises(CorruptSampleError):
            parse_label(bad, NUM_CLASSES)


def test_decode_image_dct_scale():
    jpeg = make_jpeg(1, height=480, width=640)
    assert decode_image(jpeg).shape == (480, 640, 3)
    # 1/2 keeps 240 >= 200 rows; 3/8 would give 180
    assert decode_image(jpeg, min_height=200, min_width=200).shape == (240, 320, 3)
    # only factors of 2 or more are used, so 300 rows need a full decode
    assert decode_image(jpeg, min_height=300, min_width=10).shape == (480, 640, 3)
    assert decode_image(jpeg, min_height=50, min_width=50).shape == (60, 80, 3)


def test_decode_image_grey_and_invalid():
    assert decode_image(make_jpeg(2, grey=True)).shape == (24, 32, 3)
    with pytest.raises(CorruptSampleError):
        decode_image(b"\xff\xd8 truncated")
    jpeg = make_jpeg(2)
    with pytest.raises(CorruptSampleError):
        decode_image(jpeg[: len(jpeg) // 2])


def test_decode_image_max_pixels(monkeypatch):
    monkeypatch.setattr("toolkit.data.decode.MAX_PIXELS", 100)
    with pytest.raises(CorruptSampleError, match="more than the limit"):
        decode_image(make_jpeg(3))


@pytest.mark.parametrize("shape", [(32, 32), (250, 250), (100, 400), (400, 90), (7, 300)])
def test_crop_box_matches_torchvision(shape):
    height, width = shape
    image = torch.empty(3, height, width)
    for seed in range(40):
        torch.manual_seed(seed)
        expected = RandomResizedCrop.get_params(image, scale=[0.08, 1.0], ratio=[3 / 4, 4 / 3])
        torch.manual_seed(seed)
        assert random_resized_crop_box(height, width, TorchDraws()) == tuple(expected), (shape, seed)


def test_resized_crop_matches_torchvision():
    rgb = np.random.default_rng(0).integers(0, 256, size=(40, 50, 3), dtype=np.uint8)
    reference = TF.resized_crop(torch.from_numpy(rgb).permute(2, 0, 1).contiguous(), 3, 5, 30, 41, [16, 16], antialias=True)
    result = resized_crop(as_image_tensor(rgb), (3, 5, 30, 41), 16)
    assert result.dtype == torch.uint8
    assert torch.equal(result, reference)


@pytest.mark.parametrize("shape", [(24, 32), (40, 21), (30, 30)])
def test_eval_transform_matches_torchvision(shape):
    rgb = np.random.default_rng(1).integers(0, 256, size=(*shape, 3), dtype=np.uint8)
    scale = int(IMAGE_SIZE / 0.875)
    reference = v2.Compose([v2.Resize(scale, antialias=True), v2.CenterCrop(IMAGE_SIZE)])(
        torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
    )
    result = eval_transform(rgb, IMAGE_SIZE)
    assert result.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
    assert result.dtype == torch.uint8
    assert torch.equal(result, reference)
    assert torch.equal(eval_transform(rgb, IMAGE_SIZE), result)


def test_eval_transform_rejects_bad_array():
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        eval_transform(np.zeros((8, 8), dtype=np.uint8), IMAGE_SIZE)
    with pytest.raises(ValueError, match="uint8"):
        eval_transform(np.zeros((8, 8, 3), dtype=np.float32), IMAGE_SIZE)


def test_eval_transform_read_only_array():
    rgb = np.asarray(Image.open(io.BytesIO(make_jpeg(4))))
    assert not rgb.flags.writeable
    assert eval_transform(rgb, IMAGE_SIZE).shape == (3, IMAGE_SIZE, IMAGE_SIZE)


def test_train_crop_dct_matches_full_decode(monkeypatch):
    jpeg = make_jpeg(5, height=480, width=640)
    full = decode_image(jpeg)
    shapes = []

    def recording_decode(data, min_height=0, min_width=0):
        rgb = decode_image(data, min_height, min_width)
        shapes.append(rgb.shape)
        return rgb

    monkeypatch.setattr(transforms_module, "decode_image", recording_decode)
    for seed in range(10):
        fast = decode_train_crop(jpeg, 32, np.random.default_rng(seed))
        reference = train_transform(full, 32, np.random.default_rng(seed))
        assert fast.shape == (3, 32, 32)
        assert fast.dtype == torch.uint8
        assert (fast.float() - reference.float()).abs().mean() < 3.0, seed
    assert any(shape[0] < 480 for shape in shapes)


def test_eval_crop_dct_matches_full_decode():
    jpeg = make_jpeg(6, height=480, width=640)
    fast = decode_eval_crop(jpeg, 32)
    reference = eval_transform(decode_image(jpeg), 32)
    assert fast.shape == (3, 32, 32)
    assert (fast.float() - reference.float()).abs().mean() < 3.0
    assert torch.equal(decode_eval_crop(jpeg, 32), fast)


def test_normalize_batch_reference():
    images = torch.randint(0, 256, (2, 3, 5, 7), dtype=torch.uint8)
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64).view(1, 3, 1, 1)
    expected = (images.double() / 255 - mean) / std
    result = normalize_batch(images, "cpu")
    assert result.dtype == torch.float32
    assert result.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(result.double(), expected, rtol=0, atol=1e-5)
    half = normalize_batch(images, "cpu", channels_last=False, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert half.is_contiguous()
    torch.testing.assert_close(half.double(), expected, rtol=1e-2, atol=1e-2)


def test_normalize_batch_rejects_float():
    with pytest.raises(ValueError, match="uint8"):
        normalize_batch(torch.zeros(1, 3, 4, 4), "cpu")


# ---------------------------------------------------------------------------------------------
# loaders


@pytest.fixture
def small_dataset(tmp_path):
    # 3 train shards of 10 + 7 + 13 = 30 samples, 2 val shards
    truth = write_dataset(tmp_path, {"train": [10, 7, 13], "val": [6, 5]})
    return load_dataset(tmp_path), truth


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_eval_keys_once(small_dataset, workers):
    dataset, truth = small_dataset
    loader = build_eval_loader(dataset, "val", batch_size=4, workers=workers, image_size=IMAGE_SIZE)
    batches = list(loader)
    keys = all_keys(batches)
    assert sorted(keys) == sorted(reference_keys(dataset, "val"))
    assert len(keys) == len(set(keys)) == 11
    assert len(batches) == len(loader)
    for batch in batches:
        assert batch.labels.dtype == torch.int64
        assert batch.labels.tolist() == [truth[key][0] for key in batch.keys]
        assert batch.shards == [truth[key][1] for key in batch.keys]
        assert batch.images.dtype == torch.uint8
        assert batch.images.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert batch.skipped == 0


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_train_keys_once(small_dataset, workers):
    dataset, truth = small_dataset
    config = train_config(workers=workers)
    loader = build_train_loader(dataset, config, epoch=0)
    batches = list(loader)
    keys = all_keys(batches)
    steps = steps_per_epoch(dataset, config)
    assert steps == 30 // 4
    assert len(batches) == steps == len(loader)
    assert all(len(batch) == 4 for batch in batches)
    assert len(set(keys)) == len(keys) == steps * 4
    assert set(keys) <= set(truth)
    assert loader.left_out == 30 - steps * 4
    assert loader.skipped == 0
    assert loader.repeated == 0


def test_train_batch_types(small_dataset):
    dataset, truth = small_dataset
    batch = next(iter(build_train_loader(dataset, train_config(), epoch=0)))
    assert batch.images.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert batch.images.dtype == torch.uint8
    assert batch.labels.dtype == torch.int64
    assert batch.labels.tolist() == [truth[key][0] for key in batch.keys]
    assert all(isinstance(key, str) for key in batch.keys)
    assert batch.shards == [truth[key][1] for key in batch.keys]


def test_train_idle_workers(tmp_path):
    write_dataset(tmp_path, {"train": [9]})
    dataset = load_dataset(tmp_path)
    batches = list(build_train_loader(dataset, train_config(workers=3), epoch=0))
    keys = all_keys(batches)
    assert len(batches) == 2
    assert len(set(keys)) == len(keys) == 8


def test_train_ranks_disjoint(small_dataset):
    dataset, _ = small_dataset
    config = train_config(workers=2, batch_size=3)
    steps = steps_per_epoch(dataset, config, world_size=2)
    per_rank = [all_keys(build_train_loader(dataset, config, epoch=1, rank=rank, world_size=2)) for rank in range(2)]
    assert steps == 30 // 6
    assert len(per_rank[0]) == len(per_rank[1]) == steps * 3
    assert not set(per_rank[0]) & set(per_rank[1])
    assert len(set(per_rank[0]) | set(per_rank[1])) == steps * 6


def test_eval_ranks_cover(small_dataset):
    dataset, _ = small_dataset
    per_rank = [
        all_keys(build_eval_loader(dataset, "train", batch_size=4, workers=2, image_size=IMAGE_SIZE, rank=rank, world_size=3))
        for rank in range(3)
    ]
    keys = [key for rank_keys in per_rank for key in rank_keys]
    assert sorted(keys) == sorted(reference_keys(dataset, "train"))
    assert [len(rank_keys) for rank_keys in per_rank] == [10, 10, 10]


def test_train_follows_shard_order(tmp_path):
    write_dataset(tmp_path, {"train": [4, 4, 4, 4, 4, 4]})
    dataset = load_dataset(tmp_path)
    config = train_config(shuffle_buffer=0, seed=7)
    files = [ShardFile(shard.name, "", shard.samples) for shard in dataset.split("train").shards]
    orders = []
    for epoch in (0, 1):
        shards = [shard for batch in build_train_loader(dataset, config, epoch) for shard in batch.shards]
        observed = list(dict.fromkeys(shards))
        assert observed == [shard.name for shard in epoch_shard_order(files, 7, epoch)]
        orders.append(observed)
    assert orders[0] != orders[1]


def test_train_deterministic(small_dataset):
    dataset, _ = small_dataset
    config = train_config(workers=2)
    first = list(build_train_loader(dataset, config, epoch=2))
    again = list(build_train_loader(dataset, config, epoch=2))
    other = list(build_train_loader(dataset, config, epoch=3))
    assert all_keys(first) == all_keys(again)
    assert all(torch.equal(a.images, b.images) for a, b in zip(first, again))
    assert all_keys(first) != all_keys(other)


def test_shuffle_before_decode(tmp_path, monkeypatch):
    write_dataset(tmp_path, {"train": [12, 12]})
    dataset = load_dataset(tmp_path)
    events = []
    read_shard = stream_module.iter_shard_samples
    decode = stream_module.decode_train_crop

    def recording_read(task):
        for sample in read_shard(task):
            events.append(("read", sample.key))
            yield sample

    def recording_decode(jpeg, image_size, rng, **options):
        events.append(("decode", None))
        return decode(jpeg, image_size, rng, **options)

    monkeypatch.setattr(stream_module, "iter_shard_samples", recording_read)
    monkeypatch.setattr(stream_module, "decode_train_crop", recording_decode)
    keys = all_keys(build_train_loader(dataset, train_config(shuffle_buffer=10), epoch=0))
    kinds = [kind for kind, _ in events]
    read_order = [key for kind, key in events if kind == "read"]
    assert kinds.index("decode") == 10
    assert kinds.count("decode") == 24
    assert keys != read_order


def test_corrupt_samples_skipped_eval(tmp_path, caplog):
    write_dataset(tmp_path, {"val": [8, 9, 8]}, edit=corrupt_edit)
    dataset = load_dataset(tmp_path)
    with caplog.at_level(logging.WARNING, logger="toolkit.data"):
        batches = list(build_eval_loader(dataset, "val", batch_size=4, workers=0, image_size=IMAGE_SIZE))
    keys = all_keys(batches)
    expected = set(reference_keys(dataset, "val")) - CORRUPT_KEYS
    assert sorted(keys) == sorted(expected)
    assert sum(batch.skipped for batch in batches) == 6
    entries = [entry for batch in batches for entry in batch.skipped_samples]
    assert {entry.key for entry in entries} == {key for key in CORRUPT_KEYS if key.startswith("val")}
    assert {entry.shard for entry in entries} == {"val/val-000001.tar"}
    assert sum(entry.count for entry in entries) == 6
    assert "val/val-000001.tar" in caplog.text
    assert "val01x0000" in caplog.text
    assert "missing member val01x0001.cls" in caplog.text


def test_corrupt_samples_skipped_workers(tmp_path):
    write_dataset(tmp_path, {"val": [8, 9, 8]}, edit=corrupt_edit)
    dataset = load_dataset(tmp_path)
    loader = build_eval_loader(dataset, "val", batch_size=4, workers=3, image_size=IMAGE_SIZE)
    batches = list(loader)
    assert len(all_keys(batches)) == 25 - 6
    assert sum(batch.skipped for batch in batches) == 6
    assert loader.skipped == 6
    assert sum(entry.count for batch in batches for entry in batch.skipped_samples) == 6


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_samples_train_filled(tmp_path, workers):
    # 24 samples, batch 4: the plan covers every sample, 6 of them corrupt
    write_dataset(tmp_path, {"train": [8, 8, 8]}, edit=corrupt_edit)
    dataset = load_dataset(tmp_path)
    loader = build_train_loader(dataset, train_config(workers=workers), epoch=0)
    batches = list(loader)
    keys = all_keys(batches)
    assert len(batches) == 6
    assert all(len(batch) == 4 for batch in batches)
    assert sum(batch.skipped for batch in batches) == 6
    assert loader.skipped == 6
    # 18 good samples fill 4 batches and 2 of the 5th; 2 repeats complete it, then 4 more
    assert loader.repeated == 6
    assert len(set(keys)) == 18
    assert not set(keys) & CORRUPT_KEYS


def test_truncated_shard_counted(tmp_path, caplog):
    write_dataset(tmp_path, {"val": [6, 10]})
    dataset = load_dataset(tmp_path)
    shard = tmp_path / "val/val-000001.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="toolkit.data"):
        batches = list(build_eval_loader(dataset, "val", batch_size=4, workers=0, image_size=IMAGE_SIZE))
    skipped = sum(batch.skipped for batch in batches)
    assert skipped > 0
    assert len(all_keys(batches)) + skipped == 16
    entries = [entry for batch in batches for entry in batch.skipped_samples]
    assert sum(entry.count for entry in entries) == skipped
    assert entries[-1].key.startswith("samples ")
    assert "val/val-000001.tar" in caplog.text


def test_oversized_members_skipped(small_dataset, monkeypatch):
    dataset, _ = small_dataset
    monkeypatch.setattr(stream_module, "MAX_MEMBER_BYTES", 100)
    loader = build_eval_loader(dataset, "val", batch_size=4, workers=0, image_size=IMAGE_SIZE)
    assert list(loader) == []
    assert loader.skipped == 11
    with pytest.raises(DatasetError, match="decoded no train sample"):
        list(build_train_loader(dataset, train_config(), epoch=0))


def test_missing_shard_file(small_dataset):
    dataset, _ = small_dataset
    os.remove(dataset.root / "val/val-000001.tar")
    with pytest.raises(DatasetError, match="val/val-000001.tar"):
        build_eval_loader(dataset, "val", batch_size=4, workers=0, image_size=IMAGE_SIZE)


class MakeDirectory:
    """A pickle payload that creates a directory when unpickled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (str(self.path),))


def test_pickle_members_never_loaded(tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(MakeDirectory(marker))

    def add_pickles(split, shard_index, index, sample):
        sample["pyd"] = payload
        sample["pth"] = payload
        return sample

    write_dataset(tmp_path / "data", {"train": [8], "val": [5]}, edit=add_pickles)
    dataset = load_dataset(tmp_path / "data")
    train = list(build_train_loader(dataset, train_config(), epoch=0))
    val = list(build_eval_loader(dataset, "val", batch_size=4, workers=0, image_size=IMAGE_SIZE))
    assert len(all_keys(train)) == 8
    assert len(all_keys(val)) == 5
    assert not marker.exists()

    # the payload does act when something unpickles it
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(MakeDirectory(control)))
    assert control.is_dir()


def test_steps_per_epoch_values(small_dataset):
    dataset, _ = small_dataset
    assert steps_per_epoch(dataset, train_config(batch_size=4)) == 7
    assert steps_per_epoch(dataset, train_config(batch_size=4), world_size=2) == 3
    assert steps_per_epoch(dataset, train_config(batch_size=31)) == 0
    with pytest.raises(ConfigError, match="lower batch_size"):
        build_train_loader(dataset, train_config(batch_size=31), epoch=0)


def test_invalid_settings(small_dataset):
    dataset, _ = small_dataset
    with pytest.raises(ConfigError, match="workers -1"):
        build_train_loader(dataset, train_config(workers=-1), epoch=0)
    with pytest.raises(ConfigError, match="batch_size 0"):
        build_eval_loader(dataset, "val", batch_size=0, workers=0, image_size=IMAGE_SIZE)
    with pytest.raises(ValueError, match="rank 2"):
        build_train_loader(dataset, train_config(), epoch=0, rank=2, world_size=2)
    with pytest.raises(DatasetError, match="'test'"):
        build_eval_loader(dataset, "test", batch_size=4, workers=0, image_size=IMAGE_SIZE)


def test_shard_counts_match_reference(small_dataset):
    dataset, _ = small_dataset
    counts = Counter(
        shard for batch in build_eval_loader(dataset, "train", batch_size=5, workers=0, image_size=IMAGE_SIZE) for shard in batch.shards
    )
    assert counts == {shard.name: shard.samples for shard in dataset.split("train").shards}


def test_train_crop_without_flip_keeps_sides():
    import io

    import numpy as np
    from PIL import Image

    from toolkit.data.transforms import decode_train_crop

    # left half dark, right half bright: a flip would put the bright half on the left
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    pixels[:, 32:] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    rng = np.random.default_rng(0)
    for _ in range(20):
        crop = decode_train_crop(buffer.getvalue(), 32, rng, scale=(0.9, 1.0), flip=False)
        assert crop[:, :, :8].float().mean() < crop[:, :, -8:].float().mean()


def test_crop_scale_bounds_area():
    import numpy as np

    from toolkit.data.transforms import random_resized_crop_box

    rng = np.random.default_rng(1)
    for _ in range(50):
        _, _, height, width = random_resized_crop_box(200, 200, rng, scale=(0.5, 1.0))
        # rounding of the sides moves the area by at most a few percent
        assert height * width >= 0.45 * 200 * 200

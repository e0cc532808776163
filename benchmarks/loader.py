"""Time the toolkit train stream beside webdataset's plain recipe on the same shards.

The script renders JPEG images with toolkit.synthetic into a temporary folder, writes them as
train shards with a manifest, and then reads one epoch of them twice per worker setting:

- toolkit: build_train_loader (simplejpeg decode, random resized crop and flip on uint8,
  uint8 batches);
- plain: wds.WebDataset(...).shuffle(...).decode("pil") with torchvision's
  RandomResizedCrop + RandomHorizontalFlip + ToTensor, batched in the worker.

Both run in this process one after the other, with the same batch size, shuffle buffer and
worker count. Torch is limited to one thread, so images/s is the rate of one worker, or of the
main process for 0 workers. The rate counts every image yielded over the
wall time of the whole epoch, worker start included. Target: toolkit >= 1.5x plain.

Usage: python benchmarks/loader.py [--samples 2000] [--workers 0 1] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import torch
import torchvision.transforms as T
import webdataset as wds
from torch.utils.data import DataLoader

from toolkit.config import TrainConfig
from toolkit.data import build_train_loader
from toolkit.dataset import Dataset, load_dataset
from toolkit.synthetic import class_name, write_image_folder

TARGET = 1.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=2000, help="images to generate (rounded down to whole classes)")
    parser.add_argument("--classes", type=int, default=20, help="classes the images are spread over")
    parser.add_argument("--source-size", type=int, default=250, help="side of the generated square images in pixels")
    parser.add_argument("--shard-samples", type=int, default=250, help="samples per shard")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="DataLoader worker counts to run")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per batch")
    parser.add_argument("--image-size", type=int, default=224, help="side of the training crop in pixels")
    parser.add_argument("--shuffle-buffer", type=int, default=500, help="samples in each shuffle buffer")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# data


def write_dataset(root: Path, args: argparse.Namespace) -> Dataset:
    """Render images, write them as train shards in the dataset contract and load the manifest."""
    per_class = max(1, args.samples // args.classes)
    images = write_image_folder(root / "images", args.classes, per_class, size=args.source_size)
    paths = sorted(images.glob("*/*.jpg"))
    labels = {class_name(label): label for label in range(args.classes)}

    (root / "train").mkdir()
    shards = []
    for start in range(0, len(paths), args.shard_samples):
        name = f"train/train-{start // args.shard_samples:06d}.tar"
        with wds.TarWriter(str(root / name)) as writer:
            for path in paths[start : start + args.shard_samples]:
                label = labels[path.parent.name]
                writer.write(
                    {
                        "__key__": f"{path.parent.name}_{path.stem}",
                        "jpg": path.read_bytes(),
                        "cls": str(label).encode(),
                        "json": json.dumps({"path": str(path), "class": path.parent.name}).encode(),
                    }
                )
        data = (root / name).read_bytes()
        count = len(paths[start : start + args.shard_samples])
        shards.append({"name": name, "samples": count, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})

    manifest = {
        "format": "toolkit-dataset",
        "version": 1,
        "classes": [class_name(label) for label in range(args.classes)],
        "pack_options": {},
        "splits": {"train": {"samples": len(paths), "shards": shards}},
        "rejects": {},
        "duplicates": {},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return load_dataset(root)


# ---------------------------------------------------------------------------------------------
# the two recipes


def plain_loader(dataset: Dataset, args: argparse.Namespace, workers: int) -> DataLoader:
    transform = T.Compose([T.RandomResizedCrop(args.image_size), T.RandomHorizontalFlip(), T.ToTensor()])
    pipeline = (
        wds.WebDataset(dataset.shard_urls("train"), shardshuffle=False, empty_check=False)
        .shuffle(args.shuffle_buffer)
        .decode("pil")
        .to_tuple("jpg", "cls")
        .map_tuple(transform, int)
        .batched(args.batch_size, partial=False)
    )
    return DataLoader(pipeline, batch_size=None, num_workers=workers)


def toolkit_loader(dataset: Dataset, args: argparse.Namespace, workers: int):
    config = TrainConfig(
        image_size=args.image_size, batch_size=args.batch_size, workers=workers, shuffle_buffer=args.shuffle_buffer
    )
    return build_train_loader(dataset, config, epoch=0)


def images_per_second(loader, images_of) -> tuple[float, int]:
    """Iterate one epoch; return the rate and the number of images."""
    start = time.perf_counter()
    images = 0
    for batch in loader:
        images += images_of(batch)
    return images / (time.perf_counter() - start), images


# ---------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory(prefix="toolkit-loader-bench-") as directory:
        print(f"writing {args.samples} {args.source_size}x{args.source_size} JPEG samples ...", flush=True)
        dataset = write_dataset(Path(directory), args)
        print(
            f"{dataset.split('train').samples} samples in {len(dataset.split('train').shards)} shards; "
            f"batch {args.batch_size}, crop {args.image_size}, shuffle buffer {args.shuffle_buffer}, 1 torch thread\n"
        )
        print(f"{'workers':>7}  {'plain img/s':>11}  {'toolkit img/s':>13}  {'ratio':>6}")

        ratios = []
        for workers in args.workers:
            plain_rate, _ = images_per_second(plain_loader(dataset, args, workers), lambda batch: len(batch[1]))
            toolkit_rate, _ = images_per_second(toolkit_loader(dataset, args, workers), len)
            ratio = toolkit_rate / plain_rate
            ratios.append(ratio)
            print(f"{workers:>7}  {plain_rate:>11.1f}  {toolkit_rate:>13.1f}  {ratio:>5.2f}x", flush=True)

    passed = min(ratios) >= TARGET
    print(f"\ntarget: toolkit >= {TARGET}x plain at every worker count: {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Rank process for tests/test_distributed.py, started by torchrun on the CPU with gloo on loopback.

    python -m torch.distributed.run --nproc-per-node 2 --master-addr 127.0.0.1 ... tests/dist_worker.py WORKDIR

Reads the inputs the test wrote to WORKDIR/inputs.pt, runs every case below on every rank and
writes each rank's results to WORKDIR/CASE-rank{R}.pt. The test compares them with references
that it computes in one process. The module also defines the settings and the dataset writer
that both sides share. Importing it runs nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds

from toolkit.config import EvalConfig, TrainConfig
from toolkit.eval import run_eval
from toolkit.model.sharded_head import ShardedClassHead, class_range
from toolkit.ops.sharded_ce import sharded_cross_entropy, sharded_topk
from toolkit.synthetic import class_name, encode_jpeg, render_image
from toolkit.train import train
from toolkit.train.distributed import gather_head_state, split_head_state
from toolkit.train.head_optim import RowOptimizer

# a run small enough for two CPU processes: 2 steps per epoch of 4 images per rank
TRAIN_CONFIG = TrainConfig(
    arch="resnet18",
    embedding_dim=8,
    image_size=32,
    batch_size=4,
    workers=0,
    shuffle_buffer=8,
    lr=0.05,
    warmup_steps=1,
    epochs=2,
    log_every=1,
    save_every=1000,
    class_chunk=2,
    device="cpu",
    precision="fp32",
)

# batches of 2 give each rank more than one batch of the 5 val samples
EVAL_CONFIG = EvalConfig(split="val", batch_size=2, workers=0, device="cpu", precision="fp32")

# options of sharded_cross_entropy, each compared with chunked_cross_entropy on the whole matrix
LOSS_CASES = {
    "linear": {},
    "smoothing": {"label_smoothing": 0.1},
    "cosface": {"normalize": True, "scale": 8.0, "margin": 0.2, "margin_type": "cosface"},
    "arcface": {"normalize": True, "scale": 8.0, "margin": 0.3, "margin_type": "arcface", "label_smoothing": 0.05},
}
LOSS_CHUNK = 4
UNEVEN_ROWS = (3, 1)  # rows of rank 0 and rank 1 in the uneven cases
TOPK = 4
FUSED_STEPS = 3
FUSED_SETTINGS = {"lr": 0.5, "momentum": 0.9, "weight_decay": 0.01}
SAMPLE_RATE = 0.3
SAMPLE_STEPS = 3


# ---------------------------------------------------------------------------------------------
# dataset


def write_dataset(root: Path, shard_sizes: dict[str, list[int]], num_classes: int, size: int = 40) -> Path:
    """Write a dataset directory with exactly the given samples per shard, through webdataset's TarWriter.

    Sample i of the dataset has label i mod num_classes and a generated image of that class.
    """
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    splits = {}
    index = 0
    for split, sizes in shard_sizes.items():
        (root / split).mkdir()
        shards = []
        for number, samples in enumerate(sizes):
            name = f"{split}/{split}-{number:06d}.tar"
            with wds.TarWriter(str(root / name)) as writer:
                for _ in range(samples):
                    label = index % num_classes
                    jpeg = encode_jpeg(render_image(label, rng, size))
                    meta = {"path": f"{class_name(label)}/{index}.jpg", "class": class_name(label),
                            "width": size, "height": size, "sha256": hashlib.sha256(jpeg).hexdigest()}
                    writer.write({"__key__": f"s{index:06d}", "jpg": jpeg, "cls": str(label).encode(),
                                  "json": json.dumps(meta).encode()})
                    index += 1
            data = (root / name).read_bytes()
            shards.append({"name": name, "samples": samples, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
        splits[split] = {"samples": sum(sizes), "shards": shards}

    classes = [class_name(label) for label in range(num_classes)]
    manifest = {"format": "toolkit-dataset", "version": 1, "classes": classes, "pack_options": {},
                "splits": splits, "rejects": {}, "duplicates": {}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


# ---------------------------------------------------------------------------------------------
# cases


def rank_rows(tensor: torch.Tensor, rank: int, sizes: tuple[int, ...]) -> torch.Tensor:
    start = sum(sizes[:rank])
    return tensor[start : start + sizes[rank]]


def case_loss(inputs: dict, rank: int, world_size: int) -> dict:
    """Loss, embedding gradient and class-row gradient of every option, with even and uneven rows."""
    results = {}
    for name, options in LOSS_CASES.items():
        x_all, weight_all, labels_all = inputs["loss"][name]
        rows = x_all.shape[0] // world_size
        sizes = (rows,) * world_size
        start, stop = class_range(weight_all.shape[0], rank, world_size)
        x = rank_rows(x_all, rank, sizes).clone().requires_grad_()
        weight = weight_all[start:stop].clone().requires_grad_()
        loss = sharded_cross_entropy(
            x, weight, rank_rows(labels_all, rank, sizes), class_start=start, num_classes=weight_all.shape[0],
            group=dist.group.WORLD, chunk_size=LOSS_CHUNK, **options,
        )
        loss.backward()
        results[name] = {"loss": loss.detach(), "grad_x": x.grad, "grad_weight": weight.grad}

        # uneven rows, per-row losses of this rank's rows
        with torch.no_grad():
            results[name]["uneven"] = sharded_cross_entropy(
                rank_rows(x_all, rank, UNEVEN_ROWS), weight_all[start:stop], rank_rows(labels_all, rank, UNEVEN_ROWS),
                class_start=start, num_classes=weight_all.shape[0], group=dist.group.WORLD, chunk_size=LOSS_CHUNK,
                reduction="none", uneven=True, **options,
            )
    return results


def case_topk(inputs: dict, rank: int, world_size: int) -> dict:
    """Top-k with uneven rows, and with every row on rank 0 and none on rank 1."""
    x_all, weight_all = inputs["topk"]
    start, stop = class_range(weight_all.shape[0], rank, world_size)
    results = {}
    for name, sizes in (("uneven", UNEVEN_ROWS), ("empty", (x_all.shape[0], 0))):
        for normalize in (False, True):
            values, indices = sharded_topk(
                rank_rows(x_all, rank, sizes), weight_all[start:stop], TOPK, class_start=start,
                num_classes=weight_all.shape[0], group=dist.group.WORLD, chunk_size=LOSS_CHUNK,
                normalize=normalize, uneven=True,
            )
            results[f"{name}-{'cosine' if normalize else 'linear'}"] = (values, indices)
    return results


def case_fused(inputs: dict, rank: int, world_size: int) -> dict:
    """SGD applied inside backward on each rank's rows, for FUSED_STEPS steps."""
    x_all, weight_all, labels_all = inputs["fused"]
    rows = x_all.shape[0] // world_size
    sizes = (rows,) * world_size
    start, stop = class_range(weight_all.shape[0], rank, world_size)
    weight = weight_all[start:stop].clone()
    optimizer = RowOptimizer(weight, TrainConfig(optimizer="sgd", **FUSED_SETTINGS))
    grads_x = []
    for _ in range(FUSED_STEPS):
        x = rank_rows(x_all, rank, sizes).clone().requires_grad_()
        loss = sharded_cross_entropy(
            x, weight, rank_rows(labels_all, rank, sizes), class_start=start, num_classes=weight_all.shape[0],
            group=dist.group.WORLD, chunk_size=LOSS_CHUNK, row_update=optimizer.update,
        )
        loss.backward()
        grads_x.append(x.grad)
    return {"weight": weight, "grads_x": grads_x}


def sharded_head(weight_all: torch.Tensor, rank: int, world_size: int, sample_rate: float) -> ShardedClassHead:
    start, stop = class_range(weight_all.shape[0], rank, world_size)
    head = ShardedClassHead(
        weight_all[start:stop].clone(), weight_all.shape[0], start, group=dist.group.WORLD,
        chunk_size=LOSS_CHUNK, sample_rate=sample_rate,
    )
    return head.train()


def case_sampling(inputs: dict, rank: int, world_size: int) -> dict:
    """Loss at rate 1 and at a rate that keeps every row; then sparse SGD steps at SAMPLE_RATE."""
    results = {}

    # every row kept: rate 1 takes the exact path, rate 0.99 the sampled one
    x_all, weight_all, labels_all = inputs["loss"]["smoothing"]
    rows = x_all.shape[0] // world_size
    sizes = (rows,) * world_size
    for rate in (1.0, 0.99):
        head = sharded_head(weight_all, rank, world_size, rate)
        if rate < 1.0:
            head.weight.requires_grad_(False)
        head.label_smoothing = 0.1
        head.seed_sampling(rank)
        loss = head.loss(rank_rows(x_all, rank, sizes), rank_rows(labels_all, rank, sizes))
        loss.backward()
        if rate < 1.0:
            (sampled,) = head.take_sampled()
            results[rate] = {"loss": loss.detach(), "rows": sampled.rows, "grad": sampled.weight_rows.grad}
        else:
            results[rate] = {"loss": loss.detach(), "rows": torch.arange(head.weight.shape[0]), "grad": head.weight.grad}

    # sparse steps: only the kept rows and their momentum may change
    x_steps, labels_steps, weight_all = inputs["sampling"]
    head = sharded_head(weight_all, rank, world_size, SAMPLE_RATE)
    head.weight.requires_grad_(False)
    optimizer = RowOptimizer(head.weight, TrainConfig(optimizer="sgd", **FUSED_SETTINGS))
    rows = x_steps.shape[1] // world_size
    sizes = (rows,) * world_size
    snapshots = [head.weight.detach().clone()]
    kept = []
    for step in range(SAMPLE_STEPS):
        head.seed_sampling(1000 * step + rank)
        loss = head.loss(rank_rows(x_steps[step], rank, sizes), rank_rows(labels_steps[step], rank, sizes))
        loss.backward()
        (sampled,) = head.take_sampled()
        optimizer.step([(sampled.rows, sampled.weight_rows.grad)])
        kept.append(sampled.rows)
        snapshots.append(head.weight.detach().clone())
    results["steps"] = {"snapshots": snapshots, "kept": kept, "class_start": head.class_start}
    return results


def case_state(inputs: dict, rank: int, world_size: int) -> dict:
    """Gather a head optimizer state to rank 0 and split the full state back."""
    full = inputs["state"]
    rows = full["momentum_buffer"].shape[0]
    start, stop = class_range(rows, rank, world_size)
    shard = {name: value[start:stop] if value.dim() > 0 else value for name, value in full.items()}
    ctx = _context(rank, world_size)
    return {"gathered": gather_head_state(shard, stop - start, rows, ctx), "split": split_head_state(full, rows, ctx)}


def case_train(workdir: Path, rank: int) -> None:
    """Train the dense sharded run, keeping every step's checkpoint, then resume a one-process run on two processes."""
    dataset = workdir / "dataset"
    run_dir = workdir / "run-dense"
    kept = workdir / "steps-dense"
    kept.mkdir(exist_ok=True)

    def keep_checkpoint(event: dict) -> None:
        # at the report of step k, last.pt still contains step k - 1, because saving follows the report
        if event["kind"] == "train" and event["step"] > 1:
            shutil.copy(run_dir / "checkpoints" / "last.pt", kept / f"step{event['step'] - 1}.pt")

    train(dataset, run_dir, replace(TRAIN_CONFIG, save_every=1), progress=keep_checkpoint)

    # resume without new steps rewrites the checkpoint, then two more steps
    resumed = workdir / "run-1to2"
    train(dataset, resumed, replace(TRAIN_CONFIG, steps=2, resume=True))
    if rank == 0:
        shutil.copy(resumed / "checkpoints" / "last.pt", workdir / "resaved-1to2.pt")
    dist.barrier()
    train(dataset, resumed, replace(TRAIN_CONFIG, steps=4, resume=True))


def case_eval(workdir: Path) -> dict:
    """`toolkit eval` of the dense run's checkpoint on the val split, each rank scoring its part."""
    report = run_eval(workdir / "run-dense" / "checkpoints" / "last.pt", workdir / "dataset", EVAL_CONFIG)
    return eval_summary(report)


def eval_summary(report) -> dict:
    counts = report.counts
    return {
        "overall": [counts.overall.samples, counts.overall.top1_hits, counts.overall.top5_hits],
        "loss_sum": torch.tensor(counts.loss_sum, dtype=torch.float64),
        "class_samples": counts.class_samples,
        "class_top1": counts.class_top1,
        "shards": {name: [hits.samples, hits.top1_hits] for name, hits in counts.shards.items()},
    }


def _context(rank: int, world_size: int):
    from toolkit.train.distributed import DistContext

    return DistContext(rank, world_size, rank, torch.device("cpu"), dist.group.WORLD, owns_group=False)


def main(workdir: Path) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    inputs = torch.load(workdir / "inputs.pt", weights_only=True)
    for name, case in (("loss", case_loss), ("topk", case_topk), ("fused", case_fused),
                       ("sampling", case_sampling), ("state", case_state)):
        torch.save(case(inputs, rank, world_size), workdir / f"{name}-rank{rank}.pt")
    case_train(workdir, rank)
    torch.save(case_eval(workdir), workdir / f"eval-rank{rank}.pt")
    (workdir / f"done-rank{rank}").write_text("ok")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

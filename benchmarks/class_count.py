"""Training-step rate of one recipe at several class counts, in one process.

    .venv/bin/python benchmarks/class_count.py --config pipelines/cjk-3755-cpu.toml --classes 3755 20992

Builds the recipe's model and optimizer once per class count. It then times full training
steps (forward, chunked loss, backward, optimizer step) on one batch of random images at the
recipe's batch and image size. The models take turns, so other load disturbs each alike. Prints
images/s per class count and each rate as a ratio of the first, which scales a measured
training rate to a larger class set.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from toolkit.config import TrainConfig, resolve
from toolkit.model.classifier import build_model
from toolkit.train.optim import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="recipe with a [train] table")
    parser.add_argument("--classes", type=int, nargs="+", required=True, help="class counts to compare")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per turn")
    parser.add_argument("--turns", type=int, default=4, help="turns per class count; the fastest counts")
    args = parser.parse_args()

    torch.manual_seed(0)
    config = resolve(TrainConfig, args.config, {}, "train")
    B, S = config.batch_size, config.image_size
    images = torch.randn(B, 3, S, S).contiguous(memory_format=torch.channels_last)

    # one model, optimizer and label batch per class count
    setups = {}
    for classes in args.classes:
        model = build_model(config, classes).train()
        setups[classes] = (model, build_optimizer(model, config), torch.randint(0, classes, (B,)))

    def step(classes: int) -> None:
        model, optimizer, labels = setups[classes]
        loss = model(images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    # warm up, then take turns
    for classes in args.classes:
        step(classes)
    best = dict.fromkeys(args.classes, float("inf"))
    for _ in range(args.turns):
        for classes in args.classes:
            started = time.perf_counter()
            for _ in range(args.steps):
                step(classes)
            best[classes] = min(best[classes], (time.perf_counter() - started) / args.steps)

    first = args.classes[0]
    print(f"{config.arch}, {S} px, batch {B}, embedding {config.embedding_dim}, threads {torch.get_num_threads()}")
    for classes in args.classes:
        print(f"{classes:>9,} classes: {B / best[classes]:7.1f} images/s, {best[first] / best[classes]:.3f} of {first:,}")


if __name__ == "__main__":
    main()

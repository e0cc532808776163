"""Time `toolkit pack` beside a plain Pillow + webdataset.ShardWriter baseline.

    .venv/bin/python benchmarks/pack.py --images 8000 --modes passthrough
    .venv/bin/python benchmarks/pack.py --images 4000 --shard-samples 250 --modes resize

Two modes, each on its own generated image folder:

- passthrough: 250x250 JPEGs in, no resize (`--resize keep`). toolkit decodes each JPEG in full
  to check it and stores the bytes unchanged.
- resize: 800x600 JPEGs in, shorter side to 250 (`--resize shorter --size 250`).

The baseline lists the folder, decodes each file with Pillow (and resizes it with
`Image.resize`'s default filter in resize mode) and writes {"__key__", "jpg": PIL image,
"cls": label} with `webdataset.ShardWriter` at its defaults, which re-encode the image as JPEG
at quality 100. toolkit runs the whole `toolkit pack` command (`toolkit.pack.run_pack`): scan,
content hashes, duplicate check, split, normalisation and sharding, with shards of
--shard-samples images (default 500). pack gives each worker whole shards, so the all-core run
needs several shards per worker: a dataset of millions of images has them at the default of
10,000 images per shard, and a benchmark of a few thousand images at a few hundred. Each shard
also costs a fixed fsync, so very small shards lower the rates.

For each mode the script prints images/s (the fastest of --repeats runs) for the baseline and
for toolkit with one process, and their ratio, also as a ratio of CPU seconds
(`time.process_time`), which load from other processes disturbs less. It also prints toolkit's rate with one worker
per core and its scaling efficiency, the all-core rate / (cores x one-process rate). Peak memory is the peak resident set size
(VmHWM in /proc/self/status, Linux only) of a child process that runs one single-process
`toolkit pack` on N and on 4N images. It includes the Python interpreter and imports (about
40 MiB) but not torch, which only the baseline's webdataset import loads.

Images come from toolkit.synthetic. To keep generation fast, a few dozen distinct images per
mode are rendered and every file is made unique by a JPEG comment (COM) segment holding its
index. The comment changes the bytes (so pack's duplicate check keeps every file) and not the
pixels or the decoding work.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from toolkit.config import PackConfig
from toolkit.pack import run_pack
from toolkit.synthetic import class_name, encode_jpeg, render_image

MODES = {
    # mode: (source width, source height, PackConfig resize, PackConfig size)
    "passthrough": (250, 250, "keep", 0),
    "resize": (800, 600, "shorter", 250),
}
DISTINCT_IMAGES = 48
IMAGES_PER_CLASS = 20


# ---------------------------------------------------------------------------------------------
# input images


def with_comment(jpeg: bytes, text: str) -> bytes:
    """Insert a COM segment holding `text` right after the JPEG's SOI marker."""
    body = text.encode()
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(body) + 2) + body + jpeg[2:]


def write_images(root: Path, count: int, width: int, height: int) -> Path:
    """Write `count` unique JPEGs as ROOT/class_XXXXX/NNNNNN.jpg, IMAGES_PER_CLASS per class."""
    rng = np.random.default_rng(0)
    bases = []
    for index in range(min(count, DISTINCT_IMAGES)):
        picture = render_image(index, rng, size=max(width, height)).crop((0, 0, width, height))
        bases.append(encode_jpeg(picture))
    for index in range(count):
        folder = root / class_name(index // IMAGES_PER_CLASS)
        folder.mkdir(parents=True, exist_ok=True)
        data = with_comment(bases[index % len(bases)], f"benchmark image {index}")
        (folder / f"{index:06d}.jpg").write_bytes(data)
    return root


# ---------------------------------------------------------------------------------------------
# the two packers


def pack_baseline(src: Path, out: Path, size: int) -> int:
    """Pack SRC with Pillow and webdataset.ShardWriter at its defaults; return the sample count."""
    # imported here because webdataset imports torch, which would swell the memory children
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    folders = sorted(path for path in src.iterdir() if path.is_dir())
    count = 0
    with wds.ShardWriter(str(out / "baseline-%06d.tar"), verbose=0) as sink:
        for label, folder in enumerate(folders):
            for path in sorted(folder.iterdir()):
                with Image.open(path) as image:
                    picture = image.convert("RGB")
                if size:
                    scale = size / min(picture.size)
                    picture = picture.resize((round(picture.width * scale), round(picture.height * scale)))
                sink.write({"__key__": f"{count:08d}", "jpg": picture, "cls": label})
                count += 1
    return count


SHARD_SAMPLES = 500


def pack_toolkit(src: Path, out: Path, resize: str, size: int, workers: int, shard_samples: int = SHARD_SAMPLES) -> int:
    """Run `toolkit pack`; return the number of packed samples."""
    settings = PackConfig(resize=resize, size=size, workers=workers, shard_max_samples=shard_samples)
    summary = run_pack(src, out, settings)
    if summary.failed:
        raise RuntimeError(f"toolkit pack failed: {summary.failure}")
    return summary.samples


def timed(function, *args) -> tuple[float, float, int]:
    """Call function(*args) and return wall-clock seconds, this process's CPU seconds and the result."""
    started, started_cpu = time.perf_counter(), time.process_time()
    samples = function(*args)
    return time.perf_counter() - started, time.process_time() - started_cpu, samples


# ---------------------------------------------------------------------------------------------
# peak memory in a child process


def child_main(src: str, out: str, resize: str, size: int) -> None:
    """Pack once with one process and print the sample count and this process's peak RSS."""
    samples = pack_toolkit(Path(src), Path(out), resize, size, workers=1)
    # VmHWM is the peak RSS of this process image. On Linux, ru_maxrss of a child also counts
    # the parent's memory that the child shared between fork and exec.
    status = Path("/proc/self/status").read_text()
    peak_kib = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))
    print(json.dumps({"samples": samples, "peak_mib": peak_kib / 1024}))


def child_peak_memory(src: Path, out: Path, resize: str, size: int) -> float:
    command = [sys.executable, __file__, "--child", str(src), str(out), resize, str(size)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_mib"]


# ---------------------------------------------------------------------------------------------
# main


def run_mode(mode: str, count: int, cores: int, repeats: int, shard_samples: int, work: Path) -> dict[str, float]:
    width, height, resize, size = MODES[mode]
    src = write_images(work / f"{mode}-src", count, width, height)

    # interleaved repeats; the fastest of each is kept, as the least disturbed by other load
    baseline_seconds = one_seconds = all_seconds = float("inf")
    baseline_cpu = one_cpu = float("inf")
    for repeat in range(repeats):
        out = work / f"{mode}-{repeat}"
        seconds, cpu, baseline_samples = timed(pack_baseline, src, out / "baseline", size)
        baseline_seconds, baseline_cpu = min(baseline_seconds, seconds), min(baseline_cpu, cpu)
        seconds, cpu, one_samples = timed(pack_toolkit, src, out / "toolkit-1", resize, size, 1, shard_samples)
        one_seconds, one_cpu = min(one_seconds, seconds), min(one_cpu, cpu)
        seconds, _, all_samples = timed(pack_toolkit, src, out / "toolkit-all", resize, size, cores, shard_samples)
        all_seconds = min(all_seconds, seconds)
        if not baseline_samples == one_samples == all_samples == count:
            raise RuntimeError(
                f"sample counts differ: baseline {baseline_samples}, toolkit {one_samples} and "
                f"{all_samples}, expected {count}"
            )

    large_src = write_images(work / f"{mode}-src-4x", 4 * count, width, height)
    peak_n = child_peak_memory(src, work / f"{mode}-memory-n", resize, size)
    peak_4n = child_peak_memory(large_src, work / f"{mode}-memory-4n", resize, size)

    baseline_rate = count / baseline_seconds
    one_rate = count / one_seconds
    all_rate = count / all_seconds
    return {
        "baseline": baseline_rate,
        "toolkit_1": one_rate,
        "ratio": one_rate / baseline_rate,
        "cpu_ratio": baseline_cpu / one_cpu,
        "toolkit_all": all_rate,
        "efficiency": all_rate / (cores * one_rate),
        "peak_n": peak_n,
        "peak_4n": peak_4n,
    }


def print_table(results: dict[str, dict[str, float]], count: int, cores: int, repeats: int) -> None:
    load = os.getloadavg()[0]
    print(f"\n{count} images per mode, fastest of {repeats} run(s), {cores} cores, load average {load:.1f} at the end\n")
    print(
        f"| mode | baseline img/s | toolkit 1 proc img/s | ratio | CPU-time ratio | toolkit {cores} proc img/s "
        f"| efficiency | peak MiB at {count} | peak MiB at {4 * count} |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, row in results.items():
        print(
            f"| {mode} | {row['baseline']:.0f} | {row['toolkit_1']:.0f} | {row['ratio']:.2f}x | {row['cpu_ratio']:.2f}x "
            f"| {row['toolkit_all']:.0f} | {row['efficiency']:.2f} | {row['peak_n']:.0f} | {row['peak_4n']:.0f} |"
        )
    print("\ntargets: ratio >= 2.5x (passthrough), >= 2x (resize); efficiency >= 0.9; peak memory flat in N")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="images per mode (the memory check also packs 4x this)")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="worker processes for the all-core run")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES), help="modes to run")
    parser.add_argument("--shard-samples", type=int, default=SHARD_SAMPLES, help="toolkit's shard_max_samples")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each packer per mode; the fastest counts")
    parser.add_argument("--workdir", type=Path, default=None, help="folder for the generated images and outputs (a temporary folder when unset)")
    args = parser.parse_args()
    if args.images < IMAGES_PER_CLASS:
        parser.error(f"--images must be at least {IMAGES_PER_CLASS}, so each class can be split")

    # webdataset imports torch, which takes seconds: load it before any timing
    import webdataset  # noqa: F401

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        results = {}
        for mode in args.modes:
            print(f"{mode}: generating and packing {args.images} images ...", flush=True)
            results[mode] = run_mode(mode, args.images, args.cores, args.repeats, args.shard_samples, Path(work))
            print(json.dumps({mode: {key: round(value, 3) for key, value in results[mode].items()}}), flush=True)
    print_table(results, args.images, args.cores, args.repeats)


if __name__ == "__main__":
    main()

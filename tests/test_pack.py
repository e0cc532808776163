"""End-to-end tests of `toolkit pack` on small generated image folders and CSV lists."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset
from PIL import Image
from torchvision.datasets.folder import find_classes
from typer.testing import CliRunner

from toolkit.cli import app
from toolkit.config import PackConfig
from toolkit.dataset import load_dataset
from toolkit.pack import PackError, run_pack
from toolkit.pack import run as run_module
from toolkit.synthetic import encode_jpeg, render_image, write_image_folder


# ---------------------------------------------------------------------------------------------
# helpers


def pack(src: Path, out: Path, **options) -> object:
    options.setdefault("workers", 1)
    return run_pack(src, out, PackConfig(**options))


def write_jpeg(path: Path, size: tuple[int, int] = (24, 24), seed: int = 0, label: int = 0) -> bytes:
    """Write a small generated JPEG and return its bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = render_image(label, np.random.default_rng(seed), size=max(size)).resize(size)
    data = encode_jpeg(image)
    path.write_bytes(data)
    return data


def read_samples(dataset: Path, split: str) -> list[dict]:
    """Read a split back through webdataset's own reader, decoding images with PIL."""
    urls = load_dataset(dataset).shard_urls(split)
    if not urls:
        return []
    return list(webdataset.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"))


def split_of_paths(dataset: Path) -> dict[str, str]:
    """Return {source path: split} for every packed sample."""
    found = {}
    for split in ("train", "val", "test"):
        for sample in read_samples(dataset, split):
            found[sample["json"]["path"]] = split
    return found


def output_hashes(out: Path) -> dict[str, str]:
    """Return the sha256 of every shard and index file under OUT."""
    names = [path for path in out.rglob("*") if path.is_file() and ".pack-state" not in path.parts]
    return {str(path.relative_to(out)): hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(names)}


def read_rejects(out: Path) -> list[tuple[str, str]]:
    with open(out / "rejects.csv", newline="") as file:
        rows = list(csv.reader(file))
    assert rows[0] == ["path", "reason"]
    return [(path, reason) for path, reason in rows[1:]]


def reject_codes(out: Path) -> dict[str, str]:
    """Return {path: reason code} from rejects.csv."""
    return {path: reason.split(":")[0] for path, reason in read_rejects(out)}


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Return (size, mtime_ns, sha256) of every file and folder under ROOT."""
    state = {}
    for path in sorted(root.rglob("*")):
        status = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        state[str(path.relative_to(root))] = (status.st_size, status.st_mtime_ns, digest)
    return state


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """4 generated classes of 8 images, 32 px, one image in a nested folder."""
    root = write_image_folder(tmp_path_factory.mktemp("folder") / "images", num_classes=4, images_per_class=8, size=32)
    nested = root / "class_00001" / "more" / "deeper"
    nested.mkdir(parents=True)
    (root / "class_00001" / "0007.jpg").rename(nested / "0007.jpg")
    return root


# ---------------------------------------------------------------------------------------------
# round trip and format


def test_roundtrip_webdataset_reader(folder, tmp_path):
    out = tmp_path / "out"
    summary = pack(folder, out, shard_max_samples=5, val_fraction=0.25, test_fraction=0.25)
    dataset = load_dataset(out)
    keys = []
    for split in ("train", "val", "test"):
        samples = read_samples(out, split)
        assert len(samples) == dataset.splits[split].samples
        assert summary.splits[split].samples == dataset.splits[split].samples
        for sample in samples:
            meta = sample["json"]
            source = folder / meta["path"]
            assert sample["cls"] == dataset.classes.index(meta["class"])
            assert meta["path"].split("/")[0] == meta["class"]
            assert sample["jpg"].size == (meta["width"], meta["height"])
            assert sample["jpg"].size == Image.open(source).size
            assert meta["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
            keys.append(sample["__key__"])
    assert sum(split.samples for split in dataset.splits.values()) == 32
    assert len(keys) == len(set(keys))
    assert not any("." in key for key in keys)
    assert "class_00001/more/deeper/0007.jpg" in split_of_paths(out)


def test_tar_members_fixed(folder, tmp_path):
    out = tmp_path / "out"
    pack(folder, out, shard_max_samples=4)
    shard = load_dataset(out).shard_urls("train")[0]
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    assert [member.name.split(".")[1] for member in members[:3]] == ["cls", "jpg", "json"]
    for member in members:
        assert member.mtime == 0
        assert member.uid == 0
        assert member.gid == 0
        assert member.uname == ""
        assert member.gname == ""
        assert member.mode == 0o644


def test_index_files(folder, tmp_path):
    out = tmp_path / "out"
    pack(folder, out, shard_max_samples=5)
    manifest = json.loads((out / "manifest.json").read_text())
    info = json.loads((out / "_info.json").read_text())
    assert manifest["format"] == "toolkit-dataset"
    assert manifest["version"] == 1
    assert (out / "classes.txt").read_text().splitlines() == manifest["classes"]
    assert manifest["pack_options"]["shard_max_samples"] == 5
    for split, entry in manifest["splits"].items():
        assert info["splits"][split]["num_samples"] == entry["samples"]
        assert info["splits"][split]["filenames"] == [shard["name"] for shard in entry["shards"]]
        assert info["splits"][split]["shard_lengths"] == [shard["samples"] for shard in entry["shards"]]
        for shard in entry["shards"]:
            path = out / shard["name"]
            assert path.stat().st_size == shard["bytes"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
    assert read_rejects(out) == []


def test_shard_limits(folder, tmp_path):
    out = tmp_path / "out"
    limit = 30_000
    pack(folder, out, shard_max_samples=100, shard_max_bytes=limit, val_fraction=0.0, test_fraction=0.0)
    shards = load_dataset(out).splits["train"].shards
    assert len(shards) > 1
    for shard in shards:
        assert shard.bytes <= limit
    out_samples = tmp_path / "by_samples"
    pack(folder, out_samples, shard_max_samples=3, val_fraction=0.0, test_fraction=0.0)
    counts = [shard.samples for shard in load_dataset(out_samples).splits["train"].shards]
    assert counts == [3] * 10 + [2]


def test_reject_shortens_its_block(folder, tmp_path):
    src = tmp_path / "src"
    for path in folder.rglob("*.jpg"):
        target = src / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    (src / "class_00002" / "broken.jpg").write_bytes(b"\xff\xd8 not a whole jpeg")
    out = tmp_path / "out"
    pack(src, out, shard_max_samples=3, val_fraction=0.0, test_fraction=0.0)
    counts = [shard.samples for shard in load_dataset(out).splits["train"].shards]
    # 33 positions in blocks of 3: the block with the broken file packs 2, every other block 3
    assert sum(counts) == 32
    assert len(counts) == 11
    assert sorted(counts) == [2] + [3] * 10


def test_bytes_split_block_resumes(folder, tmp_path, monkeypatch):
    options = {"shard_max_samples": 8, "shard_max_bytes": 30_000, "val_fraction": 0.0, "test_fraction": 0.0}
    clean = tmp_path / "clean"
    pack(folder, clean, **options)
    state = [json.loads(line) for line in (clean / ".pack-state" / "segments.jsonl").read_text().splitlines()]
    inner = [segment["start"] for segment in state if segment["start"] % 8]
    assert inner, "the byte limit should cut some block inside"

    # stop after the first shard whose segment starts inside a block, then resume
    out = tmp_path / "out"
    original_commit = run_module.commit_segment

    def stopping_commit(out_dir, pack_state, segment, index):
        if segment.start == inner[0]:
            raise KeyboardInterrupt
        return original_commit(out_dir, pack_state, segment, index)

    monkeypatch.setattr(run_module, "commit_segment", stopping_commit)
    with pytest.raises(KeyboardInterrupt):
        pack(folder, out, **options)
    monkeypatch.undo()
    summary = pack(folder, out, **options)
    assert summary.resumed_shards == sum(1 for segment in state if segment["start"] < inner[0])
    assert output_hashes(out) == output_hashes(clean)


def test_train_shards_mix_classes(folder, tmp_path):
    out = tmp_path / "out"
    pack(folder, out, shard_max_samples=8, val_fraction=0.0, test_fraction=0.0)
    dataset = load_dataset(out)
    for url in dataset.shard_urls("train"):
        labels = {sample["cls"] for sample in webdataset.WebDataset(url, shardshuffle=False).decode()}
        assert len(labels) > 1


def test_val_order_by_label(folder, tmp_path):
    out = tmp_path / "out"
    pack(folder, out, val_fraction=0.5, test_fraction=0.0)
    labels = [sample["cls"] for sample in read_samples(out, "val")]
    assert labels == sorted(labels)


# ---------------------------------------------------------------------------------------------
# classes


def test_class_order_like_imagefolder(tmp_path):
    src = tmp_path / "src"
    for name in ("1", "2", "10", "100"):
        write_jpeg(src / name / "a.jpg", seed=int(name), label=int(name))
    out = tmp_path / "out"
    pack(src, out, val_fraction=0.0, test_fraction=0.0)
    classes, class_to_idx = find_classes(str(src))
    assert list(load_dataset(out).classes) == classes
    assert list(load_dataset(out).classes) == ["1", "10", "100", "2"]
    for sample in read_samples(out, "train"):
        assert sample["cls"] == class_to_idx[sample["json"]["class"]]


def test_classes_file_order(tmp_path):
    src = tmp_path / "src"
    for index, name in enumerate(("a", "b", "c")):
        write_jpeg(src / name / "x.jpg", seed=index, label=index)
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text("c\na\nb\nd\n")
    out = tmp_path / "out"
    summary = pack(src, out, classes_file=classes_file, val_fraction=0.0, test_fraction=0.0)
    assert list(load_dataset(out).classes) == ["c", "a", "b", "d"]
    labels = {sample["json"]["class"]: sample["cls"] for sample in read_samples(out, "train")}
    assert labels == {"c": 0, "a": 1, "b": 2}
    assert summary.empty_classes == ["d"]


def test_classes_file_missing_folder(tmp_path):
    src = tmp_path / "src"
    write_jpeg(src / "a" / "x.jpg")
    write_jpeg(src / "zebra" / "x.jpg", seed=1)
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text("a\n")
    with pytest.raises(PackError, match="'zebra'"):
        pack(src, tmp_path / "out", classes_file=classes_file)


# ---------------------------------------------------------------------------------------------
# CSV sources


def write_csv(path: Path, rows: list[list[str]], delimiter: str = ",") -> Path:
    with open(path, "w", newline="") as file:
        csv.writer(file, delimiter=delimiter).writerows(rows)
    return path


@pytest.mark.parametrize("suffix, delimiter", [(".csv", ","), (".tsv", "\t")])
def test_csv_source(tmp_path, suffix, delimiter):
    for index in range(6):
        write_jpeg(tmp_path / "files" / f"{index}.jpg", seed=index, label=index % 2)
    rows = [["label", "path"]] + [[("dog", "cat")[index % 2], f"files/{index}.jpg"] for index in range(6)]
    source = write_csv(tmp_path / f"list{suffix}", rows, delimiter)
    out = tmp_path / "out"
    summary = pack(source, out, val_fraction=0.0, test_fraction=0.0)
    samples = read_samples(out, "train")
    assert list(load_dataset(out).classes) == ["cat", "dog"]
    assert summary.splits["train"].samples == 6
    for sample in samples:
        index = int(Path(sample["json"]["path"]).stem)
        assert sample["json"]["path"] == f"files/{index}.jpg"
        assert sample["cls"] == (1 - index % 2)


def test_csv_split_column(tmp_path):
    rows = [["path", "label", "split"]]
    expected = {}
    for index in range(9):
        write_jpeg(tmp_path / f"{index}.jpg", seed=index)
        split = ("train", "val", "test")[index % 3]
        rows.append([f"{index}.jpg", "only", split])
        expected[f"{index}.jpg"] = split
    write_jpeg(tmp_path / "auto.jpg", seed=99)
    rows.append(["auto.jpg", "only", ""])
    out = tmp_path / "out"
    pack(write_csv(tmp_path / "list.csv", rows), out, val_fraction=0.0, test_fraction=0.0)
    found = split_of_paths(out)
    assert {path: found[path] for path in expected} == expected
    assert found["auto.jpg"] == "train"


def test_csv_row_rejects(tmp_path):
    for name in ("a", "b", "c", "d"):
        write_jpeg(tmp_path / f"{name}.jpg", seed=ord(name))
    rows = [
        ["path", "label", "split"],
        ["a.jpg", "cat", ""],  # line 2: packed
        ["missing.jpg", "cat", ""],  # line 3: missing file
        ["b.jpg", "", ""],  # line 4: empty label
        ["c.jpg", "cat", ""],  # line 5: conflicts with line 6
        ["c.jpg", "dog", ""],  # line 6
        ["a.jpg", "cat", ""],  # line 7: exact repeat of line 2
        ["d.jpg", "dog", "holdout"],  # line 8: invalid split
        ["d.jpg", "dog"],  # line 9: too few fields
    ]
    out = tmp_path / "out"
    summary = pack(write_csv(tmp_path / "list.csv", rows), out, val_fraction=0.0, test_fraction=0.0)

    rejects = read_rejects(out)
    reasons = [reason for _, reason in rejects]
    assert [path for path, _ in rejects] == ["missing.jpg", "b.jpg", "c.jpg", "c.jpg", "d.jpg", ""]
    assert reasons[0].startswith("missing-file: line 3")
    assert reasons[1].startswith("empty-label: line 4")
    assert reasons[2].startswith("conflicting-duplicate: line 5")
    assert reasons[3].startswith("conflicting-duplicate: line 6")
    assert reasons[4].startswith("invalid-split: line 8")
    assert reasons[5].startswith("malformed-row: line 9")

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["rejects"] == {
        "conflicting-duplicate": 2,
        "empty-label": 1,
        "invalid-split": 1,
        "malformed-row": 1,
        "missing-file": 1,
    }
    assert manifest["duplicates"] == {"repeated-row": 1}
    assert summary.samples == 1
    assert sorted(split_of_paths(out)) == ["a.jpg"]


def test_csv_label_not_in_classes_file(tmp_path):
    write_jpeg(tmp_path / "a.jpg")
    source = write_csv(tmp_path / "list.csv", [["path", "label"], ["a.jpg", "walrus"]])
    classes_file = tmp_path / "classes.txt"
    classes_file.write_text("cat\n")
    with pytest.raises(PackError, match="'walrus'"):
        pack(source, tmp_path / "out", classes_file=classes_file)


def test_csv_invalid_header(tmp_path):
    source = write_csv(tmp_path / "list.csv", [["file", "label"], ["a.jpg", "cat"]])
    with pytest.raises(PackError, match="invalid header"):
        pack(source, tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# bad input


def test_bad_files_rejected(tmp_path, caplog):
    src = tmp_path / "src"
    good = [write_jpeg(src / "ok" / f"{index}.jpg", size=(20, 20), seed=index) for index in range(4)]
    write_jpeg(src / "ok" / "UPPER.JPG", size=(20, 20), seed=10)
    (src / "bad").mkdir()
    (src / "bad" / "zero.jpg").write_bytes(b"")
    (src / "bad" / "truncated.jpg").write_bytes(good[0][: len(good[0]) // 2])
    (src / "bad" / "text.jpg").write_text("this is not an image\n")
    write_jpeg(src / "bad" / "large.jpg", size=(40, 40), seed=11)
    write_jpeg(src / "bad" / "fine.jpg", size=(20, 20), seed=12)
    # ignored
    (src / ".DS_Store").write_bytes(b"\0\1")
    write_jpeg(src / "__MACOSX" / "ok" / "._0.jpg", seed=13)
    (src / "ok" / ".DS_Store").write_bytes(b"\0\1")
    (src / "ok" / "._1.jpg").write_bytes(b"\0\5\26\7")
    write_jpeg(src / "ok" / ".ipynb_checkpoints" / "2.jpg", seed=14)
    (src / "ok" / "notes.txt").write_text("notes\n")
    (src / "README.md").write_text("readme\n")
    (src / "empty").mkdir()
    (src / "empty" / "notes.txt").write_text("no images here\n")

    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="toolkit.pack"):
        summary = pack(src, out, max_pixels=1000, val_fraction=0.0, test_fraction=0.0)
    assert reject_codes(out) == {
        "bad/zero.jpg": "empty",
        "bad/truncated.jpg": "truncated",
        "bad/text.jpg": "not-an-image",
        "bad/large.jpg": "too-many-pixels",
    }
    assert summary.rejects == {"empty": 1, "not-an-image": 1, "too-many-pixels": 1, "truncated": 1}
    assert summary.ignored == {"hidden": 5, "non-image": 2, "outside-class-folder": 1}
    assert summary.empty_classes == ["empty"]
    assert "classes without a packed image (1): empty" in caplog.text
    assert summary.samples == 6
    assert sorted(split_of_paths(out)) == ["bad/fine.jpg"] + [f"ok/{index}.jpg" for index in range(4)] + ["ok/UPPER.JPG"]


def test_no_images_error(tmp_path):
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "notes.txt").write_text("x")
    with pytest.raises(PackError, match="no candidate images"):
        pack(src, tmp_path / "out")


# ---------------------------------------------------------------------------------------------
# duplicates and splits


def test_identical_bytes_same_split(tmp_path):
    src = tmp_path / "src"
    for index in range(12):
        data = write_jpeg(src / "a" / f"{index}.jpg", seed=index)
        (src / "b").mkdir(exist_ok=True)
        (src / "b" / f"copy{index}.jpg").write_bytes(data)
    for index in range(3):
        write_jpeg(src / "b" / f"own{index}.jpg", seed=100 + index)
    out = tmp_path / "out"
    summary = pack(src, out, val_fraction=0.3, test_fraction=0.3)
    found = split_of_paths(out)
    for index in range(12):
        assert found[f"a/{index}.jpg"] == found[f"b/copy{index}.jpg"]
    assert len(set(found.values())) == 3
    assert summary.duplicates == {"cross-class": 24}
    assert summary.samples == 27


def test_same_class_duplicate_packed_once(tmp_path):
    src = tmp_path / "src"
    data = write_jpeg(src / "a" / "first.jpg", seed=1)
    (src / "a" / "second.jpg").write_bytes(data)
    write_jpeg(src / "a" / "other.jpg", seed=2)
    out = tmp_path / "out"
    summary = pack(src, out, val_fraction=0.0, test_fraction=0.0)
    assert sorted(split_of_paths(out)) == ["a/first.jpg", "a/other.jpg"]
    assert read_rejects(out) == [("a/second.jpg", "duplicate: same bytes as a/first.jpg")]
    assert summary.duplicates == {"same-class": 1}
    assert summary.rejects == {}
    assert summary.splits["train"].duplicates == 1


def test_splits_stable_when_images_added(tmp_path):
    src = tmp_path / "src"
    write_image_folder(src, num_classes=2, images_per_class=20, size=24)
    before = tmp_path / "before"
    pack(src, before)
    first = split_of_paths(before)
    for label in range(2):
        for index in range(20, 30):
            write_jpeg(src / f"class_{label:05d}" / f"{index:04d}.jpg", seed=1000 + index, label=label)
    after = tmp_path / "after"
    pack(src, after)
    second = split_of_paths(after)
    assert len(second) == 60
    assert {path: second[path] for path in first} == first
    assert set(first.values()) == {"train", "val", "test"}


def test_small_class_goes_to_train(tmp_path, caplog):
    src = tmp_path / "src"
    write_image_folder(src, num_classes=1, images_per_class=12, size=24)
    write_jpeg(src / "tiny" / "a.jpg", seed=1)
    write_jpeg(src / "tiny" / "b.jpg", seed=2)
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="toolkit.pack"):
        summary = pack(src, out, val_fraction=0.4, test_fraction=0.4)
    found = split_of_paths(out)
    assert found["tiny/a.jpg"] == "train"
    assert found["tiny/b.jpg"] == "train"
    assert summary.small_classes == ["tiny"]
    assert "classes with fewer than 3 images go to train whole (1)" in caplog.text
    assert "tiny" in caplog.text


# ---------------------------------------------------------------------------------------------
# determinism and resume


def pack_into(src: Path, out: Path, **options) -> Path:
    pack(src, out, shard_max_samples=4, **options)
    return out


def test_two_runs_identical(folder, tmp_path):
    first = output_hashes(pack_into(folder, tmp_path / "one", workers=1))
    second = output_hashes(pack_into(folder, tmp_path / "two", workers=2))
    assert first == second
    assert len(first) > 5


@pytest.mark.parametrize("workers", [1, 2])
def test_resume_after_error(folder, tmp_path, monkeypatch, workers):
    clean = pack_into(folder, tmp_path / "clean")
    out = tmp_path / "out"
    original_commit = run_module.commit_segment
    calls = {"count": 0}

    def failing_commit(*args):
        calls["count"] += 1
        if calls["count"] == 3:
            raise KeyboardInterrupt
        return original_commit(*args)

    monkeypatch.setattr(run_module, "commit_segment", failing_commit)
    with pytest.raises(KeyboardInterrupt):
        pack(folder, out, shard_max_samples=4, workers=workers)
    monkeypatch.undo()
    assert not (out / "manifest.json").exists()
    assert not list(out.rglob("*.partial"))
    finished = sorted(out.glob("train/*.tar"))
    assert [path.name for path in finished] == ["train-000000.tar", "train-000001.tar"]
    inodes = {path.name: path.stat().st_ino for path in finished}

    summary = pack(folder, out, shard_max_samples=4, workers=workers)
    assert summary.resumed_shards == 2
    assert {path.name: path.stat().st_ino for path in finished} == inodes
    assert output_hashes(out) == output_hashes(clean)


def test_killed_worker_fails_run(folder, tmp_path, monkeypatch):
    original_pack_file = run_module.pack_file

    def dying_pack_file(path):
        # This runs in a forked worker, where SIGKILL looks like the kernel's kill for memory.
        if path.endswith("0003.jpg"):
            os.kill(os.getpid(), signal.SIGKILL)
        return original_pack_file(path)

    monkeypatch.setattr(run_module, "pack_file", dying_pack_file)
    out = tmp_path / "out"
    with pytest.raises(PackError, match="exited before finishing its task"):
        pack(folder, out, shard_max_samples=4, workers=2)
    assert not (out / "manifest.json").exists()
    assert not list(out.rglob("*.partial"))


def test_resume_after_kill(tmp_path):
    src = write_image_folder(tmp_path / "src", num_classes=4, images_per_class=40, size=20)
    clean = pack_into(src, tmp_path / "clean")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "toolkit", "pack", str(src), str(out), "--workers", "1", "--shard-max-samples", "4", "--json"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not list(out.glob("train/*.tar")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()

    summary = pack(src, out, shard_max_samples=4)
    assert summary.resumed_shards >= 1
    assert not list(out.rglob("*.partial"))
    assert output_hashes(out) == output_hashes(clean)


def test_resume_replaces_damaged_shard(folder, tmp_path):
    out = pack_into(folder, tmp_path / "out")
    before = output_hashes(out)
    total = len(list(out.glob("*/*.tar")))
    damaged = out / "train" / "train-000001.tar"
    data = bytearray(damaged.read_bytes())
    data[600] ^= 0xFF
    damaged.write_bytes(bytes(data))
    (out / "train" / "train-000002.tar.partial").write_bytes(b"left by a crash")
    train_shards = len(list(out.glob("train/*.tar")))
    summary = pack(folder, out, shard_max_samples=4)
    assert summary.resumed_shards == total - (train_shards - 1)
    assert output_hashes(out) == before
    assert not list(out.rglob("*.partial"))


def test_rerun_finished_keeps_shards(folder, tmp_path):
    out = pack_into(folder, tmp_path / "out")
    before = output_hashes(out)
    summary = pack(folder, out, shard_max_samples=4)
    assert summary.resumed_shards == sum(split.shards for split in summary.splits.values())
    assert output_hashes(out) == before


def test_source_untouched(folder, tmp_path):
    before = snapshot(folder)
    out = pack_into(folder, tmp_path / "out")
    pack(folder, out, shard_max_samples=4)
    assert snapshot(folder) == before


# ---------------------------------------------------------------------------------------------
# output folder checks


def test_other_options_rejected(folder, tmp_path):
    out = pack_into(folder, tmp_path / "out")
    with pytest.raises(PackError, match=r"shard_max_samples 4 -> 6") as error:
        pack(folder, out, shard_max_samples=6)
    assert str(out) in str(error.value)
    summary = pack(folder, out, shard_max_samples=6, overwrite=True)
    assert json.loads((out / "manifest.json").read_text())["pack_options"]["shard_max_samples"] == 6
    assert summary.resumed_shards == 0


def test_foreign_folder_rejected(folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    with pytest.raises(PackError, match="not empty"):
        pack(folder, out)
    pack(folder, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine\n"
    assert (out / "manifest.json").is_file()


def test_changed_source_rejected(tmp_path):
    src = write_image_folder(tmp_path / "src", num_classes=2, images_per_class=4, size=24)
    out = tmp_path / "out"
    pack(src, out)
    write_jpeg(src / "class_00000" / "new.jpg", seed=77)
    with pytest.raises(PackError, match="changed"):
        pack(src, out)
    assert (out / "manifest.json").is_file()
    summary = pack(src, out, overwrite=True)
    assert summary.samples == 9


def test_out_inside_src_rejected(folder, tmp_path):
    with pytest.raises(PackError, match="inside SRC"):
        pack(folder, folder / "dataset")
    assert not (folder / "dataset").exists()


# ---------------------------------------------------------------------------------------------
# command line and output


@pytest.fixture
def broken_folder(tmp_path) -> Path:
    src = tmp_path / "src"
    for index in range(3):
        write_jpeg(src / "a" / f"{index}.jpg", seed=index)
    (src / "a" / "broken.jpg").write_text("not an image")
    return src


def test_cli_strict_exit_code(broken_folder, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["pack", str(broken_folder), str(out), "--workers", "1", "--strict", "--json"])
    assert result.exit_code == 1
    assert not (out / "manifest.json").exists()
    assert [path for path, _ in read_rejects(out)] == ["a/broken.jpg"]
    assert json.loads(result.stdout)["failed"] is True


def test_cli_without_strict(broken_folder, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["pack", str(broken_folder), str(out), "--workers", "1"])
    assert result.exit_code == 0
    assert (out / "manifest.json").is_file()


def test_cli_json_output(folder, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["pack", str(folder), str(out), "--workers", "1", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    manifest = json.loads((out / "manifest.json").read_text())
    for split in ("train", "val", "test"):
        assert data["splits"][split]["samples"] == manifest["splits"][split]["samples"]
        assert data["splits"][split]["shards"] == len(manifest["splits"][split]["shards"])
    assert data["samples"] == 32
    assert data["failed"] is False


def test_cli_overwrite_required(folder, tmp_path):
    out = tmp_path / "out"
    runner = CliRunner()
    assert runner.invoke(app, ["pack", str(folder), str(out), "--workers", "1", "--json"]).exit_code == 0
    rejected = runner.invoke(app, ["pack", str(folder), str(out), "--workers", "1", "--split-seed", "3"])
    assert rejected.exit_code == 1
    assert "--overwrite" in rejected.stderr
    accepted = runner.invoke(app, ["pack", str(folder), str(out), "--workers", "1", "--split-seed", "3", "--overwrite"])
    assert accepted.exit_code == 0


def test_library_prints_nothing(folder, tmp_path, capfd, monkeypatch):
    # Only the library's own output counts here. The CLI tests leave a log handler on the root
    # logger, and with no handler at all, logging's last resort writes warnings to stderr.
    monkeypatch.setattr(logging.getLogger(), "handlers", [logging.NullHandler()])
    pack(folder, tmp_path / "out")
    captured = capfd.readouterr()
    assert captured.out == ""
    assert captured.err == ""


def test_progress_bar_runs(folder, tmp_path):
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=100)
    summary = run_pack(folder, tmp_path / "out", PackConfig(workers=1), show_progress=True, console=console)
    assert summary.samples == 32
    assert "packing" in buffer.getvalue()


def test_render_summary_table(broken_folder, tmp_path):
    from rich.console import Console

    from toolkit.pack import render_summary

    summary = pack(broken_folder, tmp_path / "out", val_fraction=0.0, test_fraction=0.0)
    buffer = io.StringIO()
    render_summary(summary, Console(file=buffer, width=120))
    text = buffer.getvalue()
    assert "│ train │       1 │       3 │" in text
    assert "rejected: not-an-image 1" in text
    assert "rejects.csv" in text

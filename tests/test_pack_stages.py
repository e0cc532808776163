"""Unit tests of the pack stages that need no images: splits, duplicates, tar sizes, bounded imap."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import signal
import tarfile
import threading
import time

import numpy as np
import pytest

from toolkit.pack import PackError
from toolkit.pack.images import PackedImage
from toolkit.pack.run import BoundedImap
from toolkit.pack.scan import AUTO_SPLIT
from toolkit.pack.shards import ShardFile, archive_bytes, block_bounds, encode_sample, is_shard_file, sample_key
from toolkit.pack.split import (
    classes_without,
    NOT_PACKED,
    TEST,
    TRAIN,
    VAL,
    assign_splits,
    check_fractions,
    find_duplicates,
    order_split,
    split_points,
)


def random_shas(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, 32), dtype=np.uint8)


def assign(shas, labels, num_classes, val=0.1, test=0.1, explicit=None, seed=0):
    labels = np.asarray(labels, dtype=np.int64)
    if explicit is None:
        explicit = np.full(len(labels), AUTO_SPLIT, dtype=np.int8)
    duplicates = find_duplicates(shas, labels, np.ones(len(labels), dtype=bool), num_classes)
    split, small, _ = assign_splits(split_points(shas, seed), labels, explicit, duplicates, num_classes, val, test)
    return split, small, duplicates


# ---------------------------------------------------------------------------------------------
# splits


def test_split_points_reference():
    shas = random_shas(3)
    points = split_points(shas, seed=7)
    for row, point in zip(shas, points):
        digest = hashlib.sha256(b"toolkit-split:7:" + row.tobytes()).digest()
        assert point == (int.from_bytes(digest[:8], "big") >> 11) / 2**53


def test_split_points_in_unit_interval():
    points = split_points(random_shas(1000), seed=0)
    assert points.min() >= 0.0
    assert points.max() < 1.0


def test_split_shares_per_class():
    C, per_class = 4, 3000
    labels = np.repeat(np.arange(C), per_class)
    split, small, _ = assign(random_shas(C * per_class), labels, C, val=0.1, test=0.2)
    assert small == []
    for label in range(C):
        in_class = split[labels == label]
        # binomial standard deviation at n=3000 is below 0.008, so 0.03 is about 4 sigma
        assert abs(np.mean(in_class == VAL) - 0.1) < 0.03
        assert abs(np.mean(in_class == TEST) - 0.2) < 0.03
        assert abs(np.mean(in_class == TRAIN) - 0.7) < 0.03


def test_split_seed_changes_assignment():
    shas = random_shas(500)
    labels = np.zeros(500, dtype=np.int64)
    first, _, _ = assign(shas, labels, 1, seed=0)
    second, _, _ = assign(shas, labels, 1, seed=1)
    assert np.any(first != second)


def test_split_stable_when_entries_added():
    shas = random_shas(300)
    labels = np.arange(300) % 3
    before, _, _ = assign(shas[:200], labels[:200], 3)
    after, _, _ = assign(shas, labels, 3)
    assert np.array_equal(after[:200], before)


def test_small_class_to_train():
    labels = np.array([0] * 50 + [1, 1])
    split, small, _ = assign(random_shas(52), labels, 2, val=0.45, test=0.45)
    assert small == [1]
    assert list(split[50:]) == [TRAIN, TRAIN]
    assert set(split[:50].tolist()) == {TRAIN, VAL, TEST}


def test_small_class_size_follows_fractions():
    labels = np.array([0, 0])
    split, small, _ = assign(random_shas(2), labels, 1, val=0.5, test=0.0)
    assert small == []
    _, small_three, _ = assign(random_shas(2), labels, 1, val=0.3, test=0.3)
    assert small_three == [0]


def test_explicit_split_wins():
    labels = np.zeros(6, dtype=np.int64)
    explicit = np.array([TEST, TEST, VAL, AUTO_SPLIT, TRAIN, TRAIN], dtype=np.int8)
    split, _, _ = assign(random_shas(6), labels, 1, val=0.0, test=0.0, explicit=explicit)
    assert list(split) == [TEST, TEST, VAL, TRAIN, TRAIN, TRAIN]


def test_cross_class_copies_share_split():
    shas = random_shas(40)
    # label 1 is a small class with a copy of an entry of label 0 whose point gives val or test
    source = int(np.flatnonzero(split_points(shas[:38], seed=0) < 0.8)[0])
    shas[38] = shas[source]
    labels = np.array([0] * 38 + [1, 1])
    split, small, duplicates = assign(shas, labels, 2, val=0.4, test=0.4)
    assert small == [1]
    assert duplicates.cross_class == [[source, 38]]
    assert split[source] == TRAIN
    assert split[38] == TRAIN


def test_cross_class_follows_explicit():
    shas = random_shas(3)
    shas[1] = shas[0]
    labels = np.array([0, 1, 1])
    explicit = np.array([TEST, AUTO_SPLIT, AUTO_SPLIT], dtype=np.int8)
    split, _, _ = assign(shas, labels, 2, val=0.0, test=0.0, explicit=explicit)
    assert split[0] == TEST
    assert split[1] == TEST
    assert split[2] == TRAIN


@pytest.mark.parametrize("val, test", [(-0.1, 0.1), (0.1, 1.5), (0.6, 0.5)])
def test_invalid_fractions(val, test):
    with pytest.raises(PackError):
        check_fractions(val, test)


# ---------------------------------------------------------------------------------------------
# duplicates


def test_same_class_copies_dropped():
    shas = random_shas(5)
    shas[3] = shas[1]
    shas[4] = shas[1]
    labels = np.zeros(5, dtype=np.int64)
    duplicates = find_duplicates(shas, labels, np.ones(5, dtype=bool), 1)
    assert duplicates.keep.tolist() == [True, True, True, False, False]
    assert duplicates.original.tolist() == [-1, -1, -1, 1, 1]
    assert duplicates.cross_class == []


def test_invalid_entries_ignored():
    shas = np.zeros((3, 32), dtype=np.uint8)  # rejected entries keep zero hashes
    labels = np.zeros(3, dtype=np.int64)
    valid = np.array([True, False, False])
    duplicates = find_duplicates(shas, labels, valid, 1)
    assert duplicates.keep.tolist() == [True, False, False]
    assert duplicates.original.tolist() == [-1, -1, -1]


def test_dropped_copies_not_packed():
    shas = random_shas(4)
    shas[2] = shas[0]
    split, _, _ = assign(shas, np.zeros(4, dtype=np.int64), 1)
    assert split[2] == NOT_PACKED


# ---------------------------------------------------------------------------------------------
# order


def test_train_order_is_permutation():
    entries = np.arange(100)
    labels = np.arange(100) % 5
    paths = [f"c/{index}.jpg" for index in range(100)]
    order = order_split("train", entries, labels, paths, shuffle_seed=0)
    assert sorted(order.tolist()) == list(range(100))
    assert order.tolist() != list(range(100))
    assert np.array_equal(order, order_split("train", entries, labels, paths, shuffle_seed=0))
    assert not np.array_equal(order, order_split("train", entries, labels, paths, shuffle_seed=1))


def test_val_order_sorted():
    entries = np.array([5, 1, 4, 2])
    labels = np.array([0, 1, 0, 1, 0, 0])
    order = order_split("val", entries, labels, [""] * 6, shuffle_seed=0)
    assert order.tolist() == [2, 4, 5, 1]


# ---------------------------------------------------------------------------------------------
# shards


@pytest.mark.parametrize("sizes", [[1], [511, 512, 513], [10_000, 3, 40_000], [0] * 30])
def test_archive_bytes_prediction(tmp_path, sizes):
    shard = ShardFile(tmp_path, "train/train-000000.tar")
    for index, size in enumerate(sizes):
        image = PackedImage(jpeg=bytes(size), width=1, height=1)
        shard.add(encode_sample(sample_key("train", index), 0, "c", f"c/{index}.jpg", "0" * 64, image))
    info = shard.close()
    assert info.bytes == archive_bytes(shard.member_bytes)
    assert (tmp_path / info.name).stat().st_size == info.bytes
    assert hashlib.sha256((tmp_path / info.name).read_bytes()).hexdigest() == info.sha256
    with tarfile.open(tmp_path / info.name) as tar:
        assert len(tar.getmembers()) == 3 * len(sizes)


def test_shard_file_names():
    assert is_shard_file("train", "train-000012.tar")
    assert is_shard_file("train", "train-000012.tar.partial")
    assert is_shard_file("train", "train-at-000000012.tar.partial")
    assert not is_shard_file("train", "train-at-000000012.tar")
    assert not is_shard_file("train", "val-000012.tar")
    assert not is_shard_file("train", "train-notes.tar")


def test_sample_key_dot_free():
    key = sample_key("val", 123)
    assert "." not in key
    assert key != sample_key("test", 123)


# ---------------------------------------------------------------------------------------------
# bounded imap


def test_bounded_imap_order_and_window():
    pulled = []
    lock = threading.Lock()

    def tasks():
        for value in range(2000):
            with lock:
                pulled.append(value)
            yield -value

    window = 16
    with multiprocessing.Pool(2) as pool:
        with BoundedImap(pool, abs, tasks(), window=window) as results:
            iterator = iter(results)
            first = [next(iterator) for _ in range(3)]
            # give the pool's task thread time to run ahead as far as it is allowed
            deadline = time.monotonic() + 5
            while len(pulled) < 3 + window and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)
            # the gate reads one task ahead of its permit
            assert len(pulled) <= 3 + window + 1
            rest = list(iterator)
    assert first + rest == list(range(2000))


def test_bounded_imap_in_process():
    with BoundedImap(None, abs, [-3, -1, -2], window=8) as results:
        assert list(results) == [3, 1, 2]


def kill_self_at(value: int) -> int:
    if value == 5:
        os.kill(os.getpid(), signal.SIGKILL)
    return value


def test_bounded_imap_worker_killed():
    with multiprocessing.Pool(2) as pool:
        with BoundedImap(pool, kill_self_at, range(20), window=4) as results:
            with pytest.raises(PackError, match="exited before finishing its task"):
                list(results)


def test_shard_bytes_equal_tarfile(tmp_path):
    import io
    import tarfile

    from toolkit.pack.shards import Sample, ShardFile

    samples = [
        Sample(key=f"train_{index:09d}", members=(("cls", b"3"), ("jpg", b"\xff" * (700 * index + 1)), ("json", b"{}")))
        for index in range(5)
    ]
    shard = ShardFile(tmp_path, "train/train-000000.tar")
    for sample in samples:
        shard.add(sample)
    info = shard.close()

    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for sample in samples:
            for extension, data in sample.members:
                member = tarfile.TarInfo(f"{sample.key}.{extension}")
                member.size, member.mtime, member.mode = len(data), 0, 0o644
                member.uname = member.gname = ""
                tar.addfile(member, io.BytesIO(data))
    written = (tmp_path / "train" / "train-000000.tar").read_bytes()
    assert written == expected.getvalue()
    assert info.bytes == len(written)
    assert info.samples == 5


def test_block_bounds():
    assert block_bounds(0, 10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert block_bounds(5, 10, 4) == [(5, 8), (8, 10)]
    assert block_bounds(8, 8, 4) == []


def test_classes_without_split():
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3])
    TRAIN, VAL, TEST = 0, 1, 2
    split_of = np.array([TRAIN, VAL, TEST, TRAIN, TRAIN, TRAIN, TRAIN, TEST, -1], dtype=np.int8)
    # class 1 has no val and no test image, and class 2 no val image. Class 3 is not packed.
    assert classes_without(split_of, labels, VAL, small=[]) == [1, 2]
    assert classes_without(split_of, labels, TEST, small=[]) == [1]
    assert classes_without(split_of, labels, VAL, small=[1]) == [2]

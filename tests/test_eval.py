"""Tests of `toolkit eval`: per-shard, per-class-range and worst/best tables, class-list checks,
skipped samples and the report files.

Each test writes its own shards with webdataset.TarWriter in the dataset contract. Images are
solid colours whose red level encodes a class, and `ColourModel` predicts the class nearest to
that level, so every prediction is known in advance and the tables can be counted by hand.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image
from typer.testing import CliRunner

import toolkit.eval.run as run_module
from toolkit.cli import app
from toolkit.config import EvalConfig, TrainConfig
from toolkit.data import IMAGENET_MEAN, IMAGENET_STD, build_eval_loader, normalize_batch
from toolkit.dataset import load_dataset
from toolkit.eval import ClassListMismatch, match_classes, run_eval, write_report
from toolkit.eval.classes import describe_difference
from toolkit.eval.metrics import EvalCounts
from toolkit.eval.report import class_range_rows, extreme_classes
from toolkit.model import build_model
from toolkit.train.checkpoint import config_from_dict, config_to_dict, load_checkpoint, save_checkpoint

CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu"]
IMAGE_SIZE = 16
# red level of an image drawn as class d: 32 d + 16, so JPEG error of a few levels never changes d
RED_STEP = 32

# The hand-made test split: per shard, (label, drawn class) per sample.
SHARDS = {
    "test/test-000000.tar": [(0, 0), (0, 0), (1, 1), (2, 2), (3, 3)],
    "test/test-000001.tar": [(3, 3), (4, 2), (5, 0), (5, 5)],
    "test/test-000002.tar": [(0, 6), (1, 6), (1, 3)],
}


# ---------------------------------------------------------------------------------------------
# helpers


class ColourModel(torch.nn.Module):
    """Predicts classes by distance to the image's red level: logit_c = -10 (red / 32 - 0.5 - c)²."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        red = images[:, 0].float().mean(dim=(1, 2)) * IMAGENET_STD[0] * 255 + IMAGENET_MEAN[0] * 255  # (B,)
        return (red / RED_STEP - 0.5).unsqueeze(1)  # (B, 1), the drawn class up to JPEG error

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        centres = torch.arange(self.num_classes, dtype=torch.float32)
        return -10.0 * (embeddings.float() - centres) ** 2  # (B, C)

    def topk(self, embeddings: torch.Tensor, k: int):
        return self.logits(embeddings).topk(k, dim=1)

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.logits(embeddings), labels)


def colour_jpeg(drawn: int) -> bytes:
    pixels = np.zeros((20, 24, 3), dtype=np.uint8)
    pixels[..., 0] = RED_STEP * drawn + RED_STEP // 2
    pixels[..., 1] = 90
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def write_dataset(root: Path, classes: list[str], shards: dict, split: str = "test", label_order=None) -> Path:
    """Write shards of (label, drawn) samples and a manifest; `label_order` renames labels for a reordered class list.

    A sample given as (label, drawn, "garbage") gets JPEG bytes that do not decode, and one given
    as (label, drawn, "no-cls") lacks its .cls member. `shards` maps a name to its samples or to
    (samples, listed) where listed overrides the count written to the manifest.
    """
    root.mkdir(parents=True)
    entries = []
    for name, spec in shards.items():
        samples, listed = spec if isinstance(spec, tuple) else (spec, len(spec))
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        shard_stem = Path(name).stem.replace("-", "")
        with wds.TarWriter(str(path)) as writer:
            for index, (label, drawn, *problem) in enumerate(samples):
                key = f"{shard_stem}x{index:03d}"
                stored_label = label if label_order is None else label_order[label]
                sample = {
                    "__key__": key,
                    "jpg": b"not a jpeg" if problem == ["garbage"] else colour_jpeg(drawn),
                    "json": json.dumps({"path": f"{key}.jpg", "class": classes[stored_label]}).encode(),
                }
                if problem != ["no-cls"]:
                    sample["cls"] = str(stored_label).encode()
                writer.write(sample)
        data = path.read_bytes()
        entries.append({"name": name, "samples": listed, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})

    splits = {name: {"samples": 0, "shards": []} for name in ("train", "val", "test")}
    splits[split] = {"samples": sum(entry["samples"] for entry in entries), "shards": entries}
    manifest = {"format": "toolkit-dataset", "version": 1, "classes": classes, "pack_options": {}, "splits": splits}
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "classes.txt").write_text("".join(f"{name}\n" for name in classes))
    return root


def reordered(classes: list[str]) -> tuple[list[str], list[int]]:
    """Return the class list in another order and the new label of each old label."""
    order = [3, 6, 0, 5, 1, 4, 2][: len(classes)]
    new_classes = [classes[i] for i in order]
    new_label = {old: new for new, old in enumerate(order)}
    return new_classes, [new_label[old] for old in range(len(classes))]


def write_checkpoint(path: Path, classes: list[str], real: bool = False) -> Path:
    """Save a checkpoint with the class list; `real` stores a random resnet18 instead of no weights."""
    config = TrainConfig(arch="resnet18", embedding_dim=8, image_size=IMAGE_SIZE, class_chunk=3)
    state = build_model(config, len(classes)).state_dict() if real else {}
    save_checkpoint(path, {"model": state, "classes": list(classes), "config": config_to_dict(config)})
    return path


@pytest.fixture
def colour_model(monkeypatch):
    """Make run_eval use ColourModel with the checkpoint's class list and settings."""

    def from_checkpoint(checkpoint, source):
        classes = list(checkpoint["classes"])
        return ColourModel(len(classes)), classes, config_from_dict(checkpoint["config"], source)

    monkeypatch.setattr(run_module, "model_from_checkpoint", from_checkpoint)


@pytest.fixture
def checkpoint(tmp_path):
    return write_checkpoint(tmp_path / "model.pt", CLASSES)


@pytest.fixture
def dataset(tmp_path):
    return write_dataset(tmp_path / "dataset", CLASSES, SHARDS)


def settings(**values) -> EvalConfig:
    return EvalConfig(**{"batch_size": 4, "workers": 0, "class_block": 3, "top_classes": 2, "device": "cpu", **values})


def flat(text: str) -> str:
    """Join the lines Rich wrapped at the terminal width."""
    return " ".join(text.split())


def comparable(report) -> dict:
    """Return the report's numbers without paths, settings and the class-order field."""
    document = report.to_dict()
    for name in ("checkpoint", "dataset", "settings", "class_order"):
        document.pop(name)
    return document


# ---------------------------------------------------------------------------------------------
# tables


def test_overall_hand_count(colour_model, checkpoint, dataset):
    report = run_eval(checkpoint, dataset, settings())
    overall = report.overall()
    assert overall["samples"] == 12
    assert overall["top1"] == pytest.approx(7 / 12)
    assert overall["top5"] == pytest.approx(9 / 12)
    assert report.excluded == 0
    assert report.class_order == "same"


def test_overall_loss_is_sample_mean(colour_model, checkpoint, dataset):
    """Batches of 5, 5 and 2 samples average to the mean over all 12, as one batch of 12 gives."""
    report = run_eval(checkpoint, dataset, settings(batch_size=5))
    loader = build_eval_loader(load_dataset(dataset), "test", batch_size=12, workers=0, image_size=IMAGE_SIZE)
    (batch,) = list(loader)
    model = ColourModel(len(CLASSES))
    expected = F.cross_entropy(model.logits(model.embed(normalize_batch(batch.images, "cpu"))), batch.labels)
    assert report.overall()["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_shard_table_hand_count(colour_model, checkpoint, dataset):
    report = run_eval(checkpoint, dataset, settings())
    rows = {row.name: row for row in report.shards}
    assert [row.name for row in report.shards] == list(SHARDS)
    assert (rows["test/test-000000.tar"].samples, rows["test/test-000000.tar"].top1, rows["test/test-000000.tar"].top5) == (5, 1.0, 1.0)
    assert (rows["test/test-000001.tar"].samples, rows["test/test-000001.tar"].top1, rows["test/test-000001.tar"].top5) == (4, 0.5, 0.75)
    assert (rows["test/test-000002.tar"].samples, rows["test/test-000002.tar"].top1) == (3, 0.0)
    assert rows["test/test-000002.tar"].top5 == pytest.approx(1 / 3)


def test_shard_table_flags_low_shard(colour_model, checkpoint, dataset):
    report = run_eval(checkpoint, dataset, settings())
    assert [row.name for row in report.shards if row.low] == ["test/test-000002.tar"]


def test_shard_table_sorted_by_top1(colour_model, checkpoint, dataset):
    report = run_eval(checkpoint, dataset, settings(sort_shards="top1"))
    assert [row.name for row in report.shards] == ["test/test-000002.tar", "test/test-000001.tar", "test/test-000000.tar"]


def test_class_range_table_hand_count(colour_model, checkpoint, dataset):
    report = run_eval(checkpoint, dataset, settings())
    rows = [(row.first, row.last, row.classes_with_samples, row.samples, row.top1, row.top5) for row in report.class_ranges]
    assert rows[0] == (1, 3, 3, 7, 4 / 7, 5 / 7)
    assert rows[1] == (4, 6, 3, 5, 3 / 5, 4 / 5)
    assert rows[2] == (7, 7, 0, 0, None, None)
    assert len(rows) == 3


def test_worst_and_best_classes(colour_model, checkpoint, dataset):
    report = run_eval(checkpoint, dataset, settings())
    assert [(row.name, row.samples, row.top1) for row in report.worst_classes] == [("eel", 1, 0.0), ("bee", 3, 1 / 3)]
    assert [(row.name, row.samples) for row in report.best_classes] == [("dog", 2), ("cat", 1)]


def test_class_without_samples_counted(colour_model, checkpoint, dataset):
    report = run_eval(checkpoint, dataset, settings())
    document = report.to_dict()
    assert document["classes_without_samples"] == 1
    assert document["classes_with_samples"] == 6


def test_class_ranges_cover_every_class():
    counts = EvalCounts(num_classes=10)
    counts.class_samples = torch.arange(10)
    counts.class_top1 = torch.arange(10) // 2
    counts.class_top5 = torch.arange(10)
    rows = class_range_rows(counts, 4)
    assert [(row.first, row.last) for row in rows] == [(1, 4), (5, 8), (9, 10)]
    assert [row.samples for row in rows] == [0 + 1 + 2 + 3, 4 + 5 + 6 + 7, 8 + 9]
    assert [row.classes_with_samples for row in rows] == [3, 4, 2]


def test_extreme_classes_skip_empty_classes():
    counts = EvalCounts(num_classes=4)
    counts.class_samples = torch.tensor([0, 2, 0, 4])
    counts.class_top1 = torch.tensor([0, 1, 0, 4])
    counts.class_top5 = torch.tensor([0, 2, 0, 4])
    worst, best = extreme_classes(counts, ["a", "b", "c", "d"], 10)
    assert [row.name for row in worst] == ["b", "d"]
    assert [row.name for row in best] == ["d", "b"]


def test_per_class_counts_match_bincount(tmp_path):
    """Per-class counts from the real model equal a recount from full logits on the same batches."""
    dataset_path = write_dataset(tmp_path / "dataset", CLASSES, SHARDS)
    path = write_checkpoint(tmp_path / "real.pt", CLASSES, real=True)
    report = run_eval(path, dataset_path, settings())

    # recount with the full (B, C) logits, affordable for 7 classes
    model, _, _ = run_module.model_from_checkpoint(load_checkpoint(path), path)
    loader = build_eval_loader(load_dataset(dataset_path), "test", batch_size=5, workers=0, image_size=IMAGE_SIZE)
    top1 = torch.zeros(len(CLASSES), dtype=torch.int64)
    loss_sum = 0.0
    with torch.no_grad():
        for batch in loader:
            logits = model.logits(model.embed(normalize_batch(batch.images, "cpu")))  # (B, C)
            hits = logits.argmax(dim=1) == batch.labels
            top1 += torch.bincount(batch.labels[hits], minlength=len(CLASSES))
            loss_sum += float(F.cross_entropy(logits, batch.labels, reduction="sum"))
    assert torch.equal(report.counts.class_top1, top1)
    assert report.overall()["loss"] == pytest.approx(loss_sum / 12, rel=1e-4)


def test_nonfinite_loss_written_as_null(colour_model, checkpoint, dataset, tmp_path):
    report = run_eval(checkpoint, dataset, settings())
    report.counts.loss_sum = math.nan
    write_report(report, tmp_path / "report.json")
    document = json.loads((tmp_path / "report.json").read_text())
    assert document["overall"]["loss"] is None
    assert document["overall"]["samples"] == 12


# ---------------------------------------------------------------------------------------------
# class lists


def test_reordered_classes_give_same_numbers(colour_model, checkpoint, dataset, tmp_path, caplog):
    new_classes, new_labels = reordered(CLASSES)
    other = write_dataset(tmp_path / "reordered", new_classes, SHARDS, label_order=new_labels)
    original = run_eval(checkpoint, dataset, settings())
    with caplog.at_level(logging.WARNING, logger="toolkit.eval.classes"):
        remapped = run_eval(checkpoint, other, settings())
    assert remapped.class_order == "remapped"
    assert comparable(remapped) == comparable(original)
    assert "labels are remapped by class name" in caplog.text


def test_reordered_classes_differ_without_remap(colour_model, checkpoint, dataset, tmp_path, monkeypatch):
    """The remap matters: the same dataset read with the identity mapping gives other numbers."""
    new_classes, new_labels = reordered(CLASSES)
    other = write_dataset(tmp_path / "reordered", new_classes, SHARDS, label_order=new_labels)
    original = run_eval(checkpoint, dataset, settings())
    monkeypatch.setattr(run_module, "match_classes", lambda checkpoint_classes, dataset_classes: match_classes(dataset_classes, dataset_classes))
    unmapped = run_eval(checkpoint, other, settings())
    assert unmapped.overall()["top1"] != original.overall()["top1"]


def test_match_classes_remap_table():
    mapping = match_classes(["a", "b", "c"], ["c", "a", "b"])
    assert mapping.reordered
    assert mapping.apply(torch.tensor([0, 1, 2])).tolist() == [2, 0, 1]


def test_match_classes_same_order():
    mapping = match_classes(["a", "b"], ["a", "b"])
    assert not mapping.reordered
    assert mapping.apply(torch.tensor([1, 0])).tolist() == [1, 0]


def test_mismatch_raises_with_diff(colour_model, checkpoint, tmp_path):
    other_classes = CLASSES[:5] + ["hen", "owl", "yak"]
    other = write_dataset(tmp_path / "other", other_classes, SHARDS)
    with pytest.raises(ClassListMismatch) as raised:
        run_eval(checkpoint, other, settings())
    message = str(raised.value)
    assert "checkpoint has 7, dataset has 8, 5 in common" in message
    assert "checkpoint classes not in the dataset (2): 'fox', 'gnu'" in message
    assert "dataset classes not in the checkpoint (3): 'hen', 'owl', 'yak'" in message


def test_mismatch_diff_is_short():
    message = describe_difference([f"a{i}" for i in range(100)], [f"b{i}" for i in range(100)])
    assert "checkpoint classes not in the dataset (100)" in message
    assert "(95 more)" in message
    assert "a10" not in message


def test_duplicate_class_name_rejected():
    with pytest.raises(ClassListMismatch, match="'b' more than once"):
        match_classes(["a", "b", "c"], ["b", "a", "b"])


# ---------------------------------------------------------------------------------------------
# skipped samples


def test_skipped_samples_counted_and_named(colour_model, checkpoint, tmp_path):
    shards = {
        "test/test-000000.tar": [(0, 0), (1, 1, "garbage"), (2, 2), (3, 3, "no-cls")],
        "test/test-000001.tar": [(4, 4), (5, 5)],
    }
    path = write_dataset(tmp_path / "broken", CLASSES, shards)
    # two worker processes: the named entries cross process boundaries with the batches
    report = run_eval(checkpoint, path, settings(workers=2))
    named = sorted((sample.shard, sample.key, sample.count) for sample in report.skipped)
    assert report.samples == 4
    assert report.excluded == 2
    assert named == [("test/test-000000.tar", "test000000x001", 1), ("test/test-000000.tar", "test000000x003", 1)]
    assert [row.skipped for row in report.shards] == [2, 0]
    assert report.overall()["top1"] == 1.0


def test_short_shard_counted_as_range(colour_model, checkpoint, tmp_path):
    """A shard holding fewer samples than the manifest lists gets one entry naming the missing range."""
    shards = {"test/test-000000.tar": ([(0, 0), (1, 1), (2, 2)], 5)}
    path = write_dataset(tmp_path / "short", CLASSES, shards)
    report = run_eval(checkpoint, path, settings())
    assert report.samples == 3
    assert report.excluded == 2
    assert [(sample.key, sample.count) for sample in report.skipped] == [("samples 3-4", 2)]


def test_skipped_samples_in_report_file(colour_model, checkpoint, tmp_path):
    shards = {"test/test-000000.tar": [(0, 0), (1, 1, "garbage"), (2, 2)]}
    path = write_dataset(tmp_path / "broken", CLASSES, shards)
    report = run_eval(checkpoint, path, settings())
    write_report(report, tmp_path / "report.json")
    document = json.loads((tmp_path / "report.json").read_text())
    assert document["excluded"]["count"] == 1
    assert document["excluded"]["samples_listed"] == 3
    assert document["excluded"]["samples"][0]["shard"] == "test/test-000000.tar"
    assert document["excluded"]["samples"][0]["key"] == "test000000x001"
    assert "invalid JPEG" in document["excluded"]["samples"][0]["reason"]


# ---------------------------------------------------------------------------------------------
# command line


def test_cli_writes_report_files(colour_model, checkpoint, dataset, tmp_path):
    report_path = tmp_path / "out" / "report.json"
    result = CliRunner().invoke(
        app,
        ["eval", str(checkpoint), str(dataset), "--report", str(report_path), "--device", "cpu",
         "--workers", "0", "--class-block", "3", "--top-classes", "2"],
    )
    assert result.exit_code == 0, result.output
    document = json.loads(report_path.read_text())
    assert set(document) >= {"overall", "shards", "class_ranges", "worst_classes", "best_classes", "excluded", "class_order"}
    assert document["overall"]["samples"] == 12
    assert document["overall"]["top1"] == pytest.approx(7 / 12)
    assert [row["samples"] for row in document["class_ranges"]] == [7, 5, 0]
    assert document["class_ranges"][2]["top1"] is None


def test_cli_shard_csv_rows(colour_model, checkpoint, dataset, tmp_path):
    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["eval", str(checkpoint), str(dataset), "--report", str(report_path), "--device", "cpu", "--workers", "0"])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "report-shards.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["shard"] for row in rows] == list(SHARDS)
    assert [row["samples"] for row in rows] == ["5", "4", "3"]
    assert [row["low"] for row in rows] == ["0", "0", "1"]
    assert float(rows[1]["top5"]) == 0.75


def test_cli_class_csv_rows(colour_model, checkpoint, dataset, tmp_path):
    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["eval", str(checkpoint), str(dataset), "--report", str(report_path), "--device", "cpu", "--workers", "0"])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "report-classes.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["class"] for row in rows] == CLASSES
    assert [row["samples"] for row in rows] == ["3", "3", "1", "2", "1", "2", "0"]
    assert [row["top1_hits"] for row in rows] == ["2", "1", "1", "2", "0", "1", "0"]
    assert rows[6]["top1"] == ""
    assert math.isclose(float(rows[0]["top1"]), 2 / 3)


def test_cli_mismatch_exit_code(colour_model, checkpoint, tmp_path):
    other = write_dataset(tmp_path / "other", CLASSES[:6] + ["yak"], SHARDS)
    result = CliRunner().invoke(app, ["eval", str(checkpoint), str(other), "--device", "cpu", "--workers", "0"])
    assert result.exit_code == 1
    assert "checkpoint classes not in the dataset (1): 'gnu'" in flat(result.output)
    assert "dataset classes not in the checkpoint (1): 'yak'" in flat(result.output)


def test_cli_reports_remap(colour_model, checkpoint, tmp_path):
    new_classes, new_labels = reordered(CLASSES)
    other = write_dataset(tmp_path / "reordered", new_classes, SHARDS, label_order=new_labels)
    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["eval", str(checkpoint), str(other), "--report", str(report_path), "--device", "cpu", "--workers", "0"])
    assert result.exit_code == 0, result.output
    assert json.loads(report_path.read_text())["class_order"] == "remapped"


def test_cli_real_model_end_to_end(tmp_path):
    dataset_path = write_dataset(tmp_path / "dataset", CLASSES, SHARDS)
    path = write_checkpoint(tmp_path / "real.pt", CLASSES, real=True)
    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["eval", str(path), str(dataset_path), "--report", str(report_path), "--device", "cpu", "--workers", "1", "--precision", "bf16"])
    assert result.exit_code == 0, result.output
    document = json.loads(report_path.read_text())
    assert document["overall"]["samples"] == 12
    assert document["settings"]["precision"] == "bf16"
    assert sum(row["samples"] for row in document["shards"]) == 12


def test_cli_rejects_missing_split(colour_model, checkpoint, dataset):
    result = CliRunner().invoke(app, ["eval", str(checkpoint), str(dataset), "--split", "val", "--device", "cpu"])
    assert result.exit_code == 1
    assert "has no samples; choose another --split" in flat(result.output)

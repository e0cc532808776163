"""Tests of `toolkit predict`: image formats, folder walking, probabilities, unreadable files, output files."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from toolkit.cli import app
from toolkit.config import PackConfig, PredictConfig, TrainConfig
from toolkit.data import build_eval_loader, normalize_batch
from toolkit.dataset import load_dataset
from toolkit.eval import PredictError, find_images, load_image, load_predictor, topk_probabilities
from toolkit.model import build_model
from toolkit.pack import run_pack
from toolkit.train.checkpoint import config_to_dict, load_checkpoint, model_from_checkpoint, save_checkpoint

CLASSES = [f"class_{i}" for i in range(10)]
IMAGE_SIZE = 24

# ---------------------------------------------------------------------------------------------
# helpers


def gradient_image(width: int = 40, height: int = 30) -> Image.Image:
    """An RGB image whose red grows left to right and green top to bottom, so any rotation shows."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, axis=0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, axis=1)
    pixels = np.stack([x, y, np.full_like(x, 60)], axis=2).astype(np.uint8)
    return Image.fromarray(pixels)


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def exif_rotated_jpeg(upright: Image.Image) -> bytes:
    """Store the pixels turned 90° with EXIF orientation 6, whose display rotation restores `upright`."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95, exif=exif.tobytes())


def format_files() -> dict[str, bytes]:
    """Return file name -> bytes for one image in each format pack accepts and predict must too."""
    image = gradient_image()
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1))))
    sixteen = Image.fromarray((np.asarray(image.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    return {
        "rgb.png": encode(image, "PNG"),
        "rgba.png": encode(rgba, "PNG"),
        "gray.png": encode(image.convert("L"), "PNG"),
        "cmyk.jpg": encode(image.convert("CMYK"), "JPEG", quality=95),
        "rotated.jpg": exif_rotated_jpeg(image),
        "sixteen.png": encode(sixteen, "PNG"),
        "palette.gif": encode(image.convert("P"), "GIF"),
        "upper.JPEG": encode(image, "JPEG", quality=95),
    }


def write_checkpoint(path: Path, head: str = "linear") -> Path:
    config = TrainConfig(arch="resnet18", embedding_dim=8, image_size=IMAGE_SIZE, head=head, class_chunk=3)
    model = build_model(config, len(CLASSES))
    save_checkpoint(path, {"model": model.state_dict(), "classes": CLASSES, "config": config_to_dict(config)})
    return path


@pytest.fixture
def checkpoint(tmp_path):
    return write_checkpoint(tmp_path / "model.pt")


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    (root / "nested").mkdir(parents=True)
    for name, data in format_files().items():
        (root / "nested" / name).write_bytes(data)
    (root / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(encode(gradient_image(), "PNG"))
    (root / ".cache").mkdir()
    (root / ".cache" / "thumb.png").write_bytes(encode(gradient_image(), "PNG"))
    return root


def reference_probabilities(model, image: torch.Tensor) -> torch.Tensor:
    """Return the softmax over the full (1, C) logits, the plain computation the chunked one must match."""
    with torch.no_grad():
        embeddings = model.embed(normalize_batch(image.unsqueeze(0), "cpu")).float()
        return F.softmax(model.logits(embeddings), dim=1)[0]  # (C,)


def predictor(checkpoint: Path, **values):
    return load_predictor(checkpoint, PredictConfig(**{"device": "cpu", "precision": "fp32", "top_k": 3, **values}))


# ---------------------------------------------------------------------------------------------
# inputs


def test_find_images_walks_folder(folder):
    found = find_images([folder])
    names = [item.path.name for item in found]
    assert names == ["broken.jpg"] + sorted(format_files())
    assert all(item.error is None for item in found)


def test_find_images_missing_input(folder, tmp_path):
    found = find_images([tmp_path / "absent.png", folder / "notes.txt"])
    assert found[0].error == "file or folder not found"
    assert found[1].path.name == "notes.txt"
    assert found[1].error is None


def test_exif_rotation_applied(tmp_path):
    upright = gradient_image()
    (tmp_path / "upright.jpg").write_bytes(encode(upright, "JPEG", quality=95))
    (tmp_path / "rotated.jpg").write_bytes(exif_rotated_jpeg(upright))
    (tmp_path / "sideways.jpg").write_bytes(encode(upright.transpose(Image.Transpose.ROTATE_90), "JPEG", quality=95))
    reference = load_image(tmp_path / "upright.jpg", IMAGE_SIZE).float()
    rotated = load_image(tmp_path / "rotated.jpg", IMAGE_SIZE).float()
    sideways = load_image(tmp_path / "sideways.jpg", IMAGE_SIZE).float()
    assert (rotated - reference).abs().mean() < 3
    assert (sideways - reference).abs().mean() > 20


def test_load_image_matches_pack_and_eval_loader(tmp_path, folder):
    """Each file's predict input equals the eval loader's image of the same file after `toolkit pack`."""
    source = tmp_path / "source"
    for index, (name, data) in enumerate(format_files().items()):
        (source / f"c{index % 2}").mkdir(parents=True, exist_ok=True)
        (source / f"c{index % 2}" / name).write_bytes(data)
    run_pack(source, tmp_path / "dataset", PackConfig(val_fraction=0.0, test_fraction=0.0, workers=1))
    dataset = load_dataset(tmp_path / "dataset")
    (batch,) = list(build_eval_loader(dataset, "train", batch_size=16, workers=0, image_size=IMAGE_SIZE))
    paths = shard_paths(dataset)
    assert len(batch) == len(format_files())
    for key, image in zip(batch.keys, batch.images):
        assert torch.equal(load_image(source / paths[key], IMAGE_SIZE), image), paths[key]


def shard_paths(dataset) -> dict[str, str]:
    """Map each sample key to the source path in its KEY.json, read with webdataset."""
    import webdataset as wds

    paths = {}
    for url in dataset.shard_urls("train"):
        for sample in wds.WebDataset(url, shardshuffle=False):
            paths[sample["__key__"]] = json.loads(sample["json"])["path"]
    return paths


# ---------------------------------------------------------------------------------------------
# probabilities


@pytest.mark.parametrize("head", ["linear", "cosface"])
def test_topk_probabilities_match_softmax(tmp_path, head):
    path = write_checkpoint(tmp_path / f"{head}.pt", head=head)
    model, _, _ = model_from_checkpoint(load_checkpoint(path), path)
    embeddings = torch.randn(4, 8)
    probabilities, indices = topk_probabilities(model, embeddings, 4)
    reference = F.softmax(model.logits(embeddings), dim=1)  # (4, C)
    expected, expected_indices = reference.topk(4, dim=1)
    assert torch.equal(indices, expected_indices)
    torch.testing.assert_close(probabilities, expected, rtol=1e-5, atol=1e-7)


def test_predict_mixed_formats(checkpoint, folder):
    items = find_images([folder / "nested"])
    results = list(predictor(checkpoint).predict(items))
    model, _, _ = model_from_checkpoint(load_checkpoint(checkpoint), checkpoint)
    assert [result.error for result in results] == [None] * len(format_files())
    for result in results:
        reference = reference_probabilities(model, load_image(result.path, IMAGE_SIZE))
        expected, expected_indices = reference.topk(3)
        assert [score.index for score in result.top] == expected_indices.tolist(), result.path.name
        assert [score.name for score in result.top] == [CLASSES[i] for i in expected_indices.tolist()]
        torch.testing.assert_close(torch.tensor([score.probability for score in result.top]), expected, rtol=1e-4, atol=1e-6)


def test_predict_batches_keep_order(checkpoint, folder):
    """Results come back in input order whatever the batch size, errors included."""
    loaded = predictor(checkpoint, batch_size=1)
    one = [(r.path.name, r.error is None, [s.index for s in r.top]) for r in loaded.predict(find_images([folder]))]
    loaded.batch_size = 3
    three = [(r.path.name, r.error is None, [s.index for s in r.top]) for r in loaded.predict(find_images([folder]))]
    assert one == three
    assert [name for name, _, _ in one] == ["broken.jpg"] + sorted(format_files())


def test_predict_unreadable_file(checkpoint, folder):
    results = list(predictor(checkpoint).predict(find_images([folder / "broken.jpg", folder / "nested" / "rgb.png"])))
    assert results[0].error is not None
    assert results[0].top == []
    assert results[1].error is None
    assert len(results[1].top) == 3


def test_output_extension_checked(checkpoint, tmp_path):
    with pytest.raises(PredictError, match=r"\.json or \.csv"):
        predictor(checkpoint, output=tmp_path / "out.txt")


# ---------------------------------------------------------------------------------------------
# command line


def test_cli_prints_topk(checkpoint, folder):
    result = CliRunner().invoke(app, ["predict", str(checkpoint), str(folder / "nested" / "rgb.png"), "--top-k", "2", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].endswith("rgb.png")
    assert lines[1].lstrip().startswith("1.")
    assert lines[2].lstrip().startswith("2.")
    assert len(lines) == 3


def test_cli_unreadable_file_exit_code(checkpoint, folder):
    result = CliRunner().invoke(app, ["predict", str(checkpoint), str(folder), "--device", "cpu"])
    assert result.exit_code == 1
    error_lines = [line for line in result.stderr.splitlines() if "broken.jpg" in line]
    assert len(error_lines) == 1
    assert error_lines[0].startswith("error:")
    assert result.stdout.count("rgb.png") == 1
    assert "1 of 9 files could not be predicted" in " ".join(result.stderr.split())


def test_cli_json_output(checkpoint, folder, tmp_path):
    output = tmp_path / "out" / "predictions.json"
    result = CliRunner().invoke(app, ["predict", str(checkpoint), str(folder), "--output", str(output), "--top-k", "4", "--device", "cpu"])
    assert result.exit_code == 1
    document = json.loads(output.read_text())
    predictions = {Path(item["path"]).name: item for item in document["predictions"]}
    assert document["images"] == 9
    assert document["failed"] == 1
    assert "error" in predictions["broken.jpg"]
    assert len(predictions["cmyk.jpg"]["top_k"]) == 4
    assert set(predictions["cmyk.jpg"]["top_k"][0]) == {"index", "class", "probability"}
    assert result.stdout == ""


def test_cli_csv_output(checkpoint, folder, tmp_path):
    output = tmp_path / "predictions.csv"
    result = CliRunner().invoke(app, ["predict", str(checkpoint), str(folder / "nested"), "--output", str(output), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    with open(output, newline="") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 5 * len(format_files())
    assert [row["rank"] for row in rows[:5]] == ["1", "2", "3", "4", "5"]
    assert all(row["error"] == "" for row in rows)
    assert sum(float(row["probability"]) for row in rows[:5]) <= 1.0 + 1e-6


def test_cli_no_images(checkpoint, tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(app, ["predict", str(checkpoint), str(tmp_path / "empty"), "--device", "cpu"])
    assert result.exit_code == 1
    assert "no image files found" in result.stderr

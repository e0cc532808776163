"""`toolkit predict`: the top-k classes and their probabilities for image files.

Every file goes through the same steps as a packed and evaluated image. First `normalize_image`
with the default pack options reads any format pack accepts, applies EXIF orientation and
re-encodes the image as 8-bit RGB JPEG. Then the eval loader's resize and centre crop run on
those JPEG bytes. Probabilities are a softmax over all classes, whose normaliser is a log-sum-exp computed
one class chunk at a time, so no (B, C) matrix is built.

A file that cannot be read or decoded becomes a result with `error` set; the other files are
still predicted.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from toolkit.config import PackConfig, PredictConfig
from toolkit.data import CorruptSampleError, decode_eval_crop, normalize_batch
from toolkit.ops import chunked_logsumexp
from toolkit.pack.images import IMAGE_EXTENSIONS, ImageOptions, RejectedImage, normalize_image
from toolkit.pack.scan import is_hidden
from toolkit.train.checkpoint import load_checkpoint, model_from_checkpoint
from toolkit.train.precision import Precision, resolve_device, resolve_precision

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = (".json", ".csv")


class PredictError(ValueError):
    """Inputs or settings that stop `toolkit predict` before any image is read."""


class ImageReadError(Exception):
    """An image file that cannot be read or decoded; the message names the reason."""


@dataclass(frozen=True)
class ClassScore:
    """One of an image's top-k classes: its index in the checkpoint's class list, name and probability."""

    index: int
    name: str
    probability: float


@dataclass
class ImagePrediction:
    """The top-k classes of one image, best first, or the error that stopped it."""

    path: Path
    top: list[ClassScore] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict:
        if self.error is not None:
            return {"path": str(self.path), "error": self.error}
        return {
            "path": str(self.path),
            "top_k": [{"index": s.index, "class": s.name, "probability": s.probability} for s in self.top],
        }


# ---------------------------------------------------------------------------------------------
# inputs


def find_images(inputs: Sequence[Path]) -> list[ImagePrediction]:
    """List the image files named or found under the inputs, in order, as results still to predict.

    A named file is taken whatever its extension. Folders are walked recursively for files whose
    lower-cased extension is in IMAGE_EXTENSIONS, skipping hidden files and folders as pack does,
    in sorted order. An input that does not exist becomes a result with `error` set.
    """
    found: list[ImagePrediction] = []
    for path in inputs:
        if path.is_dir():
            files = list(walk_images(path))
            if not files:
                logger.warning("no image files found in %s", path)
            found.extend(ImagePrediction(file) for file in files)
        elif path.is_file():
            found.append(ImagePrediction(path))
        else:
            found.append(ImagePrediction(path, error="file or folder not found"))
    return found


def walk_images(folder: Path) -> Iterator[Path]:
    """Yield the image files under `folder`, recursively and in sorted order, skipping hidden names."""
    for root, folders, files in os.walk(folder):
        folders[:] = sorted(name for name in folders if not is_hidden(name))
        for name in sorted(files):
            if not is_hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield Path(root) / name


def load_image(path: Path, image_size: int, options: ImageOptions | None = None) -> torch.Tensor:
    """Read an image file and return its (3, S, S) uint8 eval crop, raising ImageReadError."""
    options = options or ImageOptions.from_config(PackConfig())
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ImageReadError(f"failed to read the file: {error.strerror or error}") from None
    try:
        packed = normalize_image(data, options)
        return decode_eval_crop(packed.jpeg, image_size)
    except RejectedImage as error:
        raise ImageReadError(f"{error.reason}: {error}") from None
    except CorruptSampleError as error:
        raise ImageReadError(str(error)) from None


# ---------------------------------------------------------------------------------------------
# model


@torch.no_grad()
def topk_probabilities(model: torch.nn.Module, embeddings: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the (B, k) softmax probabilities over all classes of the k best classes, and their indices.

    p = exp(logit − logsumexp(logits)), with the log-sum-exp taken one class chunk at a time.
    """
    B, D = embeddings.shape
    embeddings = embeddings.float()
    head = model.head
    values, indices = model.topk(embeddings, k)  # (B, k) logits; cosine heads give scale · cos θ without the margin
    log_normalizer = chunked_logsumexp(
        embeddings,
        head.weight,
        chunk_size=head.chunk_size,
        normalize=head.normalize,
        scale=head.scale if head.normalize else 1.0,
    )  # (B,)
    return (values.float() - log_normalizer[:, None]).exp(), indices


@dataclass
class Predictor:
    """A model loaded from a checkpoint, ready to predict image files."""

    model: torch.nn.Module
    classes: list[str]
    device: torch.device
    precision: Precision
    image_size: int
    top_k: int
    batch_size: int
    options: ImageOptions = field(default_factory=lambda: ImageOptions.from_config(PackConfig()))

    def predict(self, items: Iterable[ImagePrediction]) -> Iterator[ImagePrediction]:
        """Yield each item, in order, with its top-k classes or the error that stopped it."""
        pending: list[tuple[ImagePrediction, torch.Tensor]] = []
        for item in items:
            if item.error is None:
                try:
                    pending.append((item, load_image(item.path, self.image_size, self.options)))
                except ImageReadError as error:
                    item.error = str(error)
            if item.error is not None:
                logger.debug("cannot predict %s: %s", item.path, item.error)
                # the pending images come first, so results keep the input order
                yield from self._score(pending)
                pending = []
                yield item
            elif len(pending) == self.batch_size:
                yield from self._score(pending)
                pending = []
        yield from self._score(pending)

    @torch.no_grad()
    def _score(self, pending: list[tuple[ImagePrediction, torch.Tensor]]) -> list[ImagePrediction]:
        if not pending:
            return []
        images = normalize_batch(torch.stack([image for _, image in pending]), self.device)  # (B, 3, S, S)
        with self.precision.autocast():
            embeddings = self.model.embed(images)  # (B, D)
        k = min(self.top_k, self.model.num_classes)
        probabilities, indices = topk_probabilities(self.model, embeddings, k)  # (B, k) each
        for (item, _), row_p, row_i in zip(pending, probabilities.tolist(), indices.tolist()):
            item.top = [ClassScore(i, self.classes[i], p) for i, p in zip(row_i, row_p)]
        return [item for item, _ in pending]


def load_predictor(checkpoint_path: str | Path, config: PredictConfig) -> Predictor:
    """Load a checkpoint onto the configured device for prediction."""
    check_settings(config)
    checkpoint_path = Path(checkpoint_path)
    checkpoint = load_checkpoint(checkpoint_path)
    model, classes, train_config = model_from_checkpoint(checkpoint, checkpoint_path)
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    model.to(device)
    model.eval()
    logger.info("predicting with %s (%d classes) on %s, %s", checkpoint_path, len(classes), device, precision.name)
    return Predictor(
        model=model,
        classes=classes,
        device=device,
        precision=precision,
        image_size=train_config.image_size,
        top_k=config.top_k,
        batch_size=config.batch_size,
    )


def check_settings(config: PredictConfig) -> None:
    """Raise PredictError naming the first invalid setting."""
    for name in ("top_k", "batch_size"):
        if getattr(config, name) < 1:
            raise PredictError(f"invalid {name} {getattr(config, name)}; expected a positive integer")
    if config.output is not None and config.output.suffix.lower() not in OUTPUT_FORMATS:
        raise PredictError(
            f"invalid output file {config.output}: the extension must be .json or .csv to choose the format"
        )


# ---------------------------------------------------------------------------------------------
# output files


def write_predictions(results: Sequence[ImagePrediction], path: Path, checkpoint: Path, top_k: int) -> None:
    """Write results as JSON or CSV, chosen by the extension of `path`; failed files are included with their error."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        document = {
            "checkpoint": str(checkpoint),
            "top_k": top_k,
            "images": len(results),
            "failed": sum(result.error is not None for result in results),
            "predictions": [result.to_dict() for result in results],
        }
        text = json.dumps(document, indent=2) + "\n"
    elif suffix == ".csv":
        text = predictions_csv(results)
    else:
        raise PredictError(f"invalid output file {path}: the extension must be .json or .csv to choose the format")

    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def predictions_csv(results: Sequence[ImagePrediction]) -> str:
    """Return CSV text with one row per image and rank; a failed image has one row with only path and error."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "rank", "index", "class", "probability", "error"])
    for result in results:
        if result.error is not None:
            writer.writerow([str(result.path), "", "", "", "", result.error])
            continue
        for rank, score in enumerate(result.top, start=1):
            writer.writerow([str(result.path), rank, score.index, score.name, repr(score.probability), ""])
    return buffer.getvalue()

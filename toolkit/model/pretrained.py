"""Load pretrained ResNet weights from a local file into a ResNet trunk. Nothing is downloaded.

Accepted files contain a torchvision-style ResNet state dict. timm ResNets use the same key names. The
dict may sit under a "state_dict" or "model" key, and it may carry a DistributedDataParallel
"module." prefix or this project's "backbone." prefix. Keys of the classification layer (`fc.*`) are
ignored because the trunk has no such layer.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

CLASSIFIER_PREFIX = "fc."
WRAPPER_KEYS = ("state_dict", "model")
KEY_PREFIXES = ("module.", "backbone.")
# Old torchvision files predate this buffer, and BatchNorm counts batches from zero without it.
OPTIONAL_SUFFIX = "num_batches_tracked"


class PretrainedWeightsError(ValueError):
    """Error for a pretrained weights file that cannot be read or does not fit the model. The message names the file."""


@dataclass
class PretrainedLoadReport:
    """Keys of one pretrained load: copied into the model, absent from the file, or left unused."""

    path: Path
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # classification layer keys (fc.*)


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """Read a state dict from a local file with `torch.load(weights_only=True)`, unwrapping known nesting."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(
            f"pretrained weights file not found: {path}. Set pretrained to a local file that contains a "
            "torchvision ResNet state dict"
        )

    # weights_only=True runs no pickled code. The exceptions listed are what torch.load raises on
    # files that are not torch checkpoints (text, empty, truncated or foreign pickles).
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, OSError) as error:
        raise PretrainedWeightsError(
            f"cannot read pretrained weights from {path}: {type(error).__name__}: {error}. "
            "Expected a file written by torch.save(model.state_dict(), path)"
        ) from None

    # unwrap {"state_dict": ...} and {"model": ...} containers
    while isinstance(content, Mapping):
        wrapper = next((key for key in WRAPPER_KEYS if isinstance(content.get(key), Mapping)), None)
        if wrapper is None:
            break
        content = content[wrapper]

    if not isinstance(content, Mapping):
        raise PretrainedWeightsError(
            f"pretrained weights file {path} contains a {type(content).__name__}, not a state dict. "
            "Save the weights with torch.save(model.state_dict(), path)"
        )
    state = {str(key): value for key, value in content.items() if isinstance(value, Tensor)}
    if not state:
        raise PretrainedWeightsError(f"pretrained weights file {path} contains no tensors")
    return _strip_prefixes(state)


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in KEY_PREFIXES:
        prefixed = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
        # a "backbone." prefix marks a whole classifier, whose neck and head are not backbone weights
        if prefixed and (prefix == "backbone." or len(prefixed) == len(state)):
            state = prefixed
    return state


def load_pretrained(backbone: nn.Module, path: Path, *, strict: bool = True) -> PretrainedLoadReport:
    """Copy ResNet weights from a local file into `backbone` and return which keys were used.

    With `strict`, a weight that the file lacks or a key that the backbone does not know raises
    PretrainedWeightsError, because either means the file contains another architecture. Without it,
    the matching tensors are loaded and the rest is logged as a warning. A shape mismatch or a file
    with no matching key always raises.
    """
    path = Path(path)
    state = read_state_dict(path)
    expected = backbone.state_dict()

    # sort the file's keys
    report = PretrainedLoadReport(path)
    for key in state:
        if key.startswith(CLASSIFIER_PREFIX):
            report.ignored.append(key)
        elif key in expected:
            report.loaded.append(key)
        else:
            report.unexpected.append(key)
    report.missing = [key for key in expected if key not in state and not key.endswith(OPTIONAL_SUFFIX)]

    # check the result before anything is copied
    _check_report(report, state, expected, strict)

    # copy
    backbone.load_state_dict({key: state[key] for key in report.loaded}, strict=False)
    logger.info("loaded %d pretrained tensors from %s", len(report.loaded), path)
    if report.ignored:
        logger.info("ignored classification layer keys in %s: %s", path, ", ".join(report.ignored))
    if report.missing:
        logger.warning(
            "%d backbone tensors are not in %s and keep their random values: %s",
            len(report.missing),
            path,
            _preview(report.missing),
        )
    if report.unexpected:
        logger.warning("%d keys in %s match no backbone tensor: %s", len(report.unexpected), path, _preview(report.unexpected))
    return report


def _check_report(
    report: PretrainedLoadReport, state: dict[str, Tensor], expected: dict[str, Tensor], strict: bool
) -> None:
    path = report.path
    if not report.loaded:
        raise PretrainedWeightsError(
            f"no key in {path} matches the backbone (file keys start with {_preview(list(state))}; "
            f"backbone keys start with {_preview(list(expected))}); expected a torchvision ResNet state dict"
        )

    mismatched = [
        f"{key}: file {tuple(state[key].shape)}, model {tuple(expected[key].shape)}"
        for key in report.loaded
        if state[key].shape != expected[key].shape
    ]
    if mismatched:
        raise PretrainedWeightsError(
            f"pretrained weights in {path} do not fit the backbone: {len(mismatched)} shapes differ "
            f"({_preview(mismatched)}). Check that arch names the ResNet depth the file was trained with"
        )

    if strict and (report.missing or report.unexpected):
        raise PretrainedWeightsError(
            f"pretrained weights in {path} do not fit the backbone: {len(report.missing)} missing keys "
            f"({_preview(report.missing)}) and {len(report.unexpected)} unexpected keys "
            f"({_preview(report.unexpected)}). Check that arch names the ResNet depth the file was trained with"
        )


def _preview(keys: list[str], limit: int = 5) -> str:
    text = ", ".join(keys[:limit])
    if len(keys) > limit:
        text += f", … ({len(keys) - limit} more)"
    return text or "none"


__all__ = ["PretrainedLoadReport", "PretrainedWeightsError", "load_pretrained", "read_state_dict"]

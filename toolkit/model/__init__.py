"""The classifier: torchvision ResNet trunk with activation checkpointing, embedding neck and class head."""

from toolkit.model.backbone import ARCHS, CHECKPOINTING_MODES, ResNetTrunk, build_backbone, checkpoint_module
from toolkit.model.classifier import Classifier, build_model, build_neck
from toolkit.model.head import HEAD_TYPES, ClassHead
from toolkit.model.memory import saved_activation_bytes
from toolkit.model.pretrained import PretrainedLoadReport, PretrainedWeightsError, load_pretrained, read_state_dict

__all__ = [
    "ARCHS",
    "CHECKPOINTING_MODES",
    "HEAD_TYPES",
    "ClassHead",
    "Classifier",
    "PretrainedLoadReport",
    "PretrainedWeightsError",
    "ResNetTrunk",
    "build_backbone",
    "build_model",
    "build_neck",
    "checkpoint_module",
    "load_pretrained",
    "read_state_dict",
    "saved_activation_bytes",
]

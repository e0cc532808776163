"""Evaluation and prediction: `toolkit eval` reports and `toolkit predict` top-k classes.

    inference   batched scoring shared with validation in `train`
    classes     class-list check between a checkpoint and a dataset (same, remapped or mismatched)
    metrics     counts overall, per shard and per class (torch.bincount over labels)
    report      per-shard, per-class-range and worst/best tables; JSON/CSV files; Rich rendering
    run         `run_eval`: checkpoint + dataset split -> EvalReport
    predict     image files of any format pack accepts -> top-k classes with probabilities
"""

from toolkit.eval.classes import ClassListMismatch, ClassMapping, match_classes
from toolkit.eval.predict import (
    ImagePrediction,
    ImageReadError,
    Predictor,
    PredictError,
    find_images,
    load_image,
    load_predictor,
    topk_probabilities,
    write_predictions,
)
from toolkit.eval.report import EvalReport, render_report, report_paths, write_report
from toolkit.eval.run import EvalError, evaluate_split, run_eval

__all__ = [
    "ClassListMismatch",
    "ClassMapping",
    "EvalError",
    "EvalReport",
    "ImagePrediction",
    "ImageReadError",
    "PredictError",
    "Predictor",
    "evaluate_split",
    "find_images",
    "load_image",
    "load_predictor",
    "match_classes",
    "render_report",
    "report_paths",
    "run_eval",
    "topk_probabilities",
    "write_predictions",
    "write_report",
]

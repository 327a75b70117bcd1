"""Segmenters: models by name, one training loop, inference and evaluation, cached baselines.

``from dasslab import seg`` gives the whole contract of docs/api.md (section Segmentation):
``build_segmenter``, ``TrainConfig``, ``train_segmenter``, ``save_segmenter`` / ``load_segmenter``,
``evaluate``, ``predict``, ``get_or_train``, ``reference_segmenter``, ``train_and_evaluate``,
``baselines``, ``summarize``. The ``dasslab evaluate`` command lives in :mod:`dasslab.metrics`.
"""

from .downstream import (
    baselines,
    cached_evaluations,
    confusion_of,
    dataset_fingerprint,
    get_or_train,
    model_spec,
    reference_segmenter,
    results_table,
    summarize,
    train_and_evaluate,
    train_config,
    weights_hash,
)
from .infer import evaluate, load_segmenter, predict, predict_logits, save_segmenter, write_predictions
from .models import MODEL_NAMES, build_segmenter
from .train import (
    TrainConfig,
    augment,
    balanced_class_weights,
    collate,
    cross_entropy_loss,
    label_statistics,
    rare_class_weights,
    smooth,
    train_segmenter,
)

__all__ = [
    "MODEL_NAMES",
    "TrainConfig",
    "augment",
    "balanced_class_weights",
    "baselines",
    "build_segmenter",
    "cached_evaluations",
    "collate",
    "confusion_of",
    "cross_entropy_loss",
    "dataset_fingerprint",
    "evaluate",
    "get_or_train",
    "label_statistics",
    "load_segmenter",
    "model_spec",
    "predict",
    "predict_logits",
    "rare_class_weights",
    "reference_segmenter",
    "results_table",
    "save_segmenter",
    "smooth",
    "summarize",
    "train_and_evaluate",
    "train_config",
    "train_segmenter",
    "weights_hash",
    "write_predictions",
]

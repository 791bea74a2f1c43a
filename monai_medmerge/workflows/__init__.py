"""Training workflows: two-phase merge training (coefficients, then fine-tuning) and evaluation metrics."""

from __future__ import annotations

from monai_medmerge.workflows.loops import History, evaluate, fine_tune, fit, learn_coefficients, predict, split_batch
from monai_medmerge.workflows.metrics import classification_metrics, confusion_matrix

__all__ = [
    "History",
    "classification_metrics",
    "confusion_matrix",
    "evaluate",
    "fine_tune",
    "fit",
    "learn_coefficients",
    "predict",
    "split_batch",
]

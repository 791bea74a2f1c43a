"""Merge training on MONAI engines (phase 0 of the paper recipe: each source fine-tuned on the target; phase 1: merge
coefficients and a new head; phase 2: fine-tuning, possibly distilled from the phase-0 networks' ensemble),
evaluation and metrics. The bundle configs and these Python functions build their engines with the same
:func:`~monai_medmerge.workflows.engines.phase_trainer` and :func:`~monai_medmerge.workflows.engines.phase_evaluator`.
"""

from __future__ import annotations

from monai_medmerge.workflows.distillation import EnsembleDistillation, fine_tune_distilled
from monai_medmerge.workflows.engines import phase1_network, phase_evaluator, phase_trainer
from monai_medmerge.workflows.metrics import classification_metrics, confusion_matrix
from monai_medmerge.workflows.recipes import RECIPES, fine_tune_sources, phase1_sources
from monai_medmerge.workflows.training import (
    History,
    evaluate,
    fine_tune,
    fit,
    learn_coefficients,
    linear_probe,
    predict,
)

__all__ = [
    "RECIPES",
    "EnsembleDistillation",
    "History",
    "classification_metrics",
    "confusion_matrix",
    "evaluate",
    "fine_tune",
    "fine_tune_distilled",
    "fine_tune_sources",
    "fit",
    "learn_coefficients",
    "linear_probe",
    "phase1_network",
    "phase1_sources",
    "phase_evaluator",
    "phase_trainer",
    "predict",
]

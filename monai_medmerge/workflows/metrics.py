"""Classification metrics from predictions, computed with MONAI's metric functions.

Macro-F1, accuracy and balanced accuracy come from MONAI's confusion-matrix metrics, AUROC from
:func:`monai.metrics.compute_roc_auc`; neither needs scikit-learn, and the values equal scikit-learn's
``f1_score(average="macro")``, ``accuracy_score``, ``balanced_accuracy_score`` and ``roc_auc_score`` (tested).
An AUROC that cannot be computed (fewer than two classes among the labels) is NaN *with a warning*, never silently.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from monai.metrics import compute_roc_auc
from monai.metrics.confusion_matrix import compute_confusion_matrix_metric, get_confusion_matrix
from monai.networks.utils import one_hot

__all__ = ["SCORES", "classification_metrics", "confusion_matrix"]

SCORES = ("macro_f1", "accuracy", "balanced_accuracy", "auroc")


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """``num_classes x num_classes`` counts, rows are true classes, columns predicted ones.

    Raises:
        ValueError: when the two hold different numbers of labels or a label lies outside ``[0, num_classes)``.
    """
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels but y_pred has {y_pred.size}.")
    values = np.concatenate([y_true, y_pred])
    bad = sorted({int(v) for v in values[(values < 0) | (values >= num_classes)]})
    if bad:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}]; found {bad}.")
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def _probabilities(scores: np.ndarray) -> np.ndarray:
    """Rows of class probabilities: given as they are when every row is a distribution, else a softmax of logits."""
    if (scores >= 0).all() and np.allclose(scores.sum(1), 1.0, atol=1e-4):
        return scores
    return torch.softmax(torch.as_tensor(scores), dim=1).numpy()


def classification_metrics(y_true, probs, num_classes: int | None = None) -> dict[str, float]:
    """Macro-F1 (the primary metric), accuracy, balanced accuracy and macro one-vs-rest AUROC.

    Args:
        y_true: integer labels, shape ``(n,)``.
        probs: class probabilities, or logits (rows that are not probability distributions get a softmax), shape
            ``(n, num_classes)``; the argmax is the prediction.
        num_classes: defaults to ``probs.shape[1]``.

    Returns:
        ``{"macro_f1", "accuracy", "balanced_accuracy", "auroc"}``. Classes absent from both ``y_true`` and the
        predictions do not count towards macro-F1; balanced accuracy and AUROC average over the classes present in
        ``y_true``. AUROC is NaN, with a ``RuntimeWarning`` that says why, when ``y_true`` holds fewer than two
        classes.

    Raises:
        ValueError: for labels outside ``[0, num_classes)`` or mismatched lengths.
    """
    probs = np.asarray(probs, dtype=np.float64)
    num_classes = probs.shape[1] if num_classes is None else int(num_classes)
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    if len(y_true) != len(probs):
        raise ValueError(f"y_true has {len(y_true)} labels but probs has {len(probs)} rows.")
    confusion_matrix(y_true, probs.argmax(1), num_classes)  # checks the label range
    probs = _probabilities(probs)
    y = one_hot(torch.as_tensor(y_true)[:, None], num_classes, dim=1)
    pred = one_hot(torch.as_tensor(probs.argmax(1))[:, None], num_classes, dim=1)
    # per class (tp, fp, tn, fn), summed over the items
    counts = get_confusion_matrix(pred, y, include_background=True).sum(0).double()
    support = (counts[:, 0] + counts[:, 3]) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 0/0 for absent classes is NaN, which the means below leave out
        f1 = compute_confusion_matrix_metric("f1 score", counts)
        recall = compute_confusion_matrix_metric("sensitivity", counts)
    out = {
        "macro_f1": float(torch.nanmean(f1)),
        "accuracy": float(counts[:, 0].sum() / max(len(y_true), 1)),
        "balanced_accuracy": float(recall[support].mean()) if support.any() else float("nan"),
        "auroc": _auroc(probs, y, support),
    }
    return out


def _auroc(probs: np.ndarray, y: torch.Tensor, support: torch.Tensor) -> float:
    """Macro one-vs-rest AUROC over the classes present in the labels (MONAI ``compute_roc_auc``)."""
    present = [int(c) for c in torch.nonzero(support).ravel()]
    if len(present) < 2:
        warnings.warn(
            f"AUROC is undefined with {len(present)} class(es) among the labels; it is reported as NaN.",
            RuntimeWarning,
            stacklevel=3,
        )
        return float("nan")
    p = torch.as_tensor(probs)
    if len(present) < y.shape[1]:
        missing = sorted(set(range(y.shape[1])) - set(present))
        warnings.warn(
            f"AUROC averages over the {len(present)} classes present among the labels; class(es) {missing} have "
            "no example.",
            RuntimeWarning,
            stacklevel=3,
        )
    return float(compute_roc_auc(p[:, present], y[:, present], average="macro"))

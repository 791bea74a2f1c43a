"""Classification metrics computed from predictions, without extra dependencies."""

from __future__ import annotations

import numpy as np

__all__ = ["classification_metrics", "confusion_matrix"]


def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """``num_classes x num_classes`` counts, rows are true classes, columns predicted ones."""
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    y_pred = np.asarray(y_pred, dtype=np.int64).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} labels but y_pred has {y_pred.size}.")
    values = np.concatenate([y_true, y_pred])
    bad = sorted({int(v) for v in values[(values < 0) | (values >= num_classes)]})
    if bad:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}]; found {bad}.")
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def classification_metrics(y_true, probs, num_classes: int | None = None) -> dict[str, float]:
    """Macro-F1 (the primary metric), accuracy, balanced accuracy and, when scikit-learn is installed, macro AUROC.

    Args:
        y_true: integer labels, shape ``(n,)``.
        probs: class probabilities (or logits, which get a softmax), shape ``(n, num_classes)``; the argmax is
            the prediction.
        num_classes: defaults to ``probs.shape[1]``.

    Returns:
        ``{"macro_f1", "accuracy", "balanced_accuracy", "auroc"}`` (AUROC is NaN when undefined or unavailable).
        Classes absent from both ``y_true`` and the predictions do not count towards the macro averages.
    """
    probs = np.asarray(probs, dtype=np.float64)
    num_classes = probs.shape[1] if num_classes is None else num_classes
    y_true = np.asarray(y_true, dtype=np.int64).ravel()
    cm = confusion_matrix(y_true, probs.argmax(1), num_classes)
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    present = (support + predicted) > 0
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros_like(tp), where=present)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    out = {
        "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
        "accuracy": float(tp.sum() / max(cm.sum(), 1)),
        "balanced_accuracy": float(recall[support > 0].mean()) if (support > 0).any() else float("nan"),
        "auroc": float("nan"),
    }
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:
        return out
    if len(np.unique(y_true)) == num_classes > 1:
        # scores are normalised per row so that logits and probabilities both work
        p = np.exp(probs - probs.max(1, keepdims=True)) if (probs < 0).any() else probs
        p = p / p.sum(1, keepdims=True)
        if num_classes == 2:
            out["auroc"] = float(roc_auc_score(y_true, p[:, 1]))
        else:
            out["auroc"] = float(
                roc_auc_score(y_true, p, multi_class="ovr", average="macro", labels=range(num_classes))
            )
    return out

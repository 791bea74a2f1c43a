from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from medmerge_bench.transfer import SeedResult, summarize
from monai_medmerge.workflows.metrics import classification_metrics


def _rec(val_f1, test_f1):
    def m(f1):
        return {"macro_f1": f1, "accuracy": f1, "balanced_accuracy": f1, "auroc": 0.5}

    return {"val": m(val_f1), "test": m(test_f1)}


def test_paired_comparison_uses_validation_to_pick_the_baseline():
    # ft_a is better on TEST but worse on validation: the baseline must be ft_b
    seeds = []
    for s, (a, b, mm) in enumerate(
        [(0.60, 0.50, 0.55), (0.62, 0.52, 0.58), (0.61, 0.49, 0.50), (0.63, 0.51, 0.56), (0.59, 0.50, 0.57)]
    ):
        r = SeedResult(seed=s)
        r.records = {"ft_a": _rec(0.40, a), "ft_b": _rec(0.45, b), "medmerge_ft": _rec(0.46, mm)}
        seeds.append(r)
    summary = summarize(seeds)
    paired = summary["medmerge_ft_vs_best_single_source"]
    assert paired["baseline"] == "ft_b"
    mm = [0.55, 0.58, 0.50, 0.56, 0.57]
    b = [0.50, 0.52, 0.49, 0.51, 0.50]
    np.testing.assert_allclose(paired["differences"], np.subtract(mm, b))
    assert paired["mean_difference"] == pytest.approx(np.mean(np.subtract(mm, b)))
    assert paired["t_test_p"] == pytest.approx(stats.ttest_rel(mm, b).pvalue)
    assert paired["wilcoxon_p"] == pytest.approx(stats.wilcoxon(np.subtract(mm, b)).pvalue)
    assert "aligned_medmerge_ft_vs_medmerge_ft" not in summary  # only rows that were run are compared

    for r, aligned in zip(seeds, [0.56, 0.60, 0.50, 0.59, 0.60], strict=True):
        r.records["aligned_medmerge_ft"] = _rec(0.47, aligned)
    summary = summarize(seeds)
    vs = summary["aligned_medmerge_ft_vs_medmerge_ft"]
    np.testing.assert_allclose(vs["differences"], np.subtract([0.56, 0.60, 0.50, 0.59, 0.60], mm), atol=1e-12)
    assert vs["baseline"] == "medmerge_ft" and vs["method"] == "aligned_medmerge_ft"
    assert summary["aligned_medmerge_ft_vs_best_single_source"]["baseline"] == "ft_b"
    assert summary["methods"]["ft_a"]["test_macro_f1"]["std"] == pytest.approx(
        np.std([0.60, 0.62, 0.61, 0.63, 0.59], ddof=1)
    )


def test_classification_metrics_against_hand_counts():
    y = [0, 0, 1, 1, 2, 2]
    probs = np.eye(3)[[0, 1, 1, 1, 2, 0]]  # predictions 0,1,1,1,2,0
    m = classification_metrics(y, probs)
    # per class F1: c0 tp1 fp1 fn1 -> 0.5; c1 tp2 fp1 fn0 -> 0.8; c2 tp1 fp0 fn1 -> 2/3
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    sk = pytest.importorskip("sklearn.metrics")
    assert m["macro_f1"] == pytest.approx(sk.f1_score(y, probs.argmax(1), average="macro"))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]; found \[3\]"):
        classification_metrics([0, 3], np.eye(3)[[0, 1]])

"""Pictures of a comparison run: macro-F1 by method, learned coefficients per layer, learning curves (PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.utils import optional_import

from monai_medmerge.io import atomic_write

plt, has_matplotlib = optional_import(
    "matplotlib.pyplot", descriptor="{} is needed for the pictures: pip install matplotlib"
)

__all__ = ["plot_scores", "plot_coefficients", "plot_curves"]


def _save(fig, path: Path) -> Path:
    path = Path(path)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _backend() -> None:
    import matplotlib

    matplotlib.use("Agg")


def plot_scores(summary: dict, labels: dict[str, str], path: Path, title: str) -> Path:
    """Horizontal bars of mean test macro-F1 per method with one-std error bars and each seed as a dot."""
    _backend()
    methods = list(summary["methods"])
    means = [summary["methods"][m]["test_macro_f1"]["mean"] for m in methods]
    stds = [summary["methods"][m]["test_macro_f1"]["std"] for m in methods]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(methods) + 1.2))
    y = np.arange(len(methods))
    ax.barh(
        y,
        means,
        xerr=stds,
        color=["#c0392b" if m.startswith("medmerge") else "#7f8c8d" for m in methods],
        alpha=0.8,
        capsize=3,
    )
    for i, m in enumerate(methods):
        vals = summary["methods"][m]["test_macro_f1"]["values"]
        ax.plot(vals, [i] * len(vals), "k.", markersize=4)
    ax.set_yticks(y, [labels.get(m, m) for m in methods])
    ax.invert_yaxis()
    ax.set_xlabel("test macro-F1 (mean +- std over seeds; dots: seeds)")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def plot_coefficients(
    coefficients: dict[str, Sequence[float]], source_names: Sequence[str], path: Path, title: str
) -> Path:
    """Share of each source per merge unit, in network order (mean over the unit's kernels)."""
    _backend()
    units = list(coefficients)
    shares = np.array([coefficients[u] for u in units]).T  # (N, units)
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * len(units) + 2), 3.6))
    bottom = np.zeros(len(units))
    colors = ["#2980b9", "#e67e22", "#27ae60", "#8e44ad"]
    for i, name in enumerate(source_names):
        ax.bar(range(len(units)), shares[i], bottom=bottom, label=name, color=colors[i % len(colors)])
        bottom += shares[i]
    ax.set_xticks(range(len(units)), units, rotation=90, fontsize=7)
    ax.set_ylabel("share of the merged kernels")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def plot_curves(curves: dict[str, Sequence[float]], path: Path, title: str) -> Path:
    """Validation macro-F1 per epoch for each named curve."""
    _backend()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, marker=".", label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation macro-F1")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)

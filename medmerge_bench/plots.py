"""Pictures of a comparison run: macro-F1 by method, learned coefficients per layer, learning curves (PNG).

:func:`plot_report` draws all three from a comparison's report (the dict :func:`medmerge_bench.comparison.
run_comparison` returns and writes as JSON), so a recorded result can be drawn again without running it::

    python -m medmerge_bench.plots benchmarks/results/brain_k50.json   # rewrites brain_k50_*.png beside it
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np
from monai.utils import optional_import

from monai_medmerge.io import atomic_write

plt, has_matplotlib = optional_import(
    "matplotlib.pyplot", descriptor="{} is needed for the pictures: pip install matplotlib"
)

__all__ = ["plot_scores", "plot_coefficients", "plot_curves", "plot_report"]

HIGHLIGHT = "#c0392b"  # MedMerge
BASELINE = "#7f8c8d"  # everything it is compared with
SOURCE_COLORS = ("#2980b9", "#e67e22", "#27ae60", "#8e44ad")
# legends sit to the right of the axes, where they cannot cover data
OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.02, 1.0), "borderaxespad": 0.0}


def _save(fig, path: Path) -> Path:
    path = Path(path)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _backend() -> None:
    import matplotlib

    matplotlib.use("Agg")


def _seeds_phrase(n: int) -> str:
    return "one seed" if n == 1 else f"{n} seeds"


def plot_scores(
    summary: dict, labels: Mapping[str, str], path: Path, title: str, highlight: Collection[str] | None = None
) -> Path:
    """Horizontal bars of test macro-F1 per method, MedMerge's methods in red and the others in grey.

    With several seeds a bar is the mean, its whisker one standard deviation and the dots the single seeds; with one
    seed the bar is that seed's score and the axis says there is no spread. A legend explains colours and marks.

    Args:
        summary: ``summarize``'s output (``summary["methods"][m]["test_macro_f1"]`` with ``mean``, ``std``,
            ``values``).
        labels: method key to the name shown.
        path: the PNG to write.
        title: the picture's title.
        highlight: the methods drawn in red; default: those whose key or shown name mentions MedMerge.
    """
    _backend()
    methods = list(summary["methods"])
    scores = [summary["methods"][m]["test_macro_f1"] for m in methods]
    means = np.array([s["mean"] for s in scores])
    stds = np.array([s["std"] for s in scores])
    n_seeds = max(len(s["values"]) for s in scores)
    if highlight is None:
        highlight = {m for m in methods if "medmerge" in f"{m} {labels.get(m, m)}".lower()}
    colors = [HIGHLIGHT if m in highlight else BASELINE for m in methods]

    fig, ax = plt.subplots(figsize=(7, 0.45 * len(methods) + 1.4))
    y = np.arange(len(methods))
    spread = n_seeds > 1
    ax.barh(y, means, xerr=stds if spread else None, color=colors, alpha=0.85, capsize=3)
    right = means + stds  # where each bar's drawing ends: its number is written just beyond
    for i, s in enumerate(scores):
        if spread:
            ax.plot(s["values"], [i] * len(s["values"]), "k.", markersize=4)
            right[i] = max(right[i], max(s["values"]))
    for i in range(len(methods)):
        ax.text(right[i] + 0.015 * right.max(), i, f"{means[i]:.3f}", va="center", fontsize=8)
    ax.set_yticks(y, [labels.get(m, m) for m in methods])
    ax.invert_yaxis()
    ax.set_xlim(0, max(0.05, float(right.max())) * 1.12)
    if spread:
        ax.set_xlabel(f"test macro-F1 (bar: mean over {n_seeds} seeds; whisker: one std; dots: single seeds)")
    else:
        ax.set_xlabel("test macro-F1 (one seed, no spread)")
    ax.set_ylabel("method")
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)

    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    key = []
    if any(m in highlight for m in methods):
        key.append(Patch(color=HIGHLIGHT, alpha=0.85, label="MedMerge (learned kernel-level merge)"))
    if any(m not in highlight for m in methods):
        key.append(Patch(color=BASELINE, alpha=0.85, label="baselines it is compared with"))
    if spread:
        key.append(Line2D([], [], color="k", marker=".", linestyle="none", label="one seed"))
    ax.legend(handles=key, fontsize=8, **OUTSIDE)
    return _save(fig, path)


def plot_coefficients(
    coefficients: Mapping[str, Sequence[float]],
    source_names: Sequence[str],
    path: Path,
    title: str,
    start: Sequence[float] | None = None,
) -> Path:
    """Stacked bars of each source's share per merge unit, in network order (mean over the unit's kernels).

    Args:
        coefficients: unit name to the share of each source (one number per source, summing to 1).
        source_names: the sources' names, in the order of the shares.
        path: the PNG to write.
        title: the picture's title.
        start: the shares every unit started from (an anchored merge starts at the anchor's share); drawn as a
            dashed line so the reader sees how far learning moved them. ``None``: not drawn.
    """
    _backend()
    units = list(coefficients)
    shares = np.array([coefficients[u] for u in units]).T  # (N, units)
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(units) + 2), 4.0))
    bottom = np.zeros(len(units))
    x = np.arange(len(units))
    handles = []
    for i in range(len(source_names)):
        bars = ax.bar(x, shares[i], bottom=bottom, color=SOURCE_COLORS[i % len(SOURCE_COLORS)], width=0.8)
        handles.append(bars.patches[0])
        bottom += shares[i]
    labels = list(source_names)
    if start is not None and len(start) > 1:
        lines = [ax.axhline(level, color="k", linestyle="--", linewidth=1) for level in np.cumsum(start)[:-1]]
        handles.append(lines[0])
        labels.append(f"where phase 1 started (anchor's share {max(start):.2f})")
    ax.set_xticks(x, units, rotation=90, fontsize=8)
    ax.set_xlim(-0.6, len(units) - 0.4)
    ax.set_xlabel("merge unit (layer of the network, input to output)")
    ax.set_ylabel("share of each source\n(mean over the unit's kernels)")
    ax.set_ylim(0, 1)
    ax.legend(handles, labels, fontsize=8, **OUTSIDE)
    ax.set_title(title)
    return _save(fig, path)


class _Series:
    """One drawn line: the methods it stands for, its phase-1 values (empty for one stage) and its fine-tuning."""

    def __init__(self, name: str, first: tuple[float, ...], second: tuple[float, ...]) -> None:
        self.names = [name]
        self.first, self.second = first, second
        self.phase1_names: list[str] = []

    @property
    def label(self) -> str:
        label = " = ".join(self.names)
        if self.phase1_names:
            label += f"\n  phase 1 = {' = '.join(self.phase1_names)}"
        return label


def plot_curves(
    curves: Mapping[str, Sequence[float]],
    path: Path,
    title: str,
    phase1: Mapping[str, Sequence[float]] | None = None,
    handover: Mapping[str, float] | None = None,
) -> Path:
    """Validation macro-F1 per epoch, one colour per method.

    A two-stage method (a merge: coefficients in phase 1, then fine-tuning) is one line: its phase 1 dashed over its
    first epochs, its fine-tuning solid over the epochs after, on one continued epoch axis. Identical series are
    drawn once and named together in the legend; a method whose curve is another method's phase 1 (the collapsed
    merge is the network phase 1 ends with) is named in that method's legend entry instead of drawn on top of it.

    Args:
        curves: method name to its validation macro-F1 per epoch (for a two-stage method: of its fine-tuning).
        path: the PNG to write.
        title: the picture's title.
        phase1: method name to the validation macro-F1 per epoch of its phase 1, for the two-stage methods.
        handover: two-stage method name to the validation macro-F1 of the network phase 1 hands to phase 2 (the
            collapsed merge, norm statistics recomputed), drawn as a diamond between the two stages.

    Raises:
        ValueError: when ``phase1`` names a method that ``curves`` lacks, or ``handover`` one that ``phase1`` lacks.
    """
    phase1 = dict(phase1 or {})
    handover = dict(handover or {})
    unknown = sorted(set(phase1) - set(curves))
    if unknown:
        raise ValueError(f"phase1 names {unknown}, which have no curve; give their fine-tuning in curves.")
    unknown = sorted(set(handover) - set(phase1))
    if unknown:
        raise ValueError(f"handover names {unknown}, which have no phase 1; give their phase-1 curves in phase1.")
    _backend()
    series: list[_Series] = []
    for name, values in curves.items():
        first, second = tuple(phase1.get(name, ())), tuple(values)
        same = next((s for s in series if (s.first, s.second) == (first, second)), None)
        if same is not None:
            same.names.append(name)
        else:
            series.append(_Series(name, first, second))
    for s in list(series):
        host = next((h for h in series if h.first and not s.first and h.first == s.second), None)
        if host is not None:
            host.phase1_names.extend(s.names)
            series.remove(s)

    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    colors = plt.get_cmap("tab10").colors
    markers = "os^D"
    handles = []
    for i, s in enumerate(series):
        style = {"color": colors[i % len(colors)], "marker": markers[(i // len(colors)) % len(markers)]}
        style["markersize"] = 3
        n1 = len(s.first)
        if n1:
            ax.plot(np.arange(1, n1 + 1), s.first, linestyle="--", linewidth=1.2, **style)
        for name in s.names:
            if name in handover:
                ax.plot([n1 + 0.5], [handover[name]], marker="D", color=style["color"], markeredgecolor="k")
        ax.plot(np.arange(n1 + 1, n1 + len(s.second) + 1), s.second, linestyle="-", linewidth=1.5, **style)
        handles.append(Line2D([], [], linestyle="-", label=s.label, **style))
    if any(s.first for s in series):
        handles.append(Line2D([], [], color="k", linestyle="--", label="dashed: phase 1 of a merge (coefficients)"))
        handles.append(Line2D([], [], color="k", linestyle="-", label="solid: fine-tuning (a merge's phase 2)"))
        if handover:
            label = "diamond: the collapsed merge, norm statistics\n  recomputed: where fine-tuning starts"
            key = {"linestyle": "none", "marker": "D", "markeredgecolor": "k", "markerfacecolor": "w"}
            handles.append(Line2D([], [], label=label, **key))
        ax.set_xlabel("epoch (a merge's fine-tuning continues after its phase 1)")
    else:
        ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("validation macro-F1")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, fontsize=8, **OUTSIDE)
    return _save(fig, path)


def plot_report(report: Mapping, out_dir: str | Path, name: str) -> list[Path]:
    """Draw the pictures of a comparison report into ``out_dir``: ``<name>_macro_f1.png`` always,
    ``<name>_coefficients.png`` when the first seed learned MedMerge coefficients, ``<name>_curves.png`` when its
    methods recorded learning curves.

    Args:
        report: the comparison's report (``run_comparison``'s return value, or its JSON read back).
        out_dir: the folder for the pictures.
        name: the file stem.

    Returns:
        the written pictures.
    """
    out = Path(out_dir)
    labels = dict(report["methods"])
    task, k, seeds = report["task"], report["k"], report["seeds"]
    first = report["per_seed"][0]
    pictures = [
        plot_scores(
            report["summary"],
            labels,
            out / f"{name}_macro_f1.png",
            f"Test macro-F1 by method ({task}, k = {k}, {_seeds_phrase(len(seeds))})",
        )
    ]
    coefficients = report.get("coefficients_seed0")
    if coefficients:
        data = report["data"]
        names = report.get("source_names") or [data["source_a"]["name"], data["source_b"]["name"]]
        sources = [f"{tag}: {source}" for tag, source in zip("AB", names, strict=True)]
        start = None
        weight = report.get("recipe", {}).get("anchor_weight")
        if weight is not None and first.get("anchor") in ("a", "b"):
            anchor = "ab".index(first["anchor"])
            start = [weight if i == anchor else (1 - weight) / (len(sources) - 1) for i in range(len(sources))]
        pictures.append(
            plot_coefficients(
                coefficients,
                sources,
                out / f"{name}_coefficients.png",
                f"MedMerge coefficients per layer ({task}, k = {k}, seed {first['seed']}, "
                f"anchor {first['anchor'].upper()})",
                start=start,
            )
        )
    records = first["records"]
    curves, phase1, handover = {}, {}, {}
    for m, rec in records.items():
        if "curve" in rec:
            curves[labels.get(m, m)] = rec["curve"]
        if "curve_phase1" in rec:
            phase1[labels.get(m, m)] = rec["curve_phase1"]
    if "curve_phase1" in records.get("medmerge_ft", {}) and "val" in records.get("medmerge", {}):
        # the collapsed merge is recorded: it is the network MedMerge + FT's phase 2 starts from
        handover[labels.get("medmerge_ft", "medmerge_ft")] = records["medmerge"]["val"]["macro_f1"]
    if curves:
        pictures.append(
            plot_curves(
                curves,
                out / f"{name}_curves.png",
                f"Validation macro-F1 per epoch ({task}, k = {k}, seed {first['seed']})",
                phase1=phase1,
                handover=handover,
            )
        )
    return pictures


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m medmerge_bench.plots", description="Draw a comparison's pictures again from its result JSON."
    )
    parser.add_argument("results", nargs="+", type=Path, help="comparison result files (<name>.json)")
    parser.add_argument("--out", type=Path, help="folder for the pictures (default: beside each result file)")
    args = parser.parse_args(argv)
    for path in args.results:
        report = json.loads(path.read_text())
        if report.get("benchmark") != "transfer":
            parser.error(f"{path} is not a comparison result (its 'benchmark' is {report.get('benchmark')!r}).")
        for picture in plot_report(report, args.out or path.parent, path.stem):
            print(picture)


if __name__ == "__main__":
    main()

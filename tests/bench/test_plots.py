"""The pictures of a comparison, checked as a reader would see them: what the legends name, what the axes say, and
that nothing covers the data. Each figure is drawn from a small report shaped like a comparison's JSON."""

from __future__ import annotations

from itertools import pairwise

import pytest

pytest.importorskip("matplotlib")

from matplotlib.lines import Line2D  # noqa: E402

from medmerge_bench import plots  # noqa: E402

PHASE1 = [0.15, 0.32, 0.40, 0.47, 0.45]  # MedMerge's phase 1: also the curve of the collapsed merge
PHASE2 = [0.36, 0.54, 0.62, 0.60]
LABELS = {
    "ft_a": "fine-tune from A",
    "ft_b": "fine-tune from B",
    "average_ft": "uniform average + FT",
    "medmerge": "MedMerge, collapsed (no FT)",
    "medmerge_ft": "MedMerge + FT",
    "ensemble": "ensemble of FT A and B (2x cost)",
}
F1 = {"ft_a": 0.346, "ft_b": 0.444, "average_ft": 0.367, "medmerge": 0.398, "medmerge_ft": 0.443, "ensemble": 0.43}
UNITS = ["conv1", "bn1"] + [f"layer{i}.0.{part}" for i in range(1, 5) for part in ("conv1", "bn1", "conv2", "bn2")]


def _report(seeds: list[int]) -> dict:
    """A comparison report as run_comparison writes it, with the curves run_seed records: the collapsed merge's
    curve is, by construction, MedMerge + FT's phase 1."""
    n = len(seeds)
    methods = {}
    for m, f1 in F1.items():
        values = [f1 + 0.01 * (i - (n - 1) / 2) for i in range(n)]
        std = 0.0 if n == 1 else 0.01 * (sum((i - (n - 1) / 2) ** 2 for i in range(n)) / (n - 1)) ** 0.5
        methods[m] = {
            "test_macro_f1": {"mean": f1, "std": std, "values": values},
            "test_accuracy": {"mean": f1, "std": std, "values": values},
            "val_macro_f1": {"mean": f1 + (0.05 if m == "ft_b" else 0.0), "std": std, "values": values},
        }
    records = {
        "ft_a": {"curve": [0.27, 0.36, 0.30, 0.36, 0.44]},
        "ft_b": {"curve": [0.43, 0.43, 0.56, 0.55, 0.53]},
        "average_ft": {"curve": [0.18, 0.15, 0.40, 0.45, 0.49]},
        "medmerge": {"curve": list(PHASE1), "val": {"macro_f1": 0.52}},
        "medmerge_ft": {"curve": list(PHASE2), "curve_phase1": list(PHASE1)},
        "ensemble": {},
    }
    return {
        "benchmark": "transfer",
        "task": "brain",
        "k": 50,
        "seeds": seeds,
        "methods": LABELS,
        "recipe": {"anchor_weight": 0.9},
        "data": {"source_a": {"name": "brain/tissue"}, "source_b": {"name": "brain/anatomy"}},
        "summary": {"methods": methods},
        "per_seed": [{"seed": seeds[0], "anchor": "b", "records": records}],
        "coefficients_seed0": {u: [0.1 + 0.002 * i, 0.9 - 0.002 * i] for i, u in enumerate(UNITS)},
    }


@pytest.fixture
def drawn(monkeypatch, tmp_path):
    """Draw a report's pictures; per picture (``macro_f1``, ``coefficients``, ``curves``) its axes and renderer."""
    figures = {}
    save = plots._save

    def keep(fig, path):
        fig.canvas.draw()  # lays out the figure while its Agg canvas is attached (saving closes it)
        figures[path.name] = (fig, fig.canvas.get_renderer())
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)

    def draw(report):
        written = plots.plot_report(report, tmp_path, "r")
        assert [p.name for p in written] == ["r_macro_f1.png", "r_coefficients.png", "r_curves.png"]
        assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)
        return {name.removeprefix("r_").removesuffix(".png"): drawing for name, drawing in figures.items()}

    return draw


def _legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_identical_curves_are_drawn_once_and_named_together(drawn):
    ax = drawn(_report([0]))["curves"][0].axes[0]
    texts = _legend_texts(ax)
    # one entry per drawn method, the collapsed merge named inside MedMerge + FT's, then the two line styles
    methods = [t for t in texts if not t.startswith(("dashed:", "solid:", "diamond:"))]
    assert len(methods) == 4 and len(texts) == 7, texts
    naming = [t for t in texts if "MedMerge, collapsed (no FT)" in t]
    assert len(naming) == 1 and naming[0].startswith("MedMerge + FT"), texts
    phase1_lines = [line for line in ax.get_lines() if list(line.get_ydata()) == PHASE1]
    assert len(phase1_lines) == 1 and phase1_lines[0].get_linestyle() == "--"


def test_phase_two_continues_the_epoch_axis_of_phase_one(drawn):
    ax = drawn(_report([0]))["curves"][0].axes[0]
    (phase2,) = [line for line in ax.get_lines() if list(line.get_ydata()) == PHASE2]
    (phase1,) = [line for line in ax.get_lines() if list(line.get_ydata()) == PHASE1]
    assert list(phase1.get_xdata()) == [1, 2, 3, 4, 5]
    assert list(phase2.get_xdata()) == [6, 7, 8, 9]
    assert phase2.get_color() == phase1.get_color() and phase2.get_linestyle() == "-"
    # between the stages, the collapsed merge's own validation score: the network phase 2 starts from
    (diamond,) = [line for line in ax.get_lines() if line.get_marker() == "D"]
    assert list(diamond.get_xdata()) == [5.5] and list(diamond.get_ydata()) == [0.52]
    assert diamond.get_color() == phase1.get_color()


def test_methods_with_the_same_curve_share_one_legend_entry(monkeypatch, tmp_path):
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or path)
    plots.plot_curves({"x": [0.1, 0.2], "y": [0.1, 0.2], "z": [0.3, 0.1]}, tmp_path / "c.png", "t")
    assert _legend_texts(figures[0].axes[0]) == ["x = y", "z"]
    with pytest.raises(ValueError, match=r"phase1 names \['w'\]"):
        plots.plot_curves({"x": [0.1]}, tmp_path / "c.png", "t", phase1={"w": [0.2]})


def test_every_axis_has_a_title(drawn):
    for name, (fig, _) in drawn(_report([0, 1, 2])).items():
        ax = fig.axes[0]
        assert ax.get_xlabel() and ax.get_ylabel() and ax.get_title(), name


def test_one_seed_says_there_is_no_spread(drawn):
    ax = drawn(_report([0]))["macro_f1"][0].axes[0]
    assert "one seed, no spread" in ax.get_xlabel() and "std" not in ax.get_xlabel()
    assert "one seed" in ax.get_title() and "seed(s)" not in ax.get_title()
    assert all(c.errorbar is None for c in ax.containers)


def test_several_seeds_say_what_bar_whisker_and_dots_are(drawn):
    ax = drawn(_report([0, 1, 2, 3, 4]))["macro_f1"][0].axes[0]
    assert "mean over 5 seeds" in ax.get_xlabel() and "std" in ax.get_xlabel()
    assert "5 seeds" in ax.get_title()
    assert "one seed" in _legend_texts(ax)


def test_score_colours_are_explained(drawn):
    ax = drawn(_report([0]))["macro_f1"][0].axes[0]
    bar_colors = {tuple(bar.get_facecolor()) for bar in ax.patches}
    assert len(bar_colors) == 2
    legend = ax.get_legend()
    keyed = {
        tuple(h.get_facecolor()): t.get_text()
        for h, t in zip(legend.legend_handles, legend.get_texts(), strict=True)
        if not isinstance(h, Line2D)
    }
    assert set(keyed) == bar_colors
    red = tuple(ax.patches[list(LABELS).index("medmerge_ft")].get_facecolor())
    assert "MedMerge" in keyed[red]


def test_coefficient_legend_covers_no_bar_and_tick_labels_do_not_collide(drawn):
    fig, renderer = drawn(_report([0]))["coefficients"]
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    assert not any(legend.overlaps(bar.get_window_extent(renderer)) for bar in ax.patches)
    assert not legend.overlaps(ax.get_window_extent(renderer))
    assert "merge unit" in ax.get_xlabel()
    ticks = [t.get_window_extent(renderer) for t in ax.get_xticklabels()]
    assert len(ticks) == len(UNITS)
    assert not any(a.overlaps(b) for a, b in pairwise(ticks))
    # the start line sits at the share source A started from (anchor B at 0.9)
    (start,) = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
    assert start.get_ydata()[0] == pytest.approx(0.1)

"""The head-first room screen's table (benchmarks/room_search.py --screen), from benchmark result files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import room_search  # noqa: E402


def _run(task: str, scores: dict[str, list[tuple[float, float]]]) -> dict:
    """A result file's fields the screen reads: per seed, each method's (val, test) macro-F1."""
    seeds = range(len(next(iter(scores.values()))))
    return {
        "task": task,
        "k": 10,
        "seeds": list(seeds),
        "lineage": "independent",
        "seconds": 12.0,
        "per_seed": [
            {
                "seed": s,
                "records": {
                    m: {"val": {"macro_f1": v[s][0]}, "test": {"macro_f1": v[s][1]}} for m, v in scores.items()
                },
            }
            for s in seeds
        ],
    }


def test_room_is_against_the_source_better_on_validation(tmp_path):
    # B is better on validation (mean 0.51 vs 0.50) but worse on test: the room is taken against B on both splits
    run = _run(
        "brain_colin_split_function",
        {
            "lpft_a": [(0.50, 0.40), (0.50, 0.42)],
            "lpft_b": [(0.52, 0.30), (0.50, 0.32)],
            "ensemble_lpft": [(0.55, 0.41), (0.51, 0.33)],
        },
    )
    (tmp_path / "x.json").write_text(json.dumps(run))
    (row,) = room_search.screen_rows(tmp_path)
    assert row["best"] == "lpft_b" and row["validation"] == "blocks"
    assert row["room_val"]["per_seed"] == [3.0, 1.0] and row["room_val"]["mean"] == pytest.approx(2.0)
    assert row["room_test"]["per_seed"] == [11.0, 1.0] and row["room_test"]["mean"] == pytest.approx(6.0)
    table = room_search.screen_table(tmp_path)
    assert "| `brain_colin_split_function` | 10 | 2 | blocks |" in table and "**+2.0 (+3.0, +1.0)**" in table


def test_pool_validation_and_a_missing_row_named(tmp_path):
    good = _run("brain_views_function", {m: [(0.5, 0.4)] for m in room_search.HEAD_FIRST})
    (tmp_path / "a.json").write_text(json.dumps(good))
    assert room_search.screen_rows(tmp_path)[0]["validation"] == "pool"
    bad = _run("brain", {"lpft_a": [(0.5, 0.4)], "lpft_b": [(0.5, 0.4)]})
    (tmp_path / "b.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"b\.json has no ensemble_lpft row"):
        room_search.screen_rows(tmp_path)


def test_docs_show_the_recorded_screen():
    """docs/data.md's screen table is the one the recorded files give (no hand-edited number)."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "data.md").read_text()
    assert room_search.screen_table() in docs

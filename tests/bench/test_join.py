"""Joining runs of one comparison on disjoint seeds (``medmerge benchmark --first-seed``, then
``python -m medmerge_bench.comparison join``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medmerge_bench.comparison import join_reports, main

RECORDED = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "fashion_k5_rotation_ab_ft150_seeds10.json"


def _part(report: dict, seeds: list[int], code: str) -> dict:
    """``report`` as a run of only ``seeds`` would have written it (its summary left stale: join recomputes it)."""
    part = json.loads(json.dumps(report))
    part["seeds"] = seeds
    part["per_seed"] = [r for r in part["per_seed"] if r["seed"] in seeds]
    part["machine"]["code"] = code
    return part


def test_joined_halves_give_the_summary_of_the_whole_run(tmp_path):
    recorded = json.loads(RECORDED.read_text())
    paths = []
    for name, seeds, code in (("late", [5, 6, 7, 8, 9], "bbb"), ("early", [0, 1, 2, 3, 4], "aaa")):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(_part(recorded, seeds, code)))
        paths.append(path)
    joined = join_reports(paths, tmp_path / "out", "joined")
    assert joined["seeds"] == list(range(10))
    whole = recorded["summary"]
    assert joined["summary"]["methods"] == whole["methods"]  # every value, in seed order
    assert joined["summary"]["room"] == whole["room"] and joined["summary"]["best_single_source"] == "ft_b"
    assert joined["machine"]["code"] == ["aaa", "bbb"]
    assert [p["file"] for p in joined["joined_from"]] == ["late.json", "early.json"]
    assert joined["coefficients_seed0"] == recorded["coefficients_seed0"]
    on_disk = json.loads((tmp_path / "out" / "joined.json").read_text())
    assert on_disk["summary"] == joined["summary"] and on_disk["pictures"]
    rows = (tmp_path / "out" / "joined_per_seed.csv").read_text().splitlines()
    assert len(rows) == 1 + 10 * len(recorded["per_seed"][0]["records"]) * 2


def test_runs_that_are_not_one_comparison_are_refused(tmp_path, capsys):
    recorded = json.loads(RECORDED.read_text())

    def write(name: str, part: dict) -> Path:
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(part))
        return path

    a = write("a", _part(recorded, [0, 1], "x"))
    with pytest.raises(ValueError, match="share seeds"):
        join_reports([a, write("b", _part(recorded, [1, 2], "x"))], tmp_path, "j")
    other = _part(recorded, [3], "x")
    other["recipe"]["ft_epochs"] = 30
    with pytest.raises(ValueError, match=r"c\.json and .*a\.json differ in 'recipe' \(recipe\.ft_epochs: 30 vs "):
        join_reports([a, write("c", other)], tmp_path, "j")
    elsewhere = _part(recorded, [3], "x")
    elsewhere["machine"]["cpu"] = "another"
    with pytest.raises(ValueError, match=r"different machines or versions \(machine\.cpu: 'another' vs "):
        join_reports([a, write("d", elsewhere)], tmp_path, "j")
    with pytest.raises(ValueError, match="at least two"):
        join_reports([a], tmp_path, "j")
    with pytest.raises(SystemExit):
        main(["join", str(a), str(write("e", {"benchmark": "segmentation"})), "--name", "j"])
    assert "is not a result file of `medmerge benchmark`" in capsys.readouterr().err
    assert not (tmp_path / "j.json").exists()


def test_sources_pretrained_again_join_those_found_in_the_cache(tmp_path):
    """A part whose sources were pretrained again (same key, same scores) joins; other source scores do not."""
    recorded = json.loads(RECORDED.read_text())
    cached, fresh = _part(recorded, [0, 1], "x"), _part(recorded, [2], "y")
    for source in fresh["sources"]["sources"].values():
        source["cached"] = not source["cached"]
    paths = [tmp_path / "cached.json", tmp_path / "fresh.json"]
    for path, part in zip(paths, (cached, fresh), strict=True):
        path.write_text(json.dumps(part))
    assert join_reports(paths, tmp_path / "out", "joined")["seeds"] == [0, 1, 2]
    other = _part(recorded, [3], "z")
    tag, source = next(iter(other["sources"]["sources"].items()))
    source["val"]["macro_f1"] = -1.0
    paths.append(tmp_path / "other.json")
    paths[-1].write_text(json.dumps(other))
    named = rf"differ in 'sources' \(sources\.sources\.{tag}\.val\.macro_f1: -1\.0 vs .*pretrained again"
    with pytest.raises(ValueError, match=r"other\.json and .*cached\.json " + named):
        join_reports(paths, tmp_path / "out", "joined")

"""benchmarks/report.py: the room table takes segmentation results beside the transfer ones, and the width section
and figure pair each task's results at different widths, with the numbers of the result files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import report  # noqa: E402


def _paired(differences: list[float]) -> dict:
    return {"differences": differences, "mean_difference": sum(differences) / len(differences), "t_test_p": 0.5}


def _scores(test: list[float], val: list[float] | None = None) -> dict:
    """A method's per-seed test and validation macro-F1 (validation: the test scores unless given)."""
    val = test if val is None else val
    return {"val_macro_f1": {"mean": sum(val) / len(val), "values": val}, "test_macro_f1": {"values": test}}


def _result(benchmark: str, widths: list[int], lineage: str, room: list[float], gain: list[float]) -> dict:
    recipe = {"widths": widths} if benchmark == "transfer" else {"channels": widths}
    methods = {m: m for m in ("ft_a", "ft_b", "medmerge_ft", "paper_medmerge_ft", "ensemble")}
    return {
        "benchmark": benchmark,
        "task": "fashion" if benchmark == "transfer" else "brain MRI segmentation",
        "k": 10,
        "lineage": lineage,
        "pair": "ab",
        "recipe": recipe,
        "seeds": [0, 1],
        "methods": methods,
        "summary": {
            "methods": dict.fromkeys(methods, {}),
            "best_single_source": "ft_b",
            "room": _paired(room),
            "vs_best_single_source": {"medmerge_ft": _paired(gain), "paper_medmerge_ft": _paired([0.0, 0.02])},
            # a stale recorded share: the report takes the share from the gain and the room, not from here
            "chosen_medmerge": {"method": "medmerge_ft", **_paired(gain), "share_of_room": 0.123},
        },
    }


RESULTS = [
    ("fashion_k10_narrow", _result("transfer", [16, 32, 64, 128], "independent", [0.02, 0.04], [0.01, 0.01])),
    ("fashion_k10_wide", _result("transfer", [64, 128, 256, 512], "independent", [0.05, 0.07], [0.03, 0.05])),
    ("fashion_k10_shared", _result("transfer", [16, 32, 64, 128], "shared", [0.03, 0.03], [0.0, 0.01])),
]


def test_width_section_pairs_the_widths_of_one_task_and_lineage(tmp_path):
    pictures = report.plot_width(RESULTS, tmp_path)
    assert pictures == ["width_fashion_k10.png"]
    assert (tmp_path / pictures[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = report.width_section(RESULTS, pictures)
    rows = [line for line in text.splitlines() if line.startswith("| fashion, 10")]
    # the shared lineage has one width only: no row; the independent rows in order of width, with their numbers
    assert [row.split(" | ")[3] for row in rows] == ["`fashion_k10_narrow`", "`fashion_k10_wide`"]
    # the gain table's columns: room, head-first room (not run), the two recipes with their share of the room
    assert "| 64-512 | `fashion_k10_wide` | 2 | +6.0 (0.5) | - | +4.0 (0.5), 67% | +1.0 (0.5), 17% | - | - |" in rows[1]
    assert "width_fashion_k10.png" in text


def test_width_figure_and_table_follow_the_protocol_and_its_head_first_rows(tmp_path):
    """Runs with a longer budget are compared across widths among themselves, with the rows they ran (the distilled
    recipe over the LP-FT pair against the better LP-FT network), in a panel of their own in the task's figure."""

    runs = []
    for stem, widths, distilled in (
        ("long_narrow", [16, 32, 64, 128], [0.74, 0.78]),
        ("long_wide", [64, 128, 256, 512], [0.76, 0.80]),
    ):
        r = _result("transfer", widths, "independent", [0.03, 0.05], [0.01, 0.01])
        r["recipe"] |= {"ft_epochs": 150, "patience": 40}
        r["methods"].update(lpft_a="lpft a", lpft_b="lpft b", ensemble_lpft="e", paper_lpft_medmerge_distill="d")
        r["summary"]["methods"].update(
            lpft_a=_scores([0.60, 0.60]), lpft_b=_scores([0.70, 0.72]), paper_lpft_medmerge_distill=_scores(distilled)
        )
        r["summary"]["room_head_first"] = {"baseline": "lpft_b", **_paired([0.05, 0.06])}
        runs.append((f"fashion_k10_{stem}", r))
    text = report.width_section([*RESULTS, *runs], [])
    rows = {line.split(" | ")[3]: line.split(" | ") for line in text.splitlines() if line.startswith("| fashion, 10")}
    assert set(rows) == {
        "`fashion_k10_narrow`",
        "`fashion_k10_wide`",
        "`fashion_k10_long_narrow`",
        "`fashion_k10_long_wide`",
    }
    # over lpft_b: +4 and +6 at 16-128, +6 and +8 at 64-512 (paired t-test, one degree of freedom), each its
    # share of the 5.5-point head-first room
    assert rows["`fashion_k10_long_narrow`"][9] == "+5.0 (0.13), 91%"
    assert rows["`fashion_k10_long_wide`"][9] == "+7.0 (0.09), 127%"
    # one figure for the task, a panel per protocol
    assert report.plot_width([*RESULTS, *runs], tmp_path) == ["width_fashion_k10.png"]
    # alone at one width the longer runs have nothing to compare: they leave the section
    assert "long" not in report.width_section([*RESULTS, runs[0]], [])
    assert report.width_section(RESULTS[:1], []) == ""


def test_room_table_lists_segmentation_with_its_metric():
    segmentation = ("segmentation_k2", _result("segmentation", [16, 32, 64, 128], "shared", [0.02, 0.04], [0.05, 0.03]))
    segmentation[1]["summary"]["paper_medmerge_ft_vs_ft_longer"] = _paired([0.01, -0.03])
    text = report.room_section([RESULTS[0], segmentation], None)
    row = next(line for line in text.splitlines() if "`segmentation_k2`" in line)
    assert "| mean Dice | shared | [16, 32, 64, 128] | 2 | +3.0 (p 0.5) | medmerge_ft | +4.0 (p 0.5) | 133% |" in row
    assert row.endswith(
        "| 133% | paper's recipe -1.0 (p 0.5) vs `ft_longer` |"
    )  # the paper's recipe against its equal-budget control
    assert "| macro-F1 | independent |" in next(line for line in text.splitlines() if "fashion_k10_narrow" in line)
    # an older segmentation file without the recorded control: computed from its per-seed Dice
    del segmentation[1]["summary"]["paper_medmerge_ft_vs_ft_longer"]
    segmentation[1]["summary"]["methods"] |= {
        "paper_medmerge_ft": {"val_mean_dice": {"mean": 0.5}, "test_mean_dice": {"values": [0.60, 0.50]}},
        "ft_longer": {"val_mean_dice": {"mean": 0.4}, "test_mean_dice": {"values": [0.55, 0.49]}},
    }
    row = next(line for line in report.room_section([segmentation], None).splitlines() if "`segmentation_k2`" in line)
    assert row.endswith("| 133% | paper's recipe +3.0 (p 0.37) vs `ft_longer` |"), row  # differences 0.05, 0.01


def test_room_table_sets_a_distilled_recipe_against_fine_tuning_for_the_same_steps():
    """A recipe trained with ``distill_steps`` is shown against ``ft_steps`` (computed from the per-seed values), so
    that its gain over the default-budget best source is not read as the merge's."""
    stem, r = "fashion_k10_steps", _result("transfer", [16, 32, 64, 128], "independent", [0.02, 0.04], [0.03, 0.01])

    r["recipe"]["distill_steps"] = 20
    r["methods"].update(paper_medmerge_distill="distilled", ft_steps="same steps")
    r["summary"]["methods"].update(
        paper_medmerge_distill=_scores([0.75, 0.71], val=[0.8, 0.8]), ft_steps=_scores([0.74, 0.68], val=[0.7, 0.7])
    )
    r["summary"]["chosen_medmerge"] = {"method": "paper_medmerge_distill", **_paired([0.03, 0.01])}
    row = next(line for line in report.room_section([(stem, r)], None).splitlines() if stem in line)
    assert "| distilled | +2.0 (p 0.5) |" in row
    last = row.rsplit("|", 2)[1].strip()
    # (0.75 - 0.74 + 0.71 - 0.68) / 2 = 2 points over the same steps without a merge, with its paired p
    assert last.startswith("distilled +2.0 (p ") and last.endswith(") vs `ft_steps`"), last
    # a recipe over the LP-FT pair is set against the head-first fine-tuning of as many steps
    r["methods"].update(paper_lpft_medmerge_distill="distilled, head first", lpft_steps="same steps, head first")
    r["summary"]["methods"].update(
        paper_lpft_medmerge_distill=_scores([0.75, 0.71], val=[0.8, 0.8]),
        lpft_steps=_scores([0.76, 0.70], val=[0.7, 0.7]),
    )
    r["summary"]["chosen_medmerge"] = {"method": "paper_lpft_medmerge_distill", **_paired([0.03, 0.01])}
    row = next(line for line in report.room_section([(stem, r)], None).splitlines() if stem in line)
    last = row.rsplit("|", 2)[1].strip()
    assert last.startswith("distilled, head first +0.0 (p ") and last.endswith(") vs `lpft_steps`"), last
    r["recipe"]["distill_steps"] = 0
    row = next(line for line in report.room_section([(stem, r)], None).splitlines() if stem in line)
    assert row.endswith("| - |")


def test_width_comparison_leaves_out_results_with_another_training_budget(tmp_path):
    """A run with longer fine-tuning at one width would stand in for that width's default-budget run otherwise."""
    longer = _result("transfer", [16, 32, 64, 128], "independent", [0.5, 0.5], [0.5, 0.5])
    longer["recipe"]["ft_epochs"] = 150
    longer["written"] = "9999"  # the most recent: it would win the figure's "latest result" choice
    text = report.width_section([*RESULTS, ("fashion_k10_longer", longer)], [])
    assert "fashion_k10_longer" not in text and "`fashion_k10_narrow`" in text


def test_room_table_names_the_ancestor_and_the_paper_recipes_control():
    """A shared lineage with the self-supervised ancestor is told apart from the default one, and a classification
    result's paper-recipe control (``ft_longer``) fills the control column."""
    default = _result("transfer", [16, 32, 64, 128], "shared", [0.03, 0.03], [0.0, 0.01])
    rotation = _result("transfer", [16, 32, 64, 128], "shared", [0.03, 0.03], [0.0, 0.01])
    rotation["recipe"]["ancestor"] = "rotation"
    rotation["summary"]["paper_medmerge_ft_vs_ft_longer"] = _paired([-0.01, 0.03]) | {"baseline": "ft_longer"}
    rotation["summary"]["medmerge_ft_vs_lpft"] = _paired([0.02, 0.04]) | {"baseline": "lpft_b"}
    table = report.room_section([("default", default), ("rotation", rotation)], None)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| `")}
    assert "| shared |" in rows["`default`"] and "| shared, rotation ancestor |" in rows["`rotation`"]
    assert rows["`default`"].endswith("| - |")
    assert rows["`rotation`"].endswith(
        "| paper's recipe +1.0 (p 0.5) vs `ft_longer`; MedMerge + FT +3.0 (p 0.5) vs `lpft_b` |"
    )
    # a file written before summaries held the direct recipe's control: computed from its per-seed scores
    del rotation["summary"]["medmerge_ft_vs_lpft"]
    rotation["summary"]["methods"] |= {
        "medmerge_ft": {"val_macro_f1": {"mean": 0.8}, "test_macro_f1": {"values": [0.80, 0.76]}},
        "lpft_b": {"val_macro_f1": {"mean": 0.7}, "test_macro_f1": {"values": [0.77, 0.75]}},
    }
    row = next(
        line for line in report.room_section([("rotation", rotation)], None).splitlines() if "`rotation`" in line
    )
    assert row.endswith("; MedMerge + FT +2.0 (p 0.3) vs `lpft_b` |"), row  # differences 0.03, 0.01


def test_room_table_adds_the_room_left_after_head_first_fine_tuning():
    """A result with the ensemble of the LP-FT rows shows that room beside the plain one; others show only theirs."""
    plain = _result("transfer", [16, 32, 64, 128], "shared", [0.03, 0.03], [0.0, 0.01])
    head_first = _result("transfer", [16, 32, 64, 128], "shared", [0.03, 0.03], [0.0, 0.01])
    head_first["summary"]["room_head_first"] = _paired([0.01, -0.03]) | {"baseline": "lpft_b"}
    table = report.room_section([("plain", plain), ("head_first", head_first)], None)
    rows = {line.split("|")[1].strip(): line.split("|")[7].strip() for line in table.splitlines() if "| `" in line}
    assert rows == {"`plain`": "+3.0 (p 0.5)", "`head_first`": "+3.0 (p 0.5); head first -1.0 (p 0.5)"}
    # a chosen recipe over the LP-FT pair is set against the better LP-FT row
    head_first["methods"]["paper_lpft_medmerge_ft"] = "merge of the LP-FT pair"
    head_first["summary"]["chosen_medmerge"] = {"method": "paper_lpft_medmerge_ft", **_paired([0.02, 0.04])}
    head_first["summary"]["vs_best_head_first"] = {
        "paper_lpft_medmerge_ft": _paired([0.01, 0.0]) | {"baseline": "lpft_b"}
    }
    row = next(line for line in report.room_section([("head_first", head_first)], None).splitlines() if "| `" in line)
    assert row.endswith("| merge of the LP-FT pair +0.5 (p 0.5) vs `lpft_b` |"), row
    # its share of the head-first room: its gain over the LP-FT row over that room (negative room: no share)
    assert "head first" not in row.split("|")[10]
    head_first["summary"]["room_head_first"] = _paired([0.01, 0.03]) | {"baseline": "lpft_b"}
    head_first["summary"]["chosen_medmerge"]["share_of_room"] = 1.0
    row = next(line for line in report.room_section([("head_first", head_first)], None).splitlines() if "| `" in line)
    assert row.split("|")[10].strip() == "100%; head first 25%", row  # 0.5 of a 2.0-point head-first room


def test_gain_table_sets_lineages_widths_and_recipes_of_one_protocol_side_by_side(tmp_path):
    """The gain table groups the runs of one task and protocol, gives each recipe its share of the room of its own
    baseline (the head-first rows of the LP-FT room), and leaves out tasks without room or with one setting."""

    wide = _result("transfer", [64, 128, 256, 512], "shared", [0.03, 0.05], [0.01, 0.01])
    wide["recipe"]["ancestor"] = "rotation"
    wide["methods"].update(lpft_a="lpft a", lpft_b="lpft b", ensemble_lpft="e", paper_lpft_medmerge_distill="d")
    wide["summary"]["methods"].update(
        lpft_a=_scores([0.60, 0.60]), lpft_b=_scores([0.70, 0.72]), paper_lpft_medmerge_distill=_scores([0.73, 0.76])
    )
    wide["summary"]["room_head_first"] = {"baseline": "lpft_b", **_paired([0.05, 0.06])}
    rows = [("fashion_k10_narrow", RESULTS[0][1]), ("fashion_k10_wide_distill", wide)]
    text = report.gain_section(rows, "gain.png")
    lines = [line for line in text.splitlines() if line.startswith("| fashion, 10")]
    assert [line.split(" | ")[3] for line in lines] == ["`fashion_k10_narrow`", "`fashion_k10_wide_distill`"]
    # narrow: room +3.0, MedMerge + FT +1.0 = 33 %, paper's recipe +1.0 = 33 %, no head-first rows
    assert lines[0].endswith("| 2 | +3.0 (0.5) | - | +1.0 (0.5), 33% | +1.0 (0.5), 33% | - | - |"), lines[0]
    # wide: the distilled recipe over the better LP-FT row (lpft_b): +3 and +4 points, 64 % of the head-first
    # room (5.5 points; 88 % of the plain room would be wrong)
    cells = lines[1].split(" | ")
    assert cells[1] == "shared, rotation ancestor" and cells[2] == "64-512"
    assert cells[5:8] == ["+4.0 (0.5)", "+5.5 (0.5)", "+1.0 (0.5), 25%"]
    assert cells[9].startswith("+3.5 (") and cells[9].endswith(", 64%") and cells[10] == "- |"
    assert "![gain.png]" in text
    picture = report.plot_gain(rows, tmp_path / "gain.png")
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # another protocol is another group: alone in it, the wide run has nothing beside it
    wide["recipe"]["ft_epochs"] = 150
    assert report.gain_section(rows, None) == "" and report.plot_gain(rows, tmp_path / "none.png") is None
    # no run with 3 points of room: no table
    wide["recipe"]["ft_epochs"] = 30
    for _, r in rows:
        r["summary"]["room"] = _paired([0.01, 0.01])
    wide["summary"]["room_head_first"] = {"baseline": "lpft_b", **_paired([0.02, 0.02])}
    assert report.gain_section(rows, None) == ""


def test_no_share_of_a_room_under_one_point():
    """A gain over a room near zero is no share of it: the table shows a dash, not thousands of per cent."""
    from medmerge_bench.transfer import SHARE_MIN_ROOM, share_of_room

    assert share_of_room(0.02, 0.04) == 0.5 and share_of_room(0.025, 0.001) is None
    assert share_of_room(0.01, -0.02) is None and share_of_room(0.01, SHARE_MIN_ROOM) == 1.0
    tiny = ("fashion_k10_tiny", _result("transfer", [16, 32, 64, 128], "independent", [0.0, 0.002], [0.02, 0.03]))
    row = next(line for line in report.room_section([tiny], None).splitlines() if "fashion_k10_tiny" in line)
    assert "| +0.1 (p 0.5) | medmerge_ft | +2.5 (p 0.5) | - |" in row, row

"""The segmentation benchmark end to end on a tiny configuration (one seed, one epoch per phase, a narrow UNet): the
result file holds what the report reads, every method's Dice lies in [0, 1] per structure, and the paired numbers
are the per-seed differences of the recorded scores."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from medmerge_bench.data import brain, fashion, segmentation

INSTALLED = all((brain.MRICRON_DIR / name).is_file() for name in segmentation.FILES)
HAS_NILEARN = importlib.util.find_spec("nilearn") is not None
pytestmark = pytest.mark.skipif(
    not (INSTALLED and HAS_NILEARN),
    reason=f"the MRIcron templates are not installed: {brain.INSTALL_MRICRON}"
    if not INSTALLED
    else f"nilearn is not installed: {brain.INSTALL_NILEARN}",
)
pytest.importorskip("matplotlib")

from medmerge_bench.segmentation import (  # noqa: E402
    SEGMENTATION_METHODS,
    SegRecipe,
    dice_scores,
    pretrain_sources,
    run_segmentation,
)
from monai_medmerge.networks import find_head  # noqa: E402
from monai_medmerge.workflows.recipes import example_input  # noqa: E402

TINY = SegRecipe(
    channels=(4, 8, 16),
    strides=(2, 2),
    num_res_units=1,
    source_epochs=1,
    coef_epochs=1,
    ft_epochs=1,
    patience=None,
)
STRUCTURES = list(segmentation.STRUCTURE_CLASSES[1:])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("segmentation")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MONAI_MEDMERGE_CACHE", str(out / "cache"))  # never the user's cache of real sources
        torch.set_num_threads(1)
        try:
            report = run_segmentation(2, [0], out, TINY, log=lambda message: None)
        finally:
            torch.set_num_threads(threads)
    return report, out


def test_result_file_holds_what_the_report_reads(run):
    report, out = run
    written = json.loads((out / "segmentation_k2.json").read_text())
    assert written["benchmark"] == "segmentation" and written["k"] == 2 and written["seeds"] == [0]
    assert written["recipe"]["channels"] == [4, 8, 16] and written["recipe"]["ft_epochs"] == 1
    assert {"machine", "seconds", "written", "sources", "data", "per_seed", "summary"} <= set(written)
    assert written["machine"]["torch_threads"] == 1 and "code" in written["machine"]
    assert written["data"]["target"]["classes"] == list(segmentation.STRUCTURE_CLASSES)
    assert set(written["sources"]["sources"]) == {"a", "b"}
    assert written["per_seed"][0]["anchor"] in ("a", "b")
    assert written["pictures"] == ["segmentation_k2_slice.png", "segmentation_k2_dice.png"]
    for name in written["pictures"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = written["summary"]
    assert set(SEGMENTATION_METHODS) <= set(summary["methods"])
    assert summary["best_single_source"] in ("ft_a", "ft_b")
    assert {
        "room",
        "vs_best_single_source",
        "chosen_medmerge",
        "paper_medmerge_ft_vs_ft_longer",
        "medmerge_ft_vs_ft_head_first",
    } <= set(summary)


def test_every_method_and_the_ensemble_scores_dice_in_unit_range_per_structure(run):
    report, _ = run
    records = report["per_seed"][0]["records"]
    assert set(SEGMENTATION_METHODS) | {"medmerge"} == set(records)
    for name, rec in records.items():
        for split in ("val", "test"):
            assert 0.0 <= rec[split]["mean_dice"] <= 1.0, (name, split)
        assert list(rec["test"]["dice"]) == STRUCTURES
        for structure, value in rec["test"]["dice"].items():
            assert value is not None and 0.0 <= value <= 1.0, (name, structure)
        assert 0.0 <= report["summary"]["methods"][name][f"test_dice_{STRUCTURES[0]}"]["mean"] <= 1.0


def test_paired_numbers_are_the_recorded_differences(run):
    report, _ = run
    summary, records = report["summary"], report["per_seed"][0]["records"]
    best = summary["best_single_source"]
    assert best == max(("ft_a", "ft_b"), key=lambda m: records[m]["val"]["mean_dice"])
    room = records["ensemble"]["test"]["mean_dice"] - records[best]["test"]["mean_dice"]
    assert summary["room"]["differences"] == pytest.approx([room])
    gain = records["medmerge_ft"]["test"]["mean_dice"] - records[best]["test"]["mean_dice"]
    assert summary["vs_best_single_source"]["medmerge_ft"]["mean_difference"] == pytest.approx(gain)
    schedule = records["medmerge_ft"]["test"]["mean_dice"] - records["ft_head_first"]["test"]["mean_dice"]
    assert summary["medmerge_ft_vs_ft_head_first"]["differences"] == pytest.approx([schedule])


def test_dice_of_the_truth_is_one_and_absent_structures_do_not_count():
    labels = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    labels[0, 0, :4, :4] = 1
    labels[1, 0, 4:, 4:] = 2
    truth = torch.nn.functional.one_hot(labels[:, 0], 4).permute(0, 3, 1, 2).float()
    scores = dice_scores(truth, labels, ("background", "one", "two", "three"))
    assert scores == {"mean_dice": 1.0, "dice": {"one": 1.0, "two": 1.0, "three": None}}
    # half of structure one predicted as background: Dice 2 * 8 / (16 + 8)
    half = labels.clone()
    half[0, 0, :2, :4] = 0
    pred = torch.nn.functional.one_hot(half[:, 0], 4).permute(0, 3, 1, 2).float()
    scores = dice_scores(pred, labels, ("background", "one", "two", "three"))
    assert scores["dice"]["one"] == pytest.approx(2 / 3) and scores["mean_dice"] == pytest.approx(np.mean([2 / 3, 1]))


FASHION_INSTALLED = (fashion.FASHION_DIR / fashion.FASHION_FILES["train_images"]).is_file()
needs_fashion = pytest.mark.skipif(not FASHION_INSTALLED, reason=f"Fashion-MNIST is missing: {fashion.INSTALL_FASHION}")


@needs_fashion
def test_ancestor_scenes_are_labelled_garments_on_the_slice_grid():
    task = segmentation.load_segmentation_ancestor_task()
    assert task.name == "fashion-seg/garments" and task.test is None
    assert task.class_names == ("background", *fashion.CLASS_NAMES)
    for split, count in segmentation.ANCESTOR_SCENES.items():
        x, y = task.splits()[split].images, task.splits()[split].labels
        assert x.shape == y.shape == (count, 1, *segmentation.GRID_SHAPE[:2])
        assert x.dtype == np.float32 and y.dtype == np.int64
        # a pixel is labelled exactly where a garment is brighter than the threshold
        assert np.array_equal(y > 0, x > segmentation.ANCESTOR_THRESHOLD)
        assert 0 <= y.min() and y.max() <= 10 and len(np.unique(y)) == 11
        assert ((y > 0).reshape(count, -1).any(1)).all()  # every scene shows a garment
    again = segmentation.load_segmentation_ancestor_task()
    assert np.array_equal(again.train.images, task.train.images) and np.array_equal(again.val.labels, task.val.labels)


def test_recipe_refuses_an_unknown_lineage_or_an_ancestor_pair_without_one():
    with pytest.raises(ValueError, match="lineage must be one of"):
        SegRecipe(lineage="cousins")
    with pytest.raises(ValueError, match="needs lineage='shared'"):
        SegRecipe(pair="ancestor_b")
    assert SegRecipe().source_key("v") != SegRecipe(lineage="shared").source_key("v")
    assert SegRecipe(lineage="shared").source_key("v") != SegRecipe(lineage="shared", ancestor_epochs=2).source_key("v")


@needs_fashion
def test_shared_lineage_fine_tunes_both_sources_from_one_ancestor(tmp_path, monkeypatch):
    monkeypatch.setenv("MONAI_MEDMERGE_CACHE", str(tmp_path / "cache"))
    recipe = SegRecipe(**{**TINY.__dict__, "lineage": "shared", "ancestor_epochs": 1, "source_lr": 0.0})
    tasks = segmentation.load_segmentation_tasks(k=2, seed=0, progress=False)
    (a, b), info = pretrain_sources(tasks, recipe, log=lambda message: None)
    assert info["lineage"] == "shared" and set(info["sources"]) == {"ancestor", "a", "b"}
    assert info["sources"]["a"]["from"] == info["sources"]["b"]["from"] == "ancestor"
    # with a zero learning rate the sources' bodies are the ancestor's: one starting point, new heads
    head = find_head(a, example_input(tasks.target.train.images.shape[2:], 1))
    body_a = {k: v for k, v in a.state_dict().items() if not k.startswith(head + ".")}
    body_b = {k: v for k, v in b.state_dict().items() if not k.startswith(head + ".")}
    assert body_a and all(torch.equal(v, body_b[k]) for k, v in body_a.items() if "running" not in k)
    (a2, b2), again = pretrain_sources(tasks, recipe, log=lambda message: None)
    assert all(m["cached"] for m in again["sources"].values())
    pair = SegRecipe(**{**recipe.__dict__, "pair": "ancestor_b"})
    (ancestor, b3), named = pretrain_sources(tasks, pair, log=lambda message: None)
    assert named["names"][0] == "ancestor (fashion-seg/garments)"
    example = example_input(tasks.target.train.images.shape[2:], 1)
    with torch.no_grad():
        assert ancestor(example).shape[1] == len(segmentation.ANCESTOR_CLASSES) and b3(example).shape[1] == 7

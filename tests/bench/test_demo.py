"""The demo's words and its recorded benchmark: what the reading says about one seed, and which recorded file it
quotes (never a copied number)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from medmerge_bench.demo import (
    DEMO_K,
    DEMO_METHODS,
    DEMO_RECIPE,
    DEMO_TASK,
    MERGED,
    RESULTS,
    _bundle_command,
    _reading,
    recorded_benchmark,
)
from medmerge_bench.transfer import METHOD_LABELS

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "medmerge_classification"
# test macro-F1 and validation macro-F1 of one seed: LP-FT from B validates better, the ensemble leads it by 4 points
F1 = {"lpft_a": (0.25, 0.26), "lpft_b": (0.27, 0.30), MERGED: (0.30, 0.33), "ensemble_lpft": (0.31, 0.32)}


def _report(f1: dict = F1) -> dict:
    return {
        "seeds": [0],
        "methods": {m: METHOD_LABELS[m] for m in f1},
        "summary": {
            "methods": {m: {"test_macro_f1": {"mean": t}, "val_macro_f1": {"mean": v}} for m, (t, v) in f1.items()},
            "best_single_source_head_first": max(("lpft_a", "lpft_b"), key=lambda m: f1[m][1]),
        },
    }


def _recorded(seeds=5, **recipe) -> dict:
    used = dataclasses.asdict(DEMO_RECIPE) | recipe
    diffs = [0.02, 0.05, 0.03, 0.04, 0.06][:seeds]
    return {
        "benchmark": "transfer",
        "task": DEMO_TASK,
        "k": DEMO_K,
        "seeds": list(range(seeds)),
        "lineage": used["lineage"],
        "recipe": used,
        "methods": {m: METHOD_LABELS[m] for m in DEMO_METHODS},
        "summary": {
            "room_head_first": {"mean_difference": 0.043, "t_test_p": 0.02, "baseline": "lpft_b"},
            "vs_best_head_first": {
                MERGED: {
                    "mean_difference": sum(diffs) / seeds,
                    "t_test_p": 0.0004,
                    "differences": diffs,
                    "baseline": "lpft_b",
                }
            },
        },
    }


def test_reading_states_the_gain_the_room_and_the_share_taken():
    text = _reading(_report())
    assert "one seed, no spread" in text
    # 0.30 against 0.27: B validated better (0.30 against 0.26)
    assert f"is 3.0 points above {METHOD_LABELS['lpft_b']}, the better source on validation" in text
    assert f"is 4.0 points above {METHOD_LABELS['lpft_b']}. The merged network took 75% of it" in text
    assert "No recorded benchmark of this task" in text and "docs/benchmarks.md" in text


def test_reading_says_when_there_is_no_room():
    f1 = F1 | {"ensemble_lpft": (0.26, 0.29)}
    text = _reading(_report(f1))
    assert f"is 1.0 points below {METHOD_LABELS['lpft_b']}. Here there was nothing for a merge to take" in text
    assert "took" not in text


def test_reading_quotes_the_recorded_file_with_its_seeds_and_spread():
    text = _reading(_report(), ("demo_run.json", _recorded()))
    assert "Recorded over 5 seeds (benchmarks/results/demo_run.json): the room +4.3 points (paired t p 0.02)" in text
    assert f"the merged network +4.0 over {METHOD_LABELS['lpft_b']} (p 0.0004; per seed +2.0 to +6.0)" in text


def test_recorded_benchmark_matches_task_k_and_budget_and_prefers_more_seeds(tmp_path):
    def write(name, r):
        (tmp_path / name).write_text(json.dumps(r))

    assert recorded_benchmark(DEMO_TASK, DEMO_K, DEMO_RECIPE, tmp_path) is None
    assert recorded_benchmark(DEMO_TASK, DEMO_K, DEMO_RECIPE, tmp_path / "absent") is None
    write("a_longer_budget.json", _recorded(ft_epochs=DEMO_RECIPE.ft_epochs + 1))
    write("b_shared.json", _recorded(lineage="shared"))
    write("c_other_k.json", _recorded() | {"k": DEMO_K + 1})
    write("d_not_json.json", "{")
    (tmp_path / "e_broken.json").write_text("{")
    assert recorded_benchmark(DEMO_TASK, DEMO_K, DEMO_RECIPE, tmp_path) is None
    write("f_three_seeds.json", _recorded(seeds=3))
    assert recorded_benchmark(DEMO_TASK, DEMO_K, DEMO_RECIPE, tmp_path)[0] == "f_three_seeds.json"
    write("g_five_seeds.json", _recorded(seeds=5))
    name, r = recorded_benchmark(DEMO_TASK, DEMO_K, DEMO_RECIPE, tmp_path)
    assert name == "g_five_seeds.json" and r["seeds"] == [0, 1, 2, 3, 4]


def test_the_demo_quotes_a_recorded_five_seed_benchmark_of_its_own_budget():
    if not RESULTS.is_dir():
        pytest.skip("run from a checkout: the recorded results are not installed with the package")
    found = recorded_benchmark(DEMO_TASK, DEMO_K, DEMO_RECIPE)
    assert found is not None, f"no recorded benchmark of {DEMO_TASK} k={DEMO_K} at the demo's budget in {RESULTS}"
    name, r = found
    assert len(r["seeds"]) >= 5 and set(DEMO_METHODS) <= set(r["methods"]), name


def test_bundle_command_carries_the_recipe_into_the_bundle_options():
    command = _bundle_command(dataclasses.asdict(DEMO_RECIPE))
    words = command.replace("\\\n", " ").split()
    options = dict(zip(words[7::2], words[8::2], strict=True))
    assert words[:7] == ["python", "-m", "monai.bundle", "run", "paper", "--config_file", "configs/train.yaml"]
    # every option is a setting of the training bundle
    train = yaml.safe_load((BUNDLE / "configs" / "train.yaml").read_text())
    assert {o.removeprefix("--") for o in options} <= set(train), sorted(set(options) - set(train))
    assert "paper" in train
    assert options["--recipe"] == "paper" and options["--unlabeled_section"] == "unlabeled"
    assert options["--phase0_epochs"] == options["--phase2_epochs"] == str(DEMO_RECIPE.ft_epochs)
    assert options["--phase0_head_epochs"] == str(DEMO_RECIPE.lp_epochs)
    assert options["--phase2_steps_per_epoch"] == str(DEMO_RECIPE.distill_steps)
    assert all(len(line) <= 104 for line in command.splitlines())

from __future__ import annotations

import json

import pytest
import torch
from monai.networks.nets import ResNet

from monai_medmerge.cli import main


def test_quickstart_runs_end_to_end(tmp_path, capsys):
    assert main(["quickstart", "--out", str(tmp_path), "--no-progress"]) == 0
    report = json.loads((tmp_path / "results.json").read_text())
    methods = set(report["test"])
    assert methods == {
        "fine-tune from count",
        "fine-tune from size",
        "MedMerge (collapsed, no fine-tuning)",
        "MedMerge + fine-tuning",
    }
    # four balanced classes: chance is 0.25; every fine-tuned model must be well above it
    for name in methods - {"MedMerge (collapsed, no fine-tuning)"}:
        assert report["test"][name]["macro_f1"] > 0.5, (name, report["test"][name])
    assert 0.0 <= report["test"]["MedMerge (collapsed, no fine-tuning)"]["macro_f1"] <= 1.0
    # the saved model is a plain MONAI network's state dict, readable without unpickling code
    state = torch.load(tmp_path / "merged_model.pt", weights_only=True)
    from medmerge_bench.quickstart import WIDTHS

    net = ResNet("basic", [1, 1, 1, 1], WIDTHS, spatial_dims=2, n_input_channels=1, num_classes=4)
    net.load_state_dict(state)  # strict: every key matches
    assert "MedMerge + fine-tuning" in capsys.readouterr().out


def test_methods_command_lists_registry(capsys):
    assert main(["methods"]) == 0
    names = [m["name"] for m in json.loads(capsys.readouterr().out)]
    assert names[:5] == ["average", "interpolate", "model", "layer", "kernel"]


def test_recipe_settings_from_the_command_line():
    from medmerge_bench.transfer import Recipe
    from monai_medmerge.cli import _with_settings

    r = _with_settings(Recipe(), ["anchor_weight=0.99", "coef_lr=0.05", "widths=8,16,16,32", "ft_epochs=3"])
    assert (r.anchor_weight, r.coef_lr, r.widths, r.ft_epochs) == (0.99, 0.05, (8, 16, 16, 32), 3)
    with pytest.raises(SystemExit, match="FIELD=VALUE"):
        _with_settings(Recipe(), ["anchor=1"])


def test_benchmark_first_seed_runs_the_seeds_from_it(monkeypatch):
    """``--first-seed 3 --seeds 2`` runs seeds 3 and 4 (the part to join with a recorded run of seeds 0-2)."""
    import medmerge_bench.comparison as comparison

    calls = []
    monkeypatch.setattr(comparison, "run_comparison", lambda task, k, seeds, out, **kw: calls.append(seeds))
    main(["benchmark", "--task", "fashion", "--k", "5", "--first-seed", "3", "--seeds", "2", "--out", "unused"])
    main(["benchmark", "--task", "fashion", "--k", "5", "--seeds", "2", "--out", "unused"])
    assert calls == [[3, 4], [0, 1]]


def test_benchmark_protocol_then_quick_then_set(monkeypatch):
    """``--protocol`` names recorded settings once; ``--quick`` and ``--set`` change them, in that order."""
    import medmerge_bench.comparison as comparison
    from medmerge_bench.transfer import PROTOCOLS, Recipe

    recipes = []
    monkeypatch.setattr(comparison, "run_comparison", lambda task, k, seeds, out, **kw: recipes.append(kw["recipe"]))
    base = ["benchmark", "--task", "fashion", "--out", "unused"]
    main(base)
    main([*base, "--protocol", "lpft_distill_ft150"])
    main([*base, "--protocol", "lpft_distill_ft150", "--quick", "--set", "patience=3", "widths=8,16,16,32"])
    default, recorded, quick = recipes
    assert default == Recipe()
    assert recorded != default
    assert {name: getattr(recorded, name) for name in PROTOCOLS["lpft_distill_ft150"]} == PROTOCOLS[
        "lpft_distill_ft150"
    ]
    assert (quick.ft_epochs, quick.source_epochs) == (PROTOCOLS["quick"]["ft_epochs"], 1)  # quick over the protocol
    assert quick.distill_steps == recorded.distill_steps  # what quick leaves alone stays the protocol's
    assert (quick.patience, quick.widths) == (3, (8, 16, 16, 32))  # --set last
    assert Recipe.protocol("lpft_distill_ft150", "quick", patience=3, widths=(8, 16, 16, 32)) == quick
    with pytest.raises(ValueError, match="unknown protocol 'nope'; choose from default, lpft_distill_ft150"):
        Recipe.protocol("nope")
    # two named protocols in order, quick after them: the shared rotation lineage's 8 ancestor epochs become 1
    main([*base, "--protocol", "lpft_distill_ft150", "shared_rotation", "--quick"])
    shared = recipes[-1]
    assert (shared.lineage, shared.ancestor, shared.distill_steps) == ("shared", "rotation", recorded.distill_steps)
    assert (
        shared.ancestor_epochs
        == PROTOCOLS["quick"]["ancestor_epochs"]
        != PROTOCOLS["shared_rotation"]["ancestor_epochs"]
    )


def test_demo_takes_the_demos_own_task_and_k_unless_given(monkeypatch):
    """The CLI holds no second copy of the demo's defaults: without --task/--k run_demo's own apply."""
    import medmerge_bench.demo as demo

    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda out, **kw: calls.append(kw))
    main(["demo", "--out", "unused"])
    main(["demo", "--out", "unused", "--task", "fashion", "--k", "5"])
    assert "task" not in calls[0] and "k" not in calls[0]
    assert calls[1]["task"] == "fashion" and calls[1]["k"] == 5
    assert (demo.DEMO_TASK, demo.DEMO_K) == ("brain_colin_test_split_regions", 10)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--k", "-5"], "argument --k: must be an integer >= 1, got -5"),
        (["demo", "--seed", "x"], "argument --seed: expected an integer >= 0, got 'x'"),
        (["demo", "--task", "nope"], "argument --task: invalid choice 'nope' (choose from brain, fashion, brain_"),
        (["benchmark", "--task", "nope"], "argument --task: invalid choice 'nope' (choose from brain, fashion"),
        (["benchmark", "--seeds", "0"], "argument --seeds: must be an integer >= 1, got 0"),
        (["benchmark", "--first-seed", "-1"], "argument --first-seed: must be an integer >= 0, got -1"),
        (["benchmark", "--methods", "nope"], "argument --methods: unknown ['nope']; choose from scratch"),
        (
            ["benchmark", "--protocol", "nope"],
            "argument --protocol: unknown protocol 'nope'; choose from default, lpft_distill_ft150",
        ),
        (["benchmark", "--set", "coef_lr=abc"], "argument --set: coef_lr expects float, got 'abc'"),
        (["benchmark", "--set", "widths=8,x"], "argument --set: widths expects comma-separated ints, got '8,x'"),
        (["benchmark", "--set", "widths=8,16"], "widths must be 4 positive channel counts, one per ResNet stage"),
        (["benchmark", "--set", "widths=8,16,0,4"], "widths must be 4 positive channel counts"),
        (["benchmark", "--set", "source_seeds=1"], "source_seeds must be 2 seeds, of sources A and B, got (1,)"),
        (["benchmark", "--set", "batch_size=0"], "argument --set: batch_size must be an integer >= 1, got 0."),
        (["benchmark", "--set", "ft_epochs=0"], "argument --set: ft_epochs must be an integer >= 1, got 0."),
        (["benchmark", "--set", "lp_lr=-1"], "argument --set: lp_lr must be a number >= 0, got -1.0."),
        (["quickstart", "--k", "0"], "argument --k: must be an integer >= 1, got 0"),
        (["example", "--k", "0"], "argument --k: must be an integer >= 1, got 0"),
        (["example", "--task", "segmentation", "--n-train", "0"], "argument --n-train: must be an integer >= 1"),
        (["example", "--source-epochs", "0"], "argument --source-epochs: must be an integer >= 1, got 0"),
    ],
)
def test_bad_arguments_are_one_line_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error:" in line]) == 1


def test_arrows_run_one_way():
    """The product never imports the research package; research code imports no private name of the product."""
    import ast
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def imports(path: Path):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                yield node.module, [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                yield from ((a.name, []) for a in node.names)

    product = sorted((root / "monai_medmerge").rglob("*.py"))
    assert len(product) > 20
    for path in product:
        for module, _ in imports(path):
            assert not module.startswith("medmerge_bench"), f"{path} imports {module}"
    research = sorted((root / "medmerge_bench").rglob("*.py")) + sorted((root / "benchmarks").glob("*.py"))
    assert len(research) > 10
    for path in research:
        for module, names in imports(path):
            if module.startswith("monai_medmerge"):
                private = [n for n in names if n.startswith("_")] + [p for p in module.split(".") if p.startswith("_")]
                assert not private, f"{path} imports private {private} from {module}"
    code = (
        "import sys, monai_medmerge, monai_medmerge.workflows, monai_medmerge.data, monai_medmerge.bundle, "
        "monai_medmerge.dicom, monai_medmerge.cli\n"
        "assert not [m for m in sys.modules if m.startswith('medmerge_bench')]"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)

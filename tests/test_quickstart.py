from __future__ import annotations

import json

import torch
from monai.networks.nets import resnet10

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
    net = resnet10(spatial_dims=2, n_input_channels=1, num_classes=4)
    net.load_state_dict(state)  # strict: every key matches
    assert "MedMerge + fine-tuning" in capsys.readouterr().out


def test_methods_command_lists_registry(capsys):
    assert main(["methods"]) == 0
    names = [m["name"] for m in json.loads(capsys.readouterr().out)]
    assert names[:5] == ["average", "interpolate", "model", "layer", "kernel"]


def test_recipe_settings_from_the_command_line():
    import pytest

    from medmerge_bench.transfer import Recipe
    from monai_medmerge.cli import _with_settings

    r = _with_settings(Recipe(), ["anchor_weight=0.99", "coef_lr=0.05", "widths=8,16,16,32", "ft_epochs=3"])
    assert (r.anchor_weight, r.coef_lr, r.widths, r.ft_epochs) == (0.99, 0.05, (8, 16, 16, 32), 3)
    with pytest.raises(SystemExit, match="FIELD=VALUE"):
        _with_settings(Recipe(), ["anchor=1"])

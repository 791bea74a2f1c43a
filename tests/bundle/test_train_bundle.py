"""The training bundle end to end: both phases in one run, each phase alone, evaluation, inference, property checks."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from bundle_utils import BUNDLE, WIDTHS, bundle_copy, metadata_schema, overrides, run_bundle

from monai_medmerge.bundle.example import example_network_def


def _plain_network(num_classes: int) -> torch.nn.Module:
    from monai.bundle import ConfigParser

    return ConfigParser({"n": example_network_def(num_classes, WIDTHS)}).get_parsed_content("n")


def _workflow(example, root: Path, files: list[str], kind: str, **more):
    from monai.bundle import ConfigWorkflow

    args = {
        "bundle_root": str(root),
        "dataset_dir": str(Path(example["datalist"]).parent),
        "sources": example["sources"],
        "class_names": example["class_names"],
        "network_args#block_inplanes": WIDTHS,
        "progress": False,
        **more,
    }
    w = ConfigWorkflow(
        config_file=[str(root / "configs" / f) for f in files],
        meta_file=str(root / "configs" / "metadata.json"),
        logging_file=str(root / "configs" / "logging.conf"),
        workflow_type=kind,
        **args,
    )
    w.initialize()
    return w


def test_train_evaluate_infer(example_workspace, tmp_path):
    example = example_workspace
    root = bundle_copy(tmp_path / "bundle")
    proc = run_bundle(root, ["train.yaml"], overrides(example, root))
    assert proc.returncode == 0, proc.stdout[-4000:]
    models = root / "models"
    for name in ("model.pt", "phase1_best.pt", "phase1.done", "phase2.done"):
        assert (models / name).is_file(), f"{name} missing; log:\n{proc.stdout[-2000:]}"
    assert "val_macro_f1" in proc.stdout and "val_auroc" in proc.stdout
    # the run ends by saying where its result is
    assert f"[medmerge] trained network: {models / 'model.pt'}" in proc.stdout
    # the result is a plain state dict of network_def: it loads strictly into a fresh plain network
    state = torch.load(models / "model.pt", weights_only=True)
    net = _plain_network(len(example["class_names"]))
    net.load_state_dict(state, strict=True)
    assert not any(k.startswith("module.") or "merge" in k for k in state)
    done = json.loads((models / "phase1.done").read_text())
    assert done["epochs"] == 2

    proc = run_bundle(root, ["train.yaml", "evaluate.yaml"], overrides(example, root))
    assert proc.returncode == 0, proc.stdout[-4000:]
    metrics = dict(csv.reader((root / "eval" / "metrics.csv").read_text().splitlines()))
    assert set(metrics) == {"test_macro_f1", "test_accuracy", "test_balanced_accuracy", "test_auroc"}
    assert all(0.0 <= float(v) <= 1.0 for v in metrics.values())
    rows = list(csv.reader((root / "eval" / "test_predictions.csv").read_text().splitlines()))
    assert len(rows) == 4 * 5  # 5 test images per class
    probs = np.array([[float(v) for v in r[1:]] for r in rows])
    assert probs.shape == (20, 4)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)

    # inference on a folder of files gives the same probabilities as evaluation for the same images
    images = sorted(Path(example["datalist"]).parent.glob("images/test/*.nii.gz"))[:3]
    folder = tmp_path / "to_classify"
    folder.mkdir()
    for p in images:
        (folder / p.name).write_bytes(p.read_bytes())
    out = tmp_path / "predictions"
    # inference.yaml stands alone: network, classes and preprocessing from the run's record, not from train.yaml
    record = json.loads((models / "model_config.json").read_text())
    assert record["class_names"] == example["class_names"]  # the command-line override, as trained
    assert record["network_args"]["block_inplanes"] == WIDTHS
    assert record["preprocessing_options"]["kind"] == "nifti"
    assert record["preprocessing_options"]["reader"] == "NibabelReader"
    args = ["--bundle_root", str(root), "--input_dir", str(folder), "--output_dir", str(out)]
    proc = run_bundle(root, ["inference.yaml"], args)
    assert proc.returncode == 0, proc.stdout[-4000:]
    from monai.bundle import ConfigWorkflow

    infer = ConfigWorkflow(
        config_file=str(root / "configs" / "inference.yaml"), workflow_type="infer", bundle_root=str(root)
    )
    infer.initialize()
    assert infer.check_properties() == []  # MONAI's inference properties, from inference.yaml alone
    got = {Path(r[0]).name: [float(v) for v in r[1:]] for r in csv.reader((out / "predictions.csv").open())}
    expected = {Path(r[0]).name: [float(v) for v in r[1:]] for r in rows}
    assert sorted(got) == [p.name for p in images]
    for name, p in got.items():
        np.testing.assert_allclose(p, expected[name], atol=1e-5)

    # the export id writes a plugin-free bundle whose own inference config gives the same probabilities
    proc = run_bundle(root, ["train.yaml"], overrides(example, root), run_id="export")
    assert proc.returncode == 0, proc.stdout[-4000:]
    exported = root / "exported"
    config = yaml.safe_load((exported / "configs" / "inference.yaml").read_text())
    assert "monai_medmerge" not in json.dumps(config)
    out2 = tmp_path / "predictions_exported"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        str(exported / "configs" / "inference.yaml"),
        "--bundle_root",
        str(exported),
        "--dataset_dir",
        str(folder),
        "--output_dir",
        str(out2),
    ]
    proc = subprocess.run(cmd, cwd=exported, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    header, *rows2 = csv.reader((out2 / "predictions.csv").open())
    assert header[1:] == example["class_names"]  # the exported bundle's CSV names its columns
    got2 = {Path(r[0]).name: [float(v) for v in r[1:]] for r in rows2}
    assert sorted(got2) == sorted(got)
    for name, p in got2.items():
        np.testing.assert_allclose(p, got[name], atol=1e-4)


def test_phases_run_alone(example_workspace, tmp_path):
    example = example_workspace
    root = bundle_copy(tmp_path / "bundle")
    args = overrides(example, root)
    proc = run_bundle(root, ["train.yaml"], args, run_id="phase2")
    assert proc.returncode != 0
    assert "phase1_best.pt not found: run phase 1 first" in proc.stdout
    proc = run_bundle(root, ["train.yaml"], args, run_id="phase1")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert (root / "models" / "phase1_best.pt").is_file() and not (root / "models" / "model.pt").exists()
    proc = run_bundle(root, ["train.yaml"], args, run_id="phase2")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert (root / "models" / "model.pt").is_file()


def test_properties_metadata_and_network_def(example_workspace, tmp_path):
    example = example_workspace
    root = bundle_copy(tmp_path / "bundle")
    train = _workflow(example, root, ["train.yaml"], "train")
    assert train.check_properties() == []
    from monai.bundle import ConfigWorkflow

    infer = ConfigWorkflow(
        config_file=str(root / "configs" / "inference.yaml"), workflow_type="infer", bundle_root=str(root)
    )
    infer.initialize()
    # alone and untrained: the missing record is named, with what writes it (properties: after training, above)
    with pytest.raises(RuntimeError) as info:
        infer.parser.get_parsed_content("network_def")
    assert "model_config.json not found" in str(info.value.__cause__ or info.value)
    # network_def builds the plain class the merge collapses to
    net = train.parser.get_parsed_content("network_def")
    merge = train.parser.get_parsed_content("merge_network")
    assert type(net) is type(merge.collapse())
    net.load_state_dict(merge.collapse().state_dict(), strict=True)
    meta = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    assert "required_packages_version" in meta and "optional_packages_version" not in meta
    schema = metadata_schema()  # skips, saying where to get it, when absent
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(meta, schema)


@pytest.mark.parametrize("matching", ["weights", "activations"])
def test_align_setting_reaches_the_merge(example_workspace, tmp_path, matching):
    example = example_workspace
    from monai_medmerge.merging import align_sources

    root = bundle_copy(tmp_path / "bundle")
    plain = _workflow(example, root, ["train.yaml"], "train").parser.get_parsed_content("merge_network")
    w = _workflow(example, root, ["train.yaml"], "train", align=True, align_matching=matching)
    aligned = w.parser.get_parsed_content("merge_network")
    head = "fc."
    merged_plain = {k: v for k, v in plain.merged_parameters().items() if not k.startswith(head)}
    merged_aligned = {k: v for k, v in aligned.merged_parameters().items() if not k.startswith(head)}
    assert merged_plain.keys() == merged_aligned.keys()
    # source 1 was permuted before merging, so the merged weights differ from the unaligned merge ...
    assert any(not torch.allclose(merged_plain[k], merged_aligned[k]) for k in merged_plain)
    if matching == "weights":
        # ... and equal a merge over align_sources' result (weight matching needs no data: it is deterministic)
        sources = w.parser.get_parsed_content("source_networks")
        direct = w.parser.get_parsed_content("merge_network")  # cached: the same object
        assert direct is aligned
        again = align_sources(sources, anchor=0)
        from monai_medmerge.networks import KernelMerge

        ref = KernelMerge(again, head="fc", out_channels=len(example["class_names"]), anchor=0, anchor_weight=0.9)
        for k, v in ref.merged_parameters().items():
            if not k.startswith(head):
                torch.testing.assert_close(merged_aligned[k], v)


def _absolute_datalist(example) -> dict:
    data = Path(example["datalist"]).parent
    datalist = json.loads(Path(example["datalist"]).read_text())
    for section in ("training", "validation", "test"):
        for item in datalist[section]:
            item["image"] = str(data / item["image"])
    return datalist


def test_bad_label_is_an_error_naming_the_datalist(example_workspace, tmp_path):
    example = example_workspace
    root = bundle_copy(tmp_path / "bundle")
    datalist = _absolute_datalist(example)
    datalist["training"][3]["label"] = 9
    bad = tmp_path / "bad_datalist.json"
    bad.write_text(json.dumps(datalist))
    proc = run_bundle(root, ["train.yaml"], overrides(example, root, datalist=bad), run_id="phase1")
    assert proc.returncode != 0
    assert f"datalist {bad}, section 'training', item 3, field 'label'" in proc.stdout, proc.stdout[-3000:]
    assert "outside the classes" in proc.stdout


@pytest.mark.parametrize("setting, value", [("phase2_epochs", "-1"), ("coef_lr", "-0.1")])
def test_a_bad_training_setting_stops_the_run_before_any_phase(example_workspace, tmp_path, setting, value):
    """phase2_epochs=-1 failed only after phase 1 had trained; a negative learning rate trained without a word."""
    root = bundle_copy(tmp_path / "bundle")
    proc = run_bundle(root, ["train.yaml"], overrides(example_workspace, root, **{setting: value}))
    assert proc.returncode != 0
    assert f"error: {setting} must be " in proc.stdout and f"got {value}." in proc.stdout, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout and list((root / "models").iterdir()) == []


def test_skip_bad_lists_what_it_skipped(example_workspace, tmp_path):
    example = example_workspace
    root = bundle_copy(tmp_path / "bundle")
    datalist = _absolute_datalist(example)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(Path(datalist["training"][0]["image"]).read_bytes()[:200])
    datalist["training"].append({"image": str(broken), "label": 1})
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(datalist))
    w = _workflow(example, root, ["train.yaml"], "train", datalist=str(path))
    with pytest.raises(RuntimeError) as err:  # MONAI's parser wraps the BadImageError
        w.parser.get_parsed_content("train#items")
    assert "broken.nii.gz" in str(err.value.__cause__) and type(err.value.__cause__).__name__ == "BadImageError"
    report = tmp_path / "skipped.json"
    w = _workflow(example, root, ["train.yaml"], "train", datalist=str(path), skip_bad=True, skipped_report=str(report))
    items = w.parser.get_parsed_content("train#items")
    assert len(items) == len(datalist["training"]) - 1
    skipped = json.loads(report.read_text())
    assert [Path(s["image"]).name for s in skipped] == ["broken.nii.gz"] and skipped[0]["reason"]

from __future__ import annotations

import csv
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from bundle_utils import metadata_schema
from conftest import make_source, snapshot
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.networks.nets import ResNet

from medmerge_bench.transfer import Recipe, build_network
from monai_medmerge.bundle import export_bundle, export_from_checkpoint, resolve_network_def
from monai_medmerge.bundle import shipped as shipped_module
from monai_medmerge.cli import main
from monai_medmerge.data import transforms as transforms_module
from monai_medmerge.networks import KernelMerge
from monai_medmerge.sources import load_source

RECIPE = Recipe(widths=(8, 16, 16, 32))
NET_DEF = {
    "_target_": "monai.networks.nets.ResNet",
    "block": "basic",
    "layers": [1, 1, 1, 1],
    "block_inplanes": list(RECIPE.widths),
    "spatial_dims": 2,
    "n_input_channels": 1,
    "conv1_t_size": 3,
    "conv1_t_stride": 1,
    "no_max_pool": True,
    "num_classes": 3,
}
CLASSES = ["red", "green", "blue"]


def _inference(bundle: Path) -> dict:
    return yaml.safe_load((bundle / "configs" / "inference.yaml").read_text())


@pytest.fixture(scope="module")
def collapsed():
    sources = [
        make_source(lambda num_classes: build_network(num_classes, RECIPE), s, num_classes=c)
        for s, c in ((0, 4), (1, 5))
    ]
    merge = KernelMerge(sources, head="fc", out_channels=3, anchor=0)
    with torch.no_grad():
        merge.merge_logits.normal_()
    return merge.collapse()


def test_bundle_loads_without_the_plugin(collapsed, tmp_path):
    out = export_bundle(collapsed, NET_DEF, tmp_path / "bundle", CLASSES, [32, 32])
    assert sorted(p.name for p in (out / "models").iterdir()) == ["model.pt", "model.ts"]
    assert sorted(p.name for p in (out / "configs").iterdir()) == ["inference.yaml", "logging.conf", "metadata.json"]
    inference = _inference(out)
    assert "monai_medmerge" not in json.dumps(inference)
    assert inference["network_def"] == NET_DEF
    assert inference["load_weights"].count("weights_only=True") == 1
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch.softmax(collapsed(x), 1)
    torch.save(x, tmp_path / "x.pt")
    # a child process in which importing monai_medmerge fails: the bundle must not need it
    code = f"""
import sys, torch
sys.modules["monai_medmerge"] = None
from monai.bundle import ConfigParser
p = ConfigParser(); p.read_config({str(out / "configs" / "inference.yaml")!r}); p["bundle_root"] = {str(out)!r}
net = p.get_parsed_content("network"); p.get_parsed_content("load_weights"); net.eval()
x = torch.load({str(tmp_path / "x.pt")!r}, weights_only=True)
with torch.no_grad():
    y = p.get_parsed_content("postprocessing")({{"pred": net(x)[0]}})["pred"]
    ts = torch.jit.load({str(out / "models" / "model.ts")!r})(x)
torch.save({{"y": y, "ts": torch.softmax(ts, 1)}}, {str(tmp_path / "y.pt")!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    got = torch.load(tmp_path / "y.pt", weights_only=True)
    torch.testing.assert_close(got["y"], expected[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["ts"], expected, rtol=1e-4, atol=1e-5)
    # and the exported bundle is itself a valid source for a later merge
    with torch.no_grad():
        torch.testing.assert_close(load_source(out)(x), collapsed(x), rtol=1e-4, atol=1e-5)


def test_metadata_is_valid_and_net_in_out_verifies(collapsed, tmp_path):
    out = export_bundle(collapsed, NET_DEF, tmp_path / "bundle", CLASSES, [32, 32], modality="CT", window=(-200, 300))
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "red", "1": "green", "2": "blue"}
    assert (image["modality"], image["format"], image["value_range"]) == ("CT", "hounsfield", [0.0, 1.0])
    assert "[-200, 300] HU" in meta["image_classes"]
    # the default kind is NIfTI, read with NibabelReader as in training: nibabel is needed, itk is not
    assert set(meta["required_packages_version"]) == {"nibabel", "pytorch-ignite", "pyyaml", "fire"}
    nibabel_version = meta["required_packages_version"]["nibabel"]
    assert nibabel_version == "*" or nibabel_version[0].isdigit()
    schema = metadata_schema()  # skips, saying where to get it, when absent
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(meta, schema)
    pytest.importorskip("fire")
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "verify_net_in_out",
        "network_def",
        "--meta_file",
        str(out / "configs" / "metadata.json"),
        "--config_file",
        str(out / "configs" / "inference.yaml"),
        "--device",
        "cpu",
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=out)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "data shape of network is verified with no error" in (run.stdout + run.stderr)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"kind": "png", "modality": "mri"},
        {"kind": "dicom_series", "modality": "CT", "window": (-160, 240), "pixdim": (0.5, 0.5)},
        {"kind": "nifti", "reader": "ITKReader", "modality": "MR", "percentiles": (5, 95)},
    ],
)
def test_exported_preprocessing_is_the_training_description(collapsed, tmp_path, settings):
    """inference.yaml holds the evaluation half of preprocessing_config with the same settings, step for step (only
    the module of the package's own transforms is the bundle's copy), the reader the training pipeline used, and
    the packages that reader needs."""
    from monai_medmerge.bundle.inference import SCRIPTS_MODULE
    from monai_medmerge.data.pipelines import preprocessing_config

    out = export_bundle(collapsed, NET_DEF, tmp_path / "b", CLASSES, [32, 32], torchscript=False, **settings)
    steps = _inference(out)["preprocessing"]["transforms"]
    expected = preprocessing_config(spatial_size=[32, 32], train=False, label_key=None, **{"kind": "nifti", **settings})
    for step in expected:
        step["_target_"] = step["_target_"].replace("monai_medmerge.data.transforms", SCRIPTS_MODULE)
    assert steps == expected
    assert (out / "scripts" / "medmerge_transforms.py").read_bytes() == Path(transforms_module.__file__).read_bytes()
    assert (out / "scripts" / "medmerge_inference.py").read_bytes() == Path(shipped_module.__file__).read_bytes()
    reader = steps[0]["reader"]
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    package = {"PILReader": "pillow", "NibabelReader": "nibabel", "ITKReader": "itk"}[reader]
    # MONAI's Orientation (every kind but PNG orients) needs nibabel, whatever the reader
    oriented = {"nibabel"} if settings.get("kind") != "png" else set()
    assert set(meta["required_packages_version"]) == {package, "pytorch-ignite", "pyyaml", "fire"} | oriented
    assert package in (out / "configs" / "inference.yaml").read_text().splitlines()[0]


@pytest.fixture
def bundle_imports():
    """Running an exported workflow in this process imports the bundle's ``scripts`` package and puts the bundle on
    sys.path: undone afterwards, so that no later test meets another bundle's copy."""
    path = list(sys.path)
    before = set(sys.modules)
    yield
    sys.path[:] = path
    for name in set(sys.modules) - before:
        if name == "scripts" or name.startswith("scripts."):
            del sys.modules[name]


def _workflow(bundle: Path, **overrides) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        config_file=str(bundle / "configs" / "inference.yaml"),
        workflow_type="infer",
        bundle_root=str(bundle),
        **overrides,
    )
    workflow.initialize()
    return workflow


def _images(data: Path) -> tuple[list[str], list[str]]:
    """Two readable NIfTI images and two unreadable inputs (a NumPy file, a truncated NIfTI file) in ``data``."""
    nib = pytest.importorskip("nibabel")
    data.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.nii.gz", "c.nii.gz"):
        nib.save(nib.Nifti1Image(rng.normal(size=(40, 36)).astype(np.float32), np.eye(4)), data / name)
    # NumpyReader would read this file; the bundle's reader is NibabelReader, which cannot: never a fallback
    np.save(data / "b.npy", np.zeros((32, 32), np.float32))
    (data / "d.nii.gz").write_bytes((data / "a.nii.gz").read_bytes()[:200])
    return [str(data / "a.nii.gz"), str(data / "c.nii.gz")], [str(data / "b.npy"), str(data / "d.nii.gz")]


def test_inference_workflow_has_monai_properties_and_classifies_every_readable_input(
    collapsed, tmp_path, bundle_imports
):
    out = export_bundle(collapsed, NET_DEF, tmp_path / "bundle", CLASSES, [32, 32], torchscript=False)
    readable, unreadable = _images(tmp_path / "data")
    pred = tmp_path / "pred"
    workflow = _workflow(out, dataset_dir=str(tmp_path / "data"), output_dir=str(pred))
    assert workflow.check_properties() == []
    with pytest.raises(SystemExit) as e:
        workflow.run()
    # after everything is written: one line that names the first unreadable input and both files
    message = str(e.value.code)
    assert message.startswith(f"2 of 4 input(s) could not be read and have no prediction (the first: {unreadable[0]}:")
    assert (
        f"listed in {pred / 'unreadable.csv'}; the predictions of the others are in {pred / 'predictions.csv'}"
        in message
    )

    # a header row, then the readable inputs in datalist order, with the probabilities of the network
    lines = (pred / "predictions.csv").read_text().splitlines()
    assert lines[0] == "file,red,green,blue"
    rows = [line.split(",") for line in lines[1:]]
    assert [r[0] for r in rows] == readable
    preprocessing = _inference(out)["preprocessing_options"]
    from monai_medmerge.data.pipelines import classification_transforms

    transforms = classification_transforms(spatial_size=[32, 32], label_key=None, **preprocessing)
    for path, row in zip(readable, rows, strict=True):
        with torch.no_grad():
            expected = torch.softmax(collapsed.eval()(transforms({"image": path})["image"].as_tensor()[None]), 1)[0]
        np.testing.assert_allclose(np.array(row[1:], dtype=float), expected.numpy(), rtol=1e-5, atol=1e-6)
    # the unreadable inputs, each with the reason its reader gave
    with open(pred / "unreadable.csv", newline="") as f:
        report = list(csv.reader(f))
    assert report[0] == ["file", "reason"] and [r[0] for r in report[1:]] == unreadable
    assert report[1][1].startswith("NibabelReader reads .nii, .nii.gz, not 'b.npy'")
    assert report[2][1].startswith("truncated: the gzip stream ends before its end-of-stream marker")

    # the same with data loader workers and batches of two: the unreadable inputs reach the main process's report
    first = {name: (pred / name).read_text() for name in ("predictions.csv", "unreadable.csv")}
    pred2 = tmp_path / "pred2"
    loader = {"dataloader#num_workers": 2, "dataloader#batch_size": 2}
    with pytest.raises(SystemExit, match="2 of 4 input"):
        _workflow(out, dataset_dir=str(tmp_path / "data"), output_dir=str(pred2), **loader).run()
    assert (pred2 / "unreadable.csv").read_text() == first["unreadable.csv"]
    assert (pred2 / "predictions.csv").read_text() == first["predictions.csv"]

    # no input at all: one line, nothing written
    workflow = _workflow(out, dataset_dir=str(tmp_path / "empty"), output_dir=str(tmp_path / "none"))
    with pytest.raises(SystemExit, match="no input images: nothing matches .*empty"):
        workflow.run()
    assert not (tmp_path / "none").exists()


def test_csv_format_monai_is_classification_saver_format(collapsed, tmp_path, bundle_imports):
    """``--csv_format monai`` writes byte for byte what MONAI's ClassificationSaver (CSVSaver) writes for the same
    probabilities; all inputs readable: the run ends normally and unreadable.csv holds only its header."""
    from monai.data import CSVSaver

    out = export_bundle(collapsed, NET_DEF, tmp_path / "bundle", CLASSES, [32, 32], torchscript=False)
    readable, _ = _images(tmp_path / "data")
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    datalist = [{"image": p} for p in readable]
    _workflow(out, datalist=datalist, output_dir=str(ours)).run()
    _workflow(out, datalist=datalist, output_dir=str(ours / "monai"), csv_format="monai").run()
    header_rows = list(csv.reader((ours / "predictions.csv").read_text().splitlines()))
    assert header_rows[0] == ["file", *CLASSES] and [r[0] for r in header_rows[1:]] == readable
    assert (ours / "unreadable.csv").read_text() == "file,reason\n"
    monai_text = (ours / "monai" / "predictions.csv").read_text()
    saver = CSVSaver(output_dir=str(theirs), filename="predictions.csv")
    for line in monai_text.splitlines():
        name, *values = line.split(",")
        saver.save(np.array([float(v) for v in values], dtype=np.float32), {"filename_or_obj": name})
    saver.finalize()
    assert monai_text == (theirs / "predictions.csv").read_text()
    # the same numbers in both formats (7 significant digits in the table for people)
    for row, line in zip(header_rows[1:], monai_text.splitlines(), strict=True):
        np.testing.assert_allclose(np.array(row[1:], float), np.array(line.split(",")[1:], float), rtol=1e-6)
    with pytest.raises(SystemExit, match="csv_format must be medmerge .* got 'excel'"):
        _workflow(out, datalist=datalist, output_dir=str(tmp_path / "x"), csv_format="excel").run()
    assert not (tmp_path / "x").exists()


def test_a_bundle_run_writes_under_the_bundle_or_the_named_folder(collapsed, tmp_path, bundle_imports, monkeypatch):
    """Without --output_dir the results go to <bundle>/eval; from a folder that is not the bundle, without
    --bundle_root, the run stops with one line before anything is written."""
    out = export_bundle(collapsed, NET_DEF, tmp_path / "bundle", CLASSES, [32, 32], torchscript=False)
    readable, _ = _images(tmp_path / "data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    _workflow(out, datalist=[{"image": readable[0]}]).run()
    assert (out / "eval" / "predictions.csv").is_file() and os.listdir(elsewhere) == []
    parser = ConfigWorkflow(config_file=str(out / "configs" / "inference.yaml"), workflow_type="infer")
    with pytest.raises(SystemExit, match=r"no model at \./models/model\.pt: run in the bundle folder, or pass"):
        parser.initialize()
    assert os.listdir(elsewhere) == []


def test_shipped_module_needs_only_monai_torch_numpy(tmp_path):
    """scripts/medmerge_inference.py runs where monai_medmerge is not installed: it imports MONAI, torch, numpy, the
    standard library and, in a bundle, its sibling copy of the transforms."""
    import ast

    tree = ast.parse(Path(shipped_module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." + (node.module or "") if node.level else node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party == {"monai", "torch", "numpy", ".medmerge_transforms", "monai_medmerge"}
    # monai_medmerge only where the module is the package's own (see the module's first lines)
    source = Path(shipped_module.__file__).read_text()
    assert 'if (__package__ or "").split(".")[0] == "monai_medmerge":' in source


def test_header_and_readme_say_what_the_bundle_needs_and_writes(collapsed, tmp_path):
    out = export_bundle(collapsed, NET_DEF, tmp_path / "b", CLASSES, [32, 32], kind="png", torchscript=False)
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    from monai_medmerge.bundle.inference import pip_requirements

    specs = pip_requirements(meta)
    assert specs[0] == f"torch=={meta['pytorch_version']}" and specs[1] == f"monai=={meta['monai_version']}"
    assert {s.split("==")[0] for s in specs[3:]} == {"pillow", "pytorch-ignite", "pyyaml", "fire"}
    header = (out / "configs" / "inference.yaml").read_text().split("\n")[0]
    assert header.startswith("# medmerge_classification: MONAI inference workflow; needs torch, monai, numpy, pillow,")
    readme = (out / "docs" / "README.md").read_text()
    assert f'pip install "{specs[0]}"    # first and alone' in readme
    assert f'pip install "{specs[0]}" ' + " ".join(f'"{s}"' for s in specs[1:]) in readme
    assert "```\nfile,red,green,blue\n```" in readme
    assert "`--csv_format monai` writes MONAI's `ClassificationSaver` format" in readme
    assert "`unreadable.csv` in `output_dir`" in readme and "exits\nwith status 1" in readme


def test_bad_exports_write_nothing(collapsed, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="plain MONAI or torch network"):
        export_bundle(collapsed, {"_target_": "monai_medmerge.networks.KernelMerge"}, tmp_path / "b", CLASSES, [32])
    with pytest.raises(ValueError, match="does not match"):
        export_bundle(collapsed, {**NET_DEF, "num_classes": 5}, tmp_path / "b", CLASSES, [32, 32])
    with pytest.raises(ValueError, match="2 class names"):
        export_bundle(collapsed, NET_DEF, tmp_path / "b", CLASSES[:2], [32, 32])
    with pytest.raises(ValueError, match="class_names has repeated names"):
        export_bundle(collapsed, NET_DEF, tmp_path / "b", [CLASSES[0]] * len(CLASSES), [32, 32])
    with pytest.raises(ValueError, match="reader 'DicomReader' is not supported; choose one of PILReader"):
        export_bundle(collapsed, NET_DEF, tmp_path / "b", CLASSES, [32, 32], reader="DicomReader")
    with pytest.raises(ValueError, match="modality 'XR' is not supported; choose one of CT, MR, MRI, other"):
        export_bundle(collapsed, NET_DEF, tmp_path / "b", CLASSES, [32, 32], modality="XR")
    with pytest.raises(ValueError, match=r"window must be two finite numbers with low < high, got \(100, -100\)"):
        export_bundle(collapsed, NET_DEF, tmp_path / "b", CLASSES, [32, 32], modality="CT", window=(100, -100))
    with pytest.raises(ValueError, match=r"pixdim must have 2 values, got \[1.0\]"):
        export_bundle(collapsed, NET_DEF, tmp_path / "b", CLASSES, [32, 32], pixdim=[1.0])
    with pytest.raises(ValueError, match="kind 'jpeg2000' is not supported"):
        export_bundle(collapsed, NET_DEF, tmp_path / "b", CLASSES, [32, 32], kind="jpeg2000")
    # a shape the 2-D, one-channel network cannot take is named with the settings that made it, and the network is
    # left in its mode
    was_training = collapsed.training
    collapsed.train()
    with pytest.raises(ValueError, match=r"does not run on an input of shape \(2, 1, 32, 32, 32\) .*spatial_size="):
        export_bundle(collapsed, NET_DEF, tmp_path / "b", CLASSES, [32, 32, 32])
    with pytest.raises(ValueError, match=r"does not run on an input of shape \(2, 3, 32, 32\) \(batch, in_channels=3"):
        export_bundle(collapsed, NET_DEF, tmp_path / "b", CLASSES, [32, 32], in_channels=3)
    assert collapsed.training
    collapsed.train(was_training)
    assert not (tmp_path / "b").exists()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        export_bundle(collapsed, NET_DEF, tmp_path / "b", CLASSES, [32, 32])
    assert os.listdir(tmp_path) == []  # neither the bundle nor a temporary folder is left
    monkeypatch.undo()
    export_bundle(collapsed, NET_DEF, tmp_path / "b", CLASSES, [32, 32])
    with pytest.raises(FileExistsError):
        export_bundle(collapsed, NET_DEF, tmp_path / "b", CLASSES, [32, 32])
    export_bundle(collapsed, NET_DEF, tmp_path / "b", CLASSES, [32, 32], overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["b"]


def test_resolve_network_def_gives_plain_values():
    config = {
        "imports": ["$import torch"],
        "num_classes": 3,
        "width": 8,
        "network_def": {
            "_target_": "ResNet",
            "block": "basic",
            "layers": [1, 1, 1, 1],
            "block_inplanes": ["@width", "$2 * @width", "$2 * @width", "$4 * @width"],
            "num_classes": "@num_classes",
            "_requires_": "$None",
        },
    }
    got = resolve_network_def(config)
    assert got == {
        "_target_": "monai.networks.nets.ResNet",
        "block": "basic",
        "layers": [1, 1, 1, 1],
        "block_inplanes": [8, 16, 16, 32],
        "num_classes": 3,
    }
    # MONAI's `_mode_: callable` gives a partial of the class: its keywords are the config
    partial = ConfigParser({"n": {**got, "_mode_": "callable"}}).get_parsed_content("n")
    assert isinstance(partial, functools.partial)
    assert resolve_network_def(partial) == {**got, "_target_": "monai.networks.nets.resnet.ResNet"}
    with pytest.raises(ValueError, match="could not resolve network_def: .*`@num_classes` is not defined"):
        resolve_network_def({"_target_": "ResNet", "num_classes": "@num_classes"})
    with pytest.raises(ValueError, match="field 'act' resolved to a type"):
        resolve_network_def(
            {"imports": ["$import torch"], "network_def": {"_target_": "ResNet", "act": "$torch.nn.ReLU"}}
        )
    with pytest.raises(ValueError, match="network_def has neither '_target_' nor an id 'net'"):
        resolve_network_def({"network_def": {}}, network_def_id="net")
    with pytest.raises(ValueError, match="is a built ResNet network; give its config"):
        resolve_network_def(ResNet("basic", [1, 1, 1, 1], [4, 4, 4, 4]))


@pytest.fixture
def checkpoint(collapsed, tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"state_dict": collapsed.state_dict()}, path)
    return path


def test_export_from_checkpoint_with_a_resolved_dict(collapsed, checkpoint, tmp_path):
    out = export_from_checkpoint(checkpoint, NET_DEF, tmp_path / "bundle", CLASSES, [32, 32], name="from_ckpt")
    assert json.loads((out / "configs" / "metadata.json").read_text())["name"] == "from_ckpt"
    state = torch.load(out / "models" / "model.pt", weights_only=True)
    for k, v in collapsed.state_dict().items():
        torch.testing.assert_close(state[k], v)


def test_cli_export_resolves_a_bundle_config(collapsed, checkpoint, tmp_path, capsys):
    train = {
        "imports": ["$import torch"],
        "num_classes": 3,
        "widths": list(RECIPE.widths),
        "network_def": {**NET_DEF, "_target_": "ResNet", "num_classes": "@num_classes", "block_inplanes": "@widths"},
        "network": "$@network_def.to(torch.device('cpu'))",
    }
    config_file = tmp_path / "train.yaml"
    config_file.write_text(yaml.safe_dump(train))
    out = tmp_path / "exported"
    args = ["export", "--checkpoint", str(checkpoint), "--network-def", str(config_file), "--classes", *CLASSES]
    args += ["--spatial-size", "32", "32", "--out", str(out), "--modality", "CT", "--name", "cli_bundle"]
    assert main(args) == 0
    assert "bundle written to" in capsys.readouterr().out
    assert _inference(out)["network_def"] == NET_DEF  # references resolved, short target expanded
    assert json.loads((out / "configs" / "metadata.json").read_text())["name"] == "cli_bundle"
    capsys.readouterr()
    assert main(args) == 2
    assert capsys.readouterr().err == (
        f"medmerge: error: bundle folder {out} exists; pass overwrite=True (--overwrite) to replace it\n"
    )
    assert main([*args, "--overwrite"]) == 0


def test_cli_export_errors_name_the_file_and_field(checkpoint, tmp_path, capsys):
    def error(**changes) -> str:
        options = {
            "--checkpoint": str(checkpoint),
            "--network-def": str(net_file),
            "--classes": CLASSES,
            "--spatial-size": ["32", "32"],
            "--out": str(tmp_path / "out"),
            **changes,
        }
        argv = ["export"]
        for k, v in options.items():
            argv += [k, *v] if isinstance(v, list) else [k, v]
        capsys.readouterr()
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("medmerge: error: ") and captured.err.count("\n") == 1, captured.err
        return captured.err.removeprefix("medmerge: error: ").rstrip("\n")

    net_file = tmp_path / "net.json"
    net_file.write_text(json.dumps(NET_DEF))
    assert error(**{"--checkpoint": str(tmp_path / "nope.pt")}) == f"checkpoint file not found: {tmp_path / 'nope.pt'}"
    assert error(**{"--classes": ["a", "b"]}) == "the network has 3 outputs but 2 class names were given."
    bad_def = tmp_path / "bad.yaml"
    bad_def.write_text(yaml.safe_dump({"num_classes": 3, "net": dict(NET_DEF)}))
    assert error(**{"--network-def": str(bad_def)}) == (
        f"network_def file {bad_def} has neither '_target_' nor an id 'network_def'"
    )
    bad_def.write_text(yaml.safe_dump({"network_def": {**NET_DEF, "num_classes": "@num_classes"}}))
    assert f"could not resolve network_def file {bad_def}, id 'network_def'" in error(**{"--network-def": str(bad_def)})
    assert "`@num_classes` is not defined" in error(**{"--network-def": str(bad_def)})
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({**NET_DEF, "num_classes": 5}))
    msg = error(**{"--network-def": str(wrong)})
    assert msg.startswith(f"checkpoint {checkpoint} does not fit network_def monai.networks.nets.ResNet")
    assert "fc.weight (3, 32) in checkpoint vs (5, 32) in network" in msg
    wrong.write_text(json.dumps({**NET_DEF, "blockk": "basic"}))
    assert error(**{"--network-def": str(wrong)}) == (
        "could not build network_def monai.networks.nets.ResNet: "
        "TypeError: ResNet.__init__() got an unexpected keyword argument 'blockk'"
    )
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": {}, "recipe": RECIPE}, pickled)
    assert "refused to load checkpoint" in error(**{"--checkpoint": str(pickled)})
    assert error(**{"--modality": "XR"}) == "modality 'XR' is not supported; choose one of CT, MR, MRI, other"
    assert not (tmp_path / "out").exists()


def test_a_bundle_id_exports(collapsed, checkpoint, tmp_path):
    # how a training bundle calls the export: the architecture kept as data, handed over as a plain dict
    args = {k: v for k, v in NET_DEF.items() if k != "_target_"}
    config = {
        "bundle_root": str(tmp_path),
        "num_classes": 3,
        "network_target": NET_DEF["_target_"],
        "network_args": {**args, "num_classes": "@num_classes"},
        "network_def": "$monai.utils.instantiate(@network_target, 'default', **@network_args)",
        "export": {
            "_target_": "monai_medmerge.bundle.export_from_checkpoint",
            "checkpoint": str(checkpoint),
            "network_def": "$dict(_target_=@network_target, **@network_args)",
            "out_dir": "$@bundle_root + '/exported'",
            "class_names": CLASSES,
            "spatial_shape": [32, 32],
            "modality": "MR",
        },
    }
    out = ConfigParser(config).get_parsed_content("export")
    assert out == tmp_path / "exported"
    assert _inference(out)["network_def"] == NET_DEF
    # the id that builds the network is refused with a message that says what to give instead
    with pytest.raises(ValueError, match=r"id 'network_def' is an expression that builds a ResNet; give .* '_target_'"):
        resolve_network_def(config)


# --- where the bundle goes: exactly the named folder, nothing else ----------------------------------------------------
def _cli_export(checkpoint, net_file, out, *extra):
    argv = ["export", "--checkpoint", str(checkpoint), "--network-def", str(net_file), "--classes", *CLASSES]
    return main([*argv, "--spatial-size", "32", "32", "--out", str(out), "--no-torchscript", *extra])


def _cli_error(capsys, *args) -> str:
    capsys.readouterr()
    assert _cli_export(*args) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("medmerge: error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err and "bundle written" not in captured.out
    return captured.err.removeprefix("medmerge: error: ").rstrip("\n")


@pytest.fixture
def workspace(collapsed, tmp_path):
    """A user's folder: inputs in ``inputs/``, an old bundle ``b`` with a file of the user's inside, and siblings
    whose names look like the temporary names an export could use."""
    (tmp_path / "inputs").mkdir()
    checkpoint = tmp_path / "inputs" / "model.pt"
    torch.save({"state_dict": collapsed.state_dict()}, checkpoint)
    net_file = tmp_path / "inputs" / "net.json"
    net_file.write_text(json.dumps(NET_DEF))
    (tmp_path / "b" / "configs").mkdir(parents=True)
    (tmp_path / "b" / "configs" / "metadata.json").write_text("{}")
    (tmp_path / "b" / "mine.txt").write_text("the user's")
    for name in (".b.old", ".b.tmp", ".b.medmerge-tmp", "b.old"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "keep.txt").write_text(name)
    (tmp_path / "notes.txt").write_text("notes")
    return tmp_path, checkpoint, net_file


def test_overwrite_replaces_exactly_the_named_folder_with_normal_permissions(workspace, capsys):
    root, checkpoint, net_file = workspace
    before = snapshot(root)
    old_umask = os.umask(0o022)
    try:
        assert _cli_export(checkpoint, net_file, root / "b", "--overwrite") == 0
    finally:
        os.umask(old_umask)
    after = snapshot(root)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed and all(k == "b" or k.startswith("b/") for k in changed), changed
    assert not (root / "b" / "mine.txt").exists() and (root / "b" / "models" / "model.pt").is_file()
    bundle = {k: v for k, v in after.items() if k == "b" or k.startswith("b/")}
    assert {v[1] for v in bundle.values() if v[0] == "dir"} == {0o755}
    assert {v[1] for v in bundle.values() if v[0] == "file"} == {0o644}
    assert "bundle written to" in capsys.readouterr().out


def test_out_that_holds_an_input_is_refused(workspace, capsys):
    root, checkpoint, net_file = workspace
    before = snapshot(root)
    inputs = root / "inputs"
    assert _cli_error(capsys, checkpoint, net_file, inputs, "--overwrite") == (
        f"bundle folder {inputs} contains the checkpoint {checkpoint}: writing it would remove its own input; "
        "choose another output folder"
    )
    assert _cli_error(capsys, checkpoint, net_file, root, "--overwrite").startswith(
        f"bundle folder {root} contains the checkpoint {checkpoint}:"
    )
    assert _cli_error(capsys, checkpoint, net_file, checkpoint, "--overwrite").startswith(
        f"bundle folder {checkpoint} is the checkpoint {checkpoint}:"
    )
    other = root / "b" / "net.json"
    other.write_text(json.dumps(NET_DEF))
    before = snapshot(root)
    assert _cli_error(capsys, checkpoint, other, root / "b", "--overwrite").startswith(
        f"bundle folder {root / 'b'} contains the network_def file {other}:"
    )
    assert snapshot(root) == before


def test_out_that_is_a_file_or_exists_is_refused(workspace, capsys):
    root, checkpoint, net_file = workspace
    before = snapshot(root)
    notes = root / "notes.txt"
    for extra in ((), ("--overwrite",)):
        assert _cli_error(capsys, checkpoint, net_file, notes, *extra) == (
            f"bundle folder {notes} is a file, not a folder; it is left as it is: choose another path"
        )
    assert _cli_error(capsys, checkpoint, net_file, notes / "b") == (
        f"cannot write bundle folder {notes / 'b'}: {notes} is a file, not a folder"
    )
    assert _cli_error(capsys, checkpoint, net_file, root / "b") == (
        f"bundle folder {root / 'b'} exists; pass overwrite=True (--overwrite) to replace it"
    )
    assert snapshot(root) == before


def test_unwritable_target_is_one_line_and_debug_shows_the_traceback(workspace, capsys, monkeypatch):
    root, checkpoint, net_file = workspace
    locked = root / "locked"
    locked.mkdir()
    before = snapshot(root)

    def denied(*args, dir=None, **kwargs):  # what mkdtemp meets in a folder the user may not write
        raise PermissionError(13, "Permission denied", os.path.join(str(dir), ".b.x"))

    monkeypatch.setattr("tempfile.mkdtemp", denied)
    assert _cli_error(capsys, checkpoint, net_file, locked / "b") == (
        f"cannot write bundle folder {locked / 'b'}: Permission denied ({locked / '.b.x'})"
    )
    with pytest.raises(PermissionError, match="cannot write bundle folder"):
        _cli_export(checkpoint, net_file, locked / "b", "--debug")
    monkeypatch.setenv("MEDMERGE_DEBUG", "1")
    with pytest.raises(PermissionError, match="cannot write bundle folder"):
        _cli_export(checkpoint, net_file, locked / "b")
    monkeypatch.undo()
    assert snapshot(root) == before
    if os.geteuid() != 0:  # root writes anywhere: the real permission check needs an ordinary user
        locked.chmod(0o500)
        try:
            assert _cli_error(capsys, checkpoint, net_file, locked / "b").startswith(
                f"cannot write bundle folder {locked / 'b'}: Permission denied"
            )
        finally:
            locked.chmod(0o755)

from __future__ import annotations

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
from conftest import make_source
from monai.bundle import ConfigParser, ConfigWorkflow
from monai.networks.nets import ResNet

from monai_medmerge.bundle import export_bundle, export_from_checkpoint, resolve_network_def
from monai_medmerge.cli import main
from monai_medmerge.networks import KernelMerge
from monai_medmerge.sources import load_source
from monai_medmerge.workflows.transfer import Recipe, build_network

SCHEMA = Path(__file__).resolve().parents[3] / "shared" / "monai" / "meta_schema_20240725.json"
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
    assert set(meta["required_packages_version"]) == {"itk", "pytorch-ignite", "pyyaml", "fire"}
    itk_version = meta["required_packages_version"]["itk"]
    assert itk_version == "*" or itk_version[0].isdigit()
    if not SCHEMA.exists():
        pytest.skip(f"MONAI metadata schema not found at {SCHEMA}")
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(meta, json.loads(SCHEMA.read_text()))
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


def test_preprocessing_follows_modality_reader_and_pixdim(collapsed, tmp_path):
    def transforms(**kwargs):
        out = export_bundle(collapsed, NET_DEF, tmp_path / "b", CLASSES, [32, 32], overwrite=True, **kwargs)
        config = _inference(out)
        return config["image_reader"]["_target_"], [t["_target_"] for t in config["preprocessing"]["transforms"]]

    reader, names = transforms()
    assert reader == "ITKReader"
    # a 2-D network: no orientation, normalised intensities
    assert names == ["LoadImaged", "EnsureChannelFirstd", "NormalizeIntensityd", "Resized", "EnsureTyped"]
    reader, names = transforms(modality="mri", reader="pilreader", pixdim=(0.5, 0.5))
    assert reader == "PILReader"
    assert names[2:4] == ["Spacingd", "ScaleIntensityRangePercentilesd"]
    meta = json.loads((tmp_path / "b" / "configs" / "metadata.json").read_text())
    assert "pillow" in meta["required_packages_version"] and "itk" not in meta["required_packages_version"]
    assert meta["network_data_format"]["inputs"]["image"]["modality"] == "MR"


def test_inference_workflow_has_monai_properties_and_strict_reader(collapsed, tmp_path):
    out = export_bundle(collapsed, NET_DEF, tmp_path / "bundle", CLASSES, [32, 32])
    data = tmp_path / "data"
    data.mkdir()
    # NumpyReader would read this file; the bundle's reader is ITKReader, which cannot: an error, not a fallback
    np.save(data / "image.npy", np.zeros((32, 32), np.float32))
    workflow = ConfigWorkflow(
        config_file=str(out / "configs" / "inference.yaml"),
        workflow_type="infer",
        bundle_root=str(out),
        dataset_dir=str(data),
        output_dir=str(tmp_path / "pred"),
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    with pytest.raises(RuntimeError) as e:
        workflow.run()
    chain, err = [], e.value
    while err is not None:
        chain.append(str(err))
        err = err.__cause__
    assert any("cannot find a suitable reader for file" in m and "image.npy" in m for m in chain)
    assert not (tmp_path / "pred" / "predictions.csv").exists()

    workflow = ConfigWorkflow(
        config_file=str(out / "configs" / "inference.yaml"),
        workflow_type="infer",
        bundle_root=str(out),
        dataset_dir=str(tmp_path / "empty"),
    )
    workflow.initialize()
    with pytest.raises(SystemExit, match="no input images: nothing matches .*empty"):
        workflow.run()


def test_bad_exports_write_nothing(collapsed, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="plain MONAI or torch network"):
        export_bundle(collapsed, {"_target_": "monai_medmerge.networks.KernelMerge"}, tmp_path / "b", CLASSES, [32])
    with pytest.raises(ValueError, match="does not match"):
        export_bundle(collapsed, {**NET_DEF, "num_classes": 5}, tmp_path / "b", CLASSES, [32, 32])
    with pytest.raises(ValueError, match="2 class names"):
        export_bundle(collapsed, NET_DEF, tmp_path / "b", CLASSES[:2], [32, 32])
    with pytest.raises(ValueError, match="reader 'DicomReader' is not one of ITKReader, NibabelReader"):
        export_bundle(collapsed, NET_DEF, tmp_path / "b", CLASSES, [32, 32], reader="DicomReader")
    with pytest.raises(ValueError, match="modality 'XR' is not one of CT, MR, MRI, other"):
        export_bundle(collapsed, NET_DEF, tmp_path / "b", CLASSES, [32, 32], modality="XR")
    with pytest.raises(ValueError, match=r"window must be \(low, high\) with low < high, got \(100, -100\)"):
        export_bundle(collapsed, NET_DEF, tmp_path / "b", CLASSES, [32, 32], modality="CT", window=(100, -100))
    with pytest.raises(ValueError, match=r"pixdim \[1.0\] needs one value per spatial axis of \[32, 32\]"):
        export_bundle(collapsed, NET_DEF, tmp_path / "b", CLASSES, [32, 32], pixdim=[1.0])
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
    with pytest.raises(SystemExit, match=f"medmerge export: bundle folder {out} exists"):
        main(args)
    assert main([*args, "--overwrite"]) == 0


def test_cli_export_errors_name_the_file_and_field(checkpoint, tmp_path):
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
        with pytest.raises(SystemExit) as e:
            main(argv)
        return str(e.value.code)

    net_file = tmp_path / "net.json"
    net_file.write_text(json.dumps(NET_DEF))
    assert (
        error(**{"--checkpoint": str(tmp_path / "nope.pt")})
        == f"medmerge export: checkpoint file not found: {tmp_path / 'nope.pt'}"
    )
    assert (
        error(**{"--classes": ["a", "b"]}) == "medmerge export: the network has 3 outputs but 2 class names were given."
    )
    bad_def = tmp_path / "bad.yaml"
    bad_def.write_text(yaml.safe_dump({"num_classes": 3, "net": dict(NET_DEF)}))
    assert error(**{"--network-def": str(bad_def)}) == (
        f"medmerge export: network_def file {bad_def} has neither '_target_' nor an id 'network_def'"
    )
    bad_def.write_text(yaml.safe_dump({"network_def": {**NET_DEF, "num_classes": "@num_classes"}}))
    assert f"could not resolve network_def file {bad_def}, id 'network_def'" in error(**{"--network-def": str(bad_def)})
    assert "`@num_classes` is not defined" in error(**{"--network-def": str(bad_def)})
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({**NET_DEF, "num_classes": 5}))
    msg = error(**{"--network-def": str(wrong)})
    assert msg.startswith(
        f"medmerge export: checkpoint {checkpoint} does not fit network_def monai.networks.nets.ResNet"
    )
    assert "fc.weight (3, 32) in checkpoint vs (5, 32) in network" in msg
    wrong.write_text(json.dumps({**NET_DEF, "blockk": "basic"}))
    assert error(**{"--network-def": str(wrong)}) == (
        "medmerge export: could not build network_def monai.networks.nets.ResNet: "
        "TypeError: ResNet.__init__() got an unexpected keyword argument 'blockk'"
    )
    pickled = tmp_path / "pickled.pt"
    torch.save({"state_dict": {}, "recipe": RECIPE}, pickled)
    assert "refused to load checkpoint" in error(**{"--checkpoint": str(pickled)})
    assert error(**{"--modality": "XR"}) == "medmerge export: modality 'XR' is not one of CT, MR, MRI, other."
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

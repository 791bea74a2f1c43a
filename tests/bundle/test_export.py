from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_source

from monai_medmerge.bundle import export_bundle
from monai_medmerge.networks import KernelMerge
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
    inference = json.loads((out / "configs" / "inference.json").read_text())
    assert "monai_medmerge" not in json.dumps(inference)
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = torch.softmax(collapsed(x), 1)
    torch.save(x, tmp_path / "x.pt")
    # a child process in which importing monai_medmerge fails: the bundle must not need it
    code = f"""
import sys, torch
sys.modules["monai_medmerge"] = None
from monai.bundle import ConfigParser
p = ConfigParser(); p.read_config({str(out / "configs" / "inference.json")!r}); p["bundle_root"] = {str(out)!r}
net = p.get_parsed_content("network"); p.get_parsed_content("initialize")
x = torch.load({str(tmp_path / "x.pt")!r}, weights_only=True)
with torch.no_grad():
    y = p.get_parsed_content("postprocessing")(net(x)[0])
    ts = torch.jit.load({str(out / "models" / "model.ts")!r})(x)
torch.save({{"y": y, "ts": torch.softmax(ts, 1)}}, {str(tmp_path / "y.pt")!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path)
    got = torch.load(tmp_path / "y.pt", weights_only=True)
    torch.testing.assert_close(got["y"], expected[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["ts"], expected, rtol=1e-4, atol=1e-5)


def test_metadata_is_valid_and_net_in_out_verifies(collapsed, tmp_path):
    out = export_bundle(collapsed, NET_DEF, tmp_path / "bundle", CLASSES, [32, 32])
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "red", "1": "green", "2": "blue"}
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
        str(out / "configs" / "inference.json"),
    ]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=out)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "data shape of network is verified with no error" in (run.stdout + run.stderr)


def test_bad_exports_write_nothing(collapsed, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="plain MONAI or torch network"):
        export_bundle(collapsed, {"_target_": "monai_medmerge.networks.KernelMerge"}, tmp_path / "b", CLASSES, [32])
    with pytest.raises(ValueError, match="does not match"):
        export_bundle(collapsed, {**NET_DEF, "num_classes": 5}, tmp_path / "b", CLASSES, [32, 32])
    with pytest.raises(ValueError, match="2 class names"):
        export_bundle(collapsed, NET_DEF, tmp_path / "b", CLASSES[:2], [32, 32])
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

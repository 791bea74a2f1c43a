"""The exported bundle sees what training saw: for NIfTI (2-D and 3-D, down- and up-sizing, flipped and oblique
affines, anisotropic spacing with ``pixdim``), PNG (RGB into a 1-channel network, RGBA into a 3-channel one), a
single DICOM slice and a DICOM series, in each modality, the tensor of the training pipeline (evaluation mode)
equals the exported bundle's preprocessing output, computed in the plain environment without monai_medmerge, and
the bundle's predictions (``python -m monai.bundle run`` in that environment) equal the network's on the training
pipeline's tensors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.networks.nets import ResNet

from monai_medmerge.bundle import export_bundle
from monai_medmerge.data.pipelines import classification_transforms

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")
Image = pytest.importorskip("PIL.Image")
pytest.importorskip("itk")

PLAIN_ENV = Path(os.environ.get("MEDMERGE_PLAIN_ENV", "/tmp/medmerge_plain_env"))
PLAIN_PY = PLAIN_ENV / "bin" / "python"
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
CLASSES = ["a", "b", "c"]

# In the plain environment: every bundle's preprocessing on its files (saved as .npy), then every bundle's whole
# inference workflow, as `python -m monai.bundle run` runs it (ConfigWorkflow: initialize, run).
PLAIN_SCRIPT = r"""
import json, sys
from pathlib import Path
import numpy as np
from monai.bundle import ConfigParser, ConfigWorkflow

cases = json.loads(Path(sys.argv[1]).read_text())
for case in cases:
    bundle = case["bundle"]
    parser = ConfigParser()
    parser.read_config(bundle + "/configs/inference.yaml")
    parser["bundle_root"] = bundle
    pre = parser.get_parsed_content("preprocessing")
    for i, f in enumerate(case["files"]):
        np.save(case["out"] + f"/plain_{i}.npy", pre({"image": f})["image"].numpy())
    workflow = ConfigWorkflow(
        config_file=bundle + "/configs/inference.yaml", workflow_type="infer", bundle_root=bundle,
        datalist=[{"image": f} for f in case["files"]], output_dir=case["out"],
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
print("done", len(cases))
"""


def _net(dims: int, channels: int, seed: int) -> tuple[ResNet, dict]:
    net_def = {
        "_target_": "monai.networks.nets.ResNet",
        "block": "basic",
        "layers": [1, 1, 1, 1],
        "block_inplanes": [4, 8, 8, 16],
        "spatial_dims": dims,
        "n_input_channels": channels,
        "conv1_t_size": 3,
        "conv1_t_stride": 1,
        "no_max_pool": True,
        "num_classes": len(CLASSES),
    }
    torch.manual_seed(seed)
    net = ResNet(**{k: v for k, v in net_def.items() if k != "_target_"}).eval()
    with torch.no_grad():
        net.fc.weight.mul_(20)  # spread the probabilities, so that a small input difference would show
    return net, net_def


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> str:
    nib.save(nib.Nifti1Image(array.astype(np.float32), affine), str(path))
    return str(path)


def _oblique(spacing: tuple[float, float, float]) -> np.ndarray:
    angle = 0.3
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag(spacing)
    affine[:3, 3] = (-10.0, 4.0, 2.5)
    return affine


def _cases(root: Path) -> list[dict]:
    """Each case: the pipeline settings of one exported bundle, and the files it must see as training did."""
    rng = np.random.default_rng(0)
    data = root / "data"
    data.mkdir()
    mr2d = rng.gamma(2.0, 300.0, (97, 81))
    small2d = rng.normal(5.0, 2.0, (20, 14))
    mr3d = rng.gamma(2.0, 300.0, (41, 37, 45))
    ct3d = rng.normal(-300.0, 500.0, (30, 26, 12))
    rgb = rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)
    rgba = rng.integers(0, 256, (21, 17, 4), dtype=np.uint8)
    Image.fromarray(rgb).save(data / "rgb.png")
    Image.fromarray(rgba).save(data / "rgba.png")
    series = shutil.copytree(TEST_FILES / "dicomdirtests" / "98892001" / "CT5N", data / "ct_series")
    return [
        {  # 2-D MR, shrunk, flipped x and anisotropic; a second file with depth 1 and another flip
            "kind": "nifti", "spatial_size": [32, 32], "modality": "MR", "channels": 1,
            "files": [
                _nifti(data / "mr2d.nii.gz", mr2d, np.diag([-0.7, 1.2, 1.0, 1.0])),
                _nifti(data / "mr2d_depth1.nii.gz", mr2d[..., None], np.diag([0.9, -1.1, 3.0, 1.0])),
            ],
        },
        {  # 2-D plain normalisation, enlarged, flipped y
            "kind": "nifti", "spatial_size": [48, 40], "modality": "other", "channels": 1,
            "files": [_nifti(data / "small2d.nii.gz", small2d, np.diag([1.0, -2.0, 1.0, 1.0]))],
        },
        {  # 3-D MR, resampled to 2 mm first, then sized; flipped x, anisotropic
            "kind": "nifti", "spatial_size": [16, 16, 16], "modality": "MR", "pixdim": [2.0, 2.0, 2.0],
            "channels": 1,
            "files": [_nifti(data / "mr3d.nii.gz", mr3d, np.diag([-0.8, 1.3, 2.0, 1.0]))],
        },
        {  # 3-D CT, oblique affine, anisotropic target spacing, enlarged along z
            "kind": "nifti", "spatial_size": [20, 20, 24], "modality": "CT", "window": [-500, 700],
            "pixdim": [1.5, 1.5, 2.5], "channels": 1,
            "files": [_nifti(data / "ct3d.nii.gz", ct3d, _oblique((1.2, 0.9, 3.0)))],
        },
        {  # a 3-channel PNG into a 1-channel network
            "kind": "png", "spatial_size": [24, 24], "modality": "other", "channels": 1,
            "files": [str(data / "rgb.png")],
        },
        {  # RGBA into a 3-channel network, enlarged
            "kind": "png", "spatial_size": [32, 28], "modality": "other", "channels": 3,
            "files": [str(data / "rgba.png")],
        },
        {  # single DICOM slices: CT (window) and MR (percentiles)
            "kind": "dicom", "spatial_size": [40, 40], "modality": "CT", "window": [-200, 300], "channels": 1,
            "files": [str(TEST_FILES / "CT_small.dcm")],
        },
        {
            "kind": "dicom", "spatial_size": [48, 48], "modality": "MR", "channels": 1,
            "files": [str(TEST_FILES / "MR_small.dcm")],
        },
        {  # a single DICOM slice through ITKReader (read as 3-D of depth 1) into a 2-D network
            "kind": "dicom", "reader": "ITKReader", "spatial_size": [24, 24], "modality": "CT", "channels": 1,
            "files": [str(TEST_FILES / "CT_small.dcm")],
        },
        {  # a CT series folder into a 3-D network
            "kind": "dicom_series", "spatial_size": [16, 16, 8], "modality": "CT", "window": [-1000, 400],
            "channels": 1, "files": [str(series)],
        },
    ]  # fmt: skip


pytestmark = pytest.mark.skipif(
    not PLAIN_PY.exists(),
    reason=f"no plain MONAI environment at {PLAIN_ENV}: run `bash .ci/plain_env` (it creates one without "
    "monai_medmerge; set MEDMERGE_PLAIN_ENV to place it elsewhere)",
)


def test_exported_bundle_preprocesses_and_predicts_as_training(tmp_path):
    cases = _cases(tmp_path)
    expected = []
    for n, case in enumerate(cases):
        settings = {k: v for k, v in case.items() if k != "files"}
        train_eval = classification_transforms(**settings, train=False, label_key=None)
        tensors = [train_eval({"image": f})["image"].as_tensor() for f in case["files"]]
        net, net_def = _net(len(case["spatial_size"]), case["channels"], seed=n)
        with torch.no_grad():
            probs = [torch.softmax(net(x[None]), 1)[0].numpy() for x in tensors]
        export_settings = {k: v for k, v in settings.items() if k not in ("spatial_size", "channels")}
        case["bundle"] = str(
            export_bundle(
                net, net_def, tmp_path / f"bundle{n}", CLASSES, case["spatial_size"], in_channels=case["channels"],
                torchscript=False, **export_settings,
            )
        )  # fmt: skip
        case["out"] = str(tmp_path / f"out{n}")
        Path(case["out"]).mkdir()
        expected.append((tensors, probs))

    (tmp_path / "cases.json").write_text(json.dumps(cases))
    (tmp_path / "plain.py").write_text(PLAIN_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [str(PLAIN_PY), str(tmp_path / "plain.py"), str(tmp_path / "cases.json")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]

    for case, (tensors, probs) in zip(cases, expected, strict=True):
        label = f"{case['kind']} {case['modality']} {case['spatial_size']}"
        for i, tensor in enumerate(tensors):
            plain = np.load(Path(case["out"]) / f"plain_{i}.npy")
            assert plain.shape == tuple(tensor.shape) == (case["channels"], *case["spatial_size"]), label
            assert np.abs(plain - tensor.numpy()).max() <= 1e-5, label
        with open(Path(case["out"]) / "predictions.csv", newline="") as f:
            header, *rows = list(csv.reader(f))  # a header row: file, then the class names
        assert header[0] == "file", label
        assert [row[0] for row in rows] == case["files"], label
        for row, prob in zip(rows, probs, strict=True):
            np.testing.assert_allclose(np.array(row[1:], dtype=float), prob, rtol=1e-4, atol=1e-5, err_msg=label)


def test_parity_is_not_vacuous(tmp_path):
    """The settings matter: the same 2-D MR file through the pipeline of another modality, size or orientation
    gives another tensor, so equal tensors above mean the same steps ran."""
    case = _cases(tmp_path)[0]
    base = classification_transforms("nifti", [32, 32], modality="MR", label_key=None)
    x = base({"image": case["files"][0]})["image"]
    for other in (
        classification_transforms("nifti", [32, 32], modality="other", label_key=None),
        classification_transforms("nifti", [32, 32], modality="MR", percentiles=(5, 95), label_key=None),
        classification_transforms("nifti", [32, 32], modality="MR", pixdim=(2.0, 2.0), label_key=None),
    ):
        y = other({"image": case["files"][0]})["image"]
        assert y.shape == x.shape and (y - x).abs().max() > 1e-3

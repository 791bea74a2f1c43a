"""An exported bundle runs with plain MONAI: in a virtual environment without monai_medmerge (made by .ci/plain_env),
``python -m monai.bundle run`` classifies a NIfTI volume and a DICOM series with the exported network."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_source
from monai.bundle import ConfigParser
from monai.networks.nets import ResNet

from monai_medmerge.bundle import export_bundle
from monai_medmerge.networks import KernelMerge

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")
pytest.importorskip("itk")

PLAIN_ENV = Path(os.environ.get("MEDMERGE_PLAIN_ENV", "/tmp/medmerge_plain_env"))
PLAIN_PY = PLAIN_ENV / "bin" / "python"
SHAPE = [16, 16, 16]
CLASSES = ["normal", "benign", "malignant"]
NET_DEF = {
    "_target_": "monai.networks.nets.ResNet",
    "block": "basic",
    "layers": [1, 1, 1, 1],
    "block_inplanes": [4, 8, 8, 16],
    "spatial_dims": 3,
    "n_input_channels": 1,
    "conv1_t_size": 3,
    "conv1_t_stride": 1,
    "no_max_pool": True,
    "num_classes": 3,
}
CT_SERIES = Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"

pytestmark = pytest.mark.skipif(
    not PLAIN_PY.exists(),
    reason=f"no plain MONAI environment at {PLAIN_ENV}: run `bash .ci/plain_env` (it creates one without "
    "monai_medmerge; set MEDMERGE_PLAIN_ENV to place it elsewhere)",
)


def _plain(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    # outside the repository and without PYTHONPATH, so that nothing can import monai_medmerge from the checkout
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(PLAIN_PY), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def collapsed():
    def ctor(num_classes):
        kwargs = {k: v for k, v in NET_DEF.items() if k != "_target_"}
        return ResNet(**{**kwargs, "num_classes": num_classes})

    merge = KernelMerge([make_source(ctor, 0, num_classes=4), make_source(ctor, 1, num_classes=2)], "fc", 3, anchor=0)
    with torch.no_grad():
        merge.merge_logits.normal_(generator=torch.Generator().manual_seed(0))
        net = merge.collapse()
        net.fc.weight.mul_(20)  # well separated probabilities, so that the predicted classes mean something
    return net


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> list[Path]:
    """A 3-D NIfTI volume and a 5-slice CT DICOM series folder (from pydicom's test files)."""
    if not CT_SERIES.is_dir():
        pytest.skip(f"pydicom's test series not found at {CT_SERIES}")
    data = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    volume = rng.normal(-200.0, 400.0, (20, 18, 12)).astype(np.float32)
    nib.save(nib.Nifti1Image(volume, np.diag([1.2, 1.0, 2.5, 1.0])), data / "volume.nii.gz")
    shutil.copytree(CT_SERIES, data / "ct_series")
    return [data / "ct_series", data / "volume.nii.gz"]


def test_plain_env_lacks_the_plugin(tmp_path):
    run = _plain(["-c", "import monai_medmerge"], tmp_path)
    assert run.returncode != 0 and "No module named 'monai_medmerge'" in run.stderr


def test_monai_bundle_run_classifies_nifti_and_dicom_series(collapsed, inputs, tmp_path):
    bundle = export_bundle(collapsed, NET_DEF, tmp_path / "bundle", CLASSES, SHAPE, modality="CT")
    out = tmp_path / "predictions"
    config = bundle / "configs" / "inference.yaml"
    args = ["-m", "monai.bundle", "run", "--config_file", str(config), "--bundle_root", str(bundle)]
    run = _plain([*args, "--dataset_dir", str(inputs[0].parent), "--output_dir", str(out)], tmp_path)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]

    # ClassificationSaver's CSV: no header; per input its path, then one probability per class
    with open(out / "predictions.csv", newline="") as f:
        lines = list(csv.reader(f))
    assert [line[0] for line in lines] == [str(p) for p in inputs]  # one row per input, in datalist order
    rows = {line[0]: np.array([float(v) for v in line[1:]]) for line in lines}
    for probs in rows.values():
        assert probs.shape == (len(CLASSES),)
        assert abs(probs.sum() - 1.0) < 1e-5

    # the same preprocessing in this process (same MONAI, ITK) and the collapsed network give the same probabilities
    parser = ConfigParser()
    parser.read_config(str(config))
    parser["bundle_root"] = str(bundle)
    preprocessing = parser.get_parsed_content("preprocessing")
    for path in inputs:
        x = preprocessing({"image": str(path)})["image"]
        assert tuple(x.shape) == (1, *SHAPE)
        with torch.no_grad():
            expected = torch.softmax(collapsed(x.as_tensor()[None]), 1)[0].numpy()
        np.testing.assert_allclose(rows[str(path)], expected, rtol=1e-4, atol=1e-5)
        assert rows[str(path)].argmax() == expected.argmax()


def test_verify_net_in_out_passes(collapsed, tmp_path):
    bundle = export_bundle(collapsed, NET_DEF, tmp_path / "bundle", CLASSES, SHAPE, modality="CT")
    run = _plain(
        [
            "-m",
            "monai.bundle",
            "verify_net_in_out",
            "network_def",
            "--meta_file",
            str(bundle / "configs" / "metadata.json"),
            "--config_file",
            str(bundle / "configs" / "inference.yaml"),
            "--device",
            "cpu",
        ],
        tmp_path,
    )
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert "data shape of network is verified with no error" in run.stdout + run.stderr

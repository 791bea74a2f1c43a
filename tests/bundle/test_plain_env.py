"""An exported bundle runs with plain MONAI: in a virtual environment without monai_medmerge (made by .ci/plain_env),
``python -m monai.bundle run`` classifies a NIfTI volume and a DICOM series with the exported network; and, per image
reader, in a virtual environment that holds exactly what the bundle lists (made by .ci/bundle_env), it classifies
every readable input and lists the unreadable ones."""

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
from conftest import make_source
from monai.bundle import ConfigParser
from monai.networks.nets import ResNet

from monai_medmerge.bundle import export_bundle
from monai_medmerge.bundle.inference import pip_requirements
from monai_medmerge.data.pipelines import classification_transforms
from monai_medmerge.data.transforms import READER_PACKAGES
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

BUNDLE_ENV = Path(os.environ.get("MEDMERGE_BUNDLE_ENV", "/tmp/medmerge_bundle_env"))
# the module each reader's package provides
READER_MODULES = {"PILReader": "PIL", "NibabelReader": "nibabel", "PydicomReader": "pydicom", "ITKReader": "itk"}

needs_plain_env = pytest.mark.skipif(
    not PLAIN_PY.exists(),
    reason=f"no plain MONAI environment at {PLAIN_ENV}: run `bash .ci/plain_env` (it creates one without "
    "monai_medmerge; set MEDMERGE_PLAIN_ENV to place it elsewhere)",
)


def _plain(args: list[str], cwd: Path, python: Path = PLAIN_PY) -> subprocess.CompletedProcess:
    # outside the repository and without PYTHONPATH, so that nothing can import monai_medmerge from the checkout
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def read_predictions(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """The header and the rows (path -> probabilities, in file order) of an exported bundle's predictions.csv."""
    with open(path, newline="") as f:
        header, *lines = list(csv.reader(f))
    return header, {line[0]: np.array([float(v) for v in line[1:]]) for line in lines}


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


@needs_plain_env
def test_plain_env_lacks_the_plugin(tmp_path):
    run = _plain(["-c", "import monai_medmerge"], tmp_path)
    assert run.returncode != 0 and "No module named 'monai_medmerge'" in run.stderr


@needs_plain_env
def test_monai_bundle_run_classifies_nifti_and_dicom_series(collapsed, inputs, tmp_path):
    bundle = export_bundle(collapsed, NET_DEF, tmp_path / "bundle", CLASSES, SHAPE, kind="dicom_series", modality="CT")
    out = tmp_path / "predictions"
    config = bundle / "configs" / "inference.yaml"
    args = ["-m", "monai.bundle", "run", "--config_file", str(config), "--bundle_root", str(bundle)]
    run = _plain([*args, "--dataset_dir", str(inputs[0].parent), "--output_dir", str(out)], tmp_path)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]

    # a header row (file, then the class names); per input its path, then one probability per class
    header, rows = read_predictions(out / "predictions.csv")
    assert header == ["file", *CLASSES]
    assert list(rows) == [str(p) for p in inputs]  # one row per input, in datalist order
    assert (out / "unreadable.csv").read_text() == "file,reason\n"
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


@needs_plain_env
def test_verify_net_in_out_passes(collapsed, tmp_path):
    bundle = export_bundle(collapsed, NET_DEF, tmp_path / "bundle", CLASSES, SHAPE, kind="dicom_series", modality="CT")
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


# --- per reader: a virtual environment with exactly the packages the bundle lists -------------------------------------
# reader -> (kind of the training pipeline, spatial dims, modality, more settings)
MINIMAL_CASES = {
    "NibabelReader": ("nifti", 3, "MR", {}),
    "PILReader": ("png", 2, "other", {}),
    "PydicomReader": ("dicom", 2, "CT", {}),
    "ITKReader": ("dicom_series", 3, "CT", {"pixdim": [1.0, 1.0, 2.0]}),  # resampling too
}


def _minimal_inputs(kind: str, data: Path) -> tuple[list[Path], Path]:
    """Readable inputs of ``kind`` in ``data`` and one unreadable input beside them."""
    rng = np.random.default_rng(0)
    data.mkdir()
    if kind in ("nifti", "dicom_series"):
        volume = rng.normal(-200.0, 400.0, (20, 18, 12)).astype(np.float32)
        nib.save(nib.Nifti1Image(volume, np.diag([1.2, 1.0, 2.5, 1.0])), data / "volume.nii.gz")
    if kind == "nifti":
        (data / "bad.nii.gz").write_bytes(b"not a NIfTI file")
        return [data / "volume.nii.gz"], data / "bad.nii.gz"
    if kind == "dicom_series":
        if not CT_SERIES.is_dir():
            pytest.skip(f"pydicom's test series not found at {CT_SERIES}")
        shutil.copytree(CT_SERIES, data / "ct_series")
        (data / "empty_series").mkdir()
        return [data / "ct_series", data / "volume.nii.gz"], data / "empty_series"
    if kind == "png":
        from PIL import Image

        Image.fromarray(rng.integers(0, 256, (24, 20), dtype=np.uint8)).save(data / "gray.png")
        Image.fromarray(rng.integers(0, 256, (18, 22, 3), dtype=np.uint8)).save(data / "rgb.png")
        (data / "bad.png").write_bytes(b"not a PNG file")
        return [data / "gray.png", data / "rgb.png"], data / "bad.png"
    files = Path(pydicom.__file__).parent / "data" / "test_files"
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copy(files / name, data / name)
    (data / "bad.dcm").write_bytes(b"not a DICOM file")
    return [data / "CT_small.dcm", data / "MR_small.dcm"], data / "bad.dcm"


@pytest.mark.parametrize("reader", list(MINIMAL_CASES))
def test_bundle_runs_with_exactly_its_listed_packages(reader, tmp_path):
    """The bundle's own list (metadata ``required_packages_version`` with torch, MONAI and numpy) is all its
    inference needs: in an environment with exactly that list, every readable input is classified as in training,
    the unreadable one is listed with the reason, and the run exits with status 1 after writing both."""
    python = BUNDLE_ENV / reader / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no environment for {reader} at {BUNDLE_ENV / reader}: run `bash .ci/bundle_env {reader}`")
    pytest.importorskip(READER_MODULES[reader])
    kind, dims, modality, settings = MINIMAL_CASES[reader]
    shape = SHAPE[:dims]
    torch.manual_seed(0)
    network = ResNet(**{**{k: v for k, v in NET_DEF.items() if k != "_target_"}, "spatial_dims": dims}).eval()
    with torch.no_grad():
        network.fc.weight.mul_(20)  # well separated probabilities
    net_def = {**NET_DEF, "spatial_dims": dims}
    bundle = export_bundle(
        network, net_def, tmp_path / "bundle", CLASSES, shape, kind=kind, modality=modality, **settings
    )

    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    # the reader's package, nibabel where the pipeline orients the image (MONAI's Orientation needs it), the workflow's
    packages = {READER_PACKAGES[reader], "pytorch-ignite", "pyyaml", "fire"} | ({"nibabel"} if kind != "png" else set())
    assert set(metadata["required_packages_version"]) == packages
    stamp = (BUNDLE_ENV / reader / ".medmerge_bundle_env").read_text().split()
    assert stamp == pip_requirements(metadata), (
        f"stale environment: run `MEDMERGE_BUNDLE_ENV_FRESH=1 bash .ci/bundle_env {reader}`"
    )
    # nothing else: the other readers' packages (and the plugin) are absent
    probe = _plain(
        ["-c", "import importlib.util as u, sys; print(sorted(m for m in sys.argv[1:] if u.find_spec(m)))",
         *READER_MODULES.values(), "monai_medmerge"],
        tmp_path, python,
    )  # fmt: skip
    listed = sorted(m for r, m in READER_MODULES.items() if READER_PACKAGES[r] in packages)
    assert probe.stdout.strip() == repr(listed), probe.stdout + probe.stderr

    readable, unreadable = _minimal_inputs(kind, tmp_path / "data")
    out = tmp_path / "predictions"
    config = bundle / "configs" / "inference.yaml"
    args = ["-m", "monai.bundle", "run", "--config_file", str(config), "--bundle_root", str(bundle)]
    run = _plain([*args, "--dataset_dir", str(tmp_path / "data"), "--output_dir", str(out)], tmp_path, python)
    log = (run.stdout + run.stderr)[-4000:]
    assert run.returncode == 1, log
    assert "Traceback" not in run.stderr, log
    last = run.stderr.strip().splitlines()[-1]
    total = len(readable) + 1
    assert last.startswith(f"1 of {total} input(s) could not be read and have no prediction (the first: {unreadable}:")
    assert f"listed in {out / 'unreadable.csv'}; the predictions of the others are in {out / 'predictions.csv'}" in last

    header, rows = read_predictions(out / "predictions.csv")
    assert header == ["file", *CLASSES]
    assert sorted(rows) == sorted(str(p) for p in readable)
    preprocessing = classification_transforms(kind, shape, modality=modality, label_key=None, **settings)
    for path in readable:
        x = preprocessing({"image": str(path)})["image"]
        with torch.no_grad():
            expected = torch.softmax(network(x.as_tensor()[None]), 1)[0].numpy()
        np.testing.assert_allclose(rows[str(path)], expected, rtol=1e-4, atol=1e-5, err_msg=str(path))
    with open(out / "unreadable.csv", newline="") as f:
        report = list(csv.reader(f))
    assert report[0] == ["file", "reason"] and [r[0] for r in report[1:]] == [str(unreadable)]
    assert report[1][1] and (reader in report[1][1] or "empty" in report[1][1]), report

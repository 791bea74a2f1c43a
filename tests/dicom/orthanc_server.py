"""Helpers for the DICOMweb tests: a real Orthanc server started by the test, and generated DICOM series.

Not a conftest (a second ``conftest`` module would clash with ``tests/conftest.py`` on ``sys.path``); the test
modules import what they need from here.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from medmerge_bench.orthanc import OrthancServer, OrthancUnavailable

USER = "medmerge"
PASSWORD = "s3cret-Pa55"
SKIP_HINT = (
    "install them with `bash .ci/orthanc` (apt-get install -y orthanc orthanc-dicomweb; pip install dicomweb-client)"
)


def require_dicomweb_client() -> None:
    """Skip the calling test when ``dicomweb-client`` is not installed."""
    try:
        import dicomweb_client  # noqa: F401
    except ImportError:
        pytest.skip(f"dicomweb-client is not installed: {SKIP_HINT}")


def start_orthanc(storage_dir: Path, **kwargs) -> OrthancServer:
    """A started Orthanc server with :data:`USER` / :data:`PASSWORD`, or a skip that says what to install."""
    require_dicomweb_client()
    try:
        return OrthancServer(storage_dir, USER, PASSWORD, **kwargs).start()
    except OrthancUnavailable as e:
        pytest.skip(str(e))  # it says what to install (.ci/orthanc)


def pydicom_file(name: str) -> Path:
    """A file of pydicom's own test data (``CT_small.dcm``, ``MR_small.dcm``)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom's test file {name} is not available")
    return Path(path)


def make_series(
    out_dir: Path,
    bright: bool,
    n_slices: int = 8,
    size: int = 32,
    seed: int = 0,
    study_uid: str | None = None,
    patient_id: str = "PID-000",
    patient_name: str = "Doe^Jane",
    accession: str = "ACC-000",
    series_description: str = "AX T1",
    modality: str = "CT",
    spacing: float = 2.5,
) -> list[Path]:
    """Write a multi-slice CT series made from pydicom's ``CT_small.dcm``: new UIDs, ``n_slices`` slices of
    ``size`` x ``size`` pixels, evenly spaced, with a square in the middle that is bright (class 1) or dark (class 0)
    against a noisy mid-grey background.

    Returns:
        the files written, in slice order.
    """
    import pydicom
    from pydicom.uid import generate_uid

    rng = np.random.default_rng(seed)
    base = pydicom.dcmread(pydicom_file("CT_small.dcm"))
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    out_dir.mkdir(parents=True, exist_ok=True)
    lo, hi = size // 4, size - size // 4
    paths = []
    for i in range(n_slices):
        ds = copy.deepcopy(base)
        sop = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study_uid, series_uid, sop
        ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.PatientID, ds.PatientName, ds.AccessionNumber = patient_id, patient_name, accession
        ds.SeriesDescription, ds.Modality = series_description, modality
        ds.SeriesNumber, ds.InstanceNumber = 1, i + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, float(i * spacing)]
        ds.SliceLocation = float(i * spacing)
        ds.SliceThickness = spacing
        ds.PixelSpacing = [1.0, 1.0]
        image = 1024 + rng.normal(0, 20, (size, size))
        image[lo:hi, lo:hi] = 1800 if bright else 300
        ds.Rows = ds.Columns = size
        ds.PixelData = image.astype(np.int16).tobytes()
        path = out_dir / f"{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def without_pixels(source: Path, out: Path, instance_number: int = 99) -> Path:
    """A copy of ``source`` (same study and series) with a new SOP instance UID and no PixelData element."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(source)
    del ds.PixelData
    sop = generate_uid()
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.InstanceNumber = instance_number
    ds.save_as(out, enforce_file_format=True)
    return out


def tiny_resnet3d(num_classes: int) -> dict:
    """The network_def of a tiny 3-D MONAI ResNet (the widths the tests train with)."""
    return {
        "_target_": "monai.networks.nets.ResNet",
        "block": "basic",
        "layers": [1, 1, 1, 1],
        "block_inplanes": [4, 8, 8, 8],
        "spatial_dims": 3,
        "n_input_channels": 1,
        "conv1_t_size": 3,
        "conv1_t_stride": 1,
        "no_max_pool": True,
        "num_classes": num_classes,
    }


def make_sources(folder: Path, num_classes: Sequence[int] = (3, 4)) -> list[dict]:
    """Two tiny 3-D source checkpoints from different random initialisations, as bundle ``sources`` entries."""
    import torch
    from monai.bundle import ConfigParser

    from monai_medmerge.sources import save_checkpoint

    folder.mkdir(parents=True, exist_ok=True)
    sources = []
    for i, n in enumerate(num_classes):
        torch.manual_seed(100 + i)
        net_def = tiny_resnet3d(n)
        net = ConfigParser({"n": net_def}).get_parsed_content("n")
        path = folder / f"source{i}.pt"
        save_checkpoint(net, path)
        sources.append({"checkpoint": os.fspath(path), "network_def": net_def})
    return sources

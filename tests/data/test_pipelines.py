"""classification_transforms and make_dataset, end to end on real PNG, NIfTI and DICOM files made in tmp_path."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from monai.transforms import Compose, RandAffined, RandFlipd, RandGaussianNoised, Spacingd

from monai_medmerge.data.pipelines import classification_transforms, make_dataset
from monai_medmerge.data.transforms import BadImageError, find_bad_image_error

SERIES = "dicomdirtests/98892001/CT5N"


def _pydicom_file(name: str) -> str:
    return pytest.importorskip("pydicom.data").get_testdata_file(name)


def _series(tmp_path: Path) -> Path:
    pydicom_data = pytest.importorskip("pydicom.data")
    source = Path(pydicom_data.__file__).parent / "test_files" / SERIES
    if not source.is_dir():
        pytest.skip(f"pydicom's test series {SERIES} is not installed")
    return Path(shutil.copytree(source, tmp_path / "series"))


def _png(path: Path, array: np.ndarray) -> Path:
    pytest.importorskip("PIL.Image").fromarray(array).save(path)
    return path


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib = pytest.importorskip("nibabel")
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def _run(path, label=1, **kwargs):
    out = classification_transforms(**kwargs)({"image": str(path), "label": label})
    return out["image"], out["label"]


def _check_output(image, label, shape, expected_label=1):
    assert tuple(image.shape) == shape
    assert image.dtype == torch.float32
    assert label.dtype == torch.long and label.ndim == 0 and int(label) == expected_label


def test_png_gray_rgb_and_normalisation(tmp_path):
    rng = np.random.default_rng(0)
    gray = _png(tmp_path / "g.png", rng.integers(0, 256, (20, 24), dtype=np.uint8))
    image, label = _run(gray, kind="png", spatial_size=(16, 16), num_classes=2)
    _check_output(image, label, (1, 16, 16))
    # Modality "other": zero mean, unit variance (checked at the file's own size, (width, height), so that
    # resizing does not smooth the noise).
    image, _ = _run(gray, kind="png", spatial_size=(24, 20))
    assert abs(float(image.mean())) < 1e-5 and float(image.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
    rgb = _png(tmp_path / "c.jpg", rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    image, label = _run(rgb, kind="png", spatial_size=(16, 16))
    _check_output(image, label, (1, 16, 16))
    image, _ = _run(rgb, kind="png", spatial_size=(16, 16), channels=3)
    assert tuple(image.shape) == (3, 16, 16)


def test_nifti_3d_is_oriented_to_ras(tmp_path):
    volume = np.zeros((8, 8, 8), np.float32)
    volume[0, 1, 2] = 1.0  # a marker at the first x index; with x flipped it lands at the last one
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])  # LAS, not RAS
    path = _nifti(tmp_path / "v.nii.gz", volume, affine)
    image, label = _run(path, kind="nifti", spatial_size=(8, 8, 8))
    _check_output(image, label, (1, 8, 8, 8))
    assert np.unravel_index(int(image.argmax()), image.shape) == (0, 7, 1, 2)
    assert torch.all(torch.diagonal(image.affine)[:3] > 0)


def test_nifti_2d_and_trailing_singleton_come_out_2d(tmp_path):
    rng = np.random.default_rng(0)
    for name, array in (("flat.nii.gz", rng.random((10, 12))), ("slab.nii.gz", rng.random((10, 12, 1)))):
        path = _nifti(tmp_path / name, array.astype(np.float32))
        image, label = _run(path, kind="nifti", spatial_size=(8, 8), modality="MRI")
        _check_output(image, label, (1, 8, 8))
        assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    volume = _nifti(tmp_path / "v.nii.gz", np.ones((4, 4, 4), np.float32))
    with pytest.raises(RuntimeError) as info:
        _run(volume, kind="nifti", spatial_size=(8, 8))
    assert "has 3 axes, and the pipeline is 2-D" in str(find_bad_image_error(info.value))


@pytest.mark.parametrize("reader", [None, "ITKReader"])
def test_single_dicom_ct_window(reader):
    ct = _pydicom_file("CT_small.dcm")
    if reader == "ITKReader":
        pytest.importorskip("itk")
    image, label = _run(ct, kind="dicom", reader=reader, spatial_size=(32, 32), modality="CT", window=(-200, 300))
    _check_output(image, label, (1, 32, 32))
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    # CT_small spans -896 to 1167 HU, more than the window: both ends are clipped (resizing blurs the top a little).
    assert float(image.min()) == 0.0 and float(image.max()) == pytest.approx(1.0, abs=1e-3)


def test_single_dicom_pydicom_and_itk_agree():
    ct = _pydicom_file("CT_small.dcm")
    pytest.importorskip("itk")
    kwargs = {"kind": "dicom", "spatial_size": (32, 32), "modality": "CT"}
    by_pydicom, _ = _run(ct, **kwargs)
    by_itk, _ = _run(ct, reader="ITKReader", **kwargs)
    torch.testing.assert_close(by_pydicom.as_tensor(), by_itk.as_tensor())


def test_single_dicom_mr_percentiles():
    mr = _pydicom_file("MR_small.dcm")
    image, label = _run(mr, kind="dicom", spatial_size=(16, 16), modality="MR", percentiles=(0.0, 100.0))
    _check_output(image, label, (1, 16, 16))
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0


def test_multiframe_dicom_needs_itk():
    dose = _pydicom_file("rtdose.dcm")
    pytest.importorskip("itk")
    image, label = _run(dose, kind="dicom", reader="ITKReader", spatial_size=(8, 8, 8))
    _check_output(image, label, (1, 8, 8, 8))
    with pytest.raises(RuntimeError) as info:
        _run(dose, kind="dicom", spatial_size=(8, 8, 8))
    assert "reader='ITKReader'" in str(find_bad_image_error(info.value))


def test_dicom_series_itk_and_pydicom_agree(tmp_path):
    pytest.importorskip("itk")
    folder = _series(tmp_path)
    kwargs = {"kind": "dicom_series", "spatial_size": (8, 8, 4), "modality": "CT"}
    by_itk, label = _run(folder, **kwargs)
    _check_output(by_itk, label, (1, 8, 8, 4))
    assert 0.0 <= float(by_itk.min()) and float(by_itk.max()) <= 1.0
    # The two readers stack the slices in opposite orders (by position vs by InstanceNumber); RAS makes them agree.
    by_pydicom, _ = _run(folder, reader="PydicomReader", **kwargs)
    torch.testing.assert_close(by_itk.as_tensor(), by_pydicom.as_tensor())


def test_spacing_step(tmp_path):
    path = _nifti(tmp_path / "v.nii.gz", np.ones((8, 8, 8), np.float32), np.diag([2.0, 2.0, 2.0, 1.0]))
    chain = classification_transforms("nifti", (8, 8, 8), pixdim=(4.0, 4.0, 4.0))
    assert any(isinstance(t, Spacingd) for t in chain.transforms)
    upto_spacing = Compose(chain.transforms[: [isinstance(t, Spacingd) for t in chain.transforms].index(True) + 1])
    resampled = upto_spacing({"image": str(path)})["image"]
    assert tuple(resampled.shape) == (1, 4, 4, 4)
    np.testing.assert_allclose(resampled.pixdim.numpy(), [4.0, 4.0, 4.0])
    assert not any(isinstance(t, Spacingd) for t in classification_transforms("nifti", (8, 8, 8)).transforms)


def test_training_augmentation(tmp_path):
    path = _png(tmp_path / "g.png", np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8))
    random_types = (RandFlipd, RandAffined, RandGaussianNoised)
    train = classification_transforms("png", (16, 16), train=True)
    assert sum(isinstance(t, random_types) for t in train.transforms) == 3
    for chain in (
        classification_transforms("png", (16, 16)),
        classification_transforms("png", (16, 16), True, augment=False),
    ):
        assert not any(isinstance(t, random_types) for t in chain.transforms)
    train.set_random_state(seed=0)
    outputs = [train({"image": str(path), "label": 0})["image"] for _ in range(4)]
    assert all(tuple(o.shape) == (1, 16, 16) and o.dtype == torch.float32 for o in outputs)
    assert any(not torch.equal(outputs[0], o) for o in outputs[1:])


def test_wrong_reader_in_a_pipeline_does_not_fall_back(tmp_path):
    path = _png(tmp_path / "g.png", np.zeros((16, 16), np.uint8))
    pytest.importorskip("nibabel")
    with pytest.raises(RuntimeError) as info:
        _run(path, kind="nifti", spatial_size=(16, 16))
    error = find_bad_image_error(info.value)
    assert isinstance(error, BadImageError) and error.path == str(path) and "NibabelReader" in error.reason


def test_label_checks_and_unlabelled_items(tmp_path):
    path = _png(tmp_path / "g.png", np.zeros((16, 16), np.uint8))
    with pytest.raises(RuntimeError) as info:
        _run(path, label=4, kind="png", spatial_size=(8, 8), num_classes=4)
    assert str(find_bad_image_error(info.value)) == f"{path}: label 4 is outside the classes [0, 4)"
    out = classification_transforms("png", (8, 8), label_key=None)({"image": str(path)})
    assert set(out) == {"image"}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "jpeg"}, "kind 'jpeg' is not supported; choose one of png, nifti, dicom, dicom_series"),
        ({"reader": "NrrdReader"}, "reader 'NrrdReader' is not supported; choose one of PILReader, NibabelReader"),
        ({"modality": "PET"}, "modality 'PET' is not supported; choose one of CT, MR, MRI, other"),
        ({"spatial_size": (16,)}, r"spatial_size must have 2 or 3 values, got \(16,\)"),
        ({"spatial_size": (16, 0)}, "spatial_size must hold positive integers"),
        ({"spatial_size": (16, 7.5)}, "spatial_size must hold positive integers"),
        ({"spatial_size": 16}, "spatial_size must be a list of 2 or 3 values"),
        ({"window": (300, -200)}, "window must be two finite numbers with low < high"),
        ({"window": (1,)}, r"window must be two numbers \(low, high\)"),
        ({"percentiles": (1, 101)}, "percentiles must lie within"),
        ({"pixdim": (1.0, 1.0, 1.0)}, "pixdim must have 2 values"),
        ({"pixdim": (1.0, -1.0)}, "pixdim must hold positive numbers"),
        ({"channels": 4}, "a PNG/JPEG pipeline gives 1 .gray. or 3 .RGB. channels; channels is 4"),
        ({"channels": 0}, "channels must be a positive integer"),
        ({"keys": ()}, "keys must be a key or a list of keys"),
        ({"label_key": ["label"]}, "label_key must be a key"),
    ],
)
def test_argument_errors(kwargs, message):
    arguments = {"kind": "png", "spatial_size": (16, 16), **kwargs}
    with pytest.raises(ValueError, match=message):
        classification_transforms(**arguments)


def test_modality_is_case_insensitive():
    assert isinstance(classification_transforms("nifti", (8, 8, 8), modality="mri"), Compose)
    assert isinstance(classification_transforms("nifti", (8, 8, 8), modality="ct"), Compose)


def test_bundle_config_builds_the_pipeline_and_dataset(tmp_path):
    from monai.bundle import ConfigParser

    items = [
        {"image": str(_png(tmp_path / f"{i}.png", np.full((12, 12), i * 40, np.uint8))), "label": i % 2}
        for i in range(4)
    ]
    parser = ConfigParser(
        {
            "items": items,
            "transforms": {
                "_target_": "monai_medmerge.data.pipelines.classification_transforms",
                "kind": "png",
                "spatial_size": [16, 16],
                "train": True,
                "num_classes": 2,
            },
            "dataset": {
                "_target_": "monai_medmerge.data.pipelines.make_dataset",
                "items": "@items",
                "transforms": "@transforms",
                "cache": "memory",
            },
        }
    )
    dataset = parser.get_parsed_content("dataset")
    assert isinstance(dataset, CacheDataset) and len(dataset) == 4
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert tuple(batch["image"].shape) == (4, 1, 16, 16) and batch["image"].dtype == torch.float32
    assert batch["label"].tolist() == [0, 1, 0, 1] and batch["label"].dtype == torch.long


def test_make_dataset_modes(tmp_path):
    items = [{"image": str(_png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))), "label": 0}]
    chain = classification_transforms("png", (8, 8))
    plain = make_dataset(items, chain)
    assert type(plain) is Dataset and tuple(plain[0]["image"].shape) == (1, 8, 8)
    assert isinstance(make_dataset(items, chain, cache="memory"), CacheDataset)
    disk = make_dataset(items, chain, cache="disk", cache_dir=tmp_path / "cache")
    assert isinstance(disk, PersistentDataset)
    assert tuple(disk[0]["image"].shape) == (1, 8, 8)
    assert any((tmp_path / "cache").iterdir())  # the deterministic part was written to disk
    with pytest.raises(ValueError, match="cache='disk' needs cache_dir"):
        make_dataset(items, chain, cache="disk")
    with pytest.raises(ValueError, match="cache 'ram' is not supported; choose one of none, memory, disk"):
        make_dataset(items, chain, cache="ram")


def test_channel_count_is_checked_per_file_and_named(tmp_path):
    """A 4-D NIfTI with a singleton third axis and 3 values on the fourth is a 3-channel image: into a 1-channel
    network it is an error that names the file, not a crash in collate; into a 3-channel network it passes."""
    path = _nifti(tmp_path / "rgbish.nii.gz", np.random.default_rng(0).random((32, 32, 1, 3)).astype(np.float32))
    with pytest.raises(RuntimeError) as info:
        classification_transforms("nifti", (16, 16), label_key=None)({"image": str(path)})
    error = find_bad_image_error(info.value)
    assert error is not None and error.path == str(path)
    assert "3 channels" in error.reason and "the network takes 1" in error.reason
    out = classification_transforms("nifti", (16, 16), label_key=None, channels=3)({"image": str(path)})
    assert tuple(out["image"].shape) == (3, 16, 16)


def test_transforms_are_the_preprocessing_description(tmp_path):
    """classification_transforms builds exactly the steps of preprocessing_config, in order, with their arguments;
    the description is plain data (it survives JSON) and holds no shared objects."""
    import json

    from monai_medmerge.data.pipelines import preprocessing_config

    settings = {
        "kind": "nifti",
        "spatial_size": (8, 8, 8),
        "modality": "CT",
        "window": (-100, 200),
        "pixdim": (2, 2, 2),
    }
    steps = preprocessing_config(**settings, train=True, num_classes=3)
    assert json.loads(json.dumps(steps)) == steps
    assert steps[0] is not steps[1] and steps[0]["keys"] is not steps[1]["keys"]
    chain = classification_transforms(**settings, train=True, num_classes=3)
    assert [type(t).__name__ for t in chain.transforms] == [s["_target_"].rsplit(".", 1)[1] for s in steps]
    window = next(s for s in steps if s["_target_"].endswith("ScaleIntensityRanged"))
    assert (window["a_min"], window["a_max"]) == (-100.0, 200.0)

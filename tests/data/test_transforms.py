"""CheckedLoadImaged and the small transforms of monai_medmerge.data.transforms, on real files made in tmp_path."""

from __future__ import annotations

import gzip
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from monai_medmerge.data.transforms import (
    BadImageError,
    CheckedLoadImaged,
    ClassLabeld,
    ImageChannelsd,
    MatchSpatialDimsd,
    OrientToRASd,
    check_complete,
    find_bad_image_error,
    series_files,
)

SERIES = "dicomdirtests/98892001/CT5N"  # pydicom's 5-slice CT series, 16 x 16 pixels, slices 2.5 mm apart
MIDDLE_SLICE = "2693"  # the third of the five files, by position


def _pydicom_file(name: str) -> str:
    pydicom_data = pytest.importorskip("pydicom.data")
    return pydicom_data.get_testdata_file(name)


def _series(tmp_path: Path, name: str = "series") -> Path:
    pydicom_data = pytest.importorskip("pydicom.data")
    source = Path(pydicom_data.__file__).parent / "test_files" / SERIES
    if not source.is_dir():
        pytest.skip(f"pydicom's test series {SERIES} is not installed")
    return Path(shutil.copytree(source, tmp_path / name))


def _png(path: Path, array: np.ndarray) -> Path:
    image = pytest.importorskip("PIL.Image")
    image.fromarray(array).save(path)
    return path


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib = pytest.importorskip("nibabel")
    nib.save(nib.Nifti1Image(array, np.eye(4) if affine is None else affine), str(path))
    return path


def _truncated(source: str | Path, target: Path, n_bytes: int) -> Path:
    target.write_bytes(Path(source).read_bytes()[:n_bytes])
    return target


def _load(path, reader: str, **kwargs):
    return CheckedLoadImaged(keys="image", reader=reader, **kwargs)({"image": path})["image"]


# --- good files -------------------------------------------------------------------------------------------------


def test_png_gray_and_rgba(tmp_path):
    gray = (np.arange(16 * 20).reshape(16, 20) % 251).astype(np.uint8)
    img = _load(_png(tmp_path / "gray.png", gray), "PILReader")
    assert isinstance(img, MetaTensor) and img.dtype == torch.float32
    # MONAI's PILReader indexes (width, height), as ITK does.
    assert tuple(img.shape) == (1, 20, 16)
    np.testing.assert_array_equal(img[0].numpy(), gray.T.astype(np.float32))
    assert img.meta["filename_or_obj"] == str(tmp_path / "gray.png")

    rgba = np.random.default_rng(0).integers(0, 256, (16, 20, 4), dtype=np.uint8)
    path = _png(tmp_path / "rgba.png", rgba)
    img = _load(path, "PILReader")
    assert tuple(img.shape) == (4, 20, 16)
    luma = ImageChannelsd("image", channels=1)({"image": img})["image"]
    assert tuple(luma.shape) == (1, 20, 16)
    from PIL import Image

    expected = np.asarray(Image.open(path).convert("L"), dtype=np.float32).T
    assert np.abs(luma[0].numpy() - expected).max() <= 1.0  # PIL rounds to integers
    rgb = ImageChannelsd("image", channels=3)({"image": img})["image"]
    torch.testing.assert_close(rgb, img[:3])


def test_image_channels_gray_to_rgb_and_too_many_channels():
    gray = MetaTensor(torch.rand(1, 4, 5))
    rgb = ImageChannelsd("image", channels=3)({"image": gray})["image"]
    assert tuple(rgb.shape) == (3, 4, 5) and torch.equal(rgb[2], gray[0])
    with pytest.raises(BadImageError, match="5 channels"):
        ImageChannelsd("image")({"image": MetaTensor(torch.rand(5, 4, 4))})
    with pytest.raises(ValueError, match="channels must be 1 or 3 to convert a picture, got 2"):
        ImageChannelsd("image", channels=2)
    # without convert: the count is checked, never changed
    two = MetaTensor(torch.rand(2, 4, 4), meta={"filename_or_obj": "/data/two.nii.gz"})
    assert ImageChannelsd("image", channels=2, convert=False)({"image": two})["image"] is two
    with pytest.raises(BadImageError, match=r"^/data/two\.nii\.gz: 2 channels .* the network takes 1$"):
        ImageChannelsd("image", channels=1, convert=False)({"image": two})


def test_nifti_3d_keeps_affine_and_values(tmp_path):
    volume = np.random.default_rng(0).random((8, 6, 4)).astype(np.float32)
    affine = np.diag([-2.0, 1.5, 3.0, 1.0])
    img = _load(_nifti(tmp_path / "v.nii.gz", volume, affine), "NibabelReader")
    assert tuple(img.shape) == (1, 8, 6, 4)
    np.testing.assert_allclose(img[0].numpy(), volume)
    np.testing.assert_allclose(img.affine.numpy(), affine)


def test_single_dicom_same_with_pydicom_and_itk():
    ct = _pydicom_file("CT_small.dcm")
    pytest.importorskip("itk")
    by_pydicom = _load(ct, "PydicomReader")
    by_itk = _load(ct, "ITKReader")
    assert tuple(by_pydicom.shape) == (1, 128, 128)
    assert tuple(by_itk.shape) == (1, 128, 128, 1)  # ITK reads one slice as a volume of depth 1
    np.testing.assert_array_equal(by_pydicom[0].numpy(), by_itk[0, :, :, 0].numpy())
    # Hounsfield units: RescaleSlope and RescaleIntercept are applied by both readers.
    assert float(by_pydicom.min()) == -896.0 and float(by_pydicom.max()) == 1167.0


def test_multiframe_dicom_through_itk_only():
    dose = _pydicom_file("rtdose.dcm")  # 15 frames of 10 x 10
    pytest.importorskip("itk")
    img = _load(dose, "ITKReader")
    assert tuple(img.shape) == (1, 10, 10, 15)
    with pytest.raises(BadImageError, match=r"multi-frame DICOM \(15 frames\).*reader='ITKReader'"):
        _load(dose, "PydicomReader")


def test_dicom_series_itk_and_pydicom(tmp_path):
    pytest.importorskip("itk")
    folder = _series(tmp_path)
    by_itk = _load(folder, "ITKReader")
    assert tuple(by_itk.shape) == (1, 16, 16, 5)
    assert by_itk.meta["spacing"][2] == pytest.approx(2.5)
    by_pydicom = _load(folder, "PydicomReader")
    assert tuple(by_pydicom.shape) == (1, 16, 16, 5)
    assert by_itk.meta["filename_or_obj"] == str(folder)


def test_image_only_false_stores_metadata(tmp_path):
    path = _nifti(tmp_path / "v.nii.gz", np.ones((4, 4, 4), np.float32))
    out = CheckedLoadImaged("image", reader="NibabelReader", image_only=False)({"image": path})
    assert out["image_meta_dict"]["filename_or_obj"] == str(path)
    with pytest.raises(KeyError, match="already exists"):
        CheckedLoadImaged("image", reader="NibabelReader", image_only=False)({"image": path, "image_meta_dict": {}})


# --- no fallback to another reader ------------------------------------------------------------------------------


def test_wrong_reader_is_an_error_not_a_fallback(tmp_path):
    path = _png(tmp_path / "x.png", np.zeros((16, 16), np.uint8))
    pytest.importorskip("nibabel")
    with pytest.raises(BadImageError, match=r"x\.png: NibabelReader reads \.nii, \.nii\.gz, not 'x\.png'") as info:
        _load(path, "NibabelReader")
    assert info.value.path == str(path)
    # Without the name check the reader itself fails, and still no other reader is tried.
    with pytest.raises(BadImageError, match="NibabelReader cannot read it: ImageFileError"):
        _load(path, "NibabelReader", check_suffix=False)
    nifti = _nifti(tmp_path / "v.nii.gz", np.ones((4, 4, 4), np.float32))
    with pytest.raises(BadImageError, match="PILReader reads"):
        _load(nifti, "PILReader")


def test_monai_load_image_does_fall_back(tmp_path):
    # The behaviour CheckedLoadImaged exists to prevent: LoadImaged with an explicit reader quietly uses another.
    from monai.transforms import LoadImaged

    path = _png(tmp_path / "x.png", np.zeros((16, 16), np.uint8))
    pytest.importorskip("nibabel")
    img = LoadImaged("image", reader="NibabelReader")({"image": str(path)})["image"]
    assert tuple(img.shape) == (16, 16)


def test_unknown_reader_and_bad_arguments():
    with pytest.raises(ValueError, match="reader 'NumpyReader' is not supported; choose one of PILReader, Nibabel"):
        CheckedLoadImaged("image", reader="NumpyReader")
    with pytest.raises(ValueError, match="reader 'itkreader' is not supported"):
        CheckedLoadImaged("image", reader="itkreader")
    with pytest.raises(ValueError, match="spacing_tolerance must be positive or None"):
        CheckedLoadImaged("image", reader="ITKReader", spacing_tolerance=0)


# --- bad files --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", ["PydicomReader", "ITKReader"])
def test_truncated_dicom(tmp_path, reader):
    pytest.importorskip("itk")
    ct = _pydicom_file("CT_small.dcm")
    path = _truncated(ct, tmp_path / "cut.dcm", Path(ct).stat().st_size // 2)
    expected = {
        "PydicomReader": r"cut\.dcm: PydicomReader cannot decode its pixel data: ValueError: The number of bytes",
        "ITKReader": r"cut\.dcm: ITKReader cannot read it: RuntimeError: Could not create IO object",
    }[reader]
    with pytest.raises(BadImageError, match=expected):
        _load(path, reader)


@pytest.mark.parametrize("reader", ["PydicomReader", "ITKReader"])
def test_text_file_named_dcm(tmp_path, reader):
    pytest.importorskip("pydicom")
    pytest.importorskip("itk")
    path = tmp_path / "x.dcm"
    path.write_text("patient id, label\n1, 0\n")
    with pytest.raises(BadImageError, match=rf"x\.dcm: {reader} cannot read it") as info:
        _load(path, reader)
    assert info.value.reason.startswith(f"{reader} cannot read it")


def test_missing_path_and_folder_for_a_file_reader(tmp_path):
    with pytest.raises(BadImageError, match=r"nothere\.png: does not exist"):
        _load(tmp_path / "nothere.png", "PILReader")
    with pytest.raises(BadImageError, match="is a folder, and PILReader reads single files"):
        _load(tmp_path, "PILReader")
    with pytest.raises(BadImageError, match="expected one file or folder path, got a list"):
        _load([str(tmp_path)], "PILReader")


@pytest.mark.parametrize("reader", ["PydicomReader", "ITKReader"])
def test_empty_series_folder(tmp_path, reader):
    pytest.importorskip("pydicom")
    pytest.importorskip("itk")
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / ".DS_Store").write_bytes(b"\0")  # hidden files are not slices
    with pytest.raises(BadImageError, match=r"^series .*empty: the folder is empty: it holds no DICOM files$"):
        _load(folder, reader)


def test_folder_of_folders_and_folder_with_one_multiframe_file(tmp_path):
    pytest.importorskip("itk")
    dose = _pydicom_file("rtdose.dcm")
    study = tmp_path / "study"
    (study / "series1").mkdir(parents=True)
    shutil.copy(dose, study / "series1" / "dose.dcm")
    with pytest.raises(BadImageError, match=r"holds no files, only folders \(series1\); give the folder of one series"):
        _load(study, "ITKReader")
    # One multi-frame file is a whole series: ITKReader reads it, PydicomReader refuses it.
    assert tuple(_load(study / "series1", "ITKReader").shape) == (1, 10, 10, 15)
    with pytest.raises(BadImageError, match=r"^series .*series1: multi-frame DICOM \(15 frames\)"):
        _load(study / "series1", "PydicomReader")


@pytest.mark.parametrize("reader", ["PydicomReader", "ITKReader"])
def test_series_with_a_missing_middle_slice(tmp_path, reader):
    # 4 files and 4 slices, so counting cannot see it; the doubled gap between slices does.
    pytest.importorskip("itk")
    folder = _series(tmp_path)
    (folder / MIDDLE_SLICE).unlink()
    with pytest.raises(BadImageError, match=r"slices are not evenly spaced: gaps deviate by up to 1\.667 mm") as e:
        _load(folder, reader)
    assert e.value.path == str(folder) and str(e.value).startswith(f"series {folder}: ")
    # The check can be turned off; the readers then give 4 slices at the mean gap, 3.33 mm instead of 2.5 mm.
    img = _load(folder, reader, spacing_tolerance=None)
    assert tuple(img.shape) == (1, 16, 16, 4)


def test_series_with_a_truncated_slice_itk(tmp_path):
    # ITK's series scan leaves out the slice it cannot parse (only a C++ warning) and stacks the other four.
    pytest.importorskip("itk")
    folder = _series(tmp_path)
    _truncated(folder / MIDDLE_SLICE, folder / MIDDLE_SLICE, 2000)
    with pytest.raises(BadImageError) as info:
        _load(folder, "ITKReader")
    assert str(info.value).startswith(f"series {folder}: 5 files but 4 slices were read; not read: {MIDDLE_SLICE}")


def test_series_with_a_headless_slice_pydicom(tmp_path):
    # A slice cut before its DICOM header: PydicomReader skips it with a warning; counting catches it.
    pytest.importorskip("pydicom")
    folder = _series(tmp_path)
    _truncated(folder / MIDDLE_SLICE, folder / MIDDLE_SLICE, 100)
    with pytest.warns(UserWarning, match="Failed to read"):
        with pytest.raises(BadImageError, match=f"5 files but 4 slices were read; not read: {MIDDLE_SLICE}"):
            _load(folder, "PydicomReader")


def test_series_with_a_truncated_slice_pydicom(tmp_path):
    pytest.importorskip("pydicom")
    folder = _series(tmp_path)
    _truncated(folder / MIDDLE_SLICE, folder / MIDDLE_SLICE, 2000)
    with pytest.raises(BadImageError, match=f"PydicomReader cannot decode its pixel data: .*{MIDDLE_SLICE}"):
        _load(folder, "PydicomReader")


def test_series_files_counts_stray_files_but_not_hidden_or_dicomdir(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    for name in ("1", "2", ".hidden", "DICOMDIR", "notes.txt"):
        (folder / name).write_text("x")
    (folder / "sub").mkdir()
    assert [p.name for p in series_files(folder)] == ["1", "2", "notes.txt"]


def test_non_finite_values(tmp_path):
    volume = np.ones((4, 4, 4), np.float32)
    volume[1, 2, 3] = np.nan
    with pytest.raises(BadImageError, match="1 of 64 values are NaN or Inf"):
        _load(_nifti(tmp_path / "nan.nii.gz", volume), "NibabelReader")


def test_bad_image_error_is_a_value_error_and_pickles():
    error = BadImageError("/data/a", "5 files but 4 slices were read", series=True)
    assert isinstance(error, ValueError)
    assert str(error) == "series /data/a: 5 files but 4 slices were read"
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.path, copy.reason, str(copy)) == (error.path, error.reason, str(error))


def test_find_bad_image_error_through_compose(tmp_path):
    path = _png(tmp_path / "x.png", np.zeros((8, 8), np.uint8))
    chain = Compose([CheckedLoadImaged("image", reader="NibabelReader")])
    with pytest.raises(RuntimeError) as info:  # MONAI's Compose wraps every transform error
        chain({"image": path})
    found = find_bad_image_error(info.value)
    assert isinstance(found, BadImageError) and found.path == str(path)
    assert find_bad_image_error(RuntimeError("other")) is None


# --- shape, orientation and label transforms --------------------------------------------------------------------


def test_match_spatial_dims():
    img = MetaTensor(torch.rand(1, 8, 6, 1), affine=torch.diag(torch.tensor([2.0, 3.0, 4.0, 1.0])))
    out = MatchSpatialDimsd("image", spatial_dims=2)({"image": img})["image"]
    assert tuple(out.shape) == (1, 8, 6)
    torch.testing.assert_close(out.affine, torch.diag(torch.tensor([2.0, 3.0, 1.0], dtype=torch.float64)))
    sagittal = MetaTensor(torch.rand(1, 1, 8, 6))
    assert tuple(MatchSpatialDimsd("image", 2)({"image": sagittal})["image"].shape) == (1, 8, 6)
    same = MetaTensor(torch.rand(1, 8, 6, 4))
    assert MatchSpatialDimsd("image", 3)({"image": same})["image"] is same
    with pytest.raises(BadImageError, match=r"spatial shape \(8, 6, 4\) has 3 axes, and the pipeline is 2-D"):
        MatchSpatialDimsd("image", 2)({"image": same})
    with pytest.raises(BadImageError, match=r"spatial shape \(8, 6\) has 2 axes, and the pipeline is 3-D"):
        MatchSpatialDimsd("image", 3)({"image": MetaTensor(torch.rand(1, 8, 6))})
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3, got 4"):
        MatchSpatialDimsd("image", 4)


def test_orient_to_ras_2d_and_3d():
    volume = torch.zeros(1, 4, 3, 2)
    volume[0, 0, 0, 0] = 1.0
    img = MetaTensor(volume, affine=torch.diag(torch.tensor([-1.0, 1.0, 1.0, 1.0])))
    out = OrientToRASd("image")({"image": img})["image"]
    assert out[0, 3, 0, 0] == 1.0  # x was flipped
    assert torch.all(torch.diagonal(out.affine)[:3] > 0)
    flat = MetaTensor(volume[..., 0], affine=torch.diag(torch.tensor([1.0, -1.0, 1.0, 1.0])))
    out = OrientToRASd("image")({"image": flat})["image"]
    assert out[0, 0, 2] == 1.0  # y was flipped


def test_class_label():
    out = ClassLabeld("label", num_classes=3)({"image": "/a.png", "label": 2})
    assert out["label"].dtype == torch.long and out["label"].ndim == 0 and int(out["label"]) == 2
    assert int(ClassLabeld("label")({"label": np.int64(7)})["label"]) == 7
    assert int(ClassLabeld("label")({"label": 1.0})["label"]) == 1
    with pytest.raises(BadImageError, match=r"^/a\.png: label 3 is outside the classes \[0, 3\)$"):
        ClassLabeld("label", num_classes=3)({"image": "/a.png", "label": 3})
    for bad in (1.5, "1", True, None):
        with pytest.raises(BadImageError, match="is not an integer class label"):
            ClassLabeld("label")({"image": "/a.png", "label": bad})
    with pytest.raises(BadImageError, match="outside the classes non-negative integers"):
        ClassLabeld("label")({"image": "/a.png", "label": -1})
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        ClassLabeld("label", num_classes=0)


# --- files whose data ends early (every reader that reads the format) ---------------------------------------------


def _nifti_bytes(version: int, array: np.ndarray, big_endian: bool = False) -> bytes:
    nib = pytest.importorskip("nibabel")
    header_class = nib.Nifti1Header if version == 1 else nib.Nifti2Header
    image_class = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    header = header_class(endianness=">" if big_endian else "<")
    return image_class(array, np.eye(4), header=header).to_bytes()


VOLUME = np.arange(1, 16 * 16 * 8 + 1, dtype=np.float32).reshape(16, 16, 8)


@pytest.mark.parametrize("reader", ["NibabelReader", "ITKReader"])
@pytest.mark.parametrize(
    "name, make, reason",
    [
        (
            "nifti1",
            lambda b: b[:-100],
            r"its NIfTI-1 header describes 16x16x8 voxels of 32 bits, 8192 bytes from byte "
            r"352, but the file ends at byte 8444 \(100 bytes missing\)$",
        ),
        ("nifti2", lambda b: b[:-1], r"its NIfTI-2 header describes 16x16x8 .* \(1 bytes missing\)$"),
        ("header_only", lambda b: b[:352], r".*16x16x8 .* but the file ends at byte 352 \(8192 bytes missing\)$"),
        ("half_header", lambda b: b[:200], r"200 bytes, shorter than the NIfTI header it starts$"),
        ("gz_cut", lambda b: gzip.compress(b)[:-200], r"the gzip stream ends before its end-of-stream marker"),
        ("gz_trailer_cut", lambda b: gzip.compress(b)[:-4], r"the gzip stream ends before its end-of-stream marker"),
        ("gz_of_cut", lambda b: gzip.compress(b[:-8]), r".*but the uncompressed data ends at byte 8536 \(8 bytes"),
    ],
    ids=["nifti1", "nifti2", "header_only", "half_header", "gz_cut", "gz_trailer_cut", "gz_of_cut"],
)
def test_truncated_nifti_is_refused_by_every_reader(tmp_path, reader, name, make, reason):
    pytest.importorskip("itk")
    version = 2 if name == "nifti2" else 1  # ITKReader cannot read NIfTI-2 at all, but it is refused before reading
    path = tmp_path / (f"{name}.nii.gz" if name.startswith("gz") else f"{name}.nii")
    path.write_bytes(make(_nifti_bytes(version, VOLUME)))
    with pytest.raises(BadImageError, match=rf"^{path}: truncated: {reason}") as info:
        _load(path, reader)
    assert info.value.path == str(path)


def test_complete_nifti_passes_and_extra_bytes_are_not_truncation(tmp_path):
    pytest.importorskip("itk")
    for version, big_endian in [(1, False), (1, True), (2, False)]:
        path = tmp_path / f"v{version}{big_endian}.nii"
        path.write_bytes(_nifti_bytes(version, VOLUME, big_endian) + b"\0" * 16)
        check_complete(path)
        gz = tmp_path / f"v{version}{big_endian}.nii.gz"
        gz.write_bytes(gzip.compress(_nifti_bytes(version, VOLUME, big_endian)))
        check_complete(gz)
        for reader in ("NibabelReader", "ITKReader") if version == 1 else ("NibabelReader",):  # ITK: no NIfTI-2
            assert torch.equal(_load(gz, reader).flatten().sort().values, torch.from_numpy(VOLUME).flatten())
    big = tmp_path / "big_endian_cut.nii"
    big.write_bytes(_nifti_bytes(1, VOLUME, big_endian=True)[:-4])
    with pytest.raises(BadImageError, match=r"\(4 bytes missing\)$"):
        check_complete(big)


def _picture_bytes(fmt: str) -> bytes:
    image = pytest.importorskip("PIL.Image")
    import io

    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(1, 255, (32, 32), dtype=np.uint8)
    image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("reader", ["PILReader", "ITKReader"])
@pytest.mark.parametrize(
    "fmt, cut, reason",
    [
        ("PNG", 10, r"the PNG ends at byte \d+ without its IEND chunk$"),
        ("PNG", 300, r"the PNG chunk 'IDAT' at byte 33 needs \d+ bytes, the file has \d+$"),
        ("JPEG", 10, r"the JPEG ends at byte \d+ without its end-of-image marker$"),
        (
            "BMP",
            10,
            r"its BMP header describes 32x32 pixels of 8 bits ending at byte 2102, but the file ends at "
            r"byte 2092 \(10 bytes missing\)$",
        ),
    ],
)
def test_truncated_pictures_are_refused_by_every_reader(tmp_path, reader, fmt, cut, reason):
    # ITKReader fills a cut JPEG or BMP with zeros (a C++ warning only); PIL takes a PNG cut inside IEND.
    pytest.importorskip("itk")
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(_picture_bytes(fmt)[:-cut])
    with pytest.raises(BadImageError, match=rf"^{path}: truncated: {reason}"):
        _load(path, reader, check_suffix=False)
    whole = tmp_path / f"whole.{fmt.lower()}"
    whole.write_bytes(_picture_bytes(fmt))
    assert _load(whole, reader, check_suffix=False).shape[-2:] == (32, 32)


def test_check_complete_leaves_other_files_to_their_reader(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    check_complete(tmp_path / "notes.txt")
    check_complete(_pydicom_file("CT_small.dcm"))
    with pytest.raises(BadImageError, match=r"nothere\.nii: cannot be read: FileNotFoundError"):
        check_complete(tmp_path / "nothere.nii")

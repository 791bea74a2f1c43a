"""The segmentation half of the one preprocessing description, end to end on NIfTI and PNG pairs made in tmp_path:
shapes and dtypes, image and label map moving together, the label map checks, datalists, and inversion."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import DataLoader
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot
from monai.transforms import (
    Invertd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    Resized,
    SpatialPadd,
)

from monai_medmerge.data import segmentation_transforms as exported_segmentation_transforms
from monai_medmerge.data.datalist import check_items, load_datalist
from monai_medmerge.data.pipelines import (
    classification_transforms,
    make_dataset,
    preprocessing_config,
    segmentation_transforms,
)
from monai_medmerge.data.transforms import BadImageError, CheckedLabelMapd, find_bad_image_error

nib = pytest.importorskip("nibabel")

# a non-RAS affine: axes permuted (x <- j, y <- i), two of them flipped, anisotropic spacing, an origin
OBLIQUE = np.array([[0.0, -1.2, 0.0, 30.0], [1.1, 0.0, 0.0, -20.0], [0.0, 0.0, -2.5, 10.0], [0.0, 0.0, 0.0, 1.0]])
LAS = np.diag([-1.0, 1.0, 1.0, 1.0])


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray = LAS) -> str:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return str(path)


def _blob(shape, centre, radius) -> np.ndarray:
    """A smooth bright blob (CT-like numbers, 1000 at the centre): its thresholds are spheres."""
    grid = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"))
    r2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
    return (1000.0 * np.exp(-r2 / (2.0 * radius**2))).astype(np.float32)


def _classes(image: np.ndarray) -> np.ndarray:
    """Label map of a blob: 0 outside, 1 above 500, 2 above 900 (the core)."""
    return ((image > 500).astype(np.uint8) + (image > 900).astype(np.uint8)).astype(np.uint8)


def _pair(tmp_path: Path, shape=(20, 14, 6), affine=LAS, name="case", centre=None, radius=3.0):
    image = _blob(shape, centre or [s / 3 for s in shape], radius)
    return (
        _nifti(tmp_path / f"{name}_image.nii.gz", image, affine),
        _nifti(tmp_path / f"{name}_label.nii.gz", _classes(image), affine),
    )


def _error(call) -> BadImageError:
    with pytest.raises(RuntimeError) as info:
        call()
    error = find_bad_image_error(info.value)
    assert isinstance(error, BadImageError), info.value
    return error


def _dice(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


# --- shapes, dtypes, what the loss and metric take ----------------------------------------------------------------


def test_3d_train_patches_and_whole_eval_images(tmp_path):
    image, label = _pair(tmp_path)  # 20 x 14 x 6: smaller than the patch along two axes
    item = {"image": image, "label": label}
    kwargs = {"kind": "nifti", "spatial_size": (16, 16, 8), "modality": "CT", "window": (0, 1000), "num_classes": 3}
    train = segmentation_transforms(train=True, **kwargs)
    assert sum(isinstance(t, SpatialPadd) for t in train.transforms) == 1
    assert sum(isinstance(t, RandCropByPosNegLabeld) for t in train.transforms) == 1
    assert not any(isinstance(t, Resized) for t in train.transforms)
    train.set_random_state(seed=0)
    out = train(item)
    assert isinstance(out, list) and len(out) == 1  # one patch per item, in the crop transform's list
    patch = out[0]
    assert tuple(patch["image"].shape) == (1, 16, 16, 8) and patch["image"].dtype == torch.float32
    assert tuple(patch["label"].shape) == (1, 16, 16, 8) and patch["label"].dtype == torch.int64
    assert set(patch["label"].unique().tolist()) <= {0, 1, 2}

    # evaluation keeps the whole image, unpadded, on the RAS grid; image and label map stay on one grid
    whole = segmentation_transforms(train=False, **kwargs)(item)
    assert isinstance(whole, dict)
    assert tuple(whole["image"].shape) == (1, 20, 14, 6) and whole["image"].dtype == torch.float32
    assert tuple(whole["label"].shape) == (1, 20, 14, 6) and whole["label"].dtype == torch.int64
    torch.testing.assert_close(whole["image"].affine, whole["label"].affine)
    assert torch.all(torch.diagonal(whole["image"].affine)[:3] > 0)  # LAS was reoriented
    expected = _classes(nib.load(image).get_fdata().astype(np.float32))[::-1]  # x flipped to R
    np.testing.assert_array_equal(whole["label"][0].numpy(), expected)

    # with pixdim, both are resampled (1 mm to 2 mm halves the grid), the label map by nearest neighbour
    coarse = segmentation_transforms(train=False, pixdim=(2.0, 2.0, 2.0), **kwargs)(item)
    assert tuple(coarse["image"].shape) == tuple(coarse["label"].shape)
    assert all(n // 2 <= m <= n // 2 + 1 for n, m in zip((20, 14, 6), coarse["image"].shape[1:], strict=True))
    np.testing.assert_allclose(coarse["label"].pixdim.numpy(), [2.0, 2.0, 2.0])
    assert set(coarse["label"].unique().tolist()) <= {0, 1, 2}


def test_labels_feed_dice_ce_and_dice_metric(tmp_path):
    items = [dict(zip(("image", "label"), _pair(tmp_path, name=f"c{i}"), strict=True)) for i in range(2)]
    chain = segmentation_transforms("nifti", (16, 16, 8), train=True, num_classes=3, modality="CT", window=(0, 1000))
    chain.set_random_state(seed=1)
    batch = next(iter(DataLoader(make_dataset(items, chain), batch_size=2)))  # MONAI's collate flattens the lists
    label = batch["label"]
    assert tuple(batch["image"].shape) == (2, 1, 16, 16, 8) and tuple(label.shape) == (2, 1, 16, 16, 8)
    perfect = one_hot(label, num_classes=3)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)(20.0 * perfect - 10.0, label)
    assert float(loss) < 0.05
    metric = DiceMetric(include_background=False)
    torch.testing.assert_close(metric(perfect, one_hot(label, num_classes=3)).nanmean(), torch.tensor(1.0))


def test_2d_pairs_nifti_slab_and_png(tmp_path):
    image = _blob((24, 20), (8, 8), 3.0)
    flat = {"image": _nifti(tmp_path / "i.nii.gz", image), "label": _nifti(tmp_path / "l.nii.gz", _classes(image))}
    slab = {
        "image": _nifti(tmp_path / "is.nii.gz", image[..., None]),
        "label": _nifti(tmp_path / "ls.nii.gz", _classes(image)[..., None]),
    }
    for item in (flat, slab):
        patch = segmentation_transforms("nifti", (16, 16), train=True, num_classes=3)(item)[0]
        assert tuple(patch["image"].shape) == tuple(patch["label"].shape) == (1, 16, 16)
        whole = segmentation_transforms("nifti", (16, 16), num_classes=3)(item)
        assert tuple(whole["image"].shape) == tuple(whole["label"].shape) == (1, 24, 20)
    pil = pytest.importorskip("PIL.Image")
    pil.fromarray((image / 4).astype(np.uint8)).save(tmp_path / "i.png")
    pil.fromarray(_classes(image)).save(tmp_path / "l.png")
    item = {"image": str(tmp_path / "i.png"), "label": str(tmp_path / "l.png")}
    whole = segmentation_transforms("png", (16, 16), num_classes=3)(item)
    # PILReader indexes pictures (width, height)
    assert tuple(whole["image"].shape) == tuple(whole["label"].shape) == (1, 20, 24)
    np.testing.assert_array_equal(whole["label"][0].numpy(), _classes(image).T)


# --- image and label map move together ------------------------------------------------------------------------------


def test_augmentation_moves_image_and_label_map_together(tmp_path):
    """The image is its label map times 800 HU (a pattern of 3 x 4 voxel blocks that a flip of the first axis
    inverts), so after every random flip and affine each voxel of the image that still holds one of the two values
    must carry that class in the label map; only voxels the image interpolated between the two are left out.
    Moving one of the two alone by a fraction of a voxel breaks this along every block edge."""
    shape = (24, 24, 12)
    x, y, _ = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    classes = ((x // 3 + y // 4) % 2).astype(np.uint8)
    item = {
        "image": _nifti(tmp_path / "blocks.nii.gz", classes * np.float32(800.0)),
        "label": _nifti(tmp_path / "blocks_label.nii.gz", classes),
    }
    kwargs = {"kind": "nifti", "spatial_size": shape, "modality": "CT", "window": (0, 1000), "num_classes": 2}
    train = segmentation_transforms(train=True, **kwargs)
    random_types = (RandFlipd, RandAffined, RandGaussianNoised)
    assert [type(t) for t in train.transforms if isinstance(t, random_types)] == list(random_types)
    noise = next(t for t in train.transforms if isinstance(t, RandGaussianNoised))
    assert list(noise.keys) == ["image"]  # noise on the image only
    plain = segmentation_transforms(train=True, augment=False, **kwargs)(item)[0]
    assert torch.equal(plain["label"][0], torch.from_numpy(classes[::-1].astype(np.int64)))  # LAS to RAS
    train.set_random_state(seed=0)
    flipped = resampled = 0
    for _ in range(12):
        out = train(item)[0]
        image, label = out["image"][0], out["label"][0]
        assert set(label.unique().tolist()) <= {0, 1}
        # the window maps 0 and 800 HU to 0 and 0.8; noise has a std of 0.02
        background, foreground = image.abs() < 0.1, (image - 0.8).abs() < 0.1
        wrong = int((background & (label != 0)).sum() + (foreground & (label != 1)).sum())
        assert wrong <= 0.002 * int((background | foreground).sum())
        # the check tells a flip apart: the flipped image disagrees with the label map almost everywhere
        assert int((foreground.flip(0) & (label != 1)).sum()) > 0.5 * int(foreground.sum())
        flipped += torch.equal(label, plain["label"][0].flip(0))
        resampled += int((background | foreground).sum()) < 0.95 * label.numel()
    assert flipped >= 2 and resampled >= 2  # the augmentation did move voxels, both ways


# --- the label map checks -------------------------------------------------------------------------------------------


def test_shape_mismatch_names_both_files_and_shapes(tmp_path):
    image, _ = _pair(tmp_path)
    label = _nifti(tmp_path / "short_label.nii.gz", np.zeros((20, 14, 5), np.uint8))
    error = _error(lambda: segmentation_transforms("nifti", (16, 16, 8))({"image": image, "label": label}))
    assert error.path == image
    assert f"label map {label} has the spatial shape (20, 14, 5), the image (20, 14, 6)" in str(error)


def test_affine_mismatch_names_both_files_and_affines(tmp_path):
    image, _ = _pair(tmp_path)
    shifted = LAS.copy()
    shifted[0, 3] = 2.0
    label = _nifti(tmp_path / "shifted_label.nii.gz", np.zeros((20, 14, 6), np.uint8), shifted)
    error = _error(lambda: segmentation_transforms("nifti", (16, 16, 8))({"image": image, "label": label}))
    assert error.path == image and f"label map {label} and the image have different affines" in str(error)
    assert "largest difference 2" in error.reason and "[-1.0, 0.0, 0.0, 2.0]" in error.reason
    # float rounding between two files of one grid is within the tolerance
    nearly = LAS.copy()
    nearly[0, 3] = 1e-5
    label = _nifti(tmp_path / "nearly_label.nii.gz", np.zeros((20, 14, 6), np.uint8), nearly)
    out = segmentation_transforms("nifti", (16, 16, 8))({"image": image, "label": label})
    assert tuple(out["label"].shape) == (1, 20, 14, 6)


def test_bad_label_values_are_named(tmp_path):
    image, _ = _pair(tmp_path)
    values = np.zeros((20, 14, 6), np.float32)
    values[0, 0, :2] = 3
    values[1, 1, 0] = 7
    outside = _nifti(tmp_path / "outside.nii.gz", values)
    chain = segmentation_transforms("nifti", (16, 16, 8), num_classes=3)
    error = _error(lambda: chain({"image": image, "label": outside}))
    assert error.path == image
    assert f"label map {outside} holds values outside the classes [0, 3): 3, 7 (3 voxels)" in str(error)
    values[:] = 0
    values[2, 2, 2] = 0.5
    fractional = _nifti(tmp_path / "fractional.nii.gz", values)
    error = _error(lambda: chain({"image": image, "label": fractional}))
    assert f"label map {fractional} holds values that are not integer class indices: 0.5 (1 voxels)" in str(error)
    values[2, 2, 2] = -1
    negative = _nifti(tmp_path / "negative.nii.gz", values)
    unbounded = segmentation_transforms("nifti", (16, 16, 8))  # num_classes=None: non-negative integers
    assert "outside the classes non-negative integers: -1" in str(
        _error(lambda: unbounded({"image": image, "label": negative}))
    )
    with pytest.raises(ValueError, match="num_classes must be an integer of at least 2"):
        CheckedLabelMapd("label", num_classes=1)


def test_label_map_must_have_one_channel(tmp_path):
    image, _ = _pair(tmp_path)
    two = _nifti(tmp_path / "two.nii.gz", np.zeros((20, 14, 6, 2), np.uint8))
    error = _error(lambda: segmentation_transforms("nifti", (16, 16, 8))({"image": image, "label": two}))
    assert f"label map {two} has 2 channels" in str(error) and "a label map has 1" in str(error)


def test_missing_label_file(tmp_path):
    image, _ = _pair(tmp_path)
    missing = str(tmp_path / "missing.nii.gz")
    error = _error(lambda: segmentation_transforms("nifti", (16, 16, 8))({"image": image, "label": missing}))
    assert error.path == missing and error.reason == "does not exist"


# --- inference: only image steps, invertible ----------------------------------------------------------------------


def test_invertd_takes_a_mask_back_to_the_original_grid(tmp_path):
    """A 3-D NIfTI with a non-RAS affine, reoriented and resampled by the evaluation pipeline: Invertd with the
    same Compose gives a prediction the file's own shape and affine, and the label map's own values back."""
    shape = (20, 18, 10)
    image, label = _pair(tmp_path, shape=shape, affine=OBLIQUE, centre=(8, 9, 5))
    original = nib.load(label).get_fdata()
    for pixdim in ((1.5, 1.5, 1.5), None):
        chain = segmentation_transforms("nifti", (16, 16, 16), label_key=None, pixdim=pixdim)
        assert all(step["keys"] == ["image"] for step in preprocessing_config("nifti", (16, 16, 16), label_key=None))
        out = chain({"image": image})
        assert set(out) == {"image"}
        if pixdim is not None:
            assert tuple(out["image"].shape) != (1, *shape)  # the pipeline did move the voxels
        # a "prediction" on the pipeline's grid: the label map brought there by the same steps, nearest neighbour
        with_label = segmentation_transforms("nifti", (16, 16, 16), pixdim=pixdim, num_classes=3)
        out["pred"] = with_label({"image": image, "label": label})["label"].float()
        back = Invertd(keys="pred", transform=chain, orig_keys="image", nearest_interp=True)(out)["pred"]
        assert tuple(back.shape) == (1, *shape)
        np.testing.assert_allclose(back.affine.numpy(), OBLIQUE, atol=1e-6)
        if pixdim is None:  # reorientation alone is exact
            np.testing.assert_array_equal(back[0].numpy(), original)
        else:  # there and back through 1.5 mm voxels: the blob survives, its boundary moves by a voxel at most
            assert _dice(back[0] > 0, torch.as_tensor(original > 0)) > 0.85


def test_invertd_gives_a_2d_slice_back_its_depth_axis(tmp_path):
    image = _nifti(tmp_path / "slab.nii.gz", _blob((24, 20, 1), (8, 8, 0), 3.0), np.diag([-0.8, 0.8, 5.0, 1.0]))
    chain = segmentation_transforms("nifti", (16, 16), label_key=None)
    out = chain({"image": image})
    assert tuple(out["image"].shape) == (1, 24, 20)
    out["pred"] = (out["image"] > 0).float()
    back = Invertd(keys="pred", transform=chain, orig_keys="image")(out)["pred"]
    assert tuple(back.shape) == (1, 24, 20, 1)
    np.testing.assert_allclose(back.affine.numpy(), np.diag([-0.8, 0.8, 5.0, 1.0]))
    np.testing.assert_array_equal(back[0, ..., 0].numpy()[::-1], out["pred"][0].numpy())


# --- the one description ----------------------------------------------------------------------------------------


def _classification_grid() -> list:
    grid = []
    for kind, size, train, modality, pixdim, label_key, channels in itertools.product(
        ["png", "nifti", "dicom", "dicom_series"],
        [[16, 16], [8, 8, 8]],
        [False, True],
        ["CT", "MRI", "other"],
        [None, 1.5],
        ["label", None],
        [1, 3],
    ):
        kwargs = {"train": train, "modality": modality, "label_key": label_key, "channels": channels}
        if pixdim:
            kwargs["pixdim"] = [pixdim] * len(size)
        grid.append(preprocessing_config(kind, size, num_classes=3, **kwargs))
    return grid


def test_classification_configs_are_unchanged():
    """The classification description as it was before segmentation joined it, in content and key order (what an
    exported inference.yaml holds): a digest over 384 settings, and one list written out."""
    digest = hashlib.sha256(json.dumps(_classification_grid()).encode()).hexdigest()
    assert digest == "7d3b68bc64fa276a1d9f78fb3967d43ca58e0738747dff1e5fec1aeb7d92c493"
    steps = preprocessing_config(
        "nifti", [32, 32, 16], train=True, modality="CT", window=[-160, 240], pixdim=[1.5, 1.5, 3.0], num_classes=3
    )
    assert steps == preprocessing_config(
        "nifti",
        [32, 32, 16],
        train=True,
        modality="CT",
        window=[-160, 240],
        pixdim=[1.5, 1.5, 3.0],
        num_classes=3,
        task="classification",
    )
    ours, monai_ = "monai_medmerge.data.transforms.", "monai.transforms."
    expected = [
        {"_target_": ours + "CheckedLoadImaged", "keys": ["image"], "reader": "NibabelReader", "image_only": True},
        {"_target_": ours + "ImageChannelsd", "keys": ["image"], "channels": 1, "convert": False},
        {"_target_": ours + "OrientToRASd", "keys": ["image"]},
        {"_target_": ours + "MatchSpatialDimsd", "keys": ["image"], "spatial_dims": 3},
        {"_target_": monai_ + "Spacingd", "keys": ["image"], "pixdim": [1.5, 1.5, 3.0], "mode": "bilinear"},
        {
            "_target_": monai_ + "ScaleIntensityRanged",
            "a_min": -160.0,
            "a_max": 240.0,
            "b_min": 0.0,
            "b_max": 1.0,
            "clip": True,
            "keys": ["image"],
        },
        {
            "_target_": monai_ + "Resized",
            "keys": ["image"],
            "spatial_size": [32, 32, 16],
            "mode": "trilinear",
            "anti_aliasing": True,
        },
        {"_target_": monai_ + "RandFlipd", "keys": ["image"], "prob": 0.5, "spatial_axis": 0},
        {
            "_target_": monai_ + "RandAffined",
            "keys": ["image"],
            "prob": 0.5,
            "rotate_range": [0.1, 0.1, 0.1],
            "scale_range": [0.05, 0.05, 0.05],
            "mode": "bilinear",
            "padding_mode": "border",
        },
        {"_target_": monai_ + "RandGaussianNoised", "keys": ["image"], "prob": 0.3, "mean": 0.0, "std": 0.02},
        {"_target_": monai_ + "EnsureTyped", "keys": ["image"], "dtype": "float32"},
        {"_target_": ours + "ClassLabeld", "keys": "label", "num_classes": 3, "image_key": "image"},
    ]
    assert json.dumps(steps) == json.dumps(expected)


def test_segmentation_shares_the_classification_steps():
    """Loading, orientation, spacing and intensity are the same steps with the label map added to the spatial ones;
    resizing is left out; the transforms are the description, step for step."""
    kwargs = {"kind": "nifti", "spatial_size": [16, 16, 8], "modality": "MR", "pixdim": [1.0, 1.0, 2.0]}
    classification = preprocessing_config(**kwargs, label_key=None)
    segmentation = preprocessing_config(**kwargs, task="segmentation", num_classes=2, train=True)
    names = [s["_target_"].rsplit(".", 1)[1] for s in segmentation]
    assert names == [
        "CheckedLoadImaged",
        "CheckedLabelMapd",
        "ImageChannelsd",
        "OrientToRASd",
        "MatchSpatialDimsd",
        "Spacingd",
        "ScaleIntensityRangePercentilesd",
        "SpatialPadd",
        "RandCropByPosNegLabeld",
        "RandFlipd",
        "RandAffined",
        "RandGaussianNoised",
        "EnsureTyped",
        "EnsureTyped",
    ]
    by_name = {s["_target_"]: s for s in segmentation}
    for step in classification:
        if step["_target_"].endswith(("Resized", "EnsureTyped")):
            continue
        shared = by_name[step["_target_"]]
        moved = step["_target_"].rsplit(".", 1)[1] in {"CheckedLoadImaged", "OrientToRASd", "MatchSpatialDimsd"}
        assert shared["keys"] == (["image", "label"] if moved or "Spacingd" in step["_target_"] else ["image"])
        assert {k: v for k, v in shared.items() if k not in ("keys", "mode")} == {
            k: v for k, v in step.items() if k not in ("keys", "mode")
        }
    assert by_name["monai.transforms.Spacingd"]["mode"] == ["bilinear", "nearest"]
    assert by_name["monai.transforms.RandAffined"]["mode"] == ["bilinear", "nearest"]
    chain = segmentation_transforms(**kwargs, num_classes=2, train=True)
    assert [type(t).__name__ for t in chain.transforms] == names
    assert [type(t).__name__ for t in exported_segmentation_transforms(**kwargs, train=True).transforms] == names


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: preprocessing_config("nifti", (8, 8), task="detection"), "task 'detection' is not supported"),
        (lambda: segmentation_transforms("nifti", (8, 8), task="classification"), "builds the segmentation pipeline"),
        (
            lambda: preprocessing_config("nifti", (8, 8), task="segmentation", keys=["image", "label"]),
            "label_key 'label' is also one of the image keys",
        ),
        (
            lambda: segmentation_transforms("nifti", (8, 8), num_classes=1),
            "num_classes must be an integer of at least 2",
        ),
    ],
)
def test_argument_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_classification_transforms_are_untouched_by_inversion_support(tmp_path):
    """OrientToRASd and MatchSpatialDimsd became invertible; a classification input is the same tensor as before."""
    path = _nifti(tmp_path / "v.nii.gz", _blob((8, 8, 8), (2, 3, 4), 2.0))
    out = classification_transforms("nifti", (8, 8, 8), label_key=None)({"image": path})
    expected = torch.from_numpy(_blob((8, 8, 8), (2, 3, 4), 2.0)[::-1].copy())
    expected = (expected - expected.mean()) / expected.std(unbiased=False)
    torch.testing.assert_close(out["image"][0].as_tensor(), expected, atol=1e-4, rtol=1e-4)


# --- datalists ----------------------------------------------------------------------------------------------------


def _datalist(tmp_path: Path, content: dict) -> Path:
    path = tmp_path / "datalist.json"
    path.write_text(json.dumps(content))
    return path


def test_load_datalist_segmentation_resolves_label_maps(tmp_path):
    (tmp_path / "cases").mkdir()
    for i in range(3):
        _pair(tmp_path / "cases", name=f"c{i}")
    content = {
        "training": [{"image": f"cases/c{i}_image.nii.gz", "label": f"cases/c{i}_label.nii.gz"} for i in range(2)],
        "validation": [{"image": "cases/c2_image.nii.gz", "label": "./cases/../cases/c2_label.nii.gz", "id": 7}],
        "test": ["cases/c2_image.nii.gz"],
    }
    data = load_datalist(
        _datalist(tmp_path, content),
        task="segmentation",
        required=["training", "validation"],
        sections=["training", "validation"],
    )
    assert data["training"][1] == {
        "image": str(tmp_path / "cases" / "c1_image.nii.gz"),
        "label": str(tmp_path / "cases" / "c1_label.nii.gz"),
    }
    assert data["validation"][0]["label"] == str(tmp_path / "cases" / "c2_label.nii.gz")
    assert data["validation"][0]["id"] == 7
    # a path is not a class index: the classification reading refuses it
    with pytest.raises(
        ValueError, match=r"section 'training', item 0, field 'label': .* is not an integer class label"
    ):
        load_datalist(_datalist(tmp_path, content), sections=["training"])
    # unlabelled test images are read with require_label=False
    unlabelled = load_datalist(
        _datalist(tmp_path, content), task="segmentation", sections=["test"], require_label=False
    )
    assert unlabelled["test"] == [{"image": str(tmp_path / "cases" / "c2_image.nii.gz")}]


def test_load_datalist_segmentation_errors(tmp_path):
    image, label = _pair(tmp_path)
    path = _datalist(
        tmp_path, {"training": [{"image": image, "label": label}, {"image": image, "label": "gone.nii.gz"}]}
    )
    with pytest.raises(ValueError) as info:
        load_datalist(path, task="segmentation", sections=["training"])
    assert str(info.value) == (
        f"datalist {path}, section 'training', item 1, field 'label' (the label map of {image}): "
        f"{tmp_path / 'gone.nii.gz'} does not exist"
    )
    path = _datalist(tmp_path, {"training": [{"image": image}]})
    with pytest.raises(ValueError, match="item 0, field 'label': missing"):
        load_datalist(path, task="segmentation", sections=["training"])
    path = _datalist(tmp_path, {"training": [{"image": image, "label": 1}]})
    with pytest.raises(ValueError, match="field 'label' .the label map of .*: expected a file or folder path, got 1"):
        load_datalist(path, task="segmentation", sections=["training"])
    with pytest.raises(ValueError, match="task 'detection' is not supported"):
        load_datalist(path, task="detection")


def test_check_items_segmentation(tmp_path, caplog):
    good = dict(zip(("image", "label"), _pair(tmp_path, name="good"), strict=True))
    image, _ = _pair(tmp_path, name="short")
    short = {"image": image, "label": _nifti(tmp_path / "short_label.nii.gz", np.zeros((20, 14, 5), np.uint8))}
    image, _ = _pair(tmp_path, name="high")
    high = {"image": image, "label": _nifti(tmp_path / "high_label.nii.gz", np.full((20, 14, 6), 5, np.uint8))}
    image, _ = _pair(tmp_path, name="empty")
    empty = {"image": image, "label": _nifti(tmp_path / "empty_label.nii.gz", np.zeros((20, 14, 6), np.uint8))}
    unlabelled = {"image": good["image"]}
    items = [good, short, high, empty, unlabelled]

    with pytest.raises(BadImageError) as info:
        check_items(items, "NibabelReader", task="segmentation", num_classes=3, section="training")
    assert info.value.path == short["image"] and short["label"] in str(info.value)
    assert "spatial shape (20, 14, 5), the image (20, 14, 6)" in str(info.value)

    report = tmp_path / "skipped.json"
    with caplog.at_level(logging.WARNING, logger="monai_medmerge.data.datalist"):
        kept = check_items(
            items, "NibabelReader", task="segmentation", num_classes=3, skip_bad=True, report_path=report
        )
    assert kept == [good, empty, unlabelled]
    skipped = json.loads(report.read_text())
    assert [(s["image"], s["label"]) for s in skipped] == [
        (short["image"], short["label"]),
        (high["image"], high["label"]),
    ]
    assert all(s["label"] in s["reason"] for s in skipped)
    assert "holds values outside the classes [0, 3): 5 (1680 voxels)" in skipped[1]["reason"]
    assert any("1 of 5 images have label maps without foreground" in r.getMessage() for r in caplog.records)
    # the classification reading of the same items refuses the label map paths as class labels
    with pytest.raises(BadImageError, match="is not an integer class label"):
        check_items([good], "NibabelReader")


def test_training_patches_of_an_unlabelled_image_lie_anywhere_and_keep_the_patch_size(tmp_path):
    """Without a label map (the unlabelled images of a distilled phase 2) training takes a random patch of
    spatial_size anywhere in the image, padding an image smaller than the patch, as the labelled patches are."""
    ramp = np.add.outer(np.arange(40.0), np.arange(30.0) * 100)  # every voxel distinct: a patch shows where it lies
    image = _nifti(tmp_path / "big.nii.gz", ramp, np.eye(4))
    chain = segmentation_transforms("nifti", (16, 16), train=True, label_key=None, modality="other", augment=False)
    whole = segmentation_transforms("nifti", (16, 16), train=False, label_key=None, modality="other")
    full = whole({"image": image})["image"][0].numpy()
    corners = set()
    for seed in range(8):
        chain.set_random_state(seed)
        patch = chain({"image": image})["image"][0].numpy()
        assert patch.shape == (16, 16)
        i, j = np.unravel_index(np.argmin(np.abs(full - patch[0, 0])), full.shape)
        np.testing.assert_allclose(patch, full[i : i + 16, j : j + 16], rtol=1e-6, atol=1e-6)  # a window of it
        corners.add((int(i), int(j)))
    assert len(corners) > 1  # from several places
    small = _nifti(tmp_path / "small.nii.gz", np.ones((10, 12)), np.eye(4))
    assert tuple(chain({"image": small})["image"].shape) == (1, 16, 16)

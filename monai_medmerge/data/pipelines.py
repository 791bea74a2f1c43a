"""MONAI transform pipelines and datasets for image classification and segmentation from PNG/JPEG, NIfTI and DICOM.

The functions take plain keyword arguments, so a MONAI bundle config can build them::

    train_transforms:
      _target_: monai_medmerge.data.pipelines.classification_transforms
      kind: dicom_series
      spatial_size: [64, 64, 32]
      modality: CT
      train: true
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import Compose
from monai.utils import instantiate

from monai_medmerge.data.transforms import READERS

__all__ = [
    "CACHE_MODES",
    "DEFAULT_READERS",
    "KINDS",
    "MODALITIES",
    "TASKS",
    "classification_transforms",
    "instantiate_step",
    "make_dataset",
    "preprocessing_config",
    "segmentation_transforms",
]

DEFAULT_READERS = {
    "png": "PILReader",
    "nifti": "NibabelReader",
    "dicom": "PydicomReader",
    "dicom_series": "ITKReader",
}
KINDS = tuple(DEFAULT_READERS)
# "MRI" is read as "MR", the DICOM Modality value.
MODALITIES = ("CT", "MR", "MRI", "other")
CACHE_MODES = ("none", "memory", "disk")
TASKS = ("classification", "segmentation")
# Light training augmentation: rotations up to about 6 degrees, scaling by up to 5%, noise of 2% of a unit range.
AUG_ROTATE = 0.1
AUG_SCALE = 0.05
AUG_NOISE_STD = 0.02


def _keys(keys: Any, name: str) -> tuple[str, ...]:
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    if not keys or not all(isinstance(k, str) and k for k in keys):
        raise ValueError(f"{name} must be a key or a list of keys, got {keys!r}")
    return keys


def _pair(value: Any, name: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be two numbers (low, high), got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"{name} must be two finite numbers with low < high, got {value!r}")
    return low, high


def _sizes(value: Any, name: str, kind: type, allowed_lengths: Sequence[int]) -> tuple:
    try:
        values = tuple(value)
    except TypeError:
        raise ValueError(f"{name} must be a list of {' or '.join(map(str, allowed_lengths))} values") from None
    if len(values) not in allowed_lengths:
        raise ValueError(f"{name} must have {' or '.join(map(str, allowed_lengths))} values, got {value!r}")
    good = all(
        not isinstance(v, bool)
        and isinstance(v, (int, float, np.integer, np.floating))
        and (kind is float or float(v).is_integer())
        and math.isfinite(v)
        and v > 0
        for v in values
    )
    if not good:
        positive = "positive integers" if kind is int else "positive numbers"
        raise ValueError(f"{name} must hold {positive}, got {value!r}")
    return tuple(kind(v) for v in values)


def preprocessing_config(
    kind: str,
    spatial_size: Sequence[int],
    train: bool = False,
    reader: str | None = None,
    modality: str = "other",
    window: Sequence[float] = (-1000.0, 1000.0),
    percentiles: Sequence[float] = (1.0, 99.0),
    pixdim: Sequence[float] | None = None,
    augment: bool = True,
    keys: str | Sequence[str] = ("image",),
    label_key: str | None = "label",
    num_classes: int | None = None,
    channels: int = 1,
    task: str = "classification",
) -> list[dict[str, Any]]:
    """The preprocessing of a datalist item as data: one MONAI transform config (``_target_`` and arguments) a step.

    This is the one description of the pipeline, for both tasks. :func:`classification_transforms` and
    :func:`segmentation_transforms` instantiate it for training, validation and evaluation, and
    :func:`monai_medmerge.bundle.export_bundle` writes the evaluation half of the same list (``train=False``) into
    the exported bundle's ``inference.yaml``, so an exported network sees exactly the tensors it was trained on.
    Every argument is a literal (numbers, strings, lists), so the list can be dumped to YAML or JSON as it is.
    ``_target_`` names are full dotted paths: ``monai.transforms`` classes, and the strict loading and checking
    transforms of :mod:`monai_medmerge.data.transforms` (which import only MONAI, torch and numpy; the export ships
    that module inside the bundle).

    Steps for ``task="classification"``, in order:

    1. ``CheckedLoadImaged`` with one reader (no fallback to others; bad files raise ``BadImageError``), channel
       first.
    2. Channels: ``kind="png"`` converts gray+alpha, RGB or RGBA to ``channels`` (1 or 3); other kinds must have
       ``channels`` channels (checked per file; the error names it).
    3. Orientation to RAS (``"RA"`` for a 2-D image) for NIfTI and DICOM; not for PNG/JPEG, which carry no
       patient orientation.
    4. A 2-D pipeline (``spatial_size`` of 2 values) drops the singleton axis of a single slice read as 3-D (a
       DICOM slice through ``ITKReader``, a 2-D NIfTI saved with a depth of 1); any other mismatch of
       dimensions is an error.
    5. ``Spacingd(pixdim)`` when ``pixdim`` is given.
    6. Intensity: ``"CT"`` maps the ``window`` (Hounsfield units) to [0, 1] and clips; ``"MR"``/``"MRI"`` maps the
       image's own ``percentiles`` to [0, 1] and clips; ``"other"`` normalises to zero mean and unit variance.
    7. ``Resized(spatial_size)`` (bilinear or trilinear, anti-aliased when shrinking).
    8. With ``train`` and ``augment``: a random flip of the first spatial axis, a small random affine (rotation up to
       0.1 rad, scaling up to 5%) and Gaussian noise (std 0.02).
    9. The image as ``float32``; the label, checked against ``num_classes``, as a ``torch.long`` scalar.

    ``task="segmentation"`` shares steps 1 to 6 and the augmentation; ``label_key`` is then a label map file that
    goes through every spatial step with the image:

    1. Image and label map are loaded by the same ``CheckedLoadImaged``, channel first.
    2. ``CheckedLabelMapd``: the label map has one channel, the image's spatial shape and affine, and integer
       values in ``[0, num_classes)`` (background 0 included); the error names both files.
    3. to 5. Channels of the image as above; orientation and the 2-D singleton rule on both; ``Spacingd`` with
       bilinear interpolation for the image and nearest for the label map.
    6. Intensity on the image only.
    7. No resizing: a mask must come back in its input's space. ``spatial_size`` is the training patch and the
       sliding-window ROI. With ``train``, ``SpatialPadd`` pads both to at least ``spatial_size`` and
       ``RandCropByPosNegLabeld`` takes one patch of ``spatial_size`` per item, centred on foreground or background
       with equal odds (random crops of small structures would mostly hold background). Without ``train`` the whole
       image is kept, unpadded: ``SlidingWindowInferer(roi_size=spatial_size)`` pads on its own, and images of
       different sizes need a batch size of 1 (or ``pad_list_data_collate``).
    8. With ``train`` and ``augment``: the flip and the affine of classification on image and label map alike
       (nearest for the label map), noise on the image only.
    9. The image as ``float32``; the label map as ``int64`` of shape ``(1, *spatial)``, as
       ``DiceCELoss(to_onehot_y=True, softmax=True)`` and ``AsDiscrete(to_onehot=num_classes)`` take it.

    With ``train``, the segmentation pipeline returns a list holding one dict (the crop transform's convention for
    ``num_samples`` crops); ``monai.data.DataLoader`` flattens it into the batch. Without ``label_key`` only the
    image steps remain, and every one that moves voxels is invertible: ``monai.transforms.Invertd`` with the same
    ``Compose`` takes a predicted mask back to the file's own grid, axis order and affine.

    Args:
        kind: ``"png"`` (2-D PNG/JPEG/BMP, ``PILReader``), ``"nifti"`` (2-D or 3-D, ``NibabelReader``), ``"dicom"``
            (one single-frame DICOM file, ``PydicomReader``; give multi-frame files ``reader="ITKReader"``) or
            ``"dicom_series"`` (a folder of slices, ``ITKReader``).
        spatial_size: classification: the network's input size; segmentation: the training patch and
            sliding-window ROI size. 2 values for a 2-D network or 3 for a 3-D one.
        train: whether this is the training pipeline (augmentation; patches for segmentation).
        reader: overrides the kind's reader: ``"PILReader"``, ``"NibabelReader"``, ``"PydicomReader"`` or
            ``"ITKReader"``.
        modality: ``"CT"``, ``"MR"``, ``"MRI"`` or ``"other"`` (case does not matter).
        window: for CT, the (low, high) Hounsfield range mapped to [0, 1].
        percentiles: for MR, the (low, high) percentiles of each image mapped to [0, 1], within [0, 100].
        pixdim: target voxel spacing in mm, one value per spatial axis; ``None`` keeps the spacing.
        augment: with ``train``, whether to add the random augmentation.
        keys: keys of the images in each item.
        label_key: key of the class label (classification) or of the label map file (segmentation); ``None`` for
            items without labels (inference).
        num_classes: when given, labels (or label map values) must lie in ``[0, num_classes)``; for segmentation
            the background 0 counts, so it is at least 2.
        channels: the network's input channels. PNG/JPEG pictures are converted to it (1: luminance, 3: RGB);
            images of the other kinds must have it.
        task: ``"classification"`` or ``"segmentation"``.

    Returns:
        a list of transform configs (dicts), in order.

    Raises:
        ValueError: for an unknown kind, reader, modality or task, a ``spatial_size`` that is not 2 or 3 positive
            integers, a ``window`` or ``percentiles`` that is not an increasing pair (percentiles within [0, 100]),
            a ``pixdim`` whose length differs from ``spatial_size``, ``channels`` that is not a positive integer, a
            PNG pipeline with ``channels`` other than 1 or 3, or, for segmentation, a ``label_key`` that is also one of
            ``keys`` or a ``num_classes`` below 2.
    """
    if kind not in DEFAULT_READERS:
        raise ValueError(f"kind {kind!r} is not supported; choose one of {', '.join(KINDS)}")
    reader = DEFAULT_READERS[kind] if reader is None else reader
    if reader not in READERS:
        raise ValueError(f"reader {reader!r} is not supported; choose one of {', '.join(READERS)}")
    if not isinstance(modality, str) or modality.upper() not in {m.upper() for m in MODALITIES}:
        raise ValueError(f"modality {modality!r} is not supported; choose one of {', '.join(MODALITIES)}")
    modality = {"CT": "CT", "MR": "MR", "MRI": "MR", "OTHER": "other"}[modality.upper()]
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not supported; choose one of {', '.join(TASKS)}")
    size = list(_sizes(spatial_size, "spatial_size", int, (2, 3)))
    dims = len(size)
    low_hu, high_hu = _pair(window, "window")
    low_pct, high_pct = _pair(percentiles, "percentiles")
    if not 0.0 <= low_pct < high_pct <= 100.0:
        raise ValueError(f"percentiles must lie within [0, 100], got {percentiles!r}")
    if pixdim is not None:
        pixdim = list(_sizes(pixdim, "pixdim", float, (dims,)))
    if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels < 1:
        raise ValueError(f"channels must be a positive integer (the network's in_channels), got {channels!r}")
    if kind == "png" and channels not in (1, 3):
        raise ValueError(f"a PNG/JPEG pipeline gives 1 (gray) or 3 (RGB) channels; channels is {channels!r}")
    keys = list(_keys(keys, "keys"))
    if label_key is not None and (not isinstance(label_key, str) or not label_key):
        raise ValueError(f"label_key must be a key (a string) or None, got {label_key!r}")
    segmentation = task == "segmentation"
    # segmentation: the label map is loaded, moved and cropped with the images; classification: a number, apart
    label_map = label_key if segmentation else None
    if label_map is not None and label_map in keys:
        raise ValueError(f"label_key {label_map!r} is also one of the image keys {keys}")
    if (
        segmentation
        and num_classes is not None
        and (isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2)
    ):
        raise ValueError(
            f"num_classes must be an integer of at least 2 (background 0 included) or None, got {num_classes!r}"
        )
    spatial_keys = keys + ([label_map] if label_map is not None else [])

    ours, monai_ = "monai_medmerge.data.transforms.", "monai.transforms."
    steps: list[dict[str, Any]] = [
        {"_target_": ours + "CheckedLoadImaged", "keys": spatial_keys, "reader": reader, "image_only": True}
    ]
    if label_map is not None:
        steps.append(
            {
                "_target_": ours + "CheckedLabelMapd",
                "keys": label_map,
                "image_key": keys[0],
                "num_classes": None if num_classes is None else int(num_classes),
            }
        )
    steps.append(
        {"_target_": ours + "ImageChannelsd", "keys": keys, "channels": int(channels), "convert": kind == "png"}
    )
    if kind != "png":
        steps.append({"_target_": ours + "OrientToRASd", "keys": spatial_keys})
    steps.append({"_target_": ours + "MatchSpatialDimsd", "keys": spatial_keys, "spatial_dims": dims})
    if pixdim is not None:
        steps.append(
            {"_target_": monai_ + "Spacingd", "keys": spatial_keys, "pixdim": pixdim, "mode": _modes(keys, label_map)}
        )
    steps.append(_intensity(modality, low_hu, high_hu, low_pct, high_pct, keys))
    if not segmentation:
        mode = "bilinear" if dims == 2 else "trilinear"
        steps.append(
            {"_target_": monai_ + "Resized", "keys": keys, "spatial_size": size, "mode": mode, "anti_aliasing": True}
        )
    elif train:
        steps.append({"_target_": monai_ + "SpatialPadd", "keys": spatial_keys, "spatial_size": size})
        if label_map is not None:
            crop = {"label_key": label_map, "spatial_size": size, "pos": 1.0, "neg": 1.0, "num_samples": 1}
            steps.append({"_target_": monai_ + "RandCropByPosNegLabeld", "keys": spatial_keys, **crop})
        else:  # no label map to find foreground in (unlabelled images): a patch anywhere, of the same size
            crop = {"roi_size": size, "random_size": False}
            steps.append({"_target_": monai_ + "RandSpatialCropd", "keys": spatial_keys, **crop})
    if train and augment:
        steps += _augmentation(keys, label_map, dims)
    steps.append({"_target_": monai_ + "EnsureTyped", "keys": keys, "dtype": "float32"})
    if label_map is not None:
        steps.append({"_target_": monai_ + "EnsureTyped", "keys": label_map, "dtype": "int64"})
    elif label_key is not None:
        steps.append(
            {"_target_": ours + "ClassLabeld", "keys": label_key, "num_classes": num_classes, "image_key": keys[0]}
        )
    # through JSON: plain literals only, and no object shared between steps (YAML would write anchors for them)
    return json.loads(json.dumps(steps))


def _modes(keys: list[str], label_map: str | None) -> str | list[str]:
    """Interpolation of each spatial key: images bilinear, a label map nearest (its values are class indices)."""
    return "bilinear" if label_map is None else ["bilinear"] * len(keys) + ["nearest"]


def _intensity(
    modality: str, low_hu: float, high_hu: float, low_pct: float, high_pct: float, keys: list[str]
) -> dict[str, Any]:
    if modality == "CT":
        intensity = {"_target_": "monai.transforms.ScaleIntensityRanged", "a_min": low_hu, "a_max": high_hu}
    elif modality == "MR":
        intensity = {
            "_target_": "monai.transforms.ScaleIntensityRangePercentilesd",
            "lower": low_pct,
            "upper": high_pct,
        }
    else:
        intensity = {"_target_": "monai.transforms.NormalizeIntensityd"}
    if modality != "other":
        intensity.update(b_min=0.0, b_max=1.0, clip=True)
    return {**intensity, "keys": keys}


def _augmentation(keys: list[str], label_map: str | None, dims: int) -> list[dict[str, Any]]:
    """The random training steps: the spatial ones move a label map with its images, noise touches images only."""
    spatial_keys = keys + ([label_map] if label_map is not None else [])
    return [
        {"_target_": "monai.transforms.RandFlipd", "keys": spatial_keys, "prob": 0.5, "spatial_axis": 0},
        {
            "_target_": "monai.transforms.RandAffined",
            "keys": spatial_keys,
            "prob": 0.5,
            "rotate_range": [AUG_ROTATE] * (1 if dims == 2 else 3),
            "scale_range": [AUG_SCALE] * dims,
            "mode": _modes(keys, label_map),
            "padding_mode": "border",
        },
        {
            "_target_": "monai.transforms.RandGaussianNoised",
            "keys": keys,
            "prob": 0.3,
            "mean": 0.0,
            "std": AUG_NOISE_STD,
        },
    ]


def classification_transforms(*args: Any, **kwargs: Any) -> Compose:
    """The MONAI transforms that take a datalist item to a network input and a class label.

    Takes the arguments of :func:`preprocessing_config` (see there for the steps) and instantiates that list, the
    one description of the pipeline, which is also what an exported bundle runs at inference.

    Returns:
        a ``monai.transforms.Compose``; the image comes out as a ``float32`` tensor of shape
        ``(channels, *spatial_size)``.

    Raises:
        ValueError: for the arguments :func:`preprocessing_config` refuses.
    """
    return Compose([instantiate_step(step) for step in preprocessing_config(*args, **kwargs)])


def segmentation_transforms(*args: Any, **kwargs: Any) -> Compose:
    """The MONAI transforms that take a datalist item (image and label map files) to a network input and a mask.

    Takes the arguments of :func:`preprocessing_config` and instantiates that list with ``task="segmentation"``:
    the same description as classification, with the label map moved along with the image (see there).

    Returns:
        a ``monai.transforms.Compose``. The image comes out as a ``float32`` tensor of shape ``(channels,
        *spatial)`` and the label map as ``int64`` of shape ``(1, *spatial)``: patches of ``spatial_size``, in a
        list of one dict, with ``train``; the whole (resampled) image without it.

    Raises:
        ValueError: for the arguments :func:`preprocessing_config` refuses, or a ``task`` other than
            ``"segmentation"``.
    """
    task = kwargs.pop("task", "segmentation")
    if task != "segmentation":
        raise ValueError(f"segmentation_transforms builds the segmentation pipeline; task is {task!r}")
    return Compose([instantiate_step(step) for step in preprocessing_config(*args, task="segmentation", **kwargs)])


def instantiate_step(step: Mapping[str, Any]) -> Any:
    """Build one transform of :func:`preprocessing_config` (a ``_target_`` with literal arguments)."""
    args = {k: v for k, v in step.items() if k != "_target_"}
    return instantiate(step["_target_"], "default", **args)


def make_dataset(
    items: Sequence[dict],
    transforms: Any,
    cache: str = "none",
    cache_dir: str | os.PathLike[str] | None = None,
    **kwargs: Any,
) -> Dataset:
    """A MONAI dataset of datalist items, cached in memory or on disk where that pays.

    Caching keeps the result of the deterministic transforms (everything before the first random one): loading and
    resampling DICOM or NIfTI is then done once instead of every epoch.

    Args:
        items: datalist items (dicts).
        transforms: the transform (for example from :func:`classification_transforms`).
        cache: ``"none"`` (``monai.data.Dataset``), ``"memory"`` (``CacheDataset``: fastest, needs RAM for every
            preprocessed image) or ``"disk"`` (``PersistentDataset``: survives between runs, needs ``cache_dir``).
        cache_dir: the folder of the disk cache; created when missing.
        kwargs: more arguments for the dataset class (for example ``num_workers`` or ``cache_rate`` of
            ``CacheDataset``).

    Returns:
        the dataset.

    Raises:
        ValueError: for an unknown ``cache``, or ``"disk"`` without ``cache_dir``.
    """
    if cache not in CACHE_MODES:
        raise ValueError(f"cache {cache!r} is not supported; choose one of {', '.join(CACHE_MODES)}")
    items = list(items)
    if cache == "none":
        return Dataset(data=items, transform=transforms, **kwargs)
    if cache == "memory":
        kwargs.setdefault("progress", False)
        return CacheDataset(data=items, transform=transforms, **kwargs)
    if cache_dir is None:
        raise ValueError("cache='disk' needs cache_dir, the folder that holds the cached images")
    os.makedirs(cache_dir, exist_ok=True)
    return PersistentDataset(data=items, transform=transforms, cache_dir=cache_dir, **kwargs)

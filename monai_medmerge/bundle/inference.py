"""The inference workflow of an exported bundle: a MONAI config that uses MONAI and torch only.

The config is a standard ``SupervisedEvaluator`` workflow, as in the MONAI model zoo's classification bundles:
images from ``dataset_dir`` (files, or DICOM series folders) go through the preprocessing that the network was
trained with, the network's softmax probabilities are written by ``ClassificationSaver`` to
``<output_dir>/predictions.csv``, one row per input: the input's path, then one probability per class in the order of
``network_data_format#outputs#pred#channel_def``.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["MODALITIES", "READERS", "inference_config", "input_description", "required_packages"]

# reader class name -> the distribution it needs at inference (None: MONAI's own requirements suffice)
READERS: dict[str, str | None] = {
    "ITKReader": "itk",
    "NibabelReader": "nibabel",
    "PydicomReader": "pydicom",
    "PILReader": "pillow",
    "NrrdReader": "pynrrd",
    "NumpyReader": None,
}
# modality as given -> (modality in the metadata, intensity format in the metadata)
MODALITIES: dict[str, tuple[str, str]] = {
    "ct": ("CT", "hounsfield"),
    "mr": ("MR", "magnitude"),
    "mri": ("MR", "magnitude"),
    "other": ("any", "magnitude"),
}
# what every exported inference workflow needs besides MONAI, torch and numpy: the evaluator is an Ignite engine,
# the config is YAML, and `python -m monai.bundle` parses its command line with fire
WORKFLOW_PACKAGES = ("pytorch-ignite", "pyyaml", "fire")


def canonical_reader(reader: str) -> str:
    """The reader's class name as MONAI spells it (``"itkreader"`` -> ``"ITKReader"``).

    Raises:
        ValueError: when ``reader`` is not one of :data:`READERS`.
    """
    names = {name.lower(): name for name in READERS}
    if str(reader).lower() not in names:
        raise ValueError(f"reader {reader!r} is not one of {', '.join(READERS)}.")
    return names[str(reader).lower()]


def canonical_modality(modality: str) -> str:
    """``"CT"``, ``"MR"`` or ``"other"`` for a modality given in any case (``"MRI"`` is ``"MR"``).

    Raises:
        ValueError: when ``modality`` is not one of ``CT``, ``MR``, ``MRI``, ``other``.
    """
    names = {"ct": "CT", "mr": "MR", "mri": "MR", "other": "other"}
    if str(modality).lower() not in names:
        raise ValueError(f"modality {modality!r} is not one of CT, MR, MRI, other.")
    return names[str(modality).lower()]


def intensity_transform(modality: str, window: Sequence[float], percentiles: Sequence[float]) -> dict[str, Any]:
    """The MONAI intensity transform for ``modality``: a CT window or MR percentiles scaled to [0, 1], clipped; else
    normalisation to zero mean and unit variance per channel."""
    modality = canonical_modality(modality)
    if modality == "CT":
        lo, hi = (float(v) for v in window)
        if not lo < hi:
            raise ValueError(f"window must be (low, high) with low < high, got {tuple(window)}.")
        return {
            "_target_": "ScaleIntensityRanged",
            "keys": "image",
            "a_min": lo,
            "a_max": hi,
            "b_min": 0.0,
            "b_max": 1.0,
            "clip": True,
        }
    if modality == "MR":
        lo, hi = (float(v) for v in percentiles)
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must be (low, high) with 0 <= low < high <= 100, got {tuple(percentiles)}.")
        return {
            "_target_": "ScaleIntensityRangePercentilesd",
            "keys": "image",
            "lower": lo,
            "upper": hi,
            "b_min": 0.0,
            "b_max": 1.0,
            "clip": True,
        }
    return {"_target_": "NormalizeIntensityd", "keys": "image", "channel_wise": True}


def input_description(
    modality: str, window: Sequence[float], percentiles: Sequence[float], reader: str, pixdim: Sequence[float] | None
) -> str:
    """One sentence for the metadata's ``image_classes``: what the network's input holds."""
    modality = canonical_modality(modality)
    if modality == "CT":
        scale = f"CT intensities in the window [{window[0]:g}, {window[1]:g}] HU scaled to [0, 1] and clipped"
    elif modality == "MR":
        scale = f"MR intensities between the {percentiles[0]:g}th and {percentiles[1]:g}th percentile scaled to [0, 1]"
    else:
        scale = "intensities normalised to zero mean and unit variance per channel"
    spacing = f", resampled to spacing {list(pixdim)}" if pixdim else ""
    return f"Images read with MONAI's {reader}{spacing}, resized to the network's input; {scale}."


def required_packages(reader: str) -> dict[str, str]:
    """``required_packages_version`` of the metadata: the reader's package and the workflow's, at the versions
    installed here. A package that is not installed here is listed with the version ``"*"`` (any)."""
    names = [p for p in (READERS[canonical_reader(reader)],) if p] + list(WORKFLOW_PACKAGES)
    found = {}
    for name in names:
        try:
            found[name] = importlib.metadata.version(name).split("+")[0]
        except importlib.metadata.PackageNotFoundError:
            found[name] = "*"
    return found


def inference_config(
    network_def: Mapping[str, Any],
    class_names: Sequence[str],
    spatial_shape: Sequence[int],
    reader: str = "ITKReader",
    modality: str = "other",
    window: Sequence[float] = (-1000.0, 1000.0),
    percentiles: Sequence[float] = (1.0, 99.0),
    pixdim: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The ``configs/inference.yaml`` content of an exported bundle: a complete MONAI inference workflow.

    Only MONAI and torch components are named, so the bundle runs where MONAI, torch, Ignite and the reader's
    package are installed. The ids follow MONAI's inference properties (``bundle_root``, ``device``,
    ``dataset_dir``, ``dataset``, ``evaluator``, ``network_def``, ``inferer``, ``preprocessing``,
    ``postprocessing``, ``handlers``), so ``ConfigWorkflow(..., workflow_type="infer").check_properties()`` passes.

    The reader is strict: MONAI's ``LoadImaged`` falls back to its other readers when the named one fails, which
    could read a file differently from how the network was trained; ``initialize`` removes those fallbacks, so an
    unreadable input is an error that names the file.

    Args:
        network_def: the plain network's config (``_target_`` with a full dotted path).
        class_names: one name per output, in output order.
        spatial_shape: the network's input spatial shape; 3 values make the pipeline orient volumes to RAS.
        reader: MONAI reader class name (see :data:`READERS`).
        modality: ``"CT"`` (``window``), ``"MR"``/``"MRI"`` (``percentiles``) or ``"other"`` (normalisation).
        window: CT window (low, high) in HU, scaled to [0, 1].
        percentiles: MR intensity percentiles (low, high), scaled to [0, 1].
        pixdim: resample to this voxel spacing first (one value per spatial axis), or ``None`` to keep the grid.

    Returns:
        the config as a plain dict, ready for ``yaml.safe_dump``.

    Raises:
        ValueError: for an unknown reader or modality, a bad window or percentiles, or a ``pixdim`` whose length is
            not the number of spatial axes.
    """
    reader = canonical_reader(reader)
    spatial_shape = [int(s) for s in spatial_shape]
    transforms: list[dict[str, Any]] = [
        {"_target_": "LoadImaged", "keys": "image", "reader": "@image_reader", "image_only": True},
        {"_target_": "EnsureChannelFirstd", "keys": "image"},
    ]
    if len(spatial_shape) == 3:
        # labels given: MONAI 1.6 warns that their default will change to the image's own space
        labels = [["L", "R"], ["P", "A"], ["I", "S"]]
        transforms.append({"_target_": "Orientationd", "keys": "image", "axcodes": "RAS", "labels": labels})
    if pixdim is not None:
        pixdim = [float(p) for p in pixdim]
        if len(pixdim) != len(spatial_shape):
            raise ValueError(f"pixdim {pixdim} needs one value per spatial axis of {spatial_shape}.")
        transforms.append({"_target_": "Spacingd", "keys": "image", "pixdim": pixdim, "mode": "bilinear"})
    transforms += [
        intensity_transform(modality, window, percentiles),
        {"_target_": "Resized", "keys": "image", "spatial_size": "@spatial_shape"},
        {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
    ]
    return {
        "imports": ["$import glob", "$import os", "$import sys", "$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "dataset_dir": "$@bundle_root + '/data'",
        "image_glob": "*",
        "output_dir": "$@bundle_root + '/eval'",
        "class_names": list(class_names),
        "spatial_shape": spatial_shape,
        # every file and folder (a DICOM series) in dataset_dir; override with --datalist "[{'image': ...}, ...]"
        "datalist": '$[{"image": f} for f in sorted(glob.glob(os.path.join(@dataset_dir, @image_glob)))]',
        "network_def": dict(network_def),
        "network": "$@network_def.to(@device)",
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "load_weights": "$@network.load_state_dict(torch.load(@checkpoint, map_location=@device, weights_only=True))",
        "image_reader": {"_target_": reader},
        "preprocessing": {"_target_": "Compose", "transforms": transforms},
        # LoadImaged tries its default readers when image_reader fails; keep only image_reader
        "strict_reader": "$setattr(@preprocessing#transforms#0._loader, 'readers', [@image_reader])",
        "dataset": {"_target_": "Dataset", "data": "@datalist", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            # one image per batch: the metadata of a NIfTI file and of a DICOM series have different keys
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "Activationsd", "keys": "pred", "softmax": True}],
        },
        "handlers": [
            {
                "_target_": "ClassificationSaver",
                "output_dir": "@output_dir",
                "filename": "predictions.csv",
                "batch_transform": '$lambda batch: [item["image"].meta for item in batch]',
                "output_transform": '$lambda output: [item["pred"] for item in output]',
            }
        ],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,
        },
        "check_inputs": '$len(@datalist) or sys.exit("no input images: nothing matches " '
        '+ os.path.join(@dataset_dir, @image_glob) + "; set --dataset_dir, --image_glob or --datalist")',
        "initialize": ["$@strict_reader", "$@load_weights", "$@network.eval()"],
        "run": ["$@check_inputs", "$@evaluator.run()"],
    }

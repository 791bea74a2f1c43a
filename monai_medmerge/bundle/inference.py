"""The inference workflow of an exported bundle: a MONAI config that needs MONAI, torch and the reader's package.

The config is a standard ``SupervisedEvaluator`` workflow, as in the MONAI model zoo's classification bundles:
images from ``dataset_dir`` (files, or DICOM series folders) go through the evaluation half of the very
preprocessing description the network was trained with (:func:`monai_medmerge.data.pipelines.preprocessing_config`),
and the network's softmax probabilities go to ``<output_dir>/predictions.csv``: a header row (``file``, then the class
names in the order of ``network_data_format#outputs#pred#channel_def``) and one row per input, or MONAI's
``ClassificationSaver`` format with ``--csv_format monai``. An input that cannot be read does not stop the run: it is
listed with the reason in ``<output_dir>/unreadable.csv``, every other input is classified, and the run then exits
with status 1 (:mod:`monai_medmerge.bundle.shipped`, shipped as ``scripts/medmerge_inference.py``).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_medmerge.data.transforms import READER_PACKAGES
from monai_medmerge.io import write_bytes, write_text

__all__ = [
    "MODALITY_METADATA",
    "INFERENCE_MODULE",
    "SCRIPTS_MODULE",
    "STEP_PACKAGES",
    "WORKFLOW_PACKAGES",
    "bundle_preprocessing",
    "inference_config",
    "input_description",
    "pip_requirements",
    "required_packages",
    "runtime_versions",
    "write_scripts",
]

# the module of the package that the preprocessing description names, and where an exported bundle carries it
_TRANSFORMS_MODULE = "monai_medmerge.data.transforms"
SCRIPTS_MODULE = "scripts.medmerge_transforms"
# what the inference workflow needs beyond MONAI (the predictions table, unreadable inputs), and where it ships
_SHIPPED_MODULE = "monai_medmerge.bundle.shipped"
INFERENCE_MODULE = "scripts.medmerge_inference"
# modality of the pipeline -> (modality in the metadata, intensity format in the metadata)
MODALITY_METADATA: dict[str, tuple[str, str]] = {
    "CT": ("CT", "hounsfield"),
    "MR": ("MR", "magnitude"),
    "other": ("any", "magnitude"),
}
# what every exported inference workflow needs besides MONAI, torch and numpy: the evaluator is an Ignite engine,
# the config is YAML, and `python -m monai.bundle` parses its command line with fire
WORKFLOW_PACKAGES = ("pytorch-ignite", "pyyaml", "fire")
# what a preprocessing step needs beyond MONAI, torch and numpy, by its class name: MONAI's Orientation (behind
# OrientToRASd, for every kind but PNG/JPEG) computes axis codes with nibabel.orientations, whatever the reader
STEP_PACKAGES: dict[str, tuple[str, ...]] = {"OrientToRASd": ("nibabel",)}


def bundle_preprocessing(steps: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The steps of :func:`monai_medmerge.data.pipelines.preprocessing_config` as an exported bundle names them.

    The same transforms with the same arguments; only the module of the package's own transforms changes to the
    copy that :func:`write_scripts` puts into the bundle (``scripts/medmerge_transforms.py``), so the bundle runs
    where monai_medmerge is not installed.
    """
    out = []
    for step in steps:
        step = dict(step)
        target = str(step.get("_target_", ""))
        if target.startswith(_TRANSFORMS_MODULE + "."):
            step["_target_"] = SCRIPTS_MODULE + target[len(_TRANSFORMS_MODULE) :]
        elif target.split(".")[0] == "monai_medmerge":
            raise ValueError(f"preprocessing step {target!r} cannot be exported: only {_TRANSFORMS_MODULE} ships")
        out.append(step)
    return out


def write_scripts(bundle_dir: str | os.PathLike) -> Path:
    """Copy the package's modules that the exported inference names into ``<bundle_dir>/scripts/``.

    Each is a byte copy that imports only MONAI, torch, numpy and the other copy: ``medmerge_transforms.py`` is
    ``monai_medmerge/data/transforms.py`` (the preprocessing runs the same code as training did) and
    ``medmerge_inference.py`` is ``monai_medmerge/bundle/shipped.py`` (the predictions table, unreadable inputs).
    """
    scripts = Path(bundle_dir) / "scripts"
    scripts.mkdir(parents=True, exist_ok=True)
    write_text(scripts / "__init__.py", "")
    for module, shipped_as in ((_TRANSFORMS_MODULE, SCRIPTS_MODULE), (_SHIPPED_MODULE, INFERENCE_MODULE)):
        source = Path(importlib.import_module(module).__file__)
        write_bytes(scripts / (shipped_as.rsplit(".", 1)[1] + ".py"), source.read_bytes())
    return scripts


def _step_args(steps: Sequence[Mapping[str, Any]], name: str) -> dict[str, Any]:
    return next((dict(s) for s in steps if str(s.get("_target_", "")).endswith("." + name)), {})


def input_description(steps: Sequence[Mapping[str, Any]]) -> str:
    """One sentence for the metadata's ``image_classes``: what the network's input holds, read off the steps."""
    reader = _step_args(steps, "CheckedLoadImaged").get("reader", "?")
    ct, mr = _step_args(steps, "ScaleIntensityRanged"), _step_args(steps, "ScaleIntensityRangePercentilesd")
    if ct:
        scale = f"CT intensities in the window [{ct['a_min']:g}, {ct['a_max']:g}] HU scaled to [0, 1] and clipped"
    elif mr:
        scale = f"MR intensities between the {mr['lower']:g}th and {mr['upper']:g}th percentile scaled to [0, 1]"
    else:
        scale = "intensities normalised to zero mean and unit variance"
    pixdim = _step_args(steps, "Spacingd").get("pixdim")
    spacing = f", resampled to spacing {list(pixdim)}" if pixdim else ""
    resized = ", resized to the network's input" if _step_args(steps, "Resized") else ", kept on their grid"
    return f"Images read with MONAI's {reader}{spacing}{resized}; {scale}."


def required_packages(reader: str, steps: Sequence[Mapping[str, Any]] = ()) -> dict[str, str]:
    """``required_packages_version`` of the metadata: the reader's package, what the preprocessing ``steps`` need
    beyond MONAI, torch and numpy (:data:`STEP_PACKAGES`), and the workflow's packages, at the versions installed
    here. A package that is not installed here is listed with the version ``"*"`` (any).

    Args:
        reader: the MONAI reader of the preprocessing.
        steps: the preprocessing steps (``_target_`` and arguments), as :func:`inference_config` takes them.

    Raises:
        ValueError: for a reader that is not one of ``READER_PACKAGES``.
    """
    if reader not in READER_PACKAGES:
        raise ValueError(f"reader {reader!r} is not one of {', '.join(READER_PACKAGES)}.")
    names = [READER_PACKAGES[reader]]
    for step in steps:
        names += STEP_PACKAGES.get(str(step.get("_target_", "")).rsplit(".", 1)[-1], ())
    found = {}
    for name in dict.fromkeys([*names, *WORKFLOW_PACKAGES]):
        try:
            found[name] = importlib.metadata.version(name).split("+")[0]
        except importlib.metadata.PackageNotFoundError:
            found[name] = "*"
    return found


def runtime_versions() -> dict[str, str]:
    """``monai_version``, ``pytorch_version`` and ``numpy_version`` of the metadata: the versions installed here
    (without a local tag such as ``+cpu``)."""
    import monai
    import numpy
    import torch

    return {
        "monai_version": monai.__version__.split("+")[0],
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": numpy.__version__.split("+")[0],
    }


def pip_requirements(metadata: Mapping[str, Any]) -> list[str]:
    """What ``pip install`` needs to run an exported bundle, read off its metadata: torch, MONAI and numpy at the
    versions it was exported with, then ``required_packages_version`` (a ``"*"`` version: any).

    Install the first, torch, alone and first: a plain ``torch`` requirement pulls a multi-GB CUDA build where no torch
    is installed yet; the bundle's README and ``.ci/bundle_env`` say so.
    """
    pins = {
        "torch": metadata["pytorch_version"],
        "monai": metadata["monai_version"],
        "numpy": metadata["numpy_version"],
        **metadata.get("required_packages_version", {}),
    }
    return [f"{name}=={version}" if version not in ("*", "", None) else name for name, version in pins.items()]


def inference_config(
    network_def: Mapping[str, Any],
    class_names: Sequence[str],
    spatial_shape: Sequence[int],
    preprocessing: Sequence[Mapping[str, Any]],
    preprocessing_options: Mapping[str, Any] | None = None,
    task: str = "classification",
    sw_batch_size: int = 4,
    sw_overlap: float = 0.25,
) -> dict[str, Any]:
    """The ``configs/inference.yaml`` content of an exported bundle: a complete MONAI inference workflow.

    Classification writes ``predictions.csv``. Segmentation (``task="segmentation"``) segments each whole image with
    a ``SlidingWindowInferer`` of ``spatial_shape`` windows, takes the argmax over the label channels, maps the
    label map back to the input's own grid and orientation (``Invertd`` of the preprocessing) and writes it as
    ``<output_dir>/<input name>_seg.nii.gz`` (``SaveImaged``, the input's affine, ``uint8``); a DICOM series input
    also as ``<output_dir>/<series folder>_seg.dcm``, a DICOM Segmentation object, where ``highdicom`` is installed.

    The ids follow MONAI's inference properties (``bundle_root``, ``device``, ``dataset_dir``, ``dataset``,
    ``evaluator``, ``network_def``, ``inferer``, ``preprocessing``, ``postprocessing``, ``handlers``), so
    ``ConfigWorkflow(..., workflow_type="infer").check_properties()`` passes.

    Args:
        network_def: the plain network's config (``_target_`` with a full dotted path).
        class_names: one name per output, in output order.
        spatial_shape: the network's input spatial shape.
        preprocessing: the evaluation steps of the training pipeline,
            ``preprocessing_config(..., train=False, label_key=None)``; written as they are, but for the module
            of the package's own transforms (see :func:`bundle_preprocessing`).
        preprocessing_options: the settings the steps were made from (``kind``, ``reader``, ``modality``,
            ``window``, ``percentiles``, ``pixdim``), recorded as data under the same id as in the training bundle,
            so that a later merge training (the MONAI Label app's) builds the same pipeline.
        task: ``"classification"`` or ``"segmentation"``.
        sw_batch_size, sw_overlap: windows per forward pass and their overlap (segmentation).

    Returns:
        the config as a plain dict, ready for ``yaml.safe_dump``.
    """
    shipped = INFERENCE_MODULE
    config = {
        "imports": ["$import glob", "$import os", "$import sys", "$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "dataset_dir": "$@bundle_root + '/data'",
        "image_glob": "*",
        # under the bundle unless named: --output_dir DIR
        "output_dir": "$@bundle_root + '/eval'",
        # medmerge: a header row (file, then the class names); monai: MONAI's ClassificationSaver format, no header
        "csv_format": "medmerge",
        "class_names": list(class_names),
        "spatial_shape": [int(s) for s in spatial_shape],
        # every file and folder (a DICOM series) in dataset_dir; override with --datalist "[{'image': ...}, ...]"
        "datalist": '$[{"image": f} for f in sorted(glob.glob(os.path.join(@dataset_dir, @image_glob)))]',
        "network_def": dict(network_def),
        "network": "$@network_def.to(@device)",
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "load_weights": "$@network.load_state_dict(torch.load(@checkpoint, map_location=@device, weights_only=True))",
        # the package's own transforms and inference helpers live in <bundle_root>/scripts: importable before use
        "scripts_path": "$sys.path.insert(0, os.path.abspath(@bundle_root)) "
        "if os.path.abspath(@bundle_root) not in sys.path else None",
        # what the preprocessing below was made from (monai_medmerge.data.pipelines.preprocessing_config); data only
        "preprocessing_options": dict(preprocessing_options or {}),
        "preprocessing": {
            "_target_": "Compose",
            "_requires_": "@scripts_path",
            "transforms": bundle_preprocessing(preprocessing),
        },
        # inputs that cannot be read: listed in <output_dir>/unreadable.csv; the others are classified
        "unreadable": {
            "_target_": f"{shipped}.UnreadableInputs",
            "_requires_": "@scripts_path",
            "output_dir": "@output_dir",
        },
        "dataset": {
            "_target_": f"{shipped}.ReadableDataset",
            "_requires_": "@scripts_path",
            "data": "@datalist",
            "transform": "@preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            # one image per batch: the metadata of a NIfTI file and of a DICOM series have different keys
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
            "collate_fn": {
                "_target_": f"{shipped}.collate_readable",
                "_mode_": "callable",
                "_requires_": "@scripts_path",
            },
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "Activationsd", "keys": "pred", "softmax": True}],
        },
        "predictions": {
            "_target_": f"{shipped}.PredictionsCSVWriter",
            "_requires_": "@scripts_path",
            "output_dir": "@output_dir",
            "class_names": "@class_names",
            "filename": "predictions.csv",
            "csv_format": "@csv_format",
        },
        "handlers": ["@predictions"],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": False,
            # records the unreadable inputs a batch carries; a batch of unreadable inputs only is skipped
            "iteration_update": "$@unreadable.iterate",
        },
        "check_bundle_root": "$os.path.isfile(@checkpoint) or sys.exit('no model at ' + @checkpoint + "
        "': run in the bundle folder, or pass --bundle_root <the bundle folder>')",
        "check_inputs": '$len(@datalist) or sys.exit("no input images: nothing matches " '
        '+ os.path.join(@dataset_dir, @image_glob) + "; set --dataset_dir, --image_glob or --datalist")',
        "check_csv_format": "$@csv_format in ('medmerge', 'monai') or sys.exit('csv_format must be medmerge (a "
        "header row: file and the class names) or monai (the format of MONAI ClassificationSaver), got ' "
        "+ repr(@csv_format))",
        "initialize": ["$@check_bundle_root", "$@load_weights", "$@network.eval()"],
        "run": [
            "$@check_csv_format",
            "$@check_inputs",
            "$@evaluator.run()",
            "$@unreadable.finish(len(@datalist), @predictions.path)",
        ],
    }
    if task == "segmentation":
        _segmentation_outputs(config, sw_batch_size, sw_overlap)
    elif task != "classification":
        raise ValueError(f"task must be classification or segmentation, got {task!r}.")
    return config


def _segmentation_outputs(config: dict[str, Any], sw_batch_size: int, sw_overlap: float) -> None:
    """Turn the classification workflow of :func:`inference_config` into the segmentation one, in place: the same
    reading, preprocessing and unreadable-input report; a sliding-window inferer; label maps written as NIfTI in the
    input's space instead of a table."""
    config["inferer"] = {
        "_target_": "SlidingWindowInferer",
        "roi_size": "@spatial_shape",
        "sw_batch_size": int(sw_batch_size),
        "overlap": float(sw_overlap),
        "mode": "gaussian",
    }
    # label maps: softmax, argmax, back through the preprocessing (orientation, resampling) to the input's grid
    config["postprocessing"] = {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {
                "_target_": "Invertd",
                "keys": "pred",
                "transform": "@preprocessing",
                "orig_keys": "image",
                "nearest_interp": True,
                "to_tensor": True,
            },
            {
                "_target_": "SaveImaged",
                "keys": "pred",
                "output_dir": "@output_dir",
                "output_postfix": "seg",
                "output_ext": ".nii.gz",
                "output_dtype": "$numpy.uint8",
                "resample": False,
                "separate_folder": False,
                "print_log": False,
            },
        ],
    }
    config["imports"] = [*config["imports"], "$import numpy"]
    for key in ("predictions", "csv_format", "check_csv_format"):
        config.pop(key)
    # a DICOM series input also gets a DICOM SEG object referencing it, where highdicom is installed
    config["dicom_seg"] = {
        "_target_": f"{INFERENCE_MODULE}.DicomSegWriter",
        "_requires_": "@scripts_path",
        "output_dir": "@output_dir",
        "label_names": "@class_names",
    }
    config["handlers"] = ["@dicom_seg"]
    config["run"] = [
        "$@check_inputs",
        "$@evaluator.run()",
        "$@unreadable.finish(len(@datalist), @output_dir)",
    ]

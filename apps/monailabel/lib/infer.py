"""MONAI Label infer tasks for bundles exported by monai_medmerge: classification and segmentation.

MONAI Label's stock ``BundleInferTask`` loads ``models/model.pt`` into the network non-strictly, so a checkpoint whose
keys do not match (for example one saved from a merge wrapper rather than the plain network) loads nothing and the
network answers with its random initialisation, with only a warning in the log; it also restores every prediction
onto the input image as a label file. The tasks here load the weights strictly (an error names the missing and
unexpected keys) and build the bundle's own preprocessing and inferer once:

- :class:`ClassificationBundleInferTask` returns the class names and probabilities as JSON;
- :class:`SegmentationBundleInferTask` returns a label map in the study's own space (a NIfTI file) with the voxel
  count of every label as JSON.

This module needs MONAI, torch and MONAI Label only: serving an exported bundle does not need monai_medmerge.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.config import KeysCollection
from monai.data.utils import to_affine_nd
from monai.inferers import SlidingWindowInferer
from monai.transforms import AsDiscreted, Compose, Invertd, MapTransform, SqueezeDimd
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferType
from monailabel.tasks.infer.basic_infer import BasicInferTask
from monailabel.transform.writer import Writer
from monailabel.utils.others.generic import file_ext
from torch import nn

__all__ = [
    "BundleFormatError",
    "ClassificationBundleInferTask",
    "ClassProbabilitiesd",
    "MergedBundleInferTask",
    "SegmentationBundleInferTask",
    "bundle_class_names",
    "bundle_task",
    "load_state_dict_strictly",
    "segmentation_labels",
]

logger = logging.getLogger(__name__)

CONFIG_NAMES = ("inference.yaml", "inference.json")
# the package a bundle's own code lives in (<bundle>/scripts), as in the MONAI model zoo: an exported bundle carries
# scripts/medmerge_transforms.py (its preprocessing) and scripts/medmerge_inference.py there
SCRIPTS_PACKAGE = "scripts"


def _unload(package: str) -> None:
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        del sys.modules[name]


@contextlib.contextmanager
def bundle_scripts(bundle_path: str) -> Iterator[None]:
    """While a bundle's config is parsed: its folder first on ``sys.path`` and no other bundle's ``scripts`` package
    imported (an app serves several bundles, each with its own copy); both undone afterwards, so that the next
    bundle imports its own. What was built keeps the classes it was built from.

    (MONAI Label's own ``BundleInferTask`` does the same with ``unload_module("scripts")``.)
    """
    _unload(SCRIPTS_PACKAGE)
    sys.path.insert(0, bundle_path)
    try:
        yield
    finally:
        sys.path.remove(bundle_path)  # the first occurrence: the one inserted above
        _unload(SCRIPTS_PACKAGE)


class BundleFormatError(ValueError):
    """A bundle folder lacks what its infer task needs; the message names the file and the field."""


def bundle_class_names(metadata: Mapping[str, Any], metadata_path: str | os.PathLike = "metadata.json") -> list[str]:
    """The output names of a bundle (class names, or the label names of a segmentation bundle, background first), in
    output order, from its metadata.

    Args:
        metadata: the content of ``configs/metadata.json``.
        metadata_path: the file, for messages.

    Returns:
        ``network_data_format.outputs.<first output>.channel_def`` as a list (channel 0 first).

    Raises:
        BundleFormatError: when the metadata has no output channel names, or they are not numbered 0..C-1.
    """
    try:
        output = next(iter(metadata["network_data_format"]["outputs"].values()))
        channel_def = output["channel_def"]
    except (KeyError, StopIteration, TypeError, AttributeError) as e:
        raise BundleFormatError(
            f"{metadata_path}: no class names (network_data_format.outputs.<output>.channel_def): {e!r}"
        ) from e
    if not isinstance(channel_def, Mapping) or not channel_def:
        raise BundleFormatError(f"{metadata_path}: channel_def of the output is empty or not a mapping")
    keys = sorted(channel_def, key=lambda k: int(k) if str(k).isdigit() else -1)
    if [str(k) for k in keys] != [str(i) for i in range(len(keys))]:
        raise BundleFormatError(
            f"{metadata_path}: channel_def keys must be 0..{len(keys) - 1}, got {list(channel_def)}"
        )
    return [str(channel_def[k]) for k in keys]


def load_state_dict_strictly(network: nn.Module, path: str | os.PathLike, device: str | torch.device = "cpu") -> None:
    """Load a state dict file into ``network``; every key and shape must match.

    The file is read with ``torch.load(..., weights_only=True)`` (no pickled code runs). A plain state dict or a
    ``{"model": state_dict}`` checkpoint is accepted.

    Args:
        network: the plain network built from the bundle's ``network_def``.
        path: ``models/model.pt``.
        device: where to map the tensors.

    Raises:
        MONAILabelException: (``MODEL_IMPORT_ERROR``) when the file cannot be read or does not fit the network; the
            message names the file and the missing, unexpected and mismatched keys (first five of each).
    """
    try:
        state = torch.load(path, map_location=torch.device(device), weights_only=True)
    except Exception as e:
        raise MONAILabelException(
            MONAILabelError.MODEL_IMPORT_ERROR, f"cannot read model file {path}: {type(e).__name__}: {e}"
        ) from e
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise MONAILabelException(
            MONAILabelError.MODEL_IMPORT_ERROR, f"model file {path} holds a {type(state).__name__}, not a state dict"
        )
    # the same comparison as monai_medmerge.sources.state_dict_diff, written out because the app serves exported
    # bundles where monai_medmerge is not installed: this file imports only MONAI, MONAI Label and torch
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k} {tuple(state[k].shape)} in file vs {tuple(v.shape)} in network"
        for k, v in expected.items()
        if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = [
        f"{what}: {', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''}"
        for what, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", mismatched))
        if keys
    ]
    if problems:
        raise MONAILabelException(
            MONAILabelError.MODEL_IMPORT_ERROR,
            f"model file {path} does not fit the bundle's network_def {type(network).__name__}: {'; '.join(problems)}."
            " Serve a bundle whose models/model.pt is a state dict of its plain network_def (for a merged network:"
            " the exported bundle, `python -m monai.bundle run export ...`), not a checkpoint of the merge wrapper.",
        )
    network.load_state_dict(state, strict=True)


class ClassProbabilitiesd(MapTransform):
    """The restore step of classification: a vector of class probabilities becomes a JSON-ready result.

    Args:
        keys: the key of the probabilities (a tensor of shape ``(C,)`` or ``(1, C)``, after softmax).
        class_names: one name per output channel, in output order.
        result_key: where the result dict is written.

    The result is ``{"class": <name>, "class_index": <int>, "probabilities": {<name>: <float>, ...},
    "prediction": [{"idx": i, "label": <name>, "score": <float>}, ...]}`` (``prediction`` is the format of
    MONAI Label's own ``ClassificationWriter``, for clients that read it).
    """

    def __init__(self, keys: KeysCollection, class_names: Sequence[str], result_key: str = "result") -> None:
        super().__init__(keys)
        self.class_names = [str(c) for c in class_names]
        self.result_key = result_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            probs = torch.as_tensor(d[key]).detach().float().cpu().reshape(-1)
            if probs.numel() != len(self.class_names):
                raise MONAILabelException(
                    MONAILabelError.INFERENCE_ERROR,
                    f"the network gave {probs.numel()} outputs for {len(self.class_names)} classes",
                )
            values = [float(p) for p in probs]
            index = int(torch.argmax(probs))
            d[self.result_key] = {
                "class": self.class_names[index],
                "class_index": index,
                "probabilities": dict(zip(self.class_names, values, strict=True)),
                "prediction": [
                    {"idx": i, "label": c, "score": p}
                    for i, (c, p) in enumerate(zip(self.class_names, values, strict=True))
                ],
            }
        return d


def bundle_task(metadata: Mapping[str, Any]) -> str:
    """What a bundle does, read off its metadata: ``"segmentation"`` when its ``task`` is ``segmentation`` (as
    monai_medmerge's export writes it) or its first output's ``format`` is ``segmentation`` (as in the MONAI model
    zoo), else ``"classification"`` (bundles exported before the field existed are classification bundles)."""
    if str(metadata.get("task", "")).strip().lower() == "segmentation":
        return "segmentation"
    outputs = metadata.get("network_data_format", {}).get("outputs", {})
    first = next(iter(outputs.values()), {}) if isinstance(outputs, Mapping) else {}
    if isinstance(first, Mapping) and str(first.get("format", "")).lower() == "segmentation":
        return "segmentation"
    return "classification"


def segmentation_labels(label_names: Sequence[str]) -> dict[str, int]:
    """MONAI Label's ``labels`` of a segmentation model: ``{name: label value}`` of the foreground labels (value 0,
    the background, is left out, as MONAI Label expects)."""
    return {str(name): value for value, name in enumerate(label_names) if value != 0}


class MergedBundleInferTask(BasicInferTask):
    """What the infer tasks of an exported bundle share: ``configs/inference.yaml`` (or ``.json``) with
    ``network_def``, ``preprocessing`` and ``inferer``; ``configs/metadata.json`` with the output names (class or
    label names) in ``network_data_format``; ``models/model.pt``, a state dict of ``network_def``.

    ``models/model.pt`` is loaded strictly into a fresh ``network_def`` and reloaded when the file changes (after a
    train request replaced it); the writer adds the model file that answered (path, SHA-256, modification time) to
    the result params. Subclasses set :attr:`task` and :attr:`infer_type` and add the restore step.

    Args:
        path: the bundle folder.
        preload: build and load the network at start instead of at the first request.
        description: shown by ``/info/``; the bundle's metadata description when empty.

    Raises:
        BundleFormatError: when the folder is no bundle of :attr:`task` (which file and field is missing, or which
            task the metadata names), or when its ``network_def`` names a ``monai_medmerge`` class (an exported
            bundle builds a plain network).
    """

    task = ""
    infer_type = InferType.CLASSIFICATION
    # the config ids a bundle of this task must have
    required_ids: tuple[str, ...] = ("network_def", "preprocessing")

    def __init__(self, path: str | os.PathLike, preload: bool = False, description: str = "") -> None:
        self.bundle_path = str(Path(path).resolve())
        configs = Path(self.bundle_path) / "configs"
        found = [configs / c for c in CONFIG_NAMES if (configs / c).is_file()]
        if not found:
            raise BundleFormatError(f"{configs} holds none of {', '.join(CONFIG_NAMES)}")
        self.config_path = found[0]
        metadata_path = configs / "metadata.json"
        if not metadata_path.is_file():
            raise BundleFormatError(f"{metadata_path} does not exist")
        self.metadata = json.loads(metadata_path.read_text())
        task = bundle_task(self.metadata)
        if task != self.task:
            raise BundleFormatError(f"{metadata_path}: a {task} bundle, not a {self.task} bundle")
        self.class_names = bundle_class_names(self.metadata, metadata_path)
        model_path = Path(self.bundle_path) / "models" / "model.pt"

        self.parser = ConfigParser()
        self.parser.read_config(str(self.config_path))
        self.parser.read_meta(str(metadata_path))
        self.parser["bundle_root"] = self.bundle_path
        for key in self.required_ids:
            if key not in self.parser:
                raise BundleFormatError(f"{self.config_path} has no '{key}'")
        network_def = self.parser["network_def"]
        target = str(network_def.get("_target_", "")) if isinstance(network_def, Mapping) else ""
        if target.split(".")[0] == "monai_medmerge":
            raise BundleFormatError(
                f"{self.config_path}: network_def is {target!r}; serve an exported bundle, whose network_def is the "
                "plain network (`python -m monai.bundle run export ...`)"
            )
        network = self.parser.get_parsed_content("network_def", instantiate=True)
        if not isinstance(network, nn.Module):
            raise BundleFormatError(f"{self.config_path}: network_def built a {type(network).__name__}, not a network")

        image = next(iter(self.metadata.get("network_data_format", {}).get("inputs", {}).values()), {})
        self.spatial_shape = [int(s) for s in image.get("spatial_shape") or []]
        # transforms are built once, with this bundle's own scripts/ (the preprocessing of an exported bundle names
        # scripts.medmerge_transforms and requires `scripts_path`); `strict_reader` is what bundles exported before
        # the shipped transforms had: it makes their LoadImaged use only the named reader
        with bundle_scripts(self.bundle_path):
            pre = self.parser.get_parsed_content("preprocessing")
            if "strict_reader" in self.parser:
                self.parser.get_parsed_content("strict_reader")
            self._inferer = self.parser.get_parsed_content("inferer") if "inferer" in self.parser else None
            self._parse_task_ids()
        self._pre_compose = pre if isinstance(pre, Compose) else Compose(list(pre))
        self._pre = list(self._pre_compose.transforms)

        self._loaded: dict[str, dict[str, Any]] = {}
        super().__init__(
            path=str(model_path),
            network=network.cpu().eval(),
            type=self.infer_type,
            labels=self._labels(),
            dimension=len(self.spatial_shape) or 3,
            description=description or self.metadata.get("description", f"{self.task} bundle"),
            load_strict=True,
            roi_size=self.spatial_shape or None,
            preload=preload,
            config={"bundle": os.path.basename(self.bundle_path), "version": self.metadata.get("version", "")},
        )

    def _parse_task_ids(self) -> None:
        """Build what the task needs besides the preprocessing and inferer (called with the bundle's scripts
        importable)."""

    def _labels(self) -> Any:
        return list(self.class_names)

    def info(self) -> dict[str, Any]:
        i = super().info()
        i["bundle"] = self.bundle_path
        return i

    def pre_transforms(self, data: Any = None) -> Sequence[Callable]:
        return list(self._pre)

    def inferer(self, data: Any = None) -> Any:
        return self._inferer if self._inferer is not None else super().inferer(data)

    def model_info(self, device: Any) -> dict[str, Any]:
        """The model file that answers on ``device``: ``{"file", "sha256", "mtime_ns"}`` (empty before loading)."""
        return dict(self._loaded.get(str(device), {}))

    def _get_network(self, device: str, data: Any) -> nn.Module:
        path = self.get_path()
        if not path:
            raise MONAILabelException(
                MONAILabelError.INFERENCE_ERROR, f"model file {self.path[0] if self.path else '?'} does not exist"
            )
        stat = os.stat(path)
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = self._networks.get(device)
        if cached and cached[1] == stamp:
            return cached[0]
        if cached:
            logger.info(f"{path} changed; reloading the network")
        network = copy.deepcopy(self.network).to(torch.device(device))
        load_state_dict_strictly(network, path, device)
        network.eval()
        digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        self._loaded[str(device)] = {"file": path, "sha256": digest, "mtime_ns": stat.st_mtime_ns}
        self._networks[device] = (network, stamp)
        logger.info(f"loaded {path} (sha256 {digest[:12]}) strictly into {type(network).__name__}")
        return network


class ClassificationBundleInferTask(MergedBundleInferTask):
    """Infer task of a classification bundle (the bundle's ``postprocessing`` too); a request's result params hold
    the predicted class, the probabilities per class name and the model file that answered.

    Args:
        path: the bundle folder.
        preload: build and load the network at start instead of at the first request.
        description: shown by ``/info/``; the bundle's metadata description when empty.

    Raises:
        BundleFormatError: when the folder is no classification bundle (which file and field is missing), or when its
            ``network_def`` names a ``monai_medmerge`` class (an exported bundle builds a plain network).
    """

    task = "classification"
    infer_type = InferType.CLASSIFICATION
    required_ids = ("network_def", "preprocessing", "postprocessing")

    def _parse_task_ids(self) -> None:
        post = self.parser.get_parsed_content("postprocessing")
        self._post = list(post.transforms) if isinstance(post, Compose) else list(post)

    def info(self) -> dict[str, Any]:
        i = super().info()
        i["class_names"] = list(self.class_names)
        return i

    def post_transforms(self, data: Any = None) -> Sequence[Callable]:
        return self._post + [ClassProbabilitiesd(keys=self.output_label_key, class_names=self.class_names)]

    def writer(self, data: dict[str, Any], extension: Any = None, dtype: Any = None) -> tuple[Any, dict[str, Any]]:
        result = copy.deepcopy(data["result"])
        result["model"] = self.model_info(data.get("device", "cpu"))
        return None, result


class SegmentationBundleInferTask(MergedBundleInferTask):
    """Infer task of a segmentation bundle (``task: segmentation`` in its metadata, as monai_medmerge exports it).

    A request runs the bundle's own preprocessing and inferer (a sliding window of the network's input size), takes
    the argmax over the label channels, maps the label map back through the preprocessing onto the study's own grid
    and orientation (MONAI's ``Invertd``, the inverse the bundle's own inference applies) and writes it as a NIfTI
    file with the study's affine (``uint8``; MONAI Label's writer for another ``result_extension``). ``/infer``
    answers with that mask file, and params with the voxel count per label name and the model file that answered.
    The bundle's ``postprocessing`` (which saves files itself) is not used. ``/info/`` lists the foreground labels
    as ``{name: value}``, the label value being the output channel.

    Args:
        path: the bundle folder.
        preload: build and load the network at start instead of at the first request.
        description: shown by ``/info/``; the bundle's metadata description when empty.

    Raises:
        BundleFormatError: when the folder is no segmentation bundle (which file and field is missing), or when
            its ``network_def`` names a ``monai_medmerge`` class.
    """

    task = "segmentation"
    infer_type = InferType.SEGMENTATION

    def _labels(self) -> Any:
        return segmentation_labels(self.class_names)

    def inferer(self, data: Any = None) -> Any:
        if self._inferer is not None:
            return self._inferer
        if not self.spatial_shape:
            raise MONAILabelException(
                MONAILabelError.INFERENCE_ERROR,
                f"{self.config_path} has no inferer and the metadata no input spatial_shape for a sliding window",
            )
        return SlidingWindowInferer(roi_size=self.spatial_shape, sw_batch_size=4, overlap=0.25, mode="gaussian")

    def info(self) -> dict[str, Any]:
        i = super().info()
        i["label_names"] = list(self.class_names)
        return i

    def post_transforms(self, data: Any = None) -> Sequence[Callable]:
        key = self.output_label_key
        return [
            AsDiscreted(keys=key, argmax=True),
            Invertd(
                keys=key,
                transform=self._pre_compose,
                orig_keys=self.input_key,
                nearest_interp=True,
                to_tensor=True,
                device="cpu",
            ),
            SqueezeDimd(keys=key, dim=0),  # the label map of the study's spatial shape, no channel
        ]

    def writer(self, data: dict[str, Any], extension: Any = None, dtype: Any = None) -> tuple[Any, dict[str, Any]]:
        key = self.output_label_key
        dtype = np.dtype(dtype or data.get("result_dtype") or np.uint8)
        ext = str(extension or data.get("result_extension") or file_ext(str(data.get("image_path") or "")) or "")
        mask = data[key]
        values = np.rint(mask.detach().cpu().numpy() if torch.is_tensor(mask) else np.asarray(mask))
        if ext.lower() in ("", ".nii", ".nii.gz") or os.path.isdir(str(data.get("image_path") or "")):
            # written here: MONAI Label's nibabel path fails under MONAI 1.6 (a resampling without a spatial shape)
            # and its ITK path drops the affine of a 2-D image
            path = _write_nifti(values.astype(dtype), _affine_of(mask, data, self.input_key), ext or ".nii.gz")
            result = copy.deepcopy(data.get(self.output_json_key) or {})
        else:
            data["result_dtype"] = dtype
            data["result_extension"] = ext
            path, result = Writer(label=key, json=self.output_json_key)(data)
            result = copy.deepcopy(result) if isinstance(result, dict) else {}
        result["label_voxels"] = {name: int((values == v).sum()) for v, name in enumerate(self.class_names)}
        result["model"] = self.model_info(data.get("device", "cpu"))
        return path, result


def _affine_of(mask: Any, data: Mapping[str, Any], image_key: str) -> np.ndarray:
    """The 4x4 affine of the restored label map: its own (``Invertd`` gave it the study's), else the study's."""
    affine = getattr(mask, "affine", None)
    if affine is None:
        affine = getattr(data.get(image_key), "meta", {}).get("original_affine", np.eye(4))
    return to_affine_nd(3, np.asarray(affine.cpu() if torch.is_tensor(affine) else affine, dtype=np.float64))


def _write_nifti(label_map: np.ndarray, affine: np.ndarray, ext: str) -> str:
    """A label map as a temporary NIfTI file (MONAI Label deletes it once sent); returns its path."""
    with tempfile.NamedTemporaryFile(suffix=ext if ext.startswith(".nii") else ".nii.gz", delete=False) as f:
        path = f.name
    nib.save(nib.Nifti1Image(label_map, affine), path)
    return path

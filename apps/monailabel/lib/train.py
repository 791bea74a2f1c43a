"""MONAI Label train tasks: two-phase merge training (monai_medmerge's training bundles) on the labels the app holds.

A task runs a training bundle's ``configs/train.yaml`` through ``monai.bundle.run`` like MONAI Label's
``BundleTrainTask`` (which it extends): it sets ``train#dataset#data``, ``train#trainer#max_epochs`` (the epochs of
phase 1), ``train#handlers`` and ``validate#dataset#data``, and builds the datalist itself from the datastore's labels
(:mod:`lib.labels`): class labels for :class:`MergeTrainTask` (``bundles/medmerge_classification``), final label maps
for :class:`SegmentationMergeTrainTask` (``bundles/medmerge_segmentation``). The architecture, output names, input
size and intensity handling come from the served bundle, so the new network is the served network retrained. After
both phases it runs the bundle's ``export`` id, which replaces the served bundle folder (atomically); the infer task
sees the new ``models/model.pt`` and loads it at the next request.

Unlike ``BundleTrainTask`` it never adds a ``CheckpointLoader`` of the served ``model.pt``: training starts from the
merge of the sources, and the served file, a state dict of the plain network, does not fit the merge network.
This module needs monai_medmerge (the training bundles use it); the app offers training only where it imports.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import monai.bundle
from monai.bundle import ConfigParser
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.tasks.train.bundle import BundleTrainTask
from monailabel.utils.others.generic import device_list, name_to_device

from lib.infer import bundle_class_names, bundle_task
from lib.labels import (
    CLASS_LABEL_TAG,
    FINAL_LABEL_TAG,
    class_count,
    class_datalist,
    image_kind_of,
    random_split,
    segmentation_datalist,
    stratified_split,
)

__all__ = ["SETTINGS", "MergeTrainTask", "SegmentationMergeTrainTask"]

logger = logging.getLogger(__name__)

# metadata "modality" of an exported bundle -> the training bundle's `modality`
_MODALITY = {"CT": "CT", "MR": "MR"}
# request parameters passed to the training bundle as they are (besides those MONAI Label itself sets)
_PASSED = (
    "phase2_epochs",
    "patience",
    "batch_size",
    "seed",
    "coef_lr",
    "head_lr",
    "finetune_lr",
    "anchor",
    "merge_method",
)
# the train settings an app configuration (``--conf KEY VALUE``) may set for every train task; a request overrides them
SETTINGS = ("max_epochs", "phase2_epochs", "patience", "batch_size", "val_split", "seed")


def _typed(settings: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The given ``settings`` of :data:`SETTINGS` (strings from ``--conf``), each of its default's type."""
    typed = {}
    for key in SETTINGS:
        if settings.get(key) not in (None, ""):
            try:
                typed[key] = type(defaults[key])(settings[key])
            except ValueError as e:
                raise ValueError(f"setting {key}={settings[key]!r} is no {type(defaults[key]).__name__}") from e
    return typed


class MergeTrainTask(BundleTrainTask):
    """Train task of a served classification bundle by two-phase merge training; the base of the segmentation task,
    which changes only the datalist, its split, the defaults and the task's own ids (``task``, ``passed``,
    ``_default_settings``, ``_fetch_datalist``, ``_partition_datalist``, ``_task_overrides``).

    Args:
        served_bundle: the bundle folder the app serves (exported by monai_medmerge); the result replaces it.
        train_bundle: monai_medmerge's training bundle folder (``configs/train.yaml``, ``metadata.json``).
        work_dir: where the training runs (``models/``, ``eval/``, ``train_stats.json``); emptied at each request.
        sources: the training bundle's ``sources``: bundle folders, or ``{"checkpoint": ..., "network_def": ...}``.
        label_tag: the datastore label tag of class labels.
        head: the classifier module the merge replaces (``fc`` for MONAI ResNet); None: the training bundle's.
        modality: ``CT``, ``MR`` or ``other``; None: from the served bundle's metadata.
        settings: defaults of :data:`SETTINGS` from the app's configuration (strings), over the task's own.

    Raises:
        ValueError: when the training bundle has no ``configs/train.yaml``, the served bundle lacks its metadata,
            output names or ``network_def`` or is a bundle of another task, ``sources`` has fewer than two entries,
            or a setting is not a number.
    """

    task = "classification"
    passed: tuple[str, ...] = _PASSED

    def __init__(
        self,
        served_bundle: str | os.PathLike,
        train_bundle: str | os.PathLike,
        work_dir: str | os.PathLike,
        sources: Sequence[Any],
        label_tag: str = CLASS_LABEL_TAG,
        head: str | None = None,
        modality: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(str(train_bundle), conf={}, load_strict=True)
        if not self.valid:
            raise ValueError(f"{train_bundle} is no training bundle: it has no configs/train.yaml")
        if len(sources) < 2:
            raise ValueError(f"merge training needs at least two sources, got {list(sources)}")
        self.served_bundle = str(Path(served_bundle).resolve())
        self.work_dir = str(Path(work_dir).resolve())
        self.sources = list(sources)
        self.label_tag = label_tag
        self.head = head
        metadata_path = Path(self.served_bundle) / "configs" / "metadata.json"
        metadata = json.loads(metadata_path.read_text())
        if bundle_task(metadata) != self.task:
            raise ValueError(f"{metadata_path}: a {bundle_task(metadata)} bundle, not a {self.task} bundle")
        self.class_names = bundle_class_names(metadata, metadata_path)
        image = next(iter(metadata["network_data_format"]["inputs"].values()))
        self.spatial_size = [int(s) for s in image["spatial_shape"]]
        self.in_channels = int(image.get("num_channels", 1))
        self.modality = modality or _MODALITY.get(str(image.get("modality", "")).upper(), "other")
        config_path = next(
            (
                p
                for p in (Path(self.served_bundle) / "configs" / n for n in ("inference.yaml", "inference.json"))
                if p.is_file()
            ),
            None,
        )
        if config_path is None:
            raise ValueError(f"{self.served_bundle}/configs has no inference.yaml or inference.json")
        # the served bundle's preprocessing settings (data, read without evaluating the config): the new model is
        # trained with the pipeline the served one was, and exported with it again
        served = ConfigParser.load_config_file(str(config_path))
        self.served_config = served if isinstance(served, dict) else {}
        options = self.served_config.get("preprocessing_options")
        self.preprocessing_options = dict(options) if isinstance(options, dict) else {}
        if modality:
            self.preprocessing_options["modality"] = modality
        network_def = self.served_config.get("network_def")
        if not isinstance(network_def, dict) or "_target_" not in network_def:
            raise ValueError(f"{config_path}: network_def must be a mapping with '_target_', got {network_def!r}")
        self.network_target = network_def["_target_"]
        self.network_args = {k: v for k, v in network_def.items() if not k.startswith("_")}
        self.defaults = self._default_settings()
        self.defaults.update(_typed(settings or {}, self.defaults))
        self.description = (
            f"Two-phase merge training (MedMerge) of {os.path.basename(self.served_bundle)} from "
            f"{len(self.sources)} sources on the images with a '{label_tag}' label"
        )

    def _default_settings(self) -> dict[str, Any]:
        """The request defaults of :data:`SETTINGS`: here the training bundle's own settings."""
        defaults = self.bundle_config.config
        return {
            "max_epochs": int(defaults.get("phase1_epochs", 15)),
            "phase2_epochs": int(defaults.get("phase2_epochs", 30)),
            "patience": int(defaults.get("patience", 8)),
            "batch_size": int(defaults.get("batch_size", 16)),
            "val_split": 0.2,
            "seed": int(defaults.get("seed", 0)),
        }

    def config(self) -> dict[str, Any]:
        return {**self.defaults, "device": device_list()}

    def info(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "config": self.config(),
            "class_names": self.class_names,
            "label_tag": self.label_tag,
            "version": self.version,
        }

    def stats(self) -> dict[str, Any]:
        path = Path(self.work_dir) / "train_stats.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError):
            return {}

    # --- MONAI Label's BundleTrainTask steps, for classification -------------------------------------------------
    def _fetch_datalist(self, request: dict[str, Any], datastore: Any) -> list[dict[str, Any]]:
        items = class_datalist(datastore, self.class_names, self.label_tag)
        return [{"image": item["image"], "label": item["label"]} for item in items]

    def _partition_datalist(self, datalist: list, request: dict[str, Any], shuffle: bool = False) -> tuple[list, list]:
        train, val = stratified_split(datalist, request.get("val_split", 0.2), int(request.get("seed", 0)))
        logger.info(
            f"training on {len(train)} images {class_count(train, self.class_names)}, validating on {len(val)} "
            f"{class_count(val, self.class_names)}"
        )
        return train, val

    def _load_checkpoint(self, model_pytorch: str, pretrained: bool, train_handlers: list) -> None:
        # the served models/model.pt is a state dict of the plain network; the merge network starts from the sources
        logger.info(f"not loading {model_pytorch}: merge training starts from the sources {self.sources}")

    def _update_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        request = self._request
        train, val = overrides["train#dataset#data"], overrides.get("validate#dataset#data", [])
        kind = image_kind_of([item["image"] for item in train + val])
        overrides.update(
            {
                "bundle_root": self.work_dir,
                "device": f"$torch.device('{overrides['device']}')",
                # the ids that read the datalist file (norm recalibration, image checks) see the same images
                "datalists": {"training": train, "validation": val, "test": []},
                "phase1_epochs": overrides["train#trainer#max_epochs"],
                "network_target": self.network_target,
                "network_args": dict(self.network_args),
                "spatial_size": list(self.spatial_size),
                "in_channels": self.in_channels,
                "image_kind": kind,
                "modality": self.modality,
                "preprocessing_options": self._preprocessing_options(kind),
                "sources": list(self.sources),
                "export_dir": self.served_bundle,
                "progress": False,
            }
        )
        if self.head:
            overrides["head"] = self.head
        self._task_overrides(overrides)
        for key in self.passed:
            if key in request:
                overrides[key] = request[key]
        return overrides

    def _task_overrides(self, overrides: dict[str, Any]) -> None:
        """The ids of this task's training bundle (in place)."""
        overrides["class_names"] = list(self.class_names)

    def _preprocessing_options(self, kind: str) -> dict[str, Any]:
        """The training bundle's ``preprocessing_options``: the served bundle's, for the kind of the labelled
        images (its reader only when the kind is the served one; else the kind's default reader)."""
        options = {
            "kind": kind,
            "reader": "@reader",
            "modality": self.modality,
            "window": "@window",
            "percentiles": "@percentiles",
            "pixdim": "@pixdim",
        }
        served = self.preprocessing_options
        options.update({k: served[k] for k in ("modality", "window", "percentiles", "pixdim") if k in served})
        if served.get("kind") == kind and served.get("reader"):
            options["reader"] = served["reader"]
        return options

    def __call__(self, request: dict[str, Any], datastore: Any) -> dict[str, Any]:
        request = {**self.defaults, **{k: v for k, v in request.items() if v is not None}}
        request["device"] = name_to_device(request.get("device"))
        request["multi_gpu"] = False  # the multi-GPU path of BundleTrainTask writes into the training bundle
        request["pretrained"] = False
        request["tracking"] = request.get("tracking") or "None"
        self._request = request
        start = time.time()
        for sub in ("models", "eval"):
            shutil.rmtree(Path(self.work_dir) / sub, ignore_errors=True)
        Path(self.work_dir).mkdir(parents=True, exist_ok=True)
        try:
            super().__call__(request, datastore)
        except MONAILabelException:
            raise
        except Exception as e:
            raise MONAILabelException(MONAILabelError.APP_TRAIN_FAILED, f"{type(e).__name__}: {e}") from e
        return self._write_stats(start)

    def run_single_gpu(self, request: dict[str, Any], overrides: dict[str, Any]) -> None:
        shown = {k: v for k, v in overrides.items() if "data" not in k}  # the image lists are logged by the fetch
        logger.info(f"merge training in {self.work_dir}: {json.dumps(shown, default=str)}")
        monai.bundle.run(
            run_id="run", config_file=self.bundle_config_path, meta_file=self.bundle_metadata_path, **overrides
        )
        trained = Path(self.work_dir) / "models" / "model.pt"
        if not trained.is_file():
            raise MONAILabelException(MONAILabelError.APP_TRAIN_FAILED, f"training wrote no {trained}")
        served = Path(self.served_bundle) / "models" / "model.pt"
        if served.is_file():
            shutil.copy2(served, Path(self.work_dir) / "previous_model.pt")
        # replaces the served bundle folder atomically; the infer task reloads models/model.pt when it changes
        monai.bundle.run(
            run_id="export", config_file=self.bundle_config_path, meta_file=self.bundle_metadata_path, **overrides
        )
        self._counts = {
            "train": len(overrides["datalists"]["training"]),
            "validation": len(overrides["datalists"]["validation"]),
        }

    def _write_stats(self, start: float) -> dict[str, Any]:
        model = Path(self.served_bundle) / "models" / "model.pt"
        stats = {
            "total_time": f"{time.time() - start:.1f}s",
            "end_ts": int(time.time()),
            "images": getattr(self, "_counts", {}),
            "epochs": {"phase1": self._request["max_epochs"], "phase2": self._request["phase2_epochs"]},
            "model": str(model),
            "sha256": hashlib.sha256(model.read_bytes()).hexdigest(),
        }
        (Path(self.work_dir) / "train_stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        logger.info(f"merge training done: {stats}")
        return stats


class SegmentationMergeTrainTask(MergeTrainTask):
    """Train task of a served segmentation bundle by two-phase merge training (``bundles/medmerge_segmentation``) on
    the label maps the datastore holds as final labels.

    The studies with a final label map become ``{"image", "label"}`` pairs, split at random into training and
    validation (``val_split``, ``seed``); the training bundle checks each label map against its image before
    training (``train#items``: shape, affine, values below the number of labels), trains on random patches of the
    served network's input size and validates by mean Dice of whole images. Defaults are small (a few epochs), so
    that a request from a MONAI Label client returns soon; the app's ``--conf`` and each request can set more.

    Args:
        served_bundle: the segmentation bundle folder the app serves; the result replaces it.
        train_bundle: monai_medmerge's segmentation training bundle folder.
        work_dir: where the training runs; emptied at each request.
        sources: the training bundle's ``sources`` (bundle folders, or ``{"checkpoint": ..., "network_def": ...}``).
        label_tag: not used: label maps are MONAI Label's final labels.
        head: the output module the merge replaces; None: the training bundle's (``auto``).
        modality: ``CT``, ``MR`` or ``other``; None: from the served bundle's metadata.
        settings: defaults of :data:`SETTINGS` from the app's configuration (strings), over :attr:`small_defaults`.

    Raises:
        ValueError: as :class:`MergeTrainTask`.
    """

    task = "segmentation"
    passed = (*_PASSED, "sw_batch_size")
    small_defaults: dict[str, Any] = {
        "max_epochs": 5,
        "phase2_epochs": 10,
        "patience": 5,
        "batch_size": 4,
        "val_split": 0.2,
        "seed": 0,
    }

    def __init__(
        self,
        served_bundle: str | os.PathLike,
        train_bundle: str | os.PathLike,
        work_dir: str | os.PathLike,
        sources: Sequence[Any],
        label_tag: str = FINAL_LABEL_TAG,
        head: str | None = None,
        modality: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(served_bundle, train_bundle, work_dir, sources, FINAL_LABEL_TAG, head, modality, settings)
        # the served sliding window (data in its inference config), kept by the export
        inferer = self.served_config.get("inferer")
        inferer = inferer if isinstance(inferer, dict) else {}
        self.sliding_window = {
            key: inferer[name]
            for key, name in (("sw_batch_size", "sw_batch_size"), ("sw_overlap", "overlap"))
            if isinstance(inferer.get(name), (int, float)) and not isinstance(inferer.get(name), bool)
        }
        self.description = (
            f"Two-phase merge training (MedMerge) of the segmentation {os.path.basename(self.served_bundle)} from "
            f"{len(self.sources)} sources on the studies with a final label map"
        )

    def _default_settings(self) -> dict[str, Any]:
        return dict(self.small_defaults)

    def info(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "config": self.config(),
            "label_names": self.class_names,
            "label_tag": FINAL_LABEL_TAG,
            "version": self.version,
        }

    def _fetch_datalist(self, request: dict[str, Any], datastore: Any) -> list[dict[str, Any]]:
        return segmentation_datalist(datastore)

    def _partition_datalist(self, datalist: list, request: dict[str, Any], shuffle: bool = False) -> tuple[list, list]:
        train, val = random_split(datalist, request.get("val_split", 0.2), int(request.get("seed", 0)))
        logger.info(f"training on {len(train)} studies with a label map, validating on {len(val)}")
        return train, val

    def _task_overrides(self, overrides: dict[str, Any]) -> None:
        overrides["label_names"] = list(self.class_names)
        overrides["preprocessing_options"]["task"] = "@task"
        overrides.update(self.sliding_window)
        # the checked pairs (label map against image) rather than the plain lists MONAI Label sets
        overrides["train#dataset#data"] = "@train#items"
        overrides["validate#dataset#data"] = "@validate#items"

"""A MONAI Label app that serves bundles exported by monai_medmerge, classification and segmentation, and retrains
them by merge training on the labels it holds.

    monailabel start_server --app apps/monailabel --studies <folder or http://host:port/dicom-web> \\
        --conf models <exported bundle folder, or its name under apps/monailabel/model> \\
        --conf sources <source bundle folders, comma-separated, or a .json file>      # only for training

Each bundle is served by the infer task of its task, read off its ``configs/metadata.json`` (``task``:
``segmentation``, or a first output of ``format`` ``segmentation``; else classification): a classification model
answers with class names and probabilities, a segmentation model with a label map of the study. Its train task
learns from class labels (tag ``class``) or from label maps (MONAI Label's final labels) respectively.

Configuration (``--conf KEY VALUE``):

- ``models``: one or more (comma-separated) bundles: a folder path, or a folder name under ``<app>/model``. The
  model's name is the folder's name. Required.
- ``sources``: the merge sources for training: comma-separated source bundle folders, or a ``.json`` file with the
  training bundle's ``sources`` list (folders, or ``{"checkpoint": ..., "network_def": {...}}``). Without it the
  app serves and does not train. ``sources.<model>`` gives one model its own sources (for an app that serves a
  classification and a segmentation model, whose sources differ).
- ``train_bundle``: monai_medmerge's classification training bundle (default: ``bundles/medmerge_classification``
  of the checkout the app lies in, or of the installed monai_medmerge); ``segmentation_train_bundle`` the
  segmentation one (default ``bundles/medmerge_segmentation``).
- ``train_dir``: where training runs, one sub-folder per model (default ``<app>/train_runs``).
- ``max_epochs`` (phase 1), ``phase2_epochs``, ``patience``, ``batch_size``, ``val_split``, ``seed``: the defaults of
  train requests (a request overrides them); without them, classification uses its training bundle's settings and
  segmentation small ones (5 and 10 epochs).
- ``label_tag``: the label tag of class labels (default ``class``; see ``lib/labels.py``).
- ``head``, ``modality``: the training bundle's ``head`` and ``modality`` when the defaults do not fit.
- ``preload``: ``true`` to load the networks at start.

Serving needs MONAI, torch and MONAI Label (and nibabel for segmentation masks); training also needs monai_medmerge.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

from lib.infer import ClassificationBundleInferTask, SegmentationBundleInferTask, bundle_task
from lib.labels import CLASS_LABEL_TAG
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.generic import strtobool

logger = logging.getLogger(__name__)

TRAIN_BUNDLE = os.path.join("bundles", "medmerge_classification")
SEGMENTATION_TRAIN_BUNDLE = os.path.join("bundles", "medmerge_segmentation")
# per task: the infer task, the training bundle beside the app, and the --conf key that names another one
INFER_TASKS = {"classification": ClassificationBundleInferTask, "segmentation": SegmentationBundleInferTask}
TRAIN_BUNDLES = {
    "classification": (TRAIN_BUNDLE, "train_bundle"),
    "segmentation": (SEGMENTATION_TRAIN_BUNDLE, "segmentation_train_bundle"),
}


def conf_list(value: str | None) -> list[Any]:
    """A ``--conf`` value as a list: the list in a ``.json`` file, a JSON list, or the comma-separated parts.

    The ``monailabel`` launcher passes its arguments on unquoted (``$*``), so a value with spaces or with ``[`` (a
    shell pattern) does not arrive whole from the command line; a JSON file or comma-separated paths do.
    """
    if not value:
        return []
    value = value.strip()
    if value.endswith(".json") and os.path.isfile(value):
        try:
            parsed = json.loads(Path(value).read_text())
        except ValueError as e:
            raise MONAILabelException(MONAILabelError.APP_INIT_ERROR, f"{value} is not JSON: {e}") from e
    elif value.startswith("["):
        try:
            parsed = json.loads(value)
        except ValueError as e:
            raise MONAILabelException(MONAILabelError.APP_INIT_ERROR, f"{value!r} is no JSON list: {e}") from e
    else:
        return [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(parsed, list):
        raise MONAILabelException(
            MONAILabelError.APP_INIT_ERROR, f"{value!r} holds a {type(parsed).__name__}, not a list"
        )
    return parsed


def find_train_bundle(app_dir: str, bundle: str = TRAIN_BUNDLE) -> str | None:
    """A monai_medmerge training bundle (``bundle``, relative to the repository): beside this app in a checkout, else
    beside the installed package."""
    candidates = [Path(app_dir).resolve().parents[1] / bundle]
    spec = importlib.util.find_spec("monai_medmerge")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(list(spec.submodule_search_locations)[0]).resolve().parent / bundle)
    for candidate in candidates:
        if (candidate / "configs" / "train.yaml").is_file():
            return str(candidate)
    return None


def _absolute(source: Any) -> Any:
    """A source entry with absolute paths: the train task runs in a process of its own."""
    if isinstance(source, str):
        return os.path.abspath(source)
    if isinstance(source, dict) and isinstance(source.get("checkpoint"), str):
        return {**source, "checkpoint": os.path.abspath(source["checkpoint"])}
    return source


def served_task(path: str) -> str:
    """The task of a served bundle folder (:func:`lib.infer.bundle_task` of its metadata); ``classification`` when it
    has no readable metadata (the classification infer task then names what is missing)."""
    try:
        metadata = json.loads((Path(path) / "configs" / "metadata.json").read_text())
    except (OSError, ValueError):
        return "classification"
    return bundle_task(metadata) if isinstance(metadata, dict) else "classification"


class MedMergeApp(MONAILabelApp):
    """Serves classification bundles (class names and probabilities per study) and segmentation bundles (a label map
    per study), and retrains each by two-phase merge training on the datastore's class labels or label maps."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        conf = conf or {}
        self.model_dir = os.path.join(app_dir, "model")
        names = conf_list(conf.get("models"))
        if not names:
            raise MONAILabelException(
                MONAILabelError.APP_INIT_ERROR,
                "no model given: start the server with --conf models <exported bundle folder, or its name under "
                f"{self.model_dir}>",
            )
        self.bundles: dict[str, str] = {}
        for name in names:
            path = name if os.path.isdir(name) else os.path.join(self.model_dir, name)
            if not os.path.isdir(path):
                raise MONAILabelException(
                    MONAILabelError.APP_INIT_ERROR,
                    f"model {name!r} is neither a folder nor a folder in {self.model_dir}",
                )
            path = os.path.realpath(path)
            self.bundles[os.path.basename(path)] = path
        self.tasks = {name: served_task(path) for name, path in self.bundles.items()}
        self.label_tag = conf.get("label_tag", CLASS_LABEL_TAG)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="monai_medmerge",
            description="Classification and segmentation with bundles merged by monai_medmerge; training by "
            "two-phase merge training",
            version="0.1.0",
        )

    def init_infers(self) -> dict[str, InferTask]:
        preload = bool(strtobool(self.conf.get("preload", "false")))
        return {name: INFER_TASKS[self.tasks[name]](path, preload=preload) for name, path in self.bundles.items()}

    def init_trainers(self) -> dict[str, TrainTask]:
        sources = {
            name: conf_list(self.conf.get(f"sources.{name}") or self.conf.get("sources")) for name in self.bundles
        }
        if not any(sources.values()):
            logger.info("no --conf sources: the app serves its models and does not train them")
            return {}
        if importlib.util.find_spec("monai_medmerge") is None:
            logger.warning("monai_medmerge is not installed: the app serves its models and does not train them")
            return {}
        train_dir = self.conf.get("train_dir") or os.path.join(self.app_dir, "train_runs")
        # imports the training side only where training is configured
        from lib.train import SETTINGS, MergeTrainTask, SegmentationMergeTrainTask

        task_classes = {"classification": MergeTrainTask, "segmentation": SegmentationMergeTrainTask}
        settings = {key: self.conf[key] for key in SETTINGS if self.conf.get(key) not in (None, "")}
        trainers: dict[str, TrainTask] = {}
        for name, path in self.bundles.items():
            if not sources[name]:
                logger.info(f"no --conf sources for {name}: the app serves it and does not train it")
                continue
            task = self.tasks[name]
            bundle, key = TRAIN_BUNDLES[task]
            train_bundle = self.conf.get(key) or find_train_bundle(self.app_dir, bundle)
            if not train_bundle:
                raise MONAILabelException(
                    MONAILabelError.APP_INIT_ERROR,
                    f"--conf sources is given but monai_medmerge's {task} training bundle ({bundle}) was not found; "
                    f"give it with --conf {key} <folder>",
                )
            trainers[name] = task_classes[task](
                path,
                train_bundle,
                os.path.join(train_dir, name),
                [_absolute(source) for source in sources[name]],
                label_tag=self.label_tag,
                head=self.conf.get("head"),
                modality=self.conf.get("modality"),
                settings=settings,
            )
        return trainers

    def info(self) -> dict[str, Any]:
        meta = super().info()
        meta["class_label_tag"] = self.label_tag
        return meta

    def _download_dcmqi_tools(self) -> None:
        # MONAI Label fetches dcmqi (DICOM SEG conversion) from the internet for a DICOMweb datastore; only label
        # maps need it, so an app that serves classification bundles only skips it (and starts offline).
        if "segmentation" in self.tasks.values():
            super()._download_dcmqi_tools()
        else:
            logger.info("dcmqi not fetched: the app serves no segmentation model, so it writes no DICOM SEG")

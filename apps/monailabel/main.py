"""A MONAI Label app that serves classification bundles exported by monai_medmerge and retrains them by merge
training on the labels it holds.

    monailabel start_server --app apps/monailabel --studies <folder or http://host:port/dicom-web> \\
        --conf models <exported bundle folder, or its name under apps/monailabel/model> \\
        --conf sources <source bundle folders, comma-separated, or a .json file>      # only for training

Configuration (``--conf KEY VALUE``):

- ``models``: one or more (comma-separated) classification bundles: a folder path, or a folder name under
  ``<app>/model``. The model's name is the folder's name. Required.
- ``sources``: the merge sources for training: comma-separated source bundle folders, or a ``.json`` file with the
  training bundle's ``sources`` list (folders, or ``{"checkpoint": ..., "network_def": {...}}``). Without it the
  app serves and does not train.
- ``train_bundle``: monai_medmerge's training bundle (default: ``bundles/medmerge_classification`` of the checkout
  the app lies in, or of the installed monai_medmerge).
- ``train_dir``: where training runs, one sub-folder per model (default ``<app>/train_runs``).
- ``label_tag``: the label tag of class labels (default ``class``; see ``lib/labels.py``).
- ``head``, ``modality``: the training bundle's ``head`` and ``modality`` when the defaults do not fit.
- ``preload``: ``true`` to load the networks at start.

Serving needs MONAI, torch and MONAI Label; training also needs monai_medmerge.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

from lib.infer import ClassificationBundleInferTask
from lib.labels import CLASS_LABEL_TAG
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.exception import MONAILabelError, MONAILabelException
from monailabel.interfaces.tasks.infer_v2 import InferTask
from monailabel.interfaces.tasks.train import TrainTask
from monailabel.utils.others.generic import strtobool

logger = logging.getLogger(__name__)

TRAIN_BUNDLE = os.path.join("bundles", "medmerge_classification")


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


def find_train_bundle(app_dir: str) -> str | None:
    """monai_medmerge's training bundle: beside this app in a checkout, else beside the installed package."""
    candidates = [Path(app_dir).resolve().parents[1] / TRAIN_BUNDLE]
    spec = importlib.util.find_spec("monai_medmerge")
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(list(spec.submodule_search_locations)[0]).resolve().parent / TRAIN_BUNDLE)
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


class MedMergeClassificationApp(MONAILabelApp):
    """Serves classification bundles (class names and probabilities per study) and retrains them by two-phase merge
    training on the datastore's class labels."""

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
        self.label_tag = conf.get("label_tag", CLASS_LABEL_TAG)
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="monai_medmerge classification",
            description="Classification with bundles merged by monai_medmerge; training by two-phase merge training",
            version="0.1.0",
        )

    def init_infers(self) -> dict[str, InferTask]:
        preload = bool(strtobool(self.conf.get("preload", "false")))
        return {name: ClassificationBundleInferTask(path, preload=preload) for name, path in self.bundles.items()}

    def init_trainers(self) -> dict[str, TrainTask]:
        sources = conf_list(self.conf.get("sources"))
        if not sources:
            logger.info("no --conf sources: the app serves its models and does not train them")
            return {}
        if importlib.util.find_spec("monai_medmerge") is None:
            logger.warning("monai_medmerge is not installed: the app serves its models and does not train them")
            return {}
        train_bundle = self.conf.get("train_bundle") or find_train_bundle(self.app_dir)
        if not train_bundle:
            raise MONAILabelException(
                MONAILabelError.APP_INIT_ERROR,
                f"--conf sources is given but monai_medmerge's training bundle ({TRAIN_BUNDLE}) was not found; "
                "give it with --conf train_bundle <folder>",
            )
        sources = [_absolute(source) for source in sources]
        train_dir = self.conf.get("train_dir") or os.path.join(self.app_dir, "train_runs")
        from lib.train import MergeTrainTask  # imports the training side only where training is configured

        return {
            name: MergeTrainTask(
                path,
                train_bundle,
                os.path.join(train_dir, name),
                sources,
                label_tag=self.label_tag,
                head=self.conf.get("head"),
                modality=self.conf.get("modality"),
            )
            for name, path in self.bundles.items()
        }

    def info(self) -> dict[str, Any]:
        meta = super().info()
        meta["class_label_tag"] = self.label_tag
        return meta

    def _download_dcmqi_tools(self) -> None:
        # MONAI Label fetches dcmqi (DICOM SEG conversion) from the internet for a DICOMweb datastore; a
        # classification app writes no DICOM SEG, so it is not needed (and the download fails offline).
        logger.info("dcmqi not fetched: this classification app writes no DICOM SEG")

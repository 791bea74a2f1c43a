"""How the app stores labels, and the datalists it builds from a datastore: a class label per image for
classification, a label map per image for segmentation.

Plain Python (no MONAI Label, torch or monai_medmerge imports), so that it can be tested anywhere.

**Label maps** (segmentation) are MONAI Label's ordinary final labels: a NIfTI file of the study's grid with one
integer label value per voxel (0 the background, value ``i`` the segmentation bundle's output channel ``i``), saved
with the label tag ``final`` (``PUT /datastore/label?image=<id>&tag=final``, which is also what a MONAI Label client
such as 3D Slicer does when a label is submitted); :func:`segmentation_datalist` lists them.

**Class labels** (classification):

A class label is a small JSON file saved through MONAI Label's ordinary label endpoint with the label tag
:data:`CLASS_LABEL_TAG` (``"class"``)::

    curl -X PUT "http://127.0.0.1:8000/datastore/label?image=<image id>&tag=class" -F "label=@label.json"

with ``label.json`` holding ``{"class": "<class name>"}`` (or the class index, ``{"class": 1}``). The datastore keeps
it beside the image (``<studies>/labels/class/<image id>.json`` for a local folder; in the local cache for a
DICOMweb server). The tag is not ``final`` because MONAI Label's DICOMweb datastore turns a ``final`` label into a
DICOM SEG object and uploads it to the server, which a class label is not; any other tag stays in the cache, so the
same rule works for a studies folder and for DICOMweb.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from typing import Any

__all__ = [
    "CLASS_LABEL_TAG",
    "FINAL_LABEL_TAG",
    "ClassLabelError",
    "class_count",
    "class_datalist",
    "image_kind_of",
    "random_split",
    "read_class_label",
    "segmentation_datalist",
    "stratified_split",
]

logger = logging.getLogger(__name__)

CLASS_LABEL_TAG = "class"
# MONAI Label's tag of submitted (final) labels: for segmentation, the label maps training reads
FINAL_LABEL_TAG = "final"


class ClassLabelError(ValueError):
    """A class label file that cannot be used; the message names the image and the problem."""


def read_class_label(path: str | os.PathLike, class_names: Sequence[str], image_id: str = "") -> int:
    """The class index stored in a class label file.

    Args:
        path: the JSON file: ``{"class": "<name>"}`` or ``{"class": <index>}``.
        class_names: the model's classes, in output order.
        image_id: the image the label belongs to, for messages.

    Returns:
        the index of the class in ``class_names``.

    Raises:
        ClassLabelError: when the file is not JSON, has no ``class``, or names a class that is not one of
            ``class_names`` (an index outside them); the message names the image, the value and the classes.
    """
    what = f"class label of image {image_id!r} ({path})" if image_id else f"class label {path}"
    try:
        with open(path) as f:
            content: Any = json.load(f)
    except (OSError, ValueError) as e:
        raise ClassLabelError(f"{what} is not a JSON file: {e}") from e
    if not isinstance(content, dict) or "class" not in content:
        raise ClassLabelError(f'{what} must be a JSON object with "class" (a class name or index), got {content!r}')
    value = content["class"]
    names = [str(c) for c in class_names]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ClassLabelError(f"{what}: class {value!r} is neither a class name nor an index; classes: {names}")
    if isinstance(value, int):
        if not 0 <= value < len(names):
            raise ClassLabelError(f"{what}: class index {value} is outside 0..{len(names) - 1}; classes: {names}")
        return value
    if value not in names:
        raise ClassLabelError(f"{what}: class {value!r} is not one of the model's classes {names}")
    return names.index(value)


def class_datalist(datastore: Any, class_names: Sequence[str], tag: str = CLASS_LABEL_TAG) -> list[dict[str, Any]]:
    """The labelled images of a MONAI Label datastore as a classification datalist.

    Works with MONAI Label's ``LocalDatastore`` and ``DICOMWebDatastore`` (whose labels of a tag other than ``final``
    live in its local cache, and whose images are series fetched into that cache on first use).

    Args:
        datastore: the app's datastore.
        class_names: the model's classes, in output order.
        tag: the label tag of class labels.

    Returns:
        ``[{"image": <local path>, "label": <class index>, "id": <image id>}, ...]`` sorted by image id.

    Raises:
        ClassLabelError: for a label that cannot be read or names an unknown class (the first such label).
    """
    items = []
    for image_id in sorted(datastore.list_images()):
        label_id = datastore.get_label_by_image_id(image_id, tag)
        if not label_id:
            continue
        label_path = datastore.get_label_uri(label_id, tag)
        if not label_path or not os.path.exists(label_path):
            raise ClassLabelError(
                f"class label of image {image_id!r} is recorded but its file is missing: {label_path}"
            )
        index = read_class_label(label_path, class_names, image_id)
        items.append({"image": datastore.get_image_uri(image_id), "label": index, "id": image_id})
    logger.info(f"{len(items)} images with a '{tag}' label: {class_count(items, class_names)}")
    return items


def class_count(items: Sequence[dict[str, Any]], class_names: Sequence[str]) -> dict[str, int]:
    """How many items each class has."""
    counts = {str(c): 0 for c in class_names}
    for item in items:
        counts[str(class_names[item["label"]])] += 1
    return counts


def image_kind_of(paths: Sequence[str]) -> str:
    """The training bundle's ``image_kind`` for these image paths: a folder is a DICOM series, ``.png``/``.jpg`` a
    2-D picture, ``.dcm`` a DICOM file, anything else a file for ``NibabelReader`` (NIfTI).

    Raises:
        ValueError: when the paths are of more than one kind.
    """
    kinds = set()
    for p in paths:
        low = p.lower()
        if os.path.isdir(p):
            kinds.add("dicom_series")
        elif low.endswith((".png", ".jpg", ".jpeg")):
            kinds.add("png")
        elif low.endswith(".dcm"):
            kinds.add("dicom")
        else:
            kinds.add("nifti")
    if len(kinds) > 1:
        raise ValueError(f"the labelled images are of several kinds ({sorted(kinds)}); train on one kind at a time")
    return kinds.pop() if kinds else "nifti"


def stratified_split(
    items: Sequence[dict[str, Any]], val_split: float, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split per class: of each class with at least two images, ``round(n * val_split)`` (at least one) go to
    validation and the rest (at least one) to training; a class with one image goes to training.

    Raises:
        ValueError: when ``val_split`` is not in (0, 1), or training or validation would be empty.
    """
    if not 0.0 < float(val_split) < 1.0:
        raise ValueError(f"val_split must lie in (0, 1), got {val_split!r}; merge training needs a validation set")
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted({item["label"] for item in items}):
        group = [item for item in items if item["label"] == label]
        rng.shuffle(group)
        n_val = 0 if len(group) < 2 else min(len(group) - 1, max(1, round(len(group) * float(val_split))))
        val += group[:n_val]
        train += group[n_val:]
    if not train or not val:
        raise ValueError(
            f"{len(items)} labelled images give {len(train)} for training and {len(val)} for validation; label at "
            "least two images of a class"
        )
    return train, val


def segmentation_datalist(datastore: Any) -> list[dict[str, Any]]:
    """The studies of a MONAI Label datastore that have a final label map, as a segmentation datalist.

    Args:
        datastore: the app's datastore (its ``datalist()``: the image and final label file of each labelled study).

    Returns:
        ``[{"image": <image file>, "label": <label map file>}, ...]`` sorted by image path.

    Raises:
        FileNotFoundError: for a label map that the datastore records but whose file is missing (the first one).
    """
    items = []
    for entry in datastore.datalist():
        if not entry or not entry.get("label"):
            continue
        if not os.path.exists(entry["label"]):
            raise FileNotFoundError(
                f"the label map of {entry['image']} is recorded but its file is missing: {entry['label']}"
            )
        items.append({"image": entry["image"], "label": entry["label"]})
    items.sort(key=lambda item: item["image"])
    logger.info(f"{len(items)} studies with a '{FINAL_LABEL_TAG}' label map")
    return items


def random_split(
    items: Sequence[dict[str, Any]], val_split: float, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split at random (fixed by ``seed``): ``round(n * val_split)`` items, at least one and at most ``n - 1``, go to
    validation, the rest to training.

    Raises:
        ValueError: when ``val_split`` is not in (0, 1), or there are fewer than two items.
    """
    if not 0.0 < float(val_split) < 1.0:
        raise ValueError(f"val_split must lie in (0, 1), got {val_split!r}; merge training needs a validation set")
    if len(items) < 2:
        raise ValueError(
            f"{len(items)} labelled image(s): merge training needs at least two, one to train on and one to validate"
        )
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    n_val = min(len(shuffled) - 1, max(1, round(len(shuffled) * float(val_split))))
    return shuffled[n_val:], shuffled[:n_val]

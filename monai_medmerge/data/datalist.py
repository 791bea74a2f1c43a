"""Datalists of labelled images in MONAI's decathlon style, and a check of every item before training.

A datalist is a JSON file with ``"training"``, ``"validation"`` and ``"test"`` lists of
``{"image": <file or DICOM series folder>, "label": <class index>}`` for classification, or
``{"image": <file>, "label": <label map file>}`` for segmentation, the format that
``monai.data.load_decathlon_datalist`` reads. :func:`load_datalist` reads it with the same conventions and checks
each item; :func:`check_items` loads every image (and label map) once, so that a corrupt file stops the run before
training, or is skipped and written to a report with ``skip_bad``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from monai_medmerge.data.transforms import (
    MAX_NAMES,
    BadImageError,
    CheckedLabelMapd,
    CheckedLoadImaged,
    as_class_label,
)
from monai_medmerge.io import write_json

__all__ = ["check_class_names", "check_items", "load_datalist", "load_unlabeled"]

PathLike = str | os.PathLike[str]
SECTIONS = ("training", "validation", "test")
TASKS = ("classification", "segmentation")

logger = logging.getLogger(__name__)
# An image upsampled by more than this along an axis to reach the network input is reported as far too small.
SMALL_IMAGE_FACTOR = 4.0


def _first_names(names: Sequence[str], limit: int = MAX_NAMES) -> str:
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f" (and {len(names) - limit} more)"
    return shown


def _check_task(task: Any) -> str:
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not supported; choose one of {', '.join(TASKS)}")
    return task


def check_class_names(class_names: Sequence[str] | None) -> list[str] | None:
    """``class_names`` as a list, or None: a non-empty list of non-empty strings, none repeated (a repeated name
    would make labels given as names ambiguous and the predictions table's columns alike).

    Raises:
        ValueError: naming what is wrong, with the names given.
    """
    if class_names is None:
        return None
    if isinstance(class_names, str) or not all(isinstance(c, str) and c for c in class_names):
        raise ValueError(f"class_names must be a list of non-empty strings, got {class_names!r}")
    names = list(class_names)
    if not names:
        raise ValueError("class_names is empty")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"class_names has repeated names ({', '.join(map(repr, repeated))}): {names}")
    return names


def _num_classes(class_names: Sequence[str] | None, num_classes: int | None) -> int | None:
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)):
        raise ValueError(f"num_classes must be a positive integer or None, got {num_classes!r}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer or None, got {num_classes!r}")
    class_names = check_class_names(class_names)
    if class_names is None:
        return num_classes
    if num_classes is not None and num_classes != len(class_names):
        raise ValueError(f"num_classes is {num_classes} but class_names has {len(class_names)} names: {class_names}")
    return len(class_names)


def load_datalist(
    path: PathLike,
    base_dir: PathLike | None = None,
    class_names: Sequence[str] | None = None,
    num_classes: int | None = None,
    sections: Sequence[str] = SECTIONS,
    require_label: bool = True,
    required: Sequence[str] = (),
    task: str = "classification",
) -> dict[str, list[dict]]:
    """Read a decathlon-style datalist of labelled images and check every item's fields.

    Each item is ``{"image": <file or DICOM series folder>, "label": <int>}``, possibly with more keys, which are
    kept. As in ``monai.data.load_decathlon_datalist``, an item may also be a bare image path (usual in ``"test"``),
    and relative image paths are resolved against ``base_dir``, by default the datalist's folder. A label given as a
    whole float (``1.0``) is read as the integer. Images are not opened here (see :func:`check_items`).

    With ``task="segmentation"`` the ``"label"`` is a label map file (or DICOM series folder), resolved like the
    image and required to exist; its values are checked when it is loaded (:func:`check_items`), so ``class_names``
    and ``num_classes`` are only validated here.

    Args:
        path: the JSON file.
        base_dir: folder that relative image paths start from; ``None`` for the datalist's folder.
        class_names: the class names, label ``i`` being ``class_names[i]``; sets ``num_classes`` to their count.
        num_classes: the number of classes; labels must lie in ``[0, num_classes)``. ``None`` with no
            ``class_names`` checks only that labels are non-negative integers.
        sections: the lists to read. A section missing from the file gives an empty list; the caller decides
            whether that is acceptable (training usually needs ``"training"``).
        require_label: whether every item needs a ``"label"``; False for lists of unlabelled images to classify.
        required: sections that must hold at least one item (training needs ``("training", "validation")``).
        task: ``"classification"`` (labels are class indices) or ``"segmentation"`` (labels are label map files).

    The items are also checked across each other: the same image (the same file after following links) in two
    sections, or twice with different labels, is an error; the same image twice with the same label in one
    section is a warning, logged once with the count, and the items are kept.

    Returns:
        a dict from each section name to its list of items, with ``"image"`` an absolute, normalised path string
        and ``"label"`` an ``int`` (segmentation: an absolute, normalised path string).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file is not valid JSON or not an object, a section is not a list, an item is not an
            object or a path, ``"image"`` or (with ``require_label``) ``"label"`` is missing, a label is not an
            integer or lies outside ``[0, num_classes)``, or an image path (or, for segmentation, a label map path)
            does not exist; also for an unknown ``task`` or inconsistent
            ``class_names`` and ``num_classes``. The message names the datalist file, the section, the item's index
            and the field. Also when the file holds none of ``sections`` (``"train"`` for ``"training"``), a
            ``required`` section is missing or empty, an image is in two sections (training and validation or
            test: the metrics would be measured on training images), or an image has two different labels.
    """
    path = Path(path).expanduser()
    task = _check_task(task)
    n_classes = _num_classes(class_names, num_classes)
    if isinstance(sections, str):
        sections = (sections,)
    if not path.is_file():
        raise FileNotFoundError(f"datalist {path} does not exist")
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"datalist {path} is not valid JSON: {e}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"datalist {path} is not UTF-8 text: {e}") from e
    if not isinstance(content, dict):
        raise ValueError(f"datalist {path} must hold a JSON object with the sections, got a {type(content).__name__}")
    base = Path(base_dir).expanduser() if base_dir is not None else path.parent
    if isinstance(required, str):
        required = (required,)
    if not any(section in content for section in sections):
        keys = _first_names(sorted(map(str, content))) if content else "none"
        raise ValueError(f"datalist {path} has none of the sections {', '.join(sections)}; its keys: {keys}")
    result: dict[str, list[dict]] = {}
    for section in sections:
        entries = content.get(section, [])
        if not isinstance(entries, list):
            raise ValueError(
                f"datalist {path}, section {section!r}: expected a list of items, got a {type(entries).__name__}"
            )
        result[section] = [
            _read_item(entry, path, section, index, base, n_classes, require_label, task)
            for index, entry in enumerate(entries)
        ]
    for section in required:
        if not result.get(section):
            state = "is empty" if section in content else "is missing"
            raise ValueError(f"datalist {path}, section {section!r} {state}: it needs at least one item")
    _check_across_items(path, result)
    return result


def load_unlabeled(
    path: PathLike,
    section: str | None,
    labelled: Mapping[str, list[dict]] | None = None,
    base_dir: PathLike | None = None,
    task: str = "classification",
) -> list[dict]:
    """The unlabelled images of a datalist section of their own (e.g. ``"unlabeled"``), as ``{"image": path}`` items.

    Items are read as :func:`load_datalist` reads them (a bare path or an object with ``"image"``; a ``"label"`` is
    not needed and is dropped). ``labelled`` (the sections :func:`load_datalist` returned) is checked against them: an
    image that is also a validation or test image would let training see the images its metrics are measured on,
    and one that is also a training image is counted twice, so both are errors.

    Returns:
        the items; an empty list when ``section`` is ``None`` or empty (no unlabelled images wanted).

    Raises:
        ValueError: when ``section`` is one of the labelled sections, is missing or empty in the file, an item is
            malformed or its image does not exist, or an image is also in a section of ``labelled``; the message
            names the datalist, the section and the item.
    """
    if not section:
        return []
    if section in SECTIONS:
        raise ValueError(
            f"the unlabelled images need a section of their own in datalist {path}, not {section!r} (one of "
            f'{", ".join(SECTIONS)}): e.g. "unlabeled": [{{"image": "..."}}, ...]'
        )
    items = load_datalist(path, base_dir, sections=(section,), require_label=False, required=(section,), task=task)
    items = {section: [{k: v for k, v in item.items() if k != "label"} for item in items[section]]}
    _check_across_items(Path(path).expanduser(), {**(labelled or {}), **items})
    return items[section]


def _check_across_items(path: Path, sections: Mapping[str, list[dict]]) -> None:
    seen: dict[str, tuple[str, int, Any]] = {}
    repeats: list[str] = []
    for section, items in sections.items():
        for index, item in enumerate(items):
            key = os.path.realpath(item["image"])
            if key not in seen:
                seen[key] = (section, index, item.get("label"))
                continue
            first_section, first_index, first_label = seen[key]
            where = f"datalist {path}: {item['image']} is item {first_index} of {first_section!r} and item {index}"
            if first_section != section:
                raise ValueError(
                    f"{where} of {section!r}; an image in two sections leaks into the metrics measured on it: "
                    "keep each image in one section"
                )
            if item.get("label") != first_label:
                raise ValueError(f"{where} of the same section, with labels {first_label!r} and {item.get('label')!r}")
            repeats.append(f"{item['image']} ({section!r})")
    if repeats:
        logger.warning(
            "datalist %s: %d item(s) repeat an earlier item of their section with the same image and label, so "
            "those images count more than once: %s",
            path,
            len(repeats),
            _first_names(repeats),
        )


def _read_item(
    entry: Any,
    path: Path,
    section: str,
    index: int,
    base: Path,
    n_classes: int | None,
    require_label: bool,
    task: str = "classification",
) -> dict:
    where = f"datalist {path}, section {section!r}, item {index}"
    if isinstance(entry, str):
        entry = {"image": entry}
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object with 'image' and 'label', got {entry!r}")
    item = dict(entry)
    if "image" not in item:
        raise ValueError(f"{where}, field 'image': missing")
    item["image"] = _resolve(item["image"], base, f"{where}, field 'image'")
    if "label" not in item:
        if require_label:
            raise ValueError(f"{where}, field 'label': missing")
    elif task == "segmentation":
        item["label"] = _resolve(item["label"], base, f"{where}, field 'label' (the label map of {item['image']})")
    else:
        try:
            item["label"] = as_class_label(item["label"], n_classes)
        except ValueError as e:
            raise ValueError(f"{where}, field 'label': {e}") from None
    return item


def _resolve(value: Any, base: Path, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: expected a file or folder path, got {value!r}")
    resolved = Path(os.path.normpath(base / Path(value).expanduser()))
    if not resolved.exists():
        raise ValueError(f"{where}: {resolved} does not exist")
    return str(resolved)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    try:
        return as_class_label(value)
    except ValueError:
        return repr(value)


def _write_report(report_path: PathLike, skipped: list[dict]) -> Path:
    return write_json(Path(report_path).expanduser(), skipped)  # a reader of the report never sees half of it


def check_items(
    items: Sequence[Mapping[str, Any]],
    reader: str,
    skip_bad: bool = False,
    report_path: PathLike | None = None,
    num_classes: int | None = None,
    progress: bool = False,
    section: str | None = None,
    spatial_size: Sequence[int] | None = None,
    modality: str | None = None,
    window: Sequence[float] = (-1000.0, 1000.0),
    percentiles: Sequence[float] = (1.0, 99.0),
    task: str = "classification",
    **loader_kwargs: Any,
) -> list[dict]:
    """Check every item before training: a valid label, and an image that loads with the chosen reader.

    Each image is actually loaded with :class:`~monai_medmerge.data.transforms.CheckedLoadImaged` (and thrown
    away), so a truncated or non-image file, an empty series folder, a series with a missing or corrupt slice, and
    a file the reader cannot read are all found now instead of in the middle of an epoch. This costs one read of
    every image.

    With ``task="segmentation"`` the ``"label"`` is a label map file, loaded with the same reader and checked
    against its image by :class:`~monai_medmerge.data.transforms.CheckedLabelMapd`: one channel, the image's spatial
    shape and affine, integer values in ``[0, num_classes)``. A mismatch is a ``BadImageError`` whose message names
    both files and what differs.

    Args:
        items: dicts with ``"image"`` and, optionally, ``"label"``, as :func:`load_datalist` returns them.
        reader: the one reader to load with, as for ``CheckedLoadImaged``.
        skip_bad: False to raise at the first bad item; True to leave bad items out, log a warning for each and
            write them to ``report_path``.
        report_path: with ``skip_bad``, a JSON file that receives the list of skipped items as
            ``{"image", "label", "reason"}`` (an empty list when none was skipped). Written to a temporary file and
            renamed into place.
        num_classes: when given, a label (or every value of a label map) must lie in ``[0, num_classes)``.
        progress: show a progress bar.
        section: the datalist section the items come from, named in messages.
        spatial_size: the network's input size; images that must be upsampled more than
            :data:`SMALL_IMAGE_FACTOR` times along an axis to reach it are counted in a warning (classification
            only: segmentation does not resize).
        modality: the pipeline's modality (``"CT"``, ``"MR"``/``"MRI"`` or ``"other"``); with ``"CT"``, images that
            lie entirely outside ``window`` (so clip to one value) are counted in a warning, with ``"MR"`` images
            whose ``percentiles`` are equal (so scale to nothing).
        window: the CT window in Hounsfield units, as in the pipeline.
        percentiles: the MR percentiles, as in the pipeline.
        task: ``"classification"`` (labels are class indices) or ``"segmentation"`` (labels are label map files;
            label maps without any foreground are counted in a warning).
        loader_kwargs: more arguments for ``CheckedLoadImaged`` (for example ``check_suffix`` or ``series_name``).

    Degenerate images that can still be trained on are counted, not refused: constant images (every value the same),
    and, with the arguments above, images far smaller than the network input, CT images outside the window and MR
    images with equal percentiles each give one warning with the count and the first few files.

    Returns:
        the good items, the same dicts in the same order.

    Raises:
        BadImageError: without ``skip_bad``, for the first bad item; the message names the file and the problem.
        ValueError: for no items at all (an empty datalist section), an item that is not a dict with ``"image"``,
            an unknown reader or task, a segmentation ``num_classes`` below 2, or, with ``skip_bad``, when every
            item is bad.
    """
    task = _check_task(task)
    segmentation = task == "segmentation"
    if not items:
        where = f"section {section!r}" if section else "the datalist section"
        raise ValueError(
            f"no items to check: {where} is empty; training needs 'training' and 'validation' items (early stopping "
            "picks the best epoch on validation), evaluation needs 'test' items"
        )
    degenerate = _Degenerate(None if segmentation else spatial_size, modality, window, percentiles)
    if segmentation:
        # items without a label map (unlabelled test images) load their image only
        loader = CheckedLoadImaged(keys=["image", "label"], reader=reader, allow_missing_keys=True, **loader_kwargs)
        label_check = CheckedLabelMapd(keys="label", image_key="image", num_classes=num_classes)
    else:
        loader = CheckedLoadImaged(keys="image", reader=reader, **loader_kwargs)
    good: list[dict] = []
    skipped: list[dict] = []
    for index, item in enumerate(tqdm(items, desc="checking images", disable=not progress)):
        if not isinstance(item, Mapping) or "image" not in item:
            raise ValueError(f"item {index} must be a dict with an 'image' key, got {item!r}")
        try:
            if segmentation:
                loaded = loader({k: item[k] for k in ("image", "label") if k in item})
                if "label" in loaded:
                    label_check(loaded)
                    degenerate.add_label_map(str(item["label"]), loaded["label"])
                image = loaded["image"]
            else:
                if "label" in item:
                    try:
                        as_class_label(item["label"], num_classes)
                    except ValueError as e:
                        raise BadImageError(item["image"], f"label {e}") from None
                image = loader({"image": item["image"]})["image"]
        except BadImageError as e:
            if not skip_bad:
                raise
            skipped.append({"image": str(item["image"]), "label": _jsonable(item.get("label")), "reason": e.reason})
            logger.warning("skipping item %d: %s", index, e)
        else:
            degenerate.add(str(item["image"]), image)
            good.append(item)  # type: ignore[arg-type]
    degenerate.warn(len(items), f" of section {section!r}" if section else "")
    if not skip_bad:
        return good
    report = _write_report(report_path, skipped) if report_path is not None else None
    if skipped:
        where = f"; the list is in {report}" if report is not None else ""
        logger.warning("skipped %d of %d items as bad%s", len(skipped), len(items), where)
    if skipped and not good:
        where = f"; the skip list is in {report}" if report is not None else ""
        first = f"{skipped[0]['image']}: {skipped[0]['reason']}"
        raise ValueError(f"all {len(skipped)} items are bad, none is left (the first: {first}){where}")
    return good


class _Degenerate:
    """Counts images that load but carry little to learn from; :meth:`warn` logs one warning per kind."""

    def __init__(
        self,
        spatial_size: Sequence[int] | None,
        modality: str | None,
        window: Sequence[float],
        percentiles: Sequence[float],
    ) -> None:
        self.spatial_size = None if spatial_size is None else tuple(int(s) for s in spatial_size)
        self.modality = None if modality is None else {"MRI": "MR"}.get(str(modality).upper(), str(modality).upper())
        self.window = tuple(float(w) for w in window)
        self.percentiles = tuple(float(p) for p in percentiles)
        self.found: dict[str, list[str]] = {}

    def add(self, name: str, image: Any) -> None:
        array = np.asarray(image.detach().cpu() if isinstance(image, torch.Tensor) else image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        if low == high:
            self.found.setdefault(
                "are constant, blank (every value the same: every intensity step maps them to one value)", []
            ).append(f"{name} ({low:g})")
        elif self.modality == "CT" and (high <= self.window[0] or low >= self.window[1]):
            self.found.setdefault(
                f"lie entirely outside the CT window {list(self.window)} HU, so they clip to one value "
                "(the wrong window or modality?)",
                [],
            ).append(f"{name} ({low:g} to {high:g})")
        elif self.modality == "MR":
            p_low, p_high = np.percentile(array, self.percentiles)
            if p_low == p_high:
                self.found.setdefault(
                    f"have equal {self.percentiles[0]:g}th and {self.percentiles[1]:g}th percentiles, so MR "
                    "percentile scaling divides by zero (nearly constant images)",
                    [],
                ).append(f"{name} ({p_low:g})")
        if self.spatial_size is not None:
            spatial = list(array.shape[1:])
            while len(spatial) > len(self.spatial_size) and 1 in spatial:
                spatial.remove(1)
            if len(spatial) == len(self.spatial_size):
                factor = max(s / max(n, 1) for s, n in zip(self.spatial_size, spatial, strict=True))
                if factor > SMALL_IMAGE_FACTOR:
                    self.found.setdefault(
                        f"are far smaller than the network input {list(self.spatial_size)} (upsampled more than "
                        f"{SMALL_IMAGE_FACTOR:g} times along an axis)",
                        [],
                    ).append(f"{name} ({'x'.join(map(str, spatial))})")

    def add_label_map(self, name: str, label: Any) -> None:
        if not bool((label > 0).any()):
            self.found.setdefault(
                "have label maps without foreground (every value 0, background): they teach background only", []
            ).append(name)

    def warn(self, n_items: int, where: str) -> None:
        for what, names in self.found.items():
            logger.warning("%d of %d images%s %s: %s", len(names), n_items, where, what, _first_names(names))

"""Labels for DICOM series: read them from a CSV, choose the series to label, join the two and write a datalist.

A *series record* is a plain dict that describes one DICOM series, as :func:`monai_medmerge.dicom.folders.scan_folder`
(or a DICOMweb search) returns it::

    {"StudyInstanceUID": str, "SeriesInstanceUID": str, "Modality": str | None, "SeriesDescription": str | None,
     "AccessionNumber": str | None, "PatientID": str | None, "num_instances": int,
     "path": <the series folder> | None, ...other tags}

Labels are given per study (``StudyInstanceUID`` or ``AccessionNumber``) or per patient (``PatientID``) in a CSV.
:func:`join_labels` gives a labelled item only to a key with exactly one candidate series after
:func:`filter_series`; everything else is reported, never guessed. ``PatientID`` and ``AccessionNumber`` values
identify people: nothing here writes them to a log, an error message, a report or a datalist (CSV row numbers stand
in for them); studies are named by ``StudyInstanceUID`` only.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.utils import look_up_option

from monai_medmerge.data.datalist import check_class_names
from monai_medmerge.io import write_json

__all__ = [
    "KEYS",
    "LabelTable",
    "check_layout",
    "filter_series",
    "join_labels",
    "read_labels",
    "split_items",
    "write_datalist",
    "write_json_atomic",
]

PathLike = str | os.PathLike[str]
KEYS = ("StudyInstanceUID", "AccessionNumber", "PatientID")
# Keys whose values are not identifying and may appear in messages and reports.
UID_KEYS = ("StudyInstanceUID",)
SECTIONS = ("training", "validation", "test")
# The fields of a datalist item; nothing identifying.
ITEM_FIELDS = ("image", "label", "StudyInstanceUID", "SeriesInstanceUID")

logger = logging.getLogger(__name__)


class LabelTable(dict):
    """The labels of a CSV: a ``dict`` from key value to class index that also remembers where each came from.

    It is an ordinary ``dict[str, int]`` (in the CSV's order); :func:`join_labels` uses the extra attributes to
    report unmatched labels by CSV row number instead of by their (possibly identifying) value.

    Attributes:
        source: the CSV file, as a string.
        key: the column the labels are keyed by.
        rows: key value -> the row number of its first row in the CSV (the header is row 1).
    """

    def __init__(self, *args: Any, source: str = "", key: str = "", rows: Mapping[str, int] | None = None) -> None:
        super().__init__(*args)
        self.source = source
        self.key = key
        self.rows = dict(rows or {})


def _parse_label(text: str, class_names: list[str] | None) -> int:
    """``text`` as a class index; raises ValueError with a message that can follow 'label '."""
    if class_names is not None and text in class_names:
        return class_names.index(text)
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or not number.is_integer():
        if class_names is None:
            raise ValueError(f"{text!r} is not an integer class index (pass class_names to use class names)")
        raise ValueError(f"{text!r} is neither one of the class names {class_names} nor a class index")
    label = int(number)
    if label < 0 or (class_names is not None and label >= len(class_names)):
        bound = f"[0, {len(class_names)})" if class_names is not None else "non-negative integers"
        raise ValueError(f"{label} is outside the classes {bound}")
    return label


def read_labels(
    csv_path: PathLike,
    key: str = "StudyInstanceUID",
    label_column: str = "label",
    class_names: Sequence[str] | None = None,
) -> LabelTable:
    """Read one label per study or patient from a CSV file with a header row.

    The CSV is comma-separated UTF-8 (a byte-order mark is allowed) with at least the columns ``key`` and
    ``label_column``; other columns are ignored, values are stripped of surrounding spaces and blank lines are skipped.
    A label is a class index (``0``, ``1``, ... or ``1.0``) or, with ``class_names``, one of the names. A key may
    repeat with the same label. Error messages name the file and the row number (the header is row 1), and never a
    key value that identifies a person (``AccessionNumber``, ``PatientID``).

    Args:
        csv_path: the CSV file.
        key: the column that names the study or patient: ``"StudyInstanceUID"``, ``"AccessionNumber"`` or
            ``"PatientID"``; its values are matched exactly against the DICOM tag of that name.
        label_column: the column of the labels.
        class_names: the class names, label ``i`` being ``class_names[i]``. Labels may then be names or indices
            below ``len(class_names)``; without it they must be non-negative integers.

    Returns:
        a :class:`LabelTable`: a ``dict`` from key value to class index, in the CSV's order, that also knows each
        key's row number.

    Raises:
        FileNotFoundError: when ``csv_path`` does not exist.
        ValueError: for an unknown ``key``; bad ``class_names``; a file that is empty, not UTF-8 or not CSV; a missing
            column (the message lists the columns present); an empty key or label; a label that is not a class
            name or lies outside the classes; a key given twice with different labels (both row numbers).
    """
    key = look_up_option(key, KEYS)
    names = check_class_names(class_names)
    path = Path(csv_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"labels CSV {path} does not exist")
    show_value = key in UID_KEYS
    labels = LabelTable(source=str(path), key=key)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"labels CSV {path} is empty; expected a header row with {key!r} and {label_column!r}")
            header = [h.strip() for h in header]
            missing = [c for c in (key, label_column) if c not in header]
            if missing:
                raise ValueError(
                    f"labels CSV {path} has no column {' or '.join(repr(c) for c in missing)}; its columns are {header}"
                )
            key_at, label_at = header.index(key), header.index(label_column)
            for row in reader:
                row_number = reader.line_num
                if not any(cell.strip() for cell in row):
                    continue
                where = f"labels CSV {path}, row {row_number}"
                if len(row) <= max(key_at, label_at):
                    raise ValueError(f"{where}: has {len(row)} cells, fewer than the {len(header)} columns")
                value, text = row[key_at].strip(), row[label_at].strip()
                if not value:
                    raise ValueError(f"{where}: the {key!r} cell is empty")
                if not text:
                    raise ValueError(f"{where}: the {label_column!r} cell is empty")
                try:
                    label = _parse_label(text, names)
                except ValueError as e:
                    raise ValueError(f"{where}, column {label_column!r}: label {e}") from None
                if value in labels and labels[value] != label:
                    named = f" {value}" if show_value else ""
                    raise ValueError(
                        f"{where}: {key}{named} has label {label}, but row {labels.rows[value]} gave it "
                        f"label {labels[value]}"
                    )
                if value not in labels:
                    labels[value] = label
                    labels.rows[value] = row_number
    except UnicodeDecodeError as e:
        raise ValueError(f"labels CSV {path} is not UTF-8 text: {e.reason} at byte {e.start}") from None
    except csv.Error as e:
        raise ValueError(f"labels CSV {path} is not valid CSV: {e}") from None
    return labels


def _as_list(value: Any) -> list:
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(value)
    return [value]


def _text(value: Any) -> str:
    return str(value).strip()


def _tag_matches(have: Any, wanted: Sequence[Any]) -> bool:
    if have is None:
        return False
    wanted_text = {_text(w) for w in wanted if w is not None}
    if isinstance(have, (list, tuple)):
        parts = [_text(v) for v in have]
        return "\\".join(parts) in wanted_text or any(p in wanted_text for p in parts)
    return _text(have) in wanted_text


def filter_series(
    records: Iterable[Mapping[str, Any]],
    modality: str | Sequence[str] | None = None,
    series_description: str | None = None,
    tags: Mapping[str, Any] | None = None,
) -> list[dict]:
    """The series records that pass every given condition.

    Args:
        records: series records (see the module docstring).
        modality: a modality (``"CT"``) or a list of them; compared case-insensitively.
        series_description: a regular expression searched (``re.search``, case-insensitive) in the
            ``SeriesDescription``; a series without one is searched as the empty string.
        tags: more conditions, tag keyword -> a value or a list of accepted values, compared as stripped strings
            (``{"SeriesNumber": 3}`` matches ``"3"``). A multi-valued tag (a list in the record, such as
            ``ImageType``) matches a value equal to the whole value joined with ``\\`` or to one of its parts.
            A series whose tag is missing or empty does not match.

    Returns:
        the records that match, in their order.

    Raises:
        ValueError: for a ``series_description`` that is not a valid regular expression, a ``modality`` or tag value
            that is empty, or a tag that the records were not scanned with (a record without that key at all;
            scan with ``extra_tags``).
    """
    records = list(records)
    modalities = None
    if modality is not None:
        modalities = {_text(m).upper() for m in _as_list(modality)}
        if not modalities or "" in modalities:
            raise ValueError(f"modality must be a modality or a list of them, got {modality!r}")
    pattern = None
    if series_description is not None:
        try:
            pattern = re.compile(series_description, re.IGNORECASE)
        except re.error as e:
            raise ValueError(f"series_description {series_description!r} is not a regular expression: {e}") from None
    conditions = {tag: _as_list(value) for tag, value in (tags or {}).items()}
    for tag, values in conditions.items():
        if not values:
            raise ValueError(f"tags[{tag!r}] is an empty list; give a value or a list of accepted values")
        absent = sum(1 for r in records if tag not in r)
        if absent:
            raise ValueError(
                f"{absent} of {len(records)} series records have no {tag!r} entry; scan with extra_tags=[{tag!r}]"
            )
    kept = []
    for record in records:
        if modalities is not None and _text(record.get("Modality") or "").upper() not in modalities:
            continue
        if pattern is not None and not pattern.search(str(record.get("SeriesDescription") or "")):
            continue
        if not all(_tag_matches(record[tag], values) for tag, values in conditions.items()):
            continue
        kept.append(dict(record))
    return kept


def _key_value(record: Mapping[str, Any], key: str) -> str | None:
    value = record.get(key)
    if value is None:
        return None
    value = _text(value)
    return value or None


def join_labels(
    records: Iterable[Mapping[str, Any]],
    labels: Mapping[str, int],
    key: str = "StudyInstanceUID",
) -> tuple[list[dict], dict]:
    """Match each labelled key to its one series; report every key and study that did not match one-to-one.

    ``records`` should already be filtered (:func:`filter_series`) down to the series to train on. A key (study,
    accession or patient) with exactly one such series gives one item; a key with several is left out and reported,
    never guessed, so narrow the filter (modality, description, tags) until each has one.

    Args:
        records: series records (see the module docstring); ``"path"`` may be None (a series still to be
            retrieved or copied into a folder of its own), and then so is the item's ``"image"``.
        labels: key value -> class index, as :func:`read_labels` returns it. When it is a :class:`LabelTable`, labels
            without images are also reported by CSV row number.
        key: the tag the labels are keyed by: ``"StudyInstanceUID"``, ``"AccessionNumber"`` or ``"PatientID"``.

    Returns:
        ``(items, report)``. Items, in the order of ``labels``, are ``{"image": record["path"], "label": int,
        "StudyInstanceUID": ..., "SeriesInstanceUID": ...}``. The report is a JSON-ready dict:

        - ``"key"``: the key; ``"labels"``: the number of labels; ``"series"``: the number of records;
        - ``"matched"``: the number of items;
        - ``"labels_without_images"``: ``{"count", "rows"}`` (CSV row numbers, when known), plus ``"uids"`` when
          the key is ``StudyInstanceUID``; never the values of an ``AccessionNumber`` or ``PatientID`` key;
        - ``"studies_without_labels"``: the StudyInstanceUIDs of the records' studies that no label reaches;
        - ``"several_candidate_series"``: ``{StudyInstanceUID: [SeriesInstanceUID, ...]}``, every candidate of
          every key that had more than one (a patient's key may span several studies);
          ``"several_candidate_rows"``: their CSV row numbers, when known.

    Raises:
        ValueError: for an unknown ``key``, or a record without ``StudyInstanceUID`` or ``SeriesInstanceUID``.
    """
    key = look_up_option(key, KEYS)
    records = list(records)
    rows: Mapping[str, int] = getattr(labels, "rows", {}) or {}
    by_key: dict[str, list[Mapping[str, Any]]] = {}
    for index, record in enumerate(records):
        if not _key_value(record, "StudyInstanceUID") or not _key_value(record, "SeriesInstanceUID"):
            raise ValueError(f"series record {index} has no StudyInstanceUID or SeriesInstanceUID")
        value = _key_value(record, key)
        if value is not None:
            by_key.setdefault(value, []).append(record)
    items: list[dict] = []
    without_images: list[str] = []
    several: dict[str, list[str]] = {}
    several_keys: list[str] = []
    labelled_studies: set[str] = set()
    for value, label in labels.items():
        value = _text(value)
        candidates = by_key.get(value, [])
        for record in candidates:
            labelled_studies.add(_text(record["StudyInstanceUID"]))
        if not candidates:
            without_images.append(value)
        elif len(candidates) > 1:
            several_keys.append(value)
            for record in candidates:
                several.setdefault(_text(record["StudyInstanceUID"]), []).append(_text(record["SeriesInstanceUID"]))
        else:
            record = candidates[0]
            items.append(
                {
                    "image": record.get("path"),
                    "label": int(label),
                    "StudyInstanceUID": _text(record["StudyInstanceUID"]),
                    "SeriesInstanceUID": _text(record["SeriesInstanceUID"]),
                }
            )
    studies = sorted({_text(r["StudyInstanceUID"]) for r in records})
    unlabelled = [s for s in studies if s not in labelled_studies]
    missing: dict[str, Any] = {"count": len(without_images)}
    if key in UID_KEYS:
        missing["uids"] = without_images
    if rows:
        missing["rows"] = sorted(rows[v] for v in without_images if v in rows)
    report: dict[str, Any] = {
        "key": key,
        "labels": len(labels),
        "series": len(records),
        "matched": len(items),
        "labels_without_images": missing,
        "studies_without_labels": unlabelled,
        "several_candidate_series": {study: sorted(series) for study, series in sorted(several.items())},
    }
    if rows:
        report["several_candidate_rows"] = sorted(rows[v] for v in several_keys if v in rows)
    _log_join(report)
    return items, report


def _log_join(report: Mapping[str, Any]) -> None:
    missing = report["labels_without_images"]
    logger.info(
        "joined %d labels (by %s) with %d series: %d matched, %d labels without images, %d studies without labels, "
        "%d studies with several candidate series",
        report["labels"],
        report["key"],
        report["series"],
        report["matched"],
        missing["count"],
        len(report["studies_without_labels"]),
        len(report["several_candidate_series"]),
    )
    for study, series in report["several_candidate_series"].items():
        logger.warning(
            "study %s has %d candidate series (%s); left out: narrow the filter so that one remains",
            study,
            len(series),
            ", ".join(series),
        )
    if missing.get("uids"):
        logger.warning("labelled studies without images: %s", ", ".join(missing["uids"]))
    elif missing.get("rows"):
        logger.warning("labels without images at CSV rows %s", ", ".join(str(r) for r in missing["rows"]))


def write_json_atomic(content: Any, path: PathLike) -> Path:
    """Write ``content`` as indented JSON, atomically: :func:`monai_medmerge.io.write_json` with the arguments in
    this module's older order (kept for callers outside the package).

    Args:
        content: anything ``json.dumps`` accepts.
        path: the file; its folder is created when missing.

    Returns:
        the path written.
    """
    return write_json(path, content)


def check_layout(split: Sequence[float] | None, section: str = "training") -> None:
    """Check the layout a datalist will be written in, as :func:`write_datalist` checks it: ``split`` (three
    fractions summing to 1) or, when it is None, ``section``; the datalist builders call it before they scan a
    folder or search and download from a server, so that a bad value costs nothing.

    Raises:
        ValueError: for a bad ``split``, or an unknown ``section`` when ``split`` is None.
    """
    if split is None:
        look_up_option(section, SECTIONS)
    else:
        _check_split(split)


def _check_split(split: Sequence[float]) -> tuple[float, float, float]:
    try:
        fractions = tuple(float(f) for f in split)
    except (TypeError, ValueError):
        raise ValueError(f"split must be three fractions (train, val, test), got {split!r}") from None
    if len(fractions) != 3 or not all(0.0 <= f <= 1.0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split must be three fractions (train, val, test) in [0, 1] that sum to 1, got {split!r}")
    return fractions  # type: ignore[return-value]


def split_items(items: Sequence[Mapping[str, Any]], split: Sequence[float], seed: int = 0) -> dict[str, list[dict]]:
    """Split items into training, validation and test by study, stratified by label, reproducibly.

    All items of one ``StudyInstanceUID`` go to the same section. The studies of each class (the label of the study's
    first item) are shuffled with ``seed`` and dealt one by one to the section furthest below its share of the class
    (ties: of all studies so far), so every section gets its share of each class, and of the whole, as nearly as whole
    studies allow.

    Args:
        items: datalist items with ``"label"`` and ``"StudyInstanceUID"`` (or, lacking it, ``"image"``).
        split: fractions (train, val, test) that sum to 1.
        seed: the shuffle's seed.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}``, each in the order of ``items``.

    Raises:
        ValueError: for fractions that are not three numbers in [0, 1] summing to 1.
    """
    fractions = _check_split(split)
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        study = item.get("StudyInstanceUID") or item.get("image")
        groups.setdefault(str(study), []).append(index)
    by_class: dict[int, list[str]] = {}
    for study, indices in groups.items():
        by_class.setdefault(int(items[indices[0]]["label"]), []).append(study)
    rng = random.Random(seed)
    section_of: dict[str, str] = {}
    totals = [0, 0, 0]
    for label in sorted(by_class):
        studies = sorted(by_class[label])
        rng.shuffle(studies)
        counts = [0, 0, 0]
        for study in studies:
            # The section furthest below its share of this class; ties go to the one furthest below its share of
            # all studies so far, so that classes of one or two studies do not all land in "training".
            done = sum(totals) + 1
            best = max(
                (i for i in range(3) if fractions[i] > 0),
                key=lambda i: (
                    round(len(studies) * fractions[i] - counts[i], 9),
                    round(done * fractions[i] - totals[i], 9),
                    -i,
                ),
            )
            counts[best] += 1
            totals[best] += 1
            section_of[study] = SECTIONS[best]
    sections: dict[str, list[dict]] = {s: [] for s in SECTIONS}
    for item in items:
        sections[section_of[str(item.get("StudyInstanceUID") or item.get("image"))]].append(dict(item))
    return sections


def _check_items(items: Sequence[Mapping[str, Any]], n_classes: int | None) -> list[dict]:
    checked = []
    for index, item in enumerate(items):
        study = item.get("StudyInstanceUID") if isinstance(item, Mapping) else None
        where = f"item {index}" + (f" (study {study})" if study else "")
        if not isinstance(item, Mapping):
            raise ValueError(f"{where}: expected a dict with 'image' and 'label', got a {type(item).__name__}")
        image = item.get("image")
        if image is None:
            raise ValueError(
                f"{where}: has no image path; a series without a folder of its own needs "
                "monai_medmerge.dicom.folders.materialize_series (or retrieval) first"
            )
        if not isinstance(image, (str, os.PathLike)):
            raise ValueError(f"{where}: 'image' must be a path, got a {type(image).__name__}")
        label = item.get("label")
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise ValueError(f"{where}: 'label' must be a non-negative integer, got {label!r}")
        if n_classes is not None and label >= n_classes:
            raise ValueError(f"{where}: label {label} is outside the classes [0, {n_classes})")
        entry = dict(item)
        entry["image"] = os.fspath(image)
        checked.append(entry)
    return checked


def write_datalist(
    items: Sequence[Mapping[str, Any]],
    path: PathLike,
    section: str = "training",
    split: Sequence[float] | None = None,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    report: Mapping[str, Any] | None = None,
) -> Path:
    """Write labelled items as a MONAI decathlon-style datalist JSON, atomically.

    The file reads with ``monai.data.load_decathlon_datalist`` and
    :func:`monai_medmerge.data.datalist.load_datalist`. Image paths are written as given (make them absolute to
    move the datalist freely); the items' other keys (the UIDs) are kept.

    Args:
        items: dicts with ``"image"`` (a file or series folder, not None) and ``"label"`` (an ``int``), as
            :func:`join_labels` returns them.
        path: the JSON file to write; its folder is created when missing.
        section: the section that receives every item when ``split`` is None: ``"training"``, ``"validation"`` or
            ``"test"``.
        split: fractions ``(train, val, test)`` summing to 1: split by study, stratified by label
            (:func:`split_items`) into all three sections.
        seed: the seed of the split.
        class_names: the class names, written as ``"labels": {"0": name, ...}``; labels must lie below their count.
        report: when given, written (as JSON) beside the datalist as ``<stem>_report.json``.

    Returns:
        the datalist's path.

    Raises:
        ValueError: for an unknown ``section``, a bad ``split`` or ``class_names``, or an item without an image path
            or with a label that is not a class index (the message names the item's index and study UID).
    """
    names = check_class_names(class_names)
    checked = _check_items(items, len(names) if names is not None else None)
    if split is None:
        content: dict[str, Any] = {look_up_option(section, SECTIONS): checked}
    else:
        content = dict(split_items(checked, split, seed))
    if names is not None:
        content = {"labels": {str(i): name for i, name in enumerate(names)}, **content}
    target = Path(path).expanduser()
    if report is not None:
        write_json(target.with_name(f"{target.stem}_report.json"), report)
    write_json(target, content)
    logger.info(
        "wrote a datalist of %d items (%s)",
        len(checked),
        ", ".join(f"{s}: {len(v)}" for s, v in content.items() if s in SECTIONS),
    )
    return target

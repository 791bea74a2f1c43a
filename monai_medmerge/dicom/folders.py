"""Datalists from folders of DICOM studies: scan headers, group series, filter, join labels, write a datalist.

:func:`scan_folder` reads only the headers (``pydicom.dcmread(..., stop_before_pixels=True)``) of every file under a
folder, whatever its name, and groups the instances into series by StudyInstanceUID and SeriesInstanceUID. MONAI
reads a DICOM series from a folder that holds that series and nothing else, so a series gets a ``"path"`` only when
its files are exactly the files of one folder; a series spread over several folders, or sharing its folder with other
files, gets ``"path": None`` and the list of its ``"files"``, and :func:`materialize_series` copies (hard-links) them
into a folder of their own. :func:`datalist_from_folder` does every step and writes a datalist and a report.

Logs name studies by StudyInstanceUID only; no patient name, patient ID, accession number or other identifying tag
value is logged or written to a report or datalist.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.utils import OptionalImportError, optional_import
from tqdm import tqdm

from monai_medmerge.dicom.labels import (
    check_layout,
    filter_series,
    join_labels,
    read_labels,
    split_items,
    write_datalist,
)
from monai_medmerge.io import atomic_folder, write_json

__all__ = ["RECORD_TAGS", "datalist_from_folder", "materialize_series", "scan_folder"]

PathLike = str | os.PathLike[str]
# The tags every series record carries (None when a series' first instance lacks one).
RECORD_TAGS = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesDescription", "AccessionNumber", "PatientID")
# Index files that sit beside slices without being one (as monai_medmerge.data.transforms.series_files).
_NOT_SLICES = ("dicomdir",)
# A UID used as a folder name: no separators, no leading dot.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9._\-]*")
_MAX_REASON = 200

logger = logging.getLogger(__name__)


def _pydicom():
    pydicom, has_pydicom = optional_import("pydicom")
    if not has_pydicom:
        raise OptionalImportError("reading DICOM headers needs pydicom: pip install pydicom, or monai_medmerge[io]")
    return pydicom


def _counted_files(folder: str, names: Sequence[str]) -> list[str]:
    """The files of ``folder`` that a series loader counts as slices: regular, not hidden, not DICOMDIR."""
    return sorted(
        os.path.join(folder, n)
        for n in names
        if not n.startswith(".") and n.lower() not in _NOT_SLICES and os.path.isfile(os.path.join(folder, n))
    )


def _value(element_value: Any) -> Any:
    """A header value as a stripped string (a list of them when multi-valued), or None when empty or absent."""
    if element_value is None:
        return None
    if type(element_value).__name__ == "Sequence":
        return None  # a sequence of items is not a value to filter on
    if isinstance(element_value, (list, tuple)) or type(element_value).__name__ == "MultiValue":
        parts = [str(v).strip() for v in element_value]
        return parts or None
    if isinstance(element_value, bytes):
        return None  # binary values are not tags to filter on
    text = str(element_value).strip()
    return text or None


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if len(text) > _MAX_REASON:
        text = text[: _MAX_REASON - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def scan_folder(
    root: PathLike, progress: bool = False, extra_tags: Sequence[str] = ()
) -> tuple[list[dict], list[dict]]:
    """Find the DICOM series under a folder, reading file headers only.

    Every regular file below ``root`` is tried as DICOM, whatever its name; hidden files and folders (name starting
    with ``.``) and ``DICOMDIR`` index files are passed over. Files that are not DICOM (or are DICOM without an image,
    such as a structured report) are listed, never raised. Instances are grouped by (StudyInstanceUID,
    SeriesInstanceUID); a second file with the SOPInstanceUID of one already found in its series is listed as a
    duplicate and left out.

    Args:
        root: the folder to scan.
        progress: show a progress bar over the files.
        extra_tags: more DICOM keywords to copy into each record (from the series' first instance), for example
            ``["BodyPartExamined", "ImageType"]``, to filter on with
            :func:`~monai_medmerge.dicom.labels.filter_series`.

    Returns:
        ``(records, skipped)``. ``records``, sorted by StudyInstanceUID then SeriesInstanceUID, are dicts with
        the :data:`RECORD_TAGS` and ``extra_tags`` (a stripped string, a list of strings for a multi-valued tag, or
        None), ``"num_instances"`` (int), ``"files"`` (the sorted absolute file paths) and ``"path"``: the series'
        folder when its files are exactly the files of that folder (hidden files and ``DICOMDIR`` aside), else None;
        such a series needs :func:`materialize_series` before MONAI can load it. The tag values come from the series'
        first file. ``skipped`` lists ``{"path", "reason"}`` for every file that was passed over as unusable.

    Raises:
        FileNotFoundError: when ``root`` does not exist.
        NotADirectoryError: when ``root`` is not a folder.
        ValueError: when an extra tag is not a DICOM keyword.
        OptionalImportError: when pydicom is not installed.
    """
    pydicom = _pydicom()
    base = Path(root).expanduser().absolute()
    if not base.exists():
        raise FileNotFoundError(f"DICOM folder {base} does not exist")
    if not base.is_dir():
        raise NotADirectoryError(f"{base} is not a folder")
    if isinstance(extra_tags, str):
        extra_tags = [extra_tags]
    unknown = [t for t in extra_tags if not isinstance(t, str) or pydicom.datadict.tag_for_keyword(t) is None]
    if unknown:
        raise ValueError(f"extra_tags must be DICOM keywords (such as 'BodyPartExamined'), got {unknown}")
    tags = list(RECORD_TAGS) + [t for t in dict.fromkeys(extra_tags) if t not in RECORD_TAGS]
    folder_files: dict[str, list[str]] = {}
    for folder, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        folder_files[folder] = _counted_files(folder, filenames)
    all_files = [f for folder in sorted(folder_files) for f in folder_files[folder]]

    series: dict[tuple[str, str], dict[str, Any]] = {}
    skipped: list[dict] = []
    for path in tqdm(all_files, desc="reading DICOM headers", disable=not progress):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError as e:
            skipped.append({"path": path, "reason": f"not DICOM: {_reason(e)}"})
            continue
        except Exception as e:
            skipped.append({"path": path, "reason": f"cannot be read as DICOM: {_reason(e)}"})
            continue
        study, series_uid = _value(ds.get("StudyInstanceUID")), _value(ds.get("SeriesInstanceUID"))
        if not isinstance(study, str) or not isinstance(series_uid, str):
            skipped.append({"path": path, "reason": "DICOM without a StudyInstanceUID or SeriesInstanceUID"})
            continue
        if ds.get("Rows") is None or ds.get("Columns") is None:
            skipped.append({"path": path, "reason": "DICOM without an image (no Rows or Columns)"})
            continue
        entry = series.get((study, series_uid))
        if entry is None:
            values = {}
            for tag in tags:
                try:
                    values[tag] = _value(ds.get(tag))
                except Exception:
                    values[tag] = None  # a malformed value is not worth losing the series for
            entry = series[(study, series_uid)] = {"values": values, "files": [], "sops": {}}
        sop = _value(ds.get("SOPInstanceUID"))
        if isinstance(sop, str) and sop in entry["sops"]:
            skipped.append({"path": path, "reason": f"a second copy of the instance in {entry['sops'][sop]}"})
            continue
        if isinstance(sop, str):
            entry["sops"][sop] = path
        entry["files"].append(path)

    records = []
    for (study, series_uid), entry in sorted(series.items()):
        files = sorted(entry["files"])
        folders = {os.path.dirname(f) for f in files}
        alone = len(folders) == 1 and folder_files[next(iter(folders))] == files
        record = dict(entry["values"])
        record.update(
            {
                "StudyInstanceUID": study,
                "SeriesInstanceUID": series_uid,
                "num_instances": len(files),
                "path": next(iter(folders)) if alone else None,
                "files": files,
            }
        )
        records.append(record)
    studies = {r["StudyInstanceUID"] for r in records}
    logger.info(
        "scanned %d files: %d series in %d studies (%d without a folder of their own), %d files skipped",
        len(all_files),
        len(records),
        len(studies),
        sum(1 for r in records if r["path"] is None),
        len(skipped),
    )
    return records, skipped


def _safe_name(uid: Any, what: str) -> str:
    text = str(uid or "").strip()
    if not _SAFE_NAME.fullmatch(text):
        raise ValueError(f"the record's {what} {text!r} cannot be used as a folder name")
    return text


def _same_files(folder: Path, sources: Sequence[str]) -> bool:
    names = sorted(p.name for p in folder.iterdir())
    if names != [_slice_name(i) for i in range(len(sources))]:
        return False
    return all((folder / _slice_name(i)).stat().st_size == os.path.getsize(s) for i, s in enumerate(sources))


def _slice_name(index: int) -> str:
    return f"{index:05d}.dcm"


def materialize_series(record: Mapping[str, Any], out_dir: PathLike, hardlink: bool = True) -> str:
    """Give a series a folder of its own, ``out_dir/<StudyInstanceUID>/<SeriesInstanceUID>``, holding only its files.

    The files are hard-linked (no extra space; copied when the file system cannot link, for example across devices)
    or copied, as ``00000.dcm``, ``00001.dcm``, ... into a temporary folder that is then renamed into place, so the
    series folder is either complete or absent. A folder left by an earlier run is kept when it holds the same number
    of files of the same sizes.

    Args:
        record: a series record with ``"StudyInstanceUID"``, ``"SeriesInstanceUID"`` and ``"files"``, as
            :func:`scan_folder` returns it.
        out_dir: the folder under which series folders are made.
        hardlink: hard-link the files when possible; False always copies.

    Returns:
        the series folder, as an absolute path string: give it to ``CheckedLoadImaged`` or put it in a datalist.

    Raises:
        ValueError: when the record has no files, or a UID that is not a plain folder name.
        FileExistsError: when the series folder exists but holds other files than the series'.
        FileNotFoundError: when one of the files no longer exists.
    """
    files = [os.fspath(f) for f in (record.get("files") or [])]
    study = _safe_name(record.get("StudyInstanceUID"), "StudyInstanceUID")
    series = _safe_name(record.get("SeriesInstanceUID"), "SeriesInstanceUID")
    if not files:
        raise ValueError(f"series {series} of study {study} has no 'files' to materialize")
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"series {series} of study {study}: file {f} does not exist")
    parent = Path(out_dir).expanduser().absolute() / study
    target = parent / series
    different = f"{target} exists and holds other files than series {series}; remove it to rebuild it"
    if target.exists():
        if target.is_dir() and _same_files(target, files):
            return str(target)
        raise FileExistsError(different)
    try:
        with atomic_folder(target, what="series folder") as tmp:
            for index, source in enumerate(files):
                dest = tmp / _slice_name(index)
                if hardlink:
                    try:
                        os.link(source, dest)
                        continue
                    except OSError:
                        pass  # another device, or a file system without hard links: copy instead
                shutil.copy2(source, dest)
    except FileExistsError:
        # another process made the same folder meanwhile: keep it if it is the same series
        if not (target.is_dir() and _same_files(target, files)):
            raise FileExistsError(different) from None
    return str(target)


def _by_study(pairs: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for study, series in pairs:
        grouped.setdefault(study, []).append(series)
    return {study: sorted(series) for study, series in sorted(grouped.items())}


def datalist_from_folder(
    root: PathLike,
    labels_csv: PathLike,
    out_path: PathLike,
    key: str = "StudyInstanceUID",
    label_column: str = "label",
    class_names: Sequence[str] | None = None,
    modality: str | Sequence[str] | None = None,
    series_description: str | None = None,
    tags: Mapping[str, Any] | None = None,
    split: Sequence[float] | None = None,
    seed: int = 0,
    materialize_dir: PathLike | None = None,
    progress: bool = False,
) -> dict:
    """From a folder of DICOM studies and a labels CSV to a MONAI datalist, reporting everything that did not match.

    Steps: :func:`~monai_medmerge.dicom.labels.read_labels` (first, so a bad CSV fails before the scan),
    :func:`scan_folder`, :func:`~monai_medmerge.dicom.labels.filter_series`,
    :func:`~monai_medmerge.dicom.labels.join_labels`; then each matched series without a folder of its own is
    materialized into ``materialize_dir`` (:func:`materialize_series`) or, when ``materialize_dir`` is None, left out
    and reported; finally :func:`~monai_medmerge.dicom.labels.write_datalist` writes the datalist (every item in
    ``"training"``, or split by ``split``) and ``<stem>_report.json`` beside it.

    Args:
        root: the folder of DICOM studies.
        labels_csv: the CSV of labels (see ``read_labels``).
        out_path: the datalist JSON to write.
        key: the CSV column and DICOM tag that join them: ``"StudyInstanceUID"``, ``"AccessionNumber"`` or
            ``"PatientID"``.
        label_column: the CSV column of the labels.
        class_names: class names; labels may then be names, and the datalist gets ``"labels"``.
        modality: keep only series of this modality (or these modalities).
        series_description: keep only series whose SeriesDescription matches this regular expression
            (case-insensitive).
        tags: keep only series whose tags have these values (tag keyword -> value or list of values); the tags are
            read in the scan.
        split: fractions ``(train, val, test)`` to split by study, stratified by label; None puts every item in
            ``"training"``.
        seed: the seed of the split.
        materialize_dir: where series without a folder of their own get one; None leaves them out (reported).
        progress: show a progress bar while scanning.

    Returns:
        the report, also written as ``<stem>_report.json``: ``join_labels``' report (``"matched"``,
        ``"labels_without_images"``, ``"studies_without_labels"``, ``"several_candidate_series"``, ...) plus
        ``"scan"`` (counts and the ``"skipped_files"``), ``"series_after_filter"``, ``"materialized"`` and
        ``"series_without_own_folder"`` (``{StudyInstanceUID: [SeriesInstanceUID]}``), ``"written"`` (items in the
        datalist), ``"sections"`` (items per section), ``"datalist"`` and ``"report_path"``.

    Raises:
        ValueError: for a bad argument or CSV (see ``read_labels``, ``filter_series``, ``write_datalist``), and when
            no labelled series is left to write (the report is written first; its path is in the message).
        FileNotFoundError, NotADirectoryError: for a missing ``labels_csv`` or ``root``.
    """
    check_layout(split)
    labels = read_labels(labels_csv, key=key, label_column=label_column, class_names=class_names)
    records, skipped = scan_folder(root, progress=progress, extra_tags=list(tags or {}))
    kept = filter_series(records, modality=modality, series_description=series_description, tags=tags)
    items, join_report = join_labels(kept, labels, key=key)

    by_series = {(r["StudyInstanceUID"], r["SeriesInstanceUID"]): r for r in kept}
    written: list[dict] = []
    materialized: list[tuple[str, str]] = []
    left_out: list[tuple[str, str]] = []
    for item in items:
        uids = (item["StudyInstanceUID"], item["SeriesInstanceUID"])
        if item["image"] is None:
            if materialize_dir is None:
                left_out.append(uids)
                continue
            item = dict(item, image=materialize_series(by_series[uids], materialize_dir))
            materialized.append(uids)
        written.append(item)
    for study, series in _by_study(left_out).items():
        logger.warning(
            "study %s: series %s has no folder of its own and was left out; pass materialize_dir to include it",
            study,
            ", ".join(series),
        )

    target = Path(out_path).expanduser().absolute()
    report_path = target.with_name(f"{target.stem}_report.json")
    report: dict[str, Any] = {
        "root": str(Path(root).expanduser().absolute()),
        "labels_csv": str(Path(labels_csv).expanduser().absolute()),
        "datalist": str(target),
        "report_path": str(report_path),
        "filter": {
            "modality": modality,
            "series_description": series_description,
            "tags": sorted(tags or {}),  # tag names only: a value could identify someone
        },
        "scan": {
            "instances": sum(r["num_instances"] for r in records),
            "series": len(records),
            "studies": len({r["StudyInstanceUID"] for r in records}),
            "skipped_files": skipped,
        },
        "series_after_filter": len(kept),
        **join_report,
        "materialized": _by_study(materialized),
        "series_without_own_folder": _by_study(left_out),
        "written": len(written),
    }
    if not written:
        report["sections"] = {}
        write_json(report_path, report)
        raise ValueError(
            f"no labelled series to write to {target}: {join_report['matched']} of {len(labels)} labels matched "
            f"exactly one series and {len(left_out)} of those had no folder of their own; see {report_path}"
        )
    if split is None:
        report["sections"] = {"training": len(written)}
    else:
        report["sections"] = {s: len(v) for s, v in split_items(written, split, seed).items()}
    write_datalist(written, target, split=split, seed=seed, class_names=class_names, report=report)
    logger.info(
        "datalist %s: %d items (%d materialized, %d left out without a folder of their own)",
        target.name,
        len(written),
        len(materialized),
        len(left_out),
    )
    return report

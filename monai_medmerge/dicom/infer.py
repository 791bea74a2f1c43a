"""Inference over DICOMweb: classify studies on a server with an exported bundle and write the results by UID.

:func:`classify_dicomweb` chooses one series per study (by modality, description and tags; a study with several
candidates is reported, not guessed), retrieves it into the cache of a
:class:`~monai_medmerge.dicom.web.DICOMwebSource`, runs the bundle's own ``configs/inference.yaml`` with
``python -m monai.bundle run`` in a subprocess (so the bundle runs exactly as it would for any MONAI user, and needs
nothing from this package), and maps the bundle's ``predictions.csv`` rows back to StudyInstanceUID and
SeriesInstanceUID. Results are written as ``predictions.csv`` and ``predictions.json``; studies that could not be
retrieved or read are listed there, not fatal.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_medmerge.dicom.web import DICOMwebSource, describe_error, retrieve_records
from monai_medmerge.io import output_folder, write_json, write_text

__all__ = ["BundleRunError", "exported_class_names", "classify_dicomweb", "run_inference_bundle"]

logger = logging.getLogger(__name__)

_INFERENCE_CONFIGS = ("inference.yaml", "inference.json")
_OUTPUT_TAIL = 4000
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b(:|$)")


class BundleRunError(RuntimeError):
    """``python -m monai.bundle run`` of an inference bundle failed; the message ends with the tail of its output.

    Attributes:
        output: the run's whole output (stdout and stderr), or "".
    """

    def __init__(self, message: str, output: str = "") -> None:
        super().__init__(message)
        self.output = output

    def __reduce__(self):
        return (type(self), (str(self), self.output))


def _config_file(bundle_dir: Path) -> Path:
    for name in _INFERENCE_CONFIGS:
        path = bundle_dir / "configs" / name
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{bundle_dir} is not an exported bundle: it has no configs/{' or configs/'.join(_INFERENCE_CONFIGS)}"
    )


def exported_class_names(bundle_dir: str | os.PathLike[str]) -> list[str]:
    """The class names of a bundle, in output order, from ``configs/metadata.json``
    (``network_data_format.outputs.pred.channel_def``).

    Raises:
        FileNotFoundError: when the bundle has no ``configs/metadata.json``.
        ValueError: when the metadata names no classes.
    """
    path = Path(bundle_dir) / "configs" / "metadata.json"
    if not path.is_file():
        raise FileNotFoundError(f"{bundle_dir} has no configs/metadata.json")
    metadata = json.loads(path.read_text())
    try:
        channel_def = metadata["network_data_format"]["outputs"]["pred"]["channel_def"]
        return [str(channel_def[str(i)]) for i in range(len(channel_def))]
    except (KeyError, TypeError) as e:
        raise ValueError(
            f"{path} has no class names in network_data_format.outputs.pred.channel_def ({type(e).__name__}: {e})"
        ) from None


def _check_device(device: str | None) -> None:
    """A ``device`` the bundle run can use, checked before anything is retrieved or run (the run would fail only
    after the download, in a subprocess)."""
    if device is None:
        return
    import torch  # here: the module itself runs bundles in subprocesses and needs no torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from e
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for, but torch sees no CUDA device here")


def run_inference_bundle(
    bundle_dir: str | os.PathLike[str],
    images: Sequence[str | os.PathLike[str]],
    work_dir: str | os.PathLike[str],
    device: str | None = None,
    timeout: float | None = None,
) -> dict[str, list[float]]:
    """Run an exported bundle's inference workflow on ``images`` in a subprocess and read its ``predictions.csv``.

    The command is ``python -m monai.bundle run --config_file configs/inference.yaml --bundle_root <bundle_dir>
    --datalist <the images> --output_dir <work_dir>/out`` (the ids of an exported bundle's inference config).

    Args:
        bundle_dir: the exported bundle.
        images: files or DICOM series folders.
        work_dir: a folder for the image list and the bundle's output.
        device: a torch device for the bundle (``"cpu"``, ``"cuda:0"``); None keeps the bundle's choice.
        timeout: seconds before the run is stopped; None waits.

    Returns:
        absolute image path -> one probability per class.

    Raises:
        ValueError: when ``device`` is not a torch device here (a CUDA device without CUDA).
        BundleRunError: when the run fails, or its ``predictions.csv`` misses an image.
    """
    _check_device(device)
    bundle = Path(bundle_dir).resolve()
    config = _config_file(bundle)
    work = Path(work_dir)
    out = work / "out"
    work.mkdir(parents=True, exist_ok=True)
    images = [os.path.abspath(os.fspath(p)) for p in images]  # the bundle runs in its own folder
    listing = work / "datalist.json"
    write_json(listing, [{"image": p} for p in images], indent=None)
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config)]
    for name, flag in (("metadata.json", "--meta_file"), ("logging.conf", "--logging_file")):
        if (bundle / "configs" / name).is_file():
            cmd += [flag, str(bundle / "configs" / name)]
    # the list goes through a file: a long list on the command line would exceed the argument size limit
    cmd += ["--bundle_root", str(bundle), "--output_dir", str(out)]
    cmd += ["--datalist", f"$__import__('json').load(open({str(listing)!r}))"]
    if device is not None:
        cmd += ["--device", f"$torch.device({device!r})"]
    try:
        proc = subprocess.run(cmd, cwd=bundle, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise BundleRunError(f"the inference bundle {bundle} did not finish within {timeout} s") from e
    output = (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode != 0:
        raise BundleRunError(
            f"the inference bundle {bundle} failed (exit code {proc.returncode}); its output ends:\n"
            f"{output[-_OUTPUT_TAIL:]}",
            output,
        )
    predictions = _read_predictions(out / "predictions.csv")
    lost = [p for p in images if p not in predictions]
    if lost:
        raise BundleRunError(f"the inference bundle {bundle} wrote no prediction for {len(lost)} image(s): {lost[0]}")
    return predictions


def _read_predictions(path: Path) -> dict[str, list[float]]:
    """The exported bundle's ``predictions.csv``: a header row (``file`` and the class names), then per image its
    path and one probability per class (paths with commas are quoted)."""
    if not path.is_file():
        raise BundleRunError(f"the inference bundle wrote no {path.name} in {path.parent}")
    with open(path, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.reader(f) if row]
    if not rows or rows[0][:1] != ["file"]:
        raise BundleRunError(f"{path} has no header row 'file,<class names>': was it written by an exported bundle?")
    return {row[0]: [float(v) for v in row[1:]] for row in rows[1:]}


def _choose_series(
    records: Sequence[dict], study_uids: Sequence[str]
) -> tuple[list[dict], dict[str, list[str]], list[str]]:
    by_study: dict[str, list[dict]] = {}
    for record in records:
        by_study.setdefault(record["StudyInstanceUID"], []).append(record)
    chosen, several, none = [], {}, []
    for study in study_uids:
        candidates = by_study.get(study, [])
        if len(candidates) == 1:
            chosen.append(candidates[0])
        elif candidates:
            several[study] = sorted(r["SeriesInstanceUID"] for r in candidates)
        else:
            none.append(study)
    return chosen, several, none


def classify_dicomweb(
    bundle_dir: str | os.PathLike[str],
    source: DICOMwebSource,
    out_dir: str | os.PathLike[str],
    study_uids: Sequence[str] | None = None,
    query: Mapping[str, Any] | None = None,
    modality: str | Sequence[str] | None = None,
    series_description: str | None = None,
    tags: Mapping[str, Any] | None = None,
    progress: bool = False,
    device: str | None = None,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Classify studies on a DICOMweb server with an exported bundle; write ``predictions.csv`` and ``.json``.

    Each study must have exactly one series that passes ``modality``, ``series_description`` and ``tags`` (the rules
    of :func:`~monai_medmerge.dicom.labels.filter_series`); a study with several is reported under
    ``"several_candidate_series"`` and one with none under ``"studies_without_series"``. The chosen series are
    retrieved into ``source``'s cache (a failure is listed under ``"failed"`` and the rest continue) and classified in
    one run of the bundle's inference config. When that run fails, each series is run alone, so that one unreadable
    series is listed as failed instead of stopping the others.

    Args:
        bundle_dir: an exported bundle (``configs/inference.yaml``, ``configs/metadata.json``, ``models/model.pt``),
            e.g. from ``python -m monai.bundle run export`` or ``medmerge export``.
        source: the server and its cache.
        out_dir: where ``predictions.csv`` and ``predictions.json`` are written (each atomically).
        study_uids: the studies to classify.
        query: QIDO-RS filters at study level (e.g. ``{"StudyDate": "20240101-20240131"}``); its studies are
            classified (within ``study_uids`` when both are given). ``{}`` means every study on the server.
        modality: the modality of the series to classify (``"CT"``).
        series_description: a regular expression the series' description must contain (case-insensitive).
        tags: more series conditions, keyword -> value or list of values.
        progress: show a progress bar while retrieving.
        device: a torch device for the bundle; None keeps the bundle's choice (CUDA when available).
        timeout: seconds allowed for one run of the bundle.

    Returns:
        what ``predictions.json`` holds: ``"source"`` (URL without credentials), ``"bundle"``, ``"class_names"``,
        ``"studies"`` (how many were asked for), ``"predictions"`` (one per classified study:
        ``StudyInstanceUID``, ``SeriesInstanceUID``, ``class_name``, ``class_index``, ``probabilities``
        {class name: probability}), ``"failed"`` (``StudyInstanceUID``, ``SeriesInstanceUID``, ``error``),
        ``"several_candidate_series"`` ({study: [series, ...]}), ``"studies_without_series"`` and
        ``"skipped_instances"`` (instances without pixel data). ``predictions.csv`` has the columns
        ``StudyInstanceUID, SeriesInstanceUID, class_name, class_index, prob_<class name>...``.

    Raises:
        ValueError: when neither ``study_uids`` nor ``query`` is given, or ``device`` is not a torch device here
            (checked before anything is searched or retrieved).
        FileNotFoundError, ValueError: for a folder that is not an exported bundle.
        DICOMwebAuthError, DICOMwebConnectionError: when the search cannot be done.
    """
    if study_uids is None and query is None:
        raise ValueError("give study_uids, or a query (QIDO-RS study filters; {} for every study)")
    _check_device(device)
    bundle = Path(bundle_dir).resolve()
    _config_file(bundle)
    out = output_folder(out_dir, "predictions folder")  # before the search and the download
    class_names = exported_class_names(bundle)
    if query is not None:
        found = source.search_studies(**dict(query))
        wanted = set(study_uids) if study_uids is not None else None
        studies = [s for s in found if wanted is None or s in wanted]
    else:
        studies = list(dict.fromkeys(str(s) for s in study_uids))
    records = []
    if studies:
        records = source.search_series(
            modality=modality, series_description=series_description, study_uids=studies, **dict(tags or {})
        )
    chosen, several, without = _choose_series(records, studies)
    for study, series in several.items():
        logger.warning("study %s has %d candidate series (%s); not classified", study, len(series), ", ".join(series))
    retrieved, failed, skipped = retrieve_records(source, chosen, progress=progress)

    probabilities: dict[str, list[float]] = {}
    if retrieved:
        probabilities, run_failed = _classify(bundle, retrieved, device, timeout)
        failed.extend(run_failed)
    predictions = []
    for record in retrieved:
        probs = probabilities.get(record["path"])
        if probs is None:
            continue
        if len(probs) != len(class_names):
            failed.append(
                {
                    "StudyInstanceUID": record["StudyInstanceUID"],
                    "SeriesInstanceUID": record["SeriesInstanceUID"],
                    "error": f"BundleRunError: {len(probs)} probabilities for {len(class_names)} classes",
                }
            )
            continue
        index = max(range(len(probs)), key=probs.__getitem__)
        predictions.append(
            {
                "StudyInstanceUID": record["StudyInstanceUID"],
                "SeriesInstanceUID": record["SeriesInstanceUID"],
                "class_name": class_names[index],
                "class_index": index,
                "probabilities": dict(zip(class_names, probs, strict=True)),
            }
        )
    result = {
        "source": source.safe_url,
        "bundle": str(bundle),
        "class_names": class_names,
        "studies": len(studies),
        "predictions": predictions,
        "failed": failed,
        "several_candidate_series": several,
        "studies_without_series": without,
        "skipped_instances": skipped,
    }
    write_text(out / "predictions.csv", _csv_text(predictions, class_names))
    write_json(out / "predictions.json", result)
    logger.info(
        "classified %d of %d studies (%d failed, %d with several candidate series, %d without a series); wrote %s",
        len(predictions),
        len(studies),
        len(failed),
        len(several),
        len(without),
        out / "predictions.json",
    )
    return result


def _classify(
    bundle: Path, records: Sequence[dict], device: str | None, timeout: float | None
) -> tuple[dict[str, list[float]], list[dict]]:
    """Probabilities per series folder; one run for all, then one run per series if that fails."""
    with tempfile.TemporaryDirectory(prefix="medmerge-infer-") as work:
        paths = [r["path"] for r in records]
        try:
            return run_inference_bundle(bundle, paths, Path(work) / "all", device, timeout), []
        except BundleRunError as e:
            if len(records) == 1:
                return {}, [_failure(records[0], e)]
            logger.warning("the bundle failed on the %d series together; running each alone", len(records))
        results: dict[str, list[float]] = {}
        failed = []
        for i, record in enumerate(records):
            try:
                results.update(run_inference_bundle(bundle, [record["path"]], Path(work) / str(i), device, timeout))
            except BundleRunError as e:
                failed.append(_failure(record, e))
        return results, failed


def _failure(record: Mapping[str, Any], error: BaseException) -> dict[str, Any]:
    # the bundle's output is long: keep the first exception of its traceback, the root cause of a chain (MONAI wraps
    # a transform's error in "applying transform" and that in "Failed to evaluate ConfigExpression")
    text = getattr(error, "output", "") or str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    start = next((i for i, line in enumerate(lines) if line.startswith("Traceback")), 0)
    raised = [line for line in lines[start:] if _EXCEPTION_LINE.match(line)]
    message = describe_error(BundleRunError((raised or lines[-1:] or [""])[0]))
    logger.warning(
        "series %s of study %s not classified: %s", record["SeriesInstanceUID"], record["StudyInstanceUID"], message
    )
    return {
        "StudyInstanceUID": record["StudyInstanceUID"],
        "SeriesInstanceUID": record["SeriesInstanceUID"],
        "error": message,
    }


def _csv_text(predictions: Sequence[Mapping[str, Any]], class_names: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        ["StudyInstanceUID", "SeriesInstanceUID", "class_name", "class_index", *(f"prob_{c}" for c in class_names)]
    )
    for p in predictions:
        writer.writerow(
            [
                p["StudyInstanceUID"],
                p["SeriesInstanceUID"],
                p["class_name"],
                p["class_index"],
                *(f"{p['probabilities'][c]:.6g}" for c in class_names),
            ]
        )
    return buffer.getvalue()

"""What an exported bundle's inference needs beyond MONAI: a predictions table a person can open, and inputs that
cannot be read listed instead of stopping the run.

An exported bundle carries this file, byte for byte, as ``scripts/medmerge_inference.py`` (beside
``scripts/medmerge_transforms.py``, the copy of ``monai_medmerge/data/transforms.py``), so it imports only MONAI,
torch, numpy, the standard library and that sibling. Its ``configs/inference.yaml`` uses it like this:

- :class:`ReadableDataset` is MONAI's ``Dataset`` that, for an input whose loading or checking raises
  ``BadImageError``, gives a marker with the file and the reason instead of raising; :func:`collate_readable` takes
  the markers out of the batch and carries them, under :data:`UNREADABLE_KEY`, to the main process (data loader
  workers included), where :meth:`UnreadableInputs.iterate`, the evaluator's ``iteration_update``, records them and
  runs the evaluator's own iteration on what is left (nothing, for a batch of unreadable inputs only). Every readable
  input is classified.
- :meth:`UnreadableInputs.finish` writes the recorded inputs to ``<output_dir>/unreadable.csv`` after the run and,
  when there were any, ends the process with status 1 and one line that says what happened.
- :class:`PredictionsCSVWriter` writes ``<output_dir>/predictions.csv``: a header row (``file`` and one column per
  class name), then one row per classified input; or, with ``csv_format="monai"``, the rows of MONAI's
  ``ClassificationSaver`` (no header; the path, then the probabilities).
- :class:`DicomSegWriter` (segmentation) writes the mask of each DICOM series input also as a DICOM Segmentation
  object that references the series, when ``highdicom`` is installed.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import sys
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import Dataset, list_data_collate
from monai.utils import IgniteInfo, ImageMetaKey, min_version, optional_import

if (__package__ or "").split(".")[0] == "monai_medmerge":
    from monai_medmerge.data.transforms import find_bad_image_error
else:  # in an exported bundle: the copy of the transforms beside this file, scripts/medmerge_transforms.py
    from .medmerge_transforms import find_bad_image_error

Events, _ = optional_import("ignite.engine", IgniteInfo.OPT_IMPORT_VERSION, min_version, "Events")

__all__ = [
    "CSV_FORMATS",
    "UNREADABLE_KEY",
    "DicomSegWriter",
    "PredictionsCSVWriter",
    "ReadableDataset",
    "UnreadableInputs",
    "collate_readable",
]

CSV_FORMATS = ("medmerge", "monai")
# the key of a marker item / a batch entry that holds (file, reason) pairs of unreadable inputs
UNREADABLE_KEY = "medmerge_unreadable"
logger = logging.getLogger(__name__)


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file beside it: a reader never sees half a table.

    Not ``monai_medmerge.io.write_text``: this module ships inside exported bundles, where the package is absent.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


class UnreadableInputs:
    """The inputs of a run that could not be read, with the reason for each.

    Args:
        output_dir: the run's output folder; the report is ``<output_dir>/<filename>``.
        filename: the report's file name.

    Attributes:
        items: ``(file, reason)`` pairs in the order they were met.
    """

    def __init__(self, output_dir: str | os.PathLike, filename: str = "unreadable.csv") -> None:
        self.path = Path(output_dir) / filename
        self.items: list[tuple[str, str]] = []

    def add(self, file: str, reason: str) -> None:
        """Record one input that could not be read (and log it as a warning)."""
        self.items.append((str(file), str(reason)))
        logger.warning(f"unreadable input, no prediction: {file}: {reason}")

    def iterate(self, engine: Any, batch: Any) -> Any:
        """``iteration_update`` of a ``SupervisedEvaluator``: record the unreadable inputs a batch of
        :func:`collate_readable` carries, then run the evaluator's own iteration on the rest (none: skipped)."""
        if isinstance(batch, dict):
            for file, reason in batch.pop(UNREADABLE_KEY, ()):
                self.add(file, reason)
        if not batch:
            return None
        return engine._iteration(engine, batch)

    def write(self) -> Path:
        """Write the report, ``file,reason`` and one row per unreadable input (only the header when there is none),
        and return its path."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["file", "reason"])
        writer.writerows(self.items)
        _write_atomically(self.path, buffer.getvalue())
        return self.path

    def finish(self, total: int | None = None, predictions: str | os.PathLike | None = None) -> Path:
        """Write the report; then, when any input was unreadable, end the process with status 1 and one line that
        names the first one, the report and where the other predictions are.

        Args:
            total: how many inputs the run had, for the message.
            predictions: the predictions file, for the message.

        Returns:
            the report's path, when every input was read.

        Raises:
            SystemExit: (status 1) when any input was unreadable; everything is written before.
        """
        path = self.write()
        if not self.items:
            return path
        n = len(self.items)
        of = f" of {total}" if total is not None else ""
        first_file, first_reason = self.items[0]
        where = f"; the predictions of the others are in {predictions}" if predictions else ""
        sys.exit(
            f"{n}{of} input(s) could not be read and have no prediction (the first: {first_file}: {first_reason}); "
            f"all of them, with the reason, are listed in {path}{where}"
        )


class ReadableDataset(Dataset):
    """MONAI's ``Dataset`` that gives ``{UNREADABLE_KEY: [(file, reason)]}`` for an input whose transform raises
    ``BadImageError``, instead of raising.

    Other errors are raised as they are: only an image that cannot be used (unreadable, truncated, the wrong number
    of channels, ...) is skipped. Use with :func:`collate_readable` and :meth:`UnreadableInputs.iterate`.

    Args:
        data: the datalist, dicts with ``image_key``.
        transform: the preprocessing.
        image_key: the key of the input's path in an item.
    """

    def __init__(
        self, data: Sequence[Mapping[Hashable, Any]], transform: Callable | None, image_key: str = "image"
    ) -> None:
        super().__init__(data=data, transform=transform)
        self.image_key = image_key

    def _transform(self, index: int) -> Any:
        try:
            return super()._transform(index)
        except Exception as e:
            bad = find_bad_image_error(e)
            if bad is None:
                raise
            item = self.data[index]
            file = str(item.get(self.image_key, bad.path)) if isinstance(item, Mapping) else bad.path
            # the reason names the file inside when it is not the input itself (a slice of a series)
            reason = bad.reason if os.path.abspath(bad.path) == os.path.abspath(file) else f"{bad.path}: {bad.reason}"
            return {UNREADABLE_KEY: [(file, reason)]}


def _is_unreadable(item: Any) -> bool:
    return isinstance(item, Mapping) and UNREADABLE_KEY in item


def collate_readable(batch: Sequence[Any]) -> dict:
    """MONAI's ``list_data_collate`` of the readable items of ``batch``, with the ``(file, reason)`` pairs of the
    unreadable ones under :data:`UNREADABLE_KEY` (when there are any); an empty dict and those pairs when no item
    was readable."""
    readable = [item for item in batch if not _is_unreadable(item)]
    unreadable = [pair for item in batch if _is_unreadable(item) for pair in item[UNREADABLE_KEY]]
    collated = list_data_collate(readable) if readable else {}
    if unreadable:
        collated[UNREADABLE_KEY] = unreadable
    return collated


class PredictionsCSVWriter:
    """An Ignite handler that writes a classifier's probabilities to a CSV table when the run completes.

    ``csv_format="medmerge"`` (the default) writes a header row, ``file`` then one column per class name, then one
    row per input: its path and one probability per class (7 significant digits), quoted where a path holds a comma,
    as a spreadsheet opens it. ``csv_format="monai"`` writes what MONAI's ``ClassificationSaver`` writes: no header,
    each row the path then the probabilities (Python's ``str`` of each), unquoted.

    Rows come from the evaluator's decollated ``engine.state.batch`` (the path is the metadata's
    ``filename_or_obj``) and ``engine.state.output`` (the ``pred_key`` entry); an iteration without output (every
    input of the batch unreadable) adds nothing.

    Args:
        output_dir: the folder of the table (created when missing).
        class_names: one name per output channel, in output order.
        filename: the table's file name.
        csv_format: ``"medmerge"`` or ``"monai"``.
        image_key: the key of the input image in a batch item.
        pred_key: the key of the probabilities in an output item.

    Raises:
        ValueError: for an unknown ``csv_format``; when the run completes, for an output whose length is not the
            number of classes.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        class_names: Sequence[str],
        filename: str = "predictions.csv",
        csv_format: str = "medmerge",
        image_key: str = "image",
        pred_key: str = "pred",
    ) -> None:
        if csv_format not in CSV_FORMATS:
            raise ValueError(
                f"csv_format {csv_format!r} is not supported; choose 'medmerge' (a header row: file and the class "
                "names) or 'monai' (MONAI's ClassificationSaver format, no header)"
            )
        self.path = Path(output_dir) / filename
        self.class_names = [str(c) for c in class_names]
        self.csv_format = csv_format
        self.image_key = image_key
        self.pred_key = pred_key
        self.rows: list[tuple[str, np.ndarray]] = []

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.COMPLETED, self.finalize)

    def reset(self, engine: Any = None) -> None:
        self.rows = []

    def collect(self, engine: Any) -> None:
        outputs = engine.state.output
        if not outputs:
            return
        batch = engine.state.batch
        if isinstance(outputs, Mapping):  # not decollated
            raise ValueError("PredictionsCSVWriter needs the evaluator's decollated output (decollate=True)")
        for item, output in zip(batch, outputs, strict=True):
            image = item[self.image_key]
            meta = getattr(image, "meta", None) or item.get(f"{self.image_key}_meta_dict", {})
            name = meta.get(ImageMetaKey.FILENAME_OR_OBJ, str(len(self.rows)))
            pred = output[self.pred_key]
            pred = pred.detach().cpu().numpy() if isinstance(pred, torch.Tensor) else np.asarray(pred)
            self.rows.append((str(name), np.asarray(pred, dtype=float).reshape(-1)))

    def text(self) -> str:
        """The table as it is written."""
        buffer = io.StringIO()
        if self.csv_format == "monai":
            for name, values in self.rows:
                buffer.write(name + "".join("," + str(v) for v in values) + "\n")
            return buffer.getvalue()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["file", *self.class_names])
        for name, values in self.rows:
            if len(values) != len(self.class_names):
                raise ValueError(f"{name}: the network gave {len(values)} outputs for {len(self.class_names)} classes")
            writer.writerow([name, *(f"{v:.7g}" for v in values)])
        return buffer.getvalue()

    def finalize(self, engine: Any = None) -> Path:
        """Write the table (atomically) and return its path."""
        _write_atomically(self.path, self.text())
        logger.info(f"predictions of {len(self.rows)} input(s) written to {self.path}")
        return self.path


class DicomSegWriter:
    """An Ignite handler that writes the mask of every DICOM series input as a DICOM Segmentation object.

    Needs ``highdicom`` (and so pydicom); without it the handler logs once that no DICOM SEG is written and does
    nothing else (the NIfTI masks are written either way). Inputs that are not a folder of DICOM files are left to
    the NIfTI writer. For each series the mask (the evaluator's decollated ``pred_key`` output, already mapped back
    to the input's space, with its affine in RAS millimetres) is sampled at the centre of every pixel of every slice
    of the series (nearest voxel, from each slice's ImagePositionPatient, ImageOrientationPatient and PixelSpacing),
    so the frames follow the slices whatever the order in which the reader stacked them. The object is written as
    ``<output_dir>/<series folder name>_seg.dcm``: one segment per foreground label (``label_names[1:]``, segment
    number = label value), binary, referencing the source instances.

    Args:
        output_dir: the folder of the objects (created when missing).
        label_names: one name per label value, background (0) first.
        image_key: the key of the input image in a batch item.
        pred_key: the key of the mask in an output item.
        algorithm: the algorithm name recorded in the object.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        label_names: Sequence[str],
        image_key: str = "image",
        pred_key: str = "pred",
        algorithm: str = "merged network (monai_medmerge)",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.label_names = [str(n) for n in label_names]
        self.image_key, self.pred_key = image_key, pred_key
        self.algorithm = algorithm
        self.written: list[Path] = []
        self._highdicom, self._available = optional_import("highdicom")
        self._warned = False

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)

    def collect(self, engine: Any) -> None:
        outputs = engine.state.output
        if not outputs:
            return
        for item, output in zip(engine.state.batch, outputs, strict=True):
            meta = getattr(item[self.image_key], "meta", {})
            source = Path(str(meta.get(ImageMetaKey.FILENAME_OR_OBJ, "")))
            if not source.is_dir():
                continue
            if not self._available:
                if not self._warned:
                    logger.warning("highdicom is not installed: masks of DICOM series are written as NIfTI only")
                    self._warned = True
                return
            mask = output[self.pred_key]
            affine = np.asarray(getattr(mask, "affine", meta.get("affine")), dtype=float)
            self.written.append(self.write(np.asarray(mask.detach().cpu()).reshape(mask.shape[-3:]), affine, source))

    def write(self, mask: np.ndarray, affine: np.ndarray, series: Path) -> Path:
        """Write ``mask`` (a 3-D label map with ``affine`` from voxel index to RAS mm) as the Segmentation of the
        DICOM series in the folder ``series``; returns the file."""
        # pydicom comes with highdicom; imported only here, so that the module itself needs neither
        pydicom, _ = optional_import("pydicom")
        codes, _ = optional_import("pydicom.sr.codedict", name="codes")
        generate_uid, _ = optional_import("pydicom.uid", name="generate_uid")
        invalid_dicom, _ = optional_import("pydicom.errors", name="InvalidDicomError")
        hd = self._highdicom
        datasets = []
        for f in sorted(p for p in series.iterdir() if p.is_file()):
            try:
                datasets.append(pydicom.dcmread(f))
            except invalid_dicom:
                continue
        frames = np.stack([_sample_slice(mask, affine, ds) for ds in datasets]).astype(np.uint8)
        algorithm = hd.AlgorithmIdentificationSequence(
            name=self.algorithm, version="1", family=codes.cid7162.ArtificialIntelligence
        )
        segments = [
            hd.seg.SegmentDescription(
                segment_number=value,
                segment_label=name[:64],
                segmented_property_category=codes.SCT.Tissue,
                segmented_property_type=codes.SCT.Tissue,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
            )
            for value, name in enumerate(self.label_names)
            if value > 0
        ]
        seg = hd.seg.Segmentation(
            source_images=datasets,
            pixel_array=frames,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments,
            series_instance_uid=generate_uid(),
            series_number=900,
            sop_instance_uid=generate_uid(),
            instance_number=1,
            manufacturer="monai_medmerge",
            manufacturer_model_name="merged segmentation network",
            software_versions="1",
            device_serial_number="0",
            series_description="MedMerge segmentation",
            omit_empty_frames=False,
        )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / f"{series.name}_seg.dcm"
        tmp = path.with_name(path.name + ".tmp")
        seg.save_as(tmp)
        os.replace(tmp, path)
        logger.info(f"DICOM SEG of {series} written to {path}")
        return path


def _sample_slice(mask: np.ndarray, affine: np.ndarray, ds: Any) -> np.ndarray:
    """The label of the voxel of ``mask`` nearest to the centre of every pixel of the DICOM slice ``ds`` (0 outside
    the mask)."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    origin = np.asarray(ds.ImagePositionPatient, dtype=float)
    orientation = np.asarray(ds.ImageOrientationPatient, dtype=float)
    row_dir, col_dir = orientation[:3], orientation[3:]  # along a row (columns increase), along a column
    row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
    i, j = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    lps = origin + j[..., None] * col_spacing * row_dir + i[..., None] * row_spacing * col_dir
    ras = lps * np.array([-1.0, -1.0, 1.0])
    index = np.rint(
        (np.linalg.inv(affine) @ np.concatenate([ras, np.ones((rows, cols, 1))], -1)[..., None])[..., :3, 0]
    ).astype(int)
    inside = np.all((index >= 0) & (index < np.asarray(mask.shape)), axis=-1)
    out = np.zeros((rows, cols), dtype=mask.dtype)
    out[inside] = mask[tuple(index[inside].T)]
    return out

"""MONAI transforms that load medical images with one named reader and refuse bad data loudly.

MONAI's ``LoadImaged(reader="NibabelReader")`` registers every installed reader and, when the named one raises,
quietly tries the others (it logs the failure at INFO level only), so a PNG given to a NIfTI pipeline loads anyway.
``ITKReader`` leaves an unreadable slice out of a DICOM series with nothing but a C++ warning on stderr and then
reports the average slice gap as the spacing; ``PydicomReader`` does the same with a Python warning. For training
data these are silent errors: :class:`CheckedLoadImaged` calls the one reader object directly and turns every
failure, and every series whose slice count or slice spacing does not add up, into a :class:`BadImageError` that
names the file and the problem.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import DtypeLike, KeysCollection
from monai.data import MetaTensor
from monai.data.image_reader import ITKReader, NibabelReader, PILReader, PydicomReader
from monai.transforms import EnsureChannelFirst, InvertibleTransform, MapTransform, Orientation, SqueezeDim
from monai.transforms.io.array import switch_endianness
from monai.utils import (
    ImageMetaKey,
    OptionalImportError,
    TraceKeys,
    convert_to_dst_type,
    ensure_tuple,
    ensure_tuple_rep,
    optional_import,
)

__all__ = [
    "READERS",
    "READER_PACKAGES",
    "SERIES_READERS",
    "BadImageError",
    "as_class_label",
    "check_complete",
    "find_bad_image_error",
    "CheckedLabelMapd",
    "CheckedLoadImaged",
    "ClassLabeld",
    "ImageChannelsd",
    "MatchSpatialDimsd",
    "OrientToRASd",
    "series_files",
]

READERS = ("PILReader", "NibabelReader", "PydicomReader", "ITKReader")
# Only these two read a folder, as a DICOM series.
SERIES_READERS = ("PydicomReader", "ITKReader")
_READER_CLASSES = {"PILReader": PILReader, "NibabelReader": NibabelReader, "PydicomReader": PydicomReader}
READER_PACKAGES = {"PILReader": "pillow", "NibabelReader": "nibabel", "PydicomReader": "pydicom", "ITKReader": "itk"}
_READER_MODULES = {"PILReader": "PIL.Image", "NibabelReader": "nibabel", "PydicomReader": "pydicom", "ITKReader": "itk"}
# What verify_suffix accepts, for the error message (ITKReader and PydicomReader accept any name).
_READER_SUFFIXES = {"PILReader": ".png, .jpg, .jpeg, .bmp", "NibabelReader": ".nii, .nii.gz"}
# Index files that sit beside slices without being one.
_NOT_SLICES = ("dicomdir",)
_ITK_DEVIATION_KEY = "ITK_non_uniform_sampling_deviation"
# Error messages quote this much of a reader's own exception text.
_MAX_REASON = 300
MAX_NAMES = 5
# ITU-R BT.601 luma, the weights of PIL's convert("L").
_LUMA = (0.299, 0.587, 0.114)


class BadImageError(ValueError):
    """An image (file or DICOM series folder) that cannot be used, with the path and the reason.

    Args:
        path: the file or folder.
        reason: what is wrong with it, in words.
        series: whether ``path`` is a DICOM series folder; the message then starts with ``series``.

    Attributes:
        path: the file or folder, as a string.
        reason: what is wrong with it.
    """

    def __init__(self, path: Any, reason: str, series: bool = False) -> None:
        self.path = str(path)
        self.reason = reason
        self.series = series
        super().__init__(f"{'series ' if series else ''}{self.path}: {reason}")

    def __reduce__(self):
        # Exceptions pickle their args by default; ours has three, so DataLoader workers need this to send it back.
        return (type(self), (self.path, self.reason, self.series))


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if len(text) > _MAX_REASON:
        text = text[: _MAX_REASON - 3] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _first_names(names: Sequence[str], limit: int = MAX_NAMES) -> str:
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f" (and {len(names) - limit} more)"
    return shown


def series_files(folder: str | os.PathLike[str]) -> list[Path]:
    """The files of a DICOM series folder that count as slices: every regular file directly in it.

    Hidden files (name starting with ``.``) and ``DICOMDIR`` index files are left out; anything else counts, even a
    file that is not DICOM at all, because a slice whose header was cut off no longer looks like DICOM and must
    still be noticed.

    Args:
        folder: the series folder.

    Returns:
        the files, sorted by name.
    """
    return sorted(
        p
        for p in Path(folder).iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower() not in _NOT_SLICES
    )


def _check_reader_name(reader: Any) -> str:
    if not isinstance(reader, str) or reader not in READERS:
        raise ValueError(f"reader {reader!r} is not supported; choose one of {', '.join(READERS)}")
    return reader


class CheckedLoadImaged(MapTransform):
    """Load images with exactly one named MONAI reader, never falling back to another, and check what was read.

    Unlike ``monai.transforms.LoadImaged``, a failure of the named reader is not followed by attempts with other
    readers: the reader object's ``verify_suffix``, ``read`` and ``get_data`` are called directly and any failure
    raises :class:`BadImageError`. The output is the same ``MetaTensor`` that ``LoadImaged`` gives.

    A folder is read as a DICOM series (``ITKReader`` or ``PydicomReader`` only) and checked: it must hold at least
    one file, the number of slices read must equal the number of files in it (see :func:`series_files`; both readers
    silently leave out a slice they cannot parse), and the slices must be evenly spaced (a missing slice leaves a
    gap). A folder with a single file may hold a multi-frame file. ``PydicomReader`` refuses multi-frame files
    because it stacks their frames on the wrong axis; read them with ``ITKReader``.

    Args:
        keys: keys of the items to load; each value is a file or a DICOM series folder.
        reader: the one reader to use: ``"PILReader"``, ``"NibabelReader"``, ``"PydicomReader"`` or ``"ITKReader"``.
        image_only: if True the key gets the ``MetaTensor`` only; otherwise its metadata dict is also stored under
            ``meta_keys`` or ``{key}_{meta_key_postfix}``.
        ensure_channel_first: move or add the channel axis first, as ``EnsureChannelFirst`` does.
        dtype: data type of the loaded array; ``None`` keeps the reader's.
        check_suffix: refuse files whose name the reader does not claim (``verify_suffix``); only ``PILReader``
            (``.png``, ``.jpg``, ``.jpeg``, ``.bmp``) and ``NibabelReader`` (``.nii``, ``.nii.gz``) look at names.
        spacing_tolerance: largest allowed deviation of a series' slice gaps from their mean, relative to the mean
            gap; ``None`` skips the check. A missing slice makes one gap about twice the others (a deviation near 1).
        meta_keys: explicit keys for the metadata dicts when ``image_only`` is False.
        meta_key_postfix: postfix of the metadata key, ``{key}_{meta_key_postfix}``, when ``meta_keys`` is None.
        overwriting: whether an existing metadata key may be overwritten.
        simple_keys: remove redundant metadata keys, as in ``LoadImage``.
        prune_meta_pattern: regular expression of metadata keys to delete, as in ``LoadImage``.
        prune_meta_sep: separator of nested metadata keys for ``prune_meta_pattern``.
        allow_missing_keys: do not raise when a key is missing from the data.
        reader_kwargs: passed to the reader's constructor (for example ``series_name`` for ``ITKReader``).

    Raises:
        ValueError: at construction, for an unknown reader or arguments the reader does not take.
        OptionalImportError: at construction, when the reader's package is not installed.
        BadImageError: when called, for a path that does not exist, a file the reader does not claim or cannot
            read, a folder given to a reader of single files, an empty folder, a series whose slice count differs
            from its file count or whose slices are unevenly spaced, an empty image or non-finite values.
    """

    def __init__(
        self,
        keys: KeysCollection,
        reader: str,
        image_only: bool = True,
        ensure_channel_first: bool = True,
        dtype: DtypeLike | None = np.float32,
        check_suffix: bool = True,
        spacing_tolerance: float | None = 0.1,
        meta_keys: KeysCollection | None = None,
        meta_key_postfix: str = "meta_dict",
        overwriting: bool = False,
        simple_keys: bool = False,
        prune_meta_pattern: str | None = None,
        prune_meta_sep: str = ".",
        allow_missing_keys: bool = False,
        **reader_kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reader_name = _check_reader_name(reader)
        _, has_package = optional_import(_READER_MODULES[reader])
        if not has_package:
            raise OptionalImportError(
                f"{reader} needs {READER_PACKAGES[reader]}: pip install {READER_PACKAGES[reader]}, "
                "or the extra monai_medmerge[io]"
            )
        if spacing_tolerance is not None and not spacing_tolerance > 0:
            raise ValueError(f"spacing_tolerance must be positive or None, got {spacing_tolerance!r}")
        self.reader_kwargs = dict(reader_kwargs)
        try:
            self._new_reader()
        except TypeError as e:
            raise ValueError(f"{reader} does not take the arguments {sorted(reader_kwargs)}: {e}") from e
        self.image_only = image_only
        self.ensure_channel_first = ensure_channel_first
        self.dtype = dtype
        self.check_suffix = check_suffix
        self.spacing_tolerance = spacing_tolerance
        self.meta_keys = (None,) * len(self.keys) if meta_keys is None else tuple(meta_keys)
        if len(self.meta_keys) != len(self.keys):
            raise ValueError(f"meta_keys has {len(self.meta_keys)} entries, keys has {len(self.keys)}")
        self.meta_key_postfix = ensure_tuple_rep(meta_key_postfix, len(self.keys))
        self.overwriting = overwriting
        self.simple_keys = simple_keys
        self.prune_meta_pattern = prune_meta_pattern
        self.prune_meta_sep = prune_meta_sep

    def _new_reader(self):
        # A fresh reader per image: PydicomReader keeps per-read state (filenames, has_series), so one shared
        # object is not safe under a threaded data loader.
        if self.reader_name == "ITKReader":
            return ITKReader(**self.reader_kwargs)
        return _READER_CLASSES[self.reader_name](**self.reader_kwargs)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key, meta_key, meta_key_postfix in self.key_iterator(d, self.meta_keys, self.meta_key_postfix):
            img = self.load(d[key])
            d[key] = img
            if not self.image_only:
                meta_key = meta_key or f"{key}_{meta_key_postfix}"
                if meta_key in d and not self.overwriting:
                    raise KeyError(f"metadata key {meta_key!r} already exists and overwriting=False")
                d[meta_key] = dict(img.meta)
        return d

    def load(self, path: Any) -> MetaTensor:
        """Load one file or DICOM series folder into a ``MetaTensor``.

        Args:
            path: the file or folder.

        Returns:
            the image, channel first when ``ensure_channel_first``, with the reader's metadata and
            ``filename_or_obj`` set to ``path``.

        Raises:
            BadImageError: as described for the class.
        """
        if not isinstance(path, (str, os.PathLike)):
            raise BadImageError(repr(path), f"expected one file or folder path, got a {type(path).__name__}")
        path = Path(path).expanduser()
        if not path.exists():
            raise BadImageError(path, "does not exist")
        if path.is_dir():
            array, meta = self._read_series(path)
        else:
            array, meta = self._read_file(path)
        return self._to_meta_tensor(path, array, meta)

    def _read_file(self, path: Path) -> tuple[np.ndarray, dict]:
        name = self.reader_name
        reader = self._new_reader()
        if self.check_suffix and not reader.verify_suffix(str(path)):
            raise BadImageError(
                path,
                f"{name} reads {_READER_SUFFIXES.get(name, 'other files')}, not {path.name!r}; choose the reader "
                "for this format (no other reader is tried), or pass check_suffix=False",
            )
        check_complete(path)
        try:
            raw = reader.read(str(path))
        except Exception as e:
            raise BadImageError(path, f"{name} cannot read it: {_describe(e)}") from e
        if name == "PydicomReader":
            _refuse_multiframe(path, raw)
        return self._get_data(path, reader, raw)

    def _read_series(self, folder: Path) -> tuple[np.ndarray, dict]:
        name = self.reader_name
        if name not in SERIES_READERS:
            raise BadImageError(
                folder,
                f"is a folder, and {name} reads single files; a DICOM series folder needs "
                f"{' or '.join(SERIES_READERS)}",
            )
        files = series_files(folder)
        if not files:
            subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir())
            if subfolders:
                raise BadImageError(
                    folder,
                    f"the folder holds no files, only folders ({_first_names(subfolders)}); "
                    "give the folder of one series itself",
                    series=True,
                )
            raise BadImageError(folder, "the folder is empty: it holds no DICOM files", series=True)
        reader = self._new_reader()
        try:
            raw = reader.read(str(folder))
        except Exception as e:
            raise BadImageError(
                folder, f"{name} read no DICOM series from its {len(files)} file(s): {_describe(e)}", series=True
            ) from e
        if name == "PydicomReader":
            if not isinstance(raw, list):
                _refuse_multiframe(folder, raw, series=True)
            n_read = len(raw) if isinstance(raw, list) else 1
            if len(files) > 1 and n_read != len(files):
                loaded = {Path(f).resolve() for f in ensure_tuple(reader.filenames[0])}
                unread = [p.name for p in files if p.resolve() not in loaded]
                raise BadImageError(folder, self._count_reason(len(files), n_read, folder, files, unread), series=True)
        try:
            array, meta = self._get_data(folder, reader, raw, series=True)
        except BadImageError as e:
            slice_name = _undecodable_slice(raw) if name == "PydicomReader" else None
            if slice_name is None:
                raise
            raise BadImageError(folder, f"slice {slice_name}: {e.reason}", series=True) from e.__cause__
        shape = tuple(int(s) for s in np.atleast_1d(meta.get("spatial_shape", array.shape)))
        n_slices = shape[2] if len(shape) >= 3 else 1
        if len(files) > 1 and n_slices != len(files):
            raise BadImageError(folder, self._count_reason(len(files), n_slices, folder, files), series=True)
        if len(files) > 1 and self.spacing_tolerance is not None:
            if name == "ITKReader":
                self._check_itk_spacing(folder, raw)
            else:
                self._check_pydicom_spacing(folder, raw)
        return array, meta

    def _count_reason(
        self, n_files: int, n_slices: int, folder: Path, files: Sequence[Path], unread: Sequence[str] = ()
    ) -> str:
        reason = f"{n_files} files but {n_slices} slices were read"
        n_series = 0
        if self.reader_name == "ITKReader":
            unread, n_series = _itk_unread_files(folder, files, self.reader_kwargs.get("series_name", ""))
        if unread:
            reason += f"; not read: {_first_names(unread)}"
        if n_series > 1:
            reason += f"; the folder holds {n_series} DICOM series (give each its own folder)"
        return reason + " (a corrupt or non-DICOM file, or a second series, in the folder)"

    def _check_itk_spacing(self, folder: Path, image: Any) -> None:
        meta = image.GetMetaDataDictionary()
        if not meta.HasKey(_ITK_DEVIATION_KEY):
            return
        deviation = float(meta[_ITK_DEVIATION_KEY])
        gap = float(image.GetSpacing()[2])
        self._raise_uneven(folder, deviation, gap)

    def _check_pydicom_spacing(self, folder: Path, datasets: Any) -> None:
        if not isinstance(datasets, list) or len(datasets) < 3:
            return
        try:
            ordered = sorted(datasets, key=lambda ds: int(ds.InstanceNumber))
            orientation = np.asarray(ordered[0].ImageOrientationPatient, dtype=float)
            normal = np.cross(orientation[:3], orientation[3:])
            positions = np.asarray([np.dot(normal, np.asarray(ds.ImagePositionPatient, dtype=float)) for ds in ordered])
        except (AttributeError, TypeError, ValueError):
            return  # without positions there is nothing to compare; PydicomReader already stacked by InstanceNumber
        gaps = np.diff(positions)
        mean_gap = float(np.mean(gaps))
        if np.any(np.sign(gaps) != np.sign(mean_gap)) or mean_gap == 0:
            raise BadImageError(
                folder,
                "slice positions are not in InstanceNumber order, so PydicomReader would stack them out of place",
                series=True,
            )
        self._raise_uneven(folder, float(np.max(np.abs(gaps - mean_gap))), abs(mean_gap))

    def _raise_uneven(self, folder: Path, deviation: float, gap: float) -> None:
        if gap > 0 and deviation > self.spacing_tolerance * gap:
            raise BadImageError(
                folder,
                f"slices are not evenly spaced: gaps deviate by up to {deviation:.4g} mm from their mean "
                f"{gap:.4g} mm (a slice is missing or out of place)",
                series=True,
            )

    def _get_data(self, path: Path, reader: Any, raw: Any, series: bool = False) -> tuple[np.ndarray, dict]:
        try:
            array, meta = reader.get_data(raw)
        except Exception as e:
            raise BadImageError(
                path, f"{self.reader_name} cannot decode its pixel data: {_describe(e)}", series=series
            ) from e
        array = np.asarray(array)
        if array.size == 0:
            raise BadImageError(path, f"the image is empty (shape {tuple(array.shape)})", series=series)
        if np.issubdtype(array.dtype, np.inexact):
            n_bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            if n_bad:
                raise BadImageError(path, f"{n_bad} of {array.size} values are NaN or Inf", series=series)
        return array, meta

    def _to_meta_tensor(self, path: Path, array: np.ndarray, meta: dict) -> MetaTensor:
        # The same steps as monai.transforms.LoadImage.__call__ after its reader has been chosen.
        if self.dtype is not None:
            array = convert_to_dst_type(array, dst=array, dtype=self.dtype)[0]
        meta = switch_endianness(meta, "<")
        meta[ImageMetaKey.FILENAME_OR_OBJ] = str(path)
        img = MetaTensor.ensure_torch_and_prune_meta(
            array, meta, self.simple_keys, pattern=self.prune_meta_pattern, sep=self.prune_meta_sep
        )
        if self.ensure_channel_first:
            try:
                img = EnsureChannelFirst()(img, meta_dict=meta)
            except Exception as e:
                raise BadImageError(path, f"cannot find its channel axis: {_describe(e)}") from e
        return img


def _refuse_multiframe(path: Path, dataset: Any, series: bool = False) -> None:
    try:
        frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        raise BadImageError(
            path,
            f"multi-frame DICOM ({frames} frames): PydicomReader stacks frames on the wrong axis; "
            "read multi-frame files with reader='ITKReader'",
            series=series,
        )


def _undecodable_slice(datasets: Any) -> str | None:
    """The file name of the first pydicom dataset whose pixel data does not decode, or None."""
    for ds in datasets if isinstance(datasets, list) else [datasets]:
        try:
            ds.pixel_array  # noqa: B018 - decoding is the check
        except Exception:
            return Path(str(getattr(ds, "filename", "") or "?")).name
    return None


def _itk_unread_files(folder: Path, files: Sequence[Path], series_name: str) -> tuple[list[str], int]:
    """The names of ``files`` that ITK's series selection (as in ``ITKReader``) left out, and the series count."""
    itk, has_itk = optional_import("itk")
    if not has_itk:
        return [], 0
    try:
        names = itk.GDCMSeriesFileNames.New()
        names.SetUseSeriesDetails(True)
        names.AddSeriesRestriction("0008|0021")  # series date, as in ITKReader
        names.SetDirectory(str(folder))
        uids = list(names.GetSeriesUIDs())
        if not uids:
            return [p.name for p in files], 0
        used = {Path(f).resolve() for f in names.GetFileNames(series_name or uids[0])}
    except Exception:
        return [], 0  # only decorates an error message that is raised anyway
    return [p.name for p in files if p.resolve() not in used], len(uids)


# --- files whose data ends early --------------------------------------------------------------------------------
# Readers differ on a file cut short: nibabel and PIL raise, but ITK fills a NIfTI, JPEG or BMP with zeros where the
# data ended and only prints a C++ warning. So the file itself is checked against what its own header promises,
# with the standard library only, whichever reader reads it. Formats are told by their first bytes, not the name.
_GZIP_MAGIC = b"\x1f\x8b"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_NIFTI2_MAGIC = b"n+2\0\r\n\x1a\n"
_CHUNK = 1 << 20


class _Truncated(Exception):
    """A file that ends before the data its header describes; the message says where."""


def check_complete(path: str | os.PathLike[str]) -> None:
    """Raise :class:`BadImageError` when a file ends before the data its own header describes.

    Checked by content, whatever the file's name or the reader: gzip streams (decompressed once and counted; a
    stream cut short or failing its CRC), NIfTI-1 and NIfTI-2 single files (``n+1``/``n+2``, plain or gzipped: the
    voxel data that ``dim`` and ``bitpix`` describe must fit after ``vox_offset``), PNG (every chunk up to ``IEND``
    present), JPEG (an end-of-image marker after the first scan) and uncompressed BMP (every pixel row present).
    Other files are left to their reader. Only reads the file.

    Args:
        path: the file.

    Raises:
        BadImageError: for a file whose data ends early; the reason starts with ``truncated``.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(540)
            if head.startswith(_GZIP_MAGIC):
                _check_gzip(path)
            elif head.startswith(_PNG_MAGIC):
                _check_png(f, path.stat().st_size)
            elif head.startswith(_JPEG_MAGIC):
                _check_jpeg(head + f.read())
            elif head.startswith(b"BM"):
                _check_bmp(head, path.stat().st_size)
            else:
                _check_nifti(head, path.stat().st_size, "the file")
    except _Truncated as e:
        raise BadImageError(path, f"truncated: {e}") from None
    except OSError as e:
        raise BadImageError(path, f"cannot be read: {_describe(e)}") from e


def _check_gzip(path: Path) -> None:
    head, size = b"", 0
    try:
        with gzip.open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                if len(head) < 540:
                    head += chunk[: 540 - len(head)]
                size += len(chunk)
    except EOFError:
        raise _Truncated("the gzip stream ends before its end-of-stream marker (the file was cut short)") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise _Truncated(f"the gzip stream is damaged: {_describe(e)}") from None
    _check_nifti(head, size, "the uncompressed data")


def _nifti_header(head: bytes) -> tuple[str, int, int, Sequence[int]] | None:
    """(version, vox_offset, bitpix, dims) of a NIfTI-1/-2 single-file header, or None for anything else."""
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348 and head[344:348] == b"n+1\0":
            dim = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            vox_offset = int(struct.unpack(endian + "f", head[108:112])[0])
            return "NIfTI-1", max(vox_offset, 352), bitpix, dim
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540 and head[4:12] == _NIFTI2_MAGIC:
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            dim = struct.unpack(endian + "8q", head[16:80])
            vox_offset = struct.unpack(endian + "q", head[168:176])[0]
            return "NIfTI-2", max(vox_offset, 544), bitpix, dim
        if len(head) < 348 and len(head) >= 4 and struct.unpack(endian + "i", head[:4])[0] in (348, 540):
            raise _Truncated(f"{len(head)} bytes, shorter than the NIfTI header it starts")
    return None


def _check_nifti(head: bytes, size: int, where: str) -> None:
    header = _nifti_header(head)
    if header is None:
        return
    version, vox_offset, bitpix, dim = header
    n_dims = dim[0]
    if not 1 <= n_dims <= 7 or bitpix <= 0 or any(d <= 0 for d in dim[1 : n_dims + 1]):
        return  # a header this odd is for the reader to refuse
    n_voxels = math.prod(dim[1 : n_dims + 1])
    expected = vox_offset + (n_voxels * bitpix + 7) // 8
    if size < expected:
        shape = "x".join(str(d) for d in dim[1 : n_dims + 1])
        raise _Truncated(
            f"its {version} header describes {shape} voxels of {bitpix} bits, {expected - vox_offset} bytes from "
            f"byte {vox_offset}, but {where} ends at byte {size} ({expected - size} bytes missing)"
        )


def _check_png(f: Any, size: int) -> None:
    offset = len(_PNG_MAGIC)
    while True:
        f.seek(offset)
        header = f.read(8)
        if len(header) < 8:
            raise _Truncated(f"the PNG ends at byte {size} without its IEND chunk")
        length, kind = struct.unpack(">I4s", header)
        end = offset + 12 + length
        if end > size:
            raise _Truncated(
                f"the PNG chunk {kind.decode('latin-1')!r} at byte {offset} needs {end} bytes, the file has {size}"
            )
        if kind == b"IEND":
            return
        offset = end


def _check_jpeg(data: bytes) -> None:
    offset = 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            return  # not a marker where one should be: for the reader to refuse
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        if marker == 0xD9:
            return
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            offset += 2
            continue
        length = struct.unpack(">H", data[offset + 2 : offset + 4])[0]
        if marker == 0xDA:  # start of scan: entropy-coded data up to the end-of-image marker
            if data.find(b"\xff\xd9", offset + 2 + length) < 0:
                raise _Truncated(f"the JPEG ends at byte {len(data)} without its end-of-image marker")
            return
        offset += 2 + length
    raise _Truncated(f"the JPEG ends at byte {len(data)} before its image data")


def _check_bmp(head: bytes, size: int) -> None:
    if len(head) < 30:
        raise _Truncated(f"{len(head)} bytes, shorter than the BMP header it starts")
    data_offset, dib_size = struct.unpack("<2I", head[10:18])
    if dib_size == 12:
        width, height, _, bits = struct.unpack("<4H", head[18:26])
        compression = 0
    elif dib_size >= 40 and len(head) >= 34:
        width, height, _, bits, compression = struct.unpack("<2i2HI", head[18:34])
    else:
        return
    if compression not in (0, 3, 6) or width <= 0 or bits <= 0:
        return  # compressed (RLE, JPEG, PNG) or odd: for the reader to refuse
    expected = data_offset + (width * bits + 31) // 32 * 4 * abs(height)
    if size < expected:
        raise _Truncated(
            f"its BMP header describes {width}x{abs(height)} pixels of {bits} bits ending at byte {expected}, "
            f"but the file ends at byte {size} ({expected - size} bytes missing)"
        )


def _image_path(data: Mapping[Hashable, Any], image_key: Hashable | None) -> str:
    if image_key is None or image_key not in data:
        return "<no image>"
    value = data[image_key]
    if isinstance(value, MetaTensor):
        return str(value.meta.get(ImageMetaKey.FILENAME_OR_OBJ, "<image>"))
    return str(value)


class ImageChannelsd(MapTransform):
    """Give a channel-first image the network's number of channels: convert a picture, or check any image.

    With ``convert`` (PNG/JPEG pictures: gray, gray+alpha, RGB, RGBA), alpha is dropped, RGB becomes gray with the
    ITU-R BT.601 weights that PIL's ``convert("L")`` uses when ``channels=1``, and gray is repeated to three
    channels when ``channels=3``. Without it (medical images, whose channels are data), an image must already have
    ``channels`` channels: a 4-D NIfTI whose fourth axis holds 3 values is a 3-channel image, and giving it to a
    1-channel network is an error that names the file, not a crash in the data loader's collate.

    Args:
        keys: keys of the channel-first images.
        channels: the number of channels out (1 or 3 with ``convert``; any positive number without).
        convert: convert pictures (``True``) or only check the count (``False``).
        allow_missing_keys: do not raise when a key is missing.

    Raises:
        ValueError: at construction, for ``channels`` that is not a positive integer, or not 1 or 3 with
            ``convert``.
        BadImageError: when called on a picture with more than 4 channels (``convert``), or on an image whose
            channel count differs from ``channels`` (no ``convert``).
    """

    def __init__(
        self, keys: KeysCollection, channels: int = 1, convert: bool = True, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if isinstance(channels, bool) or not isinstance(channels, (int, np.integer)) or channels < 1:
            raise ValueError(f"channels must be a positive integer, got {channels!r}")
        if convert and channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3 to convert a picture, got {channels!r}")
        self.channels = int(channels)
        self.convert = bool(convert)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            n = img.shape[0]
            if not self.convert:
                if n != self.channels:
                    raise BadImageError(
                        _image_path(d, key),
                        f"{n} channels (shape {tuple(img.shape)}, channel first); the network takes {self.channels}",
                    )
                continue
            if n > 4:
                raise BadImageError(_image_path(d, key), f"{n} channels; expected gray, gray+alpha, RGB or RGBA")
            color = img[:3] if n >= 3 else img[:1]  # drop alpha
            if self.channels == 1 and color.shape[0] == 3:
                weights = torch.as_tensor(_LUMA, dtype=color.dtype, device=color.device)
                color = (color * weights.view(3, *([1] * (color.ndim - 1)))).sum(0, keepdim=True)
            elif self.channels == 3 and color.shape[0] == 1:
                color = color.repeat(3, *([1] * (color.ndim - 1)))
            d[key] = color
        return d


class OrientToRASd(MapTransform, InvertibleTransform):
    """Reorient a channel-first image with an affine to RAS, using as many axis codes as it has spatial axes.

    ``Orientationd(axcodes="RAS")`` works on a 2-D image too but warns on every call; a loader may give 2-D or 3-D
    images (a single DICOM slice through ``PydicomReader`` or ``ITKReader``), so the codes are chosen per image:
    ``"RA"`` for 2-D, ``"RAS"`` for 3-D. Axis labels follow the image's ``space`` metadata (RAS for every reader
    here, which converts DICOM's LPS).

    Invertible like ``Orientationd``: the step is recorded in the ``MetaTensor``'s ``applied_operations``, so
    ``monai.transforms.Invertd`` takes a prediction back to the file's own axis order and affine.

    Args:
        keys: keys of the channel-first ``MetaTensor`` images.
        allow_missing_keys: do not raise when a key is missing.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self._orient = {n: Orientation(axcodes="RAS"[:n], labels=None) for n in (1, 2, 3)}

    def _orientation(self, d: Mapping[Hashable, Any], key: Hashable) -> Orientation:
        n = d[key].ndim - 1
        if n not in self._orient:
            raise BadImageError(_image_path(d, key), f"{n} spatial axes; only 1-D to 3-D images can be oriented")
        return self._orient[n]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._orientation(d, key)(d[key])
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            # the inverse is asked of the Orientation object that recorded the step (its id is in the record)
            d[key] = self._orientation(d, key).inverse(d[key])
        return d


class MatchSpatialDimsd(MapTransform, InvertibleTransform):
    """Make a channel-first image have ``spatial_dims`` spatial axes by dropping a singleton axis of a 3-D image.

    A single DICOM slice read by ``ITKReader``, or a 2-D NIfTI saved with a depth of one, is a 3-D image with one
    axis of size 1; a 2-D pipeline needs it 2-D. The last axis of size 1 is removed (with its row and column of the
    affine). Anything else that does not match is an error, never silently reshaped.

    Invertible: a removed axis is recorded in the ``MetaTensor``'s ``applied_operations`` with the affine before, so
    ``monai.transforms.Invertd`` gives a prediction back its singleton axis and the file's affine. An image that
    already matches is passed on as it is, with nothing recorded, and its inverse is nothing.

    Args:
        keys: keys of the channel-first images.
        spatial_dims: 2 or 3.
        allow_missing_keys: do not raise when a key is missing.

    Raises:
        ValueError: at construction, when ``spatial_dims`` is not 2 or 3.
        BadImageError: when called on an image whose spatial shape cannot be brought to ``spatial_dims`` axes.
    """

    def __init__(self, keys: KeysCollection, spatial_dims: int, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        self.spatial_dims = spatial_dims

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            spatial = tuple(img.shape[1:])
            if len(spatial) == self.spatial_dims:
                continue
            singletons = [i for i, s in enumerate(spatial) if s == 1]
            if not (len(spatial) == 3 and self.spatial_dims == 2 and singletons):
                raise BadImageError(
                    _image_path(d, key),
                    f"its spatial shape {spatial} has {len(spatial)} axes, and the pipeline is {self.spatial_dims}-D "
                    f"(spatial_size has {self.spatial_dims} values)",
                )
            dim = 1 + singletons[-1]
            out = SqueezeDim(dim=dim)(img)
            if isinstance(out, MetaTensor) and isinstance(img, MetaTensor):
                extra = {"squeezed_dim": dim, "affine": img.affine.clone()}
                self.push_transform(out, orig_size=spatial, extra_info=extra)
            d[key] = out
        return d

    def inverse(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            # a call that removed nothing recorded nothing: then the latest record belongs to an earlier step
            operations = img.applied_operations if isinstance(img, MetaTensor) else []
            if not operations or operations[-1].get(TraceKeys.CLASS_NAME) != type(self).__name__:
                continue
            extra = self.pop_transform(img)[TraceKeys.EXTRA_INFO]
            img = img.unsqueeze(extra["squeezed_dim"])
            img.affine = extra["affine"]
            d[key] = img
        return d


class CheckedLabelMapd(MapTransform):
    """Check a segmentation label map against its image, right after both were loaded.

    A label map is usable only when it lies on its image's voxel grid and holds class indices: one channel, the
    image's spatial shape, the image's affine (within ``affine_tolerance``: NIfTI stores affines in single
    precision, so two files written from one grid can differ in the last digits), and integer values in
    ``[0, num_classes)`` with 0 the background. Any of these failing later shows up as a crash in a loss, or as a
    network trained on shifted masks, so each is an error here that names the image and the label file and says
    what differs. Nothing is changed: the label map comes out as it came in.

    Args:
        keys: keys of the channel-first label maps (``MetaTensor`` from a loader).
        image_key: key of the image the label maps belong to.
        num_classes: when given, values must lie in ``[0, num_classes)``; the background 0 counts, so it is at
            least 2. ``None`` checks only that values are non-negative integers.
        affine_tolerance: largest allowed absolute difference between matching entries of the two affines (mm for
            the spacing, direction and origin entries).
        allow_missing_keys: do not raise when a key is missing.

    Raises:
        ValueError: at construction, for ``num_classes`` that is not an integer of at least 2, or an
            ``affine_tolerance`` that is negative.
        BadImageError: when called on a label map with more than one channel, another spatial shape or affine than
            its image, or values that are not integers in ``[0, num_classes)`` (the message lists the first few bad
            values and counts the voxels). ``path`` is the image; the message names both files.
    """

    def __init__(
        self,
        keys: KeysCollection,
        image_key: Hashable = "image",
        num_classes: int | None = None,
        affine_tolerance: float = 1e-3,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2
        ):
            raise ValueError(
                f"num_classes must be an integer of at least 2 (background 0 included) or None, got {num_classes!r}"
            )
        if not affine_tolerance >= 0:
            raise ValueError(f"affine_tolerance must be a non-negative number, got {affine_tolerance!r}")
        self.image_key = image_key
        self.num_classes = None if num_classes is None else int(num_classes)
        self.affine_tolerance = float(affine_tolerance)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        image_path = _image_path(d, self.image_key)
        for key in self.key_iterator(d):
            label = d[key]
            where = f"label map {_image_path(d, key)}"
            if label.shape[0] != 1:
                raise BadImageError(
                    image_path,
                    f"{where} has {label.shape[0]} channels (shape {tuple(label.shape)}, channel first); a label map "
                    "has 1, a class index per voxel",
                )
            if tuple(label.shape[1:]) != tuple(image.shape[1:]):
                raise BadImageError(
                    image_path,
                    f"{where} has the spatial shape {tuple(label.shape[1:])}, the image {tuple(image.shape[1:])}: "
                    "a label map must lie on its image's voxel grid",
                )
            if isinstance(label, MetaTensor) and isinstance(image, MetaTensor):
                self._check_affines(image_path, where, image.affine, label.affine)
            self._check_values(image_path, where, label)
        return d

    def _check_affines(self, image_path: str, where: str, image_affine: Any, label_affine: Any) -> None:
        a = np.asarray(convert_to_dst_type(image_affine, np.zeros(1), dtype=np.float64)[0])
        b = np.asarray(convert_to_dst_type(label_affine, np.zeros(1), dtype=np.float64)[0])
        difference = np.inf if a.shape != b.shape else float(np.max(np.abs(a - b)))
        if difference > self.affine_tolerance:
            raise BadImageError(
                image_path,
                f"{where} and the image have different affines (largest difference {difference:.4g}, tolerance "
                f"{self.affine_tolerance:g}): label map {np.round(b, 4).tolist()}, image {np.round(a, 4).tolist()}",
            )

    def _check_values(self, image_path: str, where: str, label: Any) -> None:
        values = torch.as_tensor(label.as_tensor() if isinstance(label, MetaTensor) else label)
        if values.is_floating_point():
            not_integer = values != torch.round(values)
            if bool(not_integer.any()):
                bad = torch.unique(values[not_integer])
                raise BadImageError(
                    image_path,
                    f"{where} holds values that are not integer class indices: {_first_values(bad)} "
                    f"({int(not_integer.sum())} voxels)",
                )
        outside = values < 0
        if self.num_classes is not None:
            outside |= values >= self.num_classes
        if bool(outside.any()):
            bad = torch.unique(values[outside])
            bound = f"[0, {self.num_classes})" if self.num_classes is not None else "non-negative integers"
            raise BadImageError(
                image_path,
                f"{where} holds values outside the classes {bound}: {_first_values(bad)} ({int(outside.sum())} voxels)",
            )


def _first_values(values: torch.Tensor, limit: int = MAX_NAMES) -> str:
    return _first_names([f"{float(v):g}" for v in values.tolist()], limit)


class ClassLabeld(MapTransform):
    """Turn a class label into a ``torch.long`` scalar, checking that it is an integer within the classes.

    Args:
        keys: keys of the labels.
        num_classes: when given, a label must lie in ``[0, num_classes)``.
        image_key: key of the image, named in error messages.
        allow_missing_keys: do not raise when a key is missing.

    Raises:
        ValueError: at construction, when ``num_classes`` is not a positive integer.
        BadImageError: when called on a label that is not an integer or lies outside the classes; the message
            names the image.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_classes: int | None = None,
        image_key: Hashable | None = "image",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)):
            raise ValueError(f"num_classes must be a positive integer or None, got {num_classes!r}")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer or None, got {num_classes!r}")
        self.num_classes = num_classes
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            try:
                label = as_class_label(value, self.num_classes)
            except ValueError as e:
                raise BadImageError(_image_path(d, self.image_key), f"{key} {e}") from None
            d[key] = torch.tensor(label, dtype=torch.long)
        return d


def as_class_label(value: Any, num_classes: int | None = None) -> int:
    """``value`` as an ``int`` class label: an integer (or a whole float, or a one-element tensor or array of one).

    Args:
        value: the label.
        num_classes: when given, the label must lie in ``[0, num_classes)``.

    Returns:
        the label.

    Raises:
        ValueError: when ``value`` is not an integer or lies outside ``[0, num_classes)``; the message starts with
            the value, so callers can prefix where it came from.
    """
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if (value.size if isinstance(value, np.ndarray) else value.numel()) != 1:
            raise ValueError(f"{value!r} is not a single class label")
        value = value.item()
    elif isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{value!r} is not an integer class label")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{value!r} is not an integer class label")
        value = int(value)
    if value < 0 or (num_classes is not None and value >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else "non-negative integers"
        raise ValueError(f"{value} is outside the classes {bound}")
    return int(value)


def find_bad_image_error(error: BaseException | None) -> BadImageError | None:
    """The :class:`BadImageError` behind an exception, or None.

    MONAI's ``Compose`` and datasets wrap every exception of a transform in ``RuntimeError("applying transform
    ...")``, raised ``from`` the original; this follows ``__cause__`` and ``__context__`` down to it.

    Args:
        error: the exception that was caught.

    Returns:
        the first ``BadImageError`` in the chain, or None when there is none.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, BadImageError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None

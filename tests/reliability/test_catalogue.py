"""A catalogue of bad inputs and faults: each names its culprit (or gives the documented warning) and changes nothing.

Every case builds its bad input in a fresh folder, takes a snapshot of that folder, runs one public entry point
and asserts the exact outcome: the error type and a message that names the file, item or id at fault, or the one
warning that docs/pipelines.md (images, datalists) or docs/user_guide.md (resume) documents. The snapshot after must
equal the one before: a refused input leaves no file behind, touches no input, and runs no code. The few cases whose
documented outcome is a change on disk (a resume that starts a fresh run) list the files it writes or removes, with
their exact content; nothing else may change. The kill-and-resume test of the bundle is tests/bundle/test_resume.py.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import pickle
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_medmerge.data.datalist import check_items, load_datalist
from monai_medmerge.data.pipelines import classification_transforms
from monai_medmerge.data.transforms import BadImageError, CheckedLoadImaged, find_bad_image_error
from tests.conftest import snapshot

nib = pytest.importorskip("nibabel")
pydicom_data = pytest.importorskip("pydicom.data")
pytest.importorskip("itk")
Image = pytest.importorskip("PIL.Image")

SERIES = Path(pydicom_data.__file__).parent / "test_files" / "dicomdirtests" / "98892001" / "CT5N"
VOLUME = np.arange(1, 16 * 16 * 8 + 1, dtype=np.float32).reshape(16, 16, 8)


@dataclass
class Case:
    """One bad input: ``build(folder)`` makes it and returns the action; the outcome is an error or a warning."""

    build: Callable[[Path], Callable[[], object]]
    error: type[BaseException] | None  # None: the action succeeds and logs ``match`` once as a warning
    match: str | None  # a regular expression; ``{root}`` is the case's folder; None: no warning at all
    # the only changes the action makes, relative to the case's folder: the new text of a file, or None: removed
    changes: dict[str, str | None] = field(default_factory=dict)


# --- builders -----------------------------------------------------------------------------------------------------


def _nifti_bytes(array: np.ndarray = VOLUME, version: int = 1) -> bytes:
    return (nib.Nifti1Image if version == 1 else nib.Nifti2Image)(array, np.eye(4)).to_bytes()


def _write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _picture(fmt: str, channels: int = 1) -> bytes:
    pixels = np.random.default_rng(0).integers(1, 255, (32, 32, channels)[: 2 if channels == 1 else 3], np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def _load(path: Path, reader: str, **kwargs) -> Callable[[], object]:
    return lambda: CheckedLoadImaged(keys="image", reader=reader, **kwargs)({"image": str(path)})


def _pipeline(path: Path, kind: str, spatial_size, **kwargs) -> Callable[[], object]:
    def run():
        try:
            return classification_transforms(kind, spatial_size, label_key=None, **kwargs)({"image": str(path)})
        except Exception as e:  # MONAI's Compose wraps the error; the catalogue asserts on ours
            found = find_bad_image_error(e)
            raise (found or e) from None

    return run


def _nifti_file(name: str, data: bytes, reader: str = "NibabelReader") -> Callable[[Path], Callable[[], object]]:
    return lambda root: _load(_write(root / name, data), reader)


def _series(root: Path, cut: str | None = None, cut_to: int = 2000, delete: str | None = None) -> Path:
    folder = Path(shutil.copytree(SERIES, root / "series"))
    if cut:
        _write(folder / cut, (folder / cut).read_bytes()[:cut_to])
    if delete:
        (folder / delete).unlink()
    return folder


def _dicom(root: Path, cut: int) -> Path:
    source = Path(pydicom_data.get_testdata_file("CT_small.dcm"))
    return _write(root / "slice.dcm", source.read_bytes()[:cut])


def _png_file(root: Path, name: str = "a.png", value: int | None = None, size: int = 16) -> Path:
    pixels = np.random.default_rng(1).integers(0, 255, (size, size), np.uint8) if value is None else None
    Image.fromarray(pixels if pixels is not None else np.full((size, size), value, np.uint8)).save(root / name)
    return root / name


def _datalist(content, raw: bool = False, **kwargs) -> Callable[[Path], Callable[[], object]]:
    def build(root: Path):
        for i in range(3):
            _png_file(root, f"{i}.png")
        path = _write(root / "datalist.json", content if raw else json.dumps(content))
        return lambda: load_datalist(path, **kwargs)

    return build


def _check(make_items, **kwargs) -> Callable[[Path], Callable[[], object]]:
    def build(root: Path):
        items = make_items(root)
        return lambda: check_items(items, **{"reader": "PILReader", **kwargs})

    return build


def _segmentation_pair(label: np.ndarray, affine: np.ndarray | None = None, num_classes: int = 3):
    """A NIfTI image and its label map (``label``, saved with ``affine``), checked by ``check_items`` for
    segmentation."""

    def build(root: Path):
        _write(root / "image.nii", _nifti_bytes())
        lab = nib.Nifti1Image(label, np.eye(4) if affine is None else affine)
        _write(root / "label.nii", lab.to_bytes())
        items = [{"image": str(root / "image.nii"), "label": str(root / "label.nii")}]
        return lambda: check_items(items, "NibabelReader", task="segmentation", num_classes=num_classes)

    return build


def _segmentation_datalist(label) -> Callable[[Path], Callable[[], object]]:
    def build(root: Path):
        _write(root / "image.nii", _nifti_bytes())
        path = _write(root / "datalist.json", json.dumps({"training": [{"image": "image.nii", "label": label}]}))
        return lambda: load_datalist(path, task="segmentation")

    return build


LABELS = (VOLUME % 3).astype(np.uint8)


def _resnet_def(num_classes: int = 3) -> dict:
    return {
        "_target_": "monai.networks.nets.ResNet",
        "block": "basic",
        "layers": [1, 1, 1, 1],
        "block_inplanes": [4, 4, 4, 4],
        "spatial_dims": 2,
        "n_input_channels": 1,
        "num_classes": num_classes,
    }


def _net(num_classes: int = 3) -> torch.nn.Module:
    from monai.networks.nets import ResNet

    args = {k: v for k, v in _resnet_def(num_classes).items() if k != "_target_"}
    torch.manual_seed(0)
    return ResNet(**args).eval()


class _TouchOnUnpickle:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def _source(kind: str) -> Callable[[Path], Callable[[], object]]:
    from monai_medmerge.sources import load_source, save_checkpoint

    def build(root: Path):
        checkpoint = root / "source.pt"
        if kind == "pickle_runs_code":
            with open(checkpoint, "wb") as f:
                pickle.dump({"weight": torch.zeros(2), "x": _TouchOnUnpickle(str(root / "pwned"))}, f)
            return lambda: load_source(checkpoint, _resnet_def())
        if kind in ("config_expression", "config_os_system", "config_outside_allow_list"):
            bundle = root / "bundle"
            (bundle / "configs").mkdir(parents=True)
            (bundle / "models").mkdir()
            save_checkpoint(_net(), bundle / "models" / "model.pt")
            network_def = {
                "config_expression": "$__import__('pathlib').Path('pwned').touch()",
                "config_os_system": {
                    **_resnet_def(),
                    "num_classes": {"_target_": "os.system", "command": "touch pwned"},
                },
                "config_outside_allow_list": {"_target_": "pathlib.Path.touch", "self": "pwned"},
            }[kind]
            _write(bundle / "configs" / "inference.json", json.dumps({"network_def": network_def}))
            return lambda: load_source(bundle)
        state = _net().state_dict()
        if kind == "missing_keys":
            del state["fc.bias"]
        if kind == "not_a_checkpoint":
            _write(checkpoint, "not a checkpoint")
            return lambda: load_source(checkpoint, _resnet_def())
        save_checkpoint(state, checkpoint)
        if kind == "wrong_architecture":
            return lambda: load_source(checkpoint, _resnet_def(num_classes=5))
        if kind == "wrong_suffix":
            renamed = checkpoint.rename(root / "source.bin")
            return lambda: load_source(renamed, _resnet_def())
        return lambda: load_source(checkpoint, _resnet_def())

    return build


def _export(kind: str) -> Callable[[Path], Callable[[], object]]:
    from monai_medmerge.bundle.export import export_bundle

    def build(root: Path):
        out = root / "bundle"
        args = dict(network=_net(), network_def=_resnet_def(), out_dir=out, class_names=["a", "b", "c"])
        args.update(spatial_shape=[16, 16], torchscript=False)
        if kind == "exists":
            out.mkdir()
            _write(out / "mine.txt", "the user's file")
        elif kind == "is_a_file":
            _write(out, "the user's file")
        elif kind == "class_names":
            args["class_names"] = ["a", "b"]
        elif kind == "network_def_mismatch":
            args["network_def"] = _resnet_def(num_classes=4)
        elif kind == "is_a_file_overwrite":
            _write(out, "the user's file")
            args["overwrite"] = True
        return lambda: export_bundle(**args)

    return build


def _tiny_phase(models: Path, max_epochs: int, resume: bool, classes: int = 2, val_interval: int = 1):
    """A training phase built as the bundle builds its phases (periodic checkpoints, a best-state file and its score
    record in ``models``), of a linear classifier of one feature: fast enough to run inside a catalogue case."""
    from torch.utils.data import DataLoader, TensorDataset

    from monai_medmerge.workflows.engines import ResumableCheckpoint, phase_evaluator, phase_trainer

    torch.manual_seed(0)
    net = torch.nn.Linear(1, classes)
    data = DataLoader(TensorDataset(torch.tensor([[1.0], [2.0], [-1.0], [-2.0]]), torch.tensor([0, 0, 1, 1])))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    checkpoint = ResumableCheckpoint(models, "phase1", {"model": net, "optimizer": optimizer}, resume=resume)
    evaluator = phase_evaluator(net, data, num_classes=classes)
    return phase_trainer(
        net, data, evaluator, optimizer, max_epochs, val_interval=val_interval, best_path=models / "best.pt",
        checkpoint=checkpoint, progress=False,
    )  # fmt: skip


def _resume(kind: str) -> Callable[[Path], Callable[[], object]]:
    """A fault in the folder of a run (``models``), met by ``--resume True``: what ``start_run`` finds, or what a
    resumed phase of two epochs finds after an earlier attempt ran both epochs and was killed before its marker."""
    from monai_medmerge.workflows.engines import save_states, start_run

    def build(root: Path):
        models = root / "models"
        models.mkdir()
        if kind == "val_interval_above_max_epochs":
            return lambda: _tiny_phase(models, 2, resume=True, val_interval=3)
        if kind.startswith("phase_"):
            classes = 3 if kind == "phase_checkpoint_of_another_network" else 2
            _tiny_phase(models, 2, resume=False, classes=classes).run()
            checkpoint = models / "phase1_checkpoint_epoch=2.pt"
            if kind == "phase_checkpoint_truncated":
                _write(checkpoint, checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
            elif kind == "phase_checkpoint_not_a_checkpoint":
                _write(checkpoint, "not a checkpoint")
            elif kind == "phase_best_record_unreadable":
                _write(models / "best.pt.best.json", '{"best_metric": 1.0, "best_metric_epoch": ')
            elif kind == "phase_best_state_replaced":  # what a kill between the state and its record leaves
                save_states({"network": torch.nn.Linear(1, 2)}, models / "best.pt")
            return lambda: _tiny_phase(models, 2, resume=True).run()
        if kind == "other_settings":
            _write(models / "run.json", '{"fingerprint": "a1"}\n')
        elif kind == "run_json_not_json":
            _write(models / "run.json", '{"fingerprint": ')
        elif kind == "run_json_without_fingerprint":
            _write(models / "run.json", '["a1"]')
        elif kind == "interrupted_write":
            _write(models / "run.json", '{"fingerprint": "f1"}\n')
            _write(models / ".model.pt.k3x9q_2a.tmp", b"PK half a checkpoint")  # a temporary name of atomic_write
            _write(models / ".notes.tmp", "the user's file")
        if kind != "no_earlier_run":
            _write(models / "phase1.done", '{"epochs": 2}\n')
            _write(models / "phase2_checkpoint_epoch=3.pt", b"PK a checkpoint")
            _write(models / "model.pt", b"PK an earlier model")
            _write(models / "model.pt.best.json", '{"best_metric": 0.5, "best_metric_epoch": 3}\n')
        return lambda: start_run(models, True, "b2" if kind == "other_settings" else "f1")

    return build


FRESH_RUN = {"models/run.json": '{"fingerprint": "f1"}\n'}


# --- the catalogue ------------------------------------------------------------------------------------------------

CUT = _nifti_bytes()[:-100]
CASES = {
    # images: NIfTI
    "nifti_truncated_itk": Case(
        _nifti_file("cut.nii", CUT, "ITKReader"),
        BadImageError,
        r"cut\.nii: truncated: its NIfTI-1 header describes 16x16x8",
    ),
    "nifti_truncated_nibabel": Case(
        _nifti_file("cut.nii", CUT), BadImageError, r"cut\.nii: truncated: .*\(100 bytes missing\)$"
    ),
    "nifti_gz_cut_itk": Case(
        _nifti_file("cut.nii.gz", gzip.compress(_nifti_bytes())[:-50], "ITKReader"),
        BadImageError,
        r"cut\.nii\.gz: truncated: the gzip stream ends before",
    ),
    "nifti_gz_of_truncated_itk": Case(
        _nifti_file("cut.nii.gz", gzip.compress(CUT), "ITKReader"),
        BadImageError,
        r"cut\.nii\.gz: truncated: .*uncompressed data ends",
    ),
    "nifti2_truncated": Case(
        _nifti_file("cut.nii", _nifti_bytes(version=2)[:-1]), BadImageError, r"cut\.nii: truncated: its NIfTI-2 header"
    ),
    "nifti_header_only_itk": Case(
        _nifti_file("h.nii", _nifti_bytes()[:352], "ITKReader"),
        BadImageError,
        r"h\.nii: truncated: .*\(8192 bytes missing\)",
    ),
    "nifti_empty_file": Case(_nifti_file("empty.nii", b""), BadImageError, r"empty\.nii: NibabelReader cannot read it"),
    "nifti_text_file": Case(
        _nifti_file("notes.nii", "patient,label\n1,0\n"), BadImageError, r"notes\.nii: NibabelReader cannot read it"
    ),
    "nifti_nan": Case(
        _nifti_file("nan.nii", _nifti_bytes(np.where(VOLUME > 100, np.nan, VOLUME).astype(np.float32))),
        BadImageError,
        r"nan\.nii: 1948 of 2048 values are NaN or Inf$",
    ),
    "nifti_4d_channels": Case(
        lambda r: _pipeline(
            _write(r / "c.nii", _nifti_bytes(np.ones((8, 8, 1, 3), np.float32) + np.arange(3))), "nifti", [8, 8]
        ),
        BadImageError,
        r"c\.nii: 3 channels .*; the network takes 1$",
    ),
    "nifti_3d_in_2d_pipeline": Case(
        lambda r: _pipeline(_write(r / "v.nii", _nifti_bytes()), "nifti", [8, 8]),
        BadImageError,
        r"v\.nii: its spatial shape \(16, 16, 8\) has 3 axes, and the pipeline is 2-D",
    ),
    "nifti_2d_in_3d_pipeline": Case(
        lambda r: _pipeline(_write(r / "s.nii", _nifti_bytes(VOLUME[..., 0])), "nifti", [8, 8, 8]),
        BadImageError,
        r"s\.nii: its spatial shape \(16, 16\) has 2 axes, and the pipeline is 3-D",
    ),
    "png_named_nii": Case(
        lambda r: _load(_write(r / "p.nii", _picture("PNG")), "NibabelReader"),
        BadImageError,
        r"p\.nii: NibabelReader cannot read it",
    ),
    "nii_given_to_png_reader": Case(
        lambda r: _load(_write(r / "v.nii", _nifti_bytes()), "PILReader"),
        BadImageError,
        r"v\.nii: PILReader reads \.png, \.jpg, \.jpeg, \.bmp, not 'v\.nii'",
    ),
    "missing_file": Case(
        lambda r: _load(r / "gone.nii", "NibabelReader"), BadImageError, r"gone\.nii: does not exist$"
    ),
    "broken_symlink": Case(
        lambda r: (r / "link.nii").symlink_to(r / "gone.nii") or _load(r / "link.nii", "NibabelReader"),
        BadImageError,
        r"link\.nii: does not exist$",
    ),
    # images: pictures
    "png_truncated_pil": Case(
        lambda r: _load(_write(r / "cut.png", _picture("PNG")[:-300]), "PILReader"),
        BadImageError,
        r"cut\.png: truncated: the PNG chunk 'IDAT'",
    ),
    "png_iend_cut_pil": Case(
        lambda r: _load(_write(r / "cut.png", _picture("PNG")[:-6]), "PILReader"),
        BadImageError,
        r"cut\.png: truncated: the PNG ends at byte \d+ without its IEND chunk$",
    ),
    "jpeg_truncated_itk": Case(
        lambda r: _load(_write(r / "cut.jpg", _picture("JPEG")[:-20]), "ITKReader"),
        BadImageError,
        r"cut\.jpg: truncated: the JPEG ends at byte \d+ without its end-of-image marker$",
    ),
    "bmp_truncated_itk": Case(
        lambda r: _load(_write(r / "cut.bmp", _picture("BMP")[:-40]), "ITKReader"),
        BadImageError,
        r"cut\.bmp: truncated: its BMP header .*\(40 bytes missing\)$",
    ),
    "png_empty_file": Case(
        lambda r: _load(_write(r / "e.png", b""), "PILReader"), BadImageError, r"e\.png: PILReader cannot read it"
    ),
    "png_rgba_to_3d_pipeline": Case(
        lambda r: _pipeline(_write(r / "rgba.png", _picture("PNG", 4)), "png", [8, 8, 8]),
        BadImageError,
        r"rgba\.png: its spatial shape \(32, 32\) has 2 axes",
    ),
    # images: DICOM
    "dicom_truncated_pydicom": Case(
        lambda r: _load(_dicom(r, 20000), "PydicomReader"),
        BadImageError,
        r"slice\.dcm: PydicomReader cannot decode its pixel data: ValueError: The number of bytes",
    ),
    "dicom_truncated_itk": Case(
        lambda r: _load(_dicom(r, 20000), "ITKReader"), BadImageError, r"slice\.dcm: ITKReader cannot read it"
    ),
    "dicom_text_file": Case(
        lambda r: _load(_write(r / "x.dcm", "not dicom"), "PydicomReader"),
        BadImageError,
        r"x\.dcm: PydicomReader cannot read it",
    ),
    "dicom_multiframe_pydicom": Case(
        lambda r: _load(Path(pydicom_data.get_testdata_file("rtdose.dcm")), "PydicomReader"),
        BadImageError,
        r"rtdose\.dcm: multi-frame DICOM \(15 frames\)",
    ),
    "series_truncated_slice_itk": Case(
        lambda r: _load(_series(r, cut="2693"), "ITKReader"),
        BadImageError,
        r"^series .*series: 5 files but 4 slices were read; not read: 2693",
    ),
    "series_truncated_pixels_pydicom": Case(
        lambda r: _load(_series(r, cut="2693", cut_to=-200), "PydicomReader"),
        BadImageError,
        r"^series .*series: slice 2693: PydicomReader cannot decode its pixel data: ValueError: The number of bytes",
    ),
    "series_truncated_pixels_itk": Case(
        lambda r: _load(_series(r, cut="2693", cut_to=-200), "ITKReader"),
        BadImageError,
        r"^series .*series: 5 files but 4 slices were read; not read: 2693",
    ),
    "series_missing_middle_slice": Case(
        lambda r: _load(_series(r, delete="2693"), "ITKReader"),
        BadImageError,
        r"^series .*series: slices are not evenly spaced",
    ),
    "series_stray_text_file": Case(
        lambda r: (_write(_series(r) / "notes.txt", "x"), _load(r / "series", "PydicomReader"))[1],
        BadImageError,
        r"^series .*series: 6 files but 5 slices were read; not read: notes\.txt",
    ),
    "series_empty_folder": Case(
        lambda r: ((r / "empty").mkdir(), _load(r / "empty", "ITKReader"))[1],
        BadImageError,
        r"^series .*empty: the folder is empty",
    ),
    "series_folder_to_file_reader": Case(
        lambda r: _load(_series(r), "NibabelReader"),
        BadImageError,
        r"series: is a folder, and NibabelReader reads single files",
    ),
    # datalists
    "datalist_not_json": Case(
        _datalist('{"training": [', raw=True), ValueError, r"datalist .*datalist\.json is not valid JSON"
    ),
    "datalist_not_utf8": Case(
        _datalist(b"\xff\xfe{}", raw=True), ValueError, r"datalist .*datalist\.json is not UTF-8 text"
    ),
    "datalist_a_list": Case(
        _datalist([{"image": "0.png", "label": 0}]),
        ValueError,
        r"datalist\.json must hold a JSON object with the sections, got a list",
    ),
    "datalist_wrong_section_names": Case(
        _datalist({"train": [], "val": []}),
        ValueError,
        r"datalist\.json has none of the sections training, validation, test; its keys: train, val$",
    ),
    "datalist_section_not_a_list": Case(
        _datalist({"training": {"image": "0.png"}}),
        ValueError,
        r"section 'training': expected a list of items, got a dict",
    ),
    "datalist_missing_image": Case(
        _datalist({"training": [{"label": 0}]}), ValueError, r"section 'training', item 0, field 'image': missing"
    ),
    "datalist_missing_label": Case(
        _datalist({"training": [{"image": "0.png"}]}), ValueError, r"section 'training', item 0, field 'label': missing"
    ),
    "datalist_label_string": Case(
        _datalist({"training": [{"image": "0.png", "label": "1"}]}),
        ValueError,
        r"item 0, field 'label': '1' is not an integer class label",
    ),
    "datalist_label_fraction": Case(
        _datalist({"training": [{"image": "0.png", "label": 1.5}]}),
        ValueError,
        r"item 0, field 'label': 1\.5 is not an integer",
    ),
    "datalist_label_out_of_range": Case(
        _datalist({"training": [{"image": "0.png", "label": 3}]}, num_classes=3),
        ValueError,
        r"item 0, field 'label': 3 is outside the classes \[0, 3\)",
    ),
    # --- segmentation: a label map that does not fit its image is named with the image
    "segmentation_label_shape": Case(
        _segmentation_pair(LABELS[..., :7]),
        BadImageError,
        r"image\.nii: label map .*label\.nii has the spatial shape \(16, 16, 7\), the image \(16, 16, 8\)",
    ),
    "segmentation_label_affine": Case(
        _segmentation_pair(LABELS, np.diag([2.0, 1.0, 1.0, 1.0])),
        BadImageError,
        r"image\.nii: label map .*label\.nii and the image have different affines \(largest difference 1",
    ),
    "segmentation_label_values": Case(
        _segmentation_pair((VOLUME % 5).astype(np.uint8)),
        BadImageError,
        r"label map .*label\.nii holds values outside the classes \[0, 3\): 3, 4",
    ),
    "segmentation_label_channels": Case(
        _segmentation_pair(np.stack([LABELS, LABELS], -1)),
        BadImageError,
        r"label map .*label\.nii has 2 channels",
    ),
    "segmentation_datalist_label_missing": Case(
        _segmentation_datalist("nope.nii.gz"),
        ValueError,
        r"item 0, field 'label' \(the label map of .*image\.nii\): .*nope\.nii\.gz does not exist",
    ),
    "segmentation_datalist_class_index": Case(
        _segmentation_datalist(2),
        ValueError,
        r"item 0, field 'label' \(the label map of .*image\.nii\): expected a file or folder path, got 2",
    ),
    "datalist_image_missing": Case(
        _datalist({"training": [{"image": "9.png", "label": 0}]}),
        ValueError,
        r"item 0, field 'image': .*9\.png does not exist",
    ),
    "datalist_image_not_a_path": Case(
        _datalist({"training": [{"image": 7, "label": 0}]}),
        ValueError,
        r"item 0, field 'image': expected a file or folder path, got 7",
    ),
    "datalist_train_val_overlap": Case(
        _datalist({"training": [{"image": "0.png", "label": 0}], "validation": [{"image": "./0.png", "label": 0}]}),
        ValueError,
        r"0\.png is item 0 of 'training' and item 0 of 'validation'; an image in two sections leaks",
    ),
    "datalist_train_test_overlap": Case(
        _datalist({"training": [{"image": "1.png", "label": 0}], "test": [{"image": "1.png", "label": 1}]}),
        ValueError,
        r"1\.png is item 0 of 'training' and item 0 of 'test'",
    ),
    "datalist_duplicate_with_two_labels": Case(
        _datalist({"training": [{"image": "2.png", "label": 0}, {"image": "2.png", "label": 1}]}),
        ValueError,
        r"2\.png is item 0 of 'training' and item 1 of the same section, with labels 0 and 1$",
    ),
    "datalist_duplicates": Case(
        _datalist({"training": [{"image": "0.png", "label": 0}] * 3}),
        None,
        r"datalist .*datalist\.json: 2 item\(s\) repeat an earlier item of their section .*0\.png \('training'\)",
    ),
    "datalist_empty_validation": Case(
        _datalist(
            {"training": [{"image": "0.png", "label": 0}], "validation": []}, required=["training", "validation"]
        ),
        ValueError,
        r"datalist\.json, section 'validation' is empty: it needs at least one item$",
    ),
    "check_items_empty_section": Case(
        _check(lambda r: [], section="validation"), ValueError, r"no items to check: section 'validation' is empty"
    ),
    "check_items_all_bad": Case(
        _check(lambda r: [{"image": str(_write(r / "x.png", "text")), "label": 0}], skip_bad=True),
        ValueError,
        r"all 1 items are bad, none is left \(the first: .*x\.png: PILReader cannot read it",
    ),
    "check_items_bad_label": Case(
        _check(lambda r: [{"image": str(_png_file(r)), "label": 4}], num_classes=2),
        BadImageError,
        r"a\.png: label 4 is outside the classes \[0, 2\)$",
    ),
    "check_items_constant_image": Case(
        _check(
            lambda r: [
                {"image": str(_png_file(r, "blank.png", value=0)), "label": 0},
                {"image": str(_png_file(r)), "label": 0},
            ]
        ),
        None,
        r"^1 of 2 images are constant, blank .*: .*blank\.png \(0\)$",
    ),
    "check_items_tiny_image": Case(
        _check(lambda r: [{"image": str(_png_file(r, "tiny.png", size=4)), "label": 0}], spatial_size=[64, 64]),
        None,
        r"^1 of 1 images are far smaller than the network input \[64, 64\] .*tiny\.png \(4x4\)$",
    ),
    "check_items_ct_outside_window": Case(
        _check(
            lambda r: [{"image": str(_write(r / "mr.nii", _nifti_bytes(VOLUME + 2000))), "label": 0}],
            reader="NibabelReader",
            modality="CT",
            window=[-160, 240],
        ),
        None,
        r"^1 of 1 images lie entirely outside the CT window \[-160\.0, 240\.0\] HU.*mr\.nii \(2001 to 4048\)$",
    ),
    # sources and checkpoints
    "source_pickle_runs_code": Case(
        _source("pickle_runs_code"),
        ValueError,
        r"refused to load checkpoint .*source\.pt: it contains objects other than tensors",
    ),
    "source_not_a_checkpoint": Case(
        _source("not_a_checkpoint"),
        ValueError,
        r"refused to load checkpoint .*source_not_a_checkpoint/source\.pt: it contains objects other than tensors",
    ),
    "source_wrong_suffix": Case(
        _source("wrong_suffix"),
        ValueError,
        r"unsupported checkpoint suffix '\.bin' of .*source\.bin; allowed: \.pt, \.pth, \.ckpt, \.safetensors$",
    ),
    "source_wrong_architecture": Case(
        _source("wrong_architecture"),
        ValueError,
        r"checkpoint .*source\.pt does not fit monai\.networks\.nets\.resnet\.ResNet: 2 shape mismatch\(es\): fc\.",
    ),
    "source_missing_keys": Case(_source("missing_keys"), ValueError, r"1 missing key\(s\): fc\.bias"),
    "source_config_expression": Case(
        _source("config_expression"),
        ValueError,
        r"source bundle .*bundle: configs/inference\.json: id 'network_def'.*trust_config=True",
    ),
    "source_config_os_system": Case(
        _source("config_os_system"),
        ValueError,
        r"configs/inference\.json: id 'network_def#num_classes#_target_' holds 'os\.system': it is outside the allowed",
    ),
    "source_config_outside_allow_list": Case(
        _source("config_outside_allow_list"),
        ValueError,
        r"configs/inference\.json: id 'network_def#_target_' holds 'pathlib\.Path\.touch': it is outside the allowed",
    ),
    # exports
    "export_exists": Case(
        _export("exists"), FileExistsError, r"bundle folder .*export_exists/bundle exists; pass overwrite=True"
    ),
    "export_out_is_a_file": Case(
        _export("is_a_file"),
        NotADirectoryError,
        r"bundle folder .*export_out_is_a_file/bundle is a file, not a folder; it is left as it is",
    ),
    "export_out_is_a_file_overwrite": Case(
        _export("is_a_file_overwrite"),
        NotADirectoryError,
        r"bundle folder .*export_out_is_a_file_overwrite/bundle is a file, not a folder; it is left as it is",
    ),
    "export_class_names": Case(_export("class_names"), ValueError, r"2 class names"),
    "export_network_def_mismatch": Case(_export("network_def_mismatch"), ValueError, r"does not match"),
    # resume (--resume True)
    "resume_without_an_earlier_run": Case(_resume("no_earlier_run"), None, None, FRESH_RUN),
    "resume_files_without_run_json": Case(
        _resume("files_without_run_json"),
        None,
        r"^resume: {root}/models holds 3 file\(s\) of an earlier run \(model\.pt\.best\.json, phase1\.done, "
        r"phase2_checkpoint_epoch=3\.pt\) but no run\.json .*not trusted: starting a fresh run, which removes them$",
        {
            **FRESH_RUN,
            "models/phase1.done": None,
            "models/phase2_checkpoint_epoch=3.pt": None,
            "models/model.pt.best.json": None,
        },
    ),
    "resume_other_settings": Case(
        _resume("other_settings"),
        ValueError,
        r"^{root}/models/run\.json: the run recorded there had other settings, data or sources \(fingerprint a1 "
        r"here b2\); resume continues only that run: run without --resume to start over$",
    ),
    "resume_run_json_not_json": Case(
        _resume("run_json_not_json"),
        ValueError,
        r"^{root}/models/run\.json: cannot tell which run it records \(not valid JSON: Expecting value: .*\), so "
        r"resume cannot check that the files there belong to this run: run without --resume to start over$",
    ),
    "resume_run_json_without_fingerprint": Case(
        _resume("run_json_without_fingerprint"),
        ValueError,
        r"^{root}/models/run\.json: cannot tell which run it records \(it holds no 'fingerprint'\)",
    ),
    "resume_after_an_interrupted_write": Case(
        _resume("interrupted_write"), None, None, {"models/.model.pt.k3x9q_2a.tmp": None}
    ),
    "resume_checkpoint_truncated": Case(
        _resume("phase_checkpoint_truncated"),
        ValueError,
        r"^{root}/models/phase1_checkpoint_epoch=2\.pt: cannot resume phase1 from this checkpoint \(RuntimeError: "
        r"PytorchStreamReader failed reading zip archive: failed finding central directory\.\); if the file is "
        r"damaged \(cut short by a full disk or an interrupted copy\), delete it to run phase1 from its beginning, or "
        r"run without --resume to start over$",
    ),
    "resume_checkpoint_not_a_checkpoint": Case(
        _resume("phase_checkpoint_not_a_checkpoint"),
        ValueError,
        r"^{root}/models/phase1_checkpoint_epoch=2\.pt: cannot resume phase1 from this checkpoint \(UnpicklingError: "
        r"Weights only load failed\.\); if the file is damaged",
    ),
    "resume_checkpoint_of_another_network": Case(
        _resume("phase_checkpoint_of_another_network"),
        ValueError,
        r"phase1_checkpoint_epoch=2\.pt: cannot resume phase1 from this checkpoint \(RuntimeError: Error\(s\) in "
        r"loading state_dict for Linear: size mismatch for weight: copying a param with shape torch\.Size\(\[3, 1\]\)",
    ),
    "resume_best_record_unreadable": Case(
        _resume("phase_best_record_unreadable"),
        None,
        r"^resume: {root}/models/best\.pt\.best\.json is unreadable \(Expecting value: .*\); the best score "
        r"restarts from here$",
    ),
    "resume_best_state_replaced": Case(
        _resume("phase_best_state_replaced"),
        None,
        r"^resume: {root}/models/best\.pt is not the state that {root}/models/best\.pt\.best\.json records \(it "
        r"was replaced after the record was written\); the best score restarts from here$",
    ),
    "val_interval_above_max_epochs": Case(
        _resume("val_interval_above_max_epochs"),
        ValueError,
        r"^val_interval 3 is above max_epochs 2: the phase would never validate",
    ),
}


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_named_and_changes_nothing(name, tmp_path, caplog):
    case = CASES[name]
    root = tmp_path / name
    root.mkdir()
    action = case.build(root)
    before = snapshot(tmp_path)
    pattern = None if case.match is None else case.match.replace("{root}", re.escape(str(root)))
    if case.error is None:
        with caplog.at_level(logging.WARNING, logger="monai_medmerge"):
            action()
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == (0 if pattern is None else 1), warnings
        assert pattern is None or re.search(pattern, warnings[0]), warnings[0]
    else:
        with pytest.raises(case.error, match=pattern):
            action()
    after = snapshot(tmp_path)
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    assert changed == {f"{name}/{path}" for path in case.changes}
    for path, text in case.changes.items():
        assert (text is None and not (root / path).exists()) or (root / path).read_text() == text
    assert not (root / "pwned").exists() and not (Path.cwd() / "pwned").exists()


def test_the_catalogue_is_long_enough():
    assert len(CASES) >= 40

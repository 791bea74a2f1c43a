"""load_datalist and check_items on real datalists and images made in tmp_path."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from monai_medmerge.data.datalist import check_items, load_datalist, load_unlabeled
from monai_medmerge.data.transforms import BadImageError

SERIES = "dicomdirtests/98892001/CT5N"


def _png(path: Path, value: int = 0) -> Path:
    image = pytest.importorskip("PIL.Image")
    image.fromarray(np.full((16, 16), value, np.uint8)).save(path)
    return path


def _write(path: Path, content) -> Path:
    path.write_text(json.dumps(content))
    return path


@pytest.fixture
def pngs(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    return [_png(folder / f"{i}.png", value=i) for i in range(4)]


# --- load_datalist ----------------------------------------------------------------------------------------------


def test_load_datalist_resolves_paths_and_keeps_extra_keys(tmp_path, pngs):
    datalist = _write(
        tmp_path / "datalist.json",
        {
            "training": [
                {"image": "images/0.png", "label": 0, "patient": "p0"},
                {"image": str(pngs[1]), "label": 2.0},  # absolute path; a whole float is an integer
            ],
            "validation": [{"image": "./images/../images/2.png", "label": 1}],
            "test": ["images/3.png"],
        },
    )
    data = load_datalist(datalist, class_names=["a", "b", "c"], require_label=False)
    assert data["training"] == [
        {"image": str(pngs[0]), "label": 0, "patient": "p0"},
        {"image": str(pngs[1]), "label": 2},
    ]
    assert isinstance(data["training"][1]["label"], int)
    assert data["validation"] == [{"image": str(pngs[2]), "label": 1}]
    assert data["test"] == [{"image": str(pngs[3])}]


def test_load_unlabeled_reads_its_own_section_and_refuses_labelled_images(tmp_path, pngs):
    content = {
        "training": [{"image": "images/0.png", "label": 0}],
        "validation": [{"image": "images/1.png", "label": 1}],
        "unlabeled": ["images/2.png", {"image": "images/3.png", "label": 7, "site": "x"}],
    }
    datalist = _write(tmp_path / "d.json", content)
    labelled = load_datalist(datalist, num_classes=2)
    items = load_unlabeled(datalist, "unlabeled", labelled)
    assert items == [{"image": str(pngs[2])}, {"image": str(pngs[3]), "site": "x"}]  # labels are not read
    assert load_unlabeled(datalist, None, labelled) == [] == load_unlabeled(datalist, "", labelled)
    with pytest.raises(ValueError, match="need a section of their own .* not 'training'"):
        load_unlabeled(datalist, "training", labelled)
    with pytest.raises(ValueError, match="has none of the sections pool"):
        load_unlabeled(datalist, "pool", labelled)
    content["unlabeled"].append("images/1.png")  # a validation image
    datalist = _write(tmp_path / "d.json", content)
    with pytest.raises(ValueError, match=r"1\.png is item 0 of 'validation' and item 2 of 'unlabeled'"):
        load_unlabeled(datalist, "unlabeled", labelled)
    content["unlabeled"] = []
    datalist = _write(tmp_path / "d.json", content)
    with pytest.raises(ValueError, match="section 'unlabeled' is empty"):
        load_unlabeled(datalist, "unlabeled", labelled)


def test_load_datalist_matches_monai_conventions(tmp_path, pngs):
    from monai.data import load_decathlon_datalist

    datalist = _write(tmp_path / "d.json", {"training": [{"image": "images/0.png", "label": 1}]})
    ours = load_datalist(datalist)["training"]
    theirs = load_decathlon_datalist(str(datalist), is_segmentation=False, data_list_key="training")
    assert ours == theirs


def test_load_datalist_base_dir_and_missing_sections(tmp_path, pngs):
    (tmp_path / "lists").mkdir()
    datalist = _write(tmp_path / "lists" / "d.json", {"training": [{"image": "0.png", "label": 0}]})
    data = load_datalist(datalist, base_dir=pngs[0].parent, num_classes=2)
    assert data == {"training": [{"image": str(pngs[0]), "label": 0}], "validation": [], "test": []}
    assert load_datalist(datalist, base_dir=pngs[0].parent, sections=["validation", "training"])["validation"] == []
    # Asking only for sections the file lacks is a mistake ("train" for "training"), not an empty list.
    with pytest.raises(ValueError, match=r"d\.json has none of the sections validation; its keys: training$"):
        load_datalist(datalist, base_dir=pngs[0].parent, sections="validation")
    with pytest.raises(ValueError, match=r"d\.json, section 'validation' is missing: it needs at least one item"):
        load_datalist(datalist, base_dir=pngs[0].parent, required=["training", "validation"])


def _error(tmp_path, content, **kwargs) -> str:
    path = _write(tmp_path / "bad.json", content)
    with pytest.raises(ValueError) as info:
        load_datalist(path, **kwargs)
    return str(info.value)


def test_load_datalist_errors_name_file_section_item_and_field(tmp_path, pngs):
    where = f"datalist {tmp_path / 'bad.json'}, section 'training', item 1, field"
    good = {"image": "images/0.png", "label": 0}
    assert _error(tmp_path, {"training": [good, {"label": 0}]}) == f"{where} 'image': missing"
    assert _error(tmp_path, {"training": [good, {"image": "images/1.png"}]}) == f"{where} 'label': missing"
    assert _error(tmp_path, {"training": [good, {"image": "images/1.png", "label": "cat"}]}) == (
        f"{where} 'label': 'cat' is not an integer class label"
    )
    assert _error(tmp_path, {"training": [good, {"image": "images/1.png", "label": 1.5}]}) == (
        f"{where} 'label': 1.5 is not an integer class label"
    )
    assert _error(
        tmp_path, {"training": [good, {"image": "images/1.png", "label": 3}]}, class_names=["a", "b", "c"]
    ) == (f"{where} 'label': 3 is outside the classes [0, 3)")
    assert _error(tmp_path, {"training": [good, {"image": "images/1.png", "label": -1}]}) == (
        f"{where} 'label': -1 is outside the classes non-negative integers"
    )
    assert _error(tmp_path, {"training": [good, {"image": "images/missing.png", "label": 0}]}) == (
        f"{where} 'image': {tmp_path / 'images' / 'missing.png'} does not exist"
    )
    assert _error(tmp_path, {"training": [good, {"image": 3, "label": 0}]}) == (
        f"{where} 'image': expected a file or folder path, got 3"
    )
    assert "section 'validation', item 0: expected an object" in _error(tmp_path, {"validation": [[1, 2]]})
    assert _error(tmp_path, {"training": {"image": "x"}}) == (
        f"datalist {tmp_path / 'bad.json'}, section 'training': expected a list of items, got a dict"
    )
    assert "must hold a JSON object with the sections, got a list" in _error(tmp_path, [good])


def test_load_datalist_file_and_argument_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="datalist .*nothere.json does not exist"):
        load_datalist(tmp_path / "nothere.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"training": [')
    with pytest.raises(ValueError, match=f"datalist {broken} is not valid JSON"):
        load_datalist(broken)
    empty = _write(tmp_path / "empty.json", {})
    with pytest.raises(ValueError, match=r"num_classes is 2 but class_names has 3 names"):
        load_datalist(empty, class_names=["a", "b", "c"], num_classes=2)
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        load_datalist(empty, num_classes=0)
    with pytest.raises(ValueError, match="class_names must be a list of non-empty strings"):
        load_datalist(empty, class_names="abc")
    with pytest.raises(ValueError, match=r"class_names has repeated names \('a'\): \['a', 'b', 'a'\]"):
        load_datalist(empty, class_names=["a", "b", "a"])
    with pytest.raises(ValueError, match="class_names must be a list of non-empty strings"):
        load_datalist(empty, class_names=["a", ""])


# --- check_items ------------------------------------------------------------------------------------------------


@pytest.fixture
def mixed_items(tmp_path, pngs):
    """Two good PNGs and four bad items of different kinds, in datalist order."""
    bad_png = tmp_path / "cut.png"
    bad_png.write_bytes(pngs[0].read_bytes()[:40])
    text = tmp_path / "text.png"
    text.write_text("not an image")
    return [
        {"image": str(pngs[0]), "label": 0},
        {"image": str(bad_png), "label": 1},
        {"image": str(pngs[1]), "label": 1},
        {"image": str(text), "label": 0},
        {"image": str(pngs[2]), "label": 5},  # outside 3 classes
        {"image": str(tmp_path / "images"), "label": 0},  # a folder
    ]


def test_check_items_raises_at_the_first_bad_item(mixed_items, tmp_path):
    with pytest.raises(BadImageError, match=r"cut\.png: truncated: the PNG ends at byte 40 without its IEND") as info:
        check_items(mixed_items, reader="PILReader", num_classes=3)
    assert info.value.path == mixed_items[1]["image"]
    with pytest.raises(BadImageError, match=r"2\.png: label 5 is outside the classes \[0, 3\)"):
        check_items([mixed_items[0], mixed_items[4]], reader="PILReader", num_classes=3)


def test_check_items_skip_bad_returns_good_items_and_writes_report(mixed_items, tmp_path, caplog):
    report = tmp_path / "reports" / "skipped.json"
    with caplog.at_level(logging.WARNING, logger="monai_medmerge.data.datalist"):
        good = check_items(mixed_items, reader="PILReader", skip_bad=True, report_path=report, num_classes=3)
    assert good == [mixed_items[0], mixed_items[2]]
    assert good[0] is mixed_items[0]
    skipped = json.loads(report.read_text())
    assert [s["image"] for s in skipped] == [mixed_items[i]["image"] for i in (1, 3, 4, 5)]
    assert [s["label"] for s in skipped] == [1, 0, 5, 0]
    reasons = [s["reason"] for s in skipped]
    assert reasons[0] == "truncated: the PNG ends at byte 40 without its IEND chunk"
    assert reasons[1].startswith("PILReader cannot read it: UnidentifiedImageError")
    assert reasons[2] == "label 5 is outside the classes [0, 3)"
    assert reasons[3].startswith("is a folder, and PILReader reads single files")
    assert [p.name for p in report.parent.iterdir()] == ["skipped.json"]  # no temporary file left behind
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("skipping item") for m in messages) == 4
    assert any(m.startswith("skipped 4 of 6 items as bad") for m in messages)


def test_check_items_all_bad_raises_after_writing_the_report(mixed_items, tmp_path):
    report = tmp_path / "skipped.json"
    with pytest.raises(ValueError, match=r"all 2 items are bad, none is left .*cut\.png.*skip list is in"):
        check_items(mixed_items[1:2] + mixed_items[3:4], reader="PILReader", skip_bad=True, report_path=report)
    assert len(json.loads(report.read_text())) == 2


def test_check_items_all_good_writes_an_empty_report(pngs, tmp_path):
    report = tmp_path / "skipped.json"
    items = [{"image": str(p), "label": 0} for p in pngs]
    assert check_items(items, reader="PILReader", skip_bad=True, report_path=report, progress=True) == items
    assert json.loads(report.read_text()) == []
    with pytest.raises(ValueError, match=r"no items to check: section 'validation' is empty"):
        check_items([], reader="PILReader", section="validation")


def test_check_items_dicom_problems(tmp_path):
    pydicom_data = pytest.importorskip("pydicom.data")
    pytest.importorskip("itk")
    source = Path(pydicom_data.__file__).parent / "test_files" / SERIES
    if not source.is_dir():
        pytest.skip(f"pydicom's test series {SERIES} is not installed")
    good = shutil.copytree(source, tmp_path / "good")
    missing = shutil.copytree(source, tmp_path / "missing")
    (missing / "2693").unlink()
    corrupt = shutil.copytree(source, tmp_path / "corrupt")
    (corrupt / "2693").write_bytes((source / "2693").read_bytes()[:2000])
    empty = tmp_path / "empty"
    empty.mkdir()
    items = [{"image": str(p), "label": 0} for p in (good, missing, corrupt, empty)]
    report = tmp_path / "skipped.json"
    assert check_items(items, reader="ITKReader", skip_bad=True, report_path=report) == items[:1]
    reasons = [s["reason"] for s in json.loads(report.read_text())]
    assert reasons[0].startswith("slices are not evenly spaced")
    assert reasons[1].startswith("5 files but 4 slices were read; not read: 2693")
    assert reasons[2] == "the folder is empty: it holds no DICOM files"


def test_check_items_argument_errors(pngs):
    with pytest.raises(ValueError, match="reader 'LoadImage' is not supported"):
        check_items([{"image": str(pngs[0])}], reader="LoadImage")
    with pytest.raises(ValueError, match="item 0 must be a dict with an 'image' key"):
        check_items([{"label": 0}], reader="PILReader")


# --- faults across items and degenerate images --------------------------------------------------------------------


def test_load_datalist_same_image_in_two_sections_or_with_two_labels(tmp_path, pngs):
    leak = {
        "training": [{"image": "images/0.png", "label": 0}],
        "test": [{"image": "images/../images/0.png", "label": 0}],
    }
    message = _error(tmp_path, leak)
    assert f"{pngs[0]} is item 0 of 'training' and item 0 of 'test'; an image in two sections leaks" in message
    (tmp_path / "link.png").symlink_to(pngs[1])  # the same file under another name
    leak = {"training": [{"image": "images/1.png", "label": 0}], "validation": [{"image": "link.png", "label": 0}]}
    assert "item 0 of 'training' and item 0 of 'validation'" in _error(tmp_path, leak)
    clash = {"training": [{"image": "images/2.png", "label": 0}, {"image": "images/2.png", "label": 1}]}
    assert _error(tmp_path, clash).endswith("item 0 of 'training' and item 1 of the same section, with labels 0 and 1")


def test_load_datalist_repeated_items_are_one_warning_with_the_count(tmp_path, pngs, caplog):
    items = [{"image": "images/0.png", "label": 0}] * 3 + [{"image": "images/1.png", "label": 1}] * 2
    path = _write(tmp_path / "d.json", {"training": items})
    with caplog.at_level(logging.WARNING, logger="monai_medmerge.data.datalist"):
        assert len(load_datalist(path)["training"]) == 5
    assert len(caplog.records) == 1
    assert "3 item(s) repeat an earlier item of their section" in caplog.records[0].getMessage()


def test_check_items_counts_degenerate_images_once_per_kind(tmp_path, caplog):
    nib = pytest.importorskip("nibabel")
    ramp = np.linspace(-500, 500, 8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8)
    images = {
        "blank": np.zeros((8, 8, 8), np.float32),
        "blank2": np.full((8, 8, 8), 7, np.float32),
        "air": np.full((8, 8, 8), -3000, np.float32) + np.arange(8, dtype=np.float32),
        "small": np.stack([ramp[0]] * 2, -1),  # 8 x 8 x 2
        "good": ramp,
    }
    items = []
    for name, array in images.items():
        nib.save(nib.Nifti1Image(array, np.eye(4)), str(tmp_path / f"{name}.nii"))
        items.append({"image": str(tmp_path / f"{name}.nii"), "label": 0})
    with caplog.at_level(logging.WARNING, logger="monai_medmerge.data.datalist"):
        good = check_items(
            items, "NibabelReader", section="training", spatial_size=[8, 8, 16], modality="CT", window=[-1000, 1000]
        )
    assert good == items
    messages = sorted(r.getMessage() for r in caplog.records)
    assert len(messages) == 3
    assert messages[0].startswith(
        "1 of 5 images of section 'training' are far smaller than the network input [8, 8, 16]"
    )
    assert "small.nii (8x8x2)" in messages[0]
    assert messages[1].startswith("1 of 5 images of section 'training' lie entirely outside the CT window")
    assert (
        messages[2].startswith("2 of 5 images of section 'training' are constant") and "blank2.nii (7)" in messages[2]
    )
    # MR: a mostly-zero image whose 1st and 99th percentiles are equal.
    caplog.clear()
    sparse = np.zeros((8, 8, 8), np.float32)
    sparse[0, 0, 0] = 1
    nib.save(nib.Nifti1Image(sparse, np.eye(4)), str(tmp_path / "sparse.nii"))
    with caplog.at_level(logging.WARNING, logger="monai_medmerge.data.datalist"):
        check_items([{"image": str(tmp_path / "sparse.nii"), "label": 0}, items[-1]], "NibabelReader", modality="MRI")
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        "1 of 2 images have equal 1th and 99th percentiles, so MR percentile scaling divides by zero (nearly "
        "constant images)"
    ]

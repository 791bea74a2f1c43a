"""Labels for DICOM series: reading the CSV, filtering series, joining, and writing the datalist (no DICOM needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monai_medmerge.data.datalist import load_datalist
from monai_medmerge.dicom.labels import (
    LabelTable,
    filter_series,
    join_labels,
    read_labels,
    split_items,
    write_datalist,
)

SECRET_PATIENTS = ("PAT-SECRET-001", "PAT-SECRET-002", "PAT-SECRET-404")
SECRET_ACCESSIONS = ("ACC-SECRET-A", "ACC-SECRET-B", "ACC-SECRET-404")


def _csv(tmp_path: Path, text: str, name: str = "labels.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _record(study: str, series: str, modality: str = "CT", description: str | None = "axial", **extra) -> dict:
    record = {
        "StudyInstanceUID": study,
        "SeriesInstanceUID": series,
        "Modality": modality,
        "SeriesDescription": description,
        "AccessionNumber": None,
        "PatientID": None,
        "num_instances": 3,
        "path": f"/data/{study}/{series}",
    }
    record.update(extra)
    return record


@pytest.fixture
def records():
    """Four studies of two patients; study 1.2 has a CT and an MR series, study 1.3 two CT series."""
    return [
        _record("1.1", "1.1.1", "CT", "Axial 5mm", AccessionNumber="ACC-SECRET-A", PatientID="PAT-SECRET-001"),
        _record("1.2", "1.2.1", "CT", "axial soft tissue", AccessionNumber="ACC-SECRET-B", PatientID="PAT-SECRET-002"),
        _record("1.2", "1.2.2", "MR", "T1 sag", AccessionNumber="ACC-SECRET-B", PatientID="PAT-SECRET-002"),
        _record("1.3", "1.3.1", "CT", "Axial lung", AccessionNumber=None, PatientID="PAT-SECRET-002"),
        _record("1.3", "1.3.2", "CT", "Coronal lung", AccessionNumber=None, PatientID="PAT-SECRET-002"),
        _record("1.4", "1.4.1", "MR", None, AccessionNumber="ACC-4", PatientID="PAT-4"),
    ]


# ---------------------------------------------------------------- read_labels


def test_read_labels_ints_and_rows(tmp_path):
    path = _csv(tmp_path, "StudyInstanceUID,label,note\n1.1,0,x\n\n 1.2 , 1 ,y\n1.1,0,repeat\n")
    labels = read_labels(path)
    assert isinstance(labels, LabelTable) and isinstance(labels, dict)
    assert labels == {"1.1": 0, "1.2": 1}
    assert labels.rows == {"1.1": 2, "1.2": 4}  # the blank line 3 is skipped but counted
    assert labels.source == str(path) and labels.key == "StudyInstanceUID"


def test_read_labels_class_names_and_indices(tmp_path):
    path = _csv(tmp_path, "\ufeffPatientID,diagnosis\nP1,benign\nP2,malignant\nP3,1.0\n")  # with a byte-order mark
    labels = read_labels(path, key="PatientID", label_column="diagnosis", class_names=["benign", "malignant"])
    assert labels == {"P1": 0, "P2": 1, "P3": 1}


@pytest.mark.parametrize("key", ["AccessionNumber", "PatientID"])
def test_read_labels_unknown_class_name_names_row_not_value(tmp_path, key):
    path = _csv(tmp_path, f"{key},label\nSECRET-1,benign\nSECRET-2,maybe\n")
    with pytest.raises(ValueError, match=r"labels CSV .*labels\.csv, row 3, column 'label': label 'maybe' is") as e:
        read_labels(path, key=key, class_names=["benign", "malignant"])
    assert "SECRET" not in str(e.value)


def test_read_labels_out_of_range_and_non_integer(tmp_path):
    path = _csv(tmp_path, "StudyInstanceUID,label\n1.1,0\n1.2,2\n")
    with pytest.raises(ValueError, match=r"row 3, column 'label': label 2 is outside the classes \[0, 2\)"):
        read_labels(path, class_names=["a", "b"])
    path = _csv(tmp_path, "StudyInstanceUID,label\n1.1,-1\n")
    with pytest.raises(ValueError, match=r"row 2, column 'label': label -1 is outside the classes non-negative"):
        read_labels(path)
    path = _csv(tmp_path, "StudyInstanceUID,label\n1.1,benign\n")
    with pytest.raises(ValueError, match=r"row 2, .*'benign' is not an integer class index \(pass class_names"):
        read_labels(path)
    path = _csv(tmp_path, "StudyInstanceUID,label\n1.1,0.5\n")
    with pytest.raises(ValueError, match=r"row 2, .*'0.5' is not an integer"):
        read_labels(path)


def test_read_labels_duplicates(tmp_path):
    path = _csv(tmp_path, "StudyInstanceUID,label\n1.1,0\n1.2,1\n1.1,1\n")
    with pytest.raises(ValueError, match=r"row 4: StudyInstanceUID 1\.1 has label 1, but row 2 gave it label 0"):
        read_labels(path)
    path = _csv(tmp_path, "PatientID,label\nSECRET-1,0\nSECRET-1,1\n")
    with pytest.raises(ValueError, match=r"row 3: PatientID has label 1, but row 2 gave it label 0") as e:
        read_labels(path, key="PatientID")
    assert "SECRET" not in str(e.value)


def test_read_labels_missing_columns_and_cells(tmp_path):
    path = _csv(tmp_path, "study,diagnosis\n1.1,0\n")
    with pytest.raises(ValueError, match=r"labels\.csv has no column 'StudyInstanceUID' or 'label'; its columns are"):
        read_labels(path)
    with pytest.raises(ValueError, match=r"its columns are \['study', 'diagnosis'\]"):
        read_labels(path, label_column="diagnosis")
    path = _csv(tmp_path, "StudyInstanceUID,label\n,0\n")
    with pytest.raises(ValueError, match=r"row 2: the 'StudyInstanceUID' cell is empty"):
        read_labels(path)
    path = _csv(tmp_path, "StudyInstanceUID,label\n1.1,\n")
    with pytest.raises(ValueError, match=r"row 2: the 'label' cell is empty"):
        read_labels(path)
    path = _csv(tmp_path, "StudyInstanceUID,label\n1.1\n")
    with pytest.raises(ValueError, match=r"row 2: has 1 cells, fewer than the 2 columns"):
        read_labels(path)
    with pytest.raises(ValueError, match=r"labels\.csv is empty"):
        read_labels(_csv(tmp_path, ""))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_labels(tmp_path / "nothing.csv")


def test_read_labels_bad_key_and_class_names(tmp_path):
    path = _csv(tmp_path, "StudyInstanceUID,label\n1.1,0\n")
    with pytest.raises(ValueError, match=r"Unsupported option 'PatientName'.*AccessionNumber"):
        read_labels(path, key="PatientName")
    with pytest.raises(ValueError, match="repeated names"):
        read_labels(path, class_names=["a", "a"])
    with pytest.raises(ValueError, match="list of non-empty strings"):
        read_labels(path, class_names="ab")


# ---------------------------------------------------------------- filter_series


def _series(records):
    return [r["SeriesInstanceUID"] for r in records]


def test_filter_by_modality_and_description(records):
    assert _series(filter_series(records, modality="ct")) == ["1.1.1", "1.2.1", "1.3.1", "1.3.2"]
    assert _series(filter_series(records, modality=["MR", "PT"])) == ["1.2.2", "1.4.1"]
    assert _series(filter_series(records, series_description="^axial")) == ["1.1.1", "1.2.1", "1.3.1"]
    assert _series(filter_series(records, modality="CT", series_description="lung")) == ["1.3.1", "1.3.2"]
    assert _series(filter_series(records, series_description="^$")) == ["1.4.1"]  # no description: ""
    assert filter_series(records) == records and filter_series(records) is not records


def test_filter_by_tags(records):
    records[0]["ImageType"] = ["ORIGINAL", "PRIMARY", "AXIAL"]
    records[0]["SeriesNumber"] = "3"
    for r in records[1:]:
        r["ImageType"], r["SeriesNumber"] = ["DERIVED", "SECONDARY"], "4"
    assert _series(filter_series(records, tags={"SeriesNumber": 3})) == ["1.1.1"]
    assert _series(filter_series(records, tags={"ImageType": "PRIMARY"})) == ["1.1.1"]
    assert _series(filter_series(records, tags={"ImageType": "DERIVED\\SECONDARY", "Modality": "MR"})) == [
        "1.2.2",
        "1.4.1",
    ]
    assert _series(filter_series(records, tags={"SeriesNumber": ["3", "4"]}, modality="MR")) == ["1.2.2", "1.4.1"]
    assert filter_series(records, tags={"AccessionNumber": "nothing"}) == []


def test_filter_errors(records):
    with pytest.raises(ValueError, match=r"series_description '\(' is not a regular expression"):
        filter_series(records, series_description="(")
    with pytest.raises(ValueError, match=r"6 of 6 series records have no 'BodyPartExamined' entry; scan with extra"):
        filter_series(records, tags={"BodyPartExamined": "CHEST"})
    with pytest.raises(ValueError, match="empty list"):
        filter_series(records, tags={"Modality": []})
    with pytest.raises(ValueError, match="modality must be"):
        filter_series(records, modality="")


# ---------------------------------------------------------------- join_labels


def test_join_by_study_every_report_category(records):
    labels = LabelTable({"1.1": 0, "1.2": 1, "1.3": 1, "9.9": 0}, rows={"1.1": 2, "1.2": 3, "1.3": 4, "9.9": 5})
    items, report = join_labels(records, labels)
    # 1.2 and 1.3 have two series each: left out, reported, never guessed
    assert items == [{"image": "/data/1.1/1.1.1", "label": 0, "StudyInstanceUID": "1.1", "SeriesInstanceUID": "1.1.1"}]
    assert report["matched"] == 1 and report["labels"] == 4 and report["series"] == 6
    assert report["labels_without_images"] == {"count": 1, "uids": ["9.9"], "rows": [5]}
    assert report["studies_without_labels"] == ["1.4"]
    assert report["several_candidate_series"] == {"1.2": ["1.2.1", "1.2.2"], "1.3": ["1.3.1", "1.3.2"]}
    assert report["several_candidate_rows"] == [3, 4]
    # after filtering, study 1.2 has one CT series; 1.3 still two
    items, report = join_labels(filter_series(records, modality="CT"), labels)
    assert [(i["StudyInstanceUID"], i["SeriesInstanceUID"], i["label"]) for i in items] == [
        ("1.1", "1.1.1", 0),
        ("1.2", "1.2.1", 1),
    ]
    assert report["several_candidate_series"] == {"1.3": ["1.3.1", "1.3.2"]}
    assert report["studies_without_labels"] == []  # 1.4 (MR only) was filtered out


def test_join_by_accession_reports_rows_not_values(records, caplog):
    labels = LabelTable(
        {"ACC-SECRET-A": 1, "ACC-SECRET-B": 0, "ACC-SECRET-404": 1},
        rows={"ACC-SECRET-A": 2, "ACC-SECRET-B": 3, "ACC-SECRET-404": 4},
    )
    with caplog.at_level("DEBUG"):
        items, report = join_labels(filter_series(records, modality="CT"), labels, key="AccessionNumber")
    assert [(i["StudyInstanceUID"], i["label"]) for i in items] == [("1.1", 1), ("1.2", 0)]
    assert report["labels_without_images"] == {"count": 1, "rows": [4]}
    assert report["studies_without_labels"] == ["1.3"]  # no AccessionNumber at all
    text = json.dumps(report) + caplog.text + json.dumps(items)
    assert not any(v in text for v in SECRET_ACCESSIONS + SECRET_PATIENTS)


def test_join_by_patient_spanning_studies(records, caplog):
    # Patient 002 has studies 1.2 and 1.3: with CT only that is three candidate series, in two studies.
    labels = {"PAT-SECRET-001": 0, "PAT-SECRET-002": 1, "PAT-SECRET-404": 1}  # a plain dict: no row numbers
    with caplog.at_level("DEBUG"):
        items, report = join_labels(filter_series(records, modality="CT"), labels, key="PatientID")
    assert [(i["StudyInstanceUID"], i["label"]) for i in items] == [("1.1", 0)]
    assert report["labels_without_images"] == {"count": 1}
    assert report["several_candidate_series"] == {"1.2": ["1.2.1"], "1.3": ["1.3.1", "1.3.2"]}
    assert "several_candidate_rows" not in report
    assert "study 1.3 has 2 candidate series" in caplog.text
    text = json.dumps(report) + caplog.text + json.dumps(items)
    assert not any(v in text for v in SECRET_ACCESSIONS + SECRET_PATIENTS)


def test_join_keeps_series_without_path(records):
    records[0]["path"] = None  # e.g. found by a DICOMweb search, not yet retrieved
    items, _ = join_labels(records, {"1.1": 1})
    assert items[0]["image"] is None and items[0]["SeriesInstanceUID"] == "1.1.1"
    with pytest.raises(ValueError, match="Unsupported option 'PatientName'"):
        join_labels(records, {}, key="PatientName")
    with pytest.raises(ValueError, match="series record 0 has no StudyInstanceUID"):
        join_labels([{"SeriesInstanceUID": "1"}], {})


# ---------------------------------------------------------------- write_datalist


def _items(tmp_path: Path, n_per_class: dict[int, int]) -> list[dict]:
    items = []
    for label, n in n_per_class.items():
        for i in range(n):
            folder = tmp_path / "images" / f"{label}.{i}"
            folder.mkdir(parents=True)
            items.append(
                {"image": str(folder), "label": label, "StudyInstanceUID": f"{label}.{i}", "SeriesInstanceUID": "s"}
            )
    return items


def test_write_datalist_one_section_with_names_and_report(tmp_path):
    items = _items(tmp_path, {0: 2, 1: 1})
    path = write_datalist(items, tmp_path / "out" / "list.json", section="test", class_names=["no", "yes"], report={})
    content = json.loads(path.read_text())
    assert content["labels"] == {"0": "no", "1": "yes"} and list(content) == ["labels", "test"]
    assert content["test"] == items
    assert json.loads((tmp_path / "out" / "list_report.json").read_text()) == {}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["list.json", "list_report.json"]  # no temp files
    loaded = load_datalist(path, class_names=["no", "yes"], sections=["test"])
    assert [i["label"] for i in loaded["test"]] == [0, 0, 1]


def test_write_datalist_split_by_study_stratified_and_seeded(tmp_path):
    items = _items(tmp_path, {0: 10, 1: 5})
    items.append(dict(items[0], SeriesInstanceUID="s2"))  # a second series of study 0.0 stays with the first
    path = write_datalist(items, tmp_path / "list.json", split=(0.6, 0.2, 0.2), seed=3)
    content = json.loads(path.read_text())
    counts = {s: [sum(1 for i in content[s] if i["label"] == c) for c in (0, 1)] for s in content}
    study_00 = [s for s in content if any(i["StudyInstanceUID"] == "0.0" for i in content[s])]
    assert len(study_00) == 1
    counts[study_00[0]][0] -= 1
    assert counts == {"training": [6, 3], "validation": [2, 1], "test": [2, 1]}
    assert split_items(items, (0.6, 0.2, 0.2), seed=3) == content
    assert split_items(items, (0.6, 0.2, 0.2), seed=4) != content
    loaded = load_datalist(path)
    assert sum(len(v) for v in loaded.values()) == 16


def test_split_small_classes_still_fills_every_section(tmp_path):
    # one study per class: per-class rounding alone would put both in training
    items = _items(tmp_path, {0: 1, 1: 1, 2: 1})
    sections = split_items(items, (1 / 3, 1 / 3, 1 / 3))
    assert sorted(len(v) for v in sections.values()) == [1, 1, 1]
    assert [len(v) for v in split_items(items, (1.0, 0.0, 0.0)).values()] == [3, 0, 0]


def test_write_datalist_errors(tmp_path):
    items = _items(tmp_path, {0: 1, 1: 1})
    with pytest.raises(ValueError, match=r"item 0 \(study 0\.0\): has no image path; .*materialize_series"):
        write_datalist([dict(items[0], image=None)], tmp_path / "x.json")
    with pytest.raises(ValueError, match=r"item 1 \(study 1\.0\): label 1 is outside the classes \[0, 1\)"):
        write_datalist(items, tmp_path / "x.json", class_names=["only"])
    with pytest.raises(ValueError, match="split must be three fractions"):
        write_datalist(items, tmp_path / "x.json", split=(0.5, 0.5))
    with pytest.raises(ValueError, match="split must be three fractions"):
        write_datalist(items, tmp_path / "x.json", split=(0.5, 0.4, 0.2))
    with pytest.raises(ValueError, match="'train' is not a valid value"):
        write_datalist(items, tmp_path / "x.json", section="train")
    assert not list(tmp_path.glob("*.json"))

"""Datalists from folders of DICOM studies, on real DICOM files written at test time with pydicom."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("itk")

from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from monai_medmerge.data.datalist import load_datalist  # noqa: E402
from monai_medmerge.data.transforms import CheckedLoadImaged  # noqa: E402
from monai_medmerge.dicom.folders import datalist_from_folder, materialize_series, scan_folder  # noqa: E402
from monai_medmerge.dicom.labels import filter_series  # noqa: E402

# (patient name, patient ID, accession) per study; none of these may reach a log, a report or a datalist.
PEOPLE = {
    "A": ("Secret^Alice", "PID-SECRET-A", "ACC-SECRET-A"),
    "B": ("Secret^Bob", "PID-SECRET-B", "ACC-SECRET-B"),
    "C": ("Secret^Carol", "PID-SECRET-C", "ACC-SECRET-C"),
    "D": ("Secret^Dave", "PID-SECRET-D", "ACC-SECRET-D"),
}
SECRETS = [v for person in PEOPLE.values() for v in person] + ["Secret"]
SOURCES = {"CT": "CT_small.dcm", "MR": "MR_small.dcm"}  # 128 x 128 and 64 x 64
SHAPE = {"CT": (128, 128), "MR": (64, 64)}


def _write_series(
    folders: list[Path],
    study: str,
    study_uid: str,
    modality: str,
    description: str,
    n_slices: int,
    series_number: int,
    prefix: str = "IM",
) -> str:
    """Write ``n_slices`` evenly spaced slices of one new series, dealt over ``folders`` in turn; the series UID."""
    name, patient_id, accession = PEOPLE[study]
    series_uid, frame_uid = generate_uid(), generate_uid()
    template = pydicom.dcmread(get_testdata_file(SOURCES[modality]))
    x, y, z = (float(v) for v in template.ImagePositionPatient)
    for i in range(n_slices):
        ds = template.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber, ds.SeriesNumber = i + 1, series_number
        ds.ImagePositionPatient = [x, y, z + 2.5 * i]
        ds.SliceLocation = z + 2.5 * i
        ds.SliceThickness = 2.5
        ds.SeriesDescription = description
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PatientName, ds.PatientID, ds.AccessionNumber = name, patient_id, accession
        folder = folders[i * len(folders) // n_slices]
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / f"{prefix}{series_number}_{i:03d}", enforce_file_format=True)  # no .dcm suffix
    return series_uid


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Four studies: A (CT and MR, own folders), B (CT), C (CT and MR mixed in one folder), D (CT over two folders).

    Also a text file, a DICOMDIR, a copy of a DICOMDIR under another name, and hidden files.
    """
    root = tmp_path_factory.mktemp("dicom") / "studies"
    uids = {s: generate_uid() for s in PEOPLE}
    series = {
        ("A", "CT"): _write_series([root / "s1" / "ct"], "A", uids["A"], "CT", "Axial 2.5mm", 4, 2),
        ("A", "MR"): _write_series([root / "s1" / "mr"], "A", uids["A"], "MR", "T1 axial", 3, 3),
        ("B", "CT"): _write_series([root / "s2" / "ct"], "B", uids["B"], "CT", "Axial 2.5mm", 3, 2),
        ("C", "CT"): _write_series([root / "s3" / "mixed"], "C", uids["C"], "CT", "axial soft", 3, 2, "CT"),
        ("C", "MR"): _write_series([root / "s3" / "mixed"], "C", uids["C"], "MR", "T2 localizer", 3, 5, "MR"),
        ("D", "CT"): _write_series([root / "s4" / "a", root / "s4" / "b"], "D", uids["D"], "CT", "AXIAL", 4, 2),
    }
    (root / "README.txt").write_text("not DICOM\n")
    shutil.copy(get_testdata_file("DICOMDIR"), root / "DICOMDIR")
    shutil.copy(get_testdata_file("DICOMDIR"), root / "s2" / "ct" / "index")  # a DICOM file with no image, among others
    (root / ".DS_Store").write_bytes(b"\0\1")
    (root / "s1" / "ct" / ".hidden").write_text("ignored, also by the series loader")
    return {"root": root, "study": uids, "series": series}


def _labels_csv(path: Path, header: str, rows: list[tuple[str, object]]) -> Path:
    path.write_text(f"{header},label\n" + "".join(f"{k},{v}\n" for k, v in rows))
    return path


def _by_series(records: list[dict]) -> dict[str, dict]:
    return {r["SeriesInstanceUID"]: r for r in records}


def test_scan_groups_series(tree):
    root, series = tree["root"], tree["series"]
    records, skipped = scan_folder(root, extra_tags=["SeriesNumber", "ImageType", "ReferencedImageSequence"])
    found = _by_series(records)
    assert set(found) == set(series.values())
    assert [r["StudyInstanceUID"] for r in records] == sorted(r["StudyInstanceUID"] for r in records)
    a_ct = found[series["A", "CT"]]
    assert a_ct["StudyInstanceUID"] == tree["study"]["A"]
    assert (a_ct["Modality"], a_ct["SeriesDescription"], a_ct["num_instances"]) == ("CT", "Axial 2.5mm", 4)
    assert (a_ct["PatientID"], a_ct["AccessionNumber"]) == ("PID-SECRET-A", "ACC-SECRET-A")
    assert a_ct["SeriesNumber"] == "2" and a_ct["ImageType"] == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert a_ct["ReferencedImageSequence"] is None  # absent; a sequence would also give None
    # series alone in their folder (hidden files aside) get the folder
    assert a_ct["path"] == str(root / "s1" / "ct")
    assert found[series["A", "MR"]]["path"] == str(root / "s1" / "mr")
    assert len(a_ct["files"]) == 4 and all(Path(f).parent == root / "s1" / "ct" for f in a_ct["files"])
    # a folder with two series, a series over two folders, a series beside a stray file: no path, the files
    for key, n in ((("C", "CT"), 3), (("C", "MR"), 3), (("D", "CT"), 4), (("B", "CT"), 3)):
        record = found[series[key]]
        assert record["path"] is None and record["num_instances"] == n and len(record["files"]) == n
    d_ct = found[series["D", "CT"]]
    assert {Path(f).parent.name for f in d_ct["files"]} == {"a", "b"}
    assert found[series["C", "MR"]]["Modality"] == "MR"
    assert {Path(s["path"]).name: s["reason"].split(":")[0] for s in skipped} == {
        "README.txt": "not DICOM",
        "index": "DICOM without a StudyInstanceUID or SeriesInstanceUID",
    }
    with pytest.raises(ValueError, match=r"extra_tags must be DICOM keywords .*got \['BodyPart'\]"):
        scan_folder(root, extra_tags=["BodyPart"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_folder(root / "nothing")
    with pytest.raises(NotADirectoryError):
        scan_folder(root / "README.txt")


def test_scan_filter_by_modality_description_tags(tree):
    series = tree["series"]
    records, _ = scan_folder(tree["root"], extra_tags=["SeriesNumber"])

    def found(**kw):
        return {r["SeriesInstanceUID"] for r in filter_series(records, **kw)}

    assert found(modality="MR") == {series["A", "MR"], series["C", "MR"]}
    assert found(series_description="^axial") == {series[s, "CT"] for s in "ABCD"}
    assert found(modality="MR", series_description="localizer") == {series["C", "MR"]}
    assert found(tags={"SeriesNumber": [3, 5]}) == {series["A", "MR"], series["C", "MR"]}


def _load_all(datalist: Path, **kwargs) -> dict[str, list[dict]]:
    loaded = load_datalist(datalist, **kwargs)
    loader = CheckedLoadImaged(keys="image", reader="ITKReader")
    for items in loaded.values():
        for item in items:
            item["volume"] = loader({"image": item["image"]})["image"]
    return loaded


def test_datalist_by_study_with_materialized_series(tree, tmp_path):
    study, series = tree["study"], tree["series"]
    csv = _labels_csv(
        tmp_path / "labels.csv",
        "StudyInstanceUID",
        [(study["A"], "normal"), (study["B"], "abnormal"), (study["C"], 0), (study["D"], "abnormal"), ("1.2.3.4", 1)],
    )
    out = tmp_path / "lists" / "ct.json"
    report = datalist_from_folder(
        tree["root"],
        csv,
        out,
        class_names=["normal", "abnormal"],
        modality="CT",
        materialize_dir=tmp_path / "series",
    )
    assert report["matched"] == 4 and report["written"] == 4 and report["series_after_filter"] == 4
    assert report["labels_without_images"] == {"count": 1, "uids": ["1.2.3.4"], "rows": [6]}
    assert report["studies_without_labels"] == [] and report["several_candidate_series"] == {}
    assert report["materialized"] == {
        study["B"]: [series["B", "CT"]],
        study["C"]: [series["C", "CT"]],
        study["D"]: [series["D", "CT"]],
    }
    assert report["series_without_own_folder"] == {}
    assert report["scan"]["series"] == 6 and report["scan"]["instances"] == 20
    assert len(report["scan"]["skipped_files"]) == 2 and report["sections"] == {"training": 4}
    assert json.loads((tmp_path / "lists" / "ct_report.json").read_text()) == report
    assert json.loads(out.read_text())["labels"] == {"0": "normal", "1": "abnormal"}

    loaded = _load_all(out, class_names=["normal", "abnormal"], sections=["training"])
    got = {i["StudyInstanceUID"]: (i["label"], tuple(i["volume"].shape)) for i in loaded["training"]}
    assert got == {
        study["A"]: (0, (1, 128, 128, 4)),
        study["B"]: (1, (1, 128, 128, 3)),
        study["C"]: (0, (1, 128, 128, 3)),
        study["D"]: (1, (1, 128, 128, 4)),
    }
    first = next(i for i in loaded["training"] if i["StudyInstanceUID"] == study["A"])
    assert first["SeriesInstanceUID"] == series["A", "CT"] and first["image"] == str(tree["root"] / "s1" / "ct")


def test_datalist_without_materialize_dir_reports_mixed_series(tree, tmp_path, caplog):
    study, series = tree["study"], tree["series"]
    csv = _labels_csv(tmp_path / "labels.csv", "StudyInstanceUID", [(study[s], i % 2) for i, s in enumerate("ABCD")])
    with caplog.at_level("INFO"):
        report = datalist_from_folder(tree["root"], csv, tmp_path / "dl.json", series_description="^axial")
    assert report["matched"] == 4 and report["written"] == 1
    assert report["series_without_own_folder"] == {study[s]: [series[s, "CT"]] for s in "BCD"}
    assert f"study {study['C']}: series {series['C', 'CT']} has no folder of its own" in caplog.text
    assert [i["StudyInstanceUID"] for i in load_datalist(tmp_path / "dl.json")["training"]] == [study["A"]]


def test_several_candidates_and_studies_without_labels(tree, tmp_path):
    study, series = tree["study"], tree["series"]
    csv = _labels_csv(tmp_path / "labels.csv", "StudyInstanceUID", [(study["A"], 1), (study["D"], 0)])
    report = datalist_from_folder(tree["root"], csv, tmp_path / "dl.json", materialize_dir=tmp_path / "m")
    # study A has a CT and an MR series: not guessed
    assert report["several_candidate_series"] == {study["A"]: sorted([series["A", "CT"], series["A", "MR"]])}
    assert report["studies_without_labels"] == sorted([study["B"], study["C"]])
    assert report["matched"] == 1 and report["labels_without_images"] == {"count": 0, "uids": [], "rows": []}
    assert report["several_candidate_rows"] == [2]


@pytest.mark.parametrize("key", ["StudyInstanceUID", "AccessionNumber", "PatientID"])
def test_join_by_each_key_leaks_no_identifiers(tree, tmp_path, caplog, key):
    study = tree["study"]
    column = {"StudyInstanceUID": None, "AccessionNumber": 2, "PatientID": 1}[key]
    values = {s: study[s] if column is None else PEOPLE[s][column] for s in "ABCD"}
    unknown = "1.2.3.9" if column is None else f"{key[:3].upper()}-SECRET-UNKNOWN"
    rows = [(values["A"], 1), (values["B"], 0), (values["C"], 1), (unknown, 0)]
    csv = _labels_csv(tmp_path / "labels.csv", key, rows)
    out = tmp_path / "dl.json"
    with caplog.at_level("DEBUG"):
        report = datalist_from_folder(
            tree["root"], csv, out, key=key, modality="CT", split=(0.5, 0.5, 0.0), materialize_dir=tmp_path / "m"
        )
    assert report["matched"] == 3 and report["written"] == 3
    assert report["labels_without_images"]["count"] == 1 and report["labels_without_images"]["rows"] == [5]
    assert ("uids" in report["labels_without_images"]) == (key == "StudyInstanceUID")
    assert report["studies_without_labels"] == [study["D"]]
    assert sum(report["sections"].values()) == 3 and report["sections"]["test"] == 0
    assert f"joined 4 labels (by {key}) with 4 series: 3 matched" in caplog.text
    written = out.read_text() + (tmp_path / "dl_report.json").read_text() + caplog.text
    assert [s for s in SECRETS if s in written] == []
    assert (unknown in written) == (key == "StudyInstanceUID")  # a UID may be named, other keys never
    labels = {i["StudyInstanceUID"]: i["label"] for s in load_datalist(out).values() for i in s}
    assert labels == {study["A"]: 1, study["B"]: 0, study["C"]: 1}


def test_materialize_series(tree, tmp_path):
    records, _ = scan_folder(tree["root"])
    record = _by_series(records)[tree["series"]["D", "CT"]]
    path = Path(materialize_series(record, tmp_path / "m"))
    assert path == tmp_path / "m" / record["StudyInstanceUID"] / record["SeriesInstanceUID"]
    assert sorted(p.name for p in path.iterdir()) == ["00000.dcm", "00001.dcm", "00002.dcm", "00003.dcm"]
    assert os.path.samefile(path / "00000.dcm", record["files"][0])  # hard-linked on this file system
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary folder left
    volume = CheckedLoadImaged(keys="image", reader="ITKReader")({"image": str(path)})["image"]
    assert tuple(volume.shape) == (1, 128, 128, 4)
    assert [round(float(s), 4) for s in volume.pixdim] == [0.6615, 0.6615, 2.5]
    assert materialize_series(record, tmp_path / "m") == str(path)  # kept as it is on a rerun
    copied = Path(materialize_series(record, tmp_path / "copy", hardlink=False))
    assert not os.path.samefile(copied / "00000.dcm", record["files"][0])
    (path / "00003.dcm").unlink()
    with pytest.raises(FileExistsError, match="holds other files than series"):
        materialize_series(record, tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        materialize_series(dict(record, files=record["files"] + [str(tmp_path / "gone")]), tmp_path / "m2")
    with pytest.raises(ValueError, match="has no 'files'"):
        materialize_series(dict(record, files=[]), tmp_path / "m")
    with pytest.raises(ValueError, match="cannot be used as a folder name"):
        materialize_series(dict(record, SeriesInstanceUID="../x"), tmp_path / "m")


def test_no_match_raises_and_writes_report(tree, tmp_path):
    csv = _labels_csv(tmp_path / "labels.csv", "StudyInstanceUID", [("1.2.3.4", 0)])
    with pytest.raises(ValueError, match=r"no labelled series to write .*0 of 1 labels matched.*dl_report\.json"):
        datalist_from_folder(tree["root"], csv, tmp_path / "dl.json")
    assert not (tmp_path / "dl.json").exists()
    assert json.loads((tmp_path / "dl_report.json").read_text())["labels_without_images"]["uids"] == ["1.2.3.4"]


def test_bad_csv_fails_before_scan(tree, tmp_path):
    csv = _labels_csv(tmp_path / "labels.csv", "PatientID", [("PID-SECRET-A", 0), ("PID-SECRET-B", "maybe")])
    with pytest.raises(ValueError, match=r"labels\.csv, row 3, column 'label': label 'maybe'") as e:
        datalist_from_folder(tmp_path / "no such folder", csv, tmp_path / "dl.json", key="PatientID")
    assert "SECRET" not in str(e.value)


@pytest.mark.parametrize("split", [(0.5, 0.5, 0.5), (-1, 1, 1), (0.8, 0.2)])
def test_bad_split_fails_before_scan(tmp_path, split):
    csv = _labels_csv(tmp_path / "labels.csv", "StudyInstanceUID", [("1.2.3.4", 0)])
    with pytest.raises(ValueError, match=r"split must be three fractions \(train, val, test\)"):
        datalist_from_folder(tmp_path / "no such folder", csv, tmp_path / "dl.json", split=split)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv"]


def test_materialize_series_failing_half_way_leaves_nothing(tree, tmp_path, monkeypatch):
    records, _ = scan_folder(tree["root"])
    record = _by_series(records)[tree["series"]["C", "MR"]]
    copied = []

    def copy_then_fail(source, dest):
        if copied:
            raise OSError("disk full")
        copied.append(shutil.copyfile(source, dest))

    monkeypatch.setattr("monai_medmerge.dicom.folders.shutil.copy2", copy_then_fail)
    with pytest.raises(OSError, match="disk full"):
        materialize_series(record, tmp_path / "m", hardlink=False)
    assert len(copied) == 1 and list((tmp_path / "m" / record["StudyInstanceUID"]).iterdir()) == []
    monkeypatch.undo()
    path = Path(materialize_series(record, tmp_path / "m", hardlink=False))
    volume = CheckedLoadImaged(keys="image", reader="ITKReader")({"image": str(path)})["image"]
    assert tuple(volume.shape) == (1, 64, 64, 3)

from __future__ import annotations

import json

import pytest

from monai_medmerge.cli import main


def _study(folder, n=3):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    study, series = generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    for i in range(n):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * i]
        ds.save_as(folder / f"{i}.dcm")
    return study


def test_dicom_datalist_command(tmp_path, capsys):
    a = _study(tmp_path / "studies" / "one")
    b = _study(tmp_path / "studies" / "two")
    (tmp_path / "labels.csv").write_text(f"StudyInstanceUID,label\n{a},tumour\n{b},normal\n1.2.3.4,normal\n")
    out = tmp_path / "datalist.json"
    args = [str(tmp_path / "studies"), "--labels", str(tmp_path / "labels.csv"), "--out", str(out)]
    assert main(["dicom-datalist", *args, "--classes", "normal", "tumour", "--modality", "CT", "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["matched"] == 2 and summary["labels_without_images"] == 1
    datalist = json.loads(out.read_text())
    assert sorted(i["label"] for i in datalist["training"]) == [0, 1]
    assert datalist["labels"] == {"0": "normal", "1": "tumour"}
    report = json.loads((tmp_path / "datalist_report.json").read_text())
    assert report["labels_without_images"]["uids"] == ["1.2.3.4"]
    # a label that is not a class name: a clear error naming the CSV row, nothing written
    (tmp_path / "bad.csv").write_text(f"StudyInstanceUID,label\n{a},cyst\n")
    bad_out = tmp_path / "bad.json"
    args = [str(tmp_path / "studies"), "--labels", str(tmp_path / "bad.csv"), "--out", str(bad_out)]
    assert main(["dicom-datalist", *args, "--classes", "normal", "tumour", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bad.csv" in err and "row 2" in err and not bad_out.exists()

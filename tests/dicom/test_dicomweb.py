"""DICOMweb against a real Orthanc started by the tests: search, retrieval with a cache, datalists, a tiny merge
trained on the retrieved series, inference over DICOMweb, and the failure cases (wrong password, no server, a
retrieval that breaks half-way, an instance without pixel data). Skips, naming `.ci/orthanc`, without Orthanc."""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import snapshot
from orthanc_server import (
    PASSWORD,
    SKIP_HINT,
    USER,
    make_series,
    make_sources,
    pydicom_file,
    require_dicomweb_client,
    start_orthanc,
    without_pixels,
)

from medmerge_bench.orthanc import OrthancServer, OrthancUnavailable, free_port
from monai_medmerge.data.transforms import series_files

BUNDLE = Path(__file__).resolve().parents[2] / "bundles" / "medmerge_classification"
CLASS_NAMES = ["dark", "bright"]
PER_CLASS = 8
SLICES = 8


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real Orthanc for this module: own configuration and storage, free loopback port; stopped by PID."""
    orthanc = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    pid = orthanc.pid
    yield orthanc
    orthanc.stop()
    assert not orthanc.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.fixture(scope="module")
def studies(server, tmp_path_factory):
    """Upload the test data once: PER_CLASS bright and PER_CLASS dark CT studies (one 8-slice series each, the first
    dark one with an extra instance without pixel data), a study with two candidate series, pydicom's CT_small and
    MR_small; and a labels CSV that also names the MR study and a study that is not on the server."""
    root = tmp_path_factory.mktemp("studies")
    from pydicom.uid import generate_uid

    labelled, files, phi = {}, [], []
    series_of = {}
    for i in range(2 * PER_CLASS):
        bright = i % 2 == 1
        study = generate_uid()
        patient_id, patient_name, accession = f"PID-{4711 + i}-X", f"Doe^Jane{i:02d}", f"ACC-{9000 + i}"
        phi += [patient_id, patient_name, patient_name.replace("^", " "), accession]
        paths = make_series(
            root / f"s{i:02d}",
            bright=bright,
            n_slices=SLICES,
            seed=i,
            study_uid=study,
            patient_id=patient_id,
            patient_name=patient_name,
            accession=accession,
        )
        files += paths
        labelled[study] = CLASS_NAMES[int(bright)]
        series_of[study] = paths
    dark_with_sr = next(s for s, c in labelled.items() if c == "dark")
    no_pixels = without_pixels(series_of[dark_with_sr][0], root / "nopixels.dcm")
    files.append(no_pixels)
    several = generate_uid()
    for j in range(2):
        files += make_series(root / f"several{j}", bright=True, n_slices=4, seed=50 + j, study_uid=several)
    ct_small, mr_small = pydicom_file("CT_small.dcm"), pydicom_file("MR_small.dcm")
    files += [ct_small, mr_small]
    server.upload(files)

    import pydicom

    mr_study = pydicom.dcmread(mr_small, stop_before_pixels=True).StudyInstanceUID
    ct_study = pydicom.dcmread(ct_small, stop_before_pixels=True).StudyInstanceUID
    missing = generate_uid()
    csv_path = root / "labels.csv"
    rows = [*labelled.items(), (several, "bright"), (mr_study, "dark"), (missing, "bright")]
    csv_path.write_text("StudyInstanceUID,label\n" + "".join(f"{s},{c}\n" for s, c in rows))
    sop_no_pixels = pydicom.dcmread(no_pixels, stop_before_pixels=True).SOPInstanceUID
    return {
        "labels": csv_path,
        "labelled": labelled,
        "series_of": series_of,
        "dark_with_sr": dark_with_sr,
        "sop_no_pixels": sop_no_pixels,
        "several": several,
        "mr_study": mr_study,
        "ct_study": ct_study,
        "missing": missing,
        "phi": phi,
    }


def _source(server, cache_dir, **kwargs):
    from monai_medmerge.dicom.web import DICOMwebSource

    return DICOMwebSource(server.dicomweb_url, USER, PASSWORD, cache_dir=cache_dir, **kwargs)


def _assert_no_phi(text: str, phi) -> None:
    leaked = [value for value in phi if value in text]
    assert not leaked, f"identifying values in the output: {leaked}"


# --- the server ------------------------------------------------------------------------------------------------------
def test_orthanc_configuration(server):
    config = json.loads(server.config_path.read_text())
    assert config["RemoteAccessAllowed"] is False and config["AuthenticationEnabled"] is True
    assert config["DicomServerEnabled"] is False
    assert config["RegisteredUsers"] == {USER: PASSWORD}
    assert config["DicomWeb"]["Root"] == "/dicom-web/" and Path(config["Plugins"][0]).is_file()
    assert Path(config["StorageDirectory"]).is_relative_to(server.storage_dir)
    import requests

    assert requests.get(server.url + "/system", timeout=10).status_code == 401
    assert server.system()["HttpPort"] == server.http_port
    assert "dicom-web" in server.get("/plugins").json()


def test_orthanc_unavailable_says_what_to_install(tmp_path):
    with pytest.raises(OrthancUnavailable, match=r"\.ci/orthanc"):
        OrthancServer(tmp_path, USER, PASSWORD, executable=str(tmp_path / "no" / "Orthanc"))
    with pytest.raises(OrthancUnavailable, match=r"\.ci/orthanc"):
        OrthancServer(tmp_path, USER, PASSWORD, plugin=tmp_path / "libOrthancDicomWeb.so")


# --- search ----------------------------------------------------------------------------------------------------------
def test_search_series_with_filters(server, studies, tmp_path):
    source = _source(server, tmp_path / "cache")
    ct = source.search_series(modality="CT")
    ct_studies = {r["StudyInstanceUID"] for r in ct}
    assert set(studies["labelled"]) <= ct_studies and studies["ct_study"] in ct_studies
    assert studies["mr_study"] not in ct_studies
    assert len([r for r in ct if r["StudyInstanceUID"] == studies["several"]]) == 2
    record = next(r for r in ct if r["StudyInstanceUID"] == studies["dark_with_sr"])
    assert set(record) >= {
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "SeriesDescription",
        "AccessionNumber",
        "PatientID",
        "num_instances",
        "path",
    }
    assert record["num_instances"] == SLICES + 1 and record["path"] is None
    assert record["Modality"] == "CT" and record["SeriesDescription"] == "AX T1"
    assert record["PatientID"].startswith("PID-") and record["AccessionNumber"].startswith("ACC-")
    # the description is a case-insensitive regular expression, as for folder scans; CT_small has none
    described = source.search_series(modality="ct", series_description=r"^ax\s+t1$")
    assert {r["StudyInstanceUID"] for r in described} == set(studies["labelled"]) | {studies["several"]}
    one = source.search_series(study_uids=[studies["mr_study"]])
    assert [r["Modality"] for r in one] == ["MR"]
    numbered = source.search_series(modality="CT", SeriesNumber=1, fields=["ImageType"])
    # CT_small's series is number 1 too
    expected = {r["StudyInstanceUID"] for r in described} | {studies["ct_study"]}
    assert {r["StudyInstanceUID"] for r in numbered} == expected
    assert all("ImageType" in r for r in numbered)
    assert source.search_series(modality="CT", SeriesNumber=7) == []
    assert set(source.search_studies()) >= set(studies["labelled"]) | {studies["mr_study"], studies["ct_study"]}


# --- retrieval -------------------------------------------------------------------------------------------------------
def test_retrieve_skips_instance_without_pixels(server, studies, tmp_path):
    from monai_medmerge.data.transforms import CheckedLoadImaged

    source = _source(server, tmp_path / "cache")
    (record,) = source.search_series(study_uids=[studies["dark_with_sr"]])
    folder = source.retrieve_series(record)
    assert folder == tmp_path / "cache" / record["StudyInstanceUID"] / record["SeriesInstanceUID"]
    assert record["path"] == str(folder) and record["num_instances"] == SLICES + 1  # on the server
    assert record["skipped"] == [{"SOPInstanceUID": studies["sop_no_pixels"], "reason": "no pixel data"}]
    files = sorted(folder.iterdir())
    assert len(files) == SLICES and all(p.suffix == ".dcm" for p in files)
    assert studies["sop_no_pixels"] not in {p.stem for p in files}
    marker = json.loads((folder.parent / f".{folder.name}.complete.json").read_text())
    assert sorted(marker["instances"]) == sorted(p.stem for p in files)
    assert marker["skipped"] == record["skipped"]
    # the folder is a series the strict loader accepts: all slices read, evenly spaced
    image = CheckedLoadImaged("image", reader="ITKReader")({"image": str(folder)})["image"]
    assert tuple(image.shape) == (1, 32, 32, SLICES)
    # a complete series is not asked for again
    before = source.fetched_instances
    assert source.retrieve_series(dict(record, path=None)) == folder
    assert source.fetched_instances == before


def test_half_way_failure_is_reported_and_rerun_fetches_only_missing(server, studies, tmp_path, caplog):
    from monai_medmerge.dicom.web import datalist_from_dicomweb

    caplog.set_level(logging.DEBUG)
    chosen = [s for s in studies["labelled"] if s != studies["dark_with_sr"]][:3]
    labels = tmp_path / "labels.csv"
    labels.write_text("StudyInstanceUID,label\n" + "".join(f"{s},{studies['labelled'][s]}\n" for s in chosen))
    broken = chosen[1]
    source = _source(server, tmp_path / "cache")
    real_iter, real_retrieve = source.client.iter_series, source.client.retrieve_instance
    calls = {"iter_series": 0, "retrieve_instance": 0}

    def breaking_iter(study, series, **kwargs):
        calls["iter_series"] += 1
        for n, dataset in enumerate(real_iter(study, series, **kwargs)):
            if study == broken and n == 1:
                raise RuntimeError("simulated: the connection dropped after the first instance")
            yield dataset

    def counting_retrieve(*args, **kwargs):
        calls["retrieve_instance"] += 1
        return real_retrieve(*args, **kwargs)

    source.client.iter_series = breaking_iter
    source.client.retrieve_instance = counting_retrieve
    out = tmp_path / "datalist.json"
    report = datalist_from_dicomweb(source, labels, out, class_names=CLASS_NAMES, modality="CT")
    assert [f["StudyInstanceUID"] for f in report["failed"]] == [broken]
    assert report["failed"][0]["error"].startswith("RuntimeError: simulated")
    assert report["retrieved"] == 2 and report["fetched_instances"] == 2 * SLICES + 1
    written = json.loads(out.read_text())
    assert sorted(i["StudyInstanceUID"] for i in written["training"]) == sorted(s for s in chosen if s != broken)
    assert json.loads(out.with_name("datalist_report.json").read_text())["failed"] == report["failed"]
    # the broken series kept its first instance, is not complete, and holds no partial file
    (record,) = source.search_series(study_uids=[broken])
    folder = source.series_dir(record)
    assert len(list(folder.iterdir())) == 1 and source.cached_series(record) is None
    assert not list(folder.parent.rglob("*.part")) and not list(folder.parent.rglob("*.tmp"))

    def counting_iter(*args, **kwargs):
        calls["iter_series"] += 1
        return real_iter(*args, **kwargs)

    source.client.iter_series = counting_iter
    calls.update(iter_series=0, retrieve_instance=0)
    report = datalist_from_dicomweb(source, labels, out, class_names=CLASS_NAMES, modality="CT")
    assert report["failed"] == [] and report["retrieved"] == 3
    assert report["fetched_instances"] == SLICES - 1
    assert calls == {"iter_series": 0, "retrieve_instance": SLICES - 1}
    assert len(json.loads(out.read_text())["training"]) == 3
    assert len(list(folder.iterdir())) == SLICES
    _assert_no_phi(caplog.text, studies["phi"])


def test_short_stream_is_completed_instance_by_instance(server, studies, tmp_path):
    """A series stream that ends early without an error is caught by the count from the search: the instances are
    listed and only the missing ones fetched."""
    source = _source(server, tmp_path / "cache")
    study = list(studies["labelled"])[2]
    (record,) = source.search_series(study_uids=[study])
    real_iter, real_retrieve = source.client.iter_series, source.client.retrieve_instance
    fetched = []
    source.client.iter_series = lambda *a, **k: (d for n, d in enumerate(real_iter(*a, **k)) if n < 3)

    def counting_retrieve(study_uid, series_uid, sop_uid, **kwargs):
        fetched.append(sop_uid)
        return real_retrieve(study_uid, series_uid, sop_uid, **kwargs)

    source.client.retrieve_instance = counting_retrieve
    folder = source.retrieve_series(record)
    assert len(fetched) == SLICES - 3 and len(set(fetched)) == len(fetched)
    assert sorted(p.stem for p in folder.iterdir()) == sorted(source.instance_uids(study, record["SeriesInstanceUID"]))


def test_transient_failures_are_retried(server, studies, tmp_path, caplog):
    import requests

    source = _source(server, tmp_path / "cache", retries=3, backoff=0.01)
    study = next(iter(studies["labelled"]))
    (record,) = source.search_series(study_uids=[study])
    real_iter = source.client.iter_series
    failures = []

    def flaky_iter(*args, **kwargs):
        if len(failures) < 2:
            response = requests.Response()
            response.status_code = 503
            failures.append(503)
            raise requests.HTTPError("503 Server Error", response=response)
        return real_iter(*args, **kwargs)

    source.client.iter_series = flaky_iter
    with caplog.at_level(logging.WARNING):
        folder = source.retrieve_series(record)
    assert len(failures) == 2 and len(list(folder.iterdir())) == SLICES
    assert "retry 2 of 3" in caplog.text


def test_wrong_password_is_an_auth_error_at_once(server, tmp_path):
    from monai_medmerge.dicom.web import DICOMwebAuthError, DICOMwebSource

    source = DICOMwebSource(server.dicomweb_url, USER, "not-the-password", retries=5, backoff=2.0, cache_dir=tmp_path)
    start = time.monotonic()
    with pytest.raises(DICOMwebAuthError, match="HTTP 401") as info:
        source.search_series(modality="CT")
    assert time.monotonic() - start < 1.5, "an authentication error must not be retried"
    assert server.dicomweb_url in str(info.value) and "not-the-password" not in str(info.value)
    token = DICOMwebSource(server.dicomweb_url, token="abc.def", retries=5, backoff=2.0, cache_dir=tmp_path)
    assert token.session.headers["Authorization"] == "Bearer abc.def"
    with pytest.raises(DICOMwebAuthError):
        token.search_studies()


def test_server_not_running_is_a_connection_error_after_retries(tmp_path):
    require_dicomweb_client()
    from monai_medmerge.dicom.web import DICOMwebConnectionError, DICOMwebSource

    url = f"http://127.0.0.1:{free_port()}/dicom-web"  # nothing listens there
    source = DICOMwebSource(url, USER, PASSWORD, retries=2, backoff=0.01, timeout=5, cache_dir=tmp_path)
    attempts = []
    real_get = source.session.get

    def counting_get(*args, **kwargs):
        attempts.append(1)
        return real_get(*args, **kwargs)

    source.session.get = counting_get
    with pytest.raises(DICOMwebConnectionError) as info:
        source.search_series(modality="CT")
    assert len(attempts) == 3
    message = str(info.value)
    assert url in message and "2 retries" in message and PASSWORD not in message


def test_unsafe_uid_is_refused(tmp_path):
    require_dicomweb_client()
    from monai_medmerge.dicom.web import DICOMwebError, DICOMwebSource, describe_error

    source = DICOMwebSource("http://127.0.0.1:9/dicom-web", cache_dir=tmp_path)
    assert source.safe_url == "http://127.0.0.1:9/dicom-web"
    with pytest.raises(DICOMwebError, match="cannot be a file name"):
        source.series_dir({"StudyInstanceUID": "../../etc", "SeriesInstanceUID": "1.2"})
    text = describe_error(RuntimeError("GET http://u:p@h/dicom-web/series?PatientID=PID-1 failed"))
    assert "PID-1" not in text and "u:p" not in text
    assert os.listdir(tmp_path) == []


def test_bad_split_or_section_fails_before_any_search(tmp_path):
    """Nothing listens at port 9: a search would fail with a connection error after its retries."""
    require_dicomweb_client()
    from monai_medmerge.dicom.web import DICOMwebSource, datalist_from_dicomweb

    source = DICOMwebSource("http://127.0.0.1:9/dicom-web", cache_dir=tmp_path / "cache", retries=3, backoff=5.0)
    labels = tmp_path / "labels.csv"
    labels.write_text("StudyInstanceUID,label\n1.2.3,0\n")
    with pytest.raises(ValueError, match=r"split must be three fractions .* got \(0\.7, 0\.7, 0\.1\)"):
        datalist_from_dicomweb(source, labels, tmp_path / "dl.json", split=(0.7, 0.7, 0.1))
    with pytest.raises(ValueError, match="testing"):
        datalist_from_dicomweb(source, labels, tmp_path / "dl.json", section="testing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.csv"]


def test_bad_timeout_or_device_fails_before_any_search(tmp_path):
    require_dicomweb_client()
    import torch

    from monai_medmerge.dicom.infer import classify_dicomweb
    from monai_medmerge.dicom.web import DICOMwebSource

    for timeout in (0, -5):
        with pytest.raises(ValueError, match=f"timeout must be a positive number of seconds, got {timeout}"):
            DICOMwebSource("http://127.0.0.1:9/dicom-web", cache_dir=tmp_path / "cache", timeout=timeout)
    source = DICOMwebSource("http://127.0.0.1:9/dicom-web", cache_dir=tmp_path / "cache", retries=3, backoff=5.0)
    bad = ["nonsense"] + ([] if torch.cuda.is_available() else ["cuda"])
    for device in bad:
        with pytest.raises(ValueError, match=f"device .*{device}"):
            classify_dicomweb(tmp_path / "no bundle", source, tmp_path / "out", query={}, device=device)
    assert os.listdir(tmp_path) == []
    # a predictions folder that is a file: refused before the search (it failed after the download)
    (tmp_path / "bundle" / "configs").mkdir(parents=True)
    (tmp_path / "bundle" / "configs" / "inference.yaml").write_text("{}")
    (tmp_path / "taken").write_text("keep")
    with pytest.raises(NotADirectoryError, match="the predictions folder .*taken is a file, not a folder"):
        classify_dicomweb(tmp_path / "bundle", source, tmp_path / "taken", query={})
    assert (tmp_path / "taken").read_text() == "keep" and sorted(os.listdir(tmp_path)) == ["bundle", "taken"]


# --- credentials ------------------------------------------------------------------------------------------------------
def _secrets(password: str = PASSWORD) -> list[str]:
    import base64

    return [password, base64.b64encode(f"{USER}:{password}".encode()).decode()]


def _assert_no_secret(texts, password: str = PASSWORD) -> None:
    for text in texts:
        leaked = [s for s in _secrets(password) if s in text]
        assert not leaked, f"a credential in the output: {text[:300]!r}"


def test_credentials_in_the_url_are_refused_and_never_shown(server, studies, tmp_path, caplog, capsys, monkeypatch):
    from monai_medmerge.cli import main
    from monai_medmerge.dicom.web import DICOMwebSource

    caplog.set_level(logging.DEBUG)
    host = server.dicomweb_url.split("://", 1)[1]
    urls = [
        f"http://{USER}:{PASSWORD}@{host}",
        f"http://{USER}@{host}",
        f"http://{USER}:pa/{PASSWORD}@{host}",  # a '/' in the password: the host part is not even the host
        f"http://{USER}:12#{PASSWORD}@{host}",  # a '#': the rest looks like a fragment
        f"https://{USER}:{PASSWORD}@{host}?x=1",
    ]
    before = snapshot(tmp_path)
    for url in urls:
        with pytest.raises(ValueError, match="DICOMWEB_USER and DICOMWEB_PASSWORD, or DICOMWEB_TOKEN") as info:
            DICOMwebSource(url, cache_dir=tmp_path / "cache")
        assert str(info.value).startswith("the DICOMweb URL has a user name or password in it")
        _assert_no_secret([str(info.value), repr(info.value)])
    assert "127.0.0.1" in str(info.value)  # a well-formed URL's host is named, nothing before the '@'
    # the command line: one line naming the fix, status 2, nothing written, nothing sent
    monkeypatch.setenv("DICOMWEB_USER", USER)
    monkeypatch.setenv("DICOMWEB_PASSWORD", PASSWORD)
    out, cache = tmp_path / "datalist.json", tmp_path / "cache"
    for url in urls[:3]:
        code = main(["dicomweb-datalist", url, "--labels", str(studies["labels"]), "--out", str(out)])
        captured = capsys.readouterr()
        assert code == 2 and captured.out == ""
        assert captured.err.startswith("medmerge: error: the DICOMweb URL has a user name or password in it")
        assert captured.err.count("\n") == 1 and "DICOMWEB_PASSWORD" in captured.err
        _assert_no_secret([captured.err, caplog.text])
    assert not caplog.records, "no request is made and nothing is logged"
    assert snapshot(tmp_path) == before and not out.exists() and not cache.exists()
    with pytest.raises(ValueError, match="must look like http"):
        DICOMwebSource("ftp://127.0.0.1/dicom-web")
    with pytest.raises(ValueError, match="a port that is not a number"):
        DICOMwebSource("http://127.0.0.1:port/dicom-web")


def test_credentials_never_reach_logs_reports_or_errors(server, studies, tmp_path, caplog, capsys, monkeypatch):
    """A whole run with basic authentication at DEBUG level, then a wrong password: no password and no encoded
    Authorization header in any log record, printed line, report or cache file."""
    from monai_medmerge.cli import main

    caplog.set_level(logging.DEBUG)
    study = list(studies["labelled"])[4]
    labels = tmp_path / "labels.csv"
    labels.write_text(f"StudyInstanceUID,label\n{study},{studies['labelled'][study]}\n")
    monkeypatch.setenv("DICOMWEB_USER", USER)
    monkeypatch.setenv("DICOMWEB_PASSWORD", PASSWORD)
    args = [server.dicomweb_url, "--labels", str(labels), "--classes", *CLASS_NAMES, "--no-progress"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--retries", "0"]
    assert main(["dicomweb-datalist", *args, "--out", str(tmp_path / "ok" / "datalist.json")]) == 0
    first = capsys.readouterr()
    assert json.loads(first.out)["matched"] == 1
    wrong = "Wr0ng-Secret-Value"
    monkeypatch.setenv("DICOMWEB_PASSWORD", wrong)
    assert main(["dicomweb-datalist", *args, "--out", str(tmp_path / "bad" / "datalist.json")]) == 2
    second = capsys.readouterr()
    assert second.err.startswith("medmerge: error: ") and "HTTP 401" in second.err
    assert any("GET" in r.getMessage() for r in caplog.records), "the client's DEBUG records were captured"
    texts = [first.out, first.err, second.out, second.err, caplog.text]
    texts += [p.read_text() for p in tmp_path.rglob("*.json")]
    _assert_no_secret(texts)
    _assert_no_secret(texts, wrong)
    assert not (tmp_path / "bad").exists()


# --- download limits and the private cache --------------------------------------------------------------------------
def _mode(path: Path) -> int:
    import stat

    return stat.S_IMODE(path.stat().st_mode)


def test_cache_is_private_whatever_the_umask(server, studies, tmp_path):
    study = list(studies["labelled"])[5]
    cache = tmp_path / "cache"
    old = os.umask(0o022)
    try:
        source = _source(server, cache)
        (record,) = source.search_series(study_uids=[study])
        folder = source.retrieve_series(record)
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
    entries = [cache, *cache.rglob("*")]
    assert {str(p.relative_to(cache)) for p in entries if p.is_dir()} == {".", study, f"{study}/{folder.name}"}
    assert {_mode(p) for p in entries if p.is_dir()} == {0o700}
    files = [p for p in entries if p.is_file()]
    assert len(files) == SLICES + 1 and {_mode(p) for p in files} == {0o600}  # the instances and the marker


def test_instance_limit_stops_the_stream_and_keeps_nothing(server, studies, tmp_path):
    from monai_medmerge.dicom.web import DICOMwebLimitError

    study = list(studies["labelled"])[6]
    source = _source(server, tmp_path / "cache", max_instance_bytes=1000)
    (record,) = source.search_series(study_uids=[study])
    series = record["SeriesInstanceUID"]
    sops = source.instance_uids(study, series)
    before = snapshot(tmp_path)
    with pytest.raises(DICOMwebLimitError) as info:
        source.retrieve_series(record)
    message = str(info.value)
    named = re.match(
        rf"instance (\S+) of series {re.escape(series)} of study {re.escape(study)} is larger than the maximum "
        r"instance size, 1000 bytes \(max_instance_bytes; --max-instance-size on the command line\): .* received "
        r"when the download was stopped; nothing of the series is kept in the cache$",
        message,
    )
    assert named and named.group(1) in sops, message
    assert source.fetched_instances == 0  # stopped inside the first instance, before it was parsed
    assert source.cached_series(record) is None and not source.series_dir(record).exists()
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if v[0] != "dir"} == {k: v for k, v in before.items() if v[0] != "dir"}
    assert not list((tmp_path / "cache").rglob("*.dcm")) and not list((tmp_path / "cache").rglob(".*"))


def test_series_limit_is_checked_while_streaming(server, studies, tmp_path):
    from monai_medmerge.dicom.web import DICOMwebLimitError

    study = list(studies["labelled"])[7]
    probe = _source(server, tmp_path / "probe")
    (record,) = probe.search_series(study_uids=[study])
    size = os.path.getsize(next(probe.retrieve_series(dict(record)).iterdir()))
    limit = int(3.5 * size)
    source = _source(server, tmp_path / "cache", max_series_bytes=limit)
    source.client.set_chunk_size(512)  # the stream arrives in small pieces, as from a far server
    with pytest.raises(
        DICOMwebLimitError,
        match=rf"^series {record['SeriesInstanceUID']} of study {study} is larger "
        r"than the maximum series size, [0-9.]+ KiB \(max_series_bytes; --max-series-size",
    ) as info:
        source.retrieve_series(record)
    assert "nothing of the series is kept in the cache" in str(info.value)
    # three instances came and were written before the fourth went over the limit: counted while streaming
    assert source.fetched_instances == 3 and limit < source.received_bytes <= limit + 512
    assert not source.series_dir(record).exists() and source.cached_series(record) is None
    assert [p.name for p in (tmp_path / "cache").rglob("*")] == [study]  # the (private) study folder only


def test_instance_limit_on_a_resumed_series_names_the_instance(server, studies, tmp_path):
    """A series with instances in the cache is completed instance by instance; one announced (Content-Length)
    larger than the limit is refused before its body is read, by its SOPInstanceUID, and the series is dropped."""
    from monai_medmerge.dicom.web import DICOMwebLimitError

    study = list(studies["labelled"])[8]
    first = _source(server, tmp_path / "cache")
    (record,) = first.search_series(study_uids=[study])
    real_iter = first.client.iter_series

    def broken(*args, **kwargs):
        for n, dataset in enumerate(real_iter(*args, **kwargs)):
            if n == 2:
                raise RuntimeError("simulated: the connection dropped")
            yield dataset

    first.client.iter_series = broken
    with pytest.raises(RuntimeError, match="simulated"):
        first.retrieve_series(dict(record))
    folder = first.series_dir(record)
    assert len(list(folder.iterdir())) == 2
    source = _source(server, tmp_path / "cache", max_instance_bytes=1000)
    have = {p.stem for p in folder.iterdir()}
    missing = [sop for sop in source.instance_uids(study, record["SeriesInstanceUID"]) if sop not in have]
    with pytest.raises(DICOMwebLimitError) as info:
        source.retrieve_series(record)
    assert str(info.value).startswith(
        f"instance {missing[0]} of series {record['SeriesInstanceUID']} of study {study} is larger than the maximum "
        "instance size, 1000 bytes"
    )
    assert "announced by the server" in str(info.value) and source.received_bytes == 0
    assert not folder.exists() and not list((tmp_path / "cache").rglob("*.dcm"))


def test_limits_from_the_command_line(server, studies, tmp_path, capsys, monkeypatch):
    from monai_medmerge.cli import main
    from monai_medmerge.dicom.web import DICOMwebSource, parse_size

    assert parse_size("512MiB") == 512 * 2**20 and parse_size("8GiB") == 8 * 2**30 and parse_size("500MB") == 5e8
    assert parse_size("4096") == 4096 and parse_size("none") is None and parse_size(None) is None
    for bad in ("12 parsecs", "-1MiB", "0", "MiB"):
        with pytest.raises(ValueError, match="size"):
            parse_size(bad)
    positive = r"^max_series_bytes must be a positive number of bytes or None \(no limit\), got 0$"
    with pytest.raises(ValueError, match=positive):
        DICOMwebSource(server.dicomweb_url, max_series_bytes=0)
    with pytest.raises(SystemExit):
        main(["dicomweb-datalist", server.dicomweb_url, "--labels", "x", "--out", "y", "--max-series-size", "big"])
    assert "'big' is not a size" in capsys.readouterr().err

    study = list(studies["labelled"])[9]
    labels = tmp_path / "labels.csv"
    labels.write_text(f"StudyInstanceUID,label\n{study},{studies['labelled'][study]}\n")
    monkeypatch.setenv("DICOMWEB_USER", USER)
    monkeypatch.setenv("DICOMWEB_PASSWORD", PASSWORD)
    out = tmp_path / "datalist.json"
    args = ["dicomweb-datalist", server.dicomweb_url, "--labels", str(labels), "--out", str(out), "--no-progress"]
    args += ["--classes", *CLASS_NAMES, "--cache-dir", str(tmp_path / "cache"), "--max-series-size", "20KiB"]
    assert main(args) == 0
    assert len(json.loads(capsys.readouterr().out)["failed"]) == 1
    (failed,) = json.loads(out.with_name("datalist_report.json").read_text())["failed"]
    assert failed["StudyInstanceUID"] == study
    assert failed["error"].startswith(f"DICOMwebLimitError: series {failed['SeriesInstanceUID']} of study {study} is")
    assert "maximum series size, 20 KiB" in failed["error"]
    assert not list((tmp_path / "cache").rglob("*.dcm"))
    assert main([*args[:-2], "--max-instance-size", "none", "--max-series-size", "none"]) == 0
    assert json.loads(capsys.readouterr().out)["failed"] == []


# --- datalist, training, inference ------------------------------------------------------------------------------------
def _bundle_overrides(root: Path, datalist: Path, sources: list[dict]) -> list[str]:
    values = {
        "bundle_root": str(root),
        "datalist": str(datalist),
        "class_names": repr(CLASS_NAMES),
        "image_kind": "dicom_series",
        "spatial_size": "[16, 16, 16]",
        "network_args#spatial_dims": "3",
        "network_args#block_inplanes": "[4, 8, 8, 8]",
        "sources": repr(sources),
        "phase1_epochs": "2",
        "phase2_epochs": "2",
        "batch_size": "4",
        "progress": "False",
    }
    return [arg for k, v in values.items() for arg in (f"--{k}", v)]


def _run_bundle(root: Path, args: list[str], run_id: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "monai.bundle", "run", *([run_id] if run_id else [])]
    cmd += ["--config_file", str(root / "configs" / "train.yaml"), *args]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_datalist_train_and_classify_over_dicomweb(server, studies, tmp_path, caplog, monkeypatch, capsys):
    from monai_medmerge.data.datalist import load_datalist
    from monai_medmerge.dicom.infer import classify_dicomweb
    from monai_medmerge.dicom.web import datalist_from_dicomweb

    caplog.set_level(logging.DEBUG)
    source = _source(server, tmp_path / "cache")
    datalist = tmp_path / "data" / "datalist.json"
    selection = {
        "class_names": CLASS_NAMES,
        "modality": "CT",
        "series_description": "ax t1",
        "split": (0.5, 0.25, 0.25),
        "seed": 0,
    }
    report = datalist_from_dicomweb(source, studies["labels"], datalist, **selection)
    # what did not match is reported, not guessed
    assert report["matched"] == 2 * PER_CLASS and report["retrieved"] == 2 * PER_CLASS and report["failed"] == []
    assert list(report["several_candidate_series"]) == [studies["several"]]
    assert sorted(report["labels_without_images"]["uids"]) == sorted([studies["mr_study"], studies["missing"]])
    assert report["skipped_instances"] == [
        {
            "StudyInstanceUID": studies["dark_with_sr"],
            "SeriesInstanceUID": report["skipped_instances"][0]["SeriesInstanceUID"],
            "SOPInstanceUID": studies["sop_no_pixels"],
            "reason": "no pixel data",
        }
    ]
    assert report["fetched_instances"] == 2 * PER_CLASS * SLICES + 1
    sections = load_datalist(datalist, class_names=CLASS_NAMES)
    assert [len(sections[s]) for s in ("training", "validation", "test")] == [8, 4, 4]
    for item in sum(sections.values(), []):
        assert Path(item["image"]).parent.parent == tmp_path / "cache"
        assert item["label"] == CLASS_NAMES.index(studies["labelled"][item["StudyInstanceUID"]])
        assert len(list(Path(item["image"]).iterdir())) == SLICES
    # a rerun finds everything in the cache
    again = datalist_from_dicomweb(source, studies["labels"], datalist, **selection)
    assert again["fetched_instances"] == 0 and again["retrieved"] == 2 * PER_CLASS
    for text in (datalist.read_text(), datalist.with_name("datalist_report.json").read_text()):
        _assert_no_phi(text, studies["phi"])

    # a tiny merge of two tiny 3-D sources, trained through the training bundle on the retrieved series
    root = tmp_path / "bundle"
    shutil.copytree(BUNDLE, root)
    args = _bundle_overrides(root, datalist, make_sources(tmp_path / "sources"))
    proc = _run_bundle(root, args)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert (root / "models" / "model.pt").is_file()
    proc = _run_bundle(root, args, run_id="export")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    exported = root / "exported"
    assert (exported / "configs" / "inference.yaml").is_file()

    # inference over DICOMweb with the exported bundle
    wanted = [*studies["labelled"], studies["several"], studies["mr_study"]]
    out = tmp_path / "predictions"
    result = classify_dicomweb(exported, source, out, study_uids=wanted, modality="CT", series_description="ax t1")
    assert result["class_names"] == CLASS_NAMES and result["failed"] == []
    assert result["several_candidate_series"] == report["several_candidate_series"]
    assert result["studies_without_series"] == [studies["mr_study"]]
    predicted = {p["StudyInstanceUID"]: p for p in result["predictions"]}
    assert list(predicted) == list(studies["labelled"])  # one per study, in the order asked
    for p in predicted.values():
        assert p["class_name"] == CLASS_NAMES[p["class_index"]]
        probs = np.array([p["probabilities"][c] for c in CLASS_NAMES])
        np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-5)
        assert p["class_index"] == int(np.argmax(probs))
        assert Path(source.series_dir(p)).is_dir()
    assert json.loads((out / "predictions.json").read_text()) == result
    rows = list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
    assert [r["StudyInstanceUID"] for r in rows] == list(predicted)
    assert list(rows[0]) == ["StudyInstanceUID", "SeriesInstanceUID", "class_name", "class_index"] + [
        f"prob_{c}" for c in CLASS_NAMES
    ]
    for row in rows:
        p = predicted[row["StudyInstanceUID"]]
        assert row["SeriesInstanceUID"] == p["SeriesInstanceUID"] and row["class_name"] == p["class_name"]
        assert sum(float(row[f"prob_{c}"]) for c in CLASS_NAMES) == pytest.approx(1.0, abs=1e-4)
    accuracy = np.mean([predicted[s]["class_name"] == c for s, c in studies["labelled"].items()])
    # the classes differ visibly: even two epochs per phase learn them (1.00 in every run here)
    assert accuracy >= 0.75, f"accuracy {accuracy:.2f} of the tiny merge on {len(predicted)} studies"
    for text in (caplog.text, (out / "predictions.json").read_text(), (out / "predictions.csv").read_text()):
        _assert_no_phi(text, studies["phi"])

    # the same through the command line, credentials from the environment: the same predictions
    from monai_medmerge.cli import main

    monkeypatch.setenv("DICOMWEB_USER", USER)
    monkeypatch.setenv("DICOMWEB_PASSWORD", PASSWORD)
    cli_list = tmp_path / "cli" / "datalist.json"
    cli_selection = ["--modality", "CT", "--series-description", "ax t1", "--cache-dir", str(tmp_path / "cache")]
    capsys.readouterr()
    code = main(
        ["dicomweb-datalist", server.dicomweb_url, "--labels", str(studies["labels"]), "--out", str(cli_list)]
        + ["--classes", *CLASS_NAMES, "--split", "0.5", "0.25", "0.25", "--no-progress", *cli_selection]
    )
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["matched"] == 2 * PER_CLASS and summary["fetched_instances"] == 0
    assert load_datalist(cli_list, class_names=CLASS_NAMES) == sections
    cli_out = tmp_path / "cli" / "predictions"
    code = main(
        ["dicomweb-classify", server.dicomweb_url, "--bundle", str(exported), "--out", str(cli_out)]
        + ["--study", *wanted, "--no-progress", *cli_selection]
    )
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["predictions"] == len(predicted) and summary["studies_without_series"] == 1
    cli_predicted = json.loads((cli_out / "predictions.json").read_text())["predictions"]
    assert [p["class_name"] for p in cli_predicted] == [p["class_name"] for p in predicted.values()]
    monkeypatch.setenv("DICOMWEB_PASSWORD", "not-the-password")
    code = main(
        ["dicomweb-classify", server.dicomweb_url, "--bundle", str(exported), "--out", str(cli_out)]
        + ["--query", "all", "--no-progress", *cli_selection]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("medmerge: error: ") and "not-the-password" not in err
    assert "auth" in err.lower() or "401" in err


def test_skip_hint_names_ci_script():
    assert ".ci/orthanc" in SKIP_HINT


@pytest.mark.slow
def test_classify_lists_an_unreadable_series_and_classifies_the_rest(server, studies, tmp_path):
    from monai.bundle import ConfigParser
    from orthanc_server import tiny_resnet3d

    from monai_medmerge.bundle.export import export_bundle
    from monai_medmerge.dicom.infer import classify_dicomweb

    net_def = tiny_resnet3d(2)
    net = ConfigParser({"n": net_def}).get_parsed_content("n")
    bundle = export_bundle(
        net, net_def, tmp_path / "exported", CLASS_NAMES, [16, 16, 16], torchscript=False, kind="dicom_series"
    )
    source = _source(server, tmp_path / "cache")
    good, bad = list(studies["labelled"])[3:5]
    (record,) = source.search_series(study_uids=[bad])
    for path in series_files(source.retrieve_series(record)):
        path.write_bytes(b"not DICOM at all")  # the cache says complete, but nothing in it can be read
    result = classify_dicomweb(bundle, source, tmp_path / "out", study_uids=[good, bad], device="cpu")
    assert [p["StudyInstanceUID"] for p in result["predictions"]] == [good]
    assert [f["StudyInstanceUID"] for f in result["failed"]] == [bad]
    assert result["failed"][0]["error"].startswith("BundleRunError: "), result["failed"]
    print(result["failed"][0]["error"])
    rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").read_text().splitlines()))
    assert [r["StudyInstanceUID"] for r in rows] == [good]


@pytest.mark.slow
def test_docs_examples_run_against_orthanc(tmp_path):
    """docs/dicomweb.md's ``python-orthanc`` examples run as written (they start their own Orthanc)."""
    import re

    require_dicomweb_client()
    try:
        OrthancServer(tmp_path / "probe", USER, PASSWORD)
    except OrthancUnavailable as e:
        pytest.skip(str(e))
    page = Path(__file__).resolve().parents[2] / "docs" / "dicomweb.md"
    blocks = re.findall(r"```python-orthanc\n(.*?)```", page.read_text(), flags=re.S)
    assert len(blocks) >= 5
    namespace: dict = {"__name__": "__docs__"}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for i, code in enumerate(blocks):
            exec(compile(code, f"docs/dicomweb.md[block {i}]", "exec"), namespace)
    finally:
        os.chdir(cwd)
        server = namespace.get("server")
        if server is not None:
            server.stop()
    result = namespace["result"]
    assert len(result["predictions"]) == 1 and result["failed"] == []
    assert (tmp_path / "predictions" / "predictions.csv").is_file()
    assert namespace["report"]["retrieved"] == 2

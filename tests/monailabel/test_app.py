"""The MONAI Label app (apps/monailabel) through a real ``monailabel start_server``, from a studies folder and from
Orthanc over DICOMweb: ``/info/`` lists the merged bundle, ``/infer`` returns the right class, a ``/train`` request
runs merge training on the app's class labels and the next ``/infer`` answers with the new model.

The server runs in the separate environment made by ``.ci/monailabel_env`` (monailabel pins numpy below 2 and needs
torchvision); where it is absent the server tests skip and say so. The exported bundle the app serves is trained
here, with the repository's training bundle in the main environment, on clearly separable synthetic studies (a
bright or a dark square); its validation accuracy is 1.0 and every study it is asked about is classified with a
probability above 0.8.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from monailabel_server import (
    CLASS_NAMES,
    MonaiLabelServer,
    app_module,
    make_source_bundles,
    require_env,
    train_and_export,
    write_studies,
)

pytest.importorskip("nibabel")
pytest.importorskip("itk")
pytest.importorskip("requests")

MODEL = "bright_dark"
# what a train request asks for: short, with learning rates that separate the classes within it
TRAIN_PARAMS = {
    "max_epochs": 2,
    "phase2_epochs": 4,
    "val_split": 0.25,
    "batch_size": 4,
    "coef_lr": 0.05,
    "head_lr": 0.01,
    "finetune_lr": 0.01,
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the class-label store and datalist helpers (plain Python: no server needed) ---------------------------------
def test_class_labels_are_read_strictly(tmp_path):
    labels = app_module("labels")
    good = tmp_path / "a.json"
    good.write_text(json.dumps({"class": "bright"}))
    assert labels.read_class_label(good, CLASS_NAMES) == 1
    good.write_text(json.dumps({"class": 0}))
    assert labels.read_class_label(good, CLASS_NAMES) == 0
    for content, message in [
        ({"class": "grey"}, "class 'grey' is not one of the model's classes ['dark', 'bright']"),
        ({"class": 2}, "class index 2 is outside 0..1"),
        ({"label": "dark"}, 'must be a JSON object with "class"'),
        ({"class": True}, "is neither a class name nor an index"),
    ]:
        good.write_text(json.dumps(content))
        with pytest.raises(labels.ClassLabelError, match="image 'study_7'") as e:
            labels.read_class_label(good, CLASS_NAMES, "study_7")
        assert message in str(e.value)
    good.write_text("{not json")
    with pytest.raises(labels.ClassLabelError, match="is not a JSON file"):
        labels.read_class_label(good, CLASS_NAMES)


def test_stratified_split_and_image_kind(tmp_path):
    labels = app_module("labels")
    items = [{"image": f"{i}.nii.gz", "label": i % 2} for i in range(9)]
    train, val = labels.stratified_split(items, 0.25, seed=0)
    assert sorted(i["image"] for i in train + val) == sorted(i["image"] for i in items)
    assert {i["label"] for i in val} == {0, 1} and {i["label"] for i in train} == {0, 1}
    assert labels.stratified_split(items, 0.25, seed=0) == (train, val)  # deterministic
    with pytest.raises(ValueError, match="label at least two images of a class"):
        labels.stratified_split(items[:1], 0.25)
    with pytest.raises(ValueError, match="val_split must lie in"):
        labels.stratified_split(items, 0.0)
    assert labels.image_kind_of(["a.nii.gz", "b.nii"]) == "nifti"
    assert labels.image_kind_of([str(tmp_path)]) == "dicom_series"
    with pytest.raises(ValueError, match="several kinds"):
        labels.image_kind_of(["a.png", "b.nii.gz"])


# --- through the separate environment -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env_bin():
    return require_env()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, env_bin):
    """Two tiny source bundles and the bundle exported from a merge trained on them (main environment)."""
    root = tmp_path_factory.mktemp("monailabel")
    sources = make_source_bundles(root / "sources")
    exported = train_and_export(root / "train0", sources)
    return SimpleNamespace(root=root, sources=sources, exported=exported)


def served_copy(workspace, where: str) -> Path:
    """A copy of the exported bundle for one server (training replaces it)."""
    target = workspace.root / where / MODEL
    shutil.copytree(workspace.exported, target)
    return target


def test_loading_is_strict_and_real(workspace, env_bin):
    """In the MONAI Label environment, without monai_medmerge: loading models/model.pt changes the network's outputs
    (it is no random initialisation) and gives the file's tensors; images are read with the bundle's reader only; a
    merge-wrapper checkpoint is an error naming its keys, where MONAI Label's stock bundle task loads nothing and
    answers with random weights; without a model the app does not start."""
    studies = workspace.root / "check_studies"
    classes = write_studies(studies, 1, seed=5000)
    image_id, expected = next(iter(classes.items()))
    done = subprocess.run(
        [str(env_bin / "python"), str(Path(__file__).with_name("venv_checks.py")), str(workspace.exported),
         str(studies / f"{image_id}.nii.gz"), expected, str(workspace.root / "checks")],
        capture_output=True, text=True, timeout=300, cwd=workspace.root,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"venv_checks failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    result = json.loads(lines[-1][len("RESULT ") :])
    assert result["outputs_changed_by_loading"] and result["loaded_equals_file"]
    assert result["class"] == expected and result["probabilities"][expected] > 0.8
    assert result["plugin_imported"] is False
    # the reader of the training pipeline (NIfTI studies: NibabelReader), from the bundle's shipped transforms
    assert result["readers"] == ["NibabelReader"]
    own = result["own_scripts"]  # two bundles served side by side each use the transforms in their own scripts/
    assert len(own) >= 4 and all(own), own
    assert not result["scripts_left_imported"] and not result["bundle_left_on_path"]
    assert "missing keys: bn1.bias" in result["strict_error"]
    assert "unexpected keys: merge.template.bn1.bias" in result["strict_error"]
    assert result["stock_task_silently_random"] is True
    assert "--conf models" in result["no_model_error"]


@pytest.fixture(scope="module")
def local_server(workspace, env_bin):
    studies = workspace.root / "studies"
    classes = write_studies(studies, 4, seed=3000)
    bundle = served_copy(workspace, "served_local")
    server = MonaiLabelServer(
        env_bin,
        str(studies),
        {"models": str(bundle), "sources": ",".join(workspace.sources), "train_dir": str(workspace.root / "runs")},
        workspace.root / "monailabel_local.log",
    )
    try:
        info = server.wait_ready()
        yield SimpleNamespace(server=server, info=info, classes=classes, bundle=bundle)
    finally:
        server.stop()


def test_local_info_and_infer(local_server):
    info, server = local_server.info, local_server.server
    model = info["models"][MODEL]
    assert model["type"] == "classification" and model["labels"] == CLASS_NAMES and model["dimension"] == 3
    assert MODEL in info["trainers"] and info["class_label_tag"] == "class"
    assert info["datastore"]["total"] == len(local_server.classes)
    file_sha = sha256(local_server.bundle / "models" / "model.pt")
    for image_id, expected in local_server.classes.items():
        result = server.infer(MODEL, image_id)
        assert result["class"] == expected, (image_id, result)
        assert result["probabilities"][expected] > 0.8
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert [p["label"] for p in result["prediction"]] == CLASS_NAMES
        assert result["model"]["sha256"] == file_sha


def test_local_train_request_replaces_the_model(local_server):
    server, bundle = local_server.server, local_server.bundle
    for image_id, name in local_server.classes.items():
        assert server.save_class_label(image_id, name)["label"] == image_id
    assert server.request("GET", "/info/")["datastore"]["label_tags"]["class"] == len(local_server.classes)
    model_file = bundle / "models" / "model.pt"
    before_sha, before_mtime = sha256(model_file), model_file.stat().st_mtime_ns
    before = {i: server.infer(MODEL, i)["probabilities"] for i in local_server.classes}

    status = server.train(MODEL, TRAIN_PARAMS)
    assert any("merge training done" in line for line in status["details"]), status["details"]

    after_sha = sha256(model_file)
    assert after_sha != before_sha and model_file.stat().st_mtime_ns != before_mtime
    stats = server.request("GET", "/info/")["train_stats"][MODEL]
    assert stats["sha256"] == after_sha and stats["images"] == {"train": 6, "validation": 2}
    for image_id, expected in local_server.classes.items():
        result = server.infer(MODEL, image_id)
        assert result["model"]["sha256"] == after_sha
        assert result["probabilities"] != before[image_id]
        assert result["class"] == expected, (image_id, result)


@pytest.fixture(scope="module")
def orthanc_server(workspace, env_bin):
    from orthanc_server import PASSWORD, USER, make_series, start_orthanc

    orthanc = start_orthanc(workspace.root / "orthanc")
    try:
        import pydicom

        series = {}
        for i in range(4):
            name = CLASS_NAMES[i % 2]
            files = make_series(workspace.root / "dicom" / f"s{i}", bright=name == "bright", seed=4000 + i)
            orthanc.upload(files)
            series[str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)] = name
        bundle = served_copy(workspace, "served_orthanc")
        server = MonaiLabelServer(
            env_bin,
            orthanc.dicomweb_url,
            {
                "models": str(bundle),
                "sources": ",".join(workspace.sources),
                "train_dir": str(workspace.root / "runs_dw"),
            },
            workspace.root / "monailabel_orthanc.log",
            env={
                "MONAI_LABEL_DICOMWEB_USERNAME": USER,
                "MONAI_LABEL_DICOMWEB_PASSWORD": PASSWORD,
                "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(workspace.root / "dicomweb_cache"),
            },
        )
        try:
            info = server.wait_ready()
            yield SimpleNamespace(server=server, info=info, series=series, bundle=bundle)
        finally:
            server.stop()
    finally:
        orthanc.stop()


def test_orthanc_info_infer_and_train(orthanc_server):
    server, series = orthanc_server.server, orthanc_server.series
    info = orthanc_server.info
    assert info["models"][MODEL]["labels"] == CLASS_NAMES
    assert info["datastore"]["total"] == len(series)
    for uid, expected in series.items():
        result = server.infer(MODEL, uid)
        assert result["class"] == expected, (uid, result)
        assert result["probabilities"][expected] > 0.8
    # class labels of DICOMweb studies stay in the app's cache (no DICOM SEG is written to the server)
    for uid, name in series.items():
        server.save_class_label(uid, name)
    model_file = orthanc_server.bundle / "models" / "model.pt"
    before = sha256(model_file)
    server.train(MODEL, {**TRAIN_PARAMS, "val_split": 0.5})
    after = sha256(model_file)
    assert after != before
    for uid, expected in series.items():
        result = server.infer(MODEL, uid)
        assert result["model"]["sha256"] == after
        assert result["class"] == expected, (uid, result)

"""Helpers for the MONAI Label tests: the separate environment, synthetic studies, trained exported bundles
(classification and segmentation), and a real ``monailabel start_server`` process.

Not a conftest (a second ``conftest`` module would clash with ``tests/conftest.py`` on ``sys.path``); the test
module imports what it needs from here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
APP_DIR = ROOT / "apps" / "monailabel"
TRAIN_BUNDLE = ROOT / "bundles" / "medmerge_classification"
SEGMENTATION_BUNDLE = ROOT / "bundles" / "medmerge_segmentation"
ENV_DIR = Path(os.environ.get("MEDMERGE_MONAILABEL_ENV", "/tmp/medmerge_monailabel_env"))
ENV_HINT = "make it with `bash .ci/monailabel_env` (or point MEDMERGE_MONAILABEL_ENV at one)"

# orthanc_server: the DICOM tests' Orthanc fixtures and DICOM series
sys.path.insert(0, str(ROOT / "tests" / "dicom"))
from orthanc_server import tiny_resnet3d  # noqa: E402

CLASS_NAMES = ["dark", "bright"]
SIZE, SLICES = 32, 8  # the studies: SIZE x SIZE x SLICES volumes, as the DICOM tests' series
SPATIAL = [16, 16, 8]  # the network's input


def require_env() -> Path:
    """The separate MONAI Label environment's ``bin`` folder, or a skip that says how to make it."""
    if not (ENV_DIR / ".medmerge_monailabel_env").is_file() or not (ENV_DIR / "bin" / "monailabel").is_file():
        pytest.skip(f"the MONAI Label environment {ENV_DIR} is absent: {ENV_HINT}")
    return ENV_DIR / "bin"


def volume(bright: bool, seed: int, noise: float = 20.0) -> np.ndarray:
    """A study as the DICOM tests' ``make_series`` draws it: a mid-grey volume (1024, Gaussian noise of std
    ``noise``) with a square through every slice that is bright (1800, class ``bright``) or dark (300, ``dark``)."""
    rng = np.random.default_rng(seed)
    image = 1024 + rng.normal(0, noise, (SIZE, SIZE, SLICES))
    lo, hi = SIZE // 4, SIZE - SIZE // 4
    image[lo:hi, lo:hi, :] = (1800 if bright else 300) + rng.normal(0, noise, (hi - lo, hi - lo, SLICES))
    return image.astype(np.float32)


def write_studies(
    folder: Path, per_class: int, seed: int, prefix: str = "study", noise: float = 20.0
) -> dict[str, str]:
    """``per_class`` NIfTI studies of each class in ``folder``; returns ``{image id: class name}``."""
    import nibabel as nib

    folder.mkdir(parents=True, exist_ok=True)
    classes = {}
    for i in range(2 * per_class):
        name = CLASS_NAMES[i % 2]
        image_id = f"{prefix}_{i:03d}"
        image = volume(name == "bright", seed + i, noise)
        nib.save(nib.Nifti1Image(image, np.eye(4)), str(folder / f"{image_id}.nii.gz"))
        classes[image_id] = name
    return classes


def make_source_bundles(folder: Path, num_classes: Sequence[int] = (3, 4)) -> list[str]:
    """Two tiny 3-D source bundles (``configs/inference.json`` with ``network_def``, ``models/model.pt``) from
    different random initialisations and with different class counts, as merge sources."""
    import torch
    from monai.bundle import ConfigParser

    from monai_medmerge.sources import save_checkpoint

    paths = []
    for i, n in enumerate(num_classes):
        torch.manual_seed(100 + i)
        net_def = tiny_resnet3d(n)
        bundle = folder / f"source{i}"
        (bundle / "configs").mkdir(parents=True, exist_ok=True)
        (bundle / "models").mkdir(exist_ok=True)
        save_checkpoint(ConfigParser({"n": net_def}).get_parsed_content("n"), bundle / "models" / "model.pt")
        (bundle / "configs" / "inference.json").write_text(json.dumps({"network_def": net_def}, indent=2))
        paths.append(str(bundle))
    return paths


def train_and_export(work: Path, sources: Sequence[str], phase1: int = 3, phase2: int = 8) -> Path:
    """Train the repository's training bundle on fresh studies (the main environment, both phases) and export it;
    returns the exported bundle folder ``work/exported``."""
    data = work / "data"
    train = write_studies(data / "train", 6, seed=1000, prefix="train")
    # noisier validation studies: the first network that gets them all right (the one kept) is sure of the clean
    # studies the tests ask about
    val = write_studies(data / "val", 3, seed=2000, prefix="val", noise=400.0)
    datalist = {
        "training": [{"image": f"train/{k}.nii.gz", "label": CLASS_NAMES.index(v)} for k, v in train.items()],
        "validation": [{"image": f"val/{k}.nii.gz", "label": CLASS_NAMES.index(v)} for k, v in val.items()],
        "test": [],
    }
    (data / "datalist.json").write_text(json.dumps(datalist))
    net = tiny_resnet3d(len(CLASS_NAMES))
    overrides = {
        "bundle_root": str(work),
        "dataset_dir": str(data),
        "sources": list(sources),
        "class_names": CLASS_NAMES,
        "network_target": net.pop("_target_"),
        "network_args": net,
        "spatial_size": SPATIAL,
        "image_kind": "nifti",
        "phase1_epochs": phase1,
        "phase2_epochs": phase2,
        "patience": 3,
        "batch_size": 4,
        "coef_lr": 0.05,
        "head_lr": 0.01,
        "finetune_lr": 0.01,
        "progress": False,
        "export_dir": str(work / "exported"),
    }
    run_training_bundle(TRAIN_BUNDLE, overrides, work)
    return work / "exported"


def run_training_bundle(bundle: Path, overrides: Mapping[str, Any], cwd: Path, timeout: float = 300) -> None:
    """Both phases of a training bundle, then its ``export`` id, as ``python -m monai.bundle run`` and ``run export``
    would, in one process of the main environment; fails with the output when it does not succeed."""
    script = (
        "import json, sys, monai.bundle\n"
        "kw = json.loads(sys.argv[1])\n"
        "for run_id in ('run', 'export'):\n"
        "    monai.bundle.run(run_id, config_file=sys.argv[2], meta_file=sys.argv[3], **kw)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(dict(overrides)), str(bundle / "configs" / "train.yaml"),
         str(bundle / "configs" / "metadata.json")],
        cwd=cwd, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, f"training {bundle.name} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def train_and_export_segmentation(work: Path, example: Mapping[str, Any], patch: Sequence[int]) -> Path:
    """One short run of the segmentation training bundle on the example workspace of
    ``make_segmentation_example`` (main environment, both phases), exported; returns ``work/exported``."""
    work.mkdir(parents=True, exist_ok=True)
    net = dict(example["network_def"])
    overrides = {
        "bundle_root": str(work),
        "dataset_dir": str(Path(example["datalist"]).parent),
        "sources": list(example["sources"]),
        "label_names": list(example["label_names"]),
        "network_target": net.pop("_target_"),
        "network_args": net,
        "spatial_size": list(patch),
        "phase1_epochs": 1,
        "phase2_epochs": 1,
        "batch_size": 4,
        "progress": False,
        "export_dir": str(work / "exported"),
    }
    run_training_bundle(SEGMENTATION_BUNDLE, overrides, work)
    return work / "exported"


def app_module(name: str) -> Any:
    """A module of the app's ``lib`` (plain Python ones: ``labels``), imported from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"medmerge_app_{name}", APP_DIR / "lib" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class MonaiLabelServer:
    """``monailabel start_server`` of the app on a free loopback port, run from the separate environment.

    Args:
        env_bin: the environment's ``bin`` folder (:func:`require_env`).
        studies: a folder or a DICOMweb URL.
        conf: the app's ``--conf`` pairs.
        log_path: the server's output.
        env: more environment variables (e.g. DICOMweb credentials).
    """

    def __init__(
        self,
        env_bin: Path,
        studies: str,
        conf: Mapping[str, str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        from medmerge_bench.orthanc import free_port

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [str(env_bin / "monailabel"), "start_server", "--app", str(APP_DIR), "--studies", studies]
        for key, value in conf.items():
            command += ["--conf", key, value]
        command += ["--host", "127.0.0.1", "--port", str(self.port)]
        environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("MONAI_LABEL_")}
        environ.update(
            {
                "PATH": f"{env_bin}{os.pathsep}{environ.get('PATH', '')}",
                "MONAI_LABEL_SESSIONS": "false",
                "MONAI_LABEL_TRACKING_ENABLED": "false",
                "MONAI_LABEL_AUTO_UPDATE_SCORING": "false",
                "OMP_NUM_THREADS": "2",
                **(env or {}),
            }
        )
        self.log = open(log_path, "wb")
        # its own process group: the train task runs in a child process, stopped with the server
        self.process = subprocess.Popen(
            command, cwd=log_path.parent, env=environ, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def log_tail(self, chars: int = 6000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_ready(self, timeout: float = 240.0) -> dict[str, Any]:
        """Wait until ``GET /info/`` answers; returns it. Fails with the server's log when it exits or times out."""
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"monailabel exited with code {self.process.returncode}:\n{self.log_tail()}")
            try:
                response = requests.get(self.url + "/info/", timeout=5)
                if response.ok:
                    return response.json()
            except requests.RequestException:
                pass
            time.sleep(0.5)
        pytest.fail(f"monailabel did not answer {self.url}/info/ within {timeout:g} s:\n{self.log_tail()}")

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        import requests

        response = requests.request(method, self.url + path, timeout=kwargs.pop("timeout", 120), **kwargs)
        assert response.ok, f"{method} {path}: HTTP {response.status_code} {response.text[:2000]}\n{self.log_tail()}"
        return response.json()

    def infer(self, model: str, image_id: str) -> dict[str, Any]:
        return self.request("POST", f"/infer/{model}", params={"image": image_id})

    def save_class_label(self, image_id: str, class_name: str, tag: str = "class") -> dict[str, Any]:
        label = json.dumps({"class": class_name}).encode()
        return self.request(
            "PUT",
            "/datastore/label",
            params={"image": image_id, "tag": tag},
            files={"label": ("label.json", label, "application/json")},
        )

    def save_label_map(self, image_id: str, path: Path, tag: str = "final") -> dict[str, Any]:
        """A label map file saved as the image's label (``final``: the labels segmentation training reads)."""
        return self.request(
            "PUT",
            "/datastore/label",
            params={"image": image_id, "tag": tag},
            files={"label": (path.name, path.read_bytes(), "application/octet-stream")},
        )

    def infer_mask(self, model: str, image_id: str, folder: Path) -> tuple[dict[str, Any], Path]:
        """``POST /infer/<model>?image=<id>`` of a segmentation model, MONAI Label's default answer (multipart: the
        params and the mask file); returns the params and the mask saved in ``folder``."""
        from email.parser import BytesParser
        from email.policy import HTTP

        import requests

        response = requests.post(self.url + f"/infer/{model}", params={"image": image_id}, timeout=120)
        assert response.ok, f"infer {image_id}: HTTP {response.status_code} {response.text[:2000]}\n{self.log_tail()}"
        head = f"Content-Type: {response.headers['content-type']}\r\n\r\n".encode()
        parts = {
            part.get_param("name", header="content-disposition"): part
            for part in BytesParser(policy=HTTP).parsebytes(head + response.content).iter_parts()
        }
        assert set(parts) == {"params", "image"}, f"infer {image_id} answered with parts {sorted(parts)}"
        params = json.loads(parts["params"].get_payload(decode=True))
        folder.mkdir(parents=True, exist_ok=True)
        mask = folder / f"{image_id}_{len(list(folder.iterdir()))}.nii.gz"
        mask.write_bytes(parts["image"].get_payload(decode=True))
        return params, mask

    def train(
        self, model: str, params: Mapping[str, Any], timeout: float = 240.0, expect: str = "DONE"
    ) -> dict[str, Any]:
        """``POST /train/<model>`` (a background task, as MONAI Label runs it) and wait until it ends; returns the
        final task status. Fails with the task's output when it does not end with the status ``expect``."""
        self.request("POST", f"/train/{model}", json=dict(params))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.request("GET", "/train/")
            if status.get("status") not in ("SUBMITTED", "RUNNING"):
                assert status.get("status") == expect, f"training ended {status}:\n{self.log_tail(12000)}"
                return status
            time.sleep(1.0)
        pytest.fail(f"training did not end within {timeout:g} s:\n{self.log_tail(12000)}")

    def stop(self, timeout: float = 20.0) -> None:
        """Stop the server (SIGTERM to its process group, by its PID; SIGKILL after ``timeout`` s)."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=timeout)
            except ProcessLookupError:
                pass
        self.log.close()

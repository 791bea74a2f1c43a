"""A failing bundle run ends with one line that names the culprit (issue: errors a person can read)."""

from __future__ import annotations

import json
from pathlib import Path

from bundle_utils import bundle_copy, overrides, run_bundle

from monai_medmerge.data.transforms import BadImageError
from monai_medmerge.errors import describe, user_error


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def test_bad_image_in_the_datalist_is_one_named_line(example_workspace, tmp_path, monkeypatch):
    example = example_workspace
    root = bundle_copy(tmp_path / "bundle")
    data = Path(example["datalist"]).parent
    datalist = json.loads(Path(example["datalist"]).read_text())
    for section in ("training", "validation", "test"):  # absolute paths: the copy of the datalist lives elsewhere
        for item in datalist[section]:
            item["image"] = str(data / item["image"])
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not a nifti file at all")
    datalist["training"][0] = {**datalist["training"][0], "image": str(bad)}
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    args = overrides(example, root, datalist=tmp_path / "datalist.json")

    monkeypatch.delenv("MEDMERGE_DEBUG", raising=False)
    proc = run_bundle(root, ["train.yaml"], args)
    assert proc.returncode != 0
    last = _last_line(proc.stdout)
    assert last.startswith("error: ") and str(bad) in last and "set skip_bad: true" in last, last
    assert "Traceback" not in proc.stdout and "Failed to evaluate" not in proc.stdout
    assert data.is_dir() and not (root / "models" / "model.pt").exists()

    monkeypatch.setenv("MEDMERGE_DEBUG", "1")
    proc = run_bundle(root, ["train.yaml"], args)
    assert proc.returncode != 0 and "Traceback" in proc.stdout and str(bad) in proc.stdout


def test_user_error_finds_the_culprit_in_monai_wrapping():
    bad = BadImageError("/data/x.nii.gz", "file is truncated")
    try:
        try:
            raise bad
        except BadImageError as e:
            raise RuntimeError("applying transform <CheckedLoadImaged>") from e
    except RuntimeError as e:
        wrapped = RuntimeError("Failed to evaluate ConfigExpression: $@train#trainer.run()")
        wrapped.__cause__ = e
    assert user_error(wrapped) is bad
    line = describe(bad)
    assert line.startswith("/data/x.nii.gz: file is truncated; set skip_bad: true") and "\n" not in line
    assert user_error(RuntimeError("a bug")) is None  # not the user's: the traceback stays
    missing = FileNotFoundError(2, "No such file or directory", "/data/sources/a")
    assert user_error(_wrap(missing)) is missing


def _wrap(error: BaseException) -> BaseException:
    outer = RuntimeError("Failed to evaluate ConfigExpression")
    outer.__cause__ = error
    return outer

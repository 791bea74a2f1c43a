"""The user guide's commands, run as written (only WORK points to a temporary folder)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "user_guide.md"


def test_user_guide_commands_work(tmp_path, run_script):
    pytest.importorskip("nibabel")
    pytest.importorskip("ignite")
    pytest.importorskip("fire")
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert blocks, "no bash block in the user guide"
    script = "\n".join(blocks)
    assert "WORK=/tmp/medmerge_guide" in script
    script = script.replace("WORK=/tmp/medmerge_guide", f"WORK={tmp_path}")
    run_script(script)
    metrics = dict(csv.reader((tmp_path / "bundle" / "eval" / "metrics.csv").read_text().splitlines()))
    assert 0.0 <= float(metrics["test_macro_f1"]) <= 1.0
    header, *rows = list(csv.reader((tmp_path / "predictions" / "predictions.csv").read_text().splitlines()))
    assert header[0] == "file"  # then the class names
    tests = sorted((tmp_path / "example" / "data" / "images" / "test").glob("*.nii.gz"))
    assert len(rows) == len(tests) == 100
    assert all(abs(sum(float(v) for v in r[1:]) - 1.0) < 1e-4 for r in rows)

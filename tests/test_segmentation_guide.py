"""docs/segmentation.md's commands, run as written (only WORK points to a temporary folder)."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "segmentation.md"


def test_segmentation_guide_commands_work(tmp_path, run_script):
    nib = pytest.importorskip("nibabel")
    pytest.importorskip("ignite")
    pytest.importorskip("fire")
    blocks = re.findall(r"```bash\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert len(blocks) == 1, "the guide has one bash block"
    script = blocks[0]
    assert "WORK=/tmp/medmerge_segmentation" in script
    script = script.replace("WORK=/tmp/medmerge_segmentation", f"WORK={tmp_path}")
    run_script(script)
    metrics = dict(csv.reader((tmp_path / "bundle" / "eval" / "metrics.csv").read_text().splitlines()))
    assert 0.0 < float(metrics["test_mean_dice"]) <= 1.0
    inputs = sorted((tmp_path / "inputs").glob("*.nii.gz"))
    assert len(inputs) == 8
    for image in inputs:
        mask = nib.load(str(tmp_path / "masks" / image.name.replace(".nii.gz", "_seg.nii.gz")))
        source = nib.load(str(image))
        assert mask.shape[:2] == source.shape[:2]
        np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}

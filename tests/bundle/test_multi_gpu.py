"""Every phase (phase 0 of the paper recipe included) under torchrun with two processes (gloo on CPU), through
configs/multi_gpu_train.yaml."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from bundle_utils import RANKS_OVERLAY, TORCHRUN, bundle_copy, datalist_with_unlabeled, overrides

from monai_medmerge.workflows.engines import latest_checkpoint


@pytest.mark.parametrize("recipe", ["direct", "paper"])
def test_torchrun_two_processes_agree(example_workspace, tmp_path, recipe):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    root = bundle_copy(tmp_path / "bundle")
    distilled = {}
    if recipe == "paper":  # phase 2 distilled from the phase-0 ensemble on a section of unlabelled images
        datalist = datalist_with_unlabeled(example_workspace, tmp_path / "data")
        distilled = dict(datalist=datalist, distill_weight=1.0, unlabeled_section="unlabeled", phase2_steps_per_epoch=3)
    (root / "configs" / "ranks.yaml").write_text(yaml.safe_dump(RANKS_OVERLAY, width=1000))
    files = [str(root / "configs" / f) for f in ("train.yaml", "multi_gpu_train.yaml", "ranks.yaml")]
    cmd = [
        *TORCHRUN,
        "--nproc_per_node=2",
        "--standalone",
        "-m",
        "monai.bundle",
        "run",
        "paper" if recipe == "paper" else "run",
        "--config_file",
        repr(files),
        "--logging_file",
        str(root / "configs" / "logging.conf"),
        *overrides(example_workspace, root, recipe=recipe, phase0_epochs=2, phase0_head_epochs=1, **distilled),
    ]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    models = root / "models"
    c0 = torch.load(models / "coefficients_rank0.pt", weights_only=True)
    c1 = torch.load(models / "coefficients_rank1.pt", weights_only=True)
    assert torch.equal(c0, c1)
    # the coefficients were trained: they left their anchored start (0.9 on source 0 for every kernel)
    start = torch.tensor([0.9, 0.1]).log()
    assert not torch.allclose(c0 - c0.logsumexp(0, keepdim=True), start[:, None].expand_as(c0), atol=1e-4)
    p0 = torch.load(models / "phase2_rank0.pt", weights_only=True)
    p1 = torch.load(models / "phase2_rank1.pt", weights_only=True)
    assert p0.keys() == p1.keys()
    for k in p0:
        torch.testing.assert_close(p0[k], p1[k], msg=f"phase-2 tensor {k} differs between the two processes")
    if recipe == "paper":  # phase 0 ran under DDP too: one fine-tuned network per source, written by process 0
        assert all((models / f"phase0_source{i}.done").is_file() for i in range(2))
        # the room after phase 0 is measured on the whole validation set, gathered from both processes' shards
        room = json.loads((models / "phase0_room.json").read_text())
        content = json.loads(Path(example_workspace["datalist"]).read_text())
        assert room["images"] == len(content["validation"]) and len(content["validation"]) > 1
        # each process read its own half of the unlabelled images in the distilled phase 2
        shares = [set(torch.load(models / f"unlabeled_rank{r}.pt").tolist()) for r in range(2)]
        pool = len(json.loads(datalist.read_text())["unlabeled"])
        assert not shares[0] & shares[1] and shares[0] | shares[1] == set(range(pool)), (shares, pool)
        assert "distillation" in torch.load(latest_checkpoint(models, "phase2"), weights_only=True)
    # only process 0 writes checkpoints; the result is a plain state dict
    state = torch.load(models / "model.pt", weights_only=True)
    assert state.keys() == p0.keys()

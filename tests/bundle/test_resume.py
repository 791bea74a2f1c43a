"""Kill a training run in phase 1, resume it; kill it in phase 2, resume it: each continues from its checkpoint."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from bundle_utils import bundle_copy, overrides

EPOCHS = 40


def _start(root: Path, args: list[str]) -> subprocess.Popen:
    files = [str(root / "configs" / "train.yaml")]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(files), *args]
    log = open(root / "run.log", "a")  # noqa: SIM115 - closed by the caller through the process
    return subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT)


def _kill_after(proc: subprocess.Popen, path: Path, timeout: float = 300) -> None:
    """SIGKILL ``proc`` as soon as ``path`` exists (no chance to clean up, like a lost machine)."""
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before {path.name} was written"
        assert time.time() < end, f"{path.name} not written within {timeout} s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)


def test_kill_and_resume_each_phase(example_workspace, tmp_path):
    root = bundle_copy(tmp_path / "bundle")
    models = root / "models"
    args = overrides(example_workspace, root, phase1_epochs=EPOCHS, phase2_epochs=EPOCHS, patience=1000, resume=True)
    # phase 1, killed after its second epoch's checkpoint
    _kill_after(_start(root, args), models / "phase1_checkpoint_epoch=2.pt")
    assert not (models / "phase1.done").exists()
    killed_at = max(int(p.stem.split("=")[1]) for p in models.glob("phase1_checkpoint_epoch=*.pt"))
    assert killed_at < EPOCHS

    # rerun: phase 1 continues after the last checkpoint, then phase 2 starts; kill phase 2 after its 2nd epoch
    log_start = (root / "run.log").stat().st_size
    _kill_after(_start(root, args), models / "phase2_checkpoint_epoch=2.pt")
    log = (root / "run.log").read_text()[log_start:]
    assert f"resume: phase1 continues after epoch {killed_at} from" in log, log[-3000:]
    assert f"Epoch: {killed_at + 1}/{EPOCHS}" in log or f"Epoch[{killed_at + 1}]" in log
    assert "Epoch[1] Complete" not in log.split("phase2")[0]  # phase 1 did not start over
    phase1 = json.loads((models / "phase1.done").read_text())
    assert phase1["epochs"] == EPOCHS
    assert not (models / "phase2.done").exists()
    killed2 = max(int(p.stem.split("=")[1]) for p in models.glob("phase2_checkpoint_epoch=*.pt"))

    # rerun: phase 1 is skipped (completed), phase 2 continues and completes
    log_start = (root / "run.log").stat().st_size
    proc = _start(root, args)
    assert proc.wait(timeout=600) == 0, (root / "run.log").read_text()[-3000:]
    log = (root / "run.log").read_text()[log_start:]
    assert "phase1.done says this phase completed earlier; skipping it" in log
    assert f"resume: phase2 continues after epoch {killed2} from" in log
    assert json.loads((models / "phase2.done").read_text())["epochs"] == EPOCHS
    assert (models / "model.pt").is_file()


def test_resume_continues_only_its_own_run(example_workspace, tmp_path):
    """Run A completes; run B (another seed) starts fresh and is killed in phase 1; resuming B must continue B, not
    skip both phases on A's markers and return A's model. Resuming with other settings is refused untouched."""
    root = bundle_copy(tmp_path / "bundle")
    models = root / "models"
    run_a = overrides(example_workspace, root, phase1_epochs=2, phase2_epochs=2)
    proc = _start(root, run_a)
    assert proc.wait(timeout=600) == 0, (root / "run.log").read_text()[-3000:]
    model_a = (models / "model.pt").read_bytes()
    assert (models / "phase1.done").is_file() and (models / "phase2.done").is_file()

    run_b = overrides(example_workspace, root, phase1_epochs=EPOCHS, phase2_epochs=2, patience=1000, seed=7)
    _kill_after(_start(root, run_b), models / "phase1_checkpoint_epoch=1.pt")
    assert not (models / "phase1.done").exists() and not (models / "phase2.done").exists()  # A's markers are gone

    # another setting than B's: refused in one line, nothing changed
    before = {p.name: p.stat().st_mtime_ns for p in models.iterdir()}
    proc = _start(root, [*run_b, "--resume", "True", "--finetune_lr", "0.5"])
    assert proc.wait(timeout=600) != 0
    log = (root / "run.log").read_text()
    assert "resume continues only that run: run without --resume to start over" in log.splitlines()[-1]
    assert {p.name: p.stat().st_mtime_ns for p in models.iterdir()} == before

    # B resumed: phase 1 continues from B's checkpoint, phase 2 runs, and the model is B's, not A's
    proc = _start(root, [*run_b, "--resume", "True", "--phase1_epochs", str(EPOCHS)])
    assert proc.wait(timeout=900) == 0, (root / "run.log").read_text()[-3000:]
    log = (root / "run.log").read_text()
    assert "resume: phase1 continues after epoch" in log and "says this phase completed earlier" not in log
    assert json.loads((models / "phase2.done").read_text())["epochs"] >= 1
    assert (models / "model.pt").read_bytes() != model_a

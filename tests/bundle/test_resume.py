"""Kill a training run in phase 1, resume it; kill it in phase 2, resume it: each continues from its checkpoint.
Killed at random points of both phases and resumed each time, a run ends in one of its own saved states, never in
an older run's model. A resumed phase keeps its early-stopping count."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from bundle_utils import bundle_copy, overrides

from monai_medmerge.workflows.engines import latest_checkpoint

EPOCHS = 40


def _start(root: Path, args: list[str]) -> subprocess.Popen:
    files = [str(root / "configs" / "train.yaml")]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(files), *args]
    log = open(root / "run.log", "a")  # noqa: SIM115 - closed by the caller through the process
    # a process group of its own, so that a kill takes every process of the run at once
    return subprocess.Popen(cmd, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the run's process group (no chance to clean up, like a lost machine)."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)


def _kill_after(proc: subprocess.Popen, path: Path, timeout: float = 300) -> None:
    """SIGKILL ``proc`` as soon as ``path`` exists."""
    end = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended (code {proc.returncode}) before {path.name} was written"
        assert time.time() < end, f"{path.name} not written within {timeout} s"
        time.sleep(0.02)
    _kill(proc)


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


class _Recorder(threading.Thread):
    """Reads every version of the files that hold a network state (``model.pt`` and the phase-2 checkpoints) that
    appears in ``models`` while it runs, polling faster than an epoch; ``versions`` are ``(name, bytes)``."""

    def __init__(self, models: Path, skip: set[str]) -> None:
        super().__init__(daemon=True)
        self.models, self.skip = models, skip  # skip: digests of files that are not this run's
        self.versions: list[tuple[str, bytes]] = []
        self.seen: set[tuple] = set()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.poll()
            time.sleep(0.005)

    def poll(self) -> None:
        for path in [self.models / "model.pt", *self.models.glob("phase2_checkpoint_epoch=*.pt")]:
            try:
                stat = path.stat()
                if (path.name, stat.st_size, stat.st_mtime_ns) in self.seen:
                    continue
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            self.seen.add((path.name, stat.st_size, stat.st_mtime_ns))
            if _digest(data) not in self.skip:
                self.versions.append((path.name, data))

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=10)
        self.poll()


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _load(data: bytes) -> dict:
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _stamps(models: Path, pattern: str = "*") -> set[tuple[str, int]]:
    stamps = set()
    for path in models.glob(pattern):
        try:
            stamps.add((path.name, path.stat().st_mtime_ns))
        except FileNotFoundError:
            pass
    return stamps


def _whole_files(models: Path) -> None:
    """Every file the run left under its final name reads completely (a kill never leaves half a file there)."""
    for path in models.iterdir():
        if path.name.startswith("."):
            continue  # a temporary file of an interrupted write: never read; the next start removes it
        if path.suffix == ".pt":
            _load(path.read_bytes())
        else:
            json.loads(path.read_text())


def test_killed_at_random_points_the_run_ends_in_its_own_state(example_workspace, tmp_path):
    """Run A completes. Run B starts fresh and is killed (SIGKILL of its process group) four times, at seeded random
    moments: twice in phase 1, once as phase 2 begins, once in phase 2; each time it is resumed with --resume True.
    B's final model.pt must be, tensor by tensor, the network of one of the phase-2 checkpoints B wrote, the one of
    the epoch its best-score record names, and never A's model; markers and run.json are B's."""
    rng = random.Random(16)
    root = bundle_copy(tmp_path / "bundle")
    models = root / "models"
    run_a = overrides(example_workspace, root, phase1_epochs=2, phase2_epochs=2)
    assert _start(root, run_a).wait(timeout=600) == 0, (root / "run.log").read_text()[-3000:]
    model_a = _load((models / "model.pt").read_bytes())
    files_a = {p.name: p.read_bytes() for p in models.iterdir() if p.is_file()}

    phase1_epochs, phase2_epochs = 8, 6
    run_b = overrides(
        example_workspace, root, phase1_epochs=phase1_epochs, phase2_epochs=phase2_epochs, patience=1000, seed=7
    )
    # (what to wait for, the epoch of its latest checkpoint, then how long to wait more before the kill)
    plan = [
        ("phase1", rng.randint(1, 3), rng.uniform(0, 0.3)),
        ("phase1", rng.randint(4, 6), rng.uniform(0, 0.3)),
        ("phase1.done", None, rng.uniform(0, 0.6)),
        ("phase2", rng.randint(2, 4), rng.uniform(0, 0.3)),
    ]
    recorder = _Recorder(models, skip={_digest(data) for data in files_a.values()})
    recorder.start()
    landed, run_json_b = [], None
    for i, (wait_for, epoch, delay) in enumerate(plan):
        earlier = _stamps(models)  # what this attempt waits for must be its own file, not an earlier one
        proc = _start(root, [*run_b, "--resume", str(i > 0)])  # the first start is fresh, like a new run
        end = time.time() + 120
        while True:
            assert proc.poll() is None, f"kill {i + 1}: the run ended (code {proc.returncode}) before {wait_for}"
            assert time.time() < end, f"kill {i + 1}: {wait_for} not reached within 120 s"
            if wait_for == "phase1.done":
                found = models / "phase1.done"
            else:
                found = latest_checkpoint(models, wait_for)
            if found is not None and _stamps(models, found.name) - earlier:
                if epoch is None or int(found.stem.split("=")[1]) >= epoch:
                    break
            time.sleep(0.005)
        time.sleep(delay)
        _kill(proc)
        landed.append("phase2" if (models / "phase1.done").exists() else "phase1")
        _whole_files(models)
        if i == 0:
            run_json_b = (models / "run.json").read_text()
    proc = _start(root, [*run_b, "--resume", "True"])
    assert proc.wait(timeout=600) == 0, (root / "run.log").read_text()[-3000:]
    recorder.stop()

    log = (root / "run.log").read_text()
    assert landed.count("phase1") >= 2 and landed.count("phase2") >= 1, landed
    assert "resume: phase1 continues after epoch" in log and "resume: phase2 continues after epoch" in log
    # markers and run.json are B's (A's said 2 epochs and had A's fingerprint)
    assert run_json_b != files_a["run.json"].decode() and (models / "run.json").read_text() == run_json_b
    assert json.loads((models / "phase1.done").read_text())["epochs"] == phase1_epochs
    done2 = json.loads((models / "phase2.done").read_text())
    assert done2["epochs"] == phase2_epochs
    # the final model: B's own phase-2 state of its best epoch, never A's
    final = _load((models / "model.pt").read_bytes())
    assert not _same(final, model_a)
    best = json.loads((models / "model.pt.best.json").read_text())
    assert (best["best_metric"], best["best_metric_epoch"]) == (done2["best_metric"], done2["best_metric_epoch"])
    checkpoints = [_load(data) for name, data in recorder.versions if name.startswith("phase2_checkpoint")]
    assert len(checkpoints) >= phase2_epochs
    epoch_of = [c["trainer"]["iteration"] // c["trainer"]["epoch_length"] for c in checkpoints]
    of_best_epoch = [c["model"] for c, e in zip(checkpoints, epoch_of, strict=True) if e == best["best_metric_epoch"]]
    assert any(_same(final, state) for state in of_best_epoch), f"model.pt is none of B's states of {best}"
    assert not any(_same(model_a, c["model"]) for c in checkpoints)
    # every version of model.pt B wrote was a whole state dict; no temporary file of a killed write is left
    assert all(_load(data).keys() == final.keys() for name, data in recorder.versions if name == "model.pt")
    assert not [p.name for p in models.iterdir() if p.name.endswith(".tmp")]


class _Constant(torch.nn.Module):
    """A linear classifier of one feature that the phase cannot change (learning rate 0): every validation scores
    the same, so the first is the best and every later one counts towards the patience."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(1, 2)

    def forward(self, x):
        return self.linear(x.reshape(len(x), -1)[:, :1])


def _run_phase(folder: Path, max_epochs: int, resume: bool, patience: int = 3) -> list[int]:
    from ignite.engine import Events
    from torch.utils.data import DataLoader, TensorDataset

    from monai_medmerge.workflows import engines

    net = _Constant()
    data = DataLoader(TensorDataset(torch.tensor([[1.0], [2.0], [-1.0], [-2.0]]), torch.tensor([0, 0, 1, 1])))
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)
    checkpoint = engines.ResumableCheckpoint(folder, "phase", {"model": net, "optimizer": optimizer}, resume=resume)
    evaluator = engines.phase_evaluator(net, data)
    trainer = engines.phase_trainer(
        net, data, evaluator, optimizer, max_epochs, patience=patience, best_path=folder / "best.pt",
        checkpoint=checkpoint, progress=False,
    )  # fmt: skip
    epochs: list[int] = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda e: epochs.append(e.state.epoch))
    trainer.run()
    return epochs


def test_a_resumed_phase_keeps_its_patience(tmp_path):
    """With patience 3 and no improvement after epoch 1 the phase stops after epoch 4. Killed after epoch 3 (a run
    of 3 epochs leaves the same checkpoint) and resumed, it still stops after epoch 4, not 3 validations after the
    resume; killed after it had stopped (before its marker), the resume runs no epoch at all."""
    pytest.importorskip("ignite")
    assert _run_phase(tmp_path / "whole", 20, resume=False) == [1, 2, 3, 4]

    _run_phase(tmp_path / "killed", 3, resume=False)
    assert _run_phase(tmp_path / "killed", 20, resume=True) == [4]

    _run_phase(tmp_path / "stopped", 20, resume=False)
    assert latest_checkpoint(tmp_path / "stopped", "phase").name == "phase_checkpoint_epoch=4.pt"
    assert _run_phase(tmp_path / "stopped", 20, resume=True) == []

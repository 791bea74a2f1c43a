from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monai.networks.layers import Conv, Norm
from torch import nn

# Under pytest-xdist (the README's test command runs the test files in parallel processes) each worker takes its
# share of the cores, for torch here and for the processes its tests start (bundle runs, the guides): otherwise
# every worker would use them all, and the workers would slow each other down.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ["OMP_NUM_THREADS"] = str(_THREADS)
    torch.set_num_threads(_THREADS)


class TinyNet(nn.Module):
    """A custom CNN that exercises every unit type: grouped, depthwise and transposed convs, all norm kinds, PReLU."""

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, num_classes: int = 3) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        convt = Conv[Conv.CONVTRANS, spatial_dims]
        self.features = nn.Sequential(
            conv(in_channels, 8, 3, padding=1),
            Norm[Norm.BATCH, spatial_dims](8),
            nn.PReLU(8),
            conv(8, 8, 3, padding=1, groups=2, bias=False),
            nn.GroupNorm(2, 8),
            conv(8, 8, 3, padding=1, groups=8),
            Norm[Norm.INSTANCE, spatial_dims](8, affine=True),
            nn.ReLU(),
            convt(8, 12, 3, stride=2, padding=1, output_padding=1, groups=4),
            Norm[Norm.BATCH, spatial_dims](12),
            nn.ReLU(),
            conv(12, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1) if spatial_dims == 2 else nn.AdaptiveAvgPool3d(1)
        self.norm = nn.LayerNorm(16)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool(self.features(x)).flatten(1)
        return self.fc(self.drop(self.norm(h)))


@pytest.fixture
def tiny_net():
    return TinyNet


def make_source(ctor, seed: int, **kwargs) -> nn.Module:
    """A source network from its own random initialisation, with norm affine parameters and biases perturbed.

    Default initialisation sets every norm weight to 1 and bias to 0 in all sources, which would make their merge
    trivially equal whatever the coefficients; the perturbation makes every merged tensor depend on them.
    """
    torch.manual_seed(seed)
    net = ctor(**kwargs)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 1:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval()


@pytest.fixture(scope="session")
def example_workspace(tmp_path_factory):
    """A tiny example workspace: NIfTI target images with a datalist, two pretrained source bundles."""
    pytest.importorskip("nibabel")
    pytest.importorskip("ignite")
    from monai_medmerge.bundle.example import make_example

    root = tmp_path_factory.mktemp("example") / "workspace"
    return make_example(root, k=8, test_per_class=5, source_epochs=1, widths=[8, 16, 16, 32], progress=False)


def snapshot(root) -> dict[str, tuple]:
    """Every path under ``root`` (``root`` included), relative -> ``(kind, mode, size or link target, sha1)``.

    Compare a snapshot taken before an operation with one taken after it to show that nothing else changed on disk.
    Symbolic links are recorded, not followed; a missing ``root`` gives ``{}``.
    """
    import hashlib
    import os
    import stat
    from pathlib import Path

    root = Path(root)
    out: dict[str, tuple] = {}
    if not os.path.lexists(root):
        return out
    for path in [root, *sorted(root.rglob("*"))]:
        info = path.lstat()
        rel = str(path.relative_to(root))
        if stat.S_ISLNK(info.st_mode):
            out[rel] = ("link", stat.S_IMODE(info.st_mode), os.readlink(path), "")
        elif stat.S_ISDIR(info.st_mode):
            out[rel] = ("dir", stat.S_IMODE(info.st_mode), 0, "")
        else:
            digest = hashlib.sha1(path.read_bytes()).hexdigest()
            out[rel] = ("file", stat.S_IMODE(info.st_mode), info.st_size, digest)
    return out


@pytest.fixture
def run_script():
    """Run a bash script (``-euo pipefail``) from the checkout's root and fail with its log's tail unless it exits 0.
    Commands it calls by name (``python``, ``medmerge``) are the interpreter under test's: its scripts folder first
    on PATH, the checkout first on PYTHONPATH; otherwise the first Python on PATH would run, whose install of this
    package may point elsewhere."""
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    python_path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PATH": path, "PYTHONPATH": python_path}

    def run(script: str, timeout: float = 1500) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
        return proc

    return run

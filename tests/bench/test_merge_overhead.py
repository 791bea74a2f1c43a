"""benchmarks/merge_overhead.py: ``--update`` replaces only the measured rows, and the ``no-mmap`` allocator policy
really keeps large blocks on the heap (a repeated 3-D training step stops faulting in fresh pages)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import merge_overhead  # noqa: E402


def _row(arch: str, n: int, allocator: str | None, value: float) -> dict:
    row = {"arch": arch, "n_sources": n, "value": value}
    if allocator:
        row["allocator"] = allocator
    return row


def test_update_replaces_measured_rows_and_keeps_the_rest_in_order():
    old = [_row("resnet18", 2, None, 1), _row("segresnet", 2, None, 2), _row("unet2d", 2, None, 3)]
    new = [_row("segresnet", 2, "no-mmap", 4), _row("unet2d", 2, "default", 5)]
    rows = merge_overhead.updated_rows(old, new, {"cpu": "old machine"})
    # a row without an allocator is a default-allocator row: unet2d's is replaced, segresnet's kept beside the new one
    assert [(r["arch"], r.get("allocator"), r["value"]) for r in rows] == [
        ("resnet18", None, 1),
        ("segresnet", None, 2),
        ("segresnet", "no-mmap", 4),
        ("unet2d", "default", 5),
    ]
    # the kept rows name the machine of the file they came from, the new rows their own (here none)
    assert [r.get("machine") for r in rows] == [{"cpu": "old machine"}, {"cpu": "old machine"}, None, None]
    assert merge_overhead.updated_rows([], new) == new


CHILD = """
import resource, sys, torch
sys.path.insert(0, {benchmarks!r})
import merge_overhead
merge_overhead.use_allocator({allocator!r})
torch.manual_seed(0)
net = torch.nn.Sequential(*[torch.nn.Conv3d(8, 8, 3, padding=1) for _ in range(4)])
x = torch.randn(2, 8, 48, 48, 48)
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    net(x).sum().backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[2:]))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt and minor fault counts")
def test_no_mmap_policy_reuses_heap_memory_for_large_tensors():
    faults = {}
    for allocator in merge_overhead.ALLOCATORS:
        code = CHILD.format(benchmarks=str(BENCHMARKS), allocator=allocator)
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        faults[allocator] = int(out.strip().splitlines()[-1])
    # a small 3-D training step, repeated: with the default policy its large buffers are mapped fresh and first
    # touched again every step; with no-mmap the steady state reuses heap memory already touched
    assert faults["default"] > 1000, faults
    assert faults["no-mmap"] < faults["default"] / 10, faults

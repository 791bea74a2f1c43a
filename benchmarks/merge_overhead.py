"""Cost of learning merge coefficients against plain fine-tuning of one network, and of the collapsed network.

For each architecture and number of sources N, one process alternates a coefficient-learning step of
:class:`~monai_medmerge.networks.KernelMerge` with a plain fine-tuning step of one network of the same architecture
and batch (both with Adam, cross-entropy, training mode), and reports median step times and their ratio. Peak memory
of each is measured in a fresh subprocess (peak resident set size above the post-import baseline on CPU, max
allocated on CUDA). Inference of the
collapsed network is timed against a plain network of the same class, alternating, in eval mode without gradients.

Usage::

    python benchmarks/merge_overhead.py                      # full run, writes benchmarks/results/merge_overhead.json
    python benchmarks/merge_overhead.py --quick --out /tmp/q.json   # a short profile (CI)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from monai.networks.nets import DenseNet121, resnet18
from torch import nn

from medmerge_bench.comparison import machine_description
from monai_medmerge.io import write_json
from monai_medmerge.networks import KernelMerge

CONFIGS = {
    "resnet18": {
        "ctor": lambda k: resnet18(spatial_dims=2, n_input_channels=1, num_classes=k),
        "head": "fc",
        "shape": (1, 32, 32),
        "batch": 64,
    },
    "densenet121": {
        "ctor": lambda k: DenseNet121(spatial_dims=2, in_channels=1, out_channels=k),
        "head": "class_layers.out",
        "shape": (1, 64, 64),
        "batch": 16,
    },
}
TARGET_CLASSES = 7
TARGETS = {"step_ratio": {2: 1.10, 4: 1.20}, "inference_ratio": (0.97, 1.03)}


def build(arch: str, mode: str, n: int, device: torch.device, seed: int):
    """Return (module, optimizer) for one training mode: ``plain`` fine-tuning or ``merge`` coefficient learning."""
    cfg = CONFIGS[arch]
    torch.manual_seed(seed)
    if mode == "plain":
        net = cfg["ctor"](TARGET_CLASSES)
    else:
        # sources from different initialisations and with heads of different sizes, as in real use
        sources = [cfg["ctor"](3 + i) for i in range(n)]
        net = KernelMerge(sources, head=cfg["head"], out_channels=TARGET_CLASSES, anchor=0)
        del sources
    net = net.to(device).train()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    return net, opt


def make_batch(arch: str, device: torch.device, seed: int):
    cfg = CONFIGS[arch]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((cfg["batch"], *cfg["shape"]), generator=g).to(device)
    y = torch.randint(0, TARGET_CLASSES, (cfg["batch"],), generator=g).to(device)
    return x, y


def step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    loss = nn.functional.cross_entropy(net(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def step_times(arch: str, n: int, reps: int, warmup: int, device: torch.device, seed: int) -> dict:
    plain, plain_opt = build(arch, "plain", n, device, seed)
    merge, merge_opt = build(arch, "merge", n, device, seed)
    x, y = make_batch(arch, device, seed)
    for _ in range(warmup):
        step(plain, plain_opt, x, y)
        step(merge, merge_opt, x, y)
    times = {"plain": [], "merge": []}
    for r in range(reps):
        order = ("plain", "merge") if r % 2 == 0 else ("merge", "plain")
        for mode in order:
            net, opt = (plain, plain_opt) if mode == "plain" else (merge, merge_opt)
            times[mode].append(timed(lambda net=net, opt=opt: step(net, opt, x, y), device))
    med = {k: statistics.median(v) for k, v in times.items()}
    # each rep's ratio of neighbouring steps cancels slow drifts of the machine; report its median too
    paired = statistics.median(m / p for m, p in zip(times["merge"], times["plain"], strict=True))
    return {
        "median_s": med,
        "ratio_of_medians": med["merge"] / med["plain"],
        "median_paired_ratio": paired,
        "reps": reps,
        "merge_coefficients": merge.merge_logits.numel(),
        "trainable_params": {
            "plain": sum(p.numel() for p in plain.parameters()),
            "merge": sum(p.numel() for p in merge.parameters() if p.requires_grad),
        },
    }


def inference_times(arch: str, n: int, reps: int, warmup: int, device: torch.device, seed: int) -> dict:
    merge, _ = build(arch, "merge", n, device, seed)
    collapsed = merge.collapse().to(device).eval()
    del merge
    torch.manual_seed(seed)
    plain = CONFIGS[arch]["ctor"](TARGET_CLASSES).to(device).eval()
    x, _ = make_batch(arch, device, seed)
    times = {"plain": [], "collapsed": []}
    with torch.inference_mode():
        for _ in range(warmup):
            plain(x)
            collapsed(x)
        for r in range(reps):
            order = ("plain", "collapsed") if r % 2 == 0 else ("collapsed", "plain")
            for mode in order:
                net = plain if mode == "plain" else collapsed
                times[mode].append(timed(lambda net=net: net(x), device))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"median_s": med, "ratio_of_medians": med["collapsed"] / med["plain"], "reps": reps}


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(arch: str, mode: str, n: int, steps: int, device: str, seed: int) -> None:
    """Run in a fresh process: print the peak memory (MiB) that building and training ``steps`` steps add.

    On CPU: the peak resident set size (VmHWM) above the resident size after imports, with the peak reset first
    (``/proc/self/clear_refs``) so that import-time peaks do not count. On CUDA: max allocated device memory.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        base = _rss_mib("VmRSS")
    net, opt = build(arch, mode, n, dev, seed)
    x, y = make_batch(arch, dev, seed)
    for _ in range(steps):
        step(net, opt, x, y)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else _rss_mib("VmHWM") - base
    print(json.dumps({"peak_mib": peak}))


def peak_memory(arch: str, mode: str, n: int, steps: int, device: torch.device, seed: int) -> float:
    cmd = [sys.executable, __file__, "--_memory-child", arch, mode, str(n), str(steps), str(device), str(seed)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short profile: resnet18, N=2, few repetitions")
    parser.add_argument("--reps", type=int, default=21, help="timed steps per mode (median taken)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "merge_overhead.json")
    parser.add_argument("--_memory-child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._memory_child:
        arch, mode, n, steps, device, seed = args._memory_child
        peak_memory_child(arch, mode, int(n), int(steps), device, int(seed))
        return {}

    device = torch.device(args.device)
    archs, sizes, reps, warmup = (
        (["resnet18"], [2], 5, 1) if args.quick else (list(CONFIGS), [2, 4], args.reps, args.warmup)
    )
    results = []
    for arch in archs:
        for n in sizes:
            print(f"[merge_overhead] {arch} N={n}: training steps", flush=True)
            row = {"arch": arch, "n_sources": n, "batch": CONFIGS[arch]["batch"], "input": CONFIGS[arch]["shape"]}
            row["train_step"] = step_times(arch, n, reps, warmup, device, args.seed)
            print(f"[merge_overhead] {arch} N={n}: peak memory", flush=True)
            row["peak_memory_mib"] = {m: peak_memory(arch, m, n, 2, device, args.seed) for m in ("plain", "merge")}
            print(f"[merge_overhead] {arch} N={n}: inference", flush=True)
            row["inference"] = inference_times(arch, n, reps, warmup, device, args.seed)
            ratio = row["train_step"]["ratio_of_medians"]
            lo, hi = TARGETS["inference_ratio"]
            row["meets_target"] = {
                "step_ratio": ratio <= TARGETS["step_ratio"][n],
                "inference_ratio": lo <= row["inference"]["ratio_of_medians"] <= hi,
            }
            print(
                f"  step merge/plain {ratio:.3f} (target <= {TARGETS['step_ratio'][n]}), "
                f"inference collapsed/plain {row['inference']['ratio_of_medians']:.3f}, "
                f"peak MiB plain {row['peak_memory_mib']['plain']:.0f} merge {row['peak_memory_mib']['merge']:.0f}",
                flush=True,
            )
            results.append(row)
    report = {
        "benchmark": "merge_overhead",
        "quick": args.quick,
        "device": str(device),
        "seed": args.seed,
        "machine": machine_description(),
        "targets": {
            "step_ratio": {str(k): v for k, v in TARGETS["step_ratio"].items()},
            "inference_ratio": TARGETS["inference_ratio"],
        },
        "results": results,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    print(f"[merge_overhead] wrote {args.out}")
    return report


if __name__ == "__main__":
    main()

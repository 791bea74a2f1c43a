"""Cost of learning merge coefficients against plain fine-tuning of one network, and of the collapsed network.

For each architecture and number of sources N, one process alternates a coefficient-learning step of
:class:`~monai_medmerge.networks.KernelMerge` with a plain fine-tuning step of one network of the same architecture
and batch (both with Adam, in training mode; cross-entropy for the classifiers, ``DiceCELoss(to_onehot_y=True,
softmax=True)`` for the segmentation networks), and reports median step times, their ratio and the spread (quartiles)
of the per-repetition ratios. Peak memory of each is measured in a fresh subprocess (peak resident set size above the
post-import baseline on CPU, max allocated on CUDA). Inference of the collapsed network is timed against a plain
network of the same class, alternating, in eval mode without gradients. The load average of the machine is recorded
before and after each case, since on a shared machine it explains most of the spread.

Cases: two 2-D classifiers (ResNet18, DenseNet121) with N = 2 and 4, and two segmentation networks with N = 2 and
``head="auto"``: MONAI's SegResNet in 3-D (init_filters 16 as in MONAI's BraTS tutorial, one 96^3 patch per
sample, batch 2, the usual 3-D training patch) and MONAI's UNet in 2-D (channels 16-256, four stride-2 levels, two
residual units per level, 256 x 256 slices, batch 8). The 3-D case takes about 20 s a step on one CPU thread, so it
runs fewer repetitions; the quick profile (CI) shrinks the segmentation inputs (16^3 batch 2, 64 x 64 batch 2) to
check that the cases run, not to measure them.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/merge_overhead.py   # full run, writes benchmarks/results/merge_overhead.json
    python benchmarks/merge_overhead.py --quick --out /tmp/q.json   # a short profile (CI)
    python benchmarks/merge_overhead.py --arch unet2d --out /tmp/u.json   # some cases only
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from monai.losses import DiceCELoss
from monai.networks.nets import DenseNet121, SegResNet, UNet, resnet18
from torch import nn

from medmerge_bench.comparison import machine_description
from monai_medmerge.io import write_json
from monai_medmerge.networks import KernelMerge

# Per case: constructor (number of classes -> network), head, task, input shape (channels first) and batch, target
# classes, the source counts measured, and optionally smaller repetition counts and the quick profile's input.
CONFIGS = {
    "resnet18": {
        "ctor": lambda k: resnet18(spatial_dims=2, n_input_channels=1, num_classes=k),
        "head": "fc",
        "task": "classification",
        "shape": (1, 32, 32),
        "batch": 64,
        "classes": 7,
        "sizes": (2, 4),
    },
    "densenet121": {
        "ctor": lambda k: DenseNet121(spatial_dims=2, in_channels=1, out_channels=k),
        "head": "class_layers.out",
        "task": "classification",
        "shape": (1, 64, 64),
        "batch": 16,
        "classes": 7,
        "sizes": (2, 4),
    },
    "segresnet": {
        "ctor": lambda k: SegResNet(spatial_dims=3, init_filters=16, in_channels=1, out_channels=k),
        "head": "auto",
        "task": "segmentation",
        "shape": (1, 96, 96, 96),
        "batch": 2,
        "classes": 4,
        "sizes": (2,),
        "reps": 9,
        "warmup": 2,
        "quick": {"shape": (1, 16, 16, 16), "batch": 2},
    },
    "unet2d": {
        "ctor": lambda k: UNet(
            spatial_dims=2,
            in_channels=1,
            out_channels=k,
            channels=(16, 32, 64, 128, 256),
            strides=(2, 2, 2, 2),
            num_res_units=2,
        ),
        "head": "auto",
        "task": "segmentation",
        "shape": (1, 256, 256),
        "batch": 8,
        "classes": 4,
        "sizes": (2,),
        "quick": {"shape": (1, 64, 64), "batch": 2},
    },
}
# CI runs the quick profile: a 3-D SegResNet step takes seconds on CPU even at 16^3, so only the 2-D UNet stands in for
# segmentation there (the full run measures both)
QUICK_ARCHS = ("resnet18", "unet2d")
# the targets: a step of coefficient learning costs at most this many plain fine-tuning steps
TARGETS = {
    "step_ratio": {"classification": {2: 1.10, 4: 1.20}, "segmentation": {2: 1.05}},
    "inference_ratio": (0.97, 1.03),
}


ALLOCATORS = ("default", "no-mmap")


def use_allocator(name: str) -> None:
    """Set glibc malloc's policy for this process: ``default``, or ``no-mmap`` (large blocks from the heap, never
    returned), which removes the page faults of freshly mapped activation memory that otherwise cost a fifth of a 3-D
    CPU step and vary with the allocator's state; the same as running under ``MALLOC_MMAP_MAX_=0
    MALLOC_TRIM_THRESHOLD_=<large>``. Both modes of a comparison run under the same policy."""
    if name == "default":
        return
    # mallopt parameters from glibc's malloc.h; there is no Python binding for them
    m_trim_threshold, m_mmap_max = -1, -4
    libc = ctypes.CDLL("libc.so.6")
    if not (libc.mallopt(m_mmap_max, 0) and libc.mallopt(m_trim_threshold, 2**31 - 1)):
        raise RuntimeError(f"glibc mallopt refused the {name!r} allocator policy")


def case(arch: str, quick: bool = False) -> dict:
    """The configuration of ``arch``, with the quick profile's smaller input when ``quick``."""
    cfg = dict(CONFIGS[arch])
    if quick:
        cfg.update(cfg.get("quick", {}))
    return cfg


def build(cfg: dict, mode: str, n: int, device: torch.device, seed: int):
    """Return (module, optimizer) for one training mode: ``plain`` fine-tuning or ``merge`` coefficient learning."""
    torch.manual_seed(seed)
    if mode == "plain":
        net = cfg["ctor"](cfg["classes"])
    else:
        # sources from different initialisations and with heads of different sizes, as in real use
        sources = [cfg["ctor"](3 + i) for i in range(n)]
        net = KernelMerge(sources, head=cfg["head"], out_channels=cfg["classes"], anchor=0)
        del sources
    net = net.to(device).train()
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    return net, opt


def make_batch(cfg: dict, device: torch.device, seed: int):
    """A random input batch and labels: one class per sample, or a label map ``(B, 1, *spatial)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((cfg["batch"], *cfg["shape"]), generator=g).to(device)
    label_shape = (cfg["batch"],) if cfg["task"] == "classification" else (cfg["batch"], 1, *cfg["shape"][1:])
    y = torch.randint(0, cfg["classes"], label_shape, generator=g).to(device)
    return x, y


def loss_function(cfg: dict):
    if cfg["task"] == "classification":
        return nn.functional.cross_entropy
    return DiceCELoss(to_onehot_y=True, softmax=True)


def step(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, loss_fn) -> None:
    loss = loss_fn(net(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def timed(fn, device: torch.device, usage: list | None = None) -> float:
    """Wall time of ``fn()``; with ``usage``, also append its (minor page faults, system CPU seconds) to it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    if usage is not None:
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        usage.append((r1.ru_minflt - r0.ru_minflt, r1.ru_stime - r0.ru_stime))
    return elapsed


def quartiles(values: list[float]) -> list[float]:
    """First and third quartile (the spread reported beside each median)."""
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [q1, q3]


def step_times(cfg: dict, n: int, reps: int, warmup: int, device: torch.device, seed: int) -> dict:
    plain, plain_opt = build(cfg, "plain", n, device, seed)
    merge, merge_opt = build(cfg, "merge", n, device, seed)
    x, y = make_batch(cfg, device, seed)
    loss_fn = loss_function(cfg)
    for _ in range(warmup):
        step(plain, plain_opt, x, y, loss_fn)
        step(merge, merge_opt, x, y, loss_fn)
    times = {"plain": [], "merge": []}
    usage = {"plain": [], "merge": []}
    for r in range(reps):
        order = ("plain", "merge") if r % 2 == 0 else ("merge", "plain")
        for mode in order:
            net, opt = (plain, plain_opt) if mode == "plain" else (merge, merge_opt)
            times[mode].append(timed(lambda net=net, opt=opt: step(net, opt, x, y, loss_fn), device, usage[mode]))
    med = {k: statistics.median(v) for k, v in times.items()}
    # each rep's ratio of neighbouring steps cancels slow drifts of the machine; report its median too
    ratios = [m / p for m, p in zip(times["merge"], times["plain"], strict=True)]
    ops = merge_op_times(merge, reps, device)
    ops["share_of_plain_step"] = ops["median_s"] / med["plain"]
    return {
        "median_s": med,
        "ratio_of_medians": med["merge"] / med["plain"],
        "median_paired_ratio": statistics.median(ratios),
        "quartiles_s": {k: quartiles(v) for k, v in times.items()},
        "paired_ratio_quartiles": quartiles(ratios),
        "times_s": times,
        # page faults and kernel time per step: on CPU, first touches of freshly mapped memory for the activations
        # cost a fifth of a 3-D step and differ between runs with the allocator's state; they explain most spread
        "minor_faults_median": {k: statistics.median(f for f, _ in v) for k, v in usage.items()},
        "system_s_median": {k: statistics.median(s for _, s in v) for k, v in usage.items()},
        "merge_ops": ops,
        "reps": reps,
        "warmup": warmup,
        "head": merge.head,
        "merge_coefficients": merge.merge_logits.numel(),
        "trainable_params": {
            "plain": sum(p.numel() for p in plain.parameters()),
            "merge": sum(p.numel() for p in merge.parameters() if p.requires_grad),
        },
    }


def merge_op_times(merge: KernelMerge, reps: int, device: torch.device) -> dict:
    """Median time of the merge's own work in a step, alone: the weighted sums forward and their backward.

    Everything else in a coefficient-learning step is the forward and backward of one network of the sources'
    architecture, which a fine-tuning step runs too (it adds the optimizer's update of every weight instead).
    """
    grads = {k: torch.ones_like(v) for k, v in merge.merged_parameters().items()}
    times = []
    for _ in range(reps):

        def run():
            merged = merge.merged_parameters()
            torch.autograd.backward(list(merged.values()), [grads[k] for k in merged])
            merge.merge_logits.grad = None

        times.append(timed(run, device))
    return {"median_s": statistics.median(times), "quartiles_s": quartiles(times)}


def inference_times(cfg: dict, n: int, reps: int, warmup: int, device: torch.device, seed: int) -> dict:
    merge, _ = build(cfg, "merge", n, device, seed)
    collapsed = merge.collapse().to(device).eval()
    del merge
    torch.manual_seed(seed)
    plain = cfg["ctor"](cfg["classes"]).to(device).eval()
    x, _ = make_batch(cfg, device, seed)
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
    return {
        "median_s": med,
        "ratio_of_medians": med["collapsed"] / med["plain"],
        "quartiles_s": {k: quartiles(v) for k, v in times.items()},
        "reps": reps,
    }


def _rss_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_child(
    arch: str, quick: bool, mode: str, n: int, steps: int, device: str, seed: int, allocator: str
) -> None:
    """Run in a fresh process: print the peak memory (MiB) that building and training ``steps`` steps add.

    On CPU: the peak resident set size (VmHWM) above the resident size after imports, with the peak reset first
    (``/proc/self/clear_refs``) so that import-time peaks do not count. On CUDA: max allocated device memory.
    """
    use_allocator(allocator)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        base = _rss_mib("VmRSS")
    cfg = case(arch, quick)
    net, opt = build(cfg, mode, n, dev, seed)
    x, y = make_batch(cfg, dev, seed)
    loss_fn = loss_function(cfg)
    for _ in range(steps):
        step(net, opt, x, y, loss_fn)
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else _rss_mib("VmHWM") - base
    print(json.dumps({"peak_mib": peak}))


def peak_memory(
    arch: str, quick: bool, mode: str, n: int, steps: int, device: torch.device, seed: int, allocator: str
) -> float:
    child = [arch, str(int(quick)), mode, str(n), str(steps), str(device), str(seed), allocator]
    cmd = [sys.executable, __file__, "--_memory-child", *child]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def _row_key(row: dict) -> tuple:
    return row["arch"], row["n_sources"], row.get("allocator", "default")


def updated_rows(old: list[dict], new: list[dict], old_machine: dict | None = None) -> list[dict]:
    """``old`` rows in their order with those measured again replaced by ``new``; new cases appended after the rows of
    their network (each row keeps its own machine, allocator and time; an old row without a machine gets
    ``old_machine``, that of the file it came from)."""
    old = [dict(r, machine=r.get("machine", old_machine)) for r in old]
    fresh = {_row_key(r): r for r in new}
    rows = [fresh.pop(_row_key(r), r) for r in old]
    for row in new:
        if _row_key(row) in fresh:
            last = max((i for i, r in enumerate(rows) if r["arch"] == row["arch"]), default=len(rows) - 1)
            rows.insert(last + 1, fresh.pop(_row_key(row)))
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"short profile: {', '.join(QUICK_ARCHS)} at small sizes, N=2, few reps"
    )
    parser.add_argument("--arch", nargs="+", choices=list(CONFIGS), help="cases to run (default: all)")
    parser.add_argument(
        "--reps",
        type=int,
        help="timed steps per mode (median taken; default 21, fewer where a case sets it; given, for every case)",
    )
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "merge_overhead.json")
    parser.add_argument(
        "--allocator",
        choices=ALLOCATORS,
        default="default",
        help="glibc malloc policy for both modes (see use_allocator); recorded in each row",
    )
    parser.add_argument(
        "--update",
        action="store_true",
        help="replace only the measured rows (same network, N and allocator) in an existing --out file",
    )
    parser.add_argument("--_memory-child", nargs=8, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._memory_child:
        arch, quick, mode, n, steps, device, seed, allocator = args._memory_child
        peak_memory_child(arch, bool(int(quick)), mode, int(n), int(steps), device, int(seed), allocator)
        return {}
    use_allocator(args.allocator)

    device = torch.device(args.device)
    archs = args.arch or (list(QUICK_ARCHS) if args.quick else list(CONFIGS))
    results = []
    for arch in archs:
        cfg = case(arch, args.quick)
        sizes = [2] if args.quick else list(cfg["sizes"])
        reps, warmup = (
            (5, 1)
            if args.quick
            else (args.reps or cfg.get("reps", 21), min(args.warmup, cfg.get("warmup", args.warmup)))
        )
        for n in sizes:
            load_before = os.getloadavg()
            print(f"[merge_overhead] {arch} N={n}: training steps", flush=True)
            row = {
                "arch": arch,
                "task": cfg["task"],
                "n_sources": n,
                "batch": cfg["batch"],
                "input": cfg["shape"],
                "classes": cfg["classes"],
                "allocator": args.allocator,
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                "machine": machine_description(),
            }
            row["train_step"] = step_times(cfg, n, reps, warmup, device, args.seed)
            print(f"[merge_overhead] {arch} N={n}: peak memory", flush=True)
            row["peak_memory_mib"] = {
                m: peak_memory(arch, args.quick, m, n, 2, device, args.seed, args.allocator) for m in ("plain", "merge")
            }
            print(f"[merge_overhead] {arch} N={n}: inference", flush=True)
            row["inference"] = inference_times(cfg, n, reps, warmup, device, args.seed)
            row["load_average"] = {"before": load_before, "after": os.getloadavg()}
            row["written"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            ratio = row["train_step"]["ratio_of_medians"]
            target = TARGETS["step_ratio"][cfg["task"]][n]
            lo, hi = TARGETS["inference_ratio"]
            row["target_step_ratio"] = target
            row["meets_target"] = {
                "step_ratio": ratio <= target,
                "inference_ratio": lo <= row["inference"]["ratio_of_medians"] <= hi,
            }
            paired, (q1, q3) = row["train_step"]["median_paired_ratio"], row["train_step"]["paired_ratio_quartiles"]
            print(
                f"  step merge/plain {ratio:.3f} (target <= {target}; paired {paired:.3f}, "
                f"quartiles {q1:.3f}-{q3:.3f}; the merge's own ops "
                f"{row['train_step']['merge_ops']['share_of_plain_step']:.3f} of a plain step), "
                f"inference collapsed/plain {row['inference']['ratio_of_medians']:.3f}, "
                f"peak MiB plain {row['peak_memory_mib']['plain']:.0f} merge {row['peak_memory_mib']['merge']:.0f}, "
                f"load {load_before[0]:.1f} -> {row['load_average']['after'][0]:.1f}",
                flush=True,
            )
            results.append(row)
    report = {
        "benchmark": "merge_overhead",
        "quick": args.quick,
        "device": str(device),
        "seed": args.seed,
        "machine": machine_description(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "targets": {
            "step_ratio": {task: {str(k): v for k, v in by_n.items()} for task, by_n in TARGETS["step_ratio"].items()},
            "inference_ratio": TARGETS["inference_ratio"],
        },
        "results": results,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if args.update and args.out.exists():
        old = json.loads(args.out.read_text())
        report["results"] = updated_rows(old["results"], results, old["machine"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.out, report)
    print(f"[merge_overhead] wrote {args.out}")
    return report


if __name__ == "__main__":
    main()

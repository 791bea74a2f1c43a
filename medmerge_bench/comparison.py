"""Run the comparison of :mod:`medmerge_bench.transfer` over seeds and write its results and pictures."""

from __future__ import annotations

import csv
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import monai
import torch

import monai_medmerge
from medmerge_bench.plots import plot_report
from medmerge_bench.transfer import (
    COMPARISON_METHODS,
    METHOD_LABELS,
    Recipe,
    SeedResult,
    pretrain_sources,
    run_seed,
    summarize,
)
from monai_medmerge.io import atomic_write, output_folder, write_json

__all__ = ["join_reports", "machine_description", "run_comparison"]


def machine_description() -> dict:
    """The machine and versions, recorded beside every result."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "monai_medmerge": monai_medmerge.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "code": _git_revision(),
    }


def _git_revision() -> str | None:
    """The commit of the package's checkout (with ``+dirty`` for uncommitted changes), or None outside git."""
    import subprocess

    root = Path(monai_medmerge.__file__).resolve().parents[1]
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("+dirty" if dirty else "")


def run_comparison(
    task: str,
    k: int,
    seeds: Sequence[int],
    out_dir: str | Path,
    methods: Sequence[str] | None = None,
    recipe: Recipe | None = None,
    progress: bool = True,
    name: str | None = None,
    return_results: bool = False,
):
    """Pretrain (or load cached) sources, run every method for every seed, write results and pictures.

    Args:
        task: ``"brain"`` or ``"fashion"`` (see :func:`medmerge_bench.data.tasks.load_benchmark_tasks`).
        k: labelled target training examples per class.
        seeds: each seed draws the k-shot subset and the new heads' initialisation.
        out_dir: folder for ``<name>.json``, ``<name>_per_seed.csv`` and the PNG pictures.
        methods: subset of :data:`~medmerge_bench.transfer.COMPARISON_METHODS`; ``None``: every one the recipe's
            sources allow (``ft_c`` only with three sources).
        recipe: training settings (defaults of :class:`Recipe`).
        progress: progress bars.
        name: file stem (default ``<task>_k<k>``).
        return_results: also return the per-seed results (with the fine-tuned MedMerge networks).

    Returns:
        the written report (also in ``<name>.json``), or ``(report, results, tasks)`` with ``return_results``.
    """
    from medmerge_bench.data.tasks import load_benchmark_tasks

    recipe = recipe or Recipe()
    name = name or f"{task}_k{k}"
    out = output_folder(out_dir)
    t0 = time.time()
    # read at the start: the code that runs is the code imported now, whatever the checkout holds when it ends
    machine = machine_description()
    tasks = load_benchmark_tasks(task, k=k, seed=seeds[0], progress=progress)
    sources, source_info = pretrain_sources(tasks, recipe, progress=progress)
    if methods is None:
        methods = [m for m in COMPARISON_METHODS if m != "ft_c" or len(sources) > 2]
    results = []
    for seed in seeds:
        print(f"[medmerge] {task} k={k}: seed {seed}", flush=True)
        tasks = load_benchmark_tasks(task, k=k, seed=seed, progress=progress)
        res = run_seed(tasks, sources, recipe, seed, methods, progress=progress)
        results.append(res)
        line = ", ".join(f"{m} {r['test']['macro_f1']:.3f}" for m, r in res.records.items())
        print(f"[medmerge]   test macro-F1: {line}", flush=True)
    summary = summarize(results)
    if "room" in summary:
        room, chosen = summary["room"], summary.get("chosen_medmerge")
        line = f"[medmerge] room (ensemble - best single source): {100 * room['mean_difference']:+.1f} points"
        if chosen:
            line += f"; {chosen['method']} (chosen on validation) {100 * chosen['mean_difference']:+.1f}"
        print(line, flush=True)
    if "room_head_first" in summary:
        room = summary["room_head_first"]
        print(
            f"[medmerge] room with every network fine-tuned head first (ensemble_lpft - "
            f"{summary['best_single_source_head_first']}): {100 * room['mean_difference']:+.1f} points",
            flush=True,
        )
    report = {
        "benchmark": "transfer",
        "task": task,
        "k": k,
        "seeds": list(seeds),
        "methods": {m: METHOD_LABELS[m] for m in summary["methods"]},
        "lineage": recipe.lineage,
        "pair": recipe.pair,
        "source_names": source_info["names"],
        "recipe": asdict(recipe),
        "data": {
            "source_a": {
                "name": tasks.source_a.name,
                "classes": tasks.source_a.class_names,
                "train": len(tasks.source_a.train),
                "val": len(tasks.source_a.val),
            },
            "source_b": {
                "name": tasks.source_b.name,
                "classes": tasks.source_b.class_names,
                "train": len(tasks.source_b.train),
                "val": len(tasks.source_b.val),
            },
            "target": {
                "name": tasks.target.name,
                "classes": tasks.target.class_names,
                "train": len(tasks.target.train),
                "val": len(tasks.target.val),
                "test": len(tasks.target.test),
            },
            "notes": tasks.notes,
        },
        "sources": source_info,
        "summary": summary,
        "per_seed": [{"seed": r.seed, "anchor": "ab"[r.anchor], "records": r.records} for r in results],
        "coefficients_seed0": results[0].coefficients,
        "machine": machine,
        "seconds": round(time.time() - t0, 1),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    _write(report, results, out, name)
    return (report, results, tasks) if return_results else report


def _write(report: dict, results: Sequence[SeedResult], out: Path, name: str) -> None:
    """``<name>.json``, ``<name>_per_seed.csv`` and the pictures of ``report`` in ``out``."""
    write_json(out / f"{name}.json", report)
    with atomic_write(out / f"{name}_per_seed.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["seed", "method", "split", "macro_f1", "accuracy", "balanced_accuracy", "auroc"])
        for r in results:
            for m, rec in r.records.items():
                for split in ("val", "test"):
                    s = rec[split]
                    w.writerow([r.seed, m, split, s["macro_f1"], s["accuracy"], s["balanced_accuracy"], s["auroc"]])
    # drawn from the report itself, as `python -m medmerge_bench.plots <name>.json` draws them again
    report["pictures"] = [p.name for p in plot_report(report, out, name)]
    write_json(out / f"{name}.json", report)


# what two runs must share to be one comparison on more seeds
SAME_COMPARISON = ("benchmark", "task", "k", "methods", "lineage", "pair", "source_names", "recipe", "data", "sources")


def _provenance_free(value):
    """``value`` without its ``cached`` flags: whether a run found its sources in the cache or pretrained them again
    (bit for bit the same, same key and scores) says where the weights came from, not what was compared."""
    if isinstance(value, dict):
        return {k: _provenance_free(v) for k, v in value.items() if k != "cached"}
    return value


def _first_difference(a, b, where: str) -> str:
    """Where ``a`` and ``b`` (parsed JSON) first differ, as ``where.key: value_a vs value_b``, for a join's errors."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key) != b.get(key):
                return _first_difference(a.get(key), b.get(key), f"{where}.{key}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return _first_difference(x, y, f"{where}[{i}]")
    return f"{where}: {a!r} vs {b!r}"


def join_reports(paths: Sequence[str | Path], out_dir: str | Path, name: str) -> dict:
    """One report of several runs of one comparison on disjoint seeds (``medmerge benchmark --first-seed``).

    The runs must agree on everything but their seeds (:data:`SAME_COMPARISON`: task, k, methods, recipe, data and
    the pretrained sources) and come from one kind of machine (the machine record but the code revision); the
    summary is computed again from the per-seed records of all of them, as :func:`run_comparison` computes it. The
    joined report lists its parts (file, seeds, code revision, seconds) under ``joined_from``.

    Raises:
        ValueError: for fewer than two files, a file that is not a transfer comparison, runs that differ in a field
            of :data:`SAME_COMPARISON` or in the machine, or a seed in two runs; the message names the files.
    """
    import json

    if len(paths) < 2:
        raise ValueError(f"join needs at least two result files, got {len(paths)}")
    parts = []
    for path in paths:
        report = json.loads(Path(path).read_text())
        if report.get("benchmark") != "transfer" or "per_seed" not in report:
            raise ValueError(f"{path} is not a result file of `medmerge benchmark` (no transfer per-seed records)")
        parts.append(report)
    first = parts[0]
    for path, part in zip(paths[1:], parts[1:], strict=True):
        for key in SAME_COMPARISON:
            ours, theirs = _provenance_free(part.get(key)), _provenance_free(first.get(key))
            if ours != theirs:
                why = (
                    " (the sources were pretrained again and came out different: another kind of CPU or another "
                    "thread count trains them differently; run the missing seeds where the first ones ran)"
                    if key == "sources"
                    else ""
                )
                raise ValueError(
                    f"{path} and {paths[0]} differ in {key!r} ({_first_difference(ours, theirs, key)}): not one "
                    f"comparison on more seeds{why}"
                )
        machine = {k: v for k, v in part["machine"].items() if k != "code"}
        theirs = {k: v for k, v in first["machine"].items() if k != "code"}
        if machine != theirs:
            raise ValueError(
                f"{path} and {paths[0]} were measured on different machines or versions "
                f"({_first_difference(machine, theirs, 'machine')})"
            )
    seeds = [s for part in parts for s in part["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"the runs share seeds ({sorted(seeds)}): each seed must come from one run")
    results = sorted(
        (
            SeedResult(seed=r["seed"], records=r["records"], anchor="ab".index(r["anchor"]))
            for part in parts
            for r in part["per_seed"]
        ),
        key=lambda r: r.seed,
    )
    lowest = min(parts, key=lambda part: min(part["seeds"]))
    report = {key: first[key] for key in first if key not in ("pictures",)}
    report.update(
        seeds=[r.seed for r in results],
        summary=summarize(results),
        per_seed=[{"seed": r.seed, "anchor": "ab"[r.anchor], "records": r.records} for r in results],
        coefficients_seed0=lowest.get("coefficients_seed0"),
        machine=first["machine"] | {"code": sorted({str(part["machine"].get("code")) for part in parts})},
        joined_from=[
            {
                "file": Path(path).name,
                "seeds": part["seeds"],
                "code": part["machine"].get("code"),
                "seconds": part["seconds"],
                "written": part["written"],
            }
            for path, part in zip(paths, parts, strict=True)
        ],
        seconds=round(sum(part["seconds"] for part in parts), 1),
        written=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    out = output_folder(out_dir)
    _write(report, results, out, name)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m medmerge_bench.comparison join A.json B.json --name C [--out folder]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m medmerge_bench.comparison")
    sub = parser.add_subparsers(dest="command", required=True)
    j = sub.add_parser("join", help="join runs of one comparison on disjoint seeds into one report")
    j.add_argument("files", nargs="+", help="result files (<name>.json) of `medmerge benchmark`")
    j.add_argument("--name", required=True, help="file stem of the joined report")
    j.add_argument("--out", default=None, help="output folder (default: the first file's)")
    args = parser.parse_args(argv)
    try:
        report = join_reports(args.files, args.out or Path(args.files[0]).parent, args.name)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    print(f"[medmerge] {args.name}: seeds {report['seeds']} from {len(args.files)} runs", flush=True)


if __name__ == "__main__":
    main()

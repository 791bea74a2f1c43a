"""Search brain MRI task variants for room: how far the ensemble of the two fine-tuned sources leads the better one.

The room of a task is what a merge of its two sources could take: the validation macro-F1 of the ensemble of
``ft_a`` and ``ft_b`` (mean probabilities) minus that of the better single-source fine-tuning, the better one chosen
by mean validation macro-F1 over the seeds. A task is chosen on this VALIDATION room only; the same quantity on the
test split is recorded beside it and never used to choose.

Each candidate (a key of :data:`medmerge_bench.data.brain.BRAIN_VARIANTS`, or ``brain`` for today's task) has its
two sources pretrained with the default :class:`~medmerge_bench.transfer.Recipe` (cached, under the same key
``medmerge benchmark --task brain_<variant>`` uses), then only ``ft_a``, ``ft_b`` and ``ensemble`` are run per seed
and ``k``. Results are merged into the output file entry by entry (one entry per candidate and ``k``), so the search
can run in several short invocations:

    OMP_NUM_THREADS=1 python benchmarks/room_search.py --candidates tissue_lobe --k 10 50 --seeds 0 1 --threads 1
    python benchmarks/room_search.py --table   # the table of docs/data.md, from the recorded file

The second search fine-tunes every network head first (the protocol under which Fashion-MNIST's room is 3 points),
through ``medmerge benchmark --methods lpft_a lpft_b ensemble_lpft``; its result files sit in
``benchmarks/results/room_screen/`` and ``--screen`` prints their table (the room: ``ensemble_lpft`` minus the better
of ``lpft_a`` and ``lpft_b`` by mean validation macro-F1), with where each task validates (``pool`` or ``blocks``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from medmerge_bench.comparison import machine_description
from medmerge_bench.data.brain import BRAIN_VARIANTS
from medmerge_bench.data.tasks import BRAIN_VARIANT_PREFIX, load_benchmark_tasks
from medmerge_bench.transfer import Recipe, pretrain_sources, run_seed
from monai_medmerge.io import write_json

METHODS = ("ft_a", "ft_b", "ensemble")
OUT = Path(__file__).parent / "results" / "room_search.json"
SCREEN = Path(__file__).parent / "results" / "room_screen"
HEAD_FIRST = ("lpft_a", "lpft_b", "ensemble_lpft")
# the room a task must show on validation to be worth a merge benchmark (issue 15: at least 3 macro-F1 points)
ROOM_BAR = 0.03


def task_name(candidate: str) -> str:
    return "brain" if candidate == "brain" else BRAIN_VARIANT_PREFIX + candidate


def rooms(per_seed: list[dict], methods: tuple[str, str, str] = METHODS) -> dict:
    """The best single source (by mean validation macro-F1) and the ensemble's paired lead over it on val and test;
    ``methods`` names the two single-source rows and their ensemble."""
    a, b, ensemble = methods

    def f1(method: str, split: str) -> np.ndarray:
        return np.array([s[method][split]["macro_f1"] for s in per_seed])

    best = max((a, b), key=lambda m: f1(m, "val").mean())
    out: dict = {"best_single_source": best, "chosen_on": f"mean validation macro-F1 of {a} and {b}"}
    for split in ("val", "test"):
        diffs = f1(ensemble, split) - f1(best, split)
        out[f"room_{split}"] = {"mean": float(diffs.mean()), "per_seed": diffs.tolist()}
        for m in methods:
            out[f"{m}_{split}_macro_f1"] = float(f1(m, split).mean())
    return out


def run_candidate(candidate: str, ks: list[int], seeds: list[int], recipe: Recipe) -> list[dict]:
    """One entry per ``k``: per-seed val and test metrics of ``METHODS``, the rooms, sources, timing and machine."""
    task = task_name(candidate)
    wall, cpu = time.perf_counter(), time.process_time()
    tasks = load_benchmark_tasks(task, k=ks[0], seed=seeds[0], progress=False)
    sources, info = pretrain_sources(tasks, recipe, progress=False)
    pretrain = {"seconds": round(time.perf_counter() - wall, 1), "cpu_seconds": round(time.process_time() - cpu, 1)}
    print(f"[room] {task}: sources ready in {pretrain['seconds']} s ({info['key']})", flush=True)
    entries = []
    for k in ks:
        wall, cpu = time.perf_counter(), time.process_time()
        per_seed = []
        for seed in seeds:
            tasks = load_benchmark_tasks(task, k=k, seed=seed, progress=False)
            result = run_seed(tasks, sources, recipe, seed, METHODS, progress=False)
            per_seed.append(
                {"seed": seed}
                | {m: {s: result.records[m][s] for s in ("val", "test")} for m in METHODS}
                | {"epochs": {m: len(result.records[m]["curve"]) for m in ("ft_a", "ft_b")}}
            )
        summary = rooms(per_seed)
        entry = {
            "candidate": candidate,
            "task": task,
            "k": k,
            "seeds": seeds,
            "methods": list(METHODS),
            "source_names": info["names"],
            "target": {"name": tasks.target.name, "classes": tasks.target.class_names},
            "sources": info,
            "per_seed": per_seed,
            **summary,
            "seconds": round(time.perf_counter() - wall, 1),
            "cpu_seconds": round(time.process_time() - cpu, 1),
            "pretrain": pretrain,
            "machine": machine_description(),
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        entries.append(entry)
        print(
            f"[room] {task} k={k}: room val {100 * summary['room_val']['mean']:+.1f}, "
            f"test {100 * summary['room_test']['mean']:+.1f} points (best single {summary['best_single_source']}; "
            f"{entry['seconds']} s)",
            flush=True,
        )
    return entries


def selection(entries: list[dict]) -> dict:
    """The task and ``k`` with the largest mean validation room (a benchmark runs one task at one ``k``), and each
    candidate's validation room averaged over the ``k`` values every candidate was run at."""
    ks = sorted(set.intersection(*({e["k"] for e in entries if e["candidate"] == c} for c in _candidates(entries))))
    by_candidate = {}
    for c in _candidates(entries):
        mine = [e for e in entries if e["candidate"] == c and e["k"] in ks]
        by_candidate[c] = {
            "room_val": float(np.mean([e["room_val"]["mean"] for e in mine])),
            "room_test": float(np.mean([e["room_test"]["mean"] for e in mine])),
        }
    best = max(entries, key=lambda e: e["room_val"]["mean"])
    return {
        "criterion": "largest mean validation room of one task at one k (test room recorded, never used)",
        "bar": ROOM_BAR,
        "chosen": best["candidate"],
        "chosen_task": best["task"],
        "chosen_k": best["k"],
        "chosen_seeds": best["seeds"],
        "chosen_room_val": best["room_val"]["mean"],
        "chosen_room_test": best["room_test"]["mean"],
        "chosen_clears_bar": best["room_val"]["mean"] >= ROOM_BAR,
        "mean_over_k": {"k": ks, "rooms": by_candidate},
    }


def _candidates(entries: list[dict]) -> list[str]:
    return list(dict.fromkeys(e["candidate"] for e in entries))


def table(report: dict) -> str:
    """A markdown table of the recorded entries, in macro-F1 points."""
    lines = [
        "| candidate (task) | k | seeds | FT from A (val / test) | FT from B (val / test) | ensemble (val / test) "
        "| room on val (per seed) | room on test |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = ["brain", *BRAIN_VARIANTS]
    for e in sorted(report["entries"], key=lambda e: (order.index(e["candidate"]), e["k"])):

        def pair(m: str, e=e) -> str:
            return f"{100 * e[f'{m}_val_macro_f1']:.1f} / {100 * e[f'{m}_test_macro_f1']:.1f}"

        seeds = ", ".join(map(str, e["seeds"]))
        per_seed = ", ".join(f"{100 * r:+.1f}" for r in e["room_val"]["per_seed"])
        lines.append(
            f"| `{e['task']}` | {e['k']} | {seeds} | {pair('ft_a')} | {pair('ft_b')} | {pair('ensemble')} "
            f"| **{100 * e['room_val']['mean']:+.1f}** ({per_seed}) | {100 * e['room_test']['mean']:+.1f} |"
        )
    return "\n".join(lines)


def cost(report: dict) -> str:
    """What the recorded entries cost: pretraining once per candidate, then each entry's own runs."""
    entries = report["entries"]
    pretrain = {e["candidate"]: e["pretrain"] for e in entries if not e["sources"]["sources"]["a"]["cached"]}
    runs_cpu, runs_wall = sum(e["cpu_seconds"] for e in entries), sum(e["seconds"] for e in entries)
    cpu = runs_cpu + sum(p["cpu_seconds"] for p in pretrain.values())
    wall = runs_wall + sum(p["seconds"] for p in pretrain.values())
    per_k = [e["seconds"] for e in entries]
    pre = [p["seconds"] for p in pretrain.values()]
    return (
        f"recorded entries: {cpu / 60:.0f} CPU minutes, {wall / 60:.0f} minutes wall; pretraining "
        f"{min(pre) / 60:.1f}-{max(pre) / 60:.1f} min per candidate, one k {min(per_k) / 60:.1f}-{max(per_k) / 60:.1f} "
        "min (wall)"
    )


def _where_validated(variant: str) -> str:
    """``pool`` or ``blocks``, and the new subject's image when the task is validated and tested on one."""
    bench = BRAIN_VARIANTS.get(variant)
    if bench is None:
        return "pool"
    return bench.validation if bench.evaluate_on is None else f"{bench.validation}, {bench.evaluate_on}"


def screen_rows(folder: Path) -> list[dict]:
    """The head-first room of every benchmark result file in ``folder`` that ran ``HEAD_FIRST``, on val and test.

    Raises:
        ValueError: for a result file without the three head-first rows (named).
    """
    rows = []
    for path in sorted(folder.glob("*.json")):
        run = json.loads(path.read_text())
        records = [s["records"] for s in run["per_seed"]]
        missing = [m for m in HEAD_FIRST if any(m not in r for r in records)]
        if missing:
            raise ValueError(f"{path} has no {', '.join(missing)} row for every seed; a screen runs {HEAD_FIRST}.")
        summary = rooms(records, HEAD_FIRST)  # fractions; the screen's rows are in points
        variant = run["task"].removeprefix(BRAIN_VARIANT_PREFIX)
        row = {
            "file": path.name,
            "task": run["task"],
            "k": run["k"],
            "seeds": run["seeds"],
            "lineage": run["lineage"],
            "validation": _where_validated(variant),
            "best": summary["best_single_source"],
            "seconds": run["seconds"],
        }
        for split in ("val", "test"):
            room = summary[f"room_{split}"]
            row[f"room_{split}"] = {
                "mean": 100 * room["mean"],
                "per_seed": [round(100 * d, 1) for d in room["per_seed"]],
            }
            row |= {f"{m}_{split}": 100 * summary[f"{m}_{split}_macro_f1"] for m in HEAD_FIRST}
        rows.append(row)
    return rows


def screen_table(folder: Path = SCREEN) -> str:
    """A markdown table of :func:`screen_rows`, in macro-F1 points."""
    lines = [
        "| task | k | seeds | validation | LP-FT A (val / test) | LP-FT B (val / test) | ensemble (val / test) "
        "| room on val (per seed) | room on test (per seed) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in screen_rows(folder):

        def pair(m: str, r=r) -> str:
            return f"{r[f'{m}_val']:.1f} / {r[f'{m}_test']:.1f}"

        def room(split: str, r=r) -> str:
            return (
                f"{r[f'room_{split}']['mean']:+.1f} ({', '.join(f'{v:+.1f}' for v in r[f'room_{split}']['per_seed'])})"
            )

        lines.append(
            f"| `{r['task']}` | {r['k']} | {len(r['seeds'])} | {r['validation']} | {pair('lpft_a')} | {pair('lpft_b')} "
            f"| {pair('ensemble_lpft')} | **{room('val')}** | {room('test')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", nargs="+", default=list(BRAIN_VARIANTS), choices=["brain", *BRAIN_VARIANTS])
    parser.add_argument("--k", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--table", action="store_true", help="print the recorded table and selection, run nothing")
    parser.add_argument(
        "--screen", type=Path, nargs="?", const=SCREEN, help="print the head-first screen's table of this folder"
    )
    args = parser.parse_args(argv)
    if args.screen:
        print(screen_table(args.screen))
        return
    report = json.loads(args.out.read_text()) if args.out.exists() else {"entries": []}
    if args.table:
        print(table(report))
        print(cost(report))
        print(json.dumps(report.get("selection"), indent=1))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = Recipe()
    for candidate in args.candidates:
        new = run_candidate(candidate, args.k, args.seeds, recipe)
        done = {(e["candidate"], e["k"]) for e in new}
        # a rerun replaces the entries of the same candidate and k; the others are kept
        report["entries"] = [e for e in report["entries"] if (e["candidate"], e["k"]) not in done] + new
        report.update(
            {
                "benchmark": "room_search",
                "description": __doc__.split("\n\n")[1].replace("\n", " "),
                "recipe": asdict(recipe),
                "selection": selection(report["entries"]),
            }
        )
        write_json(args.out, report)
    print(table(report))
    print(json.dumps(report["selection"], indent=1))


if __name__ == "__main__":
    main()

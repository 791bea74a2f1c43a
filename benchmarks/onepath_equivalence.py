"""Check that the one training path (MONAI engines) trains as the hand loop it replaced, on the real brain task.

The hand loop of ``monai_medmerge/workflows/loops.py`` is read from the git history (``--rev``, the last commit
that had it) and run beside :func:`monai_medmerge.workflows.fine_tune` / ``learn_coefficients`` on the same data,
sources, seeds and batches: fine-tuning from the anchor (the benchmark's ``ft_b``) and MedMerge phase 1 and phase 2
(``medmerge_ft``) for the seeds given. Writes per-epoch validation curves, test metrics and the largest weight
difference of each pair.

    python benchmarks/onepath_equivalence.py --seeds 0 --out benchmarks/results/brain_k50_onepath_equivalence.json
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from medmerge_bench.comparison import machine_description
from medmerge_bench.data import load_benchmark_tasks
from medmerge_bench.transfer import Recipe, from_source, loader, new_merge, pretrain_sources, record
from monai_medmerge import workflows
from monai_medmerge.io import write_json

ROOT = Path(__file__).resolve().parents[1]


def old_loops(rev: str):
    """The hand loop module as it was at ``rev``."""
    source = subprocess.run(
        ["git", "show", f"{rev}:monai_medmerge/workflows/loops.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "old_loops.py"
    path.write_text(
        source.replace("from monai_medmerge.workflows.metrics import", "from monai_medmerge.workflows import")
    )
    spec = importlib.util.spec_from_file_location("old_loops", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_loops"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _max_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].double() - sb[k].double()).abs().max()) for k in sa)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--anchor", type=int, default=1, help="the source fine-tuned and anchored on (B)")
    parser.add_argument("--rev", default="e5022f4", help="a commit that has monai_medmerge/workflows/loops.py")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "brain_k50_onepath_equivalence.json"
    )
    args = parser.parse_args(argv)
    old = old_loops(args.rev)
    recipe = Recipe()
    t0 = time.time()
    tasks = load_benchmark_tasks("brain", k=args.k, seed=args.seeds[0], progress=False)
    sources, info = pretrain_sources(tasks, recipe, progress=False)
    rows = []
    for seed in args.seeds:
        target = load_benchmark_tasks("brain", k=args.k, seed=seed, progress=False).target
        val, test = loader(target.val, False, seed, 256), loader(target.test, False, seed, 256)
        row = {"seed": seed}
        for name, loop in (("hand_loop", old), ("engines", workflows)):
            torch.manual_seed(seed)
            net = from_source(sources[args.anchor], target.num_classes, recipe)
            ft, h_ft = loop.fine_tune(
                net, loader(target.train, True, seed, recipe.batch_size), val, **recipe.phase2(), progress=False
            )
            torch.manual_seed(seed)
            merge = new_merge(sources, target.num_classes, recipe, "kernel", args.anchor)
            plain, h1 = loop.learn_coefficients(
                merge, loader(target.train, True, seed, recipe.batch_size), val, **recipe.phase1(), progress=False
            )
            collapsed = record(plain, val, test)
            merged, h2 = loop.fine_tune(
                plain, loader(target.train, True, seed, recipe.batch_size), val, **recipe.phase2(), progress=False
            )
            row[name] = {
                "ft_anchor": record(ft, val, test, h_ft) | {"best_epoch": h_ft.best_epoch},
                "medmerge": collapsed | {"curve": [v["macro_f1"] for v in h1.val], "best_epoch": h1.best_epoch},
                "medmerge_ft": record(merged, val, test, h2) | {"best_epoch": h2.best_epoch},
                "_nets": (ft, plain, merged),
            }
            print(f"seed {seed} {name}: done ({time.time() - t0:.0f} s)", flush=True)
        nets_old, nets_new = row["hand_loop"].pop("_nets"), row["engines"].pop("_nets")
        row["max_weight_difference"] = {
            n: _max_diff(a, b)
            for n, a, b in zip(("ft_anchor", "medmerge", "medmerge_ft"), nets_old, nets_new, strict=True)
        }
        for rec in (row["hand_loop"], row["engines"]):
            for r in rec.values():
                r.pop("_probs", None)
        rows.append(row)
        write_json(
            args.out,
            {
                "benchmark": "onepath_equivalence",
                "task": "brain",
                "k": args.k,
                "anchor": "ab"[args.anchor],
                "hand_loop_rev": args.rev,
                "recipe": recipe.__dict__,
                "sources": info,
                "rows": rows,
                "machine": machine_description(),
                "seconds": round(time.time() - t0, 1),
                "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )


if __name__ == "__main__":
    sys.exit(main())

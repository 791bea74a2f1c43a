"""The ``medmerge`` command."""

from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medmerge", description="Merge pretrained networks for a new task (MONAI).")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quickstart", help="short end-to-end merge on synthetic images (CPU, about 2 minutes)")
    q.add_argument("--out", default="medmerge_out/quickstart", help="output folder")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--shots", type=int, default=16, help="labelled target images per class")
    q.add_argument("--no-progress", action="store_true")
    d = sub.add_parser("demo", help="the main job: offline brain-MRI merge, comparison, report and bundle (CPU)")
    d.add_argument("--out", default="medmerge_out/demo", help="output folder")
    d.add_argument("--task", choices=["brain", "fashion"], default="brain")
    d.add_argument("--k", type=int, default=50, help="labelled target examples per class")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true")
    sub.add_parser("methods", help="list the registered merge methods and their settings (JSON)")
    b = sub.add_parser("benchmark", help="compare MedMerge with transfer baselines on an offline task, over seeds")
    b.add_argument("--task", choices=["brain", "fashion"], default="brain")
    b.add_argument("--k", type=int, default=50, help="labelled target examples per class")
    b.add_argument("--seeds", type=int, default=5, help="number of seeds (0, 1, ...)")
    b.add_argument("--methods", nargs="+", default=None, help="subset of methods (default: all)")
    b.add_argument("--out", default="benchmarks/results", help="output folder")
    b.add_argument("--name", default=None, help="file stem of the results (default <task>_k<k>)")
    b.add_argument("--quick", action="store_true", help="a short profile: fewer epochs (for CI; numbers not kept)")
    b.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="change recipe settings, e.g. --set anchor_weight=0.99 coef_lr=0.05",
    )
    b.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "quickstart":
        from monai_medmerge.quickstart import run_quickstart

        run_quickstart(args.out, seed=args.seed, shots=args.shots, progress=not args.no_progress)
    elif args.command == "demo":
        from monai_medmerge.demo import run_demo

        run_demo(args.out, task=args.task, k=args.k, seed=args.seed, progress=not args.no_progress)
    elif args.command == "benchmark":
        from monai_medmerge.workflows.comparison import run_comparison
        from monai_medmerge.workflows.transfer import METHODS, Recipe

        recipe = Recipe(source_epochs=1, coef_epochs=2, ft_epochs=2, lp_epochs=1) if args.quick else Recipe()
        recipe = _with_settings(recipe, args.set)
        run_comparison(
            args.task,
            args.k,
            list(range(args.seeds)),
            args.out,
            methods=args.methods or METHODS,
            recipe=recipe,
            progress=not args.no_progress,
            name=args.name,
        )
    elif args.command == "methods":
        from monai_medmerge.merging import list_methods

        json.dump(list_methods(), sys.stdout, indent=2)
        print()
    return 0


def _with_settings(recipe, settings: list[str]):
    """``Recipe`` with ``FIELD=VALUE`` changes, each value parsed as the field's current type."""
    import dataclasses

    fields = {f.name: getattr(recipe, f.name) for f in dataclasses.fields(recipe)}
    changes = {}
    for item in settings:
        name, sep, value = item.partition("=")
        if not sep or name not in fields:
            raise SystemExit(f"medmerge: --set expects FIELD=VALUE with FIELD one of {sorted(fields)}, got {item!r}")
        current = fields[name]
        if isinstance(current, tuple):
            changes[name] = tuple(type(current[0])(v) for v in value.split(","))
        else:
            changes[name] = type(current)(value)
    return dataclasses.replace(recipe, **changes)


if __name__ == "__main__":
    sys.exit(main())

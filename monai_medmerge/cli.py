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
    sub.add_parser("methods", help="list the registered merge methods and their settings (JSON)")
    args = parser.parse_args(argv)

    if args.command == "quickstart":
        from monai_medmerge.quickstart import run_quickstart

        run_quickstart(args.out, seed=args.seed, shots=args.shots, progress=not args.no_progress)
    elif args.command == "methods":
        from monai_medmerge.merging import list_methods

        json.dump(list_methods(), sys.stdout, indent=2)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

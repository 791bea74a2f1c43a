"""Segmentation benchmark on real offline brain MRI: MedMerge against fine-tuning, averaging and the ensemble.

Pretrains 2-D MONAI UNets on source A (tissue, MNI152) and source B (lobes, Colin27), each from its own random
initialisation or (``--lineage shared``) both fine-tuned from one ancestor trained on Fashion-MNIST garment scenes
(cached under ``~/.cache/monai_medmerge/sources``), then per seed on the few-shot target (six
subcortical structures): scratch, fine-tune from A and from B, uniform average + FT, MedMerge + FT (direct recipe),
the paper's recipe and the ensemble of the two fine-tuned sources; see :mod:`medmerge_bench.segmentation`. Runs at
one torch thread and writes ``benchmarks/results/segmentation_k<k>.json`` with ``_slice.png`` and ``_dice.png``::

    python benchmarks/segmentation.py --k 2 --seeds 0 1 2 3 4
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: one thread, as recorded

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from medmerge_bench.segmentation import (  # noqa: E402
    DEFAULT_METHODS,
    LINEAGES,
    PAIRS,
    SEGMENTATION_METHODS,
    SegRecipe,
    run_segmentation,
)

RESULTS = HERE / "results"


def main(argv: list[str] | None = None) -> dict:
    defaults = SegRecipe()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--k", type=int, default=2, help="target training slices per structure")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", help="file stem (default segmentation_k<k>)")
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=SEGMENTATION_METHODS)
    parser.add_argument("--channels", type=int, nargs="+", default=list(defaults.channels), help="UNet widths")
    parser.add_argument("--num-res-units", type=int, default=defaults.num_res_units)
    parser.add_argument("--source-epochs", type=int, default=defaults.source_epochs)
    parser.add_argument("--coef-epochs", type=int, default=defaults.coef_epochs)
    parser.add_argument("--ft-epochs", type=int, default=defaults.ft_epochs)
    parser.add_argument("--patience", type=int, default=defaults.patience, help="early stopping; 0 or unset: none")
    parser.add_argument("--lineage", choices=LINEAGES, default=defaults.lineage, help="sources' starting points")
    parser.add_argument("--pair", choices=PAIRS, default=defaults.pair, help="ancestor_b: the ancestor as source A")
    parser.add_argument("--ancestor-epochs", type=int, default=defaults.ancestor_epochs)
    parser.add_argument("--no-cache", action="store_true", help="pretrain the sources again, without caching them")
    parser.add_argument("--progress", action="store_true", help="progress bars (default: one line per step)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (results are recorded at 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe = SegRecipe(
        channels=tuple(args.channels),
        strides=(2,) * (len(args.channels) - 1),
        num_res_units=args.num_res_units,
        source_epochs=args.source_epochs,
        coef_epochs=args.coef_epochs,
        ft_epochs=args.ft_epochs,
        patience=args.patience or None,
        lineage=args.lineage,
        ancestor_epochs=args.ancestor_epochs,
        pair=args.pair,
    )
    t0 = time.time()

    def log(message: str) -> None:
        print(f"[segmentation {time.time() - t0:6.0f} s] {message}", flush=True)

    report = run_segmentation(
        args.k,
        args.seeds,
        args.out,
        recipe,
        methods=args.methods,
        name=args.name,
        progress=args.progress,
        cache=not args.no_cache,
        log=log,
    )
    log(f"wrote {args.out / (args.name or f'segmentation_k{args.k}')}.json in {report['seconds']} s")
    return report


if __name__ == "__main__":
    main()

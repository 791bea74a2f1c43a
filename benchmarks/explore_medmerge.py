"""Study MedMerge's settings on a benchmark task: variants of phase 1 and 2, beside plain fine-tuning from the anchor.

Every variant is judged by VALIDATION macro-F1 (the test metrics are recorded beside it, never used to choose).
The sources are the cached ones of ``medmerge benchmark`` with the default recipe (pretrained if absent).

    python benchmarks/explore_medmerge.py --seeds 0 1 --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from medmerge_bench.comparison import machine_description
from medmerge_bench.data import load_benchmark_tasks
from medmerge_bench.transfer import HEAD, Recipe, from_source, loader, pretrain_sources, record
from monai_medmerge.io import write_json
from monai_medmerge.merging import recalibrate_norm
from monai_medmerge.networks import KernelMerge
from monai_medmerge.workflows import History, fine_tune, fit, learn_coefficients
from monai_medmerge.workflows.distillation import fine_tune_distilled

HEAD_INPUT_UNITS = ("layer4.0.conv2", "layer4.0.bn2", "layer4.0.downsample.0", "layer4.0.downsample.1")

# name -> (recipe changes, options of the run: see the comments); "default" is the recipe of the benchmark
VARIANTS = {
    "default": ({}, {}),
    "anchor_0.99": ({"anchor_weight": 0.99}, {}),
    "anchor_0.7": ({"anchor_weight": 0.7}, {}),
    "anchor_0.5": ({"anchor_weight": 0.5}, {}),
    "coef_lr_0.05": ({"coef_lr": 0.05}, {}),
    "no_recalibration": ({}, {"recalibrate": False}),
    "anchor_0.97": ({"anchor_weight": 0.97}, {}),
    "anchor_0.99_lr_0.05": ({"anchor_weight": 0.99, "coef_lr": 0.05}, {}),
    "penalty_0.1": ({"coef_penalty": 0.1}, {}),
    "penalty_1": ({"coef_penalty": 1.0}, {}),
    "coef_epochs_30": ({"coef_epochs": 30}, {}),
    # the units whose output channels are the new head's inputs (the last block's second conv and norm, and its
    # shortcut) keep the anchor's weights: a one-hot coefficient there, which phase 1 cannot move
    "anchor_head_inputs": ({}, {"anchor_units": HEAD_INPUT_UNITS}),
    # phase 2 trains the coefficients together with the weights: W = sum_i alpha_i W_i + delta, with delta (at the
    # fine-tuning rate), the merge logits (at the coefficient rate) and the head trained in one loop, then collapsed
    "phase1_joint": ({}, {"phase2": "joint"}),
    # the same joint training from the anchored start, with no separate phase 1
    "joint_only": ({}, {"phase1": False, "phase2": "joint"}),
    # the reference, not a variant: plain fine-tuning from the anchor source (the benchmark's best single source),
    # with the same batches and head initialisation as the benchmark's ft_a / ft_b
    "ft_anchor": ({}, {"baseline": True}),
    # phase 2 with distillation: cross-entropy on the labelled batch plus the KL divergence from a teacher's
    # probabilities on mixup blends of the batch's images; the teacher is the ensemble of the two sources
    # fine-tuned on the target (the benchmark's ft_a and ft_b), so one network learns what the ensemble knows
    "distill": ({}, {"teacher": "ensemble"}),
    # the same distillation into fine-tuning from the anchor: one network from both sources without a merge
    "ft_anchor_distill": ({}, {"baseline": True, "teacher": "ensemble"}),
    # the control: the anchor's own fine-tuned network as the teacher (what mixup and self-distillation give alone)
    "ft_anchor_self_distill": ({}, {"baseline": True, "teacher": "anchor"}),
    # patient distillation: a three times heavier distillation term and a longer phase 2 (fine-tuning from the
    # anchor gets the same longer budget as its reference)
    "distill_long": ({"ft_epochs": 100, "patience": 25}, {"teacher": "ensemble", "distill_weight": 3.0}),
    "ft_anchor_long": ({"ft_epochs": 100, "patience": 25}, {"baseline": True}),
}
# weight of the distillation term in the phase-2 loss, unless a variant sets its own
DISTILL_WEIGHT = 1.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="brain")
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "explore_brain_k50.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    base = Recipe()
    t0 = time.time()
    tasks = load_benchmark_tasks(args.task, k=args.k, seed=args.seeds[0], progress=False)
    # data_version "" is the key of the sources cached by the recorded benchmark run
    sources, info = pretrain_sources(tasks, base, progress=False, data_version="")
    rows = []
    recorded = Path(__file__).parent / "results" / f"{args.task}_k{args.k}.json"
    recorded_anchors = {}
    if recorded.exists():
        recorded_anchors = {p["seed"]: "ab".index(p["anchor"]) for p in json.loads(recorded.read_text())["per_seed"]}
    teachers: dict[int, list[torch.nn.Module]] = {}
    for seed in args.seeds:
        tasks = load_benchmark_tasks(args.task, k=args.k, seed=seed, progress=False)
        target = tasks.target

        def train(seed=seed, target=target):
            # a fresh loader per phase and variant: every variant sees the same shuffled batches
            return loader(target.train, True, seed, base.batch_size)

        val = loader(target.val, False, seed, 256)
        test = loader(target.test, False, seed, 256)
        # the anchor as in the benchmark: the source whose plain fine-tuning validated better for this seed, read
        # from the recorded run; B where no record exists (B's fine-tuning validated better in the runs seen here)
        anchor = recorded_anchors.get(seed, 1)
        for name in args.variants:
            changes, options = VARIANTS[name]
            recipe = dataclasses.replace(base, **changes)
            row = {"seed": seed, "variant": name, "anchor": "ab"[anchor], "changes": changes | options}

            teacher = None
            if options.get("teacher"):
                if seed not in teachers:
                    teachers[seed] = _fine_tuned_sources(sources, target.num_classes, train, val, base, seed)
                members = teachers[seed] if options["teacher"] == "ensemble" else [teachers[seed][anchor]]
                weight = options.get("distill_weight", DISTILL_WEIGHT)
                teacher = (members, weight, seed)

            torch.manual_seed(seed)
            if options.get("baseline"):
                net, h2 = _fine_tune(
                    from_source(sources[anchor], target.num_classes, recipe), train, val, recipe, teacher
                )
            else:
                merge = KernelMerge(
                    list(sources),
                    head=HEAD,
                    out_channels=target.num_classes,
                    anchor=anchor,
                    anchor_weight=recipe.anchor_weight,
                )
                for unit in options.get("anchor_units", ()):
                    merge.set_coefficients({unit: torch.eye(len(sources))[anchor].unsqueeze(1)})
                h1 = History()
                if options.get("phase1", True):
                    plain, h1 = learn_coefficients(
                        merge,
                        train(),
                        val,
                        **recipe.phase1(merge),
                        progress=False,
                        recalibrate=options.get("recalibrate", True),
                    )
                else:
                    plain = merge.collapse()
                collapsed = record(plain, val, test)
                if options.get("phase2") == "joint":
                    net, h2 = _joint_fine_tune(merge, train(), val, recipe)
                else:
                    net, h2 = _fine_tune(plain, train, val, recipe, teacher)
                alpha = torch.cat([a[anchor] for a in merge.coefficients().values()])
                row["collapsed"] = {k: collapsed[k] for k in ("val", "test")}
                row["anchor_share"] = {"mean": float(alpha.mean()), "min": float(alpha.min())}
                row["phase1_epochs"] = len(h1.val)
            final = record(net, val, test)
            row["fine_tuned"] = {k: final[k] for k in ("val", "test")}
            row["phase2_epochs"] = len(h2.val)
            rows.append(row)
            _write(args, base, info, rows, t0)
            merged = (
                f" (collapsed val {row['collapsed']['val']['macro_f1']:.3f}) "
                f"anchor share {row['anchor_share']['mean']:.3f}"
                if "collapsed" in row
                else ""
            )
            print(
                f"seed {seed} {name:18s} val {final['val']['macro_f1']:.3f} "
                f"test {final['test']['macro_f1']:.3f}{merged}",
                flush=True,
            )
    print(json.dumps(_write(args, base, info, rows, t0)["mean_macro_f1"], indent=2))


def _fine_tuned_sources(sources, num_classes: int, train, val, recipe: Recipe, seed: int) -> list[torch.nn.Module]:
    """Each source fine-tuned on the target as the benchmark's ft_a / ft_b are (same seed, batches and budget)."""
    nets = []
    for source in sources:
        torch.manual_seed(seed)
        net, _ = _fine_tune(from_source(source, num_classes, recipe), train, val, recipe)
        nets.append(net.eval())
    return nets


def _fine_tune(net, train, val, recipe: Recipe, teacher=None):
    """Phase 2 (or a fine-tuning baseline) with the recipe's budget, on a fresh training loader from ``train()``;
    with ``teacher`` = ``(teachers, weight, seed)`` distilled from their ensemble on mixup blends of the batch
    (:func:`monai_medmerge.workflows.distillation.fine_tune_distilled`)."""
    if teacher is None:
        return fine_tune(net, train(), val, **recipe.phase2(), progress=False)
    members, weight, seed = teacher
    return fine_tune_distilled(net, members, train(), val, weight=weight, seed=seed, **recipe.phase2(), progress=False)


def _joint_fine_tune(merge: KernelMerge, train, val, recipe: Recipe) -> tuple[torch.nn.Module, History]:
    """Fine-tune ``merge``'s weights and coefficients together; returns the collapsed best state and its History.

    Every merged tensor gets a trainable offset ``delta`` (zero at the start): the network's weights are
    ``sum_i alpha_i W_i + delta``. Adam moves the offsets exactly as fine-tuning would move the weights, while the
    coefficients keep choosing, kernel by kernel, how much of each source the weights start from.
    """
    deltas = torch.nn.ParameterDict(
        {
            name.replace(".", "__"): torch.nn.Parameter(torch.zeros_like(w.detach()))
            for name, w in merge.merged_parameters().items()
        }
    )
    merge.deltas = deltas
    plain_merged = merge.merged_parameters

    def with_offsets() -> dict[str, torch.Tensor]:
        return {name: w + deltas[name.replace(".", "__")] for name, w in plain_merged().items()}

    merge.merged_parameters = with_offsets
    head = [p for n, p in merge.network.named_parameters() if p.requires_grad]
    groups = [
        {"params": [merge.merge_logits], "lr": recipe.coef_lr},
        {"params": list(deltas.parameters()) + head, "lr": recipe.ft_lr},
    ]
    history = fit(merge, train, val, groups, recipe.ft_epochs, patience=recipe.patience, progress=False)
    recalibrate_norm(merge, train)
    return merge.collapse(), history


def _write(args, base: Recipe, info: dict, rows: list[dict], t0: float) -> dict:
    """Write the rows so far (a long run keeps what it measured if it is stopped)."""
    summary = {}
    for name in dict.fromkeys(r["variant"] for r in rows):
        sel = [r for r in rows if r["variant"] == name]
        summary[name] = {s: sum(r["fine_tuned"][s]["macro_f1"] for r in sel) / len(sel) for s in ("val", "test")}
        summary[name]["seeds"] = [r["seed"] for r in sel]
    report = {
        "benchmark": "explore_medmerge",
        "task": args.task,
        "k": args.k,
        "seeds": args.seeds,
        "variants": args.variants,
        "base_recipe": dataclasses.asdict(base),
        "sources": info,
        "rows": rows,
        "mean_macro_f1": summary,
        # among the merge variants: the reference rows (fine-tuning from the anchor, with or without a teacher) are not
        "chosen_on_validation": max(
            (n for n in summary if not VARIANTS[n][1].get("baseline")), key=lambda n: summary[n]["val"], default=None
        ),
        "complete": len(rows) == len(args.seeds) * len(args.variants),
        "machine": machine_description(),
        "seconds": round(time.time() - t0, 1),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()

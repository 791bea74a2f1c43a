"""The main job: build the offline brain-MRI tasks, pretrain two sources, merge, fine-tune, compare, export.

``medmerge demo`` runs it on the CPU in a few minutes and writes everything into one folder: the results (JSON,
CSV), the pictures, a Markdown report and a standard MONAI bundle of the merged network.
"""

from __future__ import annotations

import time
from pathlib import Path

from medmerge_bench.comparison import run_comparison
from medmerge_bench.transfer import Recipe, recipe_network_def
from monai_medmerge.bundle import export_bundle
from monai_medmerge.io import write_text

__all__ = ["run_demo", "DEMO_METHODS"]

# the ensemble (two networks, no training of its own) shows the room: what a merge could take into one network
DEMO_METHODS = ("ft_a", "ft_b", "average_ft", "medmerge", "medmerge_ft", "ensemble")


def run_demo(
    out_dir: str | Path = "medmerge_out/demo",
    task: str = "brain",
    k: int = 50,
    seed: int = 0,
    progress: bool = True,
    recipe: Recipe | None = None,
) -> dict:
    """Run the demo and write ``report.md``, results, pictures and ``bundle/`` into ``out_dir``.

    Returns:
        the comparison report, with ``"bundle"`` (the exported folder) and ``"report"`` (the Markdown file) added.
    """
    t0 = time.time()
    out = Path(out_dir)
    recipe = recipe or Recipe()
    report, results, tasks = run_comparison(
        task,
        k,
        [seed],
        out,
        methods=DEMO_METHODS,
        recipe=recipe,
        progress=progress,
        name="results",
        return_results=True,
    )
    merged = results[0].models["medmerge_ft"]
    classes = tasks.target.class_names
    bundle = export_bundle(
        merged,
        recipe_network_def(len(classes), recipe),
        out / "bundle",
        classes,
        spatial_shape=list(tasks.target.train.tensors[0].shape[2:]),
        name=f"medmerge_{task}_classification",
        description=f"MONAI ResNet merged by MedMerge from two sources ({tasks.source_a.name}, "
        f"{tasks.source_b.name}) and fine-tuned on {tasks.target.name} with {k} labels per class.",
        extra_metadata={"medmerge": {"anchor": report["per_seed"][0]["anchor"], "seed": seed, "k": k}},
        overwrite=True,
    )
    report["bundle"] = str(bundle)
    md = _markdown(report, out)
    write_text(out / "report.md", md)
    report["report"] = str(out / "report.md")
    print(f"\n{'method':34s} {'test macro-F1':>13s} {'accuracy':>9s}")
    for m, label in report["methods"].items():
        t = report["summary"]["methods"][m]
        print(f"{label:34s} {t['test_macro_f1']['mean']:13.3f} {t['test_accuracy']['mean']:9.3f}")
    print("\n" + _reading(report))
    print(f"\n[medmerge demo] done in {time.time() - t0:.0f} s: report {out / 'report.md'}, bundle {bundle}")
    return report


# what the recorded five-seed benchmarks say (docs/benchmarks.md, benchmarks/results/NOTES.md), per task
_RECORDED = {
    "brain": (
        "Over five seeds on the recorded brain benchmarks (k = 10, 50 and 200), MedMerge + FT ties fine-tuning from "
        "the better source: the per-seed differences change sign and no paired test is significant. The tissue "
        "source transfers hardly better than training from scratch, so there is little for a merge to add: the "
        "ensemble of the two fine-tuned sources is no better than the better one (k = 50: 42.1 against 44.2). "
        "Where "
        "the merge does help is against averaging: at k = 10 and 50 it is 7-10 points above the uniform average "
        "of the same two sources + FT (at k = 200 about one), because networks from different initialisations do "
        "not line up channel by channel and averaging them loses what each learned."
    ),
    "fashion": (
        "Over five seeds on the recorded Fashion-MNIST benchmarks, MedMerge + FT ties fine-tuning from the better "
        "source, while the ensemble of the two fine-tuned sources leads both by 2-4 points: the room. With every "
        "network trained head first (LP-FT) and sources from one ancestor, that room is +4.9 (k = 5) and +3.4 "
        "(k = 10), and the paper's recipe with phase 2 distilled from the ensemble takes 62 % and 71 % of it into "
        "one network (p < 0.05); distillation into the better source's network without a merge takes as much."
    ),
}


def _reading(report: dict) -> str:
    """The demo's numbers in words: how many seeds, how MedMerge + FT stands against the better source, the average
    and its own starting point, and what the recorded benchmarks say over five seeds."""
    table = report["summary"]["methods"]
    labels = report["methods"]
    n = len(report["seeds"])

    def f1(m: str) -> float:
        return table[m]["test_macro_f1"]["mean"]

    def points(a: str, b: str) -> str:
        diff = 100 * (f1(a) - f1(b))
        return f"{abs(diff):.1f} points {'above' if diff > 0 else 'below'} {labels[b]}"

    seeds = "one seed, no spread" if n == 1 else f"means over {n} seeds"
    lines = [f"Reading it ({seeds}; test macro-F1 of one method moves by up to a few points from seed to seed):"]
    if {"ft_a", "ft_b", "medmerge_ft"} <= set(table):
        best = max(("ft_a", "ft_b"), key=lambda m: table[m]["val_macro_f1"]["mean"])
        lines.append(f"- MedMerge + FT is {points('medmerge_ft', best)}, the better source on validation.")
        if "average_ft" in table:
            lines.append(f"- It is {points('medmerge_ft', 'average_ft')}.")
        if "ensemble" in table:
            room = 100 * (f1("ensemble") - f1(best))
            lines.append(
                f"- The room: the ensemble of the two fine-tuned sources (two networks, twice the cost) is "
                f"{points('ensemble', best)}. Only where it leads is there something for a merge, or a distilled "
                f"phase 2, to take into one network" + (" (here it does not)." if room <= 0 else ".")
            )
        if "medmerge" in table:
            lines.append(
                f"- Fine-tuning moved the collapsed merge by {100 * (f1('medmerge_ft') - f1('medmerge')):+.1f} "
                "points: the merge is a starting point for fine-tuning, not a finished model."
            )
    if report["task"] in _RECORDED:
        lines.append("- " + _RECORDED[report["task"]])
    lines.append("\nThe tables with paired tests: docs/benchmarks.md; what was tried: benchmarks/results/NOTES.md.")
    return "\n".join(lines)


def _markdown(report: dict, out: Path) -> str:
    rows = []
    for m, label in report["methods"].items():
        t = report["summary"]["methods"][m]
        rows.append(
            f"| {label} | {t['test_macro_f1']['mean']:.3f} | {t['test_accuracy']['mean']:.3f} | "
            f"{t['test_balanced_accuracy']['mean']:.3f} | {t['test_auroc']['mean']:.3f} | "
            f"{t['val_macro_f1']['mean']:.3f} |"
        )
    data = report["data"]
    target = data["target"]
    classes = ", ".join(target["classes"])
    pictures = "\n\n".join(f"![{p}]({p})" for p in report.get("pictures", []))
    return f"""# MedMerge demo: {report["task"]}, k = {report["k"]}

Target task: {target["name"]} ({len(target["classes"])} classes: {classes});
{target["train"]} training, {target["val"]} validation and {target["test"]} test patches.
Source A: {data["source_a"]["name"]}; source B: {data["source_b"]["name"]}; each pretrained from its own random
initialisation. MedMerge's anchor (chosen on validation): source {report["per_seed"][0]["anchor"].upper()}.

| method | test macro-F1 | accuracy | balanced accuracy | AUROC | validation macro-F1 |
|---|---|---|---|---|---|
{chr(10).join(rows)}

Seed {", ".join(map(str, report["seeds"]))}: a demonstration, not a measurement. `medmerge benchmark` runs every
method over several seeds with a paired comparison.

{_reading(report)}

{pictures}

The merged, fine-tuned network is exported as a standard MONAI bundle in `bundle/` (plain
`monai.networks.nets.ResNet`): loading its weights needs only MONAI and PyTorch; running its `inference.yaml` needs
exactly the packages its `docs/README.md` and `configs/metadata.json` list for its image reader).

About the data: {data["notes"]}

Machine: {report["machine"]["cpu"]}, torch {report["machine"]["torch"]}, MONAI {report["machine"]["monai"]};
{report["seconds"]} s for the comparison.
"""

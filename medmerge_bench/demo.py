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

DEMO_METHODS = ("ft_a", "ft_b", "average_ft", "medmerge", "medmerge_ft")


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
    print(f"\n[medmerge demo] done in {time.time() - t0:.0f} s: report {out / 'report.md'}, bundle {bundle}")
    return report


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

One seed ({report["seeds"][0]}): a demonstration, not a measurement. `medmerge benchmark` runs every method over
several seeds with a paired comparison.

{pictures}

The merged, fine-tuned network is exported as a standard MONAI bundle in `bundle/` (plain
`monai.networks.nets.ResNet`; MONAI and PyTorch suffice to load it).

About the data: {data["notes"]}

Machine: {report["machine"]["cpu"]}, torch {report["machine"]["torch"]}, MONAI {report["machine"]["monai"]};
{report["seconds"]} s for the comparison.
"""

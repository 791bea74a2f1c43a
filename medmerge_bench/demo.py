"""The main job: build the offline brain-MRI tasks, pretrain two sources, merge, fine-tune, compare, export.

``medmerge demo`` runs, on the CPU, the regime where the recorded benchmarks found a merge worth having: two brain
MRI specialists (the front and the back of the brain, trained on the MNI152 template) and a target of the thirteen
regions they split between them, with 10 labels per class, validated and tested on another subject (Colin27). It
runs the paper's recipe the way it helped there (each source fine-tuned head first on the target, a kernel-level
merge of the two, a phase 2 distilled from their ensemble on unlabelled target patches) beside each source
fine-tuned alone and the two-network ensemble, and writes everything into one folder: the results (JSON, CSV), the
pictures, a Markdown report and a standard MONAI bundle of the merged network.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from medmerge_bench.comparison import run_comparison
from medmerge_bench.transfer import Recipe, recipe_network_def
from monai_medmerge.bundle import export_bundle
from monai_medmerge.io import write_text

__all__ = ["run_demo", "DEMO_TASK", "DEMO_K", "DEMO_METHODS", "DEMO_RECIPE", "MERGED"]

DEMO_TASK = "brain_colin_test_split_regions"
DEMO_K = 10
# the network the demo exports: the paper's recipe over the sources fine-tuned head first, phase 2 distilled
MERGED = "paper_lpft_medmerge_distill"
# its phase 0 (each source fine-tuned head first: the single-source baselines) and the ensemble of that pair (two
# networks, twice the cost), whose lead over the better of them is the room a merge can take into one network
DEMO_METHODS = ("lpft_a", "lpft_b", MERGED, "ensemble_lpft")
# the budget of the recorded benchmark of this task
DEMO_RECIPE = Recipe.protocol("lpft_distill_ft150")
# the recorded benchmarks the reading compares with (run from a checkout; absent from an installed package)
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def run_demo(
    out_dir: str | Path = "medmerge_out/demo",
    task: str = DEMO_TASK,
    k: int = DEMO_K,
    seed: int = 0,
    progress: bool = True,
    recipe: Recipe | None = None,
) -> dict:
    """Run the demo and write ``report.md``, results, pictures and ``bundle/`` into ``out_dir``.

    Args:
        out_dir: the output folder.
        task: a benchmark task (:func:`medmerge_bench.data.tasks.benchmark_names`) whose target has at least
            ``recipe.distill_unlabeled`` unlabelled images.
        k: labelled target examples per class.
        seed: the seed of the k-shot draw and of every new head.
        progress: progress bars.
        recipe: training settings (default :data:`DEMO_RECIPE`).

    Returns:
        the comparison report, with ``"bundle"`` (the exported folder) and ``"report"`` (the Markdown file) added.
    """
    t0 = time.time()
    out = Path(out_dir)
    recipe = recipe or DEMO_RECIPE
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
    merged = results[0].models[MERGED]
    classes = tasks.target.class_names
    bundle = export_bundle(
        merged,
        recipe_network_def(len(classes), recipe),
        out / "bundle",
        classes,
        spatial_shape=list(tasks.target.train.tensors[0].shape[2:]),
        name=f"medmerge_{task}_classification",
        description=f"MONAI ResNet merged by MedMerge from two sources ({tasks.source_a.name}, "
        f"{tasks.source_b.name}), each fine-tuned head first on {tasks.target.name} with {k} labels per class, "
        "then merged kernel by kernel and fine-tuned, distilled from the two fine-tuned sources' ensemble.",
        extra_metadata={
            "medmerge": {
                "recipe": "paper",
                "phase0": "head first (LP-FT)",
                "phase2": f"distilled from the phase-0 ensemble on {recipe.distill_unlabeled} unlabelled images",
                "anchor": report["per_seed"][0]["anchor"],
                "seed": seed,
                "k": k,
            }
        },
        overwrite=True,
    )
    report["bundle"] = str(bundle)
    recorded = recorded_benchmark(task, k, recipe)
    md = _markdown(report, recorded)
    write_text(out / "report.md", md)
    report["report"] = str(out / "report.md")
    print(f"\n{'method':66s} {'test macro-F1':>13s} {'accuracy':>9s}")
    for m, label in report["methods"].items():
        t = report["summary"]["methods"][m]
        print(f"{label:66s} {t['test_macro_f1']['mean']:13.3f} {t['test_accuracy']['mean']:9.3f}")
    print("\n" + _reading(report, recorded))
    print(f"\n[medmerge demo] done in {time.time() - t0:.0f} s: report {out / 'report.md'}, bundle {bundle}")
    return report


_SAME_MEASUREMENT = (
    "widths",
    "lineage",
    "ancestor",
    "ancestor_epochs",
    "pair",
    "source_epochs",
    "lp_epochs",
    "coef_epochs",
    "ft_epochs",
    "patience",
    "distill_weight",
    "distill_unlabeled",
    "distill_steps",
)


def recorded_benchmark(task: str, k: int, recipe: Recipe, results: Path = RESULTS) -> tuple[str, dict] | None:
    """The recorded benchmark (``results/*.json``) that measured the demo's rows on ``task`` at ``k`` with
    ``recipe``'s sources, lineage and budget, the one with most seeds (then the first by name); None if none is
    recorded or the results folder is absent. The demo's reading quotes it, so its numbers are the file's, never
    copied."""
    # the settings that make two runs the same measurement (tuples are lists in the JSON)
    same = {key: getattr(recipe, key) for key in _SAME_MEASUREMENT}
    same = {key: list(value) if isinstance(value, tuple) else value for key, value in same.items()}
    found = []
    for path in sorted(results.glob("*.json")) if results.is_dir() else []:
        try:
            r = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(r, dict) or r.get("benchmark") != "transfer" or (r.get("task"), r.get("k")) != (task, k):
            continue
        used = r.get("recipe") or {}
        if any(used.get(key) != value for key, value in same.items()):
            continue
        summary = r.get("summary") or {}
        if MERGED in (summary.get("vs_best_head_first") or {}) and "room_head_first" in summary:
            found.append((-len(r.get("seeds") or []), path.name, r))
    if not found:
        return None
    _, name, r = min(found, key=lambda f: f[:2])
    return name, r


def _reading(report: dict, recorded: tuple[str, dict] | None = None) -> str:
    """The demo's numbers in words: the merged network against the better source on validation, the room (the
    ensemble's lead) and the share of it the merge took, and what the ``recorded`` benchmark (a name and its report,
    :func:`recorded_benchmark`) measured over its seeds."""
    table = report["summary"]["methods"]
    labels = report["methods"]
    n = len(report["seeds"])

    def f1(m: str) -> float:
        return 100 * table[m]["test_macro_f1"]["mean"]

    def points(a: str, b: str) -> str:
        diff = f1(a) - f1(b)
        return f"{abs(diff):.1f} points {'above' if diff > 0 else 'below'} {labels[b]}"

    seeds = "one seed, no spread" if n == 1 else f"means over {n} seeds"
    lines = [f"Reading it ({seeds}; test macro-F1 of one method moves by a few points from seed to seed):"]
    # the better LP-FT row on validation, as the comparison's summary chose it for the head-first room
    best = report["summary"].get("best_single_source_head_first")
    if MERGED in table and best:
        lines.append(
            f"- The merged network (one network, one network's cost) is {points(MERGED, best)}, the better "
            "source on validation."
        )
        if "ensemble_lpft" in table:
            room, gain = f1("ensemble_lpft") - f1(best), f1(MERGED) - f1(best)
            text = (
                f"- The room: the ensemble of the two fine-tuned sources (two networks, twice the cost) is "
                f"{points('ensemble_lpft', best)}. "
            )
            if room > 0:
                text += f"The merged network took {gain / room:.0%} of it into one network."
            else:
                text += "Here there was nothing for a merge to take; where the ensemble does not lead, no merge gains."
            lines.append(text)
    if recorded:
        name, r = recorded
        summary = r["summary"]
        room, gain = summary["room_head_first"], summary["vs_best_head_first"][MERGED]
        diffs = [100 * d for d in gain["differences"]]
        lines.append(
            f"- Recorded over {len(r['seeds'])} seeds (benchmarks/results/{name}): the room "
            f"{100 * room['mean_difference']:+.1f} points (paired t p {room['t_test_p']:.2g}); the merged network "
            f"{100 * gain['mean_difference']:+.1f} over {r['methods'][gain['baseline']]} (p {gain['t_test_p']:.2g}; "
            f"per seed {min(diffs):+.1f} to {max(diffs):+.1f})."
        )
    else:
        lines.append("- No recorded benchmark of this task, k and budget: `medmerge benchmark` runs it over seeds.")
    lines.append(
        "- Where the two fine-tuned sources' ensemble does not lead the better of them (most brain tasks tested at "
        'unseen places of the same brains), a merge has nothing to take: docs/benchmarks.md, "Room first".'
    )
    lines.append("\nThe tables with paired tests: docs/benchmarks.md; what was tried: benchmarks/results/NOTES.md.")
    return "\n".join(lines)


def _markdown(report: dict, recorded: tuple[str, dict] | None = None) -> str:
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
    anchor = report["per_seed"][0]["anchor"].upper()
    n = report["recipe"]["distill_unlabeled"]
    unlabeled = f"{n:,} unlabelled target patches" if n else "mixup blends of the labelled patches"
    pictures = "\n\n".join(f"![{p}]({p})" for p in report.get("pictures", []))
    return f"""# MedMerge demo: {report["task"]}, k = {report["k"]}

Target task: {target["name"]} ({len(target["classes"])} classes: {classes});
{target["train"]} training, {target["val"]} validation and {target["test"]} test patches.
Source A: {data["source_a"]["name"]}; source B: {data["source_b"]["name"]}; each pretrained from its own random
initialisation. The merge's anchor (the source fine-tuned best on validation): {anchor}.

| method | test macro-F1 | accuracy | balanced accuracy | AUROC | validation macro-F1 |
|---|---|---|---|---|---|
{chr(10).join(rows)}

LP-FT: the source's new target head trained alone first (linear probing), then the whole network fine-tuned; the
paper's recipe merges the two LP-FT networks kernel by kernel (coefficients learned on the target), collapses the
merge into one plain network and fine-tunes it, learning also from the two LP-FT networks' averaged predictions on
{unlabeled}; the ensemble averages the two LP-FT networks' outputs at twice the cost.

Seed {", ".join(map(str, report["seeds"]))}: a demonstration, not a measurement. `medmerge benchmark` runs every
method over several seeds with a paired comparison.

{_reading(report, recorded)}

{pictures}

The merged network is exported as a standard MONAI bundle in `bundle/` (plain `monai.networks.nets.ResNet`): loading
its weights needs only MONAI and PyTorch; running its `inference.yaml` needs exactly the packages its
`docs/README.md` and `configs/metadata.json` list for its image reader.

The same recipe on your own images, with the training bundle (`bundles/medmerge_classification`,
docs/user_guide.md, "Distilled phase 2"): the sources' checkpoints, a datalist with an `unlabeled` section, then

```shell
{_bundle_command(report["recipe"])}
```

About the data: {data["notes"]}

Machine: {report["machine"]["cpu"]}, torch {report["machine"]["torch"]}, MONAI {report["machine"]["monai"]};
{report["seconds"]} s for the comparison.
"""


def _bundle_command(recipe: dict) -> str:
    """The training bundle's command line for the demo's recipe (the option names of docs/user_guide.md)."""
    options = {
        "recipe": "paper",
        "phase0_epochs": recipe["ft_epochs"],
        "phase0_head_epochs": recipe["lp_epochs"],
        "phase0_head_lr": recipe["lp_lr"],
        "phase1_epochs": recipe["coef_epochs"],
        "phase2_epochs": recipe["ft_epochs"],
        "patience": recipe["patience"],
        "distill_weight": recipe["distill_weight"],
        "unlabeled_section": "unlabeled",
        "phase2_steps_per_epoch": recipe["distill_steps"],
    }
    words = [f"--{key} {value}" for key, value in options.items()]
    lines = ["python -m monai.bundle run paper --config_file configs/train.yaml"]
    for word in words:
        if len(lines[-1]) + len(word) > 100:
            lines[-1] += " \\"
            lines.append("    ")
        lines[-1] += (" " if not lines[-1].endswith("    ") else "") + word
    return "\n".join(lines)

"""Write docs/benchmarks.md from the recorded results in benchmarks/results/*.json (never edit numbers by hand)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from medmerge_bench.transfer import share_of_room
from monai_medmerge.io import write_text

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _machine(m: dict) -> str:
    gpu = f", GPU {m['cuda']}" if m.get("cuda") else ""
    return (
        f"{m['cpu']} ({m['cpu_count']} cores, {m['torch_threads']} torch threads){gpu}; {m['platform']}; "
        f"Python {m['python']}, torch {m['torch']}, MONAI {m['monai']}, monai_medmerge {m['monai_medmerge']}"
    )


def _step_target(r: dict, row: dict) -> float:
    """The step-ratio target of one row: recorded in the row, or (older files) by N alone."""
    if "target_step_ratio" in row:
        return row["target_step_ratio"]
    return r["targets"]["step_ratio"][str(row["n_sources"])]


def _row_machines(r: dict) -> str:
    """Where the rows were measured: one machine, or (rows replaced with ``--update``) each machine with its rows."""
    groups: dict[str, list[str]] = {}
    for row in r["results"]:
        m = row.get("machine", r["machine"])
        name = f"{row['arch']} N={row['n_sources']} ({row.get('allocator', 'default')})"
        groups.setdefault(f"{_machine(m)}, code {m.get('code')}", []).append(name)
    if len(groups) == 1:
        return f"Machine: {next(iter(groups))}."
    return " ".join(f"Rows {', '.join(rows)} measured on: {where}." for where, rows in groups.items())


def merge_overhead_section(r: dict) -> str:
    lines = [
        "## Cost of coefficient learning (`benchmarks/merge_overhead.py`)",
        "",
        "Median time of one training step of `KernelMerge` coefficient learning (sources frozen, coefficients and a "
        "new head trained) against one step of plain fine-tuning of a single network of the same architecture and "
        "batch, both with Adam (cross-entropy for the classifiers, `DiceCELoss(to_onehot_y=True, softmax=True)` for "
        'the segmentation networks, whose head the merge finds with `head="auto"`), measured alternately in one '
        "process; peak memory of each in a fresh process; inference of the collapsed network against a plain network "
        "of the same class.",
        "",
        f"{_row_machines(r)} Device `{r['device']}`, seed {r['seed']}, file written {r['written']}.",
        "",
        "| network | input, batch | N | allocator | reps | plain step (ms) | merge step (ms) | ratio | "
        "paired ratio (quartiles) | target | the merge's own ops | page faults plain / merge | "
        "peak MiB plain / merge | inference collapsed / plain | load before / after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r["results"]:
        st, inf, mem = row["train_step"], row["inference"], row["peak_memory_mib"]
        ok = "met" if row["meets_target"]["step_ratio"] else "**missed**"
        iok = "" if row["meets_target"]["inference_ratio"] else " (**outside 1.00 +- 0.03**)"
        shape = "x".join(map(str, row["input"]))
        paired = f"{st['median_paired_ratio']:.3f}"
        if "paired_ratio_quartiles" in st:
            q1, q3 = st["paired_ratio_quartiles"]
            paired += f" ({q1:.3f}-{q3:.3f})"
        load = row.get("load_average")
        load = f"{load['before'][0]:.1f} / {load['after'][0]:.1f}" if load else "-"
        # rows written before these were recorded show a dash
        ops = f"{st['merge_ops']['share_of_plain_step']:.3f}" if "merge_ops" in st else "-"
        faults = st.get("minor_faults_median")
        faults = f"{faults['plain']:.0f} / {faults['merge']:.0f}" if faults else "-"
        lines.append(
            f"| {row['arch']} | {shape}, {row['batch']} | {row['n_sources']} | {row.get('allocator', 'default')} | "
            f"{st['reps']} | {1000 * st['median_s']['plain']:.0f} | {1000 * st['median_s']['merge']:.0f} | "
            f"{st['ratio_of_medians']:.3f} | {paired} | <= {_step_target(r, row)} ({ok}) | {ops} | {faults} | "
            f"{mem['plain']:.0f} / {mem['merge']:.0f} | {inf['ratio_of_medians']:.3f}{iok} | {load} |"
        )
    lines += [
        "",
        "Medians over the given number of alternating repetitions per mode, after warm-up steps; the ratio is that of "
        "the medians (the target is checked on it), the paired ratio the median of each repetition's merge/plain "
        "ratio, with its first and third quartiles as the spread. The load is the machine's one-minute load average "
        "before and after the case. The merge's own ops are the median time of the merged weights' forward and "
        "backward alone (the only work a coefficient-learning step adds to one network's forward and backward; it "
        "saves the optimizer's update of every weight), as a share of a plain step. Page faults are the median minor "
        "faults per step: on CPU with glibc's default allocator, activations larger than its mapping threshold are "
        "mapped fresh and first touched every step, which costs kernel time that varies with the allocator's state; "
        "the `no-mmap` rows run both modes with large blocks kept on the heap (`--allocator no-mmap`, the same as "
        "`MALLOC_MMAP_MAX_=0`) to measure without it. Rows carry their own code revision and time (`--update` "
        "replaces only the measured rows). Peak memory on CPU is "
        "the peak resident set size that building the model and two training steps add above the resident size "
        "after imports (the merge holds the N frozen sources; fine-tuning holds gradients and Adam state for every "
        "parameter).",
        "",
    ]
    return "\n".join(lines)


def room_of(r: dict) -> dict | None:
    """The room and share of a transfer result: recorded in newer files, computed from the recorded per-seed table
    (the same function) for files written before the room was recorded; None without an ensemble row."""
    from medmerge_bench.transfer import SINGLE_SOURCE, room_summary

    s = r["summary"]
    methods = list(s["methods"])
    if not {"ft_a", "ft_b", "ensemble"} <= set(methods):
        return None
    if "room" in s:
        return s
    singles = [m for m in SINGLE_SOURCE if m in methods]
    best = max(singles, key=lambda m: s["methods"][m]["val_macro_f1"]["mean"])
    return {"best_single_source": best, **room_summary(s["methods"], methods, best)}


PAIR_NAMES = {"ab": "", "ancestor_b": " (ancestor, B)", "ab_ancestor": " (A, B, ancestor: N = 3)"}


def _lineage(r: dict) -> str:
    """The lineage and pair of a result; a shared ancestor other than the default one is named."""
    ancestor = r.get("recipe", {}).get("ancestor", "other_domain")
    kind = "" if ancestor == "other_domain" else f", {ancestor} ancestor"
    return r.get("lineage", "independent") + kind + PAIR_NAMES[r.get("pair", "ab")]


def _widths(r: dict) -> list[int]:
    """The channel widths of a result's network: ``widths`` of the classifiers, ``channels`` of the UNet."""
    return r["recipe"].get("widths") or r["recipe"]["channels"]


def _metric(r: dict) -> str:
    return "mean Dice" if r.get("benchmark") == "segmentation" else "macro-F1"


def room_section(results: list[tuple[str, dict]], picture: str | None) -> str:
    """One table over every transfer and segmentation result with an ensemble row: the room and what the merges
    take of it."""
    lines = [
        "## Where merging can help: the room, and the share a merge takes",
        "",
        "The room of a benchmark is the ensemble of the fine-tuned sources (N networks, N times the cost) minus "
        "the best single-source fine-tuning (chosen on the mean validation key metric), test points of that metric "
        "(macro-F1 for classification, mean Dice for segmentation), paired per seed. A one-network method's share "
        "is its own paired gain over the better source divided by the room (shown only where the room is positive). "
        "The MedMerge recipe is chosen per benchmark on the mean validation key metric among the MedMerge rows "
        "that benchmark ran. The last column, where a benchmark ran them, sets a merge against a control with "
        "the same training schedule and no merge: the paper's recipe against the better source's fine-tuned network "
        "fine-tuned again (`ft_longer`: the paper's recipe fine-tunes twice, so its gain over a single fine-tuning "
        "can be budget alone); MedMerge + FT (direct recipe: a new head trained first, with the coefficients) "
        "against the same head-first schedule on the better source (`ft_head_first` in segmentation, LP-FT "
        "`lpft_*` in classification); a recipe whose phase 2 trains more steps per epoch (`distill_steps`) against "
        "fine-tuning from the anchor for the same steps (`ft_steps`). Where a benchmark ran the ensemble of the LP-FT "
        "rows, the room column adds the room left when every network is fine-tuned head first (`ensemble_lpft` "
        "minus the better LP-FT row on validation), and the share column the share of it that a recipe over the LP-FT "
        "pair takes (its paired gain over that LP-FT row).",
        "",
        "| result | task, k | metric | lineage | widths | seeds | room (p) | chosen MedMerge recipe | its gain (p) | "
        "share | merge vs equal-budget control (p) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def p_of(paired: dict) -> str:
        return f" (p {paired['t_test_p']:.2g})" if "t_test_p" in paired else ""

    for stem, r in results:
        room = room_of(r)
        if room is None:
            continue
        rm = room["room"]
        chosen = room.get("chosen_medmerge")
        gain = share = name = "-"
        if chosen:
            name = r["methods"][chosen["method"]]
            gain = f"{100 * chosen['mean_difference']:+.1f}{p_of(chosen)}"
            taken = share_of_room(chosen["mean_difference"], rm["mean_difference"])
            share = "-" if taken is None else f"{100 * taken:.0f}%"
        controls = []
        steps = _steps_control(r, chosen)
        if steps is not None:
            controls.append(
                f"{r['methods'][chosen['method']]} {100 * steps['mean_difference']:+.1f}{p_of(steps)} "
                f"vs `{steps['baseline']}`"
            )
        head_first_control = None
        if chosen and chosen["method"] != "medmerge_ft":
            # a recipe over the LP-FT pair against the better LP-FT row (its phase 0 without the merge)
            head_first_control = r["summary"].get("vs_best_head_first", {}).get(chosen["method"])
        for recipe, control in (
            ("paper's recipe", _paper_control(r["summary"])),
            ("MedMerge + FT", _direct_control(r["summary"])),
            (name, head_first_control),
        ):
            if control is not None:
                baseline = control.get("baseline", "ft_longer")  # files before the key was recorded: the paper's
                controls.append(f"{recipe} {100 * control['mean_difference']:+.1f}{p_of(control)} vs `{baseline}`")
        budget = "; ".join(controls) or "-"
        room_text = f"{100 * rm['mean_difference']:+.1f}{p_of(rm)}"
        head_first = r["summary"].get("room_head_first")
        if head_first is not None:
            room_text += f"; head first {100 * head_first['mean_difference']:+.1f}{p_of(head_first)}"
            # a recipe over the LP-FT pair takes its share of the head-first room (its gain over the better LP-FT
            # row, which that room is measured against)
            taken = None
            if head_first_control is not None:
                taken = share_of_room(head_first_control["mean_difference"], head_first["mean_difference"])
            if taken is not None:
                share = f"{share}; head first {100 * taken:.0f}%"
        lines.append(
            f"| `{stem}` | {r['task']}, {r['k']} | {_metric(r)} | {_lineage(r)} | {_widths(r)} | {len(r['seeds'])} | "
            f"{room_text} | {name} | {gain} | {share} | {budget} |"
        )
    if picture:
        lines += ["", f"![{picture}](../benchmarks/results/{picture})"]
    lines.append("")
    return "\n".join(lines)


def plot_room(results: list[tuple[str, dict]], path: Path) -> Path | None:
    """Bars per benchmark: the room and the chosen MedMerge recipe's gain over the better source (test points)."""
    from medmerge_bench.plots import _backend, _save, plt

    _backend()

    rows = [(stem, r, room_of(r)) for stem, r in results]
    rows = [(stem, r, room) for stem, r, room in rows if room is not None and room.get("chosen_medmerge")]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(9.0, 0.55 * len(rows) + 1.6))
    y = [len(rows) - 1 - i for i in range(len(rows))]  # the first result on top
    rooms = [100 * room["room"]["mean_difference"] for _, _, room in rows]
    gains = [100 * room["chosen_medmerge"]["mean_difference"] for _, _, room in rows]
    ax.barh([v + 0.2 for v in y], rooms, 0.4, color="0.6", label="room: ensemble (2 networks) - better source")
    ax.barh(
        [v - 0.2 for v in y], gains, 0.4, color="tab:red", label="chosen MedMerge recipe (1 network) - better source"
    )
    ax.axvline(0, color="black", lw=0.8)
    labels = [f"{stem} ({_lineage(r)}, widths {_widths(r)[0]}-{_widths(r)[-1]})" for stem, r, _ in rows]
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xlabel("test points over the better single source (macro-F1; mean Dice for segmentation; paired mean)")
    ax.set_title("Room for a merge, and what the chosen MedMerge recipe takes of it")
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.06), ncol=2, frameon=False)
    fig.tight_layout()
    return _save(fig, path)


# the rows of the gain table and the width figures: (label, method, the head-first baseline instead of the better
# source?), and their colours in the figures
GAIN_SERIES = (
    ("room: ensemble of the FT pair", "ensemble", False),
    ("head-first room: ensemble of the LP-FT pair", "ensemble_lpft", True),
    ("MedMerge + FT (direct recipe)", "medmerge_ft", False),
    ("paper's recipe + FT", "paper_medmerge_ft", False),
    ("paper's recipe over the LP-FT pair, distilled", "paper_lpft_medmerge_distill", True),
    ("LP-FT distilled, no merge", "lpft_distill", True),
)
GAIN_COLORS = ("0.55", "0.8", "tab:blue", "tab:orange", "tab:red", "tab:purple")
# the training budget that makes one protocol: results that differ only in lineage, pair and width are set side by
# side (a run with longer fine-tuning changes the room as much as width does: fashion_k10_ft150). Not
# ``distill_steps``: it changes only the budget of the distilled rows, which every run of a protocol here shares
PROTOCOL_FIELDS = ("source_epochs", "coef_epochs", "ft_epochs", "patience", "lp_epochs")
ROOM_WORTH_A_MERGE = 0.03  # the bar: a task "has room" where some run of it finds >= 3 points


def _gain_of(r: dict, method: str, head_first: bool) -> dict | None:
    """The paired test gain of ``method`` over the better source (``head_first``: over the better LP-FT row, which
    the head-first room is measured against); the ensembles give the room. None where the run lacks the rows."""
    s = r["summary"]
    if method == "ensemble":
        room = room_of(r)
        return None if room is None else room["room"]
    if method == "ensemble_lpft":
        return s.get("room_head_first")
    base = s.get("room_head_first", {}).get("baseline") if head_first else s.get("best_single_source")
    if base is None or method not in s["methods"] or base not in s["methods"]:
        return None
    recorded = s.get("vs_best_head_first" if head_first else "vs_best_single_source", {}).get(method)
    return recorded or _paired_scores(s["methods"], method, base)


def _protocol_groups(results: list[tuple[str, dict]]) -> dict[tuple, list[tuple[str, dict]]]:
    """Transfer results with a room, grouped by (task, k, protocol), each sorted by lineage, then width."""
    from medmerge_bench.transfer import Recipe

    default = Recipe()
    groups: dict[tuple, list] = {}
    for stem, r in results:
        if r.get("benchmark") != "transfer" or room_of(r) is None:
            continue
        protocol = tuple(r["recipe"].get(f, getattr(default, f)) for f in PROTOCOL_FIELDS)
        groups.setdefault((r["task"], r["k"], protocol), []).append((stem, r))
    return {
        key: sorted(rows, key=lambda row: (_lineage(row[1]), _widths(row[1])[-1], row[0]))
        for key, rows in groups.items()
    }


def _gain_groups(results: list[tuple[str, dict]]) -> dict[tuple, list[tuple[str, dict]]]:
    """The protocol groups with a room worth a merge in some run and more than one lineage or width to set side by
    side."""
    chosen = {}
    for key, rows in _protocol_groups(results).items():
        rooms = [_gain_of(r, m, hf) for _, r in rows for _, m, hf in GAIN_SERIES[:2]]
        settings = {(_lineage(r), tuple(_widths(r))) for _, r in rows}
        if len(settings) > 1 and max((g["mean_difference"] for g in rooms if g), default=0) >= ROOM_WORTH_A_MERGE:
            chosen[key] = rows
    return chosen


def _width_groups(results: list[tuple[str, dict]]) -> dict[tuple, dict[str, list[tuple[str, dict]]]]:
    """Per (task, k, protocol), the lineages measured at two or more widths, each with its runs in order of width."""
    groups: dict[tuple, dict] = {}
    for key, rows in _protocol_groups(results).items():
        by_lineage: dict[str, list] = {}
        for stem, r in rows:
            by_lineage.setdefault(_lineage(r), []).append((stem, r))
        wide = {lineage: runs for lineage, runs in by_lineage.items() if len({tuple(_widths(r)) for _, r in runs}) > 1}
        if wide:
            groups[key] = wide
    return groups


def _gain_cells(r: dict) -> list[str]:
    """A run's cells of GAIN_SERIES: the paired test gain in points with its p, and each recipe's share of the room
    of its own baseline (the rooms themselves get none)."""

    def cell(gain: dict | None, room: dict | None) -> str:
        if gain is None:
            return "-"
        text = f"{100 * gain['mean_difference']:+.1f}"
        if "t_test_p" in gain:
            text += f" ({gain['t_test_p']:.2g})"
        taken = None if room is None else share_of_room(gain["mean_difference"], room["mean_difference"])
        if taken is not None:
            text += f", {100 * taken:.0f}%"
        return text

    gains = [_gain_of(r, m, hf) for _, m, hf in GAIN_SERIES]
    room, head_first = gains[:2]
    shares = [None, None] + [head_first if hf else room for _, _, hf in GAIN_SERIES[2:]]
    return [cell(gain, share) for gain, share in zip(gains, shares, strict=True)]


def _gain_table(groups: dict[tuple, list[tuple[str, dict]]]) -> list[str]:
    lines = [
        "| task, k | lineage | widths | result | seeds | " + " | ".join(label for label, _, _ in GAIN_SERIES) + " |",
        "|---" * (5 + len(GAIN_SERIES)) + "|",
    ]
    for (task, k, _), rows in groups.items():
        for stem, r in rows:
            widths = _widths(r)
            lines.append(
                f"| {task}, {k} | {_lineage(r)} | {widths[0]}-{widths[-1]} | `{stem}` | {len(r['seeds'])} | "
                + " | ".join(_gain_cells(r))
                + " |"
            )
    return lines


def _budget(protocol: tuple) -> str:
    return ", ".join(f"{f} {v}" for f, v in zip(PROTOCOL_FIELDS, protocol, strict=True))


def width_section(results: list[tuple[str, dict]], pictures: list[str]) -> str:
    """The runs of one task, protocol and lineage at two or more widths, with the columns of the gain table: the
    rooms and each recipe's gain against the network's width."""
    groups = _width_groups(results)
    if not groups:
        return ""
    lines = [
        "## Width: the room and the merges' gain at the narrow and the standard ResNet widths",
        "",
        "The same task, protocol and lineage at the benchmark's narrow widths and at the standard ResNet-18 widths "
        "(64-512; one basic block per stage in both), with the columns of the gain table above: test macro-F1 "
        "points over the better single source (the head-first rows over the better LP-FT network), paired per seed, "
        "with the paired t-test's p, and each recipe's share of its room. One figure per task: the rooms and the "
        "recipes against the width of the last stage, a line per lineage, the seeds as dots.",
        "",
    ]
    flat = {key: [run for runs in lineages.values() for run in runs] for key, lineages in groups.items()}
    lines += _gain_table(flat)
    lines.append("")
    lines += [f"![{p}](../benchmarks/results/{p})" for p in pictures]
    lines.append("")
    return "\n".join(lines)


def plot_width(results: list[tuple[str, dict]], folder: Path) -> list[str]:
    """One figure per task and k, a panel per protocol: each room and recipe of GAIN_SERIES against the widest
    stage's width, a line per lineage, a dot per seed; at a width measured more than once, the most recently written
    result that has the row. Returns the file names written."""
    from medmerge_bench.plots import _backend, _save, plt

    _backend()
    by_task: dict[tuple, dict] = {}
    for (task, k, protocol), lineages in _width_groups(results).items():
        by_task.setdefault((task, k), {})[protocol] = lineages
    written = []
    for (task, k), protocols in by_task.items():
        fig, axes = plt.subplots(
            len(protocols), 1, figsize=(10.5, 4.4 * len(protocols)), squeeze=False, constrained_layout=True
        )
        for ax, (protocol, lineages) in zip(axes[:, 0], protocols.items(), strict=True):
            ticks: set[int] = set()
            for j, (lineage, rows) in enumerate(lineages.items()):
                style = ("-", "--", ":", "-.")[j % 4]
                for (label, method, head_first), color in zip(GAIN_SERIES, GAIN_COLORS, strict=True):
                    # per width the most recently written result that has this series (reruns repeat older rows)
                    latest: dict[int, tuple[str, dict]] = {}
                    for _, r in rows:
                        gain = _gain_of(r, method, head_first)
                        width = _widths(r)[-1]
                        if gain is not None and r.get("written", "") >= latest.get(width, ("", None))[0]:
                            latest[width] = (r.get("written", ""), gain)
                    if not latest:
                        continue
                    xs = sorted(latest)
                    ax.plot(
                        xs,
                        [100 * latest[w][1]["mean_difference"] for w in xs],
                        style,
                        marker="o",
                        color=color,
                        label=f"{label}, {lineage}",
                    )
                    dots = [(w, 100 * d) for w in xs for d in latest[w][1]["differences"]]
                    ax.plot(*zip(*dots, strict=True), ".", color=color, alpha=0.35, ms=4)
                    ticks.update(xs)
            ax.axhline(0, color="black", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(ticks), [str(t) for t in sorted(ticks)])
            ax.set_xlabel("width of the last stage (channels; the first stage has 1/8 of it)")
            ax.set_ylabel("test macro-F1 points over the better source\n(head-first rows: the better LP-FT network)")
            ax.set_title(f"{task}, k = {k} ({_budget(protocol)}): gain against width (dots: seeds)", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        written.append(_save(fig, folder / f"width_{task}_k{k}.png").name)
    return written


def gain_section(results: list[tuple[str, dict]], picture: str | None) -> str:
    """One table over the tasks with room: each lineage, pair and width run with one protocol, the room (plain and
    head first) and each recipe's paired gain, with its share of that room."""
    groups = _gain_groups(results)
    if not groups:
        return ""
    names = ", ".join(f"`{k}`" for k in PROTOCOL_FIELDS)
    lines = [
        "## The gain on the tasks with room: lineage, width and recipe side by side",
        "",
        f"Every task and protocol (the same {names}) where some run found a room of at least "
        f"{100 * ROOM_WORTH_A_MERGE:.0f} points and where more than one lineage or width was run. Test macro-F1 "
        "points, paired per seed, with the paired t-test's p. The room and the two recipes over the fine-tuned pair "
        "are set against the better single-source fine-tuning (chosen on validation); the head-first room, the "
        "distilled recipe over the LP-FT pair and distillation without a merge against the better LP-FT row (so each "
        "is measured against the baseline of its own room); the share is the gain over its room. A dash: the run did "
        "not have the rows.",
        "",
    ]
    lines += _gain_table(groups)
    if picture:
        lines += ["", f"![{picture}](../benchmarks/results/{picture})"]
    lines.append("")
    return "\n".join(lines)


def plot_gain(results: list[tuple[str, dict]], path: Path) -> Path | None:
    """The gain table as one figure: a panel per task and protocol, a group of bars per run (its lineage and widths),
    a bar per room and recipe (paired mean), the seeds as dots."""
    from medmerge_bench.plots import _backend, _save, plt

    _backend()
    groups = _gain_groups(results)
    if not groups:
        return None
    fig, axes = plt.subplots(len(groups), 1, figsize=(11.0, 4.6 * len(groups)), squeeze=False, constrained_layout=True)
    width = 0.8 / len(GAIN_SERIES)
    for ax, ((task, k, protocol), rows) in zip(axes[:, 0], groups.items(), strict=True):
        for j, ((label, method, head_first), color) in enumerate(zip(GAIN_SERIES, GAIN_COLORS, strict=True)):
            for i, (_, r) in enumerate(rows):
                gain = _gain_of(r, method, head_first)
                if gain is None:
                    continue
                x = i + (j - (len(GAIN_SERIES) - 1) / 2) * width
                ax.bar(
                    x,
                    100 * gain["mean_difference"],
                    width,
                    color=color,
                    label=label,
                )
                ax.plot(
                    [x] * len(gain["differences"]), [100 * d for d in gain["differences"]], ".", color="black", ms=2.5
                )
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(
            range(len(rows)),
            [f"{stem} ({_lineage(r)}, widths {_widths(r)[0]}-{_widths(r)[-1]})" for stem, r in rows],
            fontsize=6.5,
            rotation=20,
            ha="right",
        )
        ax.set_ylabel("test macro-F1 points")
        ax.set_title(f"{task}, k = {k} ({_budget(protocol)}): room and gain over the better single source", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(
            unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False
        )
    return _save(fig, path)


def transfer_section(r: dict, stem: str) -> str:
    s = r["summary"]
    lines = [
        f"## MedMerge against transfer baselines: {r['task']}, k = {r['k']} (`{stem}.json`)",
        "",
        f"Target: {r['data']['target']['name']} ({len(r['data']['target']['classes'])} classes), "
        f"{r['data']['target']['train']} training / {r['data']['target']['val']} validation / "
        f"{r['data']['target']['test']} test examples. Sources: A = {r['data']['source_a']['name']} "
        f"(validation macro-F1 {r['sources']['sources']['a']['val']['macro_f1']:.3f}), "
        f"B = {r['data']['source_b']['name']} "
        f"(validation macro-F1 {r['sources']['sources']['b']['val']['macro_f1']:.3f}), {_pretraining(r)}. "
        f"Seeds {r['seeds']} (each draws the k-shot subset and the new heads). "
        f"Test metrics, mean +- std over seeds; every choice was made on validation.",
        "",
        "| method | macro-F1 | accuracy | balanced accuracy | AUROC | validation macro-F1 |",
        "|---|---|---|---|---|---|",
    ]
    for m, label in r["methods"].items():
        t = s["methods"][m]

        def f(key, t=t):
            return f"{100 * t[key]['mean']:.1f} +- {100 * t[key]['std']:.1f}"

        lines.append(
            f"| {label} | {f('test_macro_f1')} | {f('test_accuracy')} | {f('test_balanced_accuracy')} | "
            f"{f('test_auroc')} | {f('val_macro_f1')} |"
        )
    for key, what in (
        ("medmerge_ft_vs_best_single_source", "the best single-source fine-tuning"),
        ("aligned_medmerge_ft_vs_best_single_source", "the best single-source fine-tuning"),
        ("aligned_ftmerge_ft_vs_best_single_source", "the best single-source fine-tuning"),
        ("aligned_medmerge_ft_vs_medmerge_ft", "MedMerge + FT without alignment"),
        ("aligned_average_ft_vs_average_ft", "uniform average + FT without alignment"),
    ):
        paired = s.get(key)
        if not paired:
            continue
        diffs = ", ".join(f"{100 * d:+.1f}" for d in paired["differences"])
        tests = []
        if "t_test_p" in paired:
            tests.append(f"paired t-test p = {paired['t_test_p']:.3g}")
        if "wilcoxon_p" in paired:
            tests.append(f"Wilcoxon p = {paired['wilcoxon_p']:.3g}")
        name = r["methods"].get(paired.get("method", "medmerge_ft"), "MedMerge + FT")
        chosen = (
            f" ({r['methods'][paired['baseline']]}, chosen by mean validation macro-F1)"
            if "chosen_on" in paired
            else ""
        )
        lines += [
            "",
            f"{name} minus {what}{chosen}: {100 * paired['mean_difference']:+.1f} macro-F1 points on average; "
            f"per seed {diffs}; {'; '.join(tests) or 'one seed: no test'}.",
        ]
    room = room_of(r)
    if room is not None:
        rm = room["room"]
        diffs = ", ".join(f"{100 * d:+.1f}" for d in rm["differences"])
        taken = {
            m: share_of_room(v["mean_difference"], rm["mean_difference"])
            for m, v in room["vs_best_single_source"].items()
        }
        shares = [
            f"{r['methods'][m]} {100 * v['mean_difference']:+.1f}"
            + ("" if taken[m] is None else f" ({100 * taken[m]:.0f}%)")
            for m, v in room["vs_best_single_source"].items()
        ]
        lines += [
            "",
            f"Room (ensemble minus {r['methods'][room['best_single_source']]}): {100 * rm['mean_difference']:+.1f} "
            f"points (per seed {diffs}). Each one-network method minus the better source (share of the room): "
            + "; ".join(shares)
            + ".",
        ]
    anchors = ", ".join(f"seed {p['seed']}: {p['anchor'].upper()}" for p in r["per_seed"])
    rec = r["recipe"]
    lines += [
        "",
        f"Anchor chosen on validation per seed: {anchors}. Recipe: MONAI ResNet (basic blocks, widths "
        f"{rec['widths']}), batch {rec['batch_size']}; sources {rec['source_epochs']} epochs; phase 1 up to "
        f"{rec['coef_epochs']} epochs (coefficients lr {rec['coef_lr']}, head lr {rec['head_lr']}, anchor weight "
        f"{rec['anchor_weight']}); every fine-tuning up to {rec['ft_epochs']} epochs at lr {rec['ft_lr']}, "
        f"patience {rec['patience']}; LP {rec['lp_epochs']} epochs at lr {rec['lp_lr']}. "
        f"Machine: {_machine(r['machine'])}; {r['seconds']:.0f} s; written {r['written']}.",
        "",
    ]
    lines += [f"![{p}](../benchmarks/results/{p})" for p in r.get("pictures", [])]
    lines += ["", f"Per-seed numbers: `benchmarks/results/{stem}_per_seed.csv`.", ""]
    return "\n".join(lines)


def _pretraining(r: dict) -> str:
    if r.get("lineage") != "shared":
        return "each pretrained from its own random initialisation"
    ancestor = r["sources"]["sources"].get("ancestor", {})
    text = (
        f"both fine-tuned from one ancestor trained on {ancestor.get('task', 'a broad task')} (validation macro-F1 "
        f"{ancestor.get('val', {}).get('macro_f1', float('nan')):.3f})"
    )
    if r.get("pair") == "ancestor_b":
        text += "; the pair merged is the ancestor itself and B (the paper's pair)"
    return text


def explore_section(r: dict, stem: str = "") -> str:
    source = f"`{stem}.json`, " if stem else ""
    lines = [
        f"## MedMerge settings studied on validation: {r['task']}, k = {r['k']} "
        f"({source}`benchmarks/explore_medmerge.py`)",
        "",
        "Each variant changes one thing in how the merge is learned or fine-tuned (its `changes` in the JSON file; "
        "the variants are described in `benchmarks/explore_medmerge.py`); `ft_anchor` rows, where present, are plain "
        "fine-tuning from the anchor on the same batches, the reference a variant has to beat. The variant to keep "
        "is chosen by validation macro-F1, test shown beside it for the record. Compare rows within one table: each "
        "table is one run of one code revision."
        + ("" if r.get("complete", True) else " **Incomplete run**: only the rows below were measured."),
        "",
        "| seed | variant | anchor | val macro-F1 (collapsed) | val macro-F1 (+FT) | test macro-F1 (+FT) | "
        "mean anchor share |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in r["rows"]:
        # a reference row (plain fine-tuning from the anchor) has no merge: no collapsed network, no anchor share
        collapsed = f"{100 * row['collapsed']['val']['macro_f1']:.1f}" if "collapsed" in row else "-"
        share = f"{row['anchor_share']['mean']:.3f}" if "anchor_share" in row else "-"
        lines.append(
            f"| {row['seed']} | {row['variant']} | {row.get('anchor', 'b').upper()} | {collapsed} | "
            f"{100 * row['fine_tuned']['val']['macro_f1']:.1f} | {100 * row['fine_tuned']['test']['macro_f1']:.1f} | "
            f"{share} |"
        )
    means = r.get("mean_macro_f1", {})
    if means:
        lines += ["", "| variant (mean over its seeds) | val macro-F1 (+FT) | test macro-F1 (+FT) |", "|---|---|---|"]
        lines += [f"| {name} | {100 * m['val']:.1f} | {100 * m['test']:.1f} |" for name, m in means.items()]
    lines += [
        "",
        f"Chosen on validation: `{r['chosen_on_validation']}`. Machine: {_machine(r['machine'])}; "
        f"{r['seconds']:.0f} s; written {r['written']}.",
        "",
    ]
    return "\n".join(lines)


def alignment_section(r: dict) -> str:
    lp = r["linear_path"]
    path = lp["path"]
    labels = {"naive": "naive", "aligned_weights": "weight matching", "aligned_activations": "activation matching"}
    lines = [
        "## Alignment: the linear path between two models (`benchmarks/alignment.py`)",
        "",
        f"Two {lp['architecture']} models (widths {lp['widths']}) trained for {lp['training_epochs']} epochs on "
        f"{lp['task']} from seeds {lp['seeds']}; the second is permuted onto the first (or not), then the weights "
        f"are interpolated at {len(path['t'])} points, norm statistics {lp['norm_statistics']}. Validation loss "
        "and accuracy at each point; the barrier is the midpoint loss minus the mean of the end-point losses.",
        "",
        "| t | " + " | ".join(f"loss {v} | acc {v}" for v in labels.values()) + " |",
        "|---" * (1 + 2 * len(labels)) + "|",
    ]
    for i, t in enumerate(path["t"]):
        cells = [f"{path[k]['val_loss'][i]:.3f} | {path[k]['val_accuracy'][i]:.3f}" for k in labels]
        lines.append(f"| {t:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "| alignment | midpoint loss barrier | midpoint accuracy drop | seconds | max output change |"]
    lines.append("|---|---|---|---|---|")
    for k, v in labels.items():
        info = lp["alignment"].get(k.replace("aligned_", ""), {})
        secs = f"{info['seconds_total']:.2f}" if "seconds_total" in info else "-"
        diff = f"{info['max_output_difference']:.1e}" if "max_output_difference" in info else "-"
        lines.append(
            f"| {v} | {path[k]['loss_barrier_midpoint']:.3f} | {path[k]['accuracy_drop_midpoint']:.3f} | "
            f"{secs} | {diff} |"
        )
    lines += [
        "",
        f"Activation matching used {lp.get('activation_matching_data', 'training data')}.",
        "",
        "![alignment_path.png](../benchmarks/results/alignment_path.png)",
        "",
        "Time to align one source onto another (weight matching until no group improves, "
        "including tracing, permuting and the function check), median of repeats:",
        "",
        "| network | input | median s | runs (s) | passes |",
        "|---|---|---|---|---|",
    ]
    for name, t in r["alignment_time"].items():
        runs = ", ".join(f"{x:.1f}" for x in t["seconds"])
        lines.append(
            f"| {name} | {'x'.join(map(str, t['input_shape']))} | {t['median_seconds']:.1f} | {runs} | "
            f"{', '.join(map(str, t['passes']))} |"
        )
    from alignment import checks  # the same targets the benchmark script evaluates

    found = ", ".join(f"{k.replace('_', ' ')}: {'yes' if v else '**no**'}" for k, v in checks(r).items())
    lines += ["", f"Targets (evaluated on the recorded numbers): {found}.", ""]
    lines += [f"Machine: {_machine(r['machine'])}.", ""]
    return "\n".join(lines)


def onepath_section(old: dict, new: dict, old_stem: str, new_stem: str, check: dict | None = None) -> str:
    """Paired per-seed test macro-F1 of the recorded run (hand loop) and the rerun through the one training path."""
    methods = [m for m in new["summary"]["methods"] if m in old["summary"]["methods"]]
    seeds = [s for s in new["seeds"] if s in old["seeds"]]
    lines = [
        f"## One training path: {new['task']}, k = {new['k']}, before and after (`{old_stem}.json` vs "
        f"`{new_stem}.json`)",
        "",
        "The recorded run trained with the hand loop that `monai_medmerge/workflows/loops.py` held; the rerun trains "
        "through the MONAI engines the training bundle runs (`phase_trainer`, `phase_evaluator`). Test macro-F1 per "
        "seed, the same seeds (each draws the same k-shot subset); the difference is new minus old.",
        "",
        "| method | " + " | ".join(f"seed {s} old / new (diff)" for s in seeds) + " | mean diff |",
        "|---" * (len(seeds) + 2) + "|",
    ]
    for m in methods:
        a = old["summary"]["methods"][m]["test_macro_f1"]["values"]
        b = new["summary"]["methods"][m]["test_macro_f1"]["values"]
        pa = {s: a[old["seeds"].index(s)] for s in seeds}
        pb = {s: b[new["seeds"].index(s)] for s in seeds}
        diffs = [pb[s] - pa[s] for s in seeds]
        cells = [f"{100 * pa[s]:.1f} / {100 * pb[s]:.1f} ({100 * d:+.1f})" for s, d in zip(seeds, diffs, strict=True)]
        lines.append(f"| {new['methods'][m]} | " + " | ".join(cells) + f" | {100 * sum(diffs) / len(diffs):+.1f} |")
    for tag, r in (("old", old), ("new", new)):
        s = r["sources"]["sources"]
        anchors = ", ".join(p["anchor"].upper() for p in r["per_seed"])
        lines += [
            "",
            f"{tag}: sources A / B validation macro-F1 {100 * s['a']['val']['macro_f1']:.1f} / "
            f"{100 * s['b']['val']['macro_f1']:.1f} (cache key `{r['sources']['key']}`); anchors {anchors}; "
            f"machine {_machine(r['machine'])}; code {r['machine'].get('code', 'not recorded')}.",
        ]
    same_machine = old["machine"].get("cpu") == new["machine"].get("cpu")
    lines += [
        "",
        "The two runs are "
        + ("on the same kind of CPU" if same_machine else "on different CPUs")
        + " and their sources were pretrained separately, so these differences mix the change of training path with "
        "the change of sources and machine; the check below isolates the path.",
        "",
    ]
    if check:
        lines += [
            f"### The same sources, data and seeds through both paths (`benchmarks/onepath_equivalence.py`, hand loop "
            f"of commit {check['hand_loop_rev']}, anchor {check['anchor'].upper()})",
            "",
            "| seed | network | val macro-F1 hand loop / engines | test macro-F1 hand loop / engines | best epoch "
            "| largest weight difference |",
            "|---|---|---|---|---|---|",
        ]
        for row in check["rows"]:
            for net in ("ft_anchor", "medmerge", "medmerge_ft"):
                h, e = row["hand_loop"][net], row["engines"][net]
                lines.append(
                    f"| {row['seed']} | {net} | {100 * h['val']['macro_f1']:.2f} / {100 * e['val']['macro_f1']:.2f} | "
                    f"{100 * h['test']['macro_f1']:.2f} / {100 * e['test']['macro_f1']:.2f} | "
                    f"{h['best_epoch']} / {e['best_epoch']} | {row['max_weight_difference'][net]:.2e} |"
                )
        lines += [
            "",
            "`medmerge` is the collapsed phase-1 network (the engines recompute its norm statistics after collapsing, "
            "as the bundle does; the hand loop did it before). A largest weight difference of 0 means both paths "
            "trained bit-identical networks. "
            f"Machine: {_machine(check['machine'])}; {check['seconds']:.0f} s.",
            "",
        ]
    return "\n".join(lines)


def _steps_control(r: dict, chosen: dict | None) -> dict | None:
    """The chosen MedMerge recipe against fine-tuning from the anchor for as many steps (``ft_steps``; ``lpft_steps``,
    head first, for a recipe over the LP-FT pair) in a transfer result whose chosen recipe was distilled with
    ``distill_steps``; None elsewhere. The baseline is named in the result's ``baseline``."""
    s = r["summary"]
    if not chosen or not r["recipe"].get("distill_steps") or not chosen["method"].endswith("_distill"):
        return None
    baseline = "lpft_steps" if "_lpft_" in chosen["method"] else "ft_steps"
    if baseline not in s["methods"]:
        return None
    return _paired_scores(s["methods"], chosen["method"], baseline) | {"baseline": baseline}


def _paired_scores(methods: dict, name: str, baseline: str) -> dict:
    """``name`` against ``baseline`` from a summary's recorded per-seed test scores (macro-F1, or mean Dice in a
    segmentation summary), paired with the function the summaries use; for controls older files did not record."""
    from medmerge_bench.transfer import room_summary

    def scores(method: str) -> dict:
        rec = methods[method]
        if "test_macro_f1" in rec:
            return rec
        return {"val_macro_f1": rec["val_mean_dice"], "test_macro_f1": rec["test_mean_dice"]}

    table = {m: scores(m) for m in (name, baseline)}
    return room_summary(table, [name], baseline)["vs_best_single_source"][name]


def _direct_control(s: dict) -> dict | None:
    """MedMerge + FT (direct recipe) against the head-first schedule without a merge: ``ft_head_first`` in a
    segmentation summary, LP-FT of the better source in a transfer one (computed from the recorded per-seed scores,
    with the same function, in files written before the summary held it); None where the run has no such row."""
    control = s.get("medmerge_ft_vs_ft_head_first") or s.get("medmerge_ft_vs_lpft")
    lpft = "lp" + s.get("best_single_source", "")
    if control is None and {"medmerge_ft", lpft} <= set(s["methods"]):
        control = _paired_scores(s["methods"], "medmerge_ft", lpft)
    return control


def _paper_control(s: dict) -> dict | None:
    """The paper's recipe against its control of the same fine-tuning budget (``ft_longer``): recorded in newer
    summaries, computed from the recorded per-seed scores in older ones."""
    control = s.get("paper_medmerge_ft_vs_ft_longer")
    if control is None and {"paper_medmerge_ft", "ft_longer"} <= set(s["methods"]):
        control = _paired_scores(s["methods"], "paper_medmerge_ft", "ft_longer")
    return control


def _seg_tag(r: dict) -> str:
    """The key of source A's record: the ancestor itself in the paper's pair."""
    return "ancestor" if r.get("pair", "ab") == "ancestor_b" else "a"


def _seg_lineage(r: dict) -> str:
    rec, sources = r["recipe"], r["sources"]["sources"]
    if r.get("lineage", "independent") != "shared":
        return f"each from its own random initialisation, {rec['source_epochs']} epochs each"
    ancestor = r["data"]["ancestor"]
    text = (
        f"in the shared lineage: an ancestor trained {rec['ancestor_epochs']} epochs on {ancestor['name']} "
        f"({ancestor['train']} scenes, {len(ancestor['classes']) - 1} classes; validation mean Dice "
        f"{sources['ancestor']['val_mean_dice']:.3f}), then "
    )
    if r.get("pair") == "ancestor_b":
        return text + f"B fine-tuned from it for {rec['source_epochs']} epochs and A the ancestor itself"
    return text + f"A and B fine-tuned from it for {rec['source_epochs']} epochs each"


def segmentation_section(results: Path) -> str:
    """The segmentation benchmark (`benchmarks/segmentation.py`): one part per `segmentation_k<k>.json`, Dice in
    points (x 100), mean +- sd over seeds, each one-network method paired per seed against the better source."""
    parts = []
    for path in sorted(results.glob("segmentation_k*.json")):
        r = json.loads(path.read_text())
        if r.get("benchmark") != "segmentation":
            continue
        s, data, rec = r["summary"], r["data"], r["recipe"]
        structures = data["target"]["classes"][1:]
        best = s.get("best_single_source")
        paired = s.get("vs_best_single_source", {})

        def pm(stat: dict) -> str:
            return "n/a" if stat["mean"] is None else f"{100 * stat['mean']:.1f} +- {100 * stat['std']:.1f}"

        against = {}
        for m in r["methods"]:
            p = paired.get(m) or (s.get("room") if m == "ensemble" else None)
            test = f", p = {p['t_test_p']:.2g}" if p and "t_test_p" in p else ""
            against[m] = "(better source)" if m == best else f"{100 * p['mean_difference']:+.1f}{test}" if p else ""

        sources = r["sources"]["sources"]
        lines = [
            f"## Segmentation on brain MRI, k = {r['k']} slices per structure, {_lineage(r)} lineage "
            f"(`{path.stem}.json`)",
            "",
            f"Target: {data['target']['name']} ({', '.join(structures)}; background 0), k = {r['k']} training slices "
            f"per structure (their union per seed), {data['target']['val']} validation and {data['target']['test']} "
            f"test slices held out spatially (see docs/data.md, Segmentation tasks). Sources, each a 2-D MONAI UNet "
            f"(channels {rec['channels']}, {rec['num_res_units']} residual units), {_seg_lineage(r)}: "
            f"A = {data['source_a']['name']} (validation mean Dice "
            f"{sources[_seg_tag(r)]['val_mean_dice']:.3f}), B = {data['source_b']['name']} (validation mean Dice "
            f"{sources['b']['val_mean_dice']:.3f}). Preprocessing: "
            f"{r['preprocessing']}. Metric: {r['metric']}. Test Dice x 100, mean +- sd over seeds {r['seeds']}; the "
            "last column is the mean paired per-seed difference of test mean Dice against the better single source "
            "(chosen by mean validation Dice) with the paired t-test's p.",
            "",
            "| method | mean Dice | " + " | ".join(structures) + " | validation mean Dice | vs better source |",
            "|---" * (len(structures) + 4) + "|",
        ]
        for m, label in r["methods"].items():
            t = s["methods"][m]
            cells = [pm(t["test_mean_dice"])] + [pm(t[f"test_dice_{c}"]) for c in structures]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {pm(t['val_mean_dice'])} | {against[m]} |")
        if "room" in s:
            room = s["room"]
            diffs = ", ".join(f"{100 * d:+.1f}" for d in room["differences"])
            line = (
                f"Room (ensemble minus {r['methods'][best]}): {100 * room['mean_difference']:+.1f} Dice points "
                f"(per seed {diffs})"
            )
            if "wilcoxon_p" in room:
                line += f", Wilcoxon p = {room['wilcoxon_p']:.2g}"
            lines += ["", line + "."]
            for m in ("medmerge_ft", "paper_medmerge_ft"):
                if m in paired:
                    p = paired[m]
                    taken = share_of_room(p["mean_difference"], room["mean_difference"])
                    share = "" if taken is None else f", {100 * taken:.0f}% of the room"
                    tests = [f"paired t-test p = {p['t_test_p']:.2g}"] if "t_test_p" in p else []
                    tests += [f"Wilcoxon p = {p['wilcoxon_p']:.2g}"] if "wilcoxon_p" in p else []
                    lines += [
                        "",
                        f"{r['methods'][m]} minus {r['methods'][best]}: {100 * p['mean_difference']:+.1f} points "
                        f"(per seed {', '.join(f'{100 * d:+.1f}' for d in p['differences'])}; "
                        f"{'; '.join(tests) or 'one seed: no test'}{share}).",
                    ]
            control = _paper_control(s)
            if control is not None:
                p_value = f"paired t-test p = {control['t_test_p']:.2g}" if "t_test_p" in control else "one seed"
                lines += [
                    "",
                    f"{r['methods']['paper_medmerge_ft']} minus its control of the same fine-tuning budget without a "
                    f"merge ({r['methods']['ft_longer']}): {100 * control['mean_difference']:+.1f} points (per seed "
                    f"{', '.join(f'{100 * d:+.1f}' for d in control['differences'])}; {p_value}).",
                ]
            if "chosen_medmerge" in s:
                c = s["chosen_medmerge"]
                lines += ["", f"MedMerge recipe chosen on validation: {r['methods'][c['method']]} ({c['chosen_on']})."]
        anchors = ", ".join(f"seed {p['seed']}: {p['anchor'].upper()}" for p in r["per_seed"])
        lines += [
            "",
            f"Anchor of the direct recipe, chosen per seed as the source whose fine-tuning validated better: {anchors}."
            " "
            f"Every training phase runs on the product's engines (Adam, DiceCE loss, the best validation mean Dice "
            f"kept), batch {rec['batch_size']}: phase 1 up to {rec['coef_epochs']} epochs (coefficients lr "
            f"{rec['coef_lr']}, new head lr {rec['head_lr']}, anchor weight {rec['anchor_weight']}); every "
            f"fine-tuning {rec['ft_epochs']} epochs at lr {rec['ft_lr']}, "
            f"{'patience ' + str(rec['patience']) if rec['patience'] else 'no early stopping'}. The paper's recipe "
            "fine-tunes twice (phase 0, which is also fine-tune from A and from B, and phase 2); its control with the "
            "same fine-tuning budget and no merge is the anchor's fine-tuned network fine-tuned again. "
            f"Machine: {_machine(r['machine'])}; code {r['machine'].get('code')}; {r['seconds']:.0f} s; "
            f"written {r['written']}.",
            "",
        ]
        lines += [f"![{p}](../benchmarks/results/{p})" for p in r.get("pictures", [])]
        parts.append("\n".join(lines + [""]))
    return "\n".join(parts)


SECTIONS = {"merge_overhead": merge_overhead_section, "alignment": alignment_section}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--out", type=Path, default=HERE.parent / "docs" / "benchmarks.md")
    args = parser.parse_args(argv)
    parts = [
        "# Benchmarks",
        "",
        "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; each result file records the "
        "machine, versions and seed of the run that wrote it.",
        "",
    ]
    for name, section in SECTIONS.items():
        path = args.results / f"{name}.json"
        if path.exists():
            parts.append(section(json.loads(path.read_text())))
        else:
            parts.append(f"## {name}\n\nNot run yet: `python benchmarks/{name}.py`.\n")
    transfers = []
    for path in sorted(args.results.glob("*_k*.json")):
        data = json.loads(path.read_text())
        if data.get("benchmark") == "transfer":
            transfers.append((path.stem, data))
    segmentations = []
    for path in sorted(args.results.glob("segmentation_k*.json")):
        data = json.loads(path.read_text())
        if data.get("benchmark") == "segmentation":
            segmentations.append((path.stem, data))
    rooms = transfers + segmentations
    picture = plot_room(rooms, args.results / "room_and_share.png")
    parts.append(room_section(rooms, picture.name if picture else None))
    gain_picture = plot_gain(transfers, args.results / "gain_with_room.png")
    gains = gain_section(transfers, gain_picture.name if gain_picture else None)
    if gains:
        parts.append(gains)
    widths = width_section(transfers, plot_width(transfers, args.results))
    if widths:
        parts.append(widths)
    search = args.results / "room_search.json"
    if search.exists():
        import room_search  # the table the search script prints, from the same file

        report = json.loads(search.read_text())
        parts += [
            "## Room search on brain MRI (`benchmarks/room_search.py`, `room_search.json`)",
            "",
            "Candidate brain tasks (docs/data.md) with only fine-tuning from each source and their ensemble; the room "
            "on validation chose the task, test is shown beside it. Macro-F1 points.",
            "",
            room_search.table(report),
            "",
            room_search.cost(report),
            "",
        ]
    for stem, data in transfers:
        parts.append(transfer_section(data, stem))
    parts.append(segmentation_section(args.results))
    onepath = args.results / "brain_k50_onepath.json"
    if onepath.exists():
        check = args.results / "brain_k50_onepath_equivalence.json"
        parts.append(
            onepath_section(
                json.loads((args.results / "brain_k50.json").read_text()),
                json.loads(onepath.read_text()),
                "brain_k50",
                "brain_k50_onepath",
                json.loads(check.read_text()) if check.exists() else None,
            )
        )
    for path in sorted(args.results.glob("explore_*.json")):
        parts.append(explore_section(json.loads(path.read_text()), path.stem))
    notes = HERE / "results" / "NOTES.md"
    if notes.exists():
        parts.append(notes.read_text())
    write_text(args.out, "\n".join(parts))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Compare MedMerge with transfer baselines on the brain MRI segmentation benchmark, with one budget for every method.

The tasks are :func:`medmerge_bench.data.segmentation.load_segmentation_tasks`: source A labels tissue on MNI152,
source B lobes on Colin27, and the few-shot target six subcortical structures on MNI152 that neither source was
taught. The network is a 2-D MONAI ``UNet``; every phase runs on the product's engines
(:func:`monai_medmerge.workflows.fit` with ``task="segmentation"``: DiceCE loss, validation by MONAI mean Dice over
the foreground labels, the best epoch kept, early stopping), and the images go through the product's MR
preprocessing (:func:`monai_medmerge.data.pipelines.preprocessing_config`: each slice's 1st to 99th percentile
scaled to [0, 1], and for training the light augmentation of the product pipeline), without its file-reading steps,
since the slices are arrays already.

Methods (the names of :mod:`medmerge_bench.transfer`, so its paired statistics apply):

- ``scratch``: a fresh UNet, fine-tuned on the target.
- ``ft_a`` / ``ft_b``: each source with a new output head, every parameter fine-tuned
  (:func:`~monai_medmerge.workflows.recipes.fine_tune_sources`, which is also phase 0 of the paper's recipe).
- ``average_ft``: uniform average of the sources with a new head, fine-tuned.
- ``medmerge_ft``: the direct recipe: :func:`~monai_medmerge.workflows.engines.phase1_network` (new head),
  coefficients and head learned with the sources frozen, collapsed, fine-tuned. Its anchor is the source whose
  fine-tuning validated better in this seed; ``medmerge`` is the collapsed network before fine-tuning.
- ``ft_longer``: the anchor's ``ft_a``/``ft_b`` network fine-tuned once more with the same budget: the paper's
  recipe trains for phase 0 and phase 2, twice a single fine-tuning, and this is its control without a merge.
- ``ft_head_first``: the direct recipe's control without a merge: the anchor source with a new head, the head
  trained alone with the body frozen for phase 1's epochs and learning rate, then every parameter fine-tuned (the
  schedule of ``medmerge_ft``, as linear probing before fine-tuning).
- ``paper_medmerge_ft``: the paper's recipe: ``ft_a`` and ``ft_b`` merged with their heads
  (``merge_heads=True``), coefficients learned, collapsed, fine-tuned.
- ``ensemble``: mean softmax of ``ft_a`` and ``ft_b`` (two networks at inference).

Every choice (anchor, best epoch, best single source) is made on validation slices; test slices are only scored.
"""

from __future__ import annotations

import copy
import hashlib
import json
import textwrap
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from monai.transforms import Compose
from torch import nn

from medmerge_bench.data.segmentation import SEGMENTATION_DATA_VERSION
from medmerge_bench.data.tasks import cache_dir
from medmerge_bench.transfer import METHOD_LABELS, head_only, lineage_networks, room_summary
from monai_medmerge.data.pipelines import instantiate_step, preprocessing_config
from monai_medmerge.io import write_json
from monai_medmerge.merging import get_method
from monai_medmerge.networks import find_head
from monai_medmerge.sources import load_checkpoint, save_checkpoint
from monai_medmerge.workflows import fit
from monai_medmerge.workflows.engines import collapse_merge, merge_parameter_groups, phase1_network
from monai_medmerge.workflows.recipes import example_input, fine_tune_sources, with_new_head

__all__ = [
    "DEFAULT_METHODS",
    "LABELS",
    "SEGMENTATION_METHODS",
    "SegRecipe",
    "build_unet",
    "dice_scores",
    "plot_dice",
    "plot_slice",
    "pretrain_sources",
    "run_seed",
    "run_segmentation",
    "slice_pipeline",
    "summarize",
]

SEGMENTATION_METHODS = (
    "scratch",
    "ft_a",
    "ft_b",
    "ft_longer",
    "ft_head_first",
    "average_ft",
    "medmerge_ft",
    "paper_medmerge_ft",
    "ensemble",
)
# what the benchmark runs by default: the uniform average costs one more fine-tuning per seed and is left out
DEFAULT_METHODS = tuple(m for m in SEGMENTATION_METHODS if m != "average_ft")
LABELS = METHOD_LABELS | {
    "ft_longer": "FT from the anchor source, fine-tuned again (the paper recipe's FT budget)",
    "ft_head_first": "FT from the anchor source after training its new head alone (the direct recipe's schedule)",
}
MERGE_METHODS = ("medmerge_ft", "paper_medmerge_ft")
LINEAGES = ("independent", "shared")
PAIRS = ("ab", "ancestor_b")
HEAD = "auto"


@dataclass(frozen=True)
class SegRecipe:
    """Every setting of a segmentation run; ``source_key`` names the cached sources it pretrains.

    Args:
        channels, strides, num_res_units: the MONAI ``UNet`` (2-D, one input channel).
        batch_size: training batch size of every phase (the target's training slices fit in one batch).
        source_epochs, source_lr, source_seeds: pretraining of sources A and B, each from its own initialisation
            (the best validation epoch kept, no early stopping).
        coef_epochs, coef_lr, head_lr, anchor_weight: phase 1 (coefficients, and for the direct recipe the new head).
        ft_epochs, ft_lr, patience: every fine-tuning (phase 2 and the baselines) and phase 1; the state of the best
            validation Dice is kept; ``patience`` stops early (None, the default, runs every epoch: with a few
            slices the networks first predict only background, at Dice 0, for longer than a patience of 25 epochs).
        percentiles: MR intensity normalisation per slice (low, high percentile to [0, 1]).
        augment: the product pipeline's training augmentation (flip, small affine, noise).
        lineage: ``"independent"`` (each source from its own random initialisation) or ``"shared"`` (an ancestor
            trained first for ``ancestor_epochs`` on the garment scenes of
            :func:`~medmerge_bench.data.segmentation.load_segmentation_ancestor_task`, both sources fine-tuned from
            it with new heads), the lineages of :class:`medmerge_bench.transfer.Recipe`.
        ancestor_epochs: training of the shared ancestor.
        pair: ``"ab"`` (the two sources) or ``"ancestor_b"`` (the ancestor itself as source A, the paper's pair of
            a generic network and a domain network; shared lineage only).
    """

    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 2
    batch_size: int = 8
    source_epochs: int = 60
    source_lr: float = 1e-3
    source_seeds: tuple[int, int] = (1, 2)
    coef_epochs: int = 15
    coef_lr: float = 1e-2
    head_lr: float = 1e-3
    anchor_weight: float = 0.9
    ft_epochs: int = 120
    ft_lr: float = 1e-3
    patience: int | None = None
    percentiles: tuple[float, float] = (1.0, 99.0)
    augment: bool = True
    lineage: str = "independent"
    ancestor_epochs: int = 20
    pair: str = "ab"

    def __post_init__(self) -> None:
        if self.lineage not in LINEAGES:
            raise ValueError(f"lineage must be one of {LINEAGES}, got {self.lineage!r}.")
        if self.pair not in PAIRS:
            raise ValueError(f"pair must be one of {PAIRS}, got {self.pair!r}.")
        if self.pair != "ab" and self.lineage != "shared":
            raise ValueError(f"pair={self.pair!r} needs lineage='shared': only the shared lineage has an ancestor.")

    def source_key(self, data_version: str) -> str:
        names = ("channels", "strides", "num_res_units", "batch_size", "percentiles", "augment")
        fields = {k: v for k, v in asdict(self).items() if k.startswith("source") or k in names}
        if self.lineage == "shared":
            # only in the shared lineage, so that the keys of independent sources cached before lineages still hold
            fields |= {"lineage": self.lineage, "ancestor_epochs": self.ancestor_epochs}
        blob = json.dumps({"task": "brain-seg", "data": data_version, **fields}, sort_keys=True)
        return f"brain-seg-{hashlib.sha1(blob.encode()).hexdigest()[:12]}"


def build_unet(num_classes: int, recipe: SegRecipe) -> nn.Module:
    """The benchmark's network: a 2-D MONAI ``UNet`` with one input channel and ``num_classes`` outputs."""
    return UNet(
        spatial_dims=2,
        in_channels=1,
        out_channels=int(num_classes),
        channels=tuple(recipe.channels),
        strides=tuple(recipe.strides),
        num_res_units=recipe.num_res_units,
    )


def slice_pipeline(num_classes: int, spatial_size: Sequence[int], recipe: SegRecipe, train: bool) -> Compose:
    """The product's MR segmentation preprocessing for in-memory slices: the MONAI steps of
    :func:`~monai_medmerge.data.pipelines.preprocessing_config` (percentile scaling; with ``train`` the whole-slice
    crop and the augmentation), without its steps that read and check files."""
    steps = preprocessing_config(
        "nifti",
        list(spatial_size),
        train=train,
        modality="MR",
        percentiles=recipe.percentiles,
        augment=recipe.augment,
        num_classes=int(num_classes),
        task="segmentation",
    )
    return Compose([instantiate_step(s) for s in steps if s["_target_"].startswith("monai.transforms.")])


def _items(split) -> list[dict[str, torch.Tensor]]:
    return [
        {"image": torch.from_numpy(x.copy()), "label": torch.from_numpy(y.copy())}
        for x, y in zip(split.images, split.labels, strict=True)
    ]


class _Loaders:
    """The loaders of one task: a fresh training loader per call (same shuffles and augmentation for every method
    of a seed: the methods are paired), and validation and test slices preprocessed once."""

    def __init__(self, task, recipe: SegRecipe, seed: int) -> None:
        self.task, self.recipe, self.seed = task, recipe, seed
        self.size = task.train.images.shape[2:]
        evaluate = slice_pipeline(task.num_classes, self.size, recipe, train=False)
        self.eval_sets = {
            name: [evaluate(item) for item in _items(split)] for name, split in task.splits().items() if name != "train"
        }

    def train(self) -> DataLoader:
        transform = slice_pipeline(self.task.num_classes, self.size, self.recipe, train=True)
        transform.set_random_state(seed=self.seed)
        return DataLoader(
            Dataset(_items(self.task.train), transform=transform),
            batch_size=self.recipe.batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def eval(self, split: str) -> DataLoader:
        return DataLoader(Dataset(self.eval_sets[split]), batch_size=32, shuffle=False)


def _train(
    net: nn.Module, loaders: _Loaders, groups: list[dict], epochs: int, recipe: SegRecipe, desc: str, progress: bool
):
    return fit(
        net,
        loaders.train(),
        loaders.eval("val"),
        groups,
        epochs,
        patience=recipe.patience,
        desc=desc,
        progress=progress,
        task="segmentation",
        num_classes=loaders.task.num_classes,
    )


def pretrain_sources(
    tasks, recipe: SegRecipe, cache: bool = True, progress: bool = False, log=print
) -> tuple[list[nn.Module], dict]:
    """Pretrain UNets on source A (tissue) and source B (lobes), or load them from ``cache_dir()/sources/<key>``;
    the key covers the recipe's source settings and a digest of the training slices.

    In the independent lineage each source starts from its own random initialisation. In the shared lineage an
    ancestor is trained first on :func:`~medmerge_bench.data.segmentation.load_segmentation_ancestor_task` and both
    sources are fine-tuned from it (new heads, ``source_epochs`` each); with ``recipe.pair == "ancestor_b"`` the
    ancestor itself is returned as source A.

    Returns:
        ``([source_a, source_b], info)``: per network its best validation mean Dice, epochs, and whether it was
        cached; ``names`` (what sources A and B are), ``lineage`` and ``pair``.
    """
    from medmerge_bench.data.segmentation import load_segmentation_ancestor_task

    ancestor_task = load_segmentation_ancestor_task() if recipe.lineage == "shared" else None
    digest = hashlib.sha1(SEGMENTATION_DATA_VERSION.encode())
    for task in (tasks.source_a, tasks.source_b, ancestor_task):
        for split in (task.train, task.val) if task is not None else ():
            digest.update(split.images.tobytes())
            digest.update(split.labels.tobytes())
    key = recipe.source_key(digest.hexdigest()[:16])
    folder = cache_dir() / "sources" / key
    info: dict = {"key": key, "lineage": recipe.lineage, "pair": recipe.pair, "sources": {}}
    if ancestor_task is not None:
        info["ancestor_task"] = _describe(ancestor_task)

    def trained(tag: str, task, seed: int, epochs: int, start: nn.Module | None) -> nn.Module:
        path, meta_path = folder / f"source_{tag}.safetensors", folder / f"source_{tag}.json"
        torch.manual_seed(seed)
        if start is None:
            net = build_unet(task.num_classes, recipe)
        else:
            net = with_new_head(start, HEAD, task.num_classes, example_input(task.train.images.shape[2:], 1))
        if cache and path.exists() and meta_path.exists():
            net.load_state_dict(load_checkpoint(path))
            meta = json.loads(meta_path.read_text()) | {"cached": True}
        else:
            t0 = time.time()
            loaders = _Loaders(task, recipe, seed)
            what = f"pretrain {tag}" if start is None else f"fine-tune the ancestor on {tag}"
            hist = fit(
                net,
                loaders.train(),
                loaders.eval("val"),
                [{"params": net.parameters(), "lr": recipe.source_lr}],
                epochs,
                desc=f"{what} ({task.name})",
                progress=progress,
                task="segmentation",
                num_classes=task.num_classes,
            )
            meta = {
                "task": task.name,
                "classes": list(task.class_names),
                "seed": seed,
                "epochs": epochs,
                "best_epoch": hist.best_epoch,
                "val_mean_dice": hist.best_score,
                "seconds": round(time.time() - t0, 1),
            }
            if start is not None:
                meta["from"] = "ancestor"
            if cache:
                folder.mkdir(parents=True, exist_ok=True)
                save_checkpoint(net, path)
                write_json(meta_path, meta, indent=None)
            meta |= {"cached": False}
        label = tag if tag == "ancestor" else f"source {tag.upper()}"
        log(f"{label} ({task.name}): val mean Dice {meta['val_mean_dice']:.3f}, cached {meta['cached']}")
        info["sources"][tag] = meta
        return net.eval()

    return lineage_networks(trained, tasks, ancestor_task, recipe, info), info


@torch.no_grad()
def _probs(model: nn.Module, loader: DataLoader) -> torch.Tensor:
    model.eval()
    return torch.cat([torch.softmax(model(b["image"]).float(), dim=1) for b in loader])


def _labels(loader: DataLoader) -> torch.Tensor:
    return torch.cat([torch.as_tensor(b["label"]) for b in loader])


def dice_scores(probs: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> dict:
    """Test scores of predicted class probabilities ``(n, C, H, W)`` against label maps ``(n, 1, H, W)``: MONAI's
    ``DiceMetric`` of the argmax label map, background left out, a slice without a structure not counted for it
    (``ignore_empty``, as the engines' validation metric).

    Returns:
        ``mean_dice`` (the mean over every counted slice and structure, the validation key metric's reduction) and
        ``dice`` (per structure, the mean over the slices that show it; None for a structure no slice shows).
    """
    pred = probs.argmax(1, keepdim=True)
    num_classes = len(class_names)
    per = DiceMetric(include_background=False, reduction="none", num_classes=num_classes)(pred, labels)
    per = per.float()
    counted = ~torch.isnan(per)
    mean = float(per[counted].mean()) if counted.any() else float("nan")
    dice = {}
    for c, name in enumerate(class_names[1:]):
        col = per[:, c][counted[:, c]]
        dice[name] = float(col.mean()) if len(col) else None
    return {"mean_dice": mean, "dice": dice}


@dataclass
class SegSeedResult:
    """Per-method records of one seed (validation and test scores, curves, seconds), the anchor, the coefficients
    of the direct MedMerge, and the test slices' predicted label maps (for the picture; not written to JSON)."""

    seed: int
    records: dict[str, dict] = field(default_factory=dict)
    anchor: int = 0
    train_slices: list[int] = field(default_factory=list)
    coefficients: dict[str, list[float]] = field(default_factory=dict)
    test_masks: dict[str, np.ndarray] = field(default_factory=dict, repr=False)


def run_seed(
    tasks,
    sources: Sequence[nn.Module],
    recipe: SegRecipe,
    seed: int,
    methods: Sequence[str] = SEGMENTATION_METHODS,
    progress: bool = False,
    log=print,
) -> SegSeedResult:
    """Run ``methods`` for one seed (``tasks.target`` holds this seed's k-shot slices); ``ft_a`` and ``ft_b`` are
    always run (the anchor, the ensemble and the paper's recipe need them).

    Raises:
        ValueError: for an unknown method.
    """
    unknown = sorted(set(methods) - set(SEGMENTATION_METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(SEGMENTATION_METHODS)}.")
    target = tasks.target
    names, k = target.class_names, target.num_classes
    loaders = _Loaders(target, recipe, seed)
    val, test = loaders.eval("val"), loaders.eval("test")
    val_y, test_y = _labels(val), _labels(test)
    size = list(loaders.size)
    out = SegSeedResult(seed, train_slices=[int(z) for z in target.train.slices])
    probs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(name: str, net: nn.Module, history=None, t0: float | None = None, **extra) -> None:
        vp, tp = _probs(net, val), _probs(net, test)
        probs[name] = (vp, tp)
        rec = {"val": dice_scores(vp, val_y, names), "test": dice_scores(tp, test_y, names), **extra}
        if history is not None:
            rec["curve"] = [v["mean_dice"] for v in history.val]
            rec["best_epoch"] = history.best_epoch
        if t0 is not None:
            rec["seconds"] = round(time.time() - t0, 1)
        out.records[name] = rec
        log(
            f"seed {seed} {LABELS.get(name, name)}: val {rec['val']['mean_dice']:.3f}, "
            f"test {rec['test']['mean_dice']:.3f} mean Dice" + (f" ({rec['seconds']} s)" if t0 is not None else "")
        )

    def tuned(name: str, net: nn.Module, t0: float) -> nn.Module:
        for p in net.parameters():
            p.requires_grad_(True)
        hist = _train(
            net,
            loaders,
            [{"params": net.parameters(), "lr": recipe.ft_lr}],
            recipe.ft_epochs,
            recipe,
            LABELS[name],
            progress,
        )
        record(name, net, hist, t0)
        return net.eval()

    if "scratch" in methods:
        t0 = time.time()
        torch.manual_seed(seed)
        tuned("scratch", build_unet(k, recipe), t0)
    ft_nets = []
    for i, tag in enumerate("ab"):
        t0 = time.time()
        torch.manual_seed(seed)
        # phase 0 of the paper's recipe is exactly fine-tuning from each source: one run serves both
        (net,) = fine_tune_sources(
            [sources[i]],
            HEAD,
            k,
            loaders.train(),
            val,
            epochs=recipe.ft_epochs,
            lr=recipe.ft_lr,
            patience=recipe.patience,
            progress=progress,
            task="segmentation",
            spatial_size=size,
            in_channels=1,
        )
        record(f"ft_{tag}", net, t0=t0)
        ft_nets.append(net)
    out.anchor = int(out.records["ft_b"]["val"]["mean_dice"] > out.records["ft_a"]["val"]["mean_dice"])
    if "ft_longer" in methods:
        t0 = time.time()
        torch.manual_seed(seed)
        tuned("ft_longer", copy.deepcopy(ft_nets[out.anchor]), t0)
    example = example_input(size, 1)
    if "ft_head_first" in methods:
        t0 = time.time()
        torch.manual_seed(seed)
        net = with_new_head(sources[out.anchor], HEAD, k, example)
        head = head_only(net, find_head(net, example))
        groups = [{"params": list(head.parameters()), "lr": recipe.head_lr}]
        _train(net, loaders, groups, recipe.coef_epochs, recipe, "train the new head alone", progress)
        tuned("ft_head_first", net, t0)
    if "average_ft" in methods:
        t0 = time.time()
        torch.manual_seed(seed)
        merge = get_method("average").build(list(sources), head=HEAD, out_channels=k, example_input=example)
        tuned("average_ft", collapse_merge(merge, None, loaders.train()), t0)
    for name, pool, merge_heads in (("medmerge_ft", sources, False), ("paper_medmerge_ft", ft_nets, True)):
        if name not in methods:
            continue
        t0 = time.time()
        torch.manual_seed(seed)
        merge = phase1_network(
            list(pool),
            HEAD,
            k,
            anchor=out.anchor,
            anchor_weight=recipe.anchor_weight,
            spatial_size=size,
            in_channels=1,
            merge_heads=merge_heads,
        )
        groups = merge_parameter_groups(merge, recipe.coef_lr, recipe.head_lr)
        desc = f"phase 1: coefficients ({LABELS[name]})"
        hist1 = _train(merge, loaders, groups, recipe.coef_epochs, recipe, desc, progress)
        plain = collapse_merge(merge, None, loaders.train())
        if name == "medmerge_ft":
            record("medmerge", plain, hist1)
            out.coefficients = {u: a.mean(1).tolist() for u, a in merge.coefficients().items()}
        net = tuned(name, plain, t0)
        out.records[name]["curve_phase1"] = [v["mean_dice"] for v in hist1.val]
    if "ensemble" in methods:
        (va, ta), (vb, tb) = probs["ft_a"], probs["ft_b"]
        probs["ensemble"] = ((va + vb) / 2, (ta + tb) / 2)
        out.records["ensemble"] = {
            "val": dice_scores(probs["ensemble"][0], val_y, names),
            "test": dice_scores(probs["ensemble"][1], test_y, names),
            "inference_cost": "2 networks (2x parameters and compute of one)",
        }
        log(f"seed {seed} ensemble: test {out.records['ensemble']['test']['mean_dice']:.3f} mean Dice")
    for name in [m for m in out.records if m not in methods and m != "medmerge"]:
        del out.records[name]
    out.test_masks = {m: p[1].argmax(1).numpy().astype(np.uint8) for m, p in probs.items() if m in out.records}
    return out


def _stats(values: Sequence[float | None]) -> dict:
    vals = np.array([np.nan if v is None else v for v in values], dtype=float)
    finite = vals[~np.isnan(vals)]
    return {
        "mean": float(finite.mean()) if len(finite) else None,
        "std": float(finite.std(ddof=1)) if len(finite) > 1 else 0.0,
        "values": [None if np.isnan(v) else float(v) for v in vals],
    }


def summarize(results: Sequence[SegSeedResult], structures: Sequence[str]) -> dict:
    """Mean and standard deviation per method of validation and test mean Dice and of test Dice per structure;
    every one-network method paired per seed against the best single source (``ft_a`` or ``ft_b``, the higher
    mean validation Dice), the room (ensemble minus best single) and the MedMerge recipe chosen on validation, by
    :func:`medmerge_bench.transfer.room_summary` (paired t-test, and Wilcoxon with 5 seeds or more).
    """
    methods = [m for m in (*SEGMENTATION_METHODS, "medmerge") if all(m in r.records for r in results)]
    table: dict = {}
    for m in methods:
        recs = [r.records[m] for r in results]
        table[m] = {f"{s}_mean_dice": _stats([rec[s]["mean_dice"] for rec in recs]) for s in ("val", "test")}
        for name in structures:
            table[m][f"test_dice_{name}"] = _stats([rec["test"]["dice"][name] for rec in recs])
    summary: dict = {"methods": table, "seeds": [r.seed for r in results]}
    if {"ft_a", "ft_b"} <= set(methods):
        best = max(("ft_a", "ft_b"), key=lambda m: table[m]["val_mean_dice"]["mean"])
        summary["best_single_source"] = best
        # room_summary reads a method's key metric under the classification name: hand it the Dice columns
        dice_table = {
            m: {"val_macro_f1": t["val_mean_dice"], "test_macro_f1": t["test_mean_dice"]} for m, t in table.items()
        }
        paired = room_summary(dice_table, methods, best)
        if "chosen_medmerge" in paired:
            paired["chosen_medmerge"]["chosen_on"] = "mean validation mean Dice among " + ", ".join(
                m for m in MERGE_METHODS if m in methods
            )
        summary |= paired
        if {"medmerge_ft", "ft_head_first"} <= set(methods):
            # the direct recipe against the same schedule (head first, then everything) without a merge
            control = room_summary(dice_table, ["medmerge_ft"], "ft_head_first")["vs_best_single_source"]
            summary["medmerge_ft_vs_ft_head_first"] = control["medmerge_ft"]
        if {"paper_medmerge_ft", "ft_longer"} <= set(methods):
            # the paper's recipe against its control of the same fine-tuning budget without a merge
            control = room_summary(dice_table, ["paper_medmerge_ft"], "ft_longer")["vs_best_single_source"]
            summary["paper_medmerge_ft_vs_ft_longer"] = control["paper_medmerge_ft"]
        summary["metric"] = "test mean Dice (per-seed differences, paired)"
    return summary


def plot_dice(report: dict, path: str | Path) -> Path:
    """Test Dice per structure (and the mean) for each method: bars of the mean over seeds, a dot per seed."""
    from medmerge_bench.plots import OUTSIDE, _backend, _save, _seeds_phrase, plt

    _backend()
    summary, labels = report["summary"], report["methods"]
    structures = report["data"]["target"]["classes"][1:]
    methods = [m for m in labels if m in summary["methods"]]
    columns = [("mean Dice", "test_mean_dice")] + [(s, f"test_dice_{s}") for s in structures]
    fig, ax = plt.subplots(figsize=(12, 4.2))
    width = 0.8 / len(methods)
    cmap = plt.get_cmap("tab10")
    for j, m in enumerate(methods):
        xs = np.arange(len(columns)) + (j - (len(methods) - 1) / 2) * width
        stats = [summary["methods"][m][key] for _, key in columns]
        ax.bar(xs, [s["mean"] or 0.0 for s in stats], width, color=cmap(j), label=labels[m])
        for x, s in zip(xs, stats, strict=True):
            vals = [v for v in s["values"] if v is not None]
            ax.plot([x] * len(vals), vals, "o", ms=2.5, color="black", alpha=0.6, zorder=3)
    ax.plot([], [], "o", ms=2.5, color="black", alpha=0.6, label="one seed")
    ax.set_xticks(np.arange(len(columns)), [c for c, _ in columns])
    ax.set_ylim(0, 1)
    ax.set_ylabel("test Dice")
    ax.set_title(
        f"Test Dice per structure (brain MRI, k = {report['k']} slices per structure, "
        f"{_seeds_phrase(len(report['seeds']))}; bar = mean)"
    )
    ax.legend(fontsize=8, **OUTSIDE)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, Path(path))


def plot_slice(
    image: np.ndarray,
    truth: np.ndarray,
    masks: dict[str, np.ndarray],
    labels: dict,
    classes: Sequence[str],
    title: str,
    path: str | Path,
) -> Path:
    """One test slice: the image, the ground truth and each method's predicted mask over it, with a legend of the
    structures' colours."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    from medmerge_bench.plots import OUTSIDE, _backend, _save, plt

    _backend()
    colors = plt.get_cmap("tab10")(np.arange(len(classes) - 1))
    cmap = ListedColormap(colors)
    panels = [("image", None), ("ground truth", truth)] + [(labels.get(m, m), mask) for m, mask in masks.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(1.8 * len(panels), 3.0))
    # the slice is stored x then y: transposed and flipped so that anterior is up and the left of the brain is right
    show = lambda a: np.flipud(np.asarray(a).T)  # noqa: E731
    for ax, (name, mask) in zip(axes, panels, strict=True):
        ax.imshow(show(image), cmap="gray")
        if mask is not None:
            m = show(mask).astype(float)
            ax.imshow(
                np.ma.masked_where(m == 0, m - 1),
                cmap=cmap,
                vmin=0,
                vmax=len(classes) - 2,
                alpha=0.75,
                interpolation="nearest",
            )
        ax.set_title(textwrap.fill(name, 20), fontsize=7)
        ax.axis("off")
    handles = [Patch(color=colors[i], label=c) for i, c in enumerate(classes[1:])]
    axes[-1].legend(handles=handles, fontsize=7, title="structure", title_fontsize=7, **OUTSIDE)
    fig.suptitle(title, fontsize=9)
    return _save(fig, Path(path))


def _describe(task) -> dict:
    return {"name": task.name, "classes": list(task.class_names), "train": len(task.train), "val": len(task.val)}


def run_segmentation(
    k: int,
    seeds: Sequence[int],
    out_dir: str | Path,
    recipe: SegRecipe | None = None,
    methods: Sequence[str] = SEGMENTATION_METHODS,
    name: str | None = None,
    progress: bool = False,
    cache: bool = True,
    log=print,
) -> dict:
    """Pretrain (or load) the sources, run every method for every seed, write ``<name>.json`` and the pictures
    ``<name>_slice.png`` and ``<name>_dice.png`` into ``out_dir``.

    Returns:
        the report written to ``<name>.json``.
    """
    from medmerge_bench.comparison import machine_description
    from medmerge_bench.data.segmentation import load_segmentation_tasks

    recipe = recipe or SegRecipe()
    name = name or f"segmentation_k{k}"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    machine = machine_description()  # the code that runs is the code imported now
    tasks = load_segmentation_tasks(k=k, seed=seeds[0], progress=False)
    sources, source_info = pretrain_sources(tasks, recipe, cache=cache, progress=progress, log=log)
    results = []
    for seed in seeds:
        log(f"k={k} seed {seed}: start ({time.time() - t0:.0f} s so far)")
        tasks = load_segmentation_tasks(k=k, seed=seed, progress=False)
        results.append(run_seed(tasks, sources, recipe, seed, methods, progress=progress, log=log))
    target = tasks.target
    structures = list(target.class_names[1:])
    summary = summarize(results, structures)
    if "room" in summary:
        room = summary["room"]["mean_difference"]
        line = f"room (ensemble - best single {summary['best_single_source']}): {room:+.3f}"
        for m in MERGE_METHODS:
            if m in summary["vs_best_single_source"]:
                line += f"; {m} {summary['vs_best_single_source'][m]['mean_difference']:+.3f}"
        log(line)
    first = results[0]
    # the picture's slice: seed 0's test slice that shows the most structures
    shown = [(len(set(np.unique(y)) - {0}), i) for i, y in enumerate(target.test.labels)]
    slice_index = max(shown)[1]
    labels = {m: LABELS.get(m, m) for m in (*SEGMENTATION_METHODS, "medmerge") if m in summary["methods"]}
    report = {
        "benchmark": "segmentation",
        "task": "brain MRI segmentation (subcortical structures)",
        "k": k,
        "seeds": list(seeds),
        "methods": labels,
        "recipe": asdict(recipe),
        "network": "monai.networks.nets.UNet (2-D, 1 input channel)",
        "lineage": recipe.lineage,
        "pair": recipe.pair,
        "preprocessing": "product MR pipeline: per-slice percentiles "
        f"{recipe.percentiles[0]:g}-{recipe.percentiles[1]:g} to [0, 1]"
        + (", training augmentation (flip, small affine, noise)" if recipe.augment else ""),
        "metric": "MONAI DiceMetric of the argmax label map, background excluded, slices without a structure not "
        "counted for it; mean Dice = mean over counted (slice, structure) pairs (the validation key metric)",
        "data": {
            "source_a": source_info["ancestor_task"] if recipe.pair == "ancestor_b" else _describe(tasks.source_a),
            "source_b": _describe(tasks.source_b),
            "target": {
                "name": target.name,
                "classes": list(target.class_names),
                "val": len(target.val),
                "test": len(target.test),
            },
            **({"ancestor": source_info["ancestor_task"]} if "ancestor_task" in source_info else {}),
            "split_rule": tasks.split_rule,
            "notes": tasks.notes,
        },
        "sources": source_info,
        "summary": summary,
        "per_seed": [
            {"seed": r.seed, "anchor": "ab"[r.anchor], "train_slices_z": r.train_slices, "records": r.records}
            for r in results
        ],
        "coefficients_seed0": first.coefficients,
        "slice_picture": {"seed": first.seed, "test_slice_z": int(target.test.slices[slice_index])},
        "machine": machine,
        "seconds": round(time.time() - t0, 1),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    first_target = load_segmentation_tasks(k, first.seed, False).target
    normalise = slice_pipeline(target.num_classes, target.test.images.shape[2:], recipe, train=False)
    (item,) = _items(first_target.test)[slice_index : slice_index + 1]
    image = normalise(item)["image"][0]
    pictures = [
        plot_slice(
            np.asarray(image),
            first_target.test.labels[slice_index, 0],
            {m: first.test_masks[m][slice_index] for m in labels if m in first.test_masks},
            labels,
            first_target.class_names,
            f"Test slice z = {report['slice_picture']['test_slice_z']} (seed {first.seed}, k = {k}): image, truth and "
            "each method's mask",
            out / f"{name}_slice.png",
        ),
        plot_dice(report, out / f"{name}_dice.png"),
    ]
    report["pictures"] = [p.name for p in pictures]
    write_json(out / f"{name}.json", report)
    return report

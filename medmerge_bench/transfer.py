"""Compare MedMerge with transfer baselines on one target task, with the same code and budget for every method.

Methods (the names used in results):

- ``scratch``: a fresh network, fine-tuned on the target.
- ``ft_a`` / ``ft_b``: fine-tuning from source A / B (body loaded, fresh head); ``ft_c`` from the third source where
  there is one (``pair="ab_ancestor"``: A, B and their ancestor, N = 3).
- ``lpft_a`` / ``lpft_b``: linear probing of a fresh head on the frozen source body, then full fine-tuning.
- ``average_ft``: uniform weight average of the sources (fresh head, norm statistics recomputed), fine-tuned.
- ``layer_ft``: learned layer-level merge, collapsed, fine-tuned.
- ``medmerge``: learned kernel-level merge (MedMerge) without fine-tuning, collapsed.
- ``medmerge_ft``: the same, fine-tuned.
- ``aligned_average_ft`` / ``aligned_medmerge_ft``: the same after aligning the sources onto the anchor
  (:func:`~monai_medmerge.merging.align_sources`, by activations or weights as ``Recipe.alignment`` says), which
  permutes channels without changing functions.
- ``aligned_ftmerge_ft``: MedMerge of ``ft_a`` and ``ft_b`` (the sources already fine-tuned on the target), aligned
  onto the anchor, then fine-tuned: the merge of exactly the two networks the ensemble averages.
- The paper's recipe (phase 0 fine-tunes each source on the target, as ``ft_a``/``ft_b``; phase 1 merges the two
  fine-tuned networks, their target heads included; phase 2 fine-tunes): ``paper_medmerge_ft``, and the paper's
  baselines on the same fine-tuned pair, ``paper_average_ft`` (uniform average, norm statistics recomputed on the
  target) and ``paper_aligned_average_ft`` (the same after permutation alignment onto the anchor). Without the
  last fine-tuning: ``paper_medmerge`` (the collapsed merge after phase 1) and ``paper_average`` (the uniform average
  with norm statistics recomputed: a "model soup" of the fine-tuned pair).
- ``paper_lpft_medmerge_ft``: the paper's recipe with phase 0 head first: the merge of the LP-FT networks
  (``lpft_a``, ``lpft_b``), anchored on the one that validates best, then fine-tuned; compared with the better LP-FT
  row in ``vs_best_head_first``. ``paper_lpft_medmerge_distill``: the same with phase 2 distilled from the ensemble of
  the LP-FT networks; its controls without a merge start from the anchor's probed network: ``lpft_distill`` (the same
  distillation) and ``lpft_steps`` (as many steps, no teacher).
- ``paper_medmerge_distill``: the paper's recipe with phase 2 distilled from the ensemble of the fine-tuned pair
  (the product's :class:`~monai_medmerge.workflows.distillation.EnsembleDistillation`); ``ft_distill``: the same
  distillation into fine-tuning from the anchor source, the control that shows what the merge adds to distillation
  alone. With ``Recipe.distill_steps`` they train that many steps per
  epoch (the labelled set reshuffled as often as it takes); ``ft_steps`` is fine-tuning from the anchor source for
  the same steps without a teacher, the control that shows what the longer training alone gives.
- ``ft_longer``: the anchor's ``ft_a``/``ft_b`` network fine-tuned once more with the same budget: the paper's recipe
  fine-tunes twice (phase 0, then phase 2), and this is its control without a merge.
- ``paper_zip_ft``: the fine-tuned pair zipped (:func:`~monai_medmerge.merging.zip_networks`, ZipIt!-style feature
  merging) into one plain network ``Recipe.zip_width`` times as wide as a source (norm statistics recomputed on the
  target), then fine-tuned: one network that may keep more of the ensemble than a same-width merge, at a cost (MACs,
  recorded beside the single network's and the ensemble's) of about ``zip_width`` squared times one network.
  ``paper_zip``: the same zipped network without the fine-tuning.
- ``ensemble``: mean probabilities of ``ft_a`` and ``ft_b`` (and ``ft_c``), an upper bound that costs N networks at
  inference. ``ensemble_lpft``: the same over ``lpft_a`` and ``lpft_b`` (and ``lpft_c``), the sources fine-tuned with
  their heads trained first.

The room of a benchmark is the ensemble's lead over the best single source (paired per seed); each one-network
method's gain over the best single source is also reported as its share of that room (:func:`summarize`). With the
LP-FT rows, ``room_head_first`` is the same lead when every network is fine-tuned head first (``ensemble_lpft`` over
the better LP-FT row): what is left for a merge once one source is trained with the stronger schedule.

Lineage (``Recipe.lineage``): ``independent`` sources start from their own random initialisations; ``shared``
sources are fine-tuned from one ancestor trained first on a broad task of another domain
(:func:`~medmerge_bench.data.tasks.load_ancestor_task`), the stand-in for ImageNet. ``Recipe.pair`` picks the pair:
``ab`` (ancestor -> A and ancestor -> B) or ``ancestor_b`` (the ancestor itself and ancestor -> B: the paper's pair of
an ImageNet network and a network pretrained on a related medical task).

Every choice (the anchor source, the best epoch, the best single-source baseline) is made on validation data; the
test split is only evaluated.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from monai.networks.nets import ResNet
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from medmerge_bench.data.tasks import ANCESTOR_KINDS, cache_dir, load_ancestor_task
from monai_medmerge.io import write_json
from monai_medmerge.merging import align_sources, get_method, inference_macs, recalibrate_norm, zip_networks
from monai_medmerge.networks import KernelMerge
from monai_medmerge.sources import load_checkpoint, save_checkpoint
from monai_medmerge.workflows import (
    classification_metrics,
    fine_tune,
    fit,
    learn_coefficients,
    linear_probe,
    predict,
)
from monai_medmerge.workflows.distillation import EnsembleDistillation
from monai_medmerge.workflows.engines import check_training

__all__ = [
    "Recipe",
    "PROTOCOLS",
    "head_only",
    "lineage_networks",
    "COMPARISON_METHODS",
    "MEDMERGE_RECIPES",
    "build_network",
    "recipe_network_def",
    "coefficient_penalty",
    "from_source",
    "loader",
    "new_merge",
    "record",
    "pretrain_sources",
    "room_summary",
    "run_seed",
    "summarize",
    "HEAD",
]

HEAD = "fc"
COMPARISON_METHODS = (
    "scratch",
    "ft_a",
    "ft_b",
    "ft_c",
    "lpft_a",
    "lpft_b",
    "average_ft",
    "layer_ft",
    "medmerge",
    "medmerge_ft",
    "aligned_average_ft",
    "aligned_medmerge_ft",
    "aligned_ftmerge_ft",
    "paper_average",
    "paper_average_ft",
    "paper_aligned_average_ft",
    "paper_medmerge",
    "paper_medmerge_ft",
    "paper_medmerge_distill",
    "paper_lpft_medmerge_ft",
    "paper_lpft_medmerge_distill",
    "lpft_distill",
    "lpft_steps",
    "ft_distill",
    "ft_steps",
    "ft_longer",
    "paper_zip",
    "paper_zip_ft",
    "ensemble",
    "ensemble_lpft",
)
# the MedMerge recipes among the methods: the one reported as "the merge" is chosen among them on validation
MEDMERGE_RECIPES = (
    "medmerge_ft",
    "aligned_medmerge_ft",
    "aligned_ftmerge_ft",
    "paper_medmerge",
    "paper_medmerge_ft",
    "paper_medmerge_distill",
    "paper_lpft_medmerge_ft",
    "paper_lpft_medmerge_distill",
)
# the methods built on the LP-FT networks of every source (run for them even when their rows are not asked for)
ON_LPFT_PAIR = (
    "ensemble_lpft",
    "paper_lpft_medmerge_ft",
    "paper_lpft_medmerge_distill",
    "lpft_distill",
    "lpft_steps",
)
METHOD_LABELS = {
    "scratch": "scratch",
    "ft_a": "fine-tune from A",
    "ft_b": "fine-tune from B",
    "ft_c": "fine-tune from C (the third source)",
    "lpft_a": "LP-FT from A",
    "lpft_b": "LP-FT from B",
    "average_ft": "uniform average + FT",
    "layer_ft": "learned layer merge + FT",
    "medmerge": "MedMerge, collapsed (no FT)",
    "medmerge_ft": "MedMerge + FT",
    "aligned_average_ft": "aligned average + FT",
    "aligned_medmerge_ft": "aligned MedMerge + FT",
    "aligned_ftmerge_ft": "aligned MedMerge of FT A and B + FT",
    "paper_average_ft": "paper's baseline: average of FT A and B + FT",
    "paper_aligned_average_ft": "paper's baseline: aligned average of FT A and B + FT",
    "paper_average": "average of FT A and B, no further FT (a model soup)",
    "paper_medmerge": "paper's recipe without phase 2: MedMerge of FT A and B, collapsed",
    "paper_medmerge_ft": "paper's recipe: MedMerge of FT A and B + FT",
    "paper_medmerge_distill": "paper's recipe, FT distilled from the ensemble",
    "paper_lpft_medmerge_ft": "paper's recipe over LP-FT A and B (phase 0 head first) + FT",
    "paper_lpft_medmerge_distill": "paper's recipe over LP-FT A and B, FT distilled from their ensemble",
    "lpft_distill": "LP-FT from the better LP-FT source, FT distilled from the LP-FT ensemble",
    "lpft_steps": "LP-FT from the better LP-FT source for the distillation's steps",
    "ft_distill": "fine-tune from the anchor, distilled from the ensemble",
    "ft_steps": "fine-tune from the anchor for the distillation's steps",
    "ft_longer": "FT from the anchor source, fine-tuned again (the paper recipe's FT budget)",
    "paper_zip": "zip of FT A and B into a wider network (no FT)",
    "paper_zip_ft": "zip of FT A and B into a wider network + FT",
    "ensemble": "ensemble of FT A and B (2x cost)",
    "ensemble_lpft": "ensemble of LP-FT A and B (2x cost)",
}


# the sources of a run: A and B; the ancestor and B (the paper's pair); A, B and the ancestor (N = 3)
PAIRS = ("ab", "ancestor_b", "ab_ancestor")
SOURCE_TAGS = ("a", "b", "c")
SINGLE_SOURCE = tuple(f"ft_{t}" for t in SOURCE_TAGS)
SINGLE_SOURCE_LPFT = tuple(f"lpft_{t}" for t in SOURCE_TAGS)
# the rows that run several networks at inference: never a one-network method paired against the best single source
ENSEMBLES = ("ensemble", "ensemble_lpft")
# Named settings of recorded benchmarks, written once for every run that repeats one: `medmerge benchmark --protocol
# NAME` (then --set on top), the demo and benchmarks/gpu_widths.sh read them through Recipe.protocol.
PROTOCOLS = {
    # the default budget of the first recorded benchmarks
    "default": {},
    # every fine-tuning up to 150 epochs, early stopping after 40 without gain; the *_distill rows distil on 20,000
    # unlabelled target images, 20 steps an epoch (the *_lpft_distill_ft150 benchmarks and the demo)
    "lpft_distill_ft150": {"ft_epochs": 150, "patience": 40, "distill_unlabeled": 20000, "distill_steps": 20},
    # the shared lineage of the *_rotation_* benchmarks: both sources fine-tuned from one self-supervised ancestor
    # (quarter turns of the target domain's images), trained 8 epochs
    "shared_rotation": {"lineage": "shared", "ancestor": "rotation", "ancestor_epochs": 8},
    # a short profile on top of any other (`--quick`: CI and smoke runs; its numbers are not kept)
    "quick": {"source_epochs": 1, "ancestor_epochs": 1, "coef_epochs": 2, "ft_epochs": 2, "lp_epochs": 1},
}


@dataclass(frozen=True)
class Recipe:
    """Every setting of a comparison run. ``source_key()`` names the cached sources it pretrains.

    Args:
        widths: channels of the four stages of the MONAI ``ResNet`` (basic blocks, one per stage).
        batch_size: training batch size of every phase.
        source_epochs, source_lr, source_seeds: pretraining of sources A and B, each from its own initialisation.
        coef_epochs, coef_lr, head_lr: phase 1 (coefficients and new head).
        anchor_weight: starting share of the anchor source (chosen on validation per seed).
        coef_penalty: weight of a phase-1 penalty on the merge logits' squared distance from their start (0: none).
        ft_epochs, ft_lr, patience: every fine-tuning (phase 2 and the baselines), early stopping on validation.
        lp_epochs, lp_lr: the linear-probing stage of LP-FT.
        alignment: how the ``aligned_*`` methods align the sources: ``"activations"`` (feature correlations on the
            target's training images) or ``"weights"`` (weight matching).
        lineage: ``"independent"`` (each source from its own random initialisation) or ``"shared"`` (both sources
            fine-tuned for ``source_epochs`` from one ancestor trained ``ancestor_epochs`` on a broad task).
        ancestor_epochs: training of the shared ancestor.
        ancestor: what the shared ancestor is trained on (:func:`~medmerge_bench.data.tasks.load_ancestor_task`):
            ``"other_domain"`` (the other benchmark's pooled source tasks) or ``"rotation"`` (self-supervised, quarter
            turns of the target domain's unlabelled images).
        pair: ``"ab"`` (the two source networks), ``"ancestor_b"`` (the ancestor itself as source A; shared only) or
            ``"ab_ancestor"`` (three sources: A, B and their ancestor as C; shared only).
        distill_weight: weight of the distillation term of the ``*_distill`` methods.
        distill_unlabeled: what the ``*_distill`` methods distil on: 0, mixup blends of each labelled batch; n > 0,
            a batch (as large as the labelled one) drawn each step from the first n unlabelled images of the target's
            domain (``TaskData.unlabeled``: its training pool less the labelled subset), which few-shot medical
            tasks usually have in plenty.
        distill_steps: training steps per epoch of the ``*_distill`` rows and of ``ft_steps`` (0: one pass over the
            labelled set, as every fine-tuning); more steps let the teacher's knowledge of many unlabelled images
            through where a few labels make short epochs.
        zip_width: width of the ``paper_zip_ft`` network, as a multiple of the sources' ``widths`` (each rounded to
            an integer), between 1 (one source's width and cost) and 2 (both sources side by side: the ensemble);
            the cost grows about as its square, so it is below the two-network ensemble's under about 1.41.
        device: where every training loop and every evaluation runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...);
            the glue between them (merging, alignment, zipping, counting MACs) runs where its networks are or on the
            CPU. Not part of the sources' cache key: sources pretrained on one device are reused on another.
    """

    widths: tuple[int, ...] = (16, 32, 64, 128)
    batch_size: int = 32
    source_epochs: int = 4
    source_lr: float = 1e-3
    source_seeds: tuple[int, int] = (1, 2)
    coef_epochs: int = 15
    coef_lr: float = 1e-2
    head_lr: float = 1e-3
    anchor_weight: float = 0.9
    coef_penalty: float = 0.0
    ft_epochs: int = 30
    ft_lr: float = 1e-3
    patience: int = 8
    lp_epochs: int = 10
    lp_lr: float = 1e-2
    alignment: str = "activations"
    lineage: str = "independent"
    ancestor_epochs: int = 4
    ancestor: str = "other_domain"
    pair: str = "ab"
    distill_weight: float = 1.0
    distill_unlabeled: int = 0
    distill_steps: int = 0
    zip_width: float = 1.25
    device: str = "cpu"

    def __post_init__(self) -> None:
        if len(self.widths) != 4 or any(not isinstance(w, int) or w < 1 for w in self.widths):
            raise ValueError(f"widths must be 4 positive channel counts, one per ResNet stage, got {self.widths!r}.")
        if len(self.source_seeds) != 2:
            raise ValueError(f"source_seeds must be 2 seeds, of sources A and B, got {self.source_seeds!r}.")
        # the bundles' rules for epochs, learning rates, batch size and patience
        names = ("batch_size", "patience", "source_epochs", "coef_epochs", "ft_epochs", "lp_epochs", "ancestor_epochs")
        check_training(**{n: getattr(self, n) for n in (*names, "source_lr", "coef_lr", "head_lr", "ft_lr", "lp_lr")})
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda', got {self.device!r}.") from e
        if self.distill_steps < 0:
            raise ValueError(
                f"distill_steps must be >= 0 (0: one pass over the labelled set), got {self.distill_steps}."
            )
        if self.distill_unlabeled < 0:
            raise ValueError(
                f"distill_unlabeled must be >= 0 (0: mixup of the labelled batch), got {self.distill_unlabeled}."
            )
        if not 1.0 <= self.zip_width <= 2.0:
            raise ValueError(
                f"zip_width must lie in [1, 2] (one source's width to both side by side), got {self.zip_width}."
            )
        if self.lineage not in ("independent", "shared"):
            raise ValueError(f"lineage must be 'independent' or 'shared', got {self.lineage!r}.")
        if self.ancestor not in ANCESTOR_KINDS:
            raise ValueError(f"ancestor must be one of {', '.join(ANCESTOR_KINDS)}, got {self.ancestor!r}.")
        if self.pair not in PAIRS:
            raise ValueError(f"pair must be one of {', '.join(PAIRS)}, got {self.pair!r}.")
        if self.ancestor != "other_domain" and self.lineage != "shared":
            raise ValueError(f"ancestor={self.ancestor!r} needs lineage='shared': only the shared lineage has one.")
        if self.pair != "ab" and self.lineage != "shared":
            raise ValueError(f"pair={self.pair!r} needs lineage='shared': only the shared lineage has an ancestor.")

    @classmethod
    def protocol(cls, *names: str, **changes) -> Recipe:
        """The recipe of the named :data:`PROTOCOLS`, applied in order, then ``changes``: e.g.
        ``Recipe.protocol("lpft_distill_ft150", "quick", device="cuda")``."""
        settings = {}
        for name in names:
            if name not in PROTOCOLS:
                raise ValueError(f"unknown protocol {name!r}; choose from {', '.join(PROTOCOLS)}.")
            settings |= PROTOCOLS[name]
        return cls(**(settings | changes))

    def phase1(self, merge: KernelMerge | None = None) -> dict:
        """Keyword arguments of :func:`~monai_medmerge.workflows.learn_coefficients` for this recipe; with
        ``coef_penalty`` > 0 they include the penalised loss of ``merge`` (:func:`coefficient_penalty`)."""
        kwargs = {
            "epochs": self.coef_epochs,
            "lr": self.coef_lr,
            "head_lr": self.head_lr,
            "patience": self.patience,
            "device": self.device,
        }
        if self.coef_penalty:
            if merge is None:
                raise ValueError("a recipe with a coefficient penalty needs the merge: recipe.phase1(merge).")
            kwargs["loss_function"] = coefficient_penalty(merge, self.coef_penalty)
        return kwargs

    def zip_widths(self) -> tuple[int, ...]:
        """The stage widths of the ``paper_zip_ft`` network: ``widths`` times ``zip_width``, rounded."""
        return tuple(max(w, min(2 * w, round(w * self.zip_width))) for w in self.widths)

    def phase2(self) -> dict:
        """Keyword arguments of :func:`~monai_medmerge.workflows.fine_tune` (phase 2 and every fine-tuning)."""
        return {"epochs": self.ft_epochs, "lr": self.ft_lr, "patience": self.patience, "device": self.device}

    def source_key(self, task: str, data_version: str = "") -> str:
        fields = {k: v for k, v in asdict(self).items() if k.startswith("source") or k in ("widths", "batch_size")}
        if self.lineage == "shared":
            # only in the shared lineage, so that the keys of sources cached before lineages existed still hold
            fields |= {"lineage": self.lineage, "ancestor_epochs": self.ancestor_epochs}
            if self.ancestor != "other_domain":
                fields["ancestor"] = self.ancestor
        blob = json.dumps({"task": task, "data": data_version, **fields}, sort_keys=True)
        return f"{task}-{hashlib.sha1(blob.encode()).hexdigest()[:12]}"


def recipe_network_def(num_classes: int, recipe: Recipe) -> dict:
    """MONAI config (``_target_`` and arguments) of :func:`build_network`, for bundles."""
    return {
        "_target_": "monai.networks.nets.ResNet",
        "block": "basic",
        "layers": [1, 1, 1, 1],
        "block_inplanes": list(recipe.widths),
        "spatial_dims": 2,
        "n_input_channels": 1,
        "conv1_t_size": 3,
        "conv1_t_stride": 1,
        "no_max_pool": True,
        "num_classes": num_classes,
    }


def build_network(num_classes: int, recipe: Recipe) -> nn.Module:
    """The benchmark's architecture: a small 2-D MONAI ``ResNet`` for 1x32x32 patches (about 0.3 M parameters)."""
    kwargs = recipe_network_def(num_classes, recipe)
    del kwargs["_target_"]
    return ResNet(**kwargs)


def loader(ds: TensorDataset, shuffle: bool, seed: int, batch_size: int) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))


def pretrain_sources(
    tasks, recipe: Recipe, cache: bool = True, progress: bool = True, data_version: str | None = None
) -> tuple[list[nn.Module], dict]:
    """Pretrain sources A and B, or load them from the cache.

    In the independent lineage each source starts from its own random initialisation; in the shared lineage an
    ancestor is trained first on :func:`~medmerge_bench.data.tasks.load_ancestor_task` and both sources are
    fine-tuned from it (fresh heads). With ``recipe.pair == "ancestor_b"`` the ancestor itself is returned as
    source A. The cache key covers the recipe's source settings and a digest of the training data (or
    ``data_version`` when given).

    Returns:
        ``([source_a, source_b], info)``: each network's best validation metrics, whether it was cached, and
        ``names`` (what sources A and B are).
    """
    ancestor_task = (
        load_ancestor_task(tasks.name, progress=progress, kind=recipe.ancestor) if recipe.lineage == "shared" else None
    )
    if data_version is None:
        # the sources depend on their training data: a change of the data builder must not reuse stale sources
        digest = hashlib.sha1()
        for data in (tasks.source_a, tasks.source_b, ancestor_task):
            for t in data.train.tensors if data is not None else ():
                digest.update(t.numpy().tobytes())
        data_version = digest.hexdigest()[:16]
    key = recipe.source_key(tasks.name, data_version)
    folder = cache_dir() / "sources" / key
    info: dict = {"key": key, "lineage": recipe.lineage, "pair": recipe.pair, "sources": {}}

    def trained(tag: str, data, seed: int, epochs: int, start: nn.Module | None) -> nn.Module:
        path = folder / f"source_{tag}.safetensors"
        meta_path = folder / f"source_{tag}.json"
        torch.manual_seed(seed)
        net = build_network(data.num_classes, recipe) if start is None else from_source(start, data.num_classes, recipe)
        if cache and path.exists() and meta_path.exists():
            net.load_state_dict(load_checkpoint(path))
            meta = json.loads(meta_path.read_text()) | {"cached": True}
        else:
            what = f"pretrain {tag}" if start is None else f"fine-tune the ancestor on {tag}"
            hist = fit(
                net,
                loader(data.train, True, seed, recipe.batch_size),
                loader(data.val, False, seed, 256),
                [{"params": net.parameters(), "lr": recipe.source_lr}],
                epochs,
                device=recipe.device,
                desc=f"{what} ({data.name})",
                progress=progress,
            )
            net.cpu()
            meta = {"task": data.name, "seed": seed, "val": hist.val[hist.best_epoch], "epochs": epochs}
            if start is not None:
                meta["from"] = "ancestor"
            if cache:
                folder.mkdir(parents=True, exist_ok=True)
                save_checkpoint(net, path)
                write_json(meta_path, meta, indent=None)
            meta |= {"cached": False}
        info["sources"][tag] = meta
        return net.eval()  # on the CPU, trained or loaded: every run starts from networks on one device

    return lineage_networks(trained, tasks, ancestor_task, recipe, info), info


def lineage_networks(trained, tasks, ancestor_task, recipe, info: dict) -> list[nn.Module]:
    """The source networks of a run in its lineage and pair, for every benchmark.

    ``trained(tag, task, seed, epochs, start)`` trains (or loads) one network on ``task`` from ``start`` (None:
    a fresh initialisation). The ancestor, when ``ancestor_task`` is given, is trained first and A and B start
    from it; ``recipe.pair`` then picks the sources: ``ab``, ``ancestor_b`` (the ancestor in A's place) or
    ``ab_ancestor`` (the ancestor as a third source). Writes ``info["names"]``, what each source is.
    """
    ancestor = None
    if ancestor_task is not None:
        ancestor = trained("ancestor", ancestor_task, recipe.source_seeds[0], recipe.ancestor_epochs, None)
    sources = [
        trained(tag, data, seed, recipe.source_epochs, ancestor)
        for tag, data, seed in (
            ("a", tasks.source_a, recipe.source_seeds[0]),
            ("b", tasks.source_b, recipe.source_seeds[1]),
        )
    ]
    info["names"] = [tasks.source_a.name, tasks.source_b.name]
    if recipe.pair == "ancestor_b":
        sources[0] = ancestor
        info["names"][0] = f"ancestor ({ancestor_task.name})"
    elif recipe.pair == "ab_ancestor":
        sources.append(ancestor)
        info["names"].append(f"ancestor ({ancestor_task.name})")
    return sources


def from_source(source: nn.Module, num_classes: int, recipe: Recipe) -> nn.Module:
    net = build_network(num_classes, recipe)
    body = {k: v for k, v in source.state_dict().items() if not k.startswith(HEAD + ".")}
    missing, unexpected = net.load_state_dict(body, strict=False)
    assert not unexpected and all(k.startswith(HEAD + ".") for k in missing), (missing, unexpected)
    return net


def record(model: nn.Module, val_loader, test_loader, history=None) -> dict:
    """Validation and test metrics of ``model`` (evaluated on the device it is on), its learning curve, and its
    probabilities (``_probs``, for the ensembles' rows)."""
    device = next(model.parameters()).device
    vp, vy = predict(model, val_loader, device)
    tp, ty = predict(model, test_loader, device)
    rec = {"val": classification_metrics(vy, vp), "test": classification_metrics(ty, tp), "_probs": (vp, tp)}
    if history is not None:
        rec["curve"] = [v["macro_f1"] for v in history.val]
    return rec


@dataclass
class SeedResult:
    """Per-method records of one seed: validation and test metrics, learning curves, and merge details: ``anchor``,
    the source the merges of the fine-tuned pair start from (of the LP-FT pair when no plain fine-tuning ran), and
    ``coefficients``, the shares the first merge with that anchor learned."""

    seed: int
    records: dict[str, dict] = field(default_factory=dict)
    anchor: int = 0
    coefficients: dict[str, list[float]] = field(default_factory=dict)
    models: dict[str, nn.Module] = field(default_factory=dict, repr=False)


def run_seed(
    tasks,
    sources: Sequence[nn.Module],
    recipe: Recipe,
    seed: int,
    methods: Sequence[str] = COMPARISON_METHODS,
    progress: bool = True,
) -> SeedResult:
    """Run the chosen methods for one seed (``tasks.target`` already holds this seed's k-shot subset).

    ``ensemble`` needs every ``ft_<source>``; MedMerge's anchor is the source whose fine-tuning validated best
    (``ft_a``/``ft_b``/``ft_c`` are run for that even when not asked for). With three ``sources`` every merge row
    merges all three.
    """
    unknown = sorted(set(methods) - set(COMPARISON_METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(COMPARISON_METHODS)}.")
    tags = SOURCE_TAGS[: len(sources)]
    if not 2 <= len(sources) <= len(SOURCE_TAGS):
        raise ValueError(f"run_seed merges 2 or 3 sources, got {len(sources)}.")
    if "ft_c" in methods and len(sources) < 3:
        raise ValueError("method ft_c needs a third source (pair='ab_ancestor').")
    target = tasks.target
    k = target.num_classes

    def train() -> DataLoader:
        # a fresh loader per method: every method sees the same sequence of shuffled batches (paired methods)
        return loader(target.train, True, seed, recipe.batch_size)

    val = loader(target.val, False, seed, 256)
    test = loader(target.test, False, seed, 256)
    out = SeedResult(seed)
    recs = out.records

    def finetuned(net: nn.Module, name: str) -> nn.Module:
        net, hist = fine_tune(net, train(), val, **recipe.phase2(), progress=progress, desc=METHOD_LABELS[name])
        recs[name] = record(net, val, test, hist)
        return net

    if "scratch" in methods:
        torch.manual_seed(seed)
        finetuned(build_network(k, recipe), "scratch")
    need_ft = {
        "ft_a",
        "ft_b",
        "ft_c",
        "ensemble",
        "layer_ft",
        "medmerge",
        "medmerge_ft",
        "aligned_medmerge_ft",
        "aligned_ftmerge_ft",
        "paper_average",
        "paper_average_ft",
        "paper_aligned_average_ft",
        "paper_medmerge",
        "paper_medmerge_ft",
        "paper_medmerge_distill",
        "ft_distill",
        "ft_steps",
        "ft_longer",
        "paper_zip",
        "paper_zip_ft",
    } & set(methods)
    ft_nets: dict[str, nn.Module] = {}
    lpft_nets: dict[str, nn.Module] = {}
    probed: dict[str, nn.Module] = {}  # the LP-FT networks after their linear probe, before fine-tuning
    for i, tag in enumerate(tags):
        if need_ft:
            torch.manual_seed(seed)
            ft_nets[tag] = finetuned(from_source(sources[i], k, recipe), f"ft_{tag}")
        if f"lpft_{tag}" in methods or set(ON_LPFT_PAIR) & set(methods):
            torch.manual_seed(seed)
            net = from_source(sources[i], k, recipe)
            # the probe trains on frozen features: the body stays in eval mode so its norm statistics do not move
            linear_probe(
                net,
                HEAD,
                train(),
                val,
                epochs=recipe.lp_epochs,
                lr=recipe.lp_lr,
                patience=recipe.patience,
                device=recipe.device,
                desc=f"linear probe (from {tag.upper()})",
                progress=progress,
            )
            probed[tag] = copy.deepcopy(net)
            lpft_nets[tag] = finetuned(net, f"lpft_{tag}")
    if need_ft:
        out.anchor = _best_on_validation(recs, "ft", tags)
    elif set(ON_LPFT_PAIR) & set(methods):
        out.anchor = _best_on_validation(recs, "lpft", tags)  # the only merges run are over the LP-FT pair

    def aligned_onto_anchor(models: Sequence[nn.Module]) -> list[nn.Module]:
        # channels permuted onto the anchor's; target images drive the tracing and the function check
        images = target.train.tensors[0]
        return align_sources(
            [m.cpu() for m in models],
            anchor=out.anchor,
            example_input=images[:16],
            matching=recipe.alignment,
            data=[images],
        )

    aligned: list[nn.Module] = []
    if {"aligned_average_ft", "aligned_medmerge_ft"} & set(methods):
        aligned = aligned_onto_anchor(sources)
    for name, pool in (("average_ft", sources), ("aligned_average_ft", aligned)):
        if name in methods:
            torch.manual_seed(seed)
            merge = get_method("average").build(list(pool), head=HEAD, out_channels=k)
            recalibrate_norm(merge, train())
            finetuned(merge.collapse(), name)
    for name, granularity, pool in (
        ("layer_ft", "layer", sources),
        ("medmerge_ft", "kernel", sources),
        ("aligned_medmerge_ft", "kernel", aligned),
    ):
        plain_medmerge = name == "medmerge_ft" and "medmerge" in methods
        if name not in methods and not plain_medmerge:
            continue
        torch.manual_seed(seed)
        merge = new_merge(pool, k, recipe, granularity, out.anchor)
        desc = f"phase 1: coefficients ({METHOD_LABELS[name]})"
        plain, hist1 = learn_coefficients(merge, train(), val, **recipe.phase1(merge), progress=progress, desc=desc)
        if name == "medmerge_ft":
            recs["medmerge"] = record(plain, val, test, hist1)
            out.coefficients = coefficient_shares(merge)
            if name not in methods:
                continue
        desc = f"phase 2: fine-tune ({METHOD_LABELS[name]})"
        net, hist2 = fine_tune(plain, train(), val, **recipe.phase2(), progress=progress, desc=desc)
        recs[name] = record(net, val, test, hist2)
        out.models[name] = net
        recs[name]["curve_phase1"] = [v["macro_f1"] for v in hist1.val]
    if "aligned_ftmerge_ft" in methods:
        name = "aligned_ftmerge_ft"
        pool = aligned_onto_anchor([ft_nets["a"], ft_nets["b"]])
        torch.manual_seed(seed)
        merge = new_merge(pool, k, recipe, "kernel", out.anchor)
        desc = f"phase 1: coefficients ({METHOD_LABELS[name]})"
        plain, hist1 = learn_coefficients(merge, train(), val, **recipe.phase1(merge), progress=progress, desc=desc)
        desc = f"phase 2: fine-tune ({METHOD_LABELS[name]})"
        net, hist2 = fine_tune(plain, train(), val, **recipe.phase2(), progress=progress, desc=desc)
        recs[name] = record(net, val, test, hist2)
        recs[name]["curve_phase1"] = [v["macro_f1"] for v in hist1.val]
    if ft_nets:  # none of the methods asked for needs the fine-tuned pair (e.g. ``scratch`` or LP-FT rows alone)
        _run_paper_recipe(
            out,
            ft_nets,
            sources,
            aligned_onto_anchor,
            finetuned,
            target,
            train,
            val,
            test,
            recipe,
            seed,
            methods,
            progress,
        )
    if set(ON_LPFT_PAIR) & set(methods):
        _run_on_lpft_pair(out, lpft_nets, probed, target, (train, val, test), recipe, seed, methods, progress)
    for name, prefix, members in (("ensemble", "ft", ft_nets), ("ensemble_lpft", "lpft", lpft_nets)):
        if name not in methods:
            continue
        val_probs = np.mean([recs[f"{prefix}_{t}"]["_probs"][0] for t in tags], axis=0)
        test_probs = np.mean([recs[f"{prefix}_{t}"]["_probs"][1] for t in tags], axis=0)
        n = len(tags)
        recs[name] = {
            "val": classification_metrics(target.val.tensors[1].numpy(), val_probs),
            "test": classification_metrics(target.test.tensors[1].numpy(), test_probs),
            "inference_cost": f"{n} networks ({n}x parameters and compute of one)",
            "inference_macs": sum(inference_macs(m, target.val.tensors[0][:1]) for m in members.values()),
        }
    for name in [m for m in recs if m not in methods]:
        del recs[name]
    for rec in recs.values():
        rec.pop("_probs", None)
    return out


def _best_on_validation(records: dict, prefix: str, tags) -> int:
    """Index of the source whose ``<prefix>_<tag>`` row validated best: the first of the best on ties (A before B
    before C)."""
    return int(np.argmax([records[f"{prefix}_{t}"]["val"]["macro_f1"] for t in tags]))


def _merge_pair_then_fine_tune(
    out: SeedResult,
    name: str | None,
    pair,
    anchor: int,
    data,
    recipe: Recipe,
    seed: int,
    progress: bool,
    teacher=None,
    collapsed: str | None = None,
) -> None:
    """Phases 1 and 2 of the paper's recipe on networks that already have target heads (``pair``, merged heads
    included), anchored on ``anchor``: the record of method ``name`` (None: phase 1 only), and with ``collapsed`` the
    collapsed network after phase 1 recorded under that name. ``data`` is ``(train loader factory, val, test)``;
    ``teacher`` as in :func:`_phase2`."""
    train, val, test = data
    recs = out.records
    label = METHOD_LABELS[name or "paper_medmerge_ft"]
    torch.manual_seed(seed)
    merge = KernelMerge(pair, anchor=anchor, anchor_weight=recipe.anchor_weight)
    desc = f"phase 1: coefficients ({label})"
    plain, hist1 = learn_coefficients(merge, train(), val, **recipe.phase1(merge), progress=progress, desc=desc)
    if not out.coefficients and anchor == out.anchor:
        # the first seed's coefficients picture shows the first merge anchored where the record says
        out.coefficients = coefficient_shares(merge)
    if collapsed:
        recs[collapsed] = record(plain, val, test, hist1)
    if name is None:
        return
    net, hist2 = _phase2(plain, train(), val, recipe, teacher, seed, f"phase 2: fine-tune ({label})", progress)
    recs[name] = record(net, val, test, hist2)
    recs[name]["curve_phase1"] = [v["macro_f1"] for v in hist1.val]
    out.models[name] = net


def _run_on_lpft_pair(out: SeedResult, lpft_nets, probed, target, data, recipe, seed, methods, progress) -> None:
    """The methods on the LP-FT networks (a head-first phase 0), anchored on the one that validates best: the paper's
    recipe over them (``paper_lpft_medmerge_ft``; ``..._distill`` with phase 2 distilled from their ensemble), and
    its controls without a merge, which start from the anchor's probed network (its head trained, its body not yet
    fine-tuned): ``lpft_distill`` (the same distillation) and ``lpft_steps`` (the same steps, no teacher)."""
    recs = out.records
    tags = list(lpft_nets)
    anchor = _best_on_validation(recs, "lpft", tags)
    pair = [lpft_nets[t] for t in tags]
    teacher = (pair, recipe.distill_weight, distill_images(target, recipe))
    for name in ("paper_lpft_medmerge_ft", "paper_lpft_medmerge_distill"):
        if name in methods:
            student_teacher = teacher if name.endswith("distill") else None
            _merge_pair_then_fine_tune(out, name, pair, anchor, data, recipe, seed, progress, teacher=student_teacher)
    train, val, test = data
    start = lambda: copy.deepcopy(probed[tags[anchor]])  # noqa: E731
    _distillation_controls(out, ("lpft_distill", "lpft_steps"), start, teacher, data, recipe, seed, methods, progress)


def _distillation_controls(out: SeedResult, names, start, teacher, data, recipe, seed, methods, progress) -> None:
    """The controls of a distilled merge without the merge, each from ``start()`` (called after seeding): ``names[0]``
    distilled from ``teacher`` as the merge is, ``names[1]`` fine-tuned for as many steps with no teacher."""
    train, val, test = data
    for name in names:
        if name not in methods:
            continue
        torch.manual_seed(seed)
        net = start()
        if name == names[0]:
            net, hist = _phase2(net, train(), val, recipe, teacher, seed, METHOD_LABELS[name], progress)
        else:
            steps = with_steps(train(), recipe.distill_steps, seed)
            net, hist = fine_tune(net, steps, val, **recipe.phase2(), progress=progress, desc=METHOD_LABELS[name])
        out.records[name] = record(net, val, test, hist)


def _run_paper_recipe(
    out: SeedResult,
    ft_nets,
    sources,
    aligned_onto_anchor,
    finetuned,
    target,
    train,
    val,
    test,
    recipe,
    seed,
    methods,
    progress,
) -> None:
    """The methods on the fine-tuned pair (phase 0 = ``ft_a``/``ft_b``): the paper's recipe and its baselines, and
    the distillation rows. Their heads are already target heads, so they are merged like every other layer."""
    recs = out.records
    pair = [ft_nets[t] for t in SOURCE_TAGS if t in ft_nets]
    if "paper_aligned_average_ft" in methods:
        aligned_pair = aligned_onto_anchor(pair)
    for name in ("paper_average_ft", "paper_aligned_average_ft"):
        soup = name == "paper_average_ft" and "paper_average" in methods
        if name in methods or soup:
            torch.manual_seed(seed)
            pool = aligned_pair if name == "paper_aligned_average_ft" else pair
            merge = get_method("average").build(list(pool))
            recalibrate_norm(merge, train())
            plain = merge.collapse()
            if soup:
                recs["paper_average"] = record(plain, val, test)
            if name in methods:
                finetuned(plain, name)
    teacher = (pair, recipe.distill_weight, distill_images(target, recipe))
    for name in ("paper_medmerge_ft", "paper_medmerge_distill"):
        collapsed = name == "paper_medmerge_ft" and "paper_medmerge" in methods
        if name in methods or collapsed:
            _merge_pair_then_fine_tune(
                out,
                name if name in methods else None,
                pair,
                out.anchor,
                (train, val, test),
                recipe,
                seed,
                progress,
                teacher=teacher if name.endswith("distill") else None,
                collapsed="paper_medmerge" if collapsed else None,
            )
    if "ft_longer" in methods:
        torch.manual_seed(seed)
        finetuned(copy.deepcopy(pair[out.anchor]), "ft_longer")
    if {"paper_zip", "paper_zip_ft"} & set(methods):
        _run_zip(out, pair, train, val, test, recipe, seed, methods, progress)
    # the controls start from the anchor source with a fresh target head, as fine-tuning from it does
    num_classes = pair[out.anchor].get_submodule(HEAD).out_features
    start = lambda: from_source(sources[out.anchor], num_classes, recipe)  # noqa: E731
    _distillation_controls(
        out, ("ft_distill", "ft_steps"), start, teacher, (train, val, test), recipe, seed, methods, progress
    )


def _run_zip(out: SeedResult, pair, train, val, test, recipe: Recipe, seed: int, methods, progress: bool) -> None:
    """``paper_zip`` and ``paper_zip_ft``: the fine-tuned pair zipped into a network ``recipe.zip_width`` times as
    wide, on the target's training images (norm statistics recomputed on them), as it is and fine-tuned. Each record
    holds the widths and the inference cost (MACs per image) of the zipped network, of one source and of the pair."""
    torch.manual_seed(seed)
    pair = [m.cpu() for m in pair]  # zipped on the CPU, where the target's images are
    wide = dataclasses.replace(recipe, widths=recipe.zip_widths())
    num_classes = pair[0].get_submodule(HEAD).out_features
    report: dict = {}
    zipped = zip_networks(pair, build_network(num_classes, wide), data=train(), report=report)
    image = next(iter(val))[0][:1]
    one = inference_macs(pair[0], image)
    details = {
        "zip_width": recipe.zip_width,
        "widths": list(wide.widths),
        "merged_features": sum(g["merges"] for g in report["groups"].values()),
        "inference_macs": inference_macs(zipped, image),
        "inference_macs_1x": one,
        "inference_macs_ensemble": one * len(pair),
    }
    if "paper_zip" in methods:
        out.records["paper_zip"] = record(zipped, val, test) | details
    if "paper_zip_ft" in methods:
        name = "paper_zip_ft"
        desc = f"phase 2: fine-tune ({METHOD_LABELS[name]})"
        net, hist = _phase2(zipped, train(), val, recipe, None, seed, desc, progress)
        out.records[name] = record(net, val, test, hist) | details
        out.models[name] = net


def distill_images(target, recipe: Recipe) -> torch.Tensor | None:
    """The unlabelled images the ``*_distill`` rows distil on (None: mixup of the labelled batch)."""
    n = recipe.distill_unlabeled
    if not n:
        return None
    pool = getattr(target, "unlabeled", None)
    if pool is None or len(pool) < n:
        have = "none" if pool is None else len(pool)
        raise ValueError(
            f"distill_unlabeled={n} needs that many unlabelled images of task {getattr(target, 'name', 'target')!r}; "
            f"it has {have}."
        )
    return pool[:n]


def with_steps(train: DataLoader, steps: int, seed: int) -> DataLoader:
    """``train`` as ``steps`` batches per epoch, its dataset reshuffled as often as that takes (``steps`` 0:
    ``train`` itself)."""
    if not steps:
        return train
    g = torch.Generator().manual_seed(seed)
    sampler = RandomSampler(train.dataset, num_samples=steps * train.batch_size, generator=g)
    return DataLoader(train.dataset, batch_size=train.batch_size, sampler=sampler)


def _phase2(net, train, val, recipe: Recipe, teacher, seed: int, desc: str, progress: bool):
    """Fine-tuning with the recipe's budget; with ``teacher = (networks, weight, unlabelled images or None)``
    distilled from their ensemble."""
    if teacher is None:
        return fine_tune(net, train, val, **recipe.phase2(), progress=progress, desc=desc)
    train = with_steps(train, recipe.distill_steps, seed)
    # the product's distillation (the training bundle's distill_weight); the steps stay the benchmark's sampler
    # the teachers on the student's device (the glue may have moved them to the CPU, e.g. to zip or align them)
    teachers = [t.to(recipe.device) for t in teacher[0]]
    distillation = EnsembleDistillation(teachers, teacher[1], teacher[2], seed=seed)
    return fine_tune(
        net,
        train,
        val,
        **recipe.phase2(),
        progress=progress,
        desc=desc,
        loss_function=distillation.loss,
        prepare_batch=distillation.prepare_batch,
    )


def new_merge(
    sources: Sequence[nn.Module],
    num_classes: int,
    recipe: Recipe,
    granularity: str = "kernel",
    anchor: int | None = None,
) -> KernelMerge:
    """The phase-1 network of the comparison: a :class:`KernelMerge` of ``sources`` with a fresh ``num_classes``
    head, anchored on ``anchor`` with the recipe's starting share."""
    return KernelMerge(
        list(sources),
        head=HEAD,
        out_channels=num_classes,
        granularity=granularity,
        anchor=anchor,
        anchor_weight=recipe.anchor_weight if anchor is not None else None,
    )


def coefficient_shares(merge: KernelMerge) -> dict[str, list[float]]:
    """Each merged unit's mean share per source (one number per source, summing to 1): what the coefficients picture
    draws."""
    return {u: a.mean(1).tolist() for u, a in merge.coefficients().items()}


def coefficient_penalty(merge: KernelMerge, weight: float):
    """A phase-1 loss (the engine's ``loss_function``): cross-entropy plus ``weight`` times the mean squared distance
    of the merge logits from where they start, which keeps the coefficients near the anchor's share."""
    if weight < 0:
        raise ValueError(f"the coefficient penalty must be >= 0, got {weight}.")
    start = merge.merge_logits.detach().clone()
    cross_entropy = nn.CrossEntropyLoss()

    def loss(pred: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return cross_entropy(pred, label) + weight * (merge.merge_logits - start.to(pred.device)).pow(2).mean()

    return loss


def head_only(net: nn.Module, head: str) -> nn.Module:
    """Freeze every parameter of ``net`` except those of its module ``head``, which is returned (the segmentation
    benchmark's ``ft_head_first``, which trains the head with the body in training mode, as phase 1 does)."""
    module = net.get_submodule(head)
    for p in net.parameters():
        p.requires_grad_(False)
    for p in module.parameters():
        p.requires_grad_(True)
    return module


def summarize(
    results: Sequence[SeedResult], metrics: Sequence[str] = ("macro_f1", "accuracy", "balanced_accuracy", "auroc")
) -> dict:
    """Mean and standard deviation per method and metric, and MedMerge + FT paired against the best single source.

    The best single-source fine-tuning is the one of ``ft_a``/``ft_b`` (/``ft_c``) with the highest mean VALIDATION
    macro-F1.
    The paired comparison gives per-seed test macro-F1 differences, their mean, a paired t-test and (with at least
    5 seeds) a Wilcoxon signed-rank test.
    """
    methods = [m for m in COMPARISON_METHODS if all(m in r.records for r in results)]
    table = {}
    for m in methods:
        table[m] = {}
        for split in ("val", "test"):
            for metric in metrics:
                vals = np.array([r.records[m][split][metric] for r in results], dtype=float)
                table[m][f"{split}_{metric}"] = {
                    "mean": float(np.nanmean(vals)),
                    "std": float(np.nanstd(vals, ddof=1)) if len(vals) > 1 else 0.0,
                    "values": vals.tolist(),
                }
    summary = {"methods": table, "seeds": [r.seed for r in results]}
    if {"ft_a", "ft_b"} <= set(methods):
        singles = [m for m in SINGLE_SOURCE if m in methods]
        best = max(singles, key=lambda m: table[m]["val_macro_f1"]["mean"])
        summary["best_single_source"] = best
        for name in ("medmerge_ft", "aligned_medmerge_ft", "aligned_ftmerge_ft"):
            if name in methods:
                key = f"{name}_vs_best_single_source"
                summary[key] = _paired(table, name, best) | {"chosen_on": "mean validation macro-F1"}
        summary.update(room_summary(table, methods, best))
        lpft = "lp" + best  # LP-FT of the better source: the direct recipe's head-first schedule without a merge
        if {"medmerge_ft", lpft} <= set(methods):
            summary["medmerge_ft_vs_lpft"] = _paired(table, "medmerge_ft", lpft)
    if "ensemble_lpft" in methods:
        # the room left once every network is fine-tuned head first: against the better LP-FT row on validation
        best_lpft = max((m for m in SINGLE_SOURCE_LPFT if m in methods), key=lambda m: table[m]["val_macro_f1"]["mean"])
        summary["best_single_source_head_first"] = best_lpft
        summary["room_head_first"] = _paired(table, "ensemble_lpft", best_lpft)
        for name in MEDMERGE_RECIPES:
            if name in methods:
                summary.setdefault("vs_best_head_first", {})[name] = _paired(table, name, best_lpft)
    for name in ("paper_lpft_medmerge_distill", "lpft_distill"):
        if {name, "lpft_steps"} <= set(methods):
            # a distilled phase 2 trains distill_steps per epoch: against a head-first fine-tuning of as many steps
            summary[f"{name}_vs_lpft_steps"] = _paired(table, name, "lpft_steps")
    if {"paper_medmerge_ft", "ft_longer"} <= set(methods):
        # the paper's recipe against the same two fine-tunings without a merge
        summary["paper_medmerge_ft_vs_ft_longer"] = _paired(table, "paper_medmerge_ft", "ft_longer")
    for name, baseline in (("aligned_medmerge_ft", "medmerge_ft"), ("aligned_average_ft", "average_ft")):
        if {name, baseline} <= set(methods):
            summary[f"{name}_vs_{baseline}"] = _paired(table, name, baseline)
    return summary


def room_summary(table: dict, methods: Sequence[str], best: str) -> dict:
    """Every one-network method paired against the best single source ``best``; with the ensemble, the room (the
    ensemble's paired lead over ``best``) and each method's share of it; the MedMerge recipe chosen on validation.

    The share is the method's mean paired gain divided by the mean room (:func:`share_of_room`); it is left out
    (None) where the room is under ``SHARE_MIN_ROOM``, since there is then nothing for a merge to take.
    """
    out: dict = {"vs_best_single_source": {}}
    for name in methods:
        if name not in (*SINGLE_SOURCE, *ENSEMBLES):
            out["vs_best_single_source"][name] = _paired(table, name, best)
    room = None
    if "ensemble" in methods:
        room = _paired(table, "ensemble", best)
        out["room"] = room
        for paired in out["vs_best_single_source"].values():
            gain = paired["mean_difference"]
            paired["share_of_room"] = share_of_room(gain, room["mean_difference"])
    recipes = [m for m in MEDMERGE_RECIPES if m in methods]
    if recipes:
        chosen = max(recipes, key=lambda m: table[m]["val_macro_f1"]["mean"])
        out["chosen_medmerge"] = {"chosen_on": "mean validation macro-F1 among " + ", ".join(recipes)}
        out["chosen_medmerge"] |= out["vs_best_single_source"][chosen]
    return out


# The smallest room a share is taken of (one metric point): a method's gain over a room near zero is no share of it
# (+2.5 over a +0.1 room would read 2,500 %).
SHARE_MIN_ROOM = 0.01


def share_of_room(gain: float, room: float) -> float | None:
    """``gain`` as a share of ``room`` (both mean paired differences, in the metric's units), or None where the room
    is under :data:`SHARE_MIN_ROOM`."""
    return gain / room if room >= SHARE_MIN_ROOM else None


def _paired(table: dict, name: str, baseline: str) -> dict:
    """Per-seed test macro-F1 differences ``name - baseline``, their mean, a paired t-test and a Wilcoxon test."""
    a = np.array(table[name]["test_macro_f1"]["values"])
    b = np.array(table[baseline]["test_macro_f1"]["values"])
    diffs = a - b
    paired = {
        "method": name,
        "baseline": baseline,
        "differences": diffs.tolist(),
        "mean_difference": float(diffs.mean()),
    }
    if len(diffs) > 1:
        from scipy import stats

        paired["t_test_p"] = float(stats.ttest_rel(a, b).pvalue)
        if len(diffs) >= 5 and np.any(diffs != 0):
            paired["wilcoxon_p"] = float(stats.wilcoxon(diffs).pvalue)
    return paired

"""The brain MRI segmentation benchmark: axial 2-D slices of two brain templates on one 2 mm MNI grid, labelled per
pixel.

- Source A, tissue: the MNI152 2009a symmetric T1 (nilearn) -> background, grey matter, white matter, CSF.
- Source B, lobes: the Colin27 T1 (MRIcron) -> background and six groups of the AAL atlas drawn on that brain; the
  deep grey nuclei, the hippocampus and the amygdala are left as background.
- Target, subcortical structures: the MNI152 T1 -> background, thalamus, caudate, putamen, pallidum, hippocampus,
  amygdala (AAL's, left and right merged, carried from Colin27 onto MNI152 by the affine alone).

The target's structures are exactly what source B was taught to call background, and source A knows only tissue, so
neither source was trained on them. Source A and the target show the same brain: the target's validation and test
slices, with a gap slice on each side, lie in slabs along z that no training slice of either task comes from (see
:data:`TARGET_PATTERN`). The volumes come from :mod:`medmerge_bench.data.brain`'s loaders and are cached beside the
brain task's (``cache_dir()``), keyed by :data:`SEGMENTATION_DATA_VERSION`; see ``docs/data.md``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from medmerge_bench.data import brain
from medmerge_bench.data.fashion import CLASS_NAMES as FASHION_CLASSES
from medmerge_bench.data.tasks import cache_dir, report_progress
from monai_medmerge.io import write_json

__all__ = [
    "ANCESTOR_CLASSES",
    "ANCESTOR_SCENES",
    "GRID_AFFINE",
    "GRID_SHAPE",
    "LOBE_CLASSES",
    "LOBE_GROUPS",
    "SEGMENTATION_DATA_VERSION",
    "SOURCE_PATTERN",
    "STRUCTURE_CLASSES",
    "SegmentationLayout",
    "SegmentationTask",
    "SegmentationTasks",
    "SliceSet",
    "TARGET_PATTERN",
    "TISSUE_CLASSES",
    "format_voxel_counts",
    "load_segmentation_ancestor_task",
    "load_segmentation_tasks",
    "segmentation_layout",
    "segmentation_volumes",
    "slice_affine",
    "target_train_slices",
    "voxel_counts",
    "write_segmentation_datalist",
]

# Bump when anything that shapes the cached volumes or the splits changes; old cache files are then not read.
SEGMENTATION_DATA_VERSION = "segmentation-v1"
# The files of the MRIcron package this benchmark reads (nilearn ships the MNI152 images).
FILES = ("ch2bet.nii.gz", "aal.nii.gz", "aal.nii.txt")

# The grid: 2 mm on MNI coordinates that are even millimetres, as on the 2 mm atlases, so that no voxel centre falls
# halfway between two atlas voxels; slices are 96 x 112 pixels (192 x 224 mm, multiples of 16 for a U-Net), with
# x from -96 to 94 mm, y from -128 to 94 mm and z from -76 to 90 mm.
SPACING = 2.0
GRID_SHAPE = (96, 112, 84)
GRID_ORIGIN = (-96.0, -128.0, -76.0)
GRID_AFFINE = np.array(
    [
        [SPACING, 0.0, 0.0, GRID_ORIGIN[0]],
        [0.0, SPACING, 0.0, GRID_ORIGIN[1]],
        [0.0, 0.0, SPACING, GRID_ORIGIN[2]],
        [0.0, 0.0, 0.0, 1.0],
    ]
)

TISSUE_CLASSES = ("background", "grey matter", "white matter", "CSF")
# The target's structures by their AAL region name (without _L/_R): left and right are one class.
STRUCTURES = {
    "thalamus": "Thalamus",
    "caudate": "Caudate",
    "putamen": "Putamen",
    "pallidum": "Pallidum",
    "hippocampus": "Hippocampus",
    "amygdala": "Amygdala",
}
STRUCTURE_CLASSES = ("background", *STRUCTURES)
# Source B's groups: the brain task's AAL macro-regions without the target's structures (deep grey, hippocampus and
# amygdala), which become background.
LOBE_GROUPS: dict[str, tuple[str, ...]] = {
    group: tuple(prefix for prefix in prefixes if prefix not in STRUCTURES.values())
    for group, prefixes in brain.AAL_GROUPS.items()
    if group != "deep grey"
}
LOBE_CLASSES = ("background", *LOBE_GROUPS)

# A slice shows a target structure when it holds at least this many of its pixels (16 mm^2).
MIN_STRUCTURE_PIXELS = 4
# A source slice is used when at least this fraction of its pixels is labelled (not background).
SOURCE_MIN_FOREGROUND = 0.02
# Roles of consecutive axial slices, repeated along z. Target: among the slices that show a structure, two training
# slices, a gap, then validation, test, test, validation, a gap; so a validation or test slice is never next to a
# training one, and a quarter of the slices each go to training (the pool k is drawn from), validation and test. Its
# phase along z is chosen from the data (see _target_phase). Sources: validation, gap, eight training, gap.
TARGET_PATTERN = ("train", "train", "gap", "val", "test", "test", "val", "gap")
SOURCE_PATTERN = ("val", "gap", *("train",) * 8, "gap")
# Slices between a held-out target slice and the nearest training slice, as TARGET_PATTERN places them; source A
# (same brain) keeps this distance from the target's held-out slices too.
GAP = 1

SPLIT_RULE = (
    "Axial slices of one 2 mm MNI grid (96 x 112 pixels). Target: the slices showing at least "
    f"{MIN_STRUCTURE_PIXELS} pixels of a structure take the roles {', '.join(TARGET_PATTERN)} in turn along z (the "
    "phase chosen once from the data so that every structure has training, validation and test slices), so a "
    f"validation or test slice is at least {GAP + 1} slices ({(GAP + 1) * SPACING:.0f} mm) from any training slice; "
    "the k-shot training slices are drawn from the training slabs. Source A (same brain): its slices with at least "
    f"{SOURCE_MIN_FOREGROUND:.0%} labelled pixels, except the target's validation and test slices and the "
    f"{GAP} slice(s) on each side of them, take the roles {', '.join(SOURCE_PATTERN)} along z. Source B (Colin27): "
    "the same source rule on its own slices."
)
NOTES = (
    "Dense 2-D segmentation on axial slices of two T1 templates resampled onto one 2 mm MNI grid; intensities are the "
    "templates' own (MNI152 from nilearn in [0, 1], Colin27 from MRIcron in [0, 255]): normalise in the pipeline. "
    "Source A labels the MNI152 2009a symmetric T1 by nilearn's tissue probabilities: inside nilearn's brain mask the "
    "most probable of grey matter, white matter and CSF (1 - GM - WM), background outside. Source B labels the Colin27 "
    "T1 by the AAL atlas drawn on that brain, grouped by region name into frontal, limbic/insula (cingulate, insula, "
    "parahippocampal, olfactory), occipital, parietal, temporal and cerebellum; the deep grey nuclei, the hippocampus "
    "and the amygdala are background. The target labels the MNI152 T1 by AAL's thalamus, caudate, putamen, "
    "pallidum, hippocampus and amygdala (left and right merged), drawn on Colin27 and carried onto MNI152 by the "
    "affine alone, so boundaries are off by millimetres; structure voxels that nilearn's maps call CSF (mostly the "
    "lateral ventricles beside the caudate and thalamus) are set to background. The atlases are label maps "
    "registered to templates, not manual segmentations of these images, and there are only two brains: the target's "
    "held-out slices are unseen places of the same brain, not new subjects."
)


def slice_affine(z: int, affine: np.ndarray = GRID_AFFINE) -> np.ndarray:
    """The voxel-to-world affine of axial slice ``z`` of the grid ``affine``: its in-plane axes and its position."""
    out = np.array(affine, dtype=np.float64)
    out[:3, 3] = out[:3, 3] + out[:3, 2] * z
    return out


def _aal_luts(names_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """AAL value -> lobe class (source B) and -> structure class (target), 0 for background."""
    lobes = np.zeros(256, dtype=np.uint8)
    structures = np.zeros(256, dtype=np.uint8)
    seen = set()
    for value, name in brain.read_label_names(names_file).items():
        region = name.removesuffix("_L").removesuffix("_R")
        if region in STRUCTURES.values():
            structures[value] = STRUCTURE_CLASSES.index(next(c for c, r in STRUCTURES.items() if r == region))
            seen.add(region)
            continue
        groups = [g for g, prefixes in LOBE_GROUPS.items() if name.startswith(prefixes)]
        if len(groups) != 1:
            raise RuntimeError(f"AAL region {name!r} of {names_file} matches {len(groups)} lobe groups, not one.")
        lobes[value] = LOBE_CLASSES.index(groups[0])
    missing = sorted(set(STRUCTURES.values()) - seen)
    if missing:
        raise RuntimeError(f"{names_file} has no region named {', '.join(missing)}.")
    return lobes, structures


def _build_volumes(paths: list[Path]) -> dict[str, np.ndarray]:
    nib = brain.require_module("nibabel")
    colin_file, aal_file, names_file = paths

    def on_grid(img: Any, order: int) -> np.ndarray:
        return brain.resample_to_grid(img, GRID_AFFINE, GRID_SHAPE, order)

    mni = on_grid(brain.load_mni152("t1"), 1)
    gm = on_grid(brain.load_mni152("gm"), 1)
    wm = on_grid(brain.load_mni152("wm"), 1)
    mask = on_grid(brain.load_mni152("brain_mask"), 0) > 0
    tissue = (np.stack([gm, wm, np.clip(1.0 - gm - wm, 0.0, 1.0)]).argmax(0) + 1).astype(np.uint8)
    tissue[~mask] = 0
    colin = on_grid(nib.load(colin_file), 1)
    aal = on_grid(nib.load(aal_file), 0).astype(np.uint8)
    lobe_lut, structure_lut = _aal_luts(names_file)
    lobes = lobe_lut[aal]
    lobes[colin <= 0] = 0
    structures = structure_lut[aal]
    structures[~mask | (tissue == TISSUE_CLASSES.index("CSF"))] = 0
    return {
        "mni_t1": mni.astype(np.float32),
        "colin_t1": colin.astype(np.float32),
        "tissue": tissue,
        "lobes": lobes,
        "structures": structures,
    }


# What this process has built, by (what, data folder, cache folder).
_MEMO: dict[tuple[str, Path, Path], Any] = {}


def segmentation_volumes(progress: bool = False) -> dict[str, np.ndarray]:
    """The benchmark's volumes on the 2 mm grid (``GRID_AFFINE``, ``GRID_SHAPE``), built once per machine.

    Args:
        progress: print what is read or built to stderr.

    Returns:
        ``"mni_t1"`` and ``"colin_t1"`` (float32, the templates' own intensities), ``"tissue"`` (uint8 index into
        ``TISSUE_CLASSES``, on MNI152), ``"lobes"`` (into ``LOBE_CLASSES``, on Colin27) and ``"structures"`` (into
        ``STRUCTURE_CLASSES``, on MNI152). The arrays are shared: do not change them.

    Raises:
        FileNotFoundError: when an MRIcron file is missing (install ``mricron-data``).
        RuntimeError: when nilearn, nibabel or scipy is missing.
    """
    paths = brain.mricron_files(FILES)  # checked on every call, so no cache hides missing data
    key = ("volumes", brain.MRICRON_DIR, cache_dir())
    if key not in _MEMO:
        nilearn = brain.require_module("nilearn")
        stamp = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
        settings = [nilearn.__version__, stamp, GRID_AFFINE.tolist(), GRID_SHAPE, STRUCTURE_CLASSES, LOBE_GROUPS]
        _MEMO[key] = brain.cached_arrays(
            SEGMENTATION_DATA_VERSION, settings, lambda: _build_volumes(paths), progress, "segmentation volumes"
        )
    return _MEMO[key]


@dataclass(frozen=True)
class SegmentationLayout:
    """Which axial slices (indices along z of the grid) each split takes; the same for every seed and ``k``.

    Args:
        target_pool: the target's training slabs, the slices the ``k``-shot training slices are drawn from.
        target_val: the target's validation slices.
        target_test: the target's test slices.
        source_a_train: source A's training slices (MNI152, tissue).
        source_a_val: source A's validation slices.
        source_b_train: source B's training slices (Colin27, lobes).
        source_b_val: source B's validation slices.
        target_phase: the shift of ``TARGET_PATTERN`` along z: slice ``z`` of the target has role
            ``TARGET_PATTERN[(z + target_phase) % len(TARGET_PATTERN)]``.
        structure_slices: bool ``(GRID_SHAPE[2], len(STRUCTURE_CLASSES))``: whether slice ``z`` shows class ``c``
            (at least ``MIN_STRUCTURE_PIXELS`` pixels; column 0, background, is never set).
    """

    target_pool: np.ndarray
    target_val: np.ndarray
    target_test: np.ndarray
    source_a_train: np.ndarray
    source_a_val: np.ndarray
    source_b_train: np.ndarray
    source_b_val: np.ndarray
    target_phase: int
    structure_slices: np.ndarray


def _roles(slices: np.ndarray, pattern: tuple[str, ...], phase: int = 0) -> dict[str, np.ndarray]:
    roles = np.array([pattern[(z + phase) % len(pattern)] for z in slices.tolist()], dtype=object)
    return {role: slices[roles == role] for role in set(pattern)}


def _target_phase(zone: np.ndarray, shows: np.ndarray, structures: np.ndarray) -> int:
    """The phase of ``TARGET_PATTERN`` whose scarcest (structure, split) has the most slices that show it, then the
    most pixels (the first such phase on a tie); the splits are the training pool, validation and test."""
    best, best_score = 0, None
    for phase in range(len(TARGET_PATTERN)):
        roles = [_roles(zone, TARGET_PATTERN, phase)[r] for r in ("train", "val", "test")]
        slices = min(int(shows[z][:, 1:].sum(0).min()) for z in roles)
        pixels = min(int(np.bincount(structures[:, :, z].ravel(), minlength=shows.shape[1])[1:].min()) for z in roles)
        if best_score is None or (slices, pixels) > best_score:
            best, best_score = phase, (slices, pixels)
    return best


def _source_slices(labels: np.ndarray, excluded: np.ndarray) -> dict[str, np.ndarray]:
    foreground = (labels > 0).mean(axis=(0, 1))
    usable = np.flatnonzero((foreground >= SOURCE_MIN_FOREGROUND) & ~excluded)
    return _roles(usable, SOURCE_PATTERN)


def _build_layout(volumes: Mapping[str, np.ndarray]) -> SegmentationLayout:
    structures = volumes["structures"]
    n_classes = len(STRUCTURE_CLASSES)
    counts = np.stack([np.bincount(structures[:, :, z].ravel(), minlength=n_classes) for z in range(GRID_SHAPE[2])])
    shows = counts >= MIN_STRUCTURE_PIXELS
    shows[:, 0] = False
    zone = np.flatnonzero(shows.any(1))
    phase = _target_phase(zone, shows, structures)
    target = _roles(zone, TARGET_PATTERN, phase)
    held = np.zeros(GRID_SHAPE[2], dtype=bool)
    held[np.concatenate([target["val"], target["test"]])] = True
    # the held-out slices widened by GAP on each side: source A, on the same brain, never sees them
    excluded = np.convolve(held, np.ones(2 * GAP + 1), mode="same") > 0
    a = _source_slices(volumes["tissue"], excluded)
    b = _source_slices(volumes["lobes"], np.zeros(GRID_SHAPE[2], dtype=bool))
    return SegmentationLayout(
        target_pool=target["train"],
        target_val=target["val"],
        target_test=target["test"],
        source_a_train=a["train"],
        source_a_val=a["val"],
        source_b_train=b["train"],
        source_b_val=b["val"],
        target_phase=phase,
        structure_slices=shows,
    )


def segmentation_layout(progress: bool = False) -> SegmentationLayout:
    """The fixed slice splits of the segmentation benchmark (see ``SPLIT_RULE``), built once per process.

    Raises:
        FileNotFoundError: when an MRIcron file is missing (install ``mricron-data``).
        RuntimeError: when nilearn, nibabel or scipy is missing.
    """
    volumes = segmentation_volumes(progress)
    key = ("layout", brain.MRICRON_DIR, cache_dir())
    if key not in _MEMO:
        _MEMO[key] = _build_layout(volumes)
    return _MEMO[key]


def target_train_slices(layout: SegmentationLayout, k: int, seed: int) -> np.ndarray:
    """The target's training slices for ``k`` and ``seed``: sorted z indices from ``layout.target_pool``.

    For each structure, ``k`` slices that show it are drawn (a permutation per structure, made from ``seed`` alone,
    and its first ``k``); the result is their union, so it holds at least ``k`` slices showing each structure and at
    most ``k`` times the number of structures, and with one seed it is nested in ``k``.

    Args:
        layout: the fixed splits, from :func:`segmentation_layout`.
        k: labelled slices per structure.
        seed: seed of the draw.

    Raises:
        ValueError: when ``k`` < 1 or more than the training slabs' slices that show a structure.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    rng = np.random.default_rng(seed)
    pool = layout.target_pool
    chosen: set[int] = set()
    for c, name in enumerate(STRUCTURE_CLASSES[1:], start=1):
        showing = pool[layout.structure_slices[pool, c]]
        if len(showing) < k:
            raise ValueError(f"{name} shows in {len(showing)} slices of the target's training slabs, fewer than k={k}.")
        chosen.update(rng.permutation(showing)[:k].tolist())
    return np.array(sorted(chosen), dtype=np.int64)


@dataclass(frozen=True)
class SliceSet:
    """Axial slices of one split: images, label maps and where they lie.

    Args:
        images: float32 ``(n, 1, 96, 112)``, axes x then y of the grid.
        labels: int64 ``(n, 1, 96, 112)``, class indices, 0 for background.
        slices: int64 ``(n,)``, the index of each slice along z of the grid (see :func:`slice_affine`).
    """

    images: np.ndarray
    labels: np.ndarray
    slices: np.ndarray

    def __len__(self) -> int:
        return len(self.slices)

    def dataset(self) -> TensorDataset:
        """A :class:`TensorDataset` of ``(image, label)`` tensors, copies of the arrays."""
        return TensorDataset(torch.tensor(self.images), torch.tensor(self.labels))


@dataclass(frozen=True)
class SegmentationTask:
    """One segmentation task.

    Args:
        name: e.g. ``"brain-seg/tissue"``.
        class_names: label ``i`` is ``class_names[i]``; ``class_names[0]`` is ``"background"``.
        train: the training slices.
        val: the validation slices.
        test: the test slices, or None for a source task.
    """

    name: str
    class_names: tuple[str, ...]
    train: SliceSet
    val: SliceSet
    test: SliceSet | None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def splits(self) -> dict[str, SliceSet]:
        """The splits that exist, by name (``"train"``, ``"val"``, ``"test"``)."""
        found = {"train": self.train, "val": self.val, "test": self.test}
        return {name: split for name, split in found.items() if split is not None}


@dataclass(frozen=True)
class SegmentationTasks:
    """The segmentation benchmark: two sources to pretrain on and a few-shot target, on one grid.

    Args:
        source_a: tissue on MNI152.
        source_b: AAL lobes on Colin27.
        target: subcortical structures on MNI152, ``k`` slices per structure for training.
        k: the target's labelled slices per structure.
        seed: the seed of the target's training draw.
        affine: the grid's affine; slice ``z`` lies at :func:`slice_affine` ``(z)``.
        split_rule: how the slices are split.
        notes: what the labels are and where they fall short.
    """

    source_a: SegmentationTask
    source_b: SegmentationTask
    target: SegmentationTask
    k: int
    seed: int
    affine: np.ndarray
    split_rule: str
    notes: str


def _slice_set(image: np.ndarray, labels: np.ndarray, slices: np.ndarray) -> SliceSet:
    slices = np.asarray(slices, dtype=np.int64)
    # (x, y, n) -> (n, 1, x, y); fresh arrays, so the cached volumes are never shared
    x = np.ascontiguousarray(np.moveaxis(image[:, :, slices], -1, 0)[:, None], dtype=np.float32)
    y = np.ascontiguousarray(np.moveaxis(labels[:, :, slices], -1, 0)[:, None], dtype=np.int64)
    return SliceSet(x, y, slices)


def load_segmentation_tasks(k: int, seed: int, progress: bool = True) -> SegmentationTasks:
    """The segmentation benchmark: tissue and lobe sources, and a target of six subcortical structures.

    Args:
        k: the target's labelled training slices per structure (the union of the draws: between ``k`` and ``6 k``
            slices).
        seed: seed of the target's training draw; nothing else depends on it (nor on ``k``).
        progress: print what is read or built to stderr.

    Returns:
        A :class:`SegmentationTasks`; every split holds float32 images and int64 label maps of shape
        ``(n, 1, 96, 112)``.

    Raises:
        ValueError: when ``k`` < 1 or exceeds what the training slabs hold for a structure.
        FileNotFoundError: when an MRIcron file is missing (install ``mricron-data``).
        RuntimeError: when nilearn, nibabel or scipy is missing.
    """
    volumes = segmentation_volumes(progress)
    layout = segmentation_layout(progress)
    train = target_train_slices(layout, k, seed)
    mni, colin = volumes["mni_t1"], volumes["colin_t1"]
    tissue, lobes, structures = volumes["tissue"], volumes["lobes"], volumes["structures"]
    tasks = SegmentationTasks(
        source_a=SegmentationTask(
            "brain-seg/tissue",
            TISSUE_CLASSES,
            _slice_set(mni, tissue, layout.source_a_train),
            _slice_set(mni, tissue, layout.source_a_val),
            None,
        ),
        source_b=SegmentationTask(
            "brain-seg/lobes",
            LOBE_CLASSES,
            _slice_set(colin, lobes, layout.source_b_train),
            _slice_set(colin, lobes, layout.source_b_val),
            None,
        ),
        target=SegmentationTask(
            "brain-seg/subcortical",
            STRUCTURE_CLASSES,
            _slice_set(mni, structures, train),
            _slice_set(mni, structures, layout.target_val),
            _slice_set(mni, structures, layout.target_test),
        ),
        k=k,
        seed=seed,
        affine=GRID_AFFINE.copy(),
        split_rule=SPLIT_RULE,
        notes=NOTES,
    )
    report_progress(progress, f"segmentation tasks ready (k={k}, seed={seed}: {len(train)} target training slices)")
    return tasks


# The shared lineage's ancestor (the stand-in for an ImageNet-pretrained encoder): garment scenes of Fashion-MNIST,
# another domain, segmented per pixel into the ten product categories. Scenes per split, garments per scene, the
# range of their scale and the intensity above which a garment pixel is labelled; one fixed seed draws everything.
ANCESTOR_CLASSES = ("background", *FASHION_CLASSES)
ANCESTOR_SCENES = {"train": 600, "val": 100}
ANCESTOR_GARMENTS = 3
ANCESTOR_SCALE = (1.5, 3.0)
ANCESTOR_THRESHOLD = 0.1
ANCESTOR_SEED = 0


def load_segmentation_ancestor_task(progress: bool = False) -> SegmentationTask:
    """The broad task of the shared lineage's ancestor: Fashion-MNIST garments on the benchmark's slice grid,
    segmented into their ten categories.

    Each scene is a 96 x 112 canvas holding :data:`ANCESTOR_GARMENTS` garments of the official training set, each
    scaled by a factor drawn from :data:`ANCESTOR_SCALE` (bilinear) and placed at a random position, later ones
    over earlier ones; a pixel is labelled with the garment's category + 1 where the garment's intensity (scaled
    to [0, 1]) exceeds :data:`ANCESTOR_THRESHOLD`, else background. Like ImageNet for a medical target, the
    ancestor never sees a brain, a label of the target or MR contrast. Everything is drawn by
    :data:`ANCESTOR_SEED`; no garment appears twice.

    Returns:
        A :class:`SegmentationTask` ``"fashion-seg/garments"`` with ``train`` and ``val`` scenes (``slices`` numbers
        the scenes) and no test split.

    Raises:
        FileNotFoundError: when Fashion-MNIST is not installed (``dataset-fashion-mnist``).
    """
    from scipy.ndimage import zoom

    from medmerge_bench.data.fashion import fashion_training_set

    images, labels = fashion_training_set()
    rng = np.random.default_rng(ANCESTOR_SEED)
    order = iter(rng.permutation(len(images)))
    height, width = GRID_SHAPE[:2]
    splits = {}
    for split, count in ANCESTOR_SCENES.items():
        x = np.zeros((count, 1, height, width), dtype=np.float32)
        y = np.zeros((count, 1, height, width), dtype=np.int64)
        for i in range(count):
            for _ in range(ANCESTOR_GARMENTS):
                j = next(order)
                garment = zoom(images[j].astype(np.float32) / 255.0, rng.uniform(*ANCESTOR_SCALE), order=1)
                garment = garment[:height, :width].clip(0.0, 1.0)
                h, w = garment.shape
                r, c = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
                shape = garment > ANCESTOR_THRESHOLD
                x[i, 0, r : r + h, c : c + w][shape] = garment[shape]
                y[i, 0, r : r + h, c : c + w][shape] = labels[j] + 1
        splits[split] = SliceSet(x, y, np.arange(count, dtype=np.int64))
    report_progress(progress, f"ancestor scenes ready ({', '.join(f'{n} {s}' for s, n in ANCESTOR_SCENES.items())})")
    return SegmentationTask("fashion-seg/garments", ANCESTOR_CLASSES, splits["train"], splits["val"], None)


SECTIONS = {"train": "training", "val": "validation", "test": "test"}


def write_segmentation_datalist(
    task: SegmentationTask, folder: str | os.PathLike[str], affine: np.ndarray = GRID_AFFINE
) -> Path:
    """Write ``task``'s slices as 2-D NIfTI files and a decathlon-style datalist into ``folder``.

    Each slice becomes ``images/<split>_z<zzz>.nii.gz`` (float32) and ``labels/<split>_z<zzz>.nii.gz`` (uint8), 2-D
    arrays of shape ``(96, 112)`` with the same affine, :func:`slice_affine` of the slice (2 mm pixels, the slice's
    place in MNI space). ``datalist.json`` holds ``"training"``, ``"validation"`` and ``"test"`` lists of
    ``{"image", "label", "slice"}`` with paths relative to ``folder`` (``monai.data.load_decathlon_datalist`` reads
    it), and the class names under ``"labels"``.

    Args:
        task: the task to write (a source has an empty ``"test"`` list).
        folder: where to write; created if missing. Files of the same name are replaced.
        affine: the grid's affine.

    Returns:
        The path of ``datalist.json``.

    Raises:
        ValueError: when a label does not fit in uint8.
    """
    nib = brain.require_module("nibabel")
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    datalist: dict[str, Any] = {
        "name": task.name,
        "description": "Axial 2-D slices (2 mm) of the monai_medmerge segmentation benchmark.",
        "labels": {str(i): name for i, name in enumerate(task.class_names)},
        "tensorImageSize": "2D",
    }
    for split, section in SECTIONS.items():
        entries = []
        data = task.splits().get(split)
        if data is not None and len(data) and (data.labels.min() < 0 or data.labels.max() > 255):
            raise ValueError(f"labels of {task.name} {split} lie outside 0..255 and do not fit uint8.")
        items = [] if data is None else zip(data.images, data.labels, data.slices, strict=True)
        for image, label, z in items:
            name = f"{split}_z{int(z):03d}.nii.gz"
            where = slice_affine(int(z), affine)
            img = nib.Nifti1Image(np.asarray(image[0], dtype=np.float32), where)
            seg = nib.Nifti1Image(np.asarray(label[0], dtype=np.uint8), where)
            for written in (img, seg):
                written.set_qform(where, code=1)
                written.set_sform(where, code=1)
            nib.save(img, folder / "images" / name)
            nib.save(seg, folder / "labels" / name)
            entries.append({"image": f"images/{name}", "label": f"labels/{name}", "slice": int(z)})
        datalist[section] = entries
    return write_json(folder / "datalist.json", datalist)


def voxel_counts(tasks: SegmentationTasks) -> dict[str, dict[str, dict[str, int]]]:
    """Labelled pixels of every class in every split: ``{task name: {split: {class name: pixels}}}``.

    A diagnostic for balance: a structure with few pixels in a split makes that split's score for it noisy.
    """
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for task in (tasks.source_a, tasks.source_b, tasks.target):
        counts[task.name] = {}
        for split, data in task.splits().items():
            n = np.bincount(data.labels.ravel(), minlength=task.num_classes)
            counts[task.name][split] = dict(zip(task.class_names, map(int, n), strict=True))
    return counts


def format_voxel_counts(tasks: SegmentationTasks) -> str:
    """:func:`voxel_counts` as a text table per task, with the slices of each split and the share of each class in
    each split (background included)."""
    counts = voxel_counts(tasks)
    lines = []
    for task in (tasks.source_a, tasks.source_b, tasks.target):
        splits = task.splits()
        header = " | ".join(f"{split} ({len(data)} slices)" for split, data in splits.items())
        lines.append(f"{task.name}: pixels (share) | {header}")
        totals = {split: sum(counts[task.name][split].values()) for split in splits}
        for name in task.class_names:
            cells = [
                f"{counts[task.name][split][name]} ({counts[task.name][split][name] / max(totals[split], 1):.2%})"
                for split in splits
            ]
            lines.append(f"  {name:>16} | " + " | ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(format_voxel_counts(load_segmentation_tasks(k=2, seed=0)))

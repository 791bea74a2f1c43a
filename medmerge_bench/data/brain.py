"""The brain MRI benchmark: 2-D patches of two brain templates on one MNI grid, labelled by tissue, anatomy, function.

Every volume is resampled by its affine onto one 1.5 mm grid in MNI space; a sample is a 32 x 32 slice (48 mm) of a
T1 template in the axial, coronal or sagittal plane, labelled by the class of its centre voxel.

- Source A, tissue: the MNI152 2009a symmetric T1 (nilearn) -> grey matter, white matter, CSF.
- Source B, anatomy on another brain: the Colin27 T1 (MRIcron) -> seven macro-regions of the AAL atlas.
- Target, function: the MNI152 T1 -> seven functional systems of the Brodmann map, which was drawn on Colin27 and is
  carried onto MNI152 by the affine alone.

Source A and the target show the same brain, so the target's test patches come from spatial blocks (mirror-symmetric
in x, since the template is symmetric) that no other split of either task samples. The volumes are built once per
process and kept on disk under :func:`~medmerge_bench.data.tasks.cache_dir`; the files they come from are checked on
every call, so a cache never hides missing data.

Beside that task (``"brain"``, kept as the benchmark where the sources leave no room for a merge) this module holds
variants searched for room (:data:`BRAIN_VARIANTS`, task names ``"brain_<variant>"``): the same grid, patches, splits
and held-out blocks, with other atlases of the MRIcron package (Harvard-Oxford cortical, AICHA and JHU white-matter
labels, all drawn in MNI space) for the sources or the target. The ``colin_test_*`` variants validate and test the
target on a new subject instead (Colin27, which none of their networks trains on). See ``docs/data.md`` for what each
is and how they were chosen.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import TensorDataset

from medmerge_bench.data.tasks import (
    PATCH_SIZE,
    UNLABELED_MAX,
    BenchmarkTasks,
    TaskData,
    cache_dir,
    k_shot_indices,
    make_tensor_dataset,
    report_progress,
)
from monai_medmerge.io import atomic_write

__all__ = [
    "ANATOMY_CLASSES",
    "BRAIN_TASK",
    "BRAIN_VARIANTS",
    "BRODMANN_SYSTEMS",
    "AAL_GROUPS",
    "BrainBenchmark",
    "BrainLayout",
    "BrainVolumes",
    "FUNCTION_CLASSES",
    "MRICRON_DIR",
    "PatchSet",
    "TISSUE_CLASSES",
    "TaskSpec",
    "brain_benchmark",
    "brain_label_volumes",
    "brain_layout",
    "brain_volumes",
    "cached_arrays",
    "extract_patches",
    "load_brain_tasks",
    "load_mni152",
    "mricron_files",
    "read_label_names",
    "require_module",
    "resample_to_grid",
    "target_train_patches",
    "target_unlabeled_patches",
]

MRICRON_DIR = Path("/usr/share/mricron/templates")
MRICRON_FILES = ("ch2bet.nii.gz", "aal.nii.gz", "aal.nii.txt", "brodmann.nii.gz")
INSTALL_MRICRON = "apt-get install -y mricron-data"
INSTALL_NILEARN = "pip install nilearn (or the extra: pip install 'monai_medmerge[bench]')"
# Bump when anything that shapes the cached volumes changes; old cache files are then simply not read.
CACHE_VERSION = "brain-v1"

# The grid: 1.5 mm, x from -89.25 to 89.25 mm so that x = 0 lies between two voxels and voxel i mirrors 119 - i.
SPACING = 1.5
GRID_SHAPE = (120, 145, 121)
GRID_ORIGIN = (-89.25, -125.0, -71.0)
GRID_AFFINE = np.array(
    [
        [SPACING, 0.0, 0.0, GRID_ORIGIN[0]],
        [0.0, SPACING, 0.0, GRID_ORIGIN[1]],
        [0.0, 0.0, SPACING, GRID_ORIGIN[2]],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
PLANES = ("axial", "coronal", "sagittal")

# Tissue: the winning probability of (GM, WM, CSF = 1 - GM - WM) inside the brain mask must reach this.
TISSUE_CONFIDENCE = 0.6
# Intensities are scaled between these percentiles of the brain's voxels before standardisation.
INTENSITY_PERCENTILES = (1.0, 99.0)
# Patches (centred in the brain, at random) whose mean and std standardise a volume.
NORM_PATCHES = 2000

# Held-out test blocks: cubes of BLOCK voxels (24 mm) on (|x|, y, z); a fraction of those holding target labels.
BLOCK = 16
HELDOUT_FRACTION = 0.2
# Centres of every split but the target's test stay this many voxels (6 mm) away from the held-out blocks.
GUARD = 4

SOURCE_TRAIN = 600
SOURCE_VAL = 100
TARGET_VAL = 50
TARGET_TEST = 150
# Seed of every draw except the target's k-shot subset, which the caller's seed draws.
SPLIT_SEED = 0

TISSUE_CLASSES = ["grey matter", "white matter", "CSF"]
# AAL region names start with one of these prefixes (each name matches exactly one group).
AAL_GROUPS: dict[str, tuple[str, ...]] = {
    "frontal": ("Precentral", "Frontal", "Rolandic_Oper", "Supp_Motor_Area", "Rectus"),
    "limbic/insula": ("Olfactory", "Insula", "Cingulum", "Hippocampus", "ParaHippocampal", "Amygdala"),
    "occipital": ("Calcarine", "Cuneus", "Lingual", "Occipital"),
    "parietal": ("Postcentral", "Parietal", "SupraMarginal", "Angular", "Precuneus", "Paracentral_Lobule"),
    "temporal": ("Fusiform", "Heschl", "Temporal"),
    "deep grey": ("Caudate", "Putamen", "Pallidum", "Thalamus"),
    "cerebellum": ("Cerebelum", "Vermis"),
}
ANATOMY_CLASSES = list(AAL_GROUPS)
# Brodmann areas by system. MRIcron's map has no areas 12-16, 31 or 33; its area 48 covers the insula and the
# operculum around it (with the white matter beneath), so it stands for the insula here.
BRODMANN_SYSTEMS: dict[str, tuple[int, ...]] = {
    "sensorimotor": (1, 2, 3, 4, 43),
    "premotor": (6, 8),
    "prefrontal": (9, 10, 11, 44, 45, 46, 47),
    "visual": (17, 18, 19),
    "temporal/auditory": (20, 21, 22, 37, 38, 41, 42),
    "parietal": (5, 7, 39, 40),
    "limbic/insular": (23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 48),
}
FUNCTION_CLASSES = list(BRODMANN_SYSTEMS)

NOTES = (
    "Patches are 32 x 32 slices (48 mm at 1.5 mm) of T1 templates on one MNI grid, in the axial, coronal and "
    "sagittal planes, labelled by their centre voxel; neighbouring patches overlap heavily, so a class is a place "
    "in the brain, not a pattern found anywhere. Source A labels the MNI152 2009a symmetric T1 by nilearn's tissue "
    "probabilities (grey matter, white matter, and CSF as what the brain mask holds beyond them; a voxel is kept when "
    f"its winning probability is at least {TISSUE_CONFIDENCE}). Source B labels a different brain, the Colin27 T1, by "
    "the AAL atlas drawn on that very brain, grouped by region name into seven macro-regions. The target labels the "
    "MNI152 T1 by MRIcron's Brodmann map grouped into seven functional systems; that map was drawn on Colin27 and is "
    "carried onto MNI152 by the affine alone, with no nonlinear registration, so the target's labels are approximate "
    "(boundaries are off by several millimetres, and the map labels whole territories, white matter beneath "
    "included). Brodmann areas are cytoarchitectonic, not visible in a T1, so the target is really where a patch "
    "lies. Source A and the target show the same brain: the target's test patches come from held-out blocks of "
    f"{BLOCK} voxels, mirror-symmetric in x because the template is symmetric, that no other split samples within "
    f"{GUARD} voxels; even so, patches near a block's edge share part of their field of view with training patches."
)


# --- the atlases of the variants searched for room (the "brain" task above needs none of them) ---
ATLAS_FILES = (
    "HarvardOxford-cort-maxprob-thr0-1mm.nii.gz",
    "AICHAmc.nii.gz",
    "AICHAmc.nii.txt",
    "JHU-WhiteMatter-labels-1mm.nii.gz",
)
# Bump when anything that shapes the cached atlas volumes changes (their grouping is not cached: it is cheap).
ATLAS_CACHE_VERSION = "brain-atlases-v2"
# Harvard-Oxford cortical atlas, maximum probability without threshold: label i is entry i - 1 of this list. MRIcron
# ships the image without its names; the order is the one of FSL's HarvardOxford-Cortical.xml (the test suite checks
# it against where a few areas lie).
HARVARD_OXFORD_CORTICAL = (
    "Frontal Pole",
    "Insular Cortex",
    "Superior Frontal Gyrus",
    "Middle Frontal Gyrus",
    "Inferior Frontal Gyrus, pars triangularis",
    "Inferior Frontal Gyrus, pars opercularis",
    "Precentral Gyrus",
    "Temporal Pole",
    "Superior Temporal Gyrus, anterior division",
    "Superior Temporal Gyrus, posterior division",
    "Middle Temporal Gyrus, anterior division",
    "Middle Temporal Gyrus, posterior division",
    "Middle Temporal Gyrus, temporooccipital part",
    "Inferior Temporal Gyrus, anterior division",
    "Inferior Temporal Gyrus, posterior division",
    "Inferior Temporal Gyrus, temporooccipital part",
    "Postcentral Gyrus",
    "Superior Parietal Lobule",
    "Supramarginal Gyrus, anterior division",
    "Supramarginal Gyrus, posterior division",
    "Angular Gyrus",
    "Lateral Occipital Cortex, superior division",
    "Lateral Occipital Cortex, inferior division",
    "Intracalcarine Cortex",
    "Frontal Medial Cortex",
    "Juxtapositional Lobule Cortex (formerly Supplementary Motor Cortex)",
    "Subcallosal Cortex",
    "Paracingulate Gyrus",
    "Cingulate Gyrus, anterior division",
    "Cingulate Gyrus, posterior division",
    "Precuneous Cortex",
    "Cuneal Cortex",
    "Frontal Orbital Cortex",
    "Parahippocampal Gyrus, anterior division",
    "Parahippocampal Gyrus, posterior division",
    "Lingual Gyrus",
    "Temporal Fusiform Cortex, anterior division",
    "Temporal Fusiform Cortex, posterior division",
    "Temporal Occipital Fusiform Cortex",
    "Occipital Fusiform Gyrus",
    "Frontal Operculum Cortex",
    "Central Opercular Cortex",
    "Parietal Operculum Cortex",
    "Planum Polare",
    "Heschl's Gyrus (includes H1 and H2)",
    "Planum Temporale",
    "Supracalcarine Cortex",
    "Occipital Pole",
)
# Harvard-Oxford labels by lobe, grouped as AAL_GROUPS groups the same places (Rolandic operculum frontal, fusiform
# temporal, lingual occipital, cingulate and parahippocampal limbic).
HARVARD_OXFORD_LOBES: dict[str, tuple[int, ...]] = {
    "frontal": (1, 3, 4, 5, 6, 7, 25, 26, 28, 33, 41, 42),
    "temporal": (8, 9, 10, 11, 12, 13, 14, 15, 16, 37, 38, 39, 44, 45, 46),
    "parietal": (17, 18, 19, 20, 21, 31, 43),
    "occipital": (22, 23, 24, 32, 36, 40, 47, 48),
    "limbic/insula": (2, 27, 29, 30, 34, 35),
}
LOBE_CLASSES = list(HARVARD_OXFORD_LOBES)
# The four lobes of the cortex proper, crossed with tissue or beside tracts in the targets below.
LOBES = LOBE_CLASSES[:4]
# AICHA names (without their G_/S_/N_ prefix and -n suffix) are grouped by AAL_GROUPS, and these for the names AAL
# does not have; AICHA has no cerebellum.
AICHA_EXTRA_GROUPS: dict[str, tuple[str, ...]] = {
    "frontal": ("Sup_Frontal", "Inf_Frontal", "Orbital", "Anterior_Rostral", "Rolando"),
    "limbic/insula": ("Cingulate", "subcallosal"),
    "occipital": ("Intraoccipital", "Parietooccipital"),
    "parietal": ("Intraparietal", "Supramarginal"),
    "temporal": ("Sup_Temporal",),
}
AICHA_CLASSES = [g for g in AAL_GROUPS if g != "cerebellum"]
# JHU white-matter labels (ICBM-DTI-81) by family; the brainstem and cerebellar tracts and the fornix are left out.
# MRIcron's file puts the labels named _R at negative x under its affine; left and right are pooled, so it does not
# matter here.
JHU_FAMILIES: dict[str, tuple[int, ...]] = {
    "callosal": (3, 4, 5, 47, 48),
    "projection": (7, 8, *range(15, 31)),
    "association": tuple(range(31, 47)),
}
# Two specialists: finer regions of the front of the brain (AICHA, on MNI152) for one source and of the back (AAL, on
# Colin27) for the other, by exact region name (AICHA: without kind prefix and part suffix; AAL: without _L/_R).
AICHA_ANTERIOR: dict[str, tuple[str, ...]] = {
    "superior frontal": ("Frontal_Sup", "Frontal_Sup_Medial", "Sup_Frontal", "Supp_Motor_Area"),
    "middle frontal": ("Frontal_Mid",),
    "inferior frontal": ("Frontal_Inf_Tri", "Inf_Frontal", "Rolandic_Oper"),
    "orbitofrontal": (
        "Frontal_Sup_Orb",
        "Frontal_Mid_Orb",
        "Frontal_Med_Orb",
        "Frontal_Inf_Orb",
        "Orbital",
        "Olfactory",
    ),
    "precentral": ("Precentral", "Rolando"),
    "superior temporal": ("Temporal_Sup", "Sup_Temporal", "Temporal_Pole_Sup"),
    "middle and inferior temporal": ("Temporal_Mid", "Temporal_Inf", "Temporal_Pole_Mid"),
}
AAL_POSTERIOR: dict[str, tuple[str, ...]] = {
    "postcentral": ("Postcentral",),
    "superior parietal": ("Parietal_Sup", "Paracentral_Lobule"),
    "inferior parietal": ("Parietal_Inf", "SupraMarginal", "Angular"),
    "precuneus": ("Precuneus",),
    "medial occipital": ("Calcarine", "Cuneus", "Lingual"),
    "lateral occipital": ("Occipital_Sup", "Occipital_Mid", "Occipital_Inf"),
}
# The back of the brain as AICHA names it, grouped as AAL_POSTERIOR groups AAL: a posterior specialist on MNI152, the
# anterior one's brain, so that neither specialist has the target's brain to itself.
AICHA_POSTERIOR: dict[str, tuple[str, ...]] = {
    "postcentral": ("Postcentral",),
    "superior parietal": ("Parietal_Sup", "Paracentral_Lobule", "Intraparietal"),
    "inferior parietal": ("Parietal_Inf", "SupraMarginal", "Supramarginal", "Angular"),
    "precuneus": ("Precuneus", "Parietooccipital"),
    "medial occipital": ("Calcarine", "Cuneus", "Lingual"),
    "lateral occipital": (
        "Occipital_Sup",
        "Occipital_Mid",
        "Occipital_Inf",
        "Occipital_Lat",
        "Occipital_Pole",
        "Intraoccipital",
    ),
}
# The front of the brain as AAL names it, in AICHA_ANTERIOR's groups: an anterior specialist on Colin27.
AAL_ANTERIOR: dict[str, tuple[str, ...]] = {
    "superior frontal": ("Frontal_Sup", "Frontal_Sup_Medial", "Supp_Motor_Area"),
    "middle frontal": ("Frontal_Mid",),
    "inferior frontal": ("Frontal_Inf_Tri", "Frontal_Inf_Oper", "Rolandic_Oper"),
    "orbitofrontal": (
        "Frontal_Sup_Orb",
        "Frontal_Mid_Orb",
        "Frontal_Med_Orb",
        "Frontal_Inf_Orb",
        "Olfactory",
        "Rectus",
    ),
    "precentral": ("Precentral",),
    "superior temporal": ("Temporal_Sup", "Temporal_Pole_Sup", "Heschl"),
    "middle and inferior temporal": ("Temporal_Mid", "Temporal_Inf", "Temporal_Pole_Mid"),
}
# The front and the back as one target of thirteen AAL regions, the union of the two specialists' classes (as
# Fashion-MNIST's target is the union of its sources' classes).
AAL_SPLIT: dict[str, tuple[str, ...]] = {**AAL_ANTERIOR, **AAL_POSTERIOR}
# The target of the two specialists' second variant: Harvard-Oxford areas (a third atlas), five in the front and five
# in the back of the brain, where sources A and B know finer regions.
HARVARD_OXFORD_SPLIT: dict[str, tuple[int, ...]] = {
    "superior frontal": (3, 26),
    "middle frontal": (4,),
    "inferior frontal": (5, 6),
    "precentral": (7,),
    "lateral temporal": (9, 10, 11, 12, 14, 15),
    "postcentral": (17,),
    "superior parietal": (18,),
    "inferior parietal": (19, 20, 21),
    "lateral occipital": (22, 23),
    "medial occipital": (24, 32, 36, 47),
}
TISSUE_LOBE_CLASSES = [f"{lobe} {tissue}" for lobe in LOBES for tissue in TISSUE_CLASSES[:2]]
TRACT_CORTEX_CLASSES = [f"{family} white matter" for family in JHU_FAMILIES] + [f"{lobe} cortex" for lobe in LOBES]

HOLDOUT_NOTES = (
    "Held out as in the brain task: the target's test patches come from held-out blocks of "
    f"{BLOCK} voxels (mirror-symmetric in x) drawn by the same rule among those holding this target's labels, and no "
    f"other split of any task is centred within {GUARD} voxels of them. The test set measures unseen places of the "
    "same two brains, not new subjects."
)
COLIN_TEST_NOTES = (
    "Tested on a new subject: the target's validation and test patches are cut from the Colin27 T1, which no network "
    "trains on, labelled by the target's map (kept where Colin27's brain is), in blocks of "
    f"{BLOCK} voxels (mirror-symmetric in x) drawn by the brain task's rule, the validation blocks at least {GUARD} "
    "voxels from the test blocks; the target and the sources train anywhere on MNI152. The test set measures the "
    "same places on another brain, not unseen places."
)


class PatchSet(NamedTuple):
    """Where the patches of one split come from.

    Args:
        centres: ``(n, 3)`` int voxel indices of the centres on the grid.
        planes: ``(n,)`` plane of each patch: 0 axial, 1 coronal, 2 sagittal (see ``PLANES``).
        labels: ``(n,)`` int64 class of each centre voxel.
    """

    centres: np.ndarray
    planes: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class BrainVolumes:
    """The benchmark's volumes on the 1.5 mm MNI grid (``GRID_AFFINE``, shape ``GRID_SHAPE``).

    Args:
        mni_t1: the MNI152 2009a symmetric T1, float32, standardised over its brain mask.
        colin_t1: the Colin27 T1 (brain-extracted), float32, standardised over its brain.
        tissue: int8 index into ``TISSUE_CLASSES`` on the MNI152 brain, -1 where unlabelled or unsure.
        anatomy: int8 index into ``ANATOMY_CLASSES`` on Colin27, -1 outside AAL.
        function: int8 index into ``FUNCTION_CLASSES`` on the MNI152 brain, -1 outside the Brodmann map.
    """

    mni_t1: np.ndarray
    colin_t1: np.ndarray
    tissue: np.ndarray
    anatomy: np.ndarray
    function: np.ndarray


@dataclass(frozen=True)
class TaskSpec:
    """One task of a brain benchmark: the T1 its patches are cut from and the label volume that labels their centres.

    Args:
        name: the task's name, e.g. ``"brain/tissue"``.
        image: ``"mni_t1"`` or ``"colin_t1"`` (a field of :class:`BrainVolumes`).
        labels: the label volume, a key of what :func:`brain_label_volumes` returns.
        classes: one name per class; label ``i`` is ``classes[i]``.
        planes: the planes its patches are cut in, indices into ``PLANES`` (in equal shares); a target has all.
    """

    name: str
    image: str
    labels: str
    classes: tuple[str, ...]
    planes: tuple[int, ...] = (0, 1, 2)


@dataclass(frozen=True)
class BrainBenchmark:
    """The definition of one brain benchmark: two source tasks and a target, all on the benchmark grid.

    Args:
        name: the task name of :func:`~medmerge_bench.data.tasks.load_benchmark_tasks` (``"brain"`` or
            ``"brain_<variant>"``); the cache of pretrained sources is keyed by it.
        source_a: the first source task.
        source_b: the second source task.
        target: the few-shot target; its labels choose the held-out test blocks.
        notes: what the labels are and where they fall short.
        atlases: whether it needs the atlases of ``ATLAS_FILES`` beside ``MRICRON_FILES``.
        validation: where the target's validation patches lie: ``"pool"`` (among the training pool's places, as the
            recorded tasks have them: validation then measures places next to labelled ones, the test unseen places)
            or ``"blocks"`` (in blocks of their own, drawn as the test blocks are and guarded alike, so that
            validation measures what the test measures: places no labelled patch came near).
        guard_other_brain: whether a source cut from another brain than the target's is kept off the held-out
            places too (as the recorded tasks do). ``False`` lets it see another subject's anatomy there, as a network
            pretrained elsewhere would have; the target's brain and labels at those places stay unseen.
        evaluate_on: ``None`` (the target is validated and tested on its own brain, at held-out places) or the
            image of a new subject (a field of :class:`BrainVolumes`) that no network trains on: the target's
            validation and test patches are cut from it, in blocks of their own each (``validation`` must be
            ``"blocks"``), labelled by the target's label volume, while the target and the sources train anywhere on
            the other brain. The test then asks what a network trained on one patient is asked of the next one: the
            same places on another brain, not places never seen.
        val_per_class: the target's validation patches per class (``TARGET_VAL`` for the recorded tasks). More
            patches make the choices made on validation (which source, which recipe) less noisy; they cost an
            evaluation pass per epoch.
    """

    name: str
    source_a: TaskSpec
    source_b: TaskSpec
    target: TaskSpec
    notes: str
    atlases: bool = True
    validation: str = "pool"
    guard_other_brain: bool = True
    evaluate_on: str | None = None
    val_per_class: int = TARGET_VAL

    def __post_init__(self) -> None:
        if self.target.planes != (0, 1, 2):
            raise ValueError(f"a target is cut in every plane, got planes {self.target.planes} for {self.name!r}.")
        if self.validation not in ("pool", "blocks"):
            raise ValueError(f"validation must be 'pool' or 'blocks', got {self.validation!r} for {self.name!r}.")
        if self.val_per_class < 1:
            raise ValueError(f"val_per_class must be at least 1, got {self.val_per_class} for {self.name!r}.")
        if self.evaluate_on is None:
            return
        images = [f.name for f in fields(BrainVolumes) if f.name.endswith("_t1")]
        if self.evaluate_on not in images:
            raise ValueError(f"evaluate_on must be one of {images}, got {self.evaluate_on!r} for {self.name!r}.")
        if self.validation != "blocks":
            raise ValueError(f"{self.name!r} evaluates on a new subject, so its validation must be 'blocks'.")
        trained = {spec.name: spec.image for spec in (self.source_a, self.source_b, self.target)}
        seen = [name for name, image in trained.items() if image == self.evaluate_on]
        if seen:
            raise ValueError(
                f"{self.name!r} evaluates on {self.evaluate_on!r}, which {', '.join(seen)} trains on: the new "
                "subject must be one no network has seen."
            )


_TISSUE = TaskSpec("brain/tissue", "mni_t1", "tissue", tuple(TISSUE_CLASSES))
_ANATOMY = TaskSpec("brain/anatomy", "colin_t1", "anatomy", tuple(ANATOMY_CLASSES))
_FUNCTION = TaskSpec("brain/function", "mni_t1", "function", tuple(FUNCTION_CLASSES))
# The brain task: tissue and anatomy sources, functional systems as the target. Its results are recorded, so its
# draws must never change.
BRAIN_TASK = BrainBenchmark("brain", _TISSUE, _ANATOMY, _FUNCTION, NOTES, atlases=False)

_ANATOMY_NOTE = (
    "Source B is the brain task's: the Colin27 T1 labelled by AAL, drawn on that very brain, grouped into seven "
    "macro-regions."
)
_TISSUE_NOTE = (
    "Source A is the brain task's: the MNI152 T1 labelled grey matter, white matter or CSF by nilearn's tissue "
    f"probabilities (kept where the winner reaches {TISSUE_CONFIDENCE})."
)
_FUNCTION_NOTE = (
    "The target is the brain task's: the MNI152 T1 labelled by MRIcron's Brodmann map (drawn on Colin27, carried by "
    "the affine alone) grouped into seven functional systems."
)
_HO_NOTE = (
    "The Harvard-Oxford cortical atlas (maximum probability, no threshold) was built on MNI152 and reaches into the "
    "white matter beneath the cortex; it is carried from FSL's MNI152 onto the 2009a symmetric template by the affine "
    "alone, so its boundaries are approximate."
)
# The specialists and views the variants share: two halves of the cortex on either brain, the target of the split
# variants, and the two sources cut in two planes each.
_FRONT_AICHA = TaskSpec("brain/aicha-anterior", "mni_t1", "aicha_anterior", tuple(AICHA_ANTERIOR))
_BACK_AAL = TaskSpec("brain/aal-posterior", "colin_t1", "aal_posterior", tuple(AAL_POSTERIOR))
_BACK_AICHA = TaskSpec("brain/aicha-posterior", "mni_t1", "aicha_posterior", tuple(AICHA_POSTERIOR))
_FRONT_AAL = TaskSpec("brain/aal-anterior", "colin_t1", "aal_anterior", tuple(AAL_ANTERIOR))
_HO_REGIONS = TaskSpec("brain/ho-regions", "mni_t1", "ho_split", tuple(HARVARD_OXFORD_SPLIT))
_HO_LOBES = TaskSpec("brain/ho-lobes", "mni_t1", "ho_lobe", tuple(LOBE_CLASSES))
_AICHA_REGIONS = TaskSpec("brain/aicha-regions", "mni_t1", "aicha_group", tuple(AICHA_CLASSES))
_AICHA_VIEWS = TaskSpec("brain/aicha-regions", "mni_t1", "aicha_group", tuple(AICHA_CLASSES), planes=(0, 1))
_ANATOMY_VIEWS = TaskSpec("brain/anatomy", "colin_t1", "anatomy", tuple(ANATOMY_CLASSES), planes=(1, 2))
# The variants searched for room (benchmarks/room_search.py); the task name of variant v is "brain_v".
BRAIN_VARIANTS: dict[str, BrainBenchmark] = {
    "tissue_lobe": BrainBenchmark(
        "brain_tissue_lobe",
        _TISSUE,
        _ANATOMY,
        TaskSpec("brain/tissue-lobe", "mni_t1", "tissue_lobe", tuple(TISSUE_LOBE_CLASSES)),
        "Target: the MNI152 T1 labelled by tissue crossed with lobe, eight classes (grey or white matter of the "
        "frontal, temporal, parietal or occipital lobe): the tissue of nilearn's probabilities (as source A's) and "
        f"the lobe of the Harvard-Oxford cortical atlas. {_HO_NOTE} {_TISSUE_NOTE} {_ANATOMY_NOTE} Each class needs "
        "what A knows (tissue) and what B knows (where a lobe lies, on another brain). " + HOLDOUT_NOTES,
    ),
    "tracts_cortex": BrainBenchmark(
        "brain_tracts_cortex",
        _TISSUE,
        _ANATOMY,
        TaskSpec("brain/tracts-cortex", "mni_t1", "tract_cortex", tuple(TRACT_CORTEX_CLASSES)),
        "Target: the MNI152 T1 labelled by white-matter tract family (callosal, projection, association: the JHU "
        "ICBM-DTI-81 labels, drawn on MNI152, where nilearn's tissue is white matter) or cortical lobe (frontal, "
        "temporal, parietal, occipital: Harvard-Oxford, where the tissue is grey matter), seven classes. "
        f"{_HO_NOTE} {_TISSUE_NOTE} {_ANATOMY_NOTE} A knows grey from white matter, B where a lobe lies; AAL "
        "labels no white matter, so the tracts are new to both. " + HOLDOUT_NOTES,
    ),
    "ho_function": BrainBenchmark(
        "brain_ho_function",
        _HO_LOBES,
        _ANATOMY,
        _FUNCTION,
        "Source A: the MNI152 T1 labelled by the Harvard-Oxford cortical atlas grouped into five lobes (frontal, "
        f"temporal, parietal, occipital, limbic/insula). {_HO_NOTE} {_ANATOMY_NOTE} {_FUNCTION_NOTE} Both sources "
        "know where a patch lies: A on the target's brain with coarse classes, B on another brain with finer ones. "
        + HOLDOUT_NOTES,
    ),
    "aicha_function": BrainBenchmark(
        "brain_aicha_function",
        _AICHA_REGIONS,
        _ANATOMY,
        _FUNCTION,
        "Source A: the MNI152 T1 labelled by the AICHA atlas (drawn on MNI space, 2 mm) grouped by region name into "
        "the AAL macro-regions it has (all but the cerebellum: six classes). "
        f"{_ANATOMY_NOTE} {_FUNCTION_NOTE} Both sources know where a patch lies, on two brains, with two atlases "
        "of nearly the same classes. " + HOLDOUT_NOTES,
    ),
    "split_function": BrainBenchmark(
        "brain_split_function",
        _FRONT_AICHA,
        _BACK_AAL,
        _FUNCTION,
        "Two specialists. Source A: the MNI152 T1 labelled by the AICHA atlas (drawn on MNI space) in the front of "
        "the brain only, seven frontal and temporal regions (superior, middle, inferior and orbital frontal, "
        "precentral, superior and middle-inferior temporal). Source B: the Colin27 T1 labelled by AAL in the back "
        "of the brain only, six parietal and occipital regions (postcentral, superior and inferior parietal, "
        f"precuneus, medial and lateral occipital). Neither sees patches centred elsewhere. {_FUNCTION_NOTE} "
        "Premotor, prefrontal and temporal systems lie in A's part, visual and parietal in B's, sensorimotor "
        "across both; as Fashion-MNIST's sources split its classes, these split the target's brain. " + HOLDOUT_NOTES,
    ),
    "split_regions": BrainBenchmark(
        "brain_split_regions",
        _FRONT_AICHA,
        _BACK_AAL,
        _HO_REGIONS,
        "Two specialists, as in brain_split_function: source A knows seven frontal and temporal regions (AICHA, "
        "MNI152), source B six parietal and occipital regions (AAL, Colin27). Target: the MNI152 T1 labelled by a "
        "third atlas, Harvard-Oxford cortical, in ten areas: five in A's part (superior, middle and inferior "
        "frontal, precentral, lateral temporal) and five in B's (postcentral, superior and inferior parietal, "
        f"lateral and medial occipital); the closest brain analogue of Fashion-MNIST's split classes. {_HO_NOTE} "
        + HOLDOUT_NOTES,
    ),
    "views_function": BrainBenchmark(
        "brain_views_function",
        _AICHA_VIEWS,
        _ANATOMY_VIEWS,
        _FUNCTION,
        "The sources of brain_aicha_function, each cut in two of the three planes: source A (AICHA macro-regions on "
        "MNI152) in axial and coronal slices, source B (AAL macro-regions on Colin27) in coronal and sagittal "
        f"slices, as if acquired in different orientations. {_FUNCTION_NOTE} The target has all three planes: A "
        "alone has seen axial slices, B alone sagittal ones. " + HOLDOUT_NOTES,
    ),
    "split_mni_function": BrainBenchmark(
        "brain_split_mni_function",
        _FRONT_AICHA,
        _BACK_AICHA,
        _FUNCTION,
        "Two specialists on one brain: source A as in brain_split_function (seven frontal and temporal AICHA regions "
        "on MNI152), source B the six parietal and occipital regions of the back of the brain, also from AICHA on "
        "MNI152 (the groups of brain_split_function's AAL specialist). Neither sees patches centred in the other's "
        f"part. {_FUNCTION_NOTE} Unlike brain_split_function, neither specialist has the target's brain to itself, "
        "so the two halves are balanced as Fashion-MNIST's are. " + HOLDOUT_NOTES,
    ),
    "split_mni_regions": BrainBenchmark(
        "brain_split_mni_regions",
        _FRONT_AICHA,
        _BACK_AICHA,
        _HO_REGIONS,
        "The specialists of brain_split_mni_function (front and back of MNI152, both from AICHA) and the target of "
        f"brain_split_regions (ten Harvard-Oxford areas, five in each specialist's part). {_HO_NOTE} " + HOLDOUT_NOTES,
    ),
    # Validation in blocks of its own (measuring what the test measures), and sources on another brain free to see
    # the held-out places: the two choices of the variants below.
    "colin_split_function": BrainBenchmark(
        "brain_colin_split_function",
        _FRONT_AAL,
        _BACK_AAL,
        _FUNCTION,
        "Two specialists on another subject: source A the seven frontal and temporal regions of AAL on the Colin27 "
        "T1 (AICHA_ANTERIOR's groups), source B its six parietal and occipital regions (as in "
        f"brain_split_function). {_FUNCTION_NOTE} Both sources may be centred anywhere on Colin27, held-out places "
        "included, as networks pretrained on other subjects would be; the target's validation patches come from "
        "blocks of their own, drawn and guarded like the test blocks. " + HOLDOUT_NOTES,
        validation="blocks",
        guard_other_brain=False,
    ),
    "colin_split_regions": BrainBenchmark(
        "brain_colin_split_regions",
        _FRONT_AAL,
        _BACK_AAL,
        _HO_REGIONS,
        "The specialists of brain_colin_split_function (front and back of Colin27, AAL, free to see the held-out "
        "places) and the target of brain_split_regions (ten Harvard-Oxford areas on MNI152, five in each "
        f"specialist's part), validated in blocks of its own. {_HO_NOTE} " + HOLDOUT_NOTES,
        validation="blocks",
        guard_other_brain=False,
    ),
    "views_open_function": BrainBenchmark(
        "brain_views_open_function",
        _AICHA_VIEWS,
        _ANATOMY_VIEWS,
        _FUNCTION,
        "The sources of brain_views_function (AICHA on MNI152 in axial and coronal slices, AAL on Colin27 in coronal "
        f"and sagittal ones). {_FUNCTION_NOTE} Source B, on another subject, may be centred anywhere, held-out "
        "places included; source A, on the target's brain, may not. The target's validation patches come from "
        "blocks of their own, drawn and guarded like the test blocks. " + HOLDOUT_NOTES,
        validation="blocks",
        guard_other_brain=False,
    ),
    # A new subject: every network trains on MNI152 and the target is validated and tested on Colin27 (where the
    # Brodmann map was drawn), as a network trained on one patient is used on the next.
    "colin_test_split_function": BrainBenchmark(
        "brain_colin_test_split_function",
        _FRONT_AICHA,
        _BACK_AICHA,
        _FUNCTION,
        "The specialists of brain_split_mni_function (AICHA's front and back of MNI152) and its target, trained on "
        f"MNI152. {_FUNCTION_NOTE} " + COLIN_TEST_NOTES,
        validation="blocks",
        evaluate_on="colin_t1",
    ),
    "colin_test_split_regions": BrainBenchmark(
        "brain_colin_test_split_regions",
        _FRONT_AICHA,
        _BACK_AICHA,
        TaskSpec("brain/aal-regions", "mni_t1", "aal_split", tuple(AAL_SPLIT)),
        "The specialists of brain_split_mni_function (seven frontal and temporal, six parietal and occipital AICHA "
        "regions of MNI152). Target: the same thirteen regions as AAL draws them (on Colin27; carried onto MNI152 "
        "by the affine alone, kept inside its brain), the union of the two specialists' classes from another "
        "atlas, as Fashion-MNIST's target is the union of its sources' classes; trained on MNI152. " + COLIN_TEST_NOTES,
        validation="blocks",
        evaluate_on="colin_t1",
    ),
    "colin_test_atlases_function": BrainBenchmark(
        "brain_colin_test_atlases_function",
        _HO_LOBES,
        _AICHA_REGIONS,
        _FUNCTION,
        "Two atlases of MNI152: source A the five Harvard-Oxford lobes (as in brain_ho_function), source B the six "
        f"AICHA macro-regions (as in brain_aicha_function). {_HO_NOTE} {_FUNCTION_NOTE} " + COLIN_TEST_NOTES,
        validation="blocks",
        evaluate_on="colin_t1",
    ),
    "colin_test_tissue_function": BrainBenchmark(
        "brain_colin_test_tissue_function",
        _TISSUE,
        _AICHA_REGIONS,
        _FUNCTION,
        f"Tissue and place, both on MNI152. {_TISSUE_NOTE} Source B: the six AICHA macro-regions (as in "
        f"brain_aicha_function). {_FUNCTION_NOTE} " + COLIN_TEST_NOTES,
        validation="blocks",
        evaluate_on="colin_t1",
    ),
}


@dataclass(frozen=True)
class BrainLayout:
    """The fixed splits of a brain benchmark: everything but the target's k-shot training subset.

    Args:
        volumes: the volumes the patches are cut from.
        heldout: bool grid, the voxels of the target's held-out test blocks.
        excluded: bool grid, the held-out blocks widened by ``GUARD`` voxels; no non-test centre lies in it (but a
            source on another brain when the benchmark does not ``guard_other_brain``).
        source_a_train: source A's patches for training (tissue on MNI152 in the brain task).
        source_a_val: source A's patches for validation.
        source_b_train: source B's patches for training (anatomy on Colin27 in the brain task).
        source_b_val: source B's patches for validation.
        target_val: the target's patches for validation (function on MNI152 in the brain task).
        target_test: the target's patches from the held-out blocks.
        target_pool: candidate centres of the target's training subset (``planes`` unused: the seed draws them).
        benchmark: what the tasks are.
        labels: the label volumes of source A, source B and the target, by the names their ``TaskSpec`` gives.
        validation_blocks: bool grid, the target's validation blocks when the benchmark's ``validation`` is
            ``"blocks"`` (``target_val`` lies in them; no training or guarded source centre lies within ``GUARD``
            voxels of them), else ``None``.
    """

    volumes: BrainVolumes
    heldout: np.ndarray
    excluded: np.ndarray
    source_a_train: PatchSet
    source_a_val: PatchSet
    source_b_train: PatchSet
    source_b_val: PatchSet
    target_val: PatchSet
    target_test: PatchSet
    target_pool: PatchSet
    benchmark: BrainBenchmark = BRAIN_TASK
    labels: Mapping[str, np.ndarray] = field(default_factory=dict)
    validation_blocks: np.ndarray | None = None


def _require(module: str) -> ModuleType:
    # Imported when the volumes are built, not with this module: nilearn alone takes seconds to import.
    return require_module(module)


def require_module(module: str) -> ModuleType:
    """``module`` imported (nilearn, nibabel or scipy, or one of their submodules).

    Raises:
        RuntimeError: when its package is not installed; the message says what to install.
    """
    package = module.split(".")[0]
    installs = {"nilearn": INSTALL_NILEARN, "nibabel": "pip install nibabel", "scipy": "pip install scipy"}
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RuntimeError(f"the brain benchmark needs {package}, which is not installed: {installs[package]}") from e


def _check_files(data_dir: Path, names: tuple[str, ...] = MRICRON_FILES) -> list[Path]:
    paths = [data_dir / name for name in names]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"the brain benchmark needs the MRIcron templates, missing: {', '.join(missing)}. "
            f"Install them with: {INSTALL_MRICRON}"
        )
    return paths


def mricron_files(names: tuple[str, ...]) -> list[Path]:
    """The paths of the files ``names`` of the MRIcron package (under ``MRICRON_DIR``), checked to exist.

    Raises:
        FileNotFoundError: naming every missing file and the ``apt-get`` line that installs them.
    """
    return _check_files(MRICRON_DIR, names)


def resample_to_grid(img: Any, affine: np.ndarray, shape: tuple[int, int, int], order: int) -> np.ndarray:
    """``img`` (a nibabel image) resampled by its affine onto the grid of ``affine`` and ``shape``; zero outside it.

    Args:
        img: the image to resample.
        affine: the target grid's voxel-to-world affine, 4 x 4.
        shape: the target grid's shape.
        order: 1 (linear, float32) for intensities and probabilities, 0 (nearest, the stored dtype) for labels.

    Raises:
        RuntimeError: when scipy is missing.
    """
    ndimage = _require("scipy.ndimage")
    data = np.asanyarray(img.dataobj)
    if order > 0:
        data = data.astype(np.float32)
    grid_to_voxel = np.linalg.inv(img.affine) @ affine
    return ndimage.affine_transform(
        data, grid_to_voxel[:3, :3], offset=grid_to_voxel[:3, 3], output_shape=shape, order=order, cval=0
    )


def _resample(img: Any, order: int) -> np.ndarray:
    """``img`` on the benchmark grid: linear (``order=1``) for intensities, nearest (``order=0``) for labels."""
    return resample_to_grid(img, GRID_AFFINE, GRID_SHAPE, order)


# nilearn's MNI152 2009a symmetric images at 1 mm, by the names load_mni152 takes.
_MNI152_LOADERS = {
    "t1": "load_mni152_template",
    "gm": "load_mni152_gm_template",
    "wm": "load_mni152_wm_template",
    "brain_mask": "load_mni152_brain_mask",
}


def load_mni152(kind: str) -> Any:
    """One of nilearn's MNI152 2009a symmetric images at 1 mm, as a nibabel image (no download: nilearn ships them).

    Args:
        kind: ``"t1"`` (the T1 template), ``"gm"`` or ``"wm"`` (tissue probabilities), ``"brain_mask"``.

    Raises:
        ValueError: for another ``kind``.
        RuntimeError: when nilearn is missing.
    """
    if kind not in _MNI152_LOADERS:
        raise ValueError(f"unknown MNI152 image {kind!r}; choose one of {', '.join(_MNI152_LOADERS)}.")
    datasets = _require("nilearn.datasets")
    return getattr(datasets, _MNI152_LOADERS[kind])(resolution=1)


def read_label_names(names_file: Path) -> dict[int, str]:
    """Label value -> region name, from an MRIcron names file (lines ``"<value> <name> ..."``; blank lines skipped)."""
    names = {}
    for line in Path(names_file).read_text().splitlines():
        if not line.strip():
            continue
        index, name = line.split()[:2]
        names[int(index)] = name
    return names


def cached_arrays(
    prefix: str, key: list[Any], build: Callable[[], dict[str, np.ndarray]], progress: bool, what: str
) -> dict[str, np.ndarray]:
    """Arrays built once per machine: read from ``cache_dir()/<prefix>-<hash of key>.npz``, else built and written.

    An unreadable or incomplete file is rebuilt; a cache that cannot be written is reported, not raised.

    Args:
        prefix: the file name's start, a data version (bump it when what shapes the arrays changes).
        key: JSON-serialisable values the arrays depend on (file stamps, versions, settings).
        build: makes the arrays by name.
        progress: print what is read or built to stderr.
        what: the arrays' name in those messages.
    """
    digest = hashlib.sha1(json.dumps([prefix, *key]).encode()).hexdigest()[:12]
    file = cache_dir() / f"{prefix}-{digest}.npz"
    if file.is_file():
        try:
            with np.load(file) as stored:
                arrays = {name: stored[name] for name in stored.files}
            report_progress(progress, f"{what} read from {file}")
            return arrays
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):
            pass  # unreadable: rebuilt and written again below
    start = time.perf_counter()
    arrays = build()
    report_progress(progress, f"{what} built in {time.perf_counter() - start:.1f} s")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(file, "wb") as f:  # a concurrent reader never sees half a file
            np.savez_compressed(f, **arrays)
    except OSError as e:
        report_progress(progress, f"could not write the cache {file}: {e}")
    return arrays


def _standardise(volume: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """Percentile scaling to [0, 1] over the brain, then zero mean and unit std over patches centred in the brain."""
    lo, hi = np.percentile(volume[brain], INTENSITY_PERCENTILES)
    scaled = np.clip((volume - lo) / (hi - lo), 0.0, 1.0)
    # a patch centred near the brain's edge is partly background: the statistics of the patches themselves, not of
    # the brain's voxels, make the network's inputs come out near zero mean and unit std
    centres = np.argwhere(brain)
    chosen = np.random.default_rng([SPLIT_SEED, 10]).choice(len(centres), NORM_PATCHES, replace=False)
    planes = np.arange(NORM_PATCHES) % len(PLANES)
    seen = extract_patches(scaled, PatchSet(centres[chosen], planes, np.zeros(NORM_PATCHES, dtype=np.int64)))
    return ((scaled - seen.mean()) / seen.std()).astype(np.float32)


def _aal_lut(names_file: Path) -> np.ndarray:
    lut = np.full(256, -1, dtype=np.int8)
    for index, name in read_label_names(names_file).items():
        groups = [g for g, prefixes in AAL_GROUPS.items() if name.startswith(prefixes)]
        if len(groups) != 1:
            raise RuntimeError(f"AAL region {name!r} of {names_file} matches {len(groups)} macro-regions, not one.")
        lut[int(index)] = ANATOMY_CLASSES.index(groups[0])
    return lut


def _brodmann_lut() -> np.ndarray:
    lut = np.full(256, -1, dtype=np.int8)
    for c, areas in enumerate(BRODMANN_SYSTEMS.values()):
        lut[list(areas)] = c
    return lut


def _build_volumes(data_dir: Path) -> BrainVolumes:
    nib = _require("nibabel")
    mni = _resample(load_mni152("t1"), order=1)
    gm = _resample(load_mni152("gm"), order=1)
    wm = _resample(load_mni152("wm"), order=1)
    mni_brain = _resample(load_mni152("brain_mask"), order=0) > 0
    probs = np.stack([gm, wm, np.clip(1.0 - gm - wm, 0.0, 1.0)])
    tissue = probs.argmax(0).astype(np.int8)
    tissue[~mni_brain | (probs.max(0) < TISSUE_CONFIDENCE)] = -1
    del probs, gm, wm

    colin = _resample(nib.load(data_dir / "ch2bet.nii.gz"), order=1)
    anatomy = _aal_lut(data_dir / "aal.nii.txt")[_resample(nib.load(data_dir / "aal.nii.gz"), order=0)]
    function = _brodmann_lut()[_resample(nib.load(data_dir / "brodmann.nii.gz"), order=0)]
    function[~mni_brain] = -1
    return BrainVolumes(
        mni_t1=_standardise(mni, mni_brain),
        colin_t1=_standardise(colin, colin > 0),
        tissue=tissue,
        anatomy=anatomy,
        function=function,
    )


def _cache_file(paths: list[Path], cache: Path) -> Path:
    nilearn = _require("nilearn")
    stamp = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    key = json.dumps([CACHE_VERSION, nilearn.__version__, stamp, GRID_AFFINE.tolist(), GRID_SHAPE, TISSUE_CONFIDENCE])
    return cache / f"{CACHE_VERSION}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"


# What this process has built, by (what, data folder, cache folder): each is built once per process.
_MEMO: dict[tuple[str, Path, Path], Any] = {}


def _memo(what: str, build: Callable[[bool], Any], progress: bool, atlases: bool = False) -> Any:
    # the files are checked on every call, so neither this memo nor the disk cache hides missing data
    _check_files(MRICRON_DIR, MRICRON_FILES + ATLAS_FILES if atlases else MRICRON_FILES)
    key = (what, MRICRON_DIR, cache_dir())
    if key not in _MEMO:
        _MEMO[key] = build(progress)
    return _MEMO[key]


def _volumes(progress: bool) -> BrainVolumes:
    file = _cache_file(_check_files(MRICRON_DIR), cache_dir())
    fields = BrainVolumes.__dataclass_fields__
    if file.is_file():
        try:
            with np.load(file) as stored:
                volumes = BrainVolumes(**{name: stored[name] for name in fields})
            report_progress(progress, f"brain volumes read from {file}")
            return volumes
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):
            pass  # unreadable or from an older layout: rebuilt and written again below
    start = time.perf_counter()
    report_progress(progress, "building the brain volumes on the 1.5 mm MNI grid (once; then cached on disk)")
    volumes = _build_volumes(MRICRON_DIR)
    report_progress(progress, f"brain volumes built in {time.perf_counter() - start:.1f} s")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(file, "wb") as f:  # a concurrent reader never sees half a file
            np.savez(f, **{name: getattr(volumes, name) for name in fields})
    except OSError as e:
        report_progress(progress, f"could not write the cache {file}: {e}")
    return volumes


def brain_volumes(progress: bool = False) -> BrainVolumes:
    """The benchmark's volumes on the 1.5 mm MNI grid, built once per process (and once per machine, on disk).

    Args:
        progress: print what is being built to stderr.

    Returns:
        The two standardised T1 templates and the three label volumes, as :class:`BrainVolumes`.

    Raises:
        FileNotFoundError: when an MRIcron template is missing (install ``mricron-data``).
        RuntimeError: when nilearn, nibabel or scipy is missing.
    """
    return _memo("volumes", _volumes, progress)


def _aicha_lut(names_file: Path) -> np.ndarray:
    # AICHA names read G_Frontal_Sup-1, S_Intraparietal-2, N_Thalamus-1: kind, region, part
    groups = {g: AAL_GROUPS[g] + AICHA_EXTRA_GROUPS.get(g, ()) for g in AICHA_CLASSES}
    lut = np.full(256, -1, dtype=np.int8)
    for index, name in read_label_names(names_file).items():
        region = name.split("_", 1)[1].rsplit("-", 1)[0]
        matches = {g for g, prefixes in groups.items() if region.startswith(prefixes)}
        if len(matches) != 1:
            raise RuntimeError(f"AICHA region {name!r} of {names_file} matches {len(matches)} groups, not one.")
        lut[int(index)] = AICHA_CLASSES.index(matches.pop())
    return lut


def _exact_name_lut(
    names_file: Path, groups: Mapping[str, tuple[str, ...]], region: Callable[[str], str]
) -> np.ndarray:
    """Label value -> index of the group that lists its region name exactly; ``-1`` for regions no group lists."""
    lut = np.full(256, -1, dtype=np.int8)
    seen: set[str] = set()
    for index, name in read_label_names(names_file).items():
        for c, names in enumerate(groups.values()):
            if region(name) in names:
                lut[int(index)] = c
                seen.add(region(name))
    missing = sorted(set(sum(groups.values(), ())) - seen)
    if missing:
        raise RuntimeError(f"{names_file} has no region named {', '.join(missing)}.")
    return lut


def _index_lut(groups: Mapping[str, tuple[int, ...]]) -> np.ndarray:
    lut = np.full(256, -1, dtype=np.int8)
    for c, values in enumerate(groups.values()):
        lut[list(values)] = c
    return lut


def _build_atlases(data_dir: Path) -> dict[str, np.ndarray]:
    """The variants' atlases on the grid, as stored (labels ungrouped), and nilearn's MNI152 brain mask."""
    nib = _require("nibabel")
    return {
        "mni_brain": _resample(load_mni152("brain_mask"), order=0) > 0,
        "harvard_oxford": _resample(nib.load(data_dir / ATLAS_FILES[0]), order=0).astype(np.uint8),
        "aicha": _resample(nib.load(data_dir / ATLAS_FILES[1]), order=0).astype(np.uint8),
        "jhu": _resample(nib.load(data_dir / ATLAS_FILES[3]), order=0).astype(np.uint8),
        "aal": _resample(nib.load(data_dir / "aal.nii.gz"), order=0).astype(np.uint8),
    }


def _atlases(progress: bool) -> dict[str, np.ndarray]:
    nilearn = _require("nilearn")
    paths = _check_files(MRICRON_DIR, ATLAS_FILES)
    stamp = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    key = json.dumps([ATLAS_CACHE_VERSION, nilearn.__version__, stamp, GRID_AFFINE.tolist(), GRID_SHAPE])
    file = cache_dir() / f"{ATLAS_CACHE_VERSION}-{hashlib.sha1(key.encode()).hexdigest()[:12]}.npz"
    names = ("mni_brain", "harvard_oxford", "aicha", "jhu", "aal")
    if file.is_file():
        try:
            with np.load(file) as stored:
                atlases = {name: stored[name] for name in names}
            report_progress(progress, f"brain atlases read from {file}")
            return atlases
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile):
            pass  # unreadable: rebuilt and written again below
    start = time.perf_counter()
    atlases = _build_atlases(MRICRON_DIR)
    report_progress(progress, f"brain atlases resampled in {time.perf_counter() - start:.1f} s")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(file, "wb") as f:
            np.savez_compressed(f, **atlases)
    except OSError as e:
        report_progress(progress, f"could not write the cache {file}: {e}")
    return atlases


def _variant_labels(progress: bool) -> dict[str, np.ndarray]:
    volumes = brain_volumes(progress)
    atlases = _atlases(progress)
    brain, tissue = atlases["mni_brain"], volumes.tissue
    lobe = _index_lut(HARVARD_OXFORD_LOBES)[atlases["harvard_oxford"]]
    lobe[~brain] = -1
    aicha = _aicha_lut(MRICRON_DIR / ATLAS_FILES[2])[atlases["aicha"]]
    aicha[~brain] = -1
    # the targets' classes: lobe-major (frontal grey, frontal white, temporal grey, ...) and tracts before cortex
    cortex = (lobe >= 0) & (lobe < len(LOBES))
    tissue_lobe = np.where(cortex & (tissue >= 0) & (tissue < 2), 2 * lobe + tissue, -1).astype(np.int8)
    tract = _index_lut(JHU_FAMILIES)[atlases["jhu"]]
    tract_cortex = np.full(GRID_SHAPE, -1, dtype=np.int8)
    white = (tract >= 0) & (tissue == TISSUE_CLASSES.index("white matter"))
    grey = cortex & (tissue == TISSUE_CLASSES.index("grey matter"))
    tract_cortex[white] = tract[white]
    tract_cortex[grey] = len(JHU_FAMILIES) + lobe[grey]

    def aicha_regions(groups: Mapping[str, tuple[str, ...]]) -> np.ndarray:
        # AICHA names carry a kind prefix (G_, S_, N_) and a part suffix (-1, -2, ...); inside the brain mask only
        lut = _exact_name_lut(MRICRON_DIR / ATLAS_FILES[2], groups, lambda n: n.split("_", 1)[1].rsplit("-", 1)[0])
        regions = lut[atlases["aicha"]]
        regions[~brain] = -1
        return regions

    def aal_regions(groups: Mapping[str, tuple[str, ...]]) -> np.ndarray:
        # AAL names carry a side suffix (_L, _R); on Colin27, so not masked by MNI152's brain
        lut = _exact_name_lut(MRICRON_DIR / "aal.nii.txt", groups, lambda n: n.removesuffix("_L").removesuffix("_R"))
        return lut[atlases["aal"]]

    anterior, aicha_posterior = aicha_regions(AICHA_ANTERIOR), aicha_regions(AICHA_POSTERIOR)
    posterior, aal_anterior = aal_regions(AAL_POSTERIOR), aal_regions(AAL_ANTERIOR)
    # both halves as one target, drawn on Colin27 and carried onto MNI152 by the affine, so kept inside its brain there
    aal_split = aal_regions(AAL_SPLIT)
    aal_split[~brain] = -1
    split = _index_lut(HARVARD_OXFORD_SPLIT)[atlases["harvard_oxford"]]
    split[~brain] = -1
    return {
        "ho_lobe": lobe,
        "ho_split": split,
        "aicha_group": aicha,
        "tissue_lobe": tissue_lobe,
        "tract_cortex": tract_cortex,
        "aicha_anterior": anterior,
        "aal_posterior": posterior,
        "aicha_posterior": aicha_posterior,
        "aal_anterior": aal_anterior,
        "aal_split": aal_split,
    }


def brain_label_volumes(atlases: bool = False, progress: bool = False) -> dict[str, np.ndarray]:
    """The label volumes on the grid by name, int8 class indices with ``-1`` where a voxel is no centre.

    Args:
        atlases: also the variants' volumes (``ho_lobe``, ``aicha_group``, ``tissue_lobe``, ``tract_cortex``,
            ``aicha_anterior``, ``aal_posterior``, ``ho_split``), which need the files of ``ATLAS_FILES``; without
            it only ``tissue``, ``anatomy`` and ``function``.
        progress: print what is being built to stderr.

    Raises:
        FileNotFoundError: when an MRIcron template or atlas is missing (install ``mricron-data``).
        RuntimeError: when nilearn, nibabel or scipy is missing.
    """
    volumes = brain_volumes(progress)
    labels = {"tissue": volumes.tissue, "anatomy": volumes.anatomy, "function": volumes.function}
    if atlases:
        labels |= _memo("atlas labels", _variant_labels, progress, atlases=True)
    return labels


def _heldout_blocks(
    function: np.ndarray,
    num_classes: int,
    minimum: int = TARGET_TEST,
    avoid: np.ndarray | None = None,
    first_draw: int = 100,
) -> np.ndarray:
    """The target's test blocks: a fixed draw of ``HELDOUT_FRACTION`` of the labelled (|x|, y, z) blocks.

    The first draw in which every class has at least ``minimum`` candidate centres is taken, so the test set is
    as balanced as the map allows. ``avoid`` (validation blocks): voxels no block may hold; the draw is then over the
    blocks with labelled voxels outside it, seeded from ``first_draw``, and returns only their voxels outside it.
    """
    half = GRID_SHAPE[0] // 2
    i, j, k = np.indices(GRID_SHAPE, sparse=True)
    fold = np.minimum(i, GRID_SHAPE[0] - 1 - i)  # voxel i and its mirror 119 - i share a block
    blocks_y, blocks_z = -(-GRID_SHAPE[1] // BLOCK), -(-GRID_SHAPE[2] // BLOCK)
    block = ((half - 1 - fold) // BLOCK * blocks_y + j // BLOCK) * blocks_z + k // BLOCK
    labelled = function >= 0
    if avoid is not None:
        labelled = labelled & ~avoid
    candidates = np.unique(block[labelled])
    n_held = round(HELDOUT_FRACTION * len(candidates))
    best, best_min = None, -1
    for attempt in range(100):
        held = np.random.default_rng([SPLIT_SEED, first_draw + attempt]).choice(candidates, n_held, replace=False)
        mask = np.isin(block, held)
        if avoid is not None:
            mask &= ~avoid
        smallest = np.bincount(function[mask & labelled], minlength=num_classes).min()
        if smallest > best_min:
            best, best_min = mask, smallest
        if smallest >= minimum:
            break
    return best


def _draw(
    pool: PatchSet,
    sizes: tuple[int, ...],
    rng: np.random.Generator,
    num_classes: int,
    planes_allowed: tuple[int, ...] = (0, 1, 2),
) -> list[PatchSet]:
    """Disjoint splits of ``pool``, ``sizes[s]`` centres per class (fewer if a class runs out), in equal shares of
    the ``planes_allowed``."""
    parts: list[list[np.ndarray]] = [[] for _ in sizes]
    for c in range(num_classes):
        members = rng.permutation(np.flatnonzero(pool.labels == c))
        bounds = np.minimum(np.cumsum((0, *sizes)), len(members))
        for s in range(len(sizes)):
            parts[s].append(members[bounds[s] : bounds[s + 1]])
    splits = []
    for chosen in parts:
        idx = np.concatenate(chosen)
        idx = idx[rng.permutation(len(idx))]
        # with all three planes this is the permutation itself: the brain task's draws stay as recorded
        planes = np.asarray(planes_allowed)[rng.permutation(np.arange(len(idx)) % len(planes_allowed))]
        splits.append(PatchSet(pool.centres[idx], planes, pool.labels[idx]))
    return splits


def _pool(labels: np.ndarray, where: np.ndarray) -> PatchSet:
    centres = np.argwhere(where & (labels >= 0))
    values = labels[tuple(centres.T)].astype(np.int64)
    return PatchSet(centres, np.zeros(len(centres), dtype=np.int64), values)


def _layout(bench: BrainBenchmark, progress: bool) -> BrainLayout:
    volumes = brain_volumes(progress)
    label_volumes = brain_label_volumes(bench.atlases, progress)
    labels = {spec.labels: label_volumes[spec.labels] for spec in (bench.source_a, bench.source_b, bench.target)}
    target_labels = labels[bench.target.labels]
    n_target = len(bench.target.classes)
    heldout = _heldout_blocks(target_labels, n_target)
    ndimage = _require("scipy.ndimage")

    def widened(blocks: np.ndarray) -> np.ndarray:
        return ndimage.maximum_filter(blocks.view(np.uint8), size=2 * GUARD + 1) > 0

    excluded = widened(heldout)
    val_blocks = None
    # on a new subject the blocks only keep validation apart from the test: no network trains on that brain
    new_subject = bench.evaluate_on is not None
    allowed = np.ones(GRID_SHAPE, dtype=bool) if new_subject else ~excluded
    if bench.validation == "blocks":
        # drawn as the test blocks are, outside the test blocks' guard, from draws the test's rule never reaches
        val_blocks = _heldout_blocks(
            target_labels, n_target, minimum=bench.val_per_class, avoid=excluded, first_draw=300
        )
        if not new_subject:
            allowed = allowed & ~widened(val_blocks)

    def source_allowed(spec: TaskSpec) -> np.ndarray:
        other_brain = spec.image != bench.target.image
        return np.ones(GRID_SHAPE, dtype=bool) if other_brain and not bench.guard_other_brain else allowed

    a_train, a_val = _draw(
        _pool(labels[bench.source_a.labels], source_allowed(bench.source_a)),
        (SOURCE_TRAIN, SOURCE_VAL),
        np.random.default_rng([SPLIT_SEED, 1]),
        len(bench.source_a.classes),
        bench.source_a.planes,
    )
    b_train, b_val = _draw(
        _pool(labels[bench.source_b.labels], source_allowed(bench.source_b)),
        (SOURCE_TRAIN, SOURCE_VAL),
        np.random.default_rng([SPLIT_SEED, 2]),
        len(bench.source_b.classes),
        bench.source_b.planes,
    )
    target = _pool(target_labels, allowed)
    evaluated_labels = target_labels
    if new_subject:  # centres inside the new subject's brain as well as the target's labels
        image = getattr(volumes, bench.evaluate_on)
        evaluated_labels = np.where(image > image.min(), target_labels, -1)
    val_pool = target if val_blocks is None else _pool(evaluated_labels, val_blocks)
    (target_val,) = _draw(val_pool, (bench.val_per_class,), np.random.default_rng([SPLIT_SEED, 3]), n_target)
    (target_test,) = _draw(
        _pool(evaluated_labels, heldout), (TARGET_TEST,), np.random.default_rng([SPLIT_SEED, 4]), n_target
    )
    # the training pool is what validation left: train, val and test never share a centre voxel
    taken = np.zeros(GRID_SHAPE, dtype=bool)
    taken[tuple(target_val.centres.T)] = True
    keep = ~taken[tuple(target.centres.T)]
    target_pool = PatchSet(target.centres[keep], target.planes[keep], target.labels[keep])
    return BrainLayout(
        volumes,
        heldout,
        excluded,
        a_train,
        a_val,
        b_train,
        b_val,
        target_val,
        target_test,
        target_pool,
        bench,
        labels,
        val_blocks,
    )


def brain_benchmark(variant: str | None = None) -> BrainBenchmark:
    """The definition of the brain task (``variant=None``) or of one of :data:`BRAIN_VARIANTS`.

    Raises:
        ValueError: for an unknown variant (the message lists them).
    """
    if variant is None:
        return BRAIN_TASK
    if variant not in BRAIN_VARIANTS:
        raise ValueError(f"unknown brain variant {variant!r}; choose one of {', '.join(BRAIN_VARIANTS)}.")
    return BRAIN_VARIANTS[variant]


def brain_layout(progress: bool = False, variant: str | None = None) -> BrainLayout:
    """The fixed splits of a brain benchmark (same for every seed and every ``k``), built once per process.

    Args:
        progress: print what is being built to stderr.
        variant: ``None`` for the brain task, else a key of :data:`BRAIN_VARIANTS`.

    Returns:
        The volumes, the held-out blocks and the centres, planes and labels of every fixed split, as
        :class:`BrainLayout`.

    Raises:
        ValueError: for an unknown variant.
        FileNotFoundError: when an MRIcron template is missing (install ``mricron-data``).
        RuntimeError: when nilearn, nibabel or scipy is missing.
    """
    bench = brain_benchmark(variant)
    what = "layout" if variant is None else f"layout {variant}"
    return _memo(what, partial(_layout, bench), progress, atlases=bench.atlases)


def target_train_patches(layout: BrainLayout, k: int, seed: int) -> PatchSet:
    """The target's ``k``-shot training subset drawn with ``seed`` from ``layout.target_pool`` (nested in ``k``).

    Args:
        layout: the fixed splits, from :func:`brain_layout`.
        k: patches per class.
        seed: seed of the draw of centres and planes.

    Raises:
        ValueError: when ``k`` < 1 or exceeds a class's pool.
    """
    return _target_pool_split(layout, k, seed)[0]


def target_unlabeled_patches(layout: BrainLayout, k: int, seed: int, limit: int = UNLABELED_MAX) -> PatchSet:
    """Up to ``limit`` patches of the target's training pool that the ``k``-shot subset of ``seed`` did not label,
    in an order that does not depend on the seed (each centre on the plane the seed's draw gives it)."""
    return _target_pool_split(layout, k, seed, limit)[1]


def _target_pool_split(layout: BrainLayout, k: int, seed: int, limit: int = 0) -> tuple[PatchSet, PatchSet]:
    pool = layout.target_pool
    idx = k_shot_indices(pool.labels, k, seed, len(layout.benchmark.target.classes))
    # one plane per pool centre, drawn from the seed alone, keeps the subsets nested in k
    planes = np.random.default_rng([seed, 1]).integers(0, len(PLANES), len(pool.labels))
    order = np.random.default_rng([SPLIT_SEED, 11]).permutation(len(pool.labels))
    rest = order[~np.isin(order, idx)][:limit]
    return (
        PatchSet(pool.centres[idx], planes[idx], pool.labels[idx]),
        PatchSet(pool.centres[rest], planes[rest], pool.labels[rest]),
    )


def extract_patches(volume: np.ndarray, patches: PatchSet, size: int = PATCH_SIZE) -> np.ndarray:
    """The ``size`` x ``size`` slices of ``volume`` at ``patches``, float32 of shape ``(n, size, size)``.

    A patch spans voxels ``c - size // 2`` to ``c + size // 2 - 1`` along both in-plane axes, in grid order (axial:
    x then y; coronal: x then z; sagittal: y then z). Beyond the grid it holds the volume's background value.

    Args:
        volume: a volume on the benchmark grid.
        patches: centres and planes.
        size: side of a patch in voxels.
    """
    half = size // 2
    padded = np.pad(volume, half, constant_values=volume.min())
    out = np.empty((len(patches.centres), size, size), dtype=np.float32)
    for n, ((x, y, z), plane) in enumerate(zip(patches.centres, patches.planes, strict=True)):
        if plane == 0:
            out[n] = padded[x : x + size, y : y + size, z + half]
        elif plane == 1:
            out[n] = padded[x : x + size, y + half, z : z + size]
        else:
            out[n] = padded[x + half, y : y + size, z : z + size]
    return out


def _fixed_arrays(variant: str | None, progress: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    layout = brain_layout(progress, variant)
    bench = layout.benchmark

    def image(spec: TaskSpec) -> np.ndarray:
        return getattr(layout.volumes, spec.image)

    evaluated_image = getattr(layout.volumes, bench.evaluate_on or bench.target.image)
    splits = {
        "a_train": (image(bench.source_a), layout.source_a_train),
        "a_val": (image(bench.source_a), layout.source_a_val),
        "b_train": (image(bench.source_b), layout.source_b_train),
        "b_val": (image(bench.source_b), layout.source_b_val),
        "t_val": (evaluated_image, layout.target_val),
        "t_test": (evaluated_image, layout.target_test),
    }
    return {name: (extract_patches(volume, ps), ps.labels) for name, (volume, ps) in splits.items()}


def load_brain_tasks(k: int, seed: int, progress: bool = True, variant: str | None = None) -> BenchmarkTasks:
    """A brain benchmark: by default tissue and anatomy sources and a ``k``-shot functional-system target.

    Args:
        k: target training patches per class.
        seed: seed of the target's training subset; nothing else depends on it (nor on ``k``).
        progress: print what is being built, and how long it took, to stderr.
        variant: ``None`` for the brain task, else a key of :data:`BRAIN_VARIANTS` (other sources or target on the
            same grid; the task is then named ``"brain_<variant>"``).

    Returns:
        Source A (the brain task: 3 tissue classes, 600 train / 100 val per class), source B (7 AAL macro-regions,
        600 / 100 per class) and the target (7 Brodmann systems: ``k`` train, 50 val and up to 150 test per class), as
        :class:`~medmerge_bench.data.tasks.BenchmarkTasks`; a variant has the same counts per class.

    Raises:
        ValueError: when ``k`` < 1 or exceeds a class's training pool, or for an unknown variant.
        FileNotFoundError: when an MRIcron template is missing (install ``mricron-data``).
        RuntimeError: when nilearn, nibabel or scipy is missing.
    """
    start = time.perf_counter()
    bench = brain_benchmark(variant)
    what = "arrays" if variant is None else f"arrays {variant}"
    arrays = _memo(what, partial(_fixed_arrays, variant), progress, atlases=bench.atlases)
    layout = brain_layout(progress, variant)
    # one draw gives both the labelled subset and the unlabelled rest
    train, rest = _target_pool_split(layout, k, seed, UNLABELED_MAX)
    target_volume = getattr(layout.volumes, bench.target.image)
    x_train = extract_patches(target_volume, train)
    unlabeled = extract_patches(target_volume, rest)

    def data(spec: TaskSpec, prefix: str, **given: TensorDataset) -> TaskData:
        sets = {
            s: make_tensor_dataset(*arrays[f"{prefix}_{s}"])
            for s in ("train", "val", "test")
            if f"{prefix}_{s}" in arrays
        }
        sets.update(given)
        return TaskData(spec.name, sets["train"], sets["val"], sets.get("test"), list(spec.classes))

    classes = bench.target.classes
    test_counts = np.bincount(layout.target_test.labels, minlength=len(classes))
    counts = ", ".join(f"{name} {n}" for name, n in zip(classes, test_counts, strict=True))
    tasks = BenchmarkTasks(
        name=bench.name,
        source_a=data(bench.source_a, "a"),
        source_b=data(bench.source_b, "b"),
        target=data(bench.target, "t", train=make_tensor_dataset(x_train, train.labels)),
        notes=f"{bench.notes} Target test patches per class: {counts}.",
    )
    tasks.target.unlabeled = torch.from_numpy(unlabeled[:, None])
    report_progress(progress, f"{bench.name} tasks ready in {time.perf_counter() - start:.1f} s (k={k}, seed={seed})")
    return tasks

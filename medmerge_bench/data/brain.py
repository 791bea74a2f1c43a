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
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np
from torch.utils.data import TensorDataset

from medmerge_bench.data.tasks import (
    PATCH_SIZE,
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
    "BRODMANN_SYSTEMS",
    "AAL_GROUPS",
    "BrainLayout",
    "BrainVolumes",
    "FUNCTION_CLASSES",
    "MRICRON_DIR",
    "PatchSet",
    "TISSUE_CLASSES",
    "brain_layout",
    "brain_volumes",
    "extract_patches",
    "load_brain_tasks",
    "target_train_patches",
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
class BrainLayout:
    """The fixed splits of the brain benchmark: everything but the target's k-shot training subset.

    Args:
        volumes: the volumes the patches are cut from.
        heldout: bool grid, the voxels of the target's held-out test blocks.
        excluded: bool grid, the held-out blocks widened by ``GUARD`` voxels; no non-test centre lies in it.
        source_a_train: tissue patches for training (MNI152).
        source_a_val: tissue patches for validation.
        source_b_train: anatomy patches for training (Colin27).
        source_b_val: anatomy patches for validation.
        target_val: function patches for validation (MNI152).
        target_test: function patches from the held-out blocks.
        target_pool: candidate centres of the target's training subset (``planes`` unused: the seed draws them).
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


def _require(module: str) -> ModuleType:
    # Imported when the volumes are built, not with this module: nilearn alone takes seconds to import.
    package = module.split(".")[0]
    installs = {"nilearn": INSTALL_NILEARN, "nibabel": "pip install nibabel", "scipy": "pip install scipy"}
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise RuntimeError(f"the brain benchmark needs {package}, which is not installed: {installs[package]}") from e


def _check_files(data_dir: Path) -> list[Path]:
    paths = [data_dir / name for name in MRICRON_FILES]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"the brain benchmark needs the MRIcron templates, missing: {', '.join(missing)}. "
            f"Install them with: {INSTALL_MRICRON}"
        )
    return paths


def _resample(img: Any, order: int) -> np.ndarray:
    """``img`` on the benchmark grid: linear (``order=1``) for intensities, nearest (``order=0``) for labels."""
    ndimage = _require("scipy.ndimage")
    data = np.asanyarray(img.dataobj)
    if order > 0:
        data = data.astype(np.float32)
    grid_to_voxel = np.linalg.inv(img.affine) @ GRID_AFFINE
    return ndimage.affine_transform(
        data, grid_to_voxel[:3, :3], offset=grid_to_voxel[:3, 3], output_shape=GRID_SHAPE, order=order, cval=0
    )


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
    for line in names_file.read_text().splitlines():
        if not line.strip():
            continue
        index, name = line.split()[:2]
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
    datasets = _require("nilearn.datasets")
    mni = _resample(datasets.load_mni152_template(resolution=1), order=1)
    gm = _resample(datasets.load_mni152_gm_template(resolution=1), order=1)
    wm = _resample(datasets.load_mni152_wm_template(resolution=1), order=1)
    mni_brain = _resample(datasets.load_mni152_brain_mask(resolution=1), order=0) > 0
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


def _memo(what: str, build: Callable[[bool], Any], progress: bool) -> Any:
    # the files are checked on every call, so neither this memo nor the disk cache hides missing data
    _check_files(MRICRON_DIR)
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


def _heldout_blocks(function: np.ndarray) -> np.ndarray:
    """The target's test blocks: a fixed draw of ``HELDOUT_FRACTION`` of the labelled (|x|, y, z) blocks.

    The first draw in which every class has at least ``TARGET_TEST`` candidate centres is taken, so the test set is
    as balanced as the map allows.
    """
    half = GRID_SHAPE[0] // 2
    i, j, k = np.indices(GRID_SHAPE, sparse=True)
    fold = np.minimum(i, GRID_SHAPE[0] - 1 - i)  # voxel i and its mirror 119 - i share a block
    blocks_y, blocks_z = -(-GRID_SHAPE[1] // BLOCK), -(-GRID_SHAPE[2] // BLOCK)
    block = ((half - 1 - fold) // BLOCK * blocks_y + j // BLOCK) * blocks_z + k // BLOCK
    labelled = function >= 0
    candidates = np.unique(block[labelled])
    n_held = round(HELDOUT_FRACTION * len(candidates))
    best, best_min = None, -1
    for attempt in range(100):
        held = np.random.default_rng([SPLIT_SEED, 100 + attempt]).choice(candidates, n_held, replace=False)
        mask = np.isin(block, held)
        smallest = np.bincount(function[mask & labelled], minlength=len(FUNCTION_CLASSES)).min()
        if smallest > best_min:
            best, best_min = mask, smallest
        if smallest >= TARGET_TEST:
            break
    return best


def _draw(pool: PatchSet, sizes: tuple[int, ...], rng: np.random.Generator, num_classes: int) -> list[PatchSet]:
    """Disjoint splits of ``pool``, ``sizes[s]`` centres per class (fewer if a class runs out), planes balanced."""
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
        planes = rng.permutation(np.arange(len(idx)) % len(PLANES))
        splits.append(PatchSet(pool.centres[idx], planes, pool.labels[idx]))
    return splits


def _pool(labels: np.ndarray, where: np.ndarray) -> PatchSet:
    centres = np.argwhere(where & (labels >= 0))
    values = labels[tuple(centres.T)].astype(np.int64)
    return PatchSet(centres, np.zeros(len(centres), dtype=np.int64), values)


def _layout(progress: bool) -> BrainLayout:
    volumes = brain_volumes(progress)
    heldout = _heldout_blocks(volumes.function)
    ndimage = _require("scipy.ndimage")
    excluded = ndimage.maximum_filter(heldout.view(np.uint8), size=2 * GUARD + 1) > 0
    allowed = ~excluded
    a_train, a_val = _draw(
        _pool(volumes.tissue, allowed),
        (SOURCE_TRAIN, SOURCE_VAL),
        np.random.default_rng([SPLIT_SEED, 1]),
        len(TISSUE_CLASSES),
    )
    b_train, b_val = _draw(
        _pool(volumes.anatomy, allowed),
        (SOURCE_TRAIN, SOURCE_VAL),
        np.random.default_rng([SPLIT_SEED, 2]),
        len(ANATOMY_CLASSES),
    )
    n_function = len(FUNCTION_CLASSES)
    target = _pool(volumes.function, allowed)
    (target_val,) = _draw(target, (TARGET_VAL,), np.random.default_rng([SPLIT_SEED, 3]), n_function)
    (target_test,) = _draw(
        _pool(volumes.function, heldout), (TARGET_TEST,), np.random.default_rng([SPLIT_SEED, 4]), n_function
    )
    # the training pool is what validation left: train, val and test never share a centre voxel
    taken = np.zeros(GRID_SHAPE, dtype=bool)
    taken[tuple(target_val.centres.T)] = True
    keep = ~taken[tuple(target.centres.T)]
    target_pool = PatchSet(target.centres[keep], target.planes[keep], target.labels[keep])
    return BrainLayout(volumes, heldout, excluded, a_train, a_val, b_train, b_val, target_val, target_test, target_pool)


def brain_layout(progress: bool = False) -> BrainLayout:
    """The fixed splits of the brain benchmark (same for every seed and every ``k``), built once per process.

    Args:
        progress: print what is being built to stderr.

    Returns:
        The volumes, the held-out blocks and the centres, planes and labels of every fixed split, as
        :class:`BrainLayout`.

    Raises:
        FileNotFoundError: when an MRIcron template is missing (install ``mricron-data``).
        RuntimeError: when nilearn, nibabel or scipy is missing.
    """
    return _memo("layout", _layout, progress)


def target_train_patches(layout: BrainLayout, k: int, seed: int) -> PatchSet:
    """The target's ``k``-shot training subset drawn with ``seed`` from ``layout.target_pool`` (nested in ``k``).

    Args:
        layout: the fixed splits, from :func:`brain_layout`.
        k: patches per class.
        seed: seed of the draw of centres and planes.

    Raises:
        ValueError: when ``k`` < 1 or exceeds a class's pool.
    """
    pool = layout.target_pool
    idx = k_shot_indices(pool.labels, k, seed, len(FUNCTION_CLASSES))
    # one plane per pool centre, drawn from the seed alone, keeps the subsets nested in k
    planes = np.random.default_rng([seed, 1]).integers(0, len(PLANES), len(pool.labels))
    return PatchSet(pool.centres[idx], planes[idx], pool.labels[idx])


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


def _fixed_arrays(progress: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    layout = brain_layout(progress)
    mni, colin = layout.volumes.mni_t1, layout.volumes.colin_t1
    splits = {
        "a_train": (mni, layout.source_a_train),
        "a_val": (mni, layout.source_a_val),
        "b_train": (colin, layout.source_b_train),
        "b_val": (colin, layout.source_b_val),
        "t_val": (mni, layout.target_val),
        "t_test": (mni, layout.target_test),
    }
    return {name: (extract_patches(volume, ps), ps.labels) for name, (volume, ps) in splits.items()}


def load_brain_tasks(k: int, seed: int, progress: bool = True) -> BenchmarkTasks:
    """The brain benchmark: tissue and anatomy sources, a ``k``-shot functional-system target.

    Args:
        k: target training patches per class.
        seed: seed of the target's training subset; nothing else depends on it (nor on ``k``).
        progress: print what is being built, and how long it took, to stderr.

    Returns:
        Source A (3 tissue classes, 600 train / 100 val per class), source B (7 AAL macro-regions, 600 / 100 per
        class) and the target (7 Brodmann systems: ``k`` train, 50 val and up to 150 test per class), as
        :class:`~medmerge_bench.data.tasks.BenchmarkTasks`.

    Raises:
        ValueError: when ``k`` < 1 or exceeds a class's training pool.
        FileNotFoundError: when an MRIcron template is missing (install ``mricron-data``).
        RuntimeError: when nilearn, nibabel or scipy is missing.
    """
    start = time.perf_counter()
    arrays = _memo("arrays", _fixed_arrays, progress)
    layout = brain_layout(progress)
    train = target_train_patches(layout, k, seed)
    x_train = extract_patches(layout.volumes.mni_t1, train)

    def data(name: str, classes: list[str], prefix: str, **given: TensorDataset) -> TaskData:
        sets = {
            s: make_tensor_dataset(*arrays[f"{prefix}_{s}"])
            for s in ("train", "val", "test")
            if f"{prefix}_{s}" in arrays
        }
        sets.update(given)
        return TaskData(name, sets["train"], sets["val"], sets.get("test"), list(classes))

    test_counts = np.bincount(layout.target_test.labels, minlength=len(FUNCTION_CLASSES))
    counts = ", ".join(f"{name} {n}" for name, n in zip(FUNCTION_CLASSES, test_counts, strict=True))
    tasks = BenchmarkTasks(
        name="brain",
        source_a=data("brain/tissue", TISSUE_CLASSES, "a"),
        source_b=data("brain/anatomy", ANATOMY_CLASSES, "b"),
        target=data("brain/function", FUNCTION_CLASSES, "t", train=make_tensor_dataset(x_train, train.labels)),
        notes=f"{NOTES} Target test patches per class: {counts}.",
    )
    report_progress(progress, f"brain tasks ready in {time.perf_counter() - start:.1f} s (k={k}, seed={seed})")
    return tasks

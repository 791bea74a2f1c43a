from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from medmerge_bench.data import brain, segmentation

INSTALLED = all((brain.MRICRON_DIR / name).is_file() for name in segmentation.FILES)
HAS_NILEARN = importlib.util.find_spec("nilearn") is not None
SKIP_REASON = (
    f"the MRIcron templates are not installed: {brain.INSTALL_MRICRON}"
    if not INSTALLED
    else f"nilearn is not installed: {brain.INSTALL_NILEARN}"
)
SHAPE = (96, 112)


@pytest.fixture(scope="module")
def tasks():
    if not (INSTALLED and HAS_NILEARN):
        pytest.skip(SKIP_REASON)
    return segmentation.load_segmentation_tasks(k=2, seed=0, progress=False)


@pytest.fixture(scope="module")
def layout(tasks):
    return segmentation.segmentation_layout()


@pytest.fixture(scope="module")
def volumes(tasks):
    return segmentation.segmentation_volumes()


def _all(tasks):
    return (tasks.source_a, tasks.source_b, tasks.target)


def test_shapes_dtypes_and_label_ranges(tasks):
    assert [t.class_names for t in _all(tasks)] == [
        ("background", "grey matter", "white matter", "CSF"),
        ("background", "frontal", "limbic/insula", "occipital", "parietal", "temporal", "cerebellum"),
        ("background", "thalamus", "caudate", "putamen", "pallidum", "hippocampus", "amygdala"),
    ]
    assert tasks.source_a.test is None and tasks.source_b.test is None and tasks.target.test is not None
    for task in _all(tasks):
        for split, data in task.splits().items():
            n = len(data)
            assert n > 0, (task.name, split)
            assert data.images.dtype == np.float32 and data.images.shape == (n, 1, *SHAPE)
            assert data.labels.dtype == np.int64 and data.labels.shape == (n, 1, *SHAPE)
            assert data.slices.shape == (n,) and len(set(data.slices.tolist())) == n
            assert data.labels.min() == 0 and data.labels.max() < task.num_classes
            x, y = data.dataset().tensors
            assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == y.shape
        # every class of a task appears in its training slices
        present = np.bincount(task.train.labels.ravel(), minlength=task.num_classes)
        assert (present > 0).all(), (task.name, present)
    # sources have plenty of slices, the target a few per structure
    assert len(tasks.source_a.train) >= 30 and len(tasks.source_b.train) >= 40
    assert 2 <= len(tasks.target.train) <= 2 * 6


def test_slices_are_the_volumes_slices(tasks, volumes):
    pairs = {
        tasks.source_a.name: ("mni_t1", "tissue"),
        tasks.source_b.name: ("colin_t1", "lobes"),
        tasks.target.name: ("mni_t1", "structures"),
    }
    for task in _all(tasks):
        image, labels = pairs[task.name]
        for data in task.splits().values():
            np.testing.assert_array_equal(data.images[:, 0], np.moveaxis(volumes[image][:, :, data.slices], -1, 0))
            np.testing.assert_array_equal(data.labels[:, 0], np.moveaxis(volumes[labels][:, :, data.slices], -1, 0))
    # raw intensities: nilearn's MNI152 in [0, 1], MRIcron's Colin27 in bytes
    assert 0.0 <= volumes["mni_t1"].min() and volumes["mni_t1"].max() <= 1.0
    assert volumes["colin_t1"].max() > 100


def test_structures_lie_where_the_anatomy_says(volumes):
    structures, tissue = volumes["structures"], volumes["tissue"]
    # the target's structures are never labelled on CSF or outside the brain, and source B never labels them
    assert not structures[tissue == segmentation.TISSUE_CLASSES.index("CSF")].any()
    assert not structures[tissue == 0].any()
    x_mm = segmentation.GRID_ORIGIN[0] + segmentation.SPACING * np.arange(segmentation.GRID_SHAPE[0])
    z_mm = segmentation.GRID_ORIGIN[2] + segmentation.SPACING * np.arange(segmentation.GRID_SHAPE[2])
    where = {}
    for c, name in enumerate(segmentation.STRUCTURE_CLASSES[1:], start=1):
        i, _, k = np.nonzero(structures == c)
        # left and right merged: both hemispheres hold the class, in about equal parts
        left, right = (x_mm[i] < 0).sum(), (x_mm[i] > 0).sum()
        assert 0.7 < left / right < 1.4, (name, left, right)
        where[name] = (np.abs(x_mm[i]).mean(), z_mm[k].mean())
    assert where["thalamus"][0] < where["caudate"][0] < where["putamen"][0], where
    assert where["pallidum"][0] < where["putamen"][0], where
    assert where["amygdala"][1] < where["thalamus"][1] and where["hippocampus"][1] < where["caudate"][1], where
    # source B's lobes leave exactly the target's structures (and what AAL does not label) as background
    aal = brain.resample_to_grid(
        brain.require_module("nibabel").load(brain.MRICRON_DIR / "aal.nii.gz"),
        segmentation.GRID_AFFINE,
        segmentation.GRID_SHAPE,
        0,
    )
    names = brain.read_label_names(brain.MRICRON_DIR / "aal.nii.txt")
    deep = [v for v, n in names.items() if n.rsplit("_", 1)[0] in segmentation.STRUCTURES.values()]
    assert len(deep) == 12
    assert not volumes["lobes"][np.isin(aal, deep)].any()
    inside = (aal > 0) & ~np.isin(aal, deep) & (volumes["colin_t1"] > 0)
    assert volumes["lobes"][inside].all()


def test_every_target_structure_in_every_split(tasks):
    counts = segmentation.voxel_counts(tasks)[tasks.target.name]
    assert set(counts) == {"train", "val", "test"}
    for split, per_class in counts.items():
        assert sum(per_class.values()) == len(tasks.target.splits()[split]) * SHAPE[0] * SHAPE[1]
        for name in segmentation.STRUCTURE_CLASSES[1:]:
            assert per_class[name] >= 50, (split, name, per_class[name])
    report = segmentation.format_voxel_counts(tasks)
    assert "brain-seg/subcortical" in report and "amygdala" in report and "test (" in report


def _within_gap(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether a slice of ``a`` lies within ``GAP`` slices of one of ``b`` (or is one of them)."""
    return bool((np.abs(a[:, None] - b[None, :]) <= segmentation.GAP).any())


def test_spatial_holdout(tasks, layout):
    assert segmentation.GAP >= 1
    held = np.concatenate([tasks.target.val.slices, tasks.target.test.slices])
    trains = {"pool": layout.target_pool}
    for seed in range(4):
        for k in (1, 2):
            trains[f"k={k} seed={seed}"] = segmentation.target_train_slices(layout, k, seed)
    for name, train in trains.items():
        assert set(train.tolist()) <= set(layout.target_pool.tolist()), name
        assert not _within_gap(train, held), name
    # source A shows the target's brain: neither of its splits comes near the target's held-out slices
    assert not _within_gap(tasks.source_a.train.slices, held)
    assert not _within_gap(tasks.source_a.val.slices, held)
    # each source's validation slices stay off its training slices too
    for source in (tasks.source_a, tasks.source_b):
        assert not _within_gap(source.train.slices, source.val.slices), source.name
    assert not set(tasks.target.val.slices.tolist()) & set(tasks.target.test.slices.tolist())


def test_deterministic_and_only_the_train_draw_depends_on_seed_and_k(tasks, layout):
    again = segmentation.load_segmentation_tasks(k=2, seed=0, progress=False)
    other = segmentation.load_segmentation_tasks(k=2, seed=1, progress=False)
    small = segmentation.load_segmentation_tasks(k=1, seed=0, progress=False)
    for loaded in (again, other, small):
        for a, b in zip(_all(tasks), _all(loaded), strict=True):
            for split in ("val", "test") if a is tasks.target else ("train", "val"):
                np.testing.assert_array_equal(a.splits()[split].images, b.splits()[split].images)
                np.testing.assert_array_equal(a.splits()[split].labels, b.splits()[split].labels)
    np.testing.assert_array_equal(again.target.train.slices, tasks.target.train.slices)
    np.testing.assert_array_equal(again.target.train.labels, tasks.target.train.labels)
    assert set(small.target.train.slices.tolist()) <= set(tasks.target.train.slices.tolist())
    draws = {tuple(segmentation.target_train_slices(layout, 1, seed).tolist()) for seed in range(6)}
    assert len(draws) > 1
    # each structure shows in at least k of the drawn slices
    for k, loaded in ((1, small), (2, tasks)):
        shown = layout.structure_slices[loaded.target.train.slices][:, 1:].sum(0)
        assert (shown >= k).all(), (k, shown)


def test_k_outside_the_pool_is_refused(layout):
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        segmentation.target_train_slices(layout, 0, seed=0)
    with pytest.raises(ValueError, match=r"shows in \d+ slices of the target's training slabs, fewer than k=99"):
        segmentation.target_train_slices(layout, 99, seed=0)


def test_datalist_round_trip(tasks, tmp_path):
    nib = pytest.importorskip("nibabel")
    datalist_file = segmentation.write_segmentation_datalist(tasks.target, tmp_path / "target")
    datalist = json.loads(datalist_file.read_text())
    assert datalist["labels"] == {str(i): n for i, n in enumerate(segmentation.STRUCTURE_CLASSES)}
    for split, section in segmentation.SECTIONS.items():
        data = tasks.target.splits()[split]
        items = datalist[section]
        assert [item["slice"] for item in items] == data.slices.tolist()
        for item, image, label, z in zip(items, data.images, data.labels, data.slices, strict=True):
            img = nib.load(datalist_file.parent / item["image"])
            seg = nib.load(datalist_file.parent / item["label"])
            np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), image[0])
            np.testing.assert_array_equal(np.asarray(seg.dataobj).astype(np.int64), label[0])
            assert img.shape == seg.shape == SHAPE
            np.testing.assert_array_equal(img.affine, seg.affine)
            np.testing.assert_array_equal(img.affine, segmentation.slice_affine(int(z)))
            assert img.header.get_zooms() == (2.0, 2.0)
            assert img.affine[2, 3] == segmentation.GRID_ORIGIN[2] + 2.0 * z
    # MONAI reads it as a decathlon datalist; a source has no test slices
    monai_data = pytest.importorskip("monai.data")
    items = monai_data.load_decathlon_datalist(str(datalist_file), True, "validation")
    assert len(items) == len(tasks.target.val) and items[0]["label"].endswith(".nii.gz")
    source_file = segmentation.write_segmentation_datalist(tasks.source_b, tmp_path / "source_b")
    source = json.loads(source_file.read_text())
    assert source["test"] == [] and len(source["training"]) == len(tasks.source_b.train)


def test_disk_cache_round_trip(monkeypatch, tmp_path, volumes):
    monkeypatch.setenv("MONAI_MEDMERGE_CACHE", str(tmp_path))
    monkeypatch.setattr(segmentation, "_MEMO", {})
    monkeypatch.setattr(segmentation, "_build_volumes", lambda paths: {k: v.copy() for k, v in volumes.items()})
    segmentation.segmentation_volumes()
    files = list(tmp_path.glob(f"{segmentation.SEGMENTATION_DATA_VERSION}-*.npz"))
    assert len(files) == 1
    monkeypatch.setattr(segmentation, "_MEMO", {})
    monkeypatch.setattr(segmentation, "_build_volumes", lambda paths: pytest.fail("rebuilt despite the cache"))
    read = segmentation.segmentation_volumes()
    assert set(read) == set(volumes)
    for name in volumes:
        np.testing.assert_array_equal(read[name], volumes[name])
        assert read[name].dtype == volumes[name].dtype


def test_missing_files_name_the_file_and_the_install(monkeypatch, tmp_path):
    monkeypatch.setattr(brain, "MRICRON_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"ch2bet\.nii\.gz.*apt-get install -y mricron-data"):
        segmentation.load_segmentation_tasks(k=1, seed=0, progress=False)

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
import torch

from medmerge_bench.data import brain

INSTALLED = (brain.MRICRON_DIR / "ch2bet.nii.gz").is_file()
HAS_NILEARN = importlib.util.find_spec("nilearn") is not None
SKIP_REASON = (
    f"the MRIcron templates are not installed: {brain.INSTALL_MRICRON}"
    if not INSTALLED
    else f"nilearn is not installed: {brain.INSTALL_NILEARN}"
)
needs_data = pytest.mark.skipif(not (INSTALLED and HAS_NILEARN), reason=SKIP_REASON)


@pytest.fixture(scope="module")
def tasks():
    if not (INSTALLED and HAS_NILEARN):
        pytest.skip(SKIP_REASON)
    return brain.load_brain_tasks(k=10, seed=0, progress=False)


@pytest.fixture(scope="module")
def layout(tasks):
    return brain.brain_layout()


def _block_ids(centres: np.ndarray) -> set[tuple[int, int, int]]:
    """The (|x|, y, z) block of each centre, computed here independently of the module."""
    x, y, z = centres.T
    distance = np.minimum(x, brain.GRID_SHAPE[0] - 1 - x)  # voxel i and 119 - i mirror each other
    from_midline = brain.GRID_SHAPE[0] // 2 - 1 - distance
    return set(map(tuple, (np.column_stack([from_midline, y, z]) // brain.BLOCK).tolist()))


def _counts(dataset, num_classes):
    return torch.bincount(dataset.tensors[1], minlength=num_classes).tolist()


def test_shapes_dtypes_and_balance(tasks):
    assert tasks.name == "brain"
    assert tasks.source_a.class_names == ["grey matter", "white matter", "CSF"]
    assert tasks.source_b.num_classes == tasks.target.num_classes == 7
    expected = {
        "source_a": ([600] * 3, [100] * 3),
        "source_b": ([600] * 7, [100] * 7),
        "target": ([10] * 7, [50] * 7),
    }
    for field, (train, val) in expected.items():
        task = getattr(tasks, field)
        assert task.num_classes == len(task.class_names) == len(train)
        splits = [task.train, task.val] + ([task.test] if task.test is not None else [])
        for dataset in splits:
            x, y = dataset.tensors
            assert x.dtype == torch.float32 and x.shape == (len(y), 1, 32, 32)
            assert y.dtype == torch.int64 and 0 <= y.min() and y.max() < task.num_classes
        assert _counts(task.train, task.num_classes) == train
        assert _counts(task.val, task.num_classes) == val
        assert (task.test is None) == (field != "target")
    test_counts = _counts(tasks.target.test, 7)
    assert min(test_counts) >= 100 and max(test_counts) <= brain.TARGET_TEST, test_counts
    assert "Target test patches per class" in tasks.notes


def test_inputs_roughly_standardised(tasks):
    for task in (tasks.source_a, tasks.source_b, tasks.target):
        x = task.val.tensors[0]
        assert abs(x.mean().item()) < 1.0 and 0.5 < x.std().item() < 2.0, task.name


def test_patches_are_labelled_by_their_centre_voxel(tasks, layout):
    volumes = layout.volumes
    for patches, labels, x in (
        (layout.source_a_val, volumes.tissue, tasks.source_a.val.tensors[0]),
        (layout.source_b_val, volumes.anatomy, tasks.source_b.val.tensors[0]),
        (layout.target_test, volumes.function, tasks.target.test.tensors[0]),
    ):
        centre = tuple(patches.centres.T)
        np.testing.assert_array_equal(labels[centre], patches.labels)
        volume = volumes.colin_t1 if labels is volumes.anatomy else volumes.mni_t1
        # the centre voxel sits at pixel (16, 16) of every plane
        np.testing.assert_array_equal(x[:, 0, 16, 16].numpy(), volume[centre])
    assert set(np.bincount(layout.source_a_train.planes).tolist()) == {600}  # planes balanced: 1800 / 3


def test_heldout_blocks_mirror_symmetric_and_never_sampled(layout):
    assert layout.heldout.any()
    np.testing.assert_array_equal(layout.heldout, layout.heldout[::-1])
    np.testing.assert_array_equal(layout.excluded, layout.excluded[::-1])
    test = layout.target_test.centres
    assert layout.heldout[tuple(test.T)].all()
    others = {
        "source_a_train": layout.source_a_train.centres,
        "source_a_val": layout.source_a_val.centres,
        "source_b_train": layout.source_b_train.centres,
        "source_b_val": layout.source_b_val.centres,
        "target_val": layout.target_val.centres,
        "target_pool": layout.target_pool.centres,
    }
    for seed in (0, 1):
        others[f"target_train_{seed}"] = brain.target_train_patches(layout, k=200, seed=seed).centres
    test_blocks = _block_ids(test)
    for name, centres in others.items():
        assert not layout.excluded[tuple(centres.T)].any(), name
        assert not test_blocks & _block_ids(centres), name
    # the mirror image of every test block is a test block
    assert test_blocks == _block_ids(np.column_stack([brain.GRID_SHAPE[0] - 1 - test[:, 0], test[:, 1:]]))


def test_target_splits_share_no_centre(layout):
    def voxels(centres):
        return set(map(tuple, centres.tolist()))

    train = voxels(brain.target_train_patches(layout, k=200, seed=0).centres)
    val, test = voxels(layout.target_val.centres), voxels(layout.target_test.centres)
    assert len(train) == 1400 and len(val) == 350
    assert not train & val and not train & test and not val & test


def test_seed_draws_only_the_target_train(tasks, layout):
    same = brain.load_brain_tasks(k=10, seed=0, progress=False)
    assert torch.equal(same.target.train.tensors[0], tasks.target.train.tensors[0])
    reseeded = brain.load_brain_tasks(k=10, seed=1, progress=False)
    other_k = brain.load_brain_tasks(k=50, seed=1, progress=False)
    assert not torch.equal(reseeded.target.train.tensors[0], tasks.target.train.tensors[0])
    for loaded in (reseeded, other_k):
        for field, splits in (
            ("source_a", ("train", "val")),
            ("source_b", ("train", "val")),
            ("target", ("val", "test")),
        ):
            for split in splits:
                for t1, t2 in zip(
                    getattr(getattr(tasks, field), split).tensors,
                    getattr(getattr(loaded, field), split).tensors,
                    strict=True,
                ):
                    assert torch.equal(t1, t2), (field, split)
    small = brain.target_train_patches(layout, k=10, seed=1)
    large = brain.target_train_patches(layout, k=50, seed=1)
    assert set(map(tuple, small.centres.tolist())) <= set(map(tuple, large.centres.tolist()))


def test_k_larger_than_the_pool_is_refused(layout):
    with pytest.raises(ValueError, match="fewer than k=1000000"):
        brain.target_train_patches(layout, k=1_000_000, seed=0)


def test_missing_templates_name_the_file_and_the_install(monkeypatch, tmp_path):
    monkeypatch.setattr(brain, "MRICRON_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as e:
        brain.load_brain_tasks(k=10, seed=0, progress=False)
    assert "ch2bet.nii.gz" in str(e.value) and "brodmann.nii.gz" in str(e.value)
    assert "apt-get install -y mricron-data" in str(e.value)


@needs_data
def test_missing_nilearn_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("MONAI_MEDMERGE_CACHE", str(tmp_path))  # a cache this process has not built: a new build
    monkeypatch.setitem(sys.modules, "nilearn", None)
    monkeypatch.setitem(sys.modules, "nilearn.datasets", None)
    with pytest.raises(RuntimeError, match=r"needs nilearn, which is not installed: pip install nilearn"):
        brain.brain_volumes()


@needs_data
def test_disk_cache_round_trip(monkeypatch, tmp_path, layout):
    monkeypatch.setenv("MONAI_MEDMERGE_CACHE", str(tmp_path))
    monkeypatch.setattr(brain, "_MEMO", {})
    built = brain.brain_volumes()
    (file,) = tmp_path.glob(f"{brain.CACHE_VERSION}-*.npz")
    monkeypatch.setattr(brain, "_MEMO", {})
    monkeypatch.setattr(brain, "_build_volumes", lambda data_dir: pytest.fail("rebuilt despite the cache"))
    read = brain.brain_volumes()
    for name in ("mni_t1", "colin_t1", "tissue", "anatomy", "function"):
        np.testing.assert_array_equal(getattr(read, name), getattr(built, name))
        np.testing.assert_array_equal(getattr(read, name), getattr(layout.volumes, name))
    assert file.stat().st_size > 0


@needs_data
def test_unreadable_cache_is_rebuilt(monkeypatch, tmp_path, layout):
    monkeypatch.setenv("MONAI_MEDMERGE_CACHE", str(tmp_path))
    monkeypatch.setattr(brain, "_MEMO", {})
    brain.brain_volumes()
    (file,) = tmp_path.glob(f"{brain.CACHE_VERSION}-*.npz")
    file.write_bytes(b"not a zip file")
    monkeypatch.setattr(brain, "_MEMO", {})
    np.testing.assert_array_equal(brain.brain_volumes().function, layout.volumes.function)
    assert file.stat().st_size > 1000  # written again

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


def _split_centres(layout) -> dict:
    """The patch centres of every split of ``layout`` but the target's test and training draws."""
    return {
        "source_a_train": layout.source_a_train.centres,
        "source_a_val": layout.source_a_val.centres,
        "source_b_train": layout.source_b_train.centres,
        "source_b_val": layout.source_b_val.centres,
        "target_val": layout.target_val.centres,
        "target_pool": layout.target_pool.centres,
    }


def test_heldout_blocks_mirror_symmetric_and_never_sampled(layout):
    assert layout.heldout.any()
    np.testing.assert_array_equal(layout.heldout, layout.heldout[::-1])
    np.testing.assert_array_equal(layout.excluded, layout.excluded[::-1])
    test = layout.target_test.centres
    assert layout.heldout[tuple(test.T)].all()
    others = _split_centres(layout)
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


# --- the variants searched for room (medmerge_bench.data.brain.BRAIN_VARIANTS) ---

# The commit whose brain.py made the recorded brain results; today's task must still give exactly its arrays.
RECORDED_COMMIT = "10b9b3b"
HAS_ATLASES = all((brain.MRICRON_DIR / name).is_file() for name in brain.ATLAS_FILES)
needs_atlases = pytest.mark.skipif(
    not (INSTALLED and HAS_NILEARN and HAS_ATLASES), reason=f"{SKIP_REASON} (or its atlases are missing)"
)


@pytest.fixture(scope="module", params=list(brain.BRAIN_VARIANTS))
def variant(request):
    if not (INSTALLED and HAS_NILEARN and HAS_ATLASES):
        pytest.skip(SKIP_REASON)
    tasks = brain.load_brain_tasks(k=10, seed=0, progress=False, variant=request.param)
    return request.param, tasks, brain.brain_layout(variant=request.param)


def _digest(tasks) -> str:
    import hashlib

    h = hashlib.sha256(f"{tasks.name}|{tasks.notes}".encode())
    for field in ("source_a", "source_b", "target"):
        task = getattr(tasks, field)
        h.update(f"{task.name}|{task.class_names}".encode())
        for split in (task.train, task.val, task.test):
            for t in split.tensors if split is not None else ():
                h.update(t.numpy().tobytes())
    return h.hexdigest()


@needs_data
def test_brain_task_is_the_recorded_one(tasks, monkeypatch, tmp_path):
    """Today's task gives, bit for bit, the arrays of the code that made the recorded results (run from git)."""
    import subprocess
    from importlib.util import module_from_spec, spec_from_file_location
    from pathlib import Path

    root = Path(brain.__file__).resolve().parents[2]
    try:
        source = subprocess.run(
            ["git", "show", f"{RECORDED_COMMIT}:medmerge_bench/data/brain.py"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        pytest.skip(f"git or commit {RECORDED_COMMIT} is not available here")
    file = tmp_path / "recorded_brain.py"
    file.write_text(source)
    spec = spec_from_file_location("recorded_brain", file)
    recorded = module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "recorded_brain", recorded)
    spec.loader.exec_module(recorded)
    # the recorded code builds its own volumes in an empty cache: nothing it reads was written by the new code
    monkeypatch.setenv("MONAI_MEDMERGE_CACHE", str(tmp_path / "cache"))
    for k, seed in ((10, 0), (50, 1)):
        new = tasks if (k, seed) == (10, 0) else brain.load_brain_tasks(k=k, seed=seed, progress=False)
        assert _digest(new) == _digest(recorded.load_brain_tasks(k, seed, progress=False)), (k, seed)


def test_variant_shapes_dtypes_and_balance(variant):
    name, tasks, layout = variant
    bench = brain.BRAIN_VARIANTS[name]
    assert tasks.name == bench.name == f"brain_{name}"
    for field in ("source_a", "source_b", "target"):
        task, spec = getattr(tasks, field), getattr(bench, field)
        assert task.class_names == list(spec.classes) and task.name == spec.name
        n = task.num_classes
        train, val = ([600] * n, [100] * n) if field != "target" else ([10] * n, [bench.val_per_class] * n)
        for dataset in [task.train, task.val] + ([task.test] if task.test is not None else []):
            x, y = dataset.tensors
            assert x.dtype == torch.float32 and x.shape == (len(y), 1, 32, 32)
            assert y.dtype == torch.int64 and 0 <= y.min() and y.max() < n
        assert _counts(task.train, n) == train, (field, _counts(task.train, n))
        assert _counts(task.val, n) == val, field
        assert (task.test is None) == (field != "target")
        x = task.val.tensors[0]
        assert abs(x.mean().item()) < 1.0 and 0.5 < x.std().item() < 2.0, task.name
    test_counts = _counts(tasks.target.test, tasks.target.num_classes)
    assert min(test_counts) >= 100 and max(test_counts) <= brain.TARGET_TEST, test_counts
    assert "Target test patches per class" in tasks.notes
    assert ("held-out blocks" if bench.evaluate_on is None else "Tested on a new subject") in tasks.notes


def test_variant_patches_are_labelled_by_their_centre_voxel(variant):
    name, tasks, layout = variant
    bench = layout.benchmark
    evaluated = bench.evaluate_on or bench.target.image  # the brain the target's val and test are cut from
    for spec, image, patches, x in (
        (bench.source_a, bench.source_a.image, layout.source_a_val, tasks.source_a.val.tensors[0]),
        (bench.source_b, bench.source_b.image, layout.source_b_val, tasks.source_b.val.tensors[0]),
        (bench.target, bench.target.image, brain.target_train_patches(layout, 10, 0), tasks.target.train.tensors[0]),
        (bench.target, evaluated, layout.target_test, tasks.target.test.tensors[0]),
        (bench.target, evaluated, layout.target_val, tasks.target.val.tensors[0]),
    ):
        centre = tuple(patches.centres.T)
        np.testing.assert_array_equal(layout.labels[spec.labels][centre], patches.labels)
        volume = getattr(layout.volumes, image)
        np.testing.assert_array_equal(x[:, 0, 16, 16].numpy(), volume[centre])
        if image == bench.evaluate_on:  # the target on a new subject: every centre inside its brain
            assert (volume[centre] > volume.min()).all()


def test_variant_heldout_blocks_never_sampled(variant):
    """No centre of any split but the target's test lies within GUARD voxels of a test block, for every variant."""
    name, tasks, layout = variant
    assert layout.heldout.any()
    np.testing.assert_array_equal(layout.heldout, layout.heldout[::-1])
    test = layout.target_test.centres
    assert layout.heldout[tuple(test.T)].all()
    if layout.benchmark.evaluate_on is not None:
        pytest.skip(f"{name} tests on a new subject: the training places need no guard (see the test after next)")
    others = _split_centres(layout) | {
        "target_train": brain.target_train_patches(layout, k=200, seed=0).centres,
    }
    test_blocks = _block_ids(test)
    # the guard measured here, not read from the layout: every other centre lies more than GUARD voxels (chessboard
    # distance) from every held-out voxel
    from scipy import ndimage

    distance = ndimage.distance_transform_cdt(~layout.heldout, metric="chessboard")
    bench = layout.benchmark
    free = {
        f"source_{x}_{split}"
        for x in ("a", "b")
        for split in ("train", "val")
        if not bench.guard_other_brain and getattr(bench, f"source_{x}").image != bench.target.image
    }
    for label, centres in others.items():
        if label in free:
            continue
        assert not layout.excluded[tuple(centres.T)].any(), label
        assert not test_blocks & _block_ids(centres), label
        assert distance[tuple(centres.T)].min() > brain.GUARD, label
    for label in free:  # another subject's anatomy at the held-out places: there, and only where it was asked for
        assert layout.excluded[tuple(others[label].T)].mean() > 0.1, label
    assert not free or name in ("colin_split_function", "colin_split_regions", "views_open_function")
    train = set(map(tuple, others["target_train"].tolist()))
    val = set(map(tuple, layout.target_val.centres.tolist()))
    assert not train & val and not train & set(map(tuple, test.tolist()))


def test_variant_validation_blocks_are_guarded_like_the_test_blocks(variant):
    """With ``validation="blocks"`` the target's validation patches lie in blocks of their own, away from the test
    blocks, and no training patch of the target (nor a guarded source) comes within GUARD voxels of them."""
    name, tasks, layout = variant
    bench = layout.benchmark
    if bench.validation == "pool":
        assert layout.validation_blocks is None
        pytest.skip(f"{name} validates among the training pool's places")
    from scipy import ndimage

    blocks = layout.validation_blocks
    np.testing.assert_array_equal(blocks, blocks[::-1])
    assert blocks[tuple(layout.target_val.centres.T)].all()
    assert not (blocks & layout.excluded).any()
    assert _counts(tasks.target.val, tasks.target.num_classes) == [bench.val_per_class] * tasks.target.num_classes
    distance = ndimage.distance_transform_cdt(~blocks, metric="chessboard")
    guarded = {"target_pool": layout.target_pool.centres}
    guarded |= {f"target_train_{s}": brain.target_train_patches(layout, k=200, seed=s).centres for s in (0, 1)}
    for x in ("a", "b"):
        if bench.guard_other_brain or getattr(bench, f"source_{x}").image == bench.target.image:
            guarded[f"source_{x}_train"] = getattr(layout, f"source_{x}_train").centres
    if bench.evaluate_on is not None:  # trained on another brain: only validation and test keep apart
        guarded = {}
    for label, centres in guarded.items():
        assert distance[tuple(centres.T)].min() > brain.GUARD, label
    if bench.evaluate_on is None:
        unlabeled = brain.target_unlabeled_patches(layout, k=10, seed=0)
        assert distance[tuple(unlabeled.centres.T)].min() > brain.GUARD


def test_new_subject_variants_train_anywhere_on_one_brain_and_test_on_another(variant):
    """``evaluate_on``: no network trains on the new subject; the target and the sources train on the other brain,
    at the test's places too; validation and test lie in blocks of their own, GUARD voxels apart."""
    name, tasks, layout = variant
    bench = layout.benchmark
    if bench.evaluate_on is None:
        pytest.skip(f"{name} tests on its own brain")
    from scipy import ndimage

    assert bench.evaluate_on not in {bench.source_a.image, bench.source_b.image, bench.target.image}
    trained = {
        "source_a_train": layout.source_a_train.centres,
        "source_b_train": layout.source_b_train.centres,
        "target_pool": layout.target_pool.centres,
    }
    for label, centres in trained.items():  # the same places as the test, on the other brain
        assert layout.heldout[tuple(centres.T)].mean() > 0.05, label
    labelled = layout.labels[bench.target.labels] >= 0
    assert len(layout.target_pool.labels) == labelled.sum() - len(layout.target_val.labels)
    distance = ndimage.distance_transform_cdt(~layout.heldout, metric="chessboard")
    assert distance[tuple(layout.target_val.centres.T)].min() > brain.GUARD
    assert _counts(tasks.target.test, tasks.target.num_classes) == [brain.TARGET_TEST] * tasks.target.num_classes


def test_new_subject_must_be_one_no_network_trains_on():
    front, back, target = (brain.BRAIN_VARIANTS["colin_split_function"].source_a, brain._BACK_AICHA, brain._FUNCTION)
    with pytest.raises(ValueError, match="'colin_t1', which brain/aal-anterior trains on"):
        brain.BrainBenchmark("x", front, back, target, "", validation="blocks", evaluate_on="colin_t1")
    with pytest.raises(ValueError, match="validation must be 'blocks'"):
        brain.BrainBenchmark("x", back, back, target, "", evaluate_on="colin_t1")
    with pytest.raises(ValueError, match=r"evaluate_on must be one of \['mni_t1', 'colin_t1'\], got 'ct'"):
        brain.BrainBenchmark("x", back, back, target, "", validation="blocks", evaluate_on="ct")
    with pytest.raises(ValueError, match="val_per_class must be at least 1, got 0 for 'x'"):
        brain.BrainBenchmark("x", back, back, target, "", val_per_class=0)
    assert brain.BrainBenchmark("x", back, back, target, "", validation="blocks", evaluate_on="colin_t1")


def test_variant_classes_follow_their_definition(variant):
    """Tissue x lobe and tracts/cortex classes are the tissue and atlas labels they are made of."""
    name, tasks, layout = variant
    labels = brain.brain_label_volumes(atlases=True)
    tissue, lobe = labels["tissue"], labels["ho_lobe"]
    if name == "tissue_lobe":
        centres = tuple(layout.target_test.centres.T)
        y = layout.target_test.labels
        np.testing.assert_array_equal(tissue[centres], y % 2)
        np.testing.assert_array_equal(lobe[centres], y // 2)
        assert tasks.target.class_names[3] == "temporal white matter"
    if name == "tracts_cortex":
        y = labels["tract_cortex"]
        assert (tissue[(y >= 0) & (y < 3)] == 1).all() and (tissue[y >= 3] == 0).all()
        np.testing.assert_array_equal(lobe[y >= 3], y[y >= 3] - 3)
    if name.startswith("split_"):
        # the specialists' regions agree with the macro-regions the other look-up tables give the same atlases
        back = [brain.ANATOMY_CLASSES.index(g) for g in ("parietal", "occipital")]
        np.testing.assert_array_equal(labels["aal_posterior"] >= 0, np.isin(labels["anatomy"], back))
        front = labels["aicha_group"][labels["aicha_anterior"] >= 0]
        allowed = [brain.AICHA_CLASSES.index(g) for g in ("frontal", "temporal", "limbic/insula")]
        assert np.isin(front, allowed).all() and (front == brain.AICHA_CLASSES.index("frontal")).mean() > 0.5
    if name in ("split_mni_function", "split_mni_regions", "colin_split_function", "colin_split_regions"):
        # the specialists added later: AICHA's back lies in its parietal and occipital groups, AAL's front mostly in
        # AAL's frontal macro-region, the rest temporal and a sliver that AAL_GROUPS calls limbic
        back = labels["aicha_group"][labels["aicha_posterior"] >= 0]
        assert np.isin(back, [brain.AICHA_CLASSES.index(g) for g in ("parietal", "occipital")]).all()
        front = labels["anatomy"][labels["aal_anterior"] >= 0]
        groups = [brain.ANATOMY_CLASSES.index(g) for g in ("frontal", "temporal", "limbic/insula")]
        assert np.isin(front, groups).all() and (front == groups[0]).mean() > 0.5


@needs_atlases
def test_harvard_oxford_names_match_where_the_areas_lie():
    """The hard-coded Harvard-Oxford names are in the image's label order: a few areas sit where anatomy puts them."""
    ho = brain._atlases(False)["harvard_oxford"]
    mm = np.indices(brain.GRID_SHAPE).reshape(3, -1).T * brain.SPACING + np.array(brain.GRID_ORIGIN)
    flat = ho.reshape(-1)
    centre = {name: mm[flat == i + 1].mean(0) for i, name in enumerate(brain.HARVARD_OXFORD_CORTICAL)}
    side = {name: np.abs(mm[flat == i + 1, 0]).mean() for i, name in enumerate(brain.HARVARD_OXFORD_CORTICAL)}
    y = {name: c[1] for name, c in centre.items()}
    assert max(y, key=y.get) == "Frontal Pole" and min(y, key=y.get) == "Occipital Pole"
    assert y["Precentral Gyrus"] > y["Postcentral Gyrus"]
    assert 25 < side["Insular Cortex"] < 45 and abs(y["Insular Cortex"]) < 10
    assert side["Cingulate Gyrus, anterior division"] < 12 and side["Intracalcarine Cortex"] < 20
    assert centre["Temporal Pole"][2] < -15 and centre["Superior Parietal Lobule"][2] > 40
    assert sorted(sum(brain.HARVARD_OXFORD_LOBES.values(), ())) == list(range(1, 49))


def test_unknown_variant_lists_the_choices():
    with pytest.raises(ValueError, match="unknown brain variant 'nope'; choose one of tissue_lobe, tracts_cortex"):
        brain.load_brain_tasks(k=10, seed=0, variant="nope")


def test_missing_atlas_names_the_file_and_the_install(monkeypatch, tmp_path):
    if not INSTALLED:
        pytest.skip(SKIP_REASON)
    for name in brain.MRICRON_FILES:  # the brain task's files are there, the atlases are not
        (tmp_path / name).symlink_to(brain.MRICRON_DIR / name)
    monkeypatch.setattr(brain, "MRICRON_DIR", tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        brain.load_brain_tasks(k=10, seed=0, progress=False, variant="tissue_lobe")
    assert "HarvardOxford-cort-maxprob-thr0-1mm.nii.gz" in str(e.value)
    assert "apt-get install -y mricron-data" in str(e.value)


@needs_atlases
def test_variants_are_benchmark_tasks_with_the_brain_ancestor():
    from medmerge_bench.data.tasks import ancestor_of, benchmark_names, load_benchmark_tasks

    names = benchmark_names()
    assert names[:2] == ("brain", "fashion")
    assert {f"brain_{v}" for v in brain.BRAIN_VARIANTS} == set(names[2:])
    tasks = load_benchmark_tasks("brain_tissue_lobe", k=10, seed=0, progress=False)
    assert tasks.name == "brain_tissue_lobe" and tasks.target.num_classes == 8
    assert ancestor_of("brain_tissue_lobe") == ancestor_of("brain") == "fashion"
    with pytest.raises(ValueError, match="unknown benchmark task 'brain_nope'; choose one of brain, fashion, brain_"):
        ancestor_of("brain_nope")


def test_brodmann_variants_share_the_brain_tasks_target_splits(variant, layout):
    """Variants with the Brodmann target keep the brain task's held-out blocks, validation and test sets exactly."""
    name, tasks, own = variant
    if own.benchmark.target.labels != "function":
        pytest.skip(f"{name} has its own target")
    if own.benchmark.evaluate_on is not None:
        pytest.skip(f"{name} tests on a new subject")
    np.testing.assert_array_equal(own.heldout, layout.heldout)
    for split in ("target_val", "target_test") if own.benchmark.validation == "pool" else ("target_test",):
        for a, b in zip(getattr(own, split), getattr(layout, split), strict=True):
            np.testing.assert_array_equal(a, b)


def test_unlabelled_patches_are_the_pool_less_the_labelled_subset(tasks, layout):
    """``target.unlabeled``: pool centres the seed did not label, in one order for every seed, cut at the cap."""
    from medmerge_bench.data.tasks import UNLABELED_MAX

    def voxels(patches):
        return list(map(tuple, patches.centres.tolist()))

    pool = set(voxels(layout.target_pool))
    labelled = {s: set(voxels(brain.target_train_patches(layout, k=10, seed=s))) for s in (0, 1)}
    rest = {s: voxels(brain.target_unlabeled_patches(layout, k=10, seed=s)) for s in (0, 1)}
    for s in (0, 1):
        assert len(rest[s]) == UNLABELED_MAX == len(set(rest[s])) and set(rest[s]) <= pool
        assert not set(rest[s]) & labelled[s]
    # dropping what the other seed labelled leaves the same sequence: the order does not depend on the seed
    # (each seed cut the sequence after UNLABELED_MAX of its own: they agree up to the shorter one)
    mine, theirs = [v for v in rest[0] if v not in labelled[1]], [v for v in rest[1] if v not in labelled[0]]
    n = min(len(mine), len(theirs))
    assert n > UNLABELED_MAX - 200 and mine[:n] == theirs[:n]
    x = tasks.target.unlabeled
    assert x.dtype == torch.float32 and x.shape == (UNLABELED_MAX, 1, 32, 32)
    volume = getattr(layout.volumes, layout.benchmark.target.image)
    expected = brain.extract_patches(volume, brain.target_unlabeled_patches(layout, k=10, seed=0))
    np.testing.assert_array_equal(x[:, 0].numpy(), expected)

from __future__ import annotations

import numpy as np
import pytest
import torch

from medmerge_bench.data import fashion
from medmerge_bench.data.tasks import (
    BENCHMARKS,
    BenchmarkTasks,
    cache_dir,
    k_shot_indices,
    load_benchmark_tasks,
    make_tensor_dataset,
)


def test_unknown_task_lists_the_choices():
    with pytest.raises(ValueError, match="unknown benchmark task 'mnist'; choose one of brain, fashion"):
        load_benchmark_tasks("mnist", k=10, seed=0)
    assert BENCHMARKS == ("brain", "fashion")


def test_k_shot_indices_balanced_nested_and_seeded():
    labels = np.repeat(np.arange(3), [40, 50, 60])
    small = k_shot_indices(labels, 5, seed=0, num_classes=3)
    large = k_shot_indices(labels, 20, seed=0, num_classes=3)
    assert np.bincount(labels[small]).tolist() == [5, 5, 5]
    assert np.bincount(labels[large]).tolist() == [20, 20, 20]
    assert len(set(small.tolist())) == 15
    assert set(small.tolist()) <= set(large.tolist())
    np.testing.assert_array_equal(small, k_shot_indices(labels, 5, seed=0, num_classes=3))
    assert set(small.tolist()) != set(k_shot_indices(labels, 5, seed=1, num_classes=3).tolist())


def test_k_shot_indices_rejects_bad_k():
    labels = np.repeat(np.arange(2), [3, 10])
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        k_shot_indices(labels, 0, seed=0, num_classes=2)
    with pytest.raises(ValueError, match="class 0 has 3 items in the training pool, fewer than k=4"):
        k_shot_indices(labels, 4, seed=0, num_classes=2)


def test_make_tensor_dataset_types_and_copy():
    x = np.zeros((4, 32, 32), dtype=np.float64)
    y = np.array([0, 1, 2, 1], dtype=np.int32)
    ds = make_tensor_dataset(x, y)
    assert ds.tensors[0].shape == (4, 1, 32, 32) and ds.tensors[0].dtype == torch.float32
    assert ds.tensors[1].dtype == torch.int64
    ds.tensors[0][0, 0, 0, 0] = 1.0
    assert x[0, 0, 0] == 0.0  # the caller's (cached) array is untouched
    with pytest.raises(ValueError, match=r"expected x \(n, 1, H, W\) and y \(n,\)"):
        make_tensor_dataset(x, y[:3])


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MONAI_MEDMERGE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("MONAI_MEDMERGE_CACHE")
    assert cache_dir().parts[-2:] == (".cache", "monai_medmerge")


def test_dispatch_to_fashion():
    if not (fashion.FASHION_DIR / fashion.FASHION_FILES["train_images"]).is_file():
        pytest.skip(f"Fashion-MNIST is not installed: {fashion.INSTALL_FASHION}")
    tasks = load_benchmark_tasks("fashion", k=10, seed=0, progress=False)
    assert isinstance(tasks, BenchmarkTasks) and tasks.name == "fashion"
    assert tasks.notes


def test_ancestor_kinds_are_checked_where_they_are_chosen(monkeypatch):
    from medmerge_bench.data import tasks as tasks_module
    from medmerge_bench.data.tasks import TaskData, load_ancestor_task
    from medmerge_bench.transfer import Recipe

    with pytest.raises(ValueError, match="unknown ancestor kind 'imagenet'; choose one of other_domain, rotation"):
        load_ancestor_task("fashion", kind="imagenet")
    with pytest.raises(ValueError, match="ancestor must be one of other_domain, rotation, got 'imagenet'"):
        Recipe(lineage="shared", ancestor="imagenet")
    with pytest.raises(ValueError, match="ancestor='rotation' needs lineage='shared'"):
        Recipe(ancestor="rotation")
    # the ancestor's training data is part of the sources' cache key
    other, rotation = Recipe(lineage="shared"), Recipe(lineage="shared", ancestor="rotation")
    assert other.source_key("fashion") != rotation.source_key("fashion")
    # too few unlabelled images: the error names the task and what it has
    few = TaskData(
        "toy", make_tensor_dataset(np.zeros((2, 8, 8)), np.zeros(2)), None, None, ["x"], torch.zeros(5, 1, 8, 8)
    )
    monkeypatch.setattr(tasks_module, "load_benchmark_tasks", lambda *a, **k: BenchmarkTasks("toy", few, few, few, ""))
    with pytest.raises(ValueError, match=r"rotation ancestor of 'toy' needs at least 4000 .* has \(5, 1, 8, 8\)"):
        load_ancestor_task("toy", kind="rotation")

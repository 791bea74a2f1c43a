from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from medmerge_bench.data import fashion

INSTALLED = (fashion.FASHION_DIR / fashion.FASHION_FILES["train_images"]).is_file()
needs_data = pytest.mark.skipif(not INSTALLED, reason=f"Fashion-MNIST is not installed: {fashion.INSTALL_FASHION}")


@pytest.fixture(scope="module")
def tasks():
    if not INSTALLED:
        pytest.skip(f"Fashion-MNIST is not installed: {fashion.INSTALL_FASHION}")
    return fashion.load_fashion_tasks(k=10, seed=0, progress=False)


def _counts(dataset, num_classes):
    return torch.bincount(dataset.tensors[1], minlength=num_classes).tolist()


def test_shapes_dtypes_and_balance(tasks):
    expected = {
        "source_a": ([600] * 5, [100] * 5, None),
        "source_b": ([600] * 5, [100] * 5, None),
        "target": ([10] * 10, [50] * 10, [300] * 10),
    }
    for field, (train, val, test) in expected.items():
        task = getattr(tasks, field)
        assert task.num_classes == len(task.class_names) == len(train)
        splits = [(task.train, train), (task.val, val)] + ([(task.test, test)] if test else [])
        for dataset, counts in splits:
            x, y = dataset.tensors
            assert x.dtype == torch.float32 and x.shape == (len(y), 1, 32, 32)
            assert y.dtype == torch.int64 and 0 <= y.min() and y.max() < task.num_classes
            assert _counts(dataset, task.num_classes) == counts
        assert (task.test is None) == (field != "target")
    assert tasks.source_a.class_names == ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat"]
    assert tasks.source_b.class_names == ["Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert tasks.target.class_names == fashion.CLASS_NAMES


def test_inputs_standardised_and_padded(tasks):
    x = tasks.source_a.train.tensors[0]
    assert abs(x.mean().item()) < 0.3 and 0.7 < x.std().item() < 1.3
    background = x[:, :, :2].unique()  # the two padded rows hold raw zeros only
    assert background.numel() == 1 and background.item() < -0.5


def test_pools_disjoint_and_test_from_official_test_set():
    if not INSTALLED:
        pytest.skip(f"Fashion-MNIST is not installed: {fashion.INSTALL_FASHION}")
    split = fashion.fashion_split_indices(k=200, seed=3)
    train_side = ["a_train", "a_val", "b_train", "b_val", "t_val", "pool"]
    for i, first in enumerate(train_side):
        for second in train_side[i + 1 :]:
            assert not set(split[first].tolist()) & set(split[second].tolist()), (first, second)
    assert set(split["t_train"].tolist()) <= set(split["pool"].tolist())
    labels = fashion.read_idx(fashion.FASHION_DIR / fashion.FASHION_FILES["train_labels"])
    assert set(labels[split["a_train"]].tolist()) == {0, 1, 2, 3, 4}
    assert set(labels[split["b_train"]].tolist()) == {5, 6, 7, 8, 9}
    assert len(split["t_test"]) == 3000 and split["t_test"].max() < 10000


def test_target_test_images_are_official_test_images(tasks):
    raw = fashion.read_idx(fashion.FASHION_DIR / fashion.FASHION_FILES["test_images"])
    idx = fashion.fashion_split_indices(k=10, seed=0)["t_test"]
    mean, std = fashion._train_statistics(fashion.FASHION_DIR)
    x = tasks.target.test.tensors[0][:, 0, 2:30, 2:30].numpy()
    np.testing.assert_array_equal(np.rint((x * std + mean) * 255).astype(np.uint8), raw[idx])


@needs_data
def test_seed_draws_only_the_target_train(tasks):
    same = fashion.load_fashion_tasks(k=10, seed=0, progress=False)
    other = fashion.load_fashion_tasks(k=50, seed=1, progress=False)
    assert torch.equal(same.target.train.tensors[0], tasks.target.train.tensors[0])
    reseeded = fashion.load_fashion_tasks(k=10, seed=1, progress=False)
    assert not torch.equal(reseeded.target.train.tensors[0], tasks.target.train.tensors[0])
    for loaded in (other, reseeded):
        for field in ("source_a", "source_b", "target"):
            a, b = getattr(tasks, field), getattr(loaded, field)
            splits = ("val", "test") if field == "target" else ("train", "val")
            for split in splits:
                for t1, t2 in zip(getattr(a, split).tensors, getattr(b, split).tensors, strict=True):
                    assert torch.equal(t1, t2), (field, split)
    k50 = set(fashion.fashion_split_indices(k=50, seed=1)["t_train"].tolist())
    assert set(fashion.fashion_split_indices(k=10, seed=1)["t_train"].tolist()) <= k50


def test_missing_data_names_the_file_and_the_install(monkeypatch, tmp_path):
    monkeypatch.setattr(fashion, "FASHION_DIR", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as e:
        fashion.load_fashion_tasks(k=10, seed=0, progress=False)
    assert "train-images-idx3-ubyte.gz" in str(e.value)
    assert "apt-get install -y dataset-fashion-mnist" in str(e.value)


def test_read_idx_rejects_other_files(tmp_path):
    path = tmp_path / "junk-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\x01\x02\x03\x04" + bytes(8))
    with pytest.raises(ValueError, match="is not an IDX file of unsigned bytes"):
        fashion.read_idx(path)


def test_unlabelled_pool_is_the_training_pool_less_the_labelled_images(tasks):
    """``target.unlabeled``: pool images not labelled for this seed, in one order for every seed, cut at the cap."""
    from medmerge_bench.data.tasks import UNLABELED_MAX

    unlabeled, train = tasks.target.unlabeled, tasks.target.train.tensors[0]
    split = fashion.fashion_split_indices(k=10, seed=0)
    assert unlabeled.dtype == torch.float32 and unlabeled.shape == (UNLABELED_MAX, 1, 32, 32)
    assert UNLABELED_MAX < len(split["pool"]) - 100  # the cap cut it
    flat = {bytes(x.numpy()) for x in unlabeled}
    assert not {bytes(x.numpy()) for x in train} & flat
    assert not {bytes(x.numpy()) for x in tasks.target.val.tensors[0]} & flat
    other = fashion.load_fashion_tasks(k=10, seed=1, progress=False).target
    # the two seeds' unlabelled sets differ only by the images each one labelled; their shared images keep one order
    labelled_by_other = {bytes(x.numpy()) for x in other.train.tensors[0]}
    mine = [bytes(x.numpy()) for x in unlabeled if bytes(x.numpy()) not in labelled_by_other]
    labelled_by_me = {bytes(x.numpy()) for x in train}
    theirs = [bytes(x.numpy()) for x in other.unlabeled if bytes(x.numpy()) not in labelled_by_me]
    # each seed cut the same sequence after UNLABELED_MAX of its own images: they agree up to the shorter one
    n = min(len(mine), len(theirs))
    assert n > UNLABELED_MAX - 200 and mine[:n] == theirs[:n]


def test_rotation_ancestor_turns_unlabelled_pool_images_only(tasks):
    """The self-supervised ancestor task: each image is a target pool image turned by its label's quarter turns, the
    held-out part validates, and no target validation or test image is among them."""
    from medmerge_bench.data.tasks import ROTATION_VAL, load_ancestor_task

    task = load_ancestor_task("fashion", progress=False, kind="rotation")
    pool = fashion.load_fashion_tasks(k=1, seed=0, progress=False).target.unlabeled
    x = torch.cat([task.val.tensors[0], task.train.tensors[0]])
    turns = torch.cat([task.val.tensors[1], task.train.tensors[1]])
    assert len(task.val.tensors[0]) == ROTATION_VAL and len(x) == len(pool) and task.num_classes == 4
    assert sorted(torch.bincount(turns).tolist())[0] > len(pool) // 5  # every turn is common
    for i in (0, 1, 2, 3, ROTATION_VAL, len(pool) - 1, *torch.nonzero(turns == 3)[:2, 0].tolist()):
        torch.testing.assert_close(torch.rot90(x[i], -int(turns[i]), dims=(-2, -1)), pool[i], rtol=0, atol=0)
    upright = {bytes(torch.rot90(img, -int(t), dims=(-2, -1)).numpy()) for img, t in zip(x, turns, strict=True)}
    for held_out in (tasks.target.val, tasks.target.test):
        assert not {bytes(img.numpy()) for img in held_out.tensors[0]} & upright
    # the same task in every call: the ancestor is cached once for every seed
    again = load_ancestor_task("fashion", progress=False, kind="rotation")
    assert torch.equal(again.train.tensors[1], task.train.tensors[1])

"""The Fashion-MNIST control benchmark: sources on two halves of the classes, a few-shot target on all ten.

A non-medical control with the same shapes as the brain benchmark: source A learns classes 0-4, source B classes
5-9, and the target all ten classes from ``k`` images each. A, B and the target's training and validation images
are disjoint pools of the official training set; the target's test images come from the official test set.
Images are 28 x 28, padded with background to 32 x 32, scaled by 1/255 and standardised with the mean and std of
the whole (padded) official training set.
"""

from __future__ import annotations

import functools
import gzip
import time
from pathlib import Path

import numpy as np
import torch

from medmerge_bench.data.tasks import (
    UNLABELED_MAX,
    BenchmarkTasks,
    TaskData,
    k_shot_indices,
    make_tensor_dataset,
    report_progress,
)

__all__ = [
    "CLASS_NAMES",
    "FASHION_DIR",
    "FASHION_FILES",
    "fashion_split_indices",
    "fashion_training_set",
    "load_fashion_tasks",
    "read_idx",
]

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
INSTALL_FASHION = "apt-get install -y dataset-fashion-mnist"
CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SOURCE_A_CLASSES = (0, 1, 2, 3, 4)
SOURCE_B_CLASSES = (5, 6, 7, 8, 9)
SOURCE_TRAIN = 600
SOURCE_VAL = 100
TARGET_VAL = 50
TARGET_TEST = 300
# Seed of every draw except the target's k-shot subset, which the caller's seed draws.
SPLIT_SEED = 0

NOTES = (
    "Fashion-MNIST (Zalando product photos, 28 x 28 greyscale, padded to 32 x 32) is a non-medical control: its "
    "labels are the product categories, exact but for a known share of ambiguous items (shirt, T-shirt/top, pullover "
    "and coat are often confused even by people). Source A sees only classes 0-4 (T-shirt/top, trouser, pullover, "
    "dress, coat) and source B only 5-9 (sandal, shirt, sneaker, bag, ankle boot), so each source has features for "
    "half of the target's classes; the target needs all ten from k images each. Every split uses its own images: A, "
    f"B and the target's training pool and validation set are disjoint parts of the official training set, and the "
    f"test set is a fixed balanced draw of {TARGET_TEST} images per class from the official test set."
)


def read_idx(path: Path) -> np.ndarray:
    """The array stored in a gzipped IDX file (the MNIST format): uint8 images ``(n, 28, 28)`` or labels ``(n,)``.

    Args:
        path: an ``*-ubyte.gz`` file.

    Raises:
        ValueError: when the file is not an IDX file of unsigned bytes.
    """
    with gzip.open(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = raw[0:2], raw[2], raw[3]
    if zero != b"\x00\x00" or dtype != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes.")
    shape = tuple(int.from_bytes(raw[4 + 4 * d : 8 + 4 * d], "big") for d in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _check_files(data_dir: Path) -> dict[str, Path]:
    paths = {key: data_dir / name for key, name in FASHION_FILES.items()}
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"the fashion benchmark needs Fashion-MNIST, missing: {', '.join(missing)}. "
            f"Install it with: {INSTALL_FASHION}"
        )
    return paths


@functools.cache
def _arrays(data_dir: Path) -> dict[str, np.ndarray]:
    arrays = {key: read_idx(path) for key, path in _check_files(data_dir).items()}
    for key in ("train_images", "test_images"):
        arrays[key] = np.pad(arrays[key], ((0, 0), (2, 2), (2, 2)))
    for key in ("train_labels", "test_labels"):
        arrays[key] = arrays[key].astype(np.int64)
    for array in arrays.values():
        array.flags.writeable = False  # shared by every call in this process
    return arrays


@functools.cache
def _train_statistics(data_dir: Path) -> tuple[float, float]:
    # from the histogram of byte values, in chunks: exact, without a 64-bit copy of all 60,000 images
    images = _arrays(data_dir)["train_images"]
    counts = sum(np.bincount(chunk.ravel(), minlength=256) for chunk in np.array_split(images, 30))
    values = np.arange(256) / 255.0
    mean = (counts * values).sum() / counts.sum()
    return float(mean), float(np.sqrt((counts * (values - mean) ** 2).sum() / counts.sum()))


def _standardise(images: np.ndarray, mean: float, std: float) -> np.ndarray:
    return ((images.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)


@functools.cache
def _fixed_indices(data_dir: Path) -> dict[str, np.ndarray]:
    labels = _arrays(data_dir)["train_labels"]
    rng = np.random.default_rng([SPLIT_SEED, 1])
    parts: dict[str, list[np.ndarray]] = {
        name: [] for name in ("a_train", "a_val", "b_train", "b_val", "t_val", "pool")
    }
    for c in range(len(CLASS_NAMES)):
        members = rng.permutation(np.flatnonzero(labels == c))
        source = "a" if c in SOURCE_A_CLASSES else "b"
        # consecutive slices of one permutation: the pools cannot share an image
        parts[f"{source}_train"].append(members[:SOURCE_TRAIN])
        parts[f"{source}_val"].append(members[SOURCE_TRAIN : SOURCE_TRAIN + SOURCE_VAL])
        start = SOURCE_TRAIN + SOURCE_VAL
        parts["t_val"].append(members[start : start + TARGET_VAL])
        parts["pool"].append(members[start + TARGET_VAL :])
    out = {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}
    test_labels = _arrays(data_dir)["test_labels"]
    rng = np.random.default_rng([SPLIT_SEED, 2])
    test = [rng.choice(np.flatnonzero(test_labels == c), TARGET_TEST, replace=False) for c in range(len(CLASS_NAMES))]
    out["t_test"] = np.sort(np.concatenate(test))
    return out


def fashion_training_set() -> tuple[np.ndarray, np.ndarray]:
    """The official training set: uint8 images ``(60000, 32, 32)`` (28 x 28 padded with background) and int64
    labels ``(60000,)``, read-only arrays shared by every caller in this process.

    Raises:
        FileNotFoundError: when Fashion-MNIST is not installed (``dataset-fashion-mnist``).
    """
    arrays = _arrays(FASHION_DIR)
    return arrays["train_images"], arrays["train_labels"]


def fashion_split_indices(k: int, seed: int) -> dict[str, np.ndarray]:
    """Indices of each split's images: into the official training set, except ``"t_test"`` (official test set).

    Args:
        k: target training images per class.
        seed: seed of the target's training subset ``"t_train"``; nothing else depends on it.

    Returns:
        ``"a_train"``, ``"a_val"``, ``"b_train"``, ``"b_val"``, ``"t_train"``, ``"t_val"``, ``"pool"`` (what
        ``"t_train"`` is drawn from) and ``"t_test"``.

    Raises:
        ValueError: when ``k`` < 1 or exceeds a class's pool.
        FileNotFoundError: when Fashion-MNIST is not installed (``dataset-fashion-mnist``).
    """
    _check_files(FASHION_DIR)
    fixed = _fixed_indices(FASHION_DIR)
    pool = fixed["pool"]
    labels = _arrays(FASHION_DIR)["train_labels"]
    chosen = pool[k_shot_indices(labels[pool], k, seed, len(CLASS_NAMES))]
    return {**fixed, "t_train": chosen}


def load_fashion_tasks(k: int, seed: int, progress: bool = True) -> BenchmarkTasks:
    """The Fashion-MNIST control: sources on classes 0-4 and 5-9, a ``k``-shot ten-class target.

    Args:
        k: target training images per class.
        seed: seed of the target's training subset; nothing else depends on it (nor on ``k``).
        progress: print how long loading took to stderr.

    Returns:
        Source A (classes 0-4, 600 train / 100 val per class), source B (classes 5-9, same sizes) and the target
        (10 classes: ``k`` train, 50 val and 300 test per class), as :class:`~medmerge_bench.data.tasks.BenchmarkTasks`.
        Source labels are renumbered from 0 (B's label 0 is "Sandal").

    Raises:
        ValueError: when ``k`` < 1 or exceeds a class's pool.
        FileNotFoundError: when Fashion-MNIST is not installed (``dataset-fashion-mnist``).
    """
    start = time.perf_counter()
    split = fashion_split_indices(k, seed)
    arrays = _arrays(FASHION_DIR)
    images, labels = arrays["train_images"], arrays["train_labels"]
    # the statistics of the whole official training set: the same for every split, seed and k
    mean, std = _train_statistics(FASHION_DIR)

    def subset(name: str, offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
        source_images, source_labels = (
            (arrays["test_images"], arrays["test_labels"]) if name == "t_test" else (images, labels)
        )
        idx = split[name]
        return _standardise(source_images[idx], mean, std), source_labels[idx] - offset

    def data(name: str, classes: list[str], prefix: str, offset: int = 0, test: bool = False) -> TaskData:
        return TaskData(
            name,
            make_tensor_dataset(*subset(f"{prefix}_train", offset)),
            make_tensor_dataset(*subset(f"{prefix}_val", offset)),
            make_tensor_dataset(*subset(f"{prefix}_test", offset)) if test else None,
            classes,
        )

    target = data("fashion/all", list(CLASS_NAMES), "t", test=True)
    # the pool in a seed-independent order, less this seed's labelled images: the first n unlabelled images are the
    # same for every seed that did not label them
    pool = split["pool"][np.random.default_rng([SPLIT_SEED, 3]).permutation(len(split["pool"]))]
    rest = pool[~np.isin(pool, split["t_train"])][:UNLABELED_MAX]
    unlabeled = np.asarray(_standardise(images[rest], mean, std), dtype=np.float32)
    target.unlabeled = torch.from_numpy(unlabeled.reshape(len(rest), 1, *unlabeled.shape[-2:]))
    tasks = BenchmarkTasks(
        name="fashion",
        source_a=data("fashion/classes0-4", [CLASS_NAMES[c] for c in SOURCE_A_CLASSES], "a"),
        source_b=data("fashion/classes5-9", [CLASS_NAMES[c] for c in SOURCE_B_CLASSES], "b", SOURCE_B_CLASSES[0]),
        target=target,
        notes=NOTES,
    )
    report_progress(progress, f"fashion tasks ready in {time.perf_counter() - start:.1f} s (k={k}, seed={seed})")
    return tasks

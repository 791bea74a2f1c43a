"""The offline real-data benchmark: two source tasks and one few-shot target task, on real images, with no download.

Each benchmark gives two source tasks (to pretrain the networks that are merged) and a target task with ``k``
labelled images per class, a fixed validation set and a fixed test set. ``seed`` draws only the target's ``k``-shot
training subset: everything else is the same for every seed and every ``k``, so runs with different seeds are paired
and differ only in which few target images were labelled.

- ``"brain"``: 32 x 32 patches of brain MRI templates on one MNI grid (see :mod:`medmerge_bench.data.brain`).
- ``"fashion"``: Fashion-MNIST, a non-medical control (see :mod:`medmerge_bench.data.fashion`).
- ``"brain_<variant>"``: the brain benchmark with other sources or another target on the same grid, searched for
  room for a merge (see :data:`medmerge_bench.data.brain.BRAIN_VARIANTS` and ``benchmarks/room_search.py``).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = [
    "BENCHMARKS",
    "BRAIN_VARIANT_PREFIX",
    "BenchmarkTasks",
    "TaskData",
    "ANCESTOR_KINDS",
    "UNLABELED_MAX",
    "ancestor_of",
    "benchmark_names",
    "cache_dir",
    "k_shot_indices",
    "load_ancestor_task",
    "load_benchmark_tasks",
    "make_tensor_dataset",
]

BENCHMARKS = ("brain", "fashion")
# the brain variants are tasks named "brain_<variant>", one per key of medmerge_bench.data.brain.BRAIN_VARIANTS
BRAIN_VARIANT_PREFIX = "brain_"
PATCH_SIZE = 32
CACHE_ENV = "MONAI_MEDMERGE_CACHE"
# the most unlabelled target images a task hands out (``TaskData.unlabeled``): enough for distillation, and the brain
# pool (over 200 000 patch centres) would take about a gigabyte as patches
UNLABELED_MAX = 20000
# what a shared ancestor is trained on (load_ancestor_task): the other domain's pooled sources, or quarter turns of
# the target domain's unlabelled images
ANCESTOR_KINDS = ("other_domain", "rotation")
# unlabelled images held out to validate the rotation ancestor
ROTATION_VAL = 2000
TURN_NAMES = ["0 degrees", "90 degrees", "180 degrees", "270 degrees"]


@dataclass
class TaskData:
    """One labelled task: inputs ``x`` float32 of shape ``(n, 1, 32, 32)`` and labels ``y`` int64 in each split.

    Args:
        name: a short name, e.g. ``"brain/tissue"``.
        train: the training split.
        val: the validation split (early stopping, model selection).
        test: the test split, or None for source tasks (they are only pretrained on).
        class_names: one name per class; label ``i`` is ``class_names[i]``.
        unlabeled: images of the task's domain without their labels, ``(n, 1, H, W)`` float32, disjoint from every
            split: up to ``UNLABELED_MAX`` of the training pool the labelled subset was drawn from, less that subset,
            in an order that does not depend on the seed; None where the task has none. Few-shot medical tasks
            usually have many such images; the distillation rows may use them.
    """

    name: str
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset | None
    class_names: list[str]
    unlabeled: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class BenchmarkTasks:
    """The tasks of one benchmark: two sources to pretrain on and a few-shot target.

    Args:
        name: the benchmark, ``"brain"`` or ``"fashion"``.
        source_a: the first source task.
        source_b: the second source task.
        target: the target task: ``k`` training images per class, validation and test.
        notes: what the labels are and where they fall short.
    """

    name: str
    source_a: TaskData
    source_b: TaskData
    target: TaskData
    notes: str


def cache_dir() -> Path:
    """The folder for derived data: ``$MONAI_MEDMERGE_CACHE`` if set, else ``~/.cache/monai_medmerge``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "monai_medmerge")


def make_tensor_dataset(x: np.ndarray, y: np.ndarray) -> TensorDataset:
    """A :class:`TensorDataset` of float32 images ``(n, 1, H, W)`` and int64 labels, copied from ``x`` and ``y``.

    Args:
        x: images of shape ``(n, H, W)`` or ``(n, 1, H, W)``.
        y: labels of shape ``(n,)``.

    Raises:
        ValueError: when ``x`` and ``y`` hold different numbers of items.
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 3:
        x = x[:, None]
    y = np.asarray(y, dtype=np.int64)
    if len(x) != len(y) or x.ndim != 4 or y.ndim != 1:
        raise ValueError(f"expected x (n, 1, H, W) and y (n,), got {x.shape} and {y.shape}.")
    # copies: the callers' cached arrays must not be changed through the tensors handed out
    return TensorDataset(torch.tensor(x), torch.tensor(y))


def k_shot_indices(labels: np.ndarray, k: int, seed: int, num_classes: int) -> np.ndarray:
    """Indices into ``labels`` of ``k`` items per class, drawn at random with ``seed``, in shuffled order.

    The subsets are nested in ``k``: with one seed, the ``k=10`` subset lies inside the ``k=50`` one.

    Args:
        labels: the class of each item of the pool.
        k: items per class.
        seed: seed of the draw.
        num_classes: classes ``0 .. num_classes - 1`` are drawn.

    Raises:
        ValueError: when ``k`` < 1 or a class has fewer than ``k`` items.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < k:
            raise ValueError(f"class {c} has {len(members)} items in the training pool, fewer than k={k}.")
        # a permutation of the whole class, then its first k: the same seed gives nested subsets for every k
        chosen.append(rng.permutation(members)[:k])
    picked = np.concatenate(chosen)
    return picked[rng.permutation(len(picked))]


def report_progress(progress: bool, message: str) -> None:
    """Print ``message`` to stderr when ``progress`` is set."""
    if progress:
        print(f"[medmerge_bench.data] {message}", file=sys.stderr, flush=True)


def benchmark_names() -> tuple[str, ...]:
    """The tasks :func:`load_benchmark_tasks` accepts: ``BENCHMARKS``, then the variants ``"brain_<variant>"``."""
    from medmerge_bench.data.brain import BRAIN_VARIANTS

    return BENCHMARKS + tuple(BRAIN_VARIANT_PREFIX + variant for variant in BRAIN_VARIANTS)


def _brain_variant(task: str) -> str | None:
    """The variant of a ``"brain_<variant>"`` task name, None for any other name (known or not)."""
    if not task.startswith(BRAIN_VARIANT_PREFIX):
        return None
    from medmerge_bench.data.brain import BRAIN_VARIANTS

    variant = task[len(BRAIN_VARIANT_PREFIX) :]
    return variant if variant in BRAIN_VARIANTS else None


def load_benchmark_tasks(task: str, k: int, seed: int, progress: bool = True) -> BenchmarkTasks:
    """The source and target tasks of one offline benchmark.

    Args:
        task: ``"brain"``, ``"fashion"`` or a brain variant ``"brain_<variant>"`` (:func:`benchmark_names`).
        k: labelled target training images per class.
        seed: seed of the target's ``k``-shot draw; sources, target validation and test do not depend on it.
        progress: print what is being built, and how long it took, to stderr.

    Returns:
        A :class:`BenchmarkTasks`; its target has ``k * num_classes`` training images.

    Raises:
        ValueError: for an unknown task or a ``k`` the training pool cannot serve.
        FileNotFoundError: when the data package is not installed (the message says what to install).
        RuntimeError: when a Python package the task needs is missing (the message says what to install).
    """
    # imported here, not at the top: both loaders import TaskData and BenchmarkTasks from this module
    if task == "brain":
        from medmerge_bench.data.brain import load_brain_tasks

        return load_brain_tasks(k, seed, progress=progress)
    if task == "fashion":
        from medmerge_bench.data.fashion import load_fashion_tasks

        return load_fashion_tasks(k, seed, progress=progress)
    variant = _brain_variant(task)
    if variant is not None:
        from medmerge_bench.data.brain import load_brain_tasks

        return load_brain_tasks(k, seed, progress=progress, variant=variant)
    raise ValueError(f"unknown benchmark task {task!r}; choose one of {', '.join(benchmark_names())}.")


# The ancestor of each benchmark in the shared lineage: the OTHER benchmark's two source tasks pooled into one task.
# The brain variants share the brain task's ancestor (see ancestor_of).
ANCESTOR_OF = {"brain": "fashion", "fashion": "brain"}


def ancestor_of(task: str) -> str:
    """The benchmark whose pooled sources train the shared ancestor of ``task``'s sources: ``ANCESTOR_OF`` for
    ``"brain"`` and ``"fashion"``; ``"fashion"`` for every brain variant.

    Raises:
        ValueError: for an unknown task.
    """
    family = "brain" if _brain_variant(task) is not None else task
    if family not in ANCESTOR_OF:
        raise ValueError(f"unknown benchmark task {task!r}; choose one of {', '.join(benchmark_names())}.")
    return ANCESTOR_OF[family]


def load_ancestor_task(task: str, progress: bool = True, kind: str = "other_domain") -> TaskData:
    """The broad task a shared ancestor of ``task``'s sources is trained on, the stand-in for ImageNet.

    - ``kind="other_domain"``: the other benchmark's two source tasks pooled into one classification over all their
      classes (brain: Fashion-MNIST's ten classes; fashion: three tissue and seven anatomy classes of brain MRI
      patches), so the ancestor never sees the target's images or domain, as ImageNet never saw the paper's medical
      targets. The brain variants (``"brain_<variant>"``) have the brain task's ancestor.
    - ``kind="rotation"``: self-supervised, :func:`rotation_task` on the target domain's unlabelled images: no label
      of any task, but many more images than the labelled tasks have, as ImageNet has for the paper's networks.

    Raises:
        ValueError: for an unknown task or kind.
    """
    if kind not in ANCESTOR_KINDS:
        raise ValueError(f"unknown ancestor kind {kind!r}; choose one of {', '.join(ANCESTOR_KINDS)}.")
    if kind == "rotation":
        return rotation_task(task, progress=progress)
    other = load_benchmark_tasks(ancestor_of(task), k=1, seed=0, progress=progress)
    a, b = other.source_a, other.source_b

    def pooled(split: str) -> TensorDataset:
        xa, ya = getattr(a, split).tensors
        xb, yb = getattr(b, split).tensors
        # B's labels follow A's, so the pooled task has one label per class of either source
        return TensorDataset(torch.cat([xa, xb]), torch.cat([ya, yb + a.num_classes]))

    names = [f"{a.name}:{c}" for c in a.class_names] + [f"{b.name}:{c}" for c in b.class_names]
    return TaskData(f"{other.name}/pooled-sources", pooled("train"), pooled("val"), None, names)


def rotation_task(task: str, progress: bool = True) -> TaskData:
    """A self-supervised task on ``task``'s unlabelled target images: which quarter turn (0, 90, 180, 270 degrees)
    was applied to each image (a pretext task of Gidaris et al., 2018, that learns shapes and orientation).

    The images are the target's ``unlabeled`` images of seed 0 at ``k = 1`` (the training pool, never its
    validation or test images), so the task is the same for every seed; each image gets one turn drawn with a fixed
    seed, and the first ``ROTATION_VAL`` images validate. A seed's few labelled images may be among them, without
    their labels, as in any self-supervised pretraining on a domain's images.

    Raises:
        ValueError: when the task has too few unlabelled square images.
    """
    target = load_benchmark_tasks(task, k=1, seed=0, progress=progress).target
    images = target.unlabeled
    if images is None or len(images) < 2 * ROTATION_VAL or images.shape[-1] != images.shape[-2]:
        shape = None if images is None else tuple(images.shape)
        raise ValueError(
            f"the rotation ancestor of {task!r} needs at least {2 * ROTATION_VAL} unlabelled square target images; "
            f"its target has {shape}."
        )
    turns = torch.from_numpy(np.random.default_rng([0, 4]).integers(0, len(TURN_NAMES), len(images)))
    rotated = images.clone()
    for t in range(1, len(TURN_NAMES)):
        chosen = turns == t
        rotated[chosen] = torch.rot90(images[chosen], t, dims=(-2, -1))
    val, train = slice(0, ROTATION_VAL), slice(ROTATION_VAL, None)
    return TaskData(
        f"{target.name}/rotation",
        TensorDataset(rotated[train], turns[train]),
        TensorDataset(rotated[val], turns[val]),
        None,
        list(TURN_NAMES),
    )

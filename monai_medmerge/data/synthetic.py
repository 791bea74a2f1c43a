"""Synthetic blob images made by MONAI's test-image generator: small offline tasks for the quick start and tests.

Each task labels 2-D images of bright discs by what a network must look at: how many discs there are, how large
they are, or both. Two such tasks make two source tasks that share low-level features but differ in what the top
layers need, and a third makes a target task that needs parts of both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.data import create_test_image_2d
from torch.utils.data import TensorDataset

__all__ = ["BlobTask", "make_blob_dataset", "TASKS"]


@dataclass(frozen=True)
class BlobTask:
    """A labelled family of blob images: class ``c`` has ``counts[c]`` discs with radii in ``radii[c]``."""

    name: str
    counts: tuple[int, ...]
    radii: tuple[tuple[int, int], ...]

    @property
    def num_classes(self) -> int:
        return len(self.counts)


TASKS = {
    # source A: how many discs (size varies freely)
    "count": BlobTask("count", counts=(1, 3, 6), radii=((2, 6), (2, 6), (2, 6))),
    # source B: how large (two discs each)
    "size": BlobTask("size", counts=(2, 2, 2), radii=((2, 3), (4, 5), (6, 8))),
    # target: both at once
    "count_size": BlobTask("count_size", counts=(1, 1, 5, 5), radii=((2, 3), (5, 7), (2, 3), (5, 7))),
}


def make_blob_dataset(
    task: BlobTask | str, per_class: int, seed: int, size: int = 32, noise: float = 0.3
) -> TensorDataset:
    """``per_class`` images per class of ``task``, shape ``(1, size, size)``, float32 in about [0, 1], shuffled.

    Args:
        task: a :class:`BlobTask` or the name of one in ``TASKS``.
        per_class: images per class.
        seed: seed of the generator (images and order).
        size: image side in pixels.
        noise: maximum of the uniform noise added.

    Raises:
        ValueError: for an unknown task name or ``per_class`` < 1.
    """
    if isinstance(task, str):
        if task not in TASKS:
            raise ValueError(f"unknown blob task {task!r}; available: {sorted(TASKS)}.")
        task = TASKS[task]
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}.")
    rs = np.random.RandomState(seed)
    images, labels = [], []
    for label, (count, (r_min, r_max)) in enumerate(zip(task.counts, task.radii, strict=True)):
        for _ in range(per_class):
            img, _ = create_test_image_2d(
                size, size, num_objs=count, rad_max=r_max + 1, rad_min=r_min, noise_max=noise, random_state=rs
            )
            images.append(img.astype(np.float32))
            labels.append(label)
    order = rs.permutation(len(labels))
    x = torch.from_numpy(np.stack(images)[order]).unsqueeze(1)
    y = torch.tensor(labels, dtype=torch.long)[order]
    return TensorDataset(x, y)

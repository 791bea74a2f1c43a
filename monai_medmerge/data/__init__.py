"""Data for merge training: datalists, the preprocessing pipelines, strict readers and the synthetic example tasks.

The offline benchmark tasks (brain MRI, Fashion-MNIST) are research data: :mod:`medmerge_bench.data`.
"""

from __future__ import annotations

from monai_medmerge.data.datalist import check_items, load_datalist
from monai_medmerge.data.pipelines import classification_transforms, make_dataset
from monai_medmerge.data.synthetic import BlobTask, make_blob_dataset
from monai_medmerge.data.transforms import BadImageError, CheckedLoadImaged, find_bad_image_error

__all__ = ["BlobTask", "make_blob_dataset"]
__all__ += [
    "BadImageError",
    "CheckedLoadImaged",
    "check_items",
    "classification_transforms",
    "find_bad_image_error",
    "load_datalist",
    "make_dataset",
]

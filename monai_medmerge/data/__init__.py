"""Data for merge training: datalists, the preprocessing pipelines (classification and segmentation), strict readers
and the synthetic example tasks.

The offline benchmark tasks (brain MRI, Fashion-MNIST) are research data: :mod:`medmerge_bench.data`.
"""

from __future__ import annotations

from monai_medmerge.data.datalist import check_items, load_datalist
from monai_medmerge.data.pipelines import classification_transforms, make_dataset, segmentation_transforms
from monai_medmerge.data.synthetic import BlobTask, make_blob_dataset
from monai_medmerge.data.transforms import BadImageError, CheckedLabelMapd, CheckedLoadImaged, find_bad_image_error

__all__ = ["BlobTask", "make_blob_dataset"]
__all__ += [
    "BadImageError",
    "CheckedLabelMapd",
    "CheckedLoadImaged",
    "check_items",
    "classification_transforms",
    "find_bad_image_error",
    "load_datalist",
    "make_dataset",
    "segmentation_transforms",
]

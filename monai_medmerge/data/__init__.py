"""Data for merge training: transforms, datalists and the offline example tasks."""

from __future__ import annotations

from monai_medmerge.data.synthetic import BlobTask, make_blob_dataset

__all__ = ["BlobTask", "make_blob_dataset"]

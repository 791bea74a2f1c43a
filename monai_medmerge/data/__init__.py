"""Data for merge training: the offline benchmark tasks and the synthetic example tasks."""

from __future__ import annotations

from monai_medmerge.data.synthetic import BlobTask, make_blob_dataset
from monai_medmerge.data.tasks import BENCHMARKS, BenchmarkTasks, TaskData, load_benchmark_tasks

__all__ = ["BENCHMARKS", "BenchmarkTasks", "BlobTask", "TaskData", "load_benchmark_tasks", "make_blob_dataset"]

"""The offline benchmark tasks: two source tasks and a few-shot target task on real images, with no download."""

from __future__ import annotations

from medmerge_bench.data.tasks import BENCHMARKS, BenchmarkTasks, TaskData, load_benchmark_tasks

__all__ = ["BENCHMARKS", "BenchmarkTasks", "TaskData", "load_benchmark_tasks"]

"""The research side of monai_medmerge: offline benchmark tasks, the transfer comparison, plots, the demo and the
quickstart, and an Orthanc test server. It imports the product (``monai_medmerge``) and drives the same training
path users run; the product never imports it (the ``medmerge demo``, ``benchmark`` and ``quickstart`` commands load
it when they run).

Modules:
    data: the offline tasks (``brain``: MRI template patches; ``fashion``: Fashion-MNIST) with k-shot targets.
    transfer: MedMerge against transfer baselines for one seed, and the summary over seeds.
    comparison: the comparison over seeds with its result files and pictures (``medmerge benchmark``).
    plots: the pictures of a comparison.
    demo: ``medmerge demo``; quickstart: ``medmerge quickstart``.
    orthanc: a local Orthanc DICOMweb server for tests and benchmarks.

Install it with the product: ``pip install -e ".[bench]"`` (its extra adds matplotlib, nilearn).
"""

from __future__ import annotations

__all__: list[str] = []

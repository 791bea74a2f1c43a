"""monai_medmerge: merge several pretrained networks of one architecture into one network for a new task."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]

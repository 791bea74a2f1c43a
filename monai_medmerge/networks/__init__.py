"""Merge networks: MONAI network components that hold several source networks and run them as one."""

from __future__ import annotations

from monai_medmerge.networks.heads import find_head, head_names
from monai_medmerge.networks.kernel_merge import GRANULARITIES, KernelMerge, replace_head
from monai_medmerge.networks.units import MergeUnit, find_units

__all__ = ["GRANULARITIES", "KernelMerge", "MergeUnit", "find_head", "find_units", "head_names", "replace_head"]

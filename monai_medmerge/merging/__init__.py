"""Merge methods and their registry, alignment (weight matching), zipping into a wider network, norm recalibration.

Every method is a small class registered by name; ``get_method("kernel", anchor=1)`` builds one, and
``list_methods()`` describes them all. See :mod:`monai_medmerge.merging.base` for the interface. Zipping
(:func:`zip_networks`) is not a registered method: its result is a network of another width than the sources', which
the registry's same-width merges (a ``KernelMerge`` collapsed into the sources' class) cannot express.
"""

from __future__ import annotations

from monai_medmerge.merging.alignment import activation_matching, align_sources, apply_permutation, weight_matching
from monai_medmerge.merging.base import METHODS, MergeMethod, MethodParameter, get_method, list_methods, register_method
from monai_medmerge.merging.fixed import Average, Interpolate
from monai_medmerge.merging.learned import LearnedKernelMerge, LearnedLayerMerge, LearnedModelMerge
from monai_medmerge.merging.norm import norm_layers, recalibrate_norm
from monai_medmerge.merging.permutation import PermutationSpec, UnsupportedOperationError, permutation_spec
from monai_medmerge.merging.zip import feature_correlations, inference_macs, zip_matrices, zip_networks

__all__ = [
    "METHODS",
    "Average",
    "Interpolate",
    "LearnedKernelMerge",
    "LearnedLayerMerge",
    "LearnedModelMerge",
    "MergeMethod",
    "MethodParameter",
    "get_method",
    "list_methods",
    "PermutationSpec",
    "UnsupportedOperationError",
    "activation_matching",
    "align_sources",
    "apply_permutation",
    "feature_correlations",
    "inference_macs",
    "norm_layers",
    "permutation_spec",
    "recalibrate_norm",
    "register_method",
    "weight_matching",
    "zip_matrices",
    "zip_networks",
]

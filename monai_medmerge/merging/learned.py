"""Merges with learned coefficients at model, layer and kernel granularity (MedMerge is the kernel one)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from monai_medmerge.merging.base import MergeMethod, MethodParameter, register_method
from monai_medmerge.networks import KernelMerge

__all__ = ["LearnedModelMerge", "LearnedLayerMerge", "LearnedKernelMerge"]

_ANCHOR_PARAMETERS = (
    MethodParameter("anchor", None, "index of the source whose coefficients start high (None: uniform start)"),
    MethodParameter("anchor_weight", None, "starting share of the anchor in (0, 1); 0.9 when anchor is set"),
)


class _LearnedMerge(MergeMethod):
    learned = True
    parameters = _ANCHOR_PARAMETERS
    granularity = ""

    def _build(self, sources: Sequence[nn.Module], head: str | None, out_channels: int | None) -> KernelMerge:
        return KernelMerge(
            sources,
            head=head,
            out_channels=out_channels,
            granularity=self.granularity,
            anchor=self.settings["anchor"],
            anchor_weight=self.settings["anchor_weight"],
        )


@register_method
class LearnedModelMerge(_LearnedMerge):
    """One learned weight per source for the whole network."""

    name = "model"
    pretty_name = "Learned model-level merge"
    reference = "https://arxiv.org/abs/2403.11646"
    granularity = "model"


@register_method
class LearnedLayerMerge(_LearnedMerge):
    """One learned weight per source for each layer (conv, linear or norm module)."""

    name = "layer"
    pretty_name = "Learned layer-level merge"
    reference = "https://arxiv.org/abs/2403.11646"
    granularity = "layer"


@register_method
class LearnedKernelMerge(_LearnedMerge):
    """MedMerge: one learned weight per source for each output kernel of each layer."""

    name = "kernel"
    pretty_name = "MedMerge (learned kernel-level merge)"
    reference = "https://arxiv.org/abs/2403.11646"
    granularity = "kernel"

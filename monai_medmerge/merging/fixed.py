"""Merges with fixed coefficients: uniform weight average and interpolation."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from monai_medmerge.merging.base import MergeMethod, MethodParameter, register_method
from monai_medmerge.networks import KernelMerge

__all__ = ["Average", "Interpolate"]


@register_method
class Average(MergeMethod):
    """Uniform average of the sources' weights (model soup / weight averaging)."""

    name = "average"
    pretty_name = "Uniform weight average"
    reference = "https://arxiv.org/abs/2203.05482"

    def _build(self, sources: Sequence[nn.Module], head: str | None, out_channels: int | None) -> KernelMerge:
        merge = KernelMerge(sources, head=head, out_channels=out_channels, granularity="model")
        merge.merge_logits.requires_grad_(False)
        return merge


@register_method
class Interpolate(MergeMethod):
    """Fixed convex combination of the sources: ``t`` for two sources, or one weight per source."""

    name = "interpolate"
    pretty_name = "Linear interpolation"
    reference = "https://arxiv.org/abs/1912.05671"
    parameters = (
        MethodParameter("t", None, "two sources only: weight of source 1; source 0 gets 1 - t"),
        MethodParameter("weights", None, "one non-negative weight per source, summing to 1"),
    )

    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        t, weights = self.settings["t"], self.settings["weights"]
        if (t is None) == (weights is None):
            raise ValueError(f"interpolate needs exactly one of t or weights, got t={t!r}, weights={weights!r}.")
        if t is not None and not 0.0 <= float(t) <= 1.0:
            raise ValueError(f"interpolate: t must lie in [0, 1], got {t!r}.")

    def _build(self, sources: Sequence[nn.Module], head: str | None, out_channels: int | None) -> KernelMerge:
        weights = self.settings["weights"]
        if weights is None:
            if len(sources) != 2:
                raise ValueError(f"interpolate: t is for two sources, got {len(sources)}; give weights instead.")
            weights = [1.0 - float(self.settings["t"]), float(self.settings["t"])]
        if len(weights) != len(sources):
            raise ValueError(f"interpolate: {len(weights)} weights for {len(sources)} sources.")
        merge = KernelMerge(sources, head=head, out_channels=out_channels, granularity="model")
        merge.set_coefficients(list(map(float, weights)))
        merge.merge_logits.requires_grad_(False)
        return merge

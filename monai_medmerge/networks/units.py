"""Mergeable units of a network: which tensors share a merge coefficient, and along which output-channel axis."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["MergeUnit", "find_units", "to_channel_major", "from_channel_major"]

# Modules whose every parameter has the output channels on axis 0 (bias shares the kernel's coefficient).
_AXIS0_TYPES = (_ConvNd, nn.Linear, _BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm)


@dataclass(frozen=True)
class MergeUnit:
    """One merge unit: the parameters of one module that share one coefficient per source and output channel.

    Args:
        name: dotted name of the owning module ("" for the root), or of the parameter for a whole-tensor unit.
        module: dotted name of the owning module.
        params: parameter names local to ``module`` (e.g. ``("weight", "bias")``).
        channels: number of output channels ``C`` (1 for a whole-tensor unit).
        transposed_groups: ``groups`` of a ConvTranspose (its output axis is 1, laid out per group); 0 otherwise.
        whole: True when the parameter has no known output-channel axis and is merged as one block.
    """

    name: str
    module: str
    params: tuple[str, ...]
    channels: int
    transposed_groups: int = 0
    whole: bool = False

    def full_names(self) -> list[str]:
        """Dotted parameter names of this unit, as in ``named_parameters()``."""
        prefix = f"{self.module}." if self.module else ""
        return [prefix + p for p in self.params]


def find_units(network: nn.Module, exclude: str | None = None) -> list[MergeUnit]:
    """List the merge units of ``network`` in ``named_modules`` order.

    Conv, ConvTranspose, Linear and norm layers give one unit per module, with one coefficient per output
    channel. Any other parameter (a PReLU slope, an embedding, a custom layer's tensor) becomes a whole-tensor
    unit with a single coefficient per source, so that nothing is left unmerged.

    Args:
        network: the template network.
        exclude: dotted name of a module (the replaced head) whose parameters are not merged.

    Returns:
        the units; every parameter of ``network`` outside ``exclude`` belongs to exactly one.
    """
    units: list[MergeUnit] = []
    covered: set[str] = set()
    for mod_name, module in network.named_modules():
        if exclude is not None and (mod_name == exclude or mod_name.startswith(exclude + ".")):
            continue
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p is not None]
        if not own:
            continue
        if isinstance(module, _ConvTransposeNd):
            channels, groups = module.out_channels, module.groups
        elif isinstance(module, _AXIS0_TYPES):
            channels, groups = own[0][1].shape[0], 0
        else:
            continue
        names = tuple(n for n, _ in own)
        units.append(MergeUnit(mod_name, mod_name, names, int(channels), groups))
        covered.update(u for u in units[-1].full_names())
    for full, _ in network.named_parameters():
        if full in covered or (exclude is not None and (full.startswith(exclude + "."))):
            continue
        mod_name, _, local = full.rpartition(".")
        units.append(MergeUnit(full, mod_name, (local,), 1, 0, whole=True))
    return units


def to_channel_major(t: torch.Tensor, unit: MergeUnit) -> torch.Tensor:
    """Reshape one parameter of ``unit`` to ``(C, K)``: row ``c`` holds every value of output channel ``c``."""
    if unit.whole:
        return t.reshape(1, -1)
    if unit.transposed_groups and t.dim() > 1:
        # ConvTranspose weight: (C_in, C_out / g, *k); output channel of [i, j] is (i // (C_in / g)) * C_out / g + j.
        g = unit.transposed_groups
        c_in, c_out_g = t.shape[0], t.shape[1]
        t = t.reshape(g, c_in // g, c_out_g, -1).permute(0, 2, 1, 3)
        return t.reshape(g * c_out_g, -1)
    return t.reshape(t.shape[0], -1)


def from_channel_major(m: torch.Tensor, unit: MergeUnit, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`to_channel_major` for a parameter of the given ``shape``."""
    if unit.transposed_groups and len(shape) > 1 and not unit.whole:
        g = unit.transposed_groups
        c_in, c_out_g = shape[0], shape[1]
        m = m.reshape(g, c_out_g, c_in // g, -1).permute(0, 2, 1, 3)
    return m.reshape(shape)

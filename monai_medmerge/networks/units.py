"""Mergeable units of a network: which tensors share a merge coefficient, and along which output-channel axis."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.modules.instancenorm import _InstanceNorm

__all__ = ["MergeUnit", "find_units", "from_channel_major", "module_names", "tied_parameters", "to_channel_major"]

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

    A module reached under several names (MONAI's DynUNet reaches its encoder, decoder and deep-supervision heads
    both as ``input_block``/``downsamples``/... and through ``skip_layers``) is one unit, named by its first name in
    ``named_modules`` order; its parameters are merged once.

    Args:
        network: the template network.
        exclude: dotted name of a module (the replaced head) whose parameters are not merged. The module is
            left out under every name it is reached by.

    Returns:
        the units; every parameter of ``network`` outside ``exclude`` belongs to exactly one.

    Raises:
        ValueError: when ``exclude`` is not a module of ``network``.
    """
    excluded: set[int] = set()
    if exclude is not None:
        try:
            excluded = {id(m) for m in network.get_submodule(exclude).modules()}
        except AttributeError as e:
            raise ValueError(f"exclude {exclude!r} is not a module of {type(network).__name__}: {e}") from e
    units: list[MergeUnit] = []
    covered: set[int] = set()
    # named_modules() and named_parameters() yield each module and parameter once, under its first name
    for mod_name, module in network.named_modules():
        if id(module) in excluded:
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
        covered.update(id(p) for _, p in own)
    excluded_params = {id(p) for m in network.modules() if id(m) in excluded for p in m.parameters(recurse=False)}
    for full, p in network.named_parameters():
        if id(p) in covered or id(p) in excluded_params:
            continue
        mod_name, _, local = full.rpartition(".")
        units.append(MergeUnit(full, mod_name, (local,), 1, 0, whole=True))
    return units


def module_names(network: nn.Module, module: nn.Module) -> list[str]:
    """Every dotted name under which ``network`` reaches ``module`` (one for most networks; more for DynUNet)."""
    return [name for name, m in network.named_modules(remove_duplicate=False) if m is module]


def tied_parameters(network: nn.Module) -> list[tuple[str, ...]]:
    """Real weight tying: each group of names under which one ``nn.Parameter`` is held by different modules.

    A module reached under several names is not tying (its parameters are reached under several names too, but
    they are one module's, and merge as one unit); one Parameter assigned to two modules (or to two attributes of
    one module), as in a language model whose output layer reuses its embedding, is.

    Returns:
        one tuple of parameter names per tied Parameter, in ``named_modules`` order; empty when nothing is tied.
    """
    owners: dict[int, dict[tuple[int, str], str]] = {}
    for mod_name, module in network.named_modules(remove_duplicate=False):
        for local, p in module.named_parameters(recurse=False, remove_duplicate=False):
            full = f"{mod_name}.{local}" if mod_name else local
            owners.setdefault(id(p), {}).setdefault((id(module), local), full)
    return [tuple(names.values()) for names in owners.values() if len(names) > 1]


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

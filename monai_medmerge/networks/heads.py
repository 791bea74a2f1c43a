"""Task heads: find the layers that produce a network's output channels, and replace them with fresh ones.

A merge keeps what the sources learned about images and drops what they learned about their own labels: the layers
whose output channels are the source task's classes. For a classifier that is one ``nn.Linear``; for a
segmentation network it is the output convolution (MONAI's UNet with residual units has two layers in class space,
a transposed convolution and a residual unit, held in one block), and DynUNet adds a deep-supervision head per
decoder level. :func:`find_head` finds the head by running the network once; :func:`replace_head` swaps it (and the
deep-supervision heads that come with it) for freshly initialised layers sized for the target's classes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.modules.instancenorm import _InstanceNorm

from monai_medmerge.networks.units import module_names

__all__ = ["AUTO", "DEEP_SUPERVISION_ATTR", "find_head", "head_names", "head_size", "replace_head"]

AUTO = "auto"
# the attribute under which MONAI's DynUNet keeps its deep-supervision heads (an nn.ModuleList)
DEEP_SUPERVISION_ATTR = "deep_supervision_heads"
_LAYER_TYPES = (nn.Linear, _ConvNd)
_NORM_TYPES = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm)
# spatial sides tried for the random example input, in order: small first; a network whose deepest level must keep
# more than one voxel (SwinUNETR with instance norm) needs the second
_SIDES = {1: (64, 128), 2: (64, 128), 3: (32, 64)}


class _Call(NamedTuple):
    name: str
    module: nn.Module
    shape: tuple[int, ...]


def find_head(network: nn.Module, example_input: torch.Tensor | None = None) -> str:
    """The dotted name of the module whose output is the network output's channel axis.

    The network runs once in eval mode, without gradients, with a forward hook on every ``nn.Linear`` and
    convolution (transposed ones included). The head is the last such layer called whose output has the network
    output's shape (channels and spatial size). When the layers called just before it also have that shape and,
    together with it, make up every linear/conv layer of one block (MONAI's UNet with residual units: ``model.2``
    holds a transposed convolution to the classes and a residual unit on the classes), that block is the head,
    since replacing only its last layer would leave the others producing the old classes. Likewise, a block that
    holds only the head and norm layers on the classes after it (MONAI's ``Convolution`` with a norm, HighResNet's
    ``blocks.11``) is the head. When no layer has the output's full shape (a head followed by resizing), the last
    layer called is the head if its output has the output's channel count.

    The training mode of every module is restored afterwards. Networks that keep activations of their last forward
    (DynUNet's deep-supervision outputs) keep those of this run.

    Args:
        network: the network; a tuple, list or dict output is read at its first tensor.
        example_input: an input batch; by default a random one with the channels and dimensions of the first
            convolution (64 pixels a side in 1-D/2-D, 32 in 3-D, and twice that if the network fails on it).

    Returns:
        a name usable with ``network.get_submodule`` and as ``KernelMerge(head=...)``.

    Raises:
        ValueError: when the network cannot be run on a random input (pass ``example_input``), or no layer
            produces the output's channels; the message names the network's class and the last layers called.
    """
    calls, shape = _trace(network, example_input)
    matches = [i for i, c in enumerate(calls) if c.shape == shape]
    if not matches:
        last = calls[-1] if calls else None
        if last is not None and len(last.shape) == len(shape) and last.shape[:2] == shape[:2]:
            return last.name
        raise ValueError(
            f"find_head: no nn.Linear or convolution of {type(network).__name__} produces its output of shape "
            f"{shape} (its channels are axis 1); the last such layers called, with their outputs, were: "
            f"{_describe(calls)}. Name the head module itself, e.g. KernelMerge(head=...)."
        )
    end = matches[-1]
    start = end
    while start > 0 and calls[start - 1].shape == shape:
        start -= 1
    # the longest run of class-space layers that fills one block on its own; one layer is its own block
    head = calls[end].name
    for first in range(start, end):
        run = calls[first : end + 1]
        parent = _common_parent([c.name for c in run])
        if parent and _layer_ids(network.get_submodule(parent)) == {id(c.module) for c in run}:
            head = parent
            break
    return _with_norms(network, head, shape[1])


def head_names(network: nn.Module, head: str, example_input: torch.Tensor | None = None) -> list[str]:
    """The modules that :func:`replace_head` replaces for ``head``: the head, then its deep-supervision heads.

    ``head="auto"`` is resolved with :func:`find_head`. Deep-supervision heads are found where MONAI keeps them:
    the members of ``network.deep_supervision_heads`` (DynUNet built with ``deep_supervision=True``) and the
    ``head`` layers of ``network.up_layers`` (SegResNetDS with ``dsdepth > 1``), when they produce as many channels
    as the head. They predict the source task's classes too, and in training mode the network returns their
    outputs with the head's (DynUNet stacks them), so they must have the target's.

    Raises:
        ValueError: when ``head`` is not a module of ``network`` (the message lists candidates) or ``"auto"``
            finds none.
    """
    if head == AUTO:
        head = find_head(network, example_input)
    modules = dict(network.named_modules())
    if head not in modules or not head:
        raise ValueError(
            f"head {head!r} is not a module of {type(network).__name__}; candidates: {_candidates(network)}, "
            f'or head="{AUTO}" to find it.'
        )
    main = modules[head]
    candidates: list[str] = []
    extra = getattr(network, DEEP_SUPERVISION_ATTR, None)
    if isinstance(extra, nn.ModuleList):
        candidates += [f"{DEEP_SUPERVISION_ATTR}.{i}" for i in range(len(extra))]
    levels = getattr(network, "up_layers", None)
    if isinstance(levels, nn.ModuleList):
        candidates += [
            f"up_layers.{i}.head"
            for i, level in enumerate(levels)
            if isinstance(level, nn.ModuleDict) and "head" in level and isinstance(level["head"], _LAYER_TYPES)
        ]
    size = head_size(main)
    names = [head]
    for name in candidates:
        module = modules[name]
        # the head itself (SegResNetDS's last level) or a block around it is not a second head
        if module is not main and main not in list(module.modules()) and head_size(module) == size:
            names.append(name)
    return names


def head_size(module: nn.Module) -> int | None:
    """Output channels of a head: of the module itself, or of the last linear/conv layer inside it (None: none)."""
    layers = [m for m in module.modules() if isinstance(m, _LAYER_TYPES)]
    return _out_size(layers[-1]) if layers else None


def replace_head(
    template: nn.Module, head: str, out_channels: int | None, example_input: torch.Tensor | None = None
) -> list[str]:
    """Swap the head of ``template`` (in place) for freshly initialised layers with ``out_channels`` outputs.

    ``head`` names an ``nn.Linear``, a convolution (transposed ones included), a block holding them (e.g.
    ``"model.2"`` of MONAI's UNet with residual units, ``"output_block"`` of DynUNet) or ``"auto"``
    (:func:`find_head`). In a block, every linear, conv and norm layer is rebuilt fresh, with the same settings;
    every channel count equal to the head's old output count becomes ``out_channels``, except on the block's input
    side (the layers before, and the input of, its first linear/conv layer). Layers without channels (activations,
    dropout) are kept. Deep-supervision heads (see :func:`head_names`) are replaced the same way. Every parent that
    holds a replaced module (DynUNet holds each deep-supervision head in a list and in a skip layer) gets the new
    one.

    Args:
        template: the network to change.
        head: dotted module name, or ``"auto"``.
        out_channels: output channels of the new head; ``None``: as many as the old one.
        example_input: input for ``head="auto"`` (see :func:`find_head`).

    Returns:
        the names of the replaced modules, the head first.

    Raises:
        ValueError: when ``head`` is not a module, holds no linear/conv layer, holds a layer with parameters that
            cannot be rebuilt (the message names it), or a grouped layer or group norm cannot take the new size.
    """
    names = head_names(template, head, example_input)
    for name in names:
        old = template.get_submodule(name)
        new = _fresh_head(old, name, out_channels)
        ref = next(old.parameters(), None)
        if ref is not None:
            new = new.to(device=ref.device, dtype=ref.dtype)
        for alias in module_names(template, old):
            parent, _, local = alias.rpartition(".")
            setattr(template.get_submodule(parent), local, new)
    return names


# ---------------------------------------------------------------------------------------------- tracing
def _trace(network: nn.Module, example_input: torch.Tensor | None) -> tuple[list[_Call], tuple[int, ...]]:
    """Run ``network`` once in eval mode; the linear/conv layers called (in order) and the output's shape."""
    inputs = [example_input] if example_input is not None else _example_inputs(network)
    modes = {m: m.training for m in network.modules()}
    error: Exception | None = None
    try:
        network.eval()
        for x in inputs:
            calls: list[_Call] = []
            hooks = [
                module.register_forward_hook(
                    lambda m, _, out, name=name, calls=calls: calls.append(_Call(name, m, _shape(out)))
                )
                for name, module in network.named_modules()
                if isinstance(module, _LAYER_TYPES)
            ]
            try:
                with torch.no_grad():
                    out = network(x)
            except Exception as e:  # a random input of the wrong size: try the next one
                if example_input is not None:
                    raise ValueError(
                        f"find_head could not run {type(network).__name__} on example_input of shape "
                        f"{tuple(example_input.shape)} ({type(e).__name__}: {e})."
                    ) from e
                error = e
                continue
            finally:
                for h in hooks:
                    h.remove()
            shape = _shape(out)
            if not shape:
                raise ValueError(f"find_head: {type(network).__name__} returned no tensor; name the head module.")
            return calls, shape
    finally:
        for m, training in modes.items():
            m.training = training
    raise ValueError(
        f"find_head could not run {type(network).__name__} on random inputs of shapes "
        f"{[tuple(x.shape) for x in inputs]} ({type(error).__name__}: {error}); pass example_input."
    ) from error


def _with_norms(network: nn.Module, head: str, classes: int) -> str:
    """``head``, or the block around it when that block adds only norms on the classes after it (MONAI's
    ``Convolution`` with a norm, as in HighResNet's last block): those norms would keep the old class count."""
    while head:
        parent = head.rpartition(".")[0]
        if not parent:
            return head
        block = network.get_submodule(parent)
        if _layer_ids(block) != _layer_ids(network.get_submodule(head)):
            return head
        after, norms = False, False
        for m in block.modules():
            if isinstance(m, _LAYER_TYPES):
                after = True
            elif after and isinstance(m, _NORM_TYPES) and _norm_size(m) == classes:
                norms = True
        if not norms:
            return head
        head = parent
    return head


def _layer_ids(module: nn.Module) -> set[int]:
    return {id(m) for m in module.modules() if isinstance(m, _LAYER_TYPES)}


def _norm_size(norm: nn.Module) -> int:
    if isinstance(norm, nn.GroupNorm):
        return norm.num_channels
    if isinstance(norm, nn.LayerNorm):
        return norm.normalized_shape[0] if len(norm.normalized_shape) == 1 else -1
    return norm.num_features


def _example_inputs(network: nn.Module) -> list[torch.Tensor]:
    """Random batches of one sample shaped from the first conv (or linear) layer, for the sides in ``_SIDES``."""
    for m in network.modules():
        if isinstance(m, _ConvNd) and not m.transposed:
            dims = m.weight.dim() - 2
            g = torch.Generator().manual_seed(0)
            sides = _SIDES.get(dims, (32,))
            return [
                torch.randn(1, m.in_channels, *([s] * dims), generator=g).to(m.weight.device, m.weight.dtype)
                for s in sides
            ]
        if isinstance(m, nn.Linear):
            return [torch.randn(1, m.in_features, generator=torch.Generator().manual_seed(0)).to(m.weight)]
    raise ValueError(f"find_head: {type(network).__name__} has no conv or linear layer to shape an input from.")


def _shape(out: object) -> tuple[int, ...]:
    """Shape of the first tensor in ``out`` (a tensor, or a tuple, list or dict of them); () when there is none."""
    if isinstance(out, torch.Tensor):
        return tuple(out.shape)
    items = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else ()
    for item in items:
        shape = _shape(item)
        if shape:
            return shape
    return ()


def _common_parent(names: Sequence[str]) -> str:
    """The deepest module name that contains every one of ``names`` ("" for the root)."""
    parts = [n.split(".") for n in names]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    # a name is not its own parent: one layer's parent is the block around it
    if len(set(names)) == 1:
        common = common[:-1]
    return ".".join(common)


def _describe(calls: Sequence[_Call], limit: int = 5) -> str:
    if not calls:
        return "none"
    return ", ".join(f"{c.name} ({type(c.module).__name__}) -> {c.shape}" for c in calls[-limit:])


def _candidates(network: nn.Module, limit: int = 5) -> list[str]:
    names = [n for n, m in network.named_modules() if isinstance(m, _LAYER_TYPES) and n]
    return names[-limit:]


# ---------------------------------------------------------------------------------------------- rebuilding
def _fresh_head(old: nn.Module, name: str, out_channels: int | None) -> nn.Module:
    """A freshly initialised copy of the head module ``old`` whose class-space channels become ``out_channels``."""
    if isinstance(old, _LAYER_TYPES):
        return _fresh_layer(old, name, _in_size(old), out_channels or _out_size(old))
    layers = [(n, m) for n, m in old.named_modules() if isinstance(m, _LAYER_TYPES)]
    if not layers:
        raise ValueError(
            f"head {name!r} is a {type(old).__name__} without nn.Linear or convolution layers; name the output "
            "layer (or the block that holds it)."
        )
    for local, m in old.named_modules():
        rebuilt = _LAYER_TYPES + _NORM_TYPES + (nn.PReLU,)
        if next(m.parameters(recurse=False), None) is not None and not isinstance(m, rebuilt):
            raise ValueError(
                f"head {name!r} holds {name}.{local} ({type(m).__name__}), whose parameters cannot be rebuilt "
                "for a new class count; name the output layer itself."
            )
    old_size = _out_size(layers[-1][1])
    new_size = out_channels or old_size
    new = copy.deepcopy(old)
    inside = False  # past the input side of the block: at or after its first linear/conv layer's output
    for local, m in list(new.named_modules()):
        if not local:
            continue
        label = f"{name}.{local}"

        def resize(size: int, enabled: bool = True) -> int:
            return new_size if enabled and size == old_size else size

        if isinstance(m, _LAYER_TYPES):
            fresh = _fresh_layer(m, label, resize(_in_size(m), inside), resize(_out_size(m)))
            inside = True
        elif isinstance(m, _NORM_TYPES + (nn.PReLU,)):
            fresh = _fresh_norm(m, label, inside, old_size, new_size)
        else:
            continue
        for alias in module_names(new, m):
            parent, _, attr = alias.rpartition(".")
            setattr(new.get_submodule(parent), attr, fresh)
    return new


def _fresh_layer(old: nn.Module, name: str, in_size: int, out_size: int) -> nn.Module:
    if isinstance(old, nn.Linear):
        return nn.Linear(in_size, out_size, bias=old.bias is not None)
    groups = old.groups
    if groups > 1 and (in_size % groups or out_size % groups):
        raise ValueError(
            f"head layer {name!r} ({type(old).__name__}) is grouped (groups={groups}) and cannot take "
            f"{in_size} -> {out_size} channels; choose out_channels divisible by {groups}."
        )
    kwargs = dict(stride=old.stride, padding=old.padding, dilation=old.dilation, groups=groups)
    kwargs.update(bias=old.bias is not None, padding_mode=old.padding_mode)
    if old.transposed:
        kwargs["output_padding"] = old.output_padding
    return type(old)(in_size, out_size, old.kernel_size, **kwargs)


def _fresh_norm(old: nn.Module, name: str, inside: bool, old_size: int, new_size: int) -> nn.Module:
    def resize(size: int) -> int:
        return new_size if inside and size == old_size else size

    if isinstance(old, nn.PReLU):
        # one shared slope stays one; a slope per channel follows the channels
        size = old.num_parameters if old.num_parameters == 1 else resize(old.num_parameters)
        return nn.PReLU(size)
    if isinstance(old, nn.GroupNorm):
        channels = resize(old.num_channels)
        if channels % old.num_groups:
            raise ValueError(
                f"head layer {name!r} (GroupNorm with {old.num_groups} groups) cannot take {channels} channels; "
                f"choose out_channels divisible by {old.num_groups}."
            )
        return nn.GroupNorm(old.num_groups, channels, eps=old.eps, affine=old.affine)
    if isinstance(old, nn.LayerNorm):
        shape = tuple(old.normalized_shape)
        shape = (resize(shape[0]),) if len(shape) == 1 else shape
        return nn.LayerNorm(shape, eps=old.eps, elementwise_affine=old.elementwise_affine, bias=old.bias is not None)
    kwargs = dict(eps=old.eps, momentum=old.momentum, affine=old.affine, track_running_stats=old.track_running_stats)
    return type(old)(resize(old.num_features), **kwargs)


def _in_size(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


def _out_size(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels

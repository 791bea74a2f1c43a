"""Recompute the running statistics of norm layers on data, after merging changed the weights under them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from tqdm import tqdm

__all__ = ["batch_input", "norm_layers", "recalibrate_norm"]


def norm_layers(model: nn.Module) -> list[nn.Module]:
    """The BatchNorm/InstanceNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats]


@torch.no_grad()
def recalibrate_norm(
    model: nn.Module,
    loader: Iterable,
    input_key: str = "image",
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    progress: bool = False,
) -> nn.Module:
    """Reset and recompute the running statistics of every norm layer of ``model`` from ``loader``.

    Merged weights change every layer's activation statistics, so the sources' running statistics no longer fit.
    This runs ``model`` over the data without gradients with only the norm layers in training mode and momentum
    ``None`` (a cumulative average over all batches, independent of batch order), then restores each layer's
    momentum and the model's training flags. Dropout and other layers stay in eval mode throughout.

    Args:
        model: any network, including a :class:`~monai_medmerge.networks.KernelMerge`.
        loader: an iterable of input tensors, of tuples/lists whose first item is the input, or of dicts holding
            the input under ``input_key`` (a MONAI ``DataLoader`` over dictionary transforms).
        input_key: the input's key for dict batches.
        device: device to move inputs to; defaults to the model's device.
        max_batches: stop after this many batches (default: the whole loader).
        progress: show a progress bar.

    Returns:
        ``model`` itself, with updated statistics.

    Raises:
        ValueError: when the loader yields no batch, or a dict batch lacks ``input_key``.
    """
    layers = norm_layers(model)
    if not layers:
        return model
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    was_training = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in layers}
    try:
        model.eval()
        for m in layers:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        batches = 0
        iterator = tqdm(loader, desc="recalibrate norm", leave=False) if progress else loader
        for batch in iterator:
            if max_batches is not None and batches >= max_batches:
                break
            model(batch_input(batch, input_key).to(device))
            batches += 1
        if batches == 0:
            raise ValueError("recalibrate_norm: the loader yielded no batch; norm statistics cannot be recomputed.")
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, flag in was_training.items():
            m.training = flag
    return model


def batch_input(batch, key: str = "image") -> torch.Tensor:
    """The network input of a batch: the batch itself (a tensor), ``batch[key]`` (a MONAI dictionary batch) or
    ``batch[0]`` (an ``(input, label)`` tuple or list). Every loop of the package takes its input this way.

    Raises:
        ValueError: for a dictionary batch without ``key``, or a batch of another type.
    """
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        if key not in batch:
            raise ValueError(f"batch has no key {key!r}; its keys are {sorted(batch)}.")
        return batch[key]
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    raise ValueError(f"cannot find the input in a batch of type {type(batch).__name__}.")

"""Weight matching (Git Re-Basin): permute each source's hidden channels onto an anchor's, keeping its function.

https://arxiv.org/abs/2209.04836. Sources trained from different initialisations keep equivalent features in
different channel orders; merging them channel by channel then mixes unrelated features. Weight matching finds,
for every permutation group of the network (see :mod:`monai_medmerge.merging.permutation`), the channel order of
the source that best matches the anchor's weights, by coordinate descent: each group in turn is solved exactly as a
linear assignment (``scipy.optimize.linear_sum_assignment``) with the other groups held fixed, until a full pass
improves none. Norm affine parameters and running statistics move with their channels, so an aligned source
computes the same function as before.

The functions below take and return plain state dicts; :func:`align_sources` wraps them for modules.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from monai.utils import look_up_option, optional_import
from torch import nn

from monai_medmerge.merging.norm import batch_input
from monai_medmerge.merging.permutation import (
    AxisSlice,
    PermutationSpec,
    example_input_for,
    permutation_spec,
    trace_activations,
)

linear_sum_assignment, has_scipy = optional_import("scipy.optimize", name="linear_sum_assignment")

__all__ = [
    "AlignmentReport",
    "MATCHING",
    "activation_matching",
    "align_sources",
    "apply_permutation",
    "weight_matching",
]

MATCHING = ("weights", "activations")

Permutations = dict[str, torch.Tensor]


def _slice_view(t: torch.Tensor, s: AxisSlice) -> torch.Tensor:
    """The slice of ``t`` that ``s`` covers, as ``(length, rest)``: one row per logical channel."""
    moved = t.movedim(s.axis, 0)[s.offset : s.offset + s.length * s.inner]
    return moved.reshape(s.length, -1)


def _axis_index(size: int, entries, perms: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One gather index for an axis of ``size`` entries that reorders every ``(group, slice)`` on it."""
    idx = torch.arange(size)
    for group, s in entries:
        if group in perms:
            end = s.offset + s.length * s.inner
            idx[s.offset : end] = (
                idx[s.offset : end].reshape(s.length, s.inner)[torch.as_tensor(perms[group])].reshape(-1)
            )
    return idx


def _permute(t: torch.Tensor, entries, perms: Mapping[str, torch.Tensor], skip_axis: int | None = None) -> torch.Tensor:
    """``t`` with the groups of ``entries`` reordered by ``perms`` (new channel i = old channel perm[i])."""
    for axis in sorted({s.axis for _, s in entries}):
        if axis != skip_axis:
            on_axis = [(g, s) for g, s in entries if s.axis == axis]
            t = t.index_select(axis, _axis_index(t.shape[axis], on_axis, perms).to(t.device))
    return t


def apply_permutation(
    spec: PermutationSpec,
    perms: Mapping[str, torch.Tensor],
    state_dict: Mapping[str, torch.Tensor],
    strict: bool = True,
) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` with every group's channels reordered by ``perms`` (groups not given stay put).

    ``strict=False`` lets ``state_dict`` lack some of the spec's tensors (they are skipped).

    Raises:
        ValueError: when a permutation has the wrong length or names an unknown group, or a tensor of the spec is
            missing from ``state_dict``.
    """
    unknown = sorted(set(perms) - set(spec.sizes))
    if unknown:
        raise ValueError(f"permutations given for unknown group(s) {unknown[:5]}.")
    for group, perm in perms.items():
        if torch.as_tensor(perm).numel() != spec.sizes[group]:
            raise ValueError(f"permutation of group {group!r} has {len(perm)} entries, expected {spec.sizes[group]}.")
    out = dict(state_dict)
    for key, entries in spec.by_key().items():
        if key not in out:
            if not strict:
                continue
            raise ValueError(f"state dict has no tensor {key!r}, which the permutation spec acts on.")
        out[key] = _permute(out[key], entries, perms)
    return out


def weight_matching(
    spec: PermutationSpec,
    anchor: Mapping[str, torch.Tensor],
    source: Mapping[str, torch.Tensor],
    max_iter: int = 100,
    seed: int = 0,
    include_buffers: bool = False,
) -> tuple[Permutations, dict]:
    """Permutations of ``source``'s groups that maximise the summed inner products with ``anchor``'s weights.

    Args:
        spec: the permutation groups, from :func:`~monai_medmerge.merging.permutation.permutation_spec`.
        anchor: state dict to align onto.
        source: state dict to permute.
        max_iter: passes over all groups at most.
        seed: order in which groups are visited in each pass.
        include_buffers: let running statistics vote in the matching too (they are permuted either way).

    Returns:
        ``(perms, info)``: one index tensor per group, and ``{"passes", "objective_start", "objective_end"}``.
        A tensor whose shape differs between ``anchor`` and ``source`` (e.g. heads sized for different source
        tasks) is permuted but does not vote.
    """
    if not has_scipy:
        raise ImportError("weight matching needs scipy: pip install 'monai_medmerge[bench]' (or scipy).")
    by_key = spec.by_key()
    params = {k for k in by_key if include_buffers or not _is_buffer_key(k)}
    voters = {
        g: [s for s in slices if s.key in params and anchor[s.key].shape == source[s.key].shape]
        for g, slices in spec.slices.items()
    }
    perms: Permutations = {g: torch.arange(n) for g, n in spec.sizes.items()}
    wa = {k: anchor[k].detach().float().cpu() for k in params}
    wb = {k: source[k].detach().float().cpu() for k in params}
    rng = np.random.default_rng(seed)
    groups = list(spec.sizes)

    def cost(group: str) -> torch.Tensor:
        n = spec.sizes[group]
        c = torch.zeros(n, n)
        for s in voters[group]:
            b = _permute(wb[s.key], by_key[s.key], perms, skip_axis=s.axis)
            c += _slice_view(wa[s.key], s) @ _slice_view(b, s).T
        return c

    def objective() -> float:
        permuted = apply_permutation(spec, perms, wb, strict=False)
        return float(sum((wa[k] * permuted[k]).sum() for k in params if wa[k].shape == permuted[k].shape))

    start = objective()
    passes = 0
    while passes < max_iter:
        passes += 1
        improved = False
        for i in rng.permutation(len(groups)):
            g = groups[i]
            c = cost(g).double().numpy()
            rows = np.arange(c.shape[0])
            old = float(c[rows, perms[g].numpy()].sum())
            _, cols = linear_sum_assignment(c, maximize=True)
            new = float(c[rows, cols].sum())
            # products are float32 (fast on CPU): ignore "gains" within its rounding, or passes never end
            if new > old + 1e-6 * max(1.0, abs(old)):
                perms[g] = torch.as_tensor(cols, dtype=torch.long)
                improved = True
        if not improved:
            break
    return perms, {"passes": passes, "objective_start": start, "objective_end": objective()}


def activation_matching(
    spec: PermutationSpec, anchor: nn.Module, source: nn.Module, batches: Iterable
) -> tuple[Permutations, dict]:
    """Permutations of ``source``'s groups that best correlate its feature maps with ``anchor``'s on data.

    For each group, the correlation between every anchor channel and every source channel is summed over all
    feature maps the group appears in (convolution, norm and activation outputs, residual sums, slices of
    concatenations) and over ``batches``; one linear assignment per group then gives the permutation. Needs data,
    but no coordinate descent, and it tends to work better than weight matching for narrow networks.

    Args:
        spec: the permutation groups (of the anchor's architecture).
        anchor: network to align onto.
        source: network to permute.
        batches: input tensors, or ``(input, label)`` / ``{"image": input}`` batches.

    Returns:
        ``(perms, info)`` with ``info["mean_correlation_start"]`` and ``["mean_correlation_end"]`` over the groups.
    """
    if not has_scipy:
        raise ImportError("activation matching needs scipy: pip install 'monai_medmerge[bench]' (or scipy).")
    corr = {g: torch.zeros(n, n, dtype=torch.float64) for g, n in spec.sizes.items()}
    count = dict.fromkeys(spec.sizes, 0)
    seen = 0
    for batch in batches:
        x = batch_input(batch)
        ra, rb = trace_activations(anchor, x), trace_activations(source, x)
        if [seg for _, seg in ra] != [seg for _, seg in rb]:
            raise ValueError("anchor and source trace to different graphs; they must share one architecture.")
        for (ma, segments), (mb, _) in zip(ra, rb, strict=True):
            for group, offset, length in segments:
                if group not in corr:
                    continue
                a, b = _standardize(ma[:, offset : offset + length]), _standardize(mb[:, offset : offset + length])
                corr[group] += (a.T @ b).double() / a.shape[0]
                count[group] += 1
        seen += 1
    if not seen:
        raise ValueError("activation matching needs at least one batch of inputs.")
    perms: Permutations = {}
    start, end = [], []
    for g, c in corr.items():
        c = (c / max(count[g], 1)).numpy()
        rows = np.arange(c.shape[0])
        _, cols = linear_sum_assignment(c, maximize=True)
        perms[g] = torch.as_tensor(cols, dtype=torch.long)
        start.append(float(c[rows, rows].mean()))
        end.append(float(c[rows, cols].mean()))
    return perms, {"mean_correlation_start": float(np.mean(start)), "mean_correlation_end": float(np.mean(end))}


def _standardize(m: torch.Tensor) -> torch.Tensor:
    return (m - m.mean(0)) / (m.std(0) + 1e-6)


def _is_buffer_key(key: str) -> bool:
    return key.endswith(("running_mean", "running_var"))


class AlignmentReport(dict):
    """Per source: the passes, the matching objective before and after, the output difference and the seconds."""


def align_sources(
    sources: Sequence[nn.Module],
    anchor: int = 0,
    example_input: torch.Tensor | None = None,
    max_iter: int = 100,
    seed: int = 0,
    check: bool = True,
    atol: float = 1e-4,
    report: AlignmentReport | None = None,
    matching: str = "weights",
    data: Iterable | None = None,
) -> list[nn.Module]:
    """Align every source onto ``sources[anchor]`` by weight matching; the anchor itself is returned unchanged.

    Args:
        sources: networks of one class (heads may differ in their number of classes).
        anchor: index of the source whose channel order the others take.
        example_input: input used to trace the network's permutation groups (and to check the result); by default
            a random batch shaped from the first conv layer.
        max_iter: passes of coordinate descent at most.
        seed: order of the groups within a pass.
        check: run ``example_input`` through each source before and after alignment (eval mode) and raise if the
            outputs differ by more than ``atol`` relative to their scale.
        atol: tolerance of that check.
        report: a dict to fill with what was done per source index.
        matching: ``"weights"`` (weight matching, needs no data) or ``"activations"`` (correlation of feature maps
            on ``data``, often better for narrow networks).
        data: batches of inputs for ``matching="activations"`` (tensors, ``(x, y)`` tuples or dicts with
            ``"image"``); by default ``example_input``.

    Returns:
        new modules (deep copies); the inputs are not modified.

    Raises:
        ValueError: for fewer than two sources, a bad anchor index or an unknown ``matching``.
        UnsupportedOperationError: when the network uses an operation the tracer cannot reason about.
        RuntimeError: when ``check`` finds that an aligned source computes something else (a bug, please report).
    """
    n = len(sources)
    if n < 2:
        raise ValueError(f"align_sources needs at least 2 sources, got {n}.")
    if not (isinstance(anchor, int) and -n <= anchor < n):
        raise ValueError(f"anchor must be a source index in [0, {n - 1}], got {anchor!r}.")
    anchor %= n
    matching = look_up_option(matching, MATCHING)
    ref = sources[anchor]
    x = example_input_for(ref) if example_input is None else example_input
    spec = permutation_spec(ref, x)
    anchor_sd = ref.state_dict()
    aligned = []
    for i, src in enumerate(sources):
        if i == anchor:
            aligned.append(copy.deepcopy(src))
            continue
        start = time.perf_counter()
        if matching == "weights":
            perms, info = weight_matching(spec, anchor_sd, src.state_dict(), max_iter=max_iter, seed=seed)
        else:
            perms, info = activation_matching(spec, ref, src, [x] if data is None else data)
        info["matching"] = matching
        new = copy.deepcopy(src)
        new.load_state_dict(apply_permutation(spec, perms, src.state_dict()))
        info["seconds"] = time.perf_counter() - start
        if check:
            info["max_output_difference"] = _check_function(src, new, x, atol, i)
        if report is not None:
            report[i] = info
        aligned.append(new)
    return aligned


@torch.no_grad()
def _check_function(before: nn.Module, after: nn.Module, x: torch.Tensor, atol: float, index: int) -> float:
    modes = before.training, after.training
    before.eval()
    after.eval()
    try:
        device = next(before.parameters()).device
        ya, yb = before(x.to(device)), after(x.to(device))
    finally:
        before.train(modes[0])
        after.train(modes[1])
    diff = float((ya - yb).abs().max())
    scale = float(ya.abs().max()) + 1e-12
    if diff > atol * max(1.0, scale):
        raise RuntimeError(
            f"alignment changed the function of source {index}: outputs differ by {diff:.3g} (scale {scale:.3g})."
        )
    return diff

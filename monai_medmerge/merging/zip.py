"""Zip N networks of one architecture into one plain network of a chosen width (ZipIt!-style feature merging).

ZipIt! (Stoica et al., https://arxiv.org/abs/2305.03053) merges networks trained from different initialisations by
merging *features* instead of permuting them: in every channel group the features of all sources are pooled, the
most correlated ones (across sources and, optionally, within one source) are merged, and every layer is rewritten to
produce the merged features and to read them back. Here the number of features kept per group is the width of a
*target* network the caller builds (a plain instance of the sources' class, e.g. a MONAI ResNet with wider
``block_inplanes``). Keeping all N x w features of every group gives the sources side by side: the zipped network
then computes exactly the mean of the sources' logits (their ensemble) at N times one network's cost; keeping w of
them gives a network as small as one source; any width in between trades cost for how much of the ensemble it keeps.

Per group ``g`` with width ``w`` in each source and ``W`` in the target:

- ``M`` (``W x N*w``): row ``j`` averages the features that were merged into feature ``j``;
- ``U`` (``N*w x W``): ``U[i, j] = 1`` when feature ``i`` went into ``j`` (each source reads its features back).

A tensor axis that *writes* the group (a conv's output axis, its bias, norm parameters and statistics) becomes
``M`` applied to the concatenation of the sources' slices; an axis that *reads* it (a conv's input axis) becomes the
block-diagonal of the sources' slices times ``U``. The network's input channels are shared (each source's first
layer reads the same input); its output channels are averaged (the logits are the sources' mean).

The channel groups are those of :func:`~monai_medmerge.merging.permutation.permutation_spec`, traced from the
network; sources and target must trace to the same groups (only their widths differ).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from monai_medmerge.merging.norm import batch_input, recalibrate_norm
from monai_medmerge.merging.permutation import (
    PermutationSpec,
    UnsupportedOperationError,
    _collect,
    _group_names,
    _trace,
    trace_activations,
)
from monai_medmerge.sources import check_compatible

__all__ = ["feature_correlations", "inference_macs", "zip_matrices", "zip_networks"]

_INPUT, _OUTPUT = "<input>", "<output>"


@dataclass(frozen=True)
class _Segment:
    """``size`` channels of ``inner`` entries each from ``offset`` on one tensor axis, of group ``label``
    (a permutation group's name, or the network's input or output channels)."""

    offset: int
    label: str
    size: int
    inner: int


@dataclass
class _Layout:
    """A network's permutation spec, and for every state-dict tensor the channel segments along each traced axis."""

    spec: PermutationSpec
    axes: dict[str, dict[int, list[_Segment]]]


def _trace_layout(model: nn.Module, x: torch.Tensor) -> _Layout:
    """Trace ``model`` once, as :func:`permutation_spec` does, keeping also where the fixed channels lie.

    Raises:
        UnsupportedOperationError: for an operation the tracer refuses, or hidden channels it keeps fixed (grouped
            convolutions, group norms with 1 < groups < channels, misaligned concatenations): those cannot be
            widened.
    """
    tracer, source, traced_outputs = _trace(model, x)
    groups = tracer.groups
    outputs = set()
    for o in traced_outputs:
        feat = tracer.feat(o)
        tracer.fix_feat(feat)
        outputs |= {groups.find(g) for g in (feat.segments if feat is not None else ())}
    names = _group_names(tracer)
    inputs = groups.find(source)
    axes: dict[str, dict[int, list[_Segment]]] = {}
    for key, uses in tracer.uses.items():
        for axis, offset, g, inner in uses:
            root = groups.find(g)
            if root in names:
                label = names[root]
            elif root == inputs and root not in outputs:
                label = _INPUT
            elif root in outputs and root != inputs:
                label = _OUTPUT
            else:
                raise UnsupportedOperationError(
                    f"axis {axis} of {key!r} carries hidden channels that must stay in place (grouped convolution, "
                    "group norm with 1 < groups < channels, or concatenations that do not line up); a network "
                    "with such channels cannot be zipped."
                )
            axes.setdefault(key, {}).setdefault(axis, []).append(_Segment(offset, label, groups.size[root], inner))
    return _Layout(_collect(tracer), axes)


def _roles(model: nn.Module) -> dict[str, tuple[int, int | None]]:
    """State-dict key -> ``(output axis, input axis)`` of the weights and biases of conv, transposed conv and linear
    layers (a bias has no input axis). Every other tensor (norm parameters and statistics, PReLU slopes) only writes
    its channels."""
    roles: dict[str, tuple[int, int | None]] = {}
    for name, m in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
            transposed = getattr(m, "transposed", False)
            roles[prefix + "weight"] = (1, 0) if transposed else (0, 1)
            if m.bias is not None:
                roles[prefix + "bias"] = (0, None)
    return roles


def _check_fixed(layout: _Layout, roles: dict[str, tuple[int, int | None]]) -> None:
    """Fixed channels may only be the network's input, read by layers, and its output, written by its last layers:
    the ensemble has one copy of the input and averages the outputs, anything else would need N copies.

    Raises:
        UnsupportedOperationError: naming the tensor that uses the input or output channels otherwise.
    """
    for key, axes in layout.axes.items():
        out_axis, in_axis = roles.get(key, (None, None))
        for axis, segments in axes.items():
            labels = {s.label for s in segments}
            if _INPUT in labels and axis != in_axis:
                raise UnsupportedOperationError(
                    f"{key!r} writes or normalises the network's input channels (axis {axis}); a zipped network "
                    "shares its input between the sources and cannot hold one such tensor per source."
                )
            if _OUTPUT in labels and axis != out_axis:
                raise UnsupportedOperationError(
                    f"{key!r} processes the network's output channels further (axis {axis}); zipping averages "
                    "the sources' outputs, which needs the output channels to come straight from the last "
                    "conv or linear layers (e.g. a MONAI UNet with num_res_units=0)."
                )


def _check_structure(
    sources: Sequence[nn.Module], target: nn.Module, src: _Layout, tgt: _Layout, n: int
) -> dict[str, tuple[int, int]]:
    """Group name -> (source width, target width), after checking that the target differs only in group widths.

    Raises:
        ValueError: naming the first difference between the sources and the target.
    """
    first = sources[0]  # the sources agree with each other: zip_networks checked them (check_compatible)
    if type(target) is not type(first):
        raise ValueError(
            f"the target is a {type(target).__name__}; it must be a {type(first).__name__} like the sources."
        )
    sa, ta = first.state_dict(), target.state_dict()
    if set(sa) != set(ta):
        only_s, only_t = sorted(set(sa) - set(ta)), sorted(set(ta) - set(sa))
        parts = [
            f"{where} {keys[:5]}"
            for where, keys in (("only in the sources", only_s), ("only in the target", only_t))
            if keys
        ]
        raise ValueError(f"the target's structure differs from the sources': tensors {', '.join(parts)}.")
    if src.spec.groups != tgt.spec.groups:
        only_s = [g for g in src.spec.groups if g not in tgt.spec.sizes]
        only_t = [g for g in tgt.spec.groups if g not in src.spec.sizes]
        raise ValueError(
            f"the target's channel groups differ from the sources': only in the sources {only_s[:5]}, only in the "
            f"target {only_t[:5]} (in order: {len(src.spec.groups)} and {len(tgt.spec.groups)} groups)."
        )
    widths = {g: (src.spec.sizes[g], tgt.spec.sizes[g]) for g in src.spec.groups}
    for g, (w, big) in widths.items():
        if not w <= big <= n * w:
            raise ValueError(
                f"group {g!r} is {big} channels wide in the target; with {n} sources of width {w} it must be "
                f"between {w} and {n * w}."
            )
    for key in sa:
        s_axes, t_axes = src.axes.get(key, {}), tgt.axes.get(key, {})
        if sa[key].dim() != ta[key].dim() or set(s_axes) != set(t_axes):
            raise ValueError(
                f"{key!r} is {tuple(sa[key].shape)} in the sources and {tuple(ta[key].shape)} in the target."
            )
        for axis in range(sa[key].dim()):
            if axis not in s_axes:
                if sa[key].shape[axis] != ta[key].shape[axis]:
                    raise ValueError(
                        f"axis {axis} of {key!r} is {sa[key].shape[axis]} in the sources and {ta[key].shape[axis]} "
                        "in the target; only the widths of channel groups may differ."
                    )
                continue
            ss, ts = s_axes[axis], t_axes[axis]
            if [(s.label, s.inner) for s in ss] != [(t.label, t.inner) for t in ts]:
                raise ValueError(
                    f"axis {axis} of {key!r} reads other channel groups in the target than in the sources."
                )
            for s, t in zip(ss, ts, strict=True):
                if s.label in (_INPUT, _OUTPUT) and s.size != t.size:
                    what = "input" if s.label == _INPUT else "output"
                    raise ValueError(
                        f"the network's {what} channels differ: {s.size} in the sources, {t.size} in the target "
                        f"(at {key!r})."
                    )
            for layout, t in ((ss, sa[key]), (ts, ta[key])):
                if sum(s.size * s.inner for s in layout) != t.shape[axis]:
                    raise UnsupportedOperationError(
                        f"axis {axis} of {key!r} is only partly covered by traced channels; it cannot be zipped."
                    )
    return widths


def _batches(data: Iterable | torch.Tensor, batch_size: int, max_batches: int | None) -> Iterable[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        data = data.split(batch_size)
    for i, batch in enumerate(data):
        if max_batches is not None and i >= max_batches:
            break
        yield batch_input(batch)


@torch.no_grad()
def feature_correlations(
    sources: Sequence[nn.Module],
    data: Iterable | torch.Tensor,
    batch_size: int = 64,
    max_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """For every channel group, the correlation between all ``N*w`` features of the N sources on ``data``.

    Feature ``s*w + c`` is channel ``c`` of source ``s``. The correlation is averaged over every feature map the
    group appears in (convolution, norm and activation outputs, residual sums, slices of concatenations) and over
    the batches; batch and spatial positions are the samples.

    Args:
        sources: networks of one architecture and width.
        data: input tensors, ``(input, label)`` or ``{"image": input}`` batches, or one tensor of inputs (split into
            ``batch_size`` batches).
        batch_size: batch size when ``data`` is one tensor.
        max_batches: stop after this many batches.

    Raises:
        ValueError: when ``data`` yields no batch, or the sources trace to different graphs.
    """
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    device = next(sources[0].parameters()).device
    for x in _batches(data, batch_size, max_batches):
        traces = [trace_activations(s, x.to(device)) for s in sources]
        if any([seg for _, seg in t] != [seg for _, seg in traces[0]] for t in traces[1:]):
            raise ValueError("the sources trace to different graphs; they must share one architecture.")
        for i, (_, segments) in enumerate(traces[0]):
            for group, offset, length in segments:
                f = torch.cat([t[i][0][:, offset : offset + length] for t in traces], 1).double()
                f = (f - f.mean(0)) / (f.std(0) + 1e-6)
                c = f.T @ f / max(f.shape[0] - 1, 1)
                sums[group] = sums[group] + c if group in sums else c
                counts[group] = counts.get(group, 0) + 1
    if not counts:
        raise ValueError("feature_correlations needs at least one batch of inputs.")
    return {g: (c / counts[g]).float().cpu() for g, c in sums.items()}


def zip_matrices(
    correlation: torch.Tensor, num_sources: int, size: int, within_model: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedily merge the most correlated features until ``size`` are left; return the merge and unmerge matrices.

    Starting from one cluster per feature, the two clusters with the highest correlation are merged, and the merged
    cluster's correlation with every other is the size-weighted mean of its parts' (average linkage), until
    ``size`` clusters remain. A cluster holds at most N features (for two sources every feature is merged at most
    once, as in ZipIt!) while a merge within that bound is left. Clusters are ordered by their first feature, so
    with ``size == N*w`` both matrices are the identity.

    Args:
        correlation: ``(N*w, N*w)``, features ordered source by source.
        num_sources: N.
        size: features to keep, between 1 and ``N*w``.
        within_model: also merge features of one source with each other (ZipIt!'s within-model merges); when
            False a cluster takes at most one feature per source while such a merge is left.

    Returns:
        ``(merge, unmerge)``: ``merge`` is ``(size, N*w)``, each row the mean of its cluster's features;
        ``unmerge`` is ``(N*w, size)`` with ``unmerge[i, j] = 1`` when feature ``i`` is in cluster ``j``.

    Raises:
        ValueError: for a correlation that is not square with a multiple of ``num_sources`` rows, or a bad ``size``.
    """
    n = correlation.shape[0]
    if correlation.dim() != 2 or correlation.shape[1] != n or n % num_sources:
        raise ValueError(
            f"correlation must be square with N*w rows, got {tuple(correlation.shape)} for N={num_sources}."
        )
    if not 1 <= size <= n:
        raise ValueError(f"size must be between 1 and {n}, got {size}.")
    owner = torch.arange(n) // (n // num_sources)
    sim = correlation.double().clone()
    sim.fill_diagonal_(-torch.inf)
    clash = owner[:, None] == owner[None, :]  # clusters that share a source
    sizes = torch.ones(n, dtype=torch.long)
    members = [[i] for i in range(n)]

    def blocked(rows) -> torch.Tensor:  # merges outside the preferred rules, for the clusters in ``rows``
        out = (sizes[rows, None] + sizes[None, :]) > num_sources
        return out if within_model else out | clash[rows]

    preferred = sim.masked_fill(blocked(slice(None)), -torch.inf)  # kept up to date row by row
    for _ in range(n - size):
        best = int(preferred.argmax())
        if preferred.view(-1)[best] == -torch.inf:
            # no preferred merge is left: relax the source rule, then the size bound
            for score in (sim.masked_fill((sizes[:, None] + sizes[None, :]) > num_sources, -torch.inf), sim):
                best = int(score.argmax())
                if score.view(-1)[best] > -torch.inf:
                    break
        a, b = sorted(divmod(best, n))
        sim[a] = (sizes[a] * sim[a] + sizes[b] * sim[b]) / (sizes[a] + sizes[b])
        sim[a, a] = -torch.inf
        sim[:, a] = sim[a]
        sim[b], sim[:, b] = -torch.inf, -torch.inf
        clash[a] |= clash[b]
        clash[:, a] = clash[a]
        sizes[a] += sizes[b]
        members[a] += members[b]
        members[b] = []
        # only the clusters a and b changed, and every cluster's size bound against a
        preferred[a] = sim[a].masked_fill(blocked(a), -torch.inf)
        preferred[:, a] = preferred[a]
        preferred[b], preferred[:, b] = -torch.inf, -torch.inf
    clusters = [m for m in members if m]
    merge = torch.zeros(size, n)
    unmerge = torch.zeros(n, size)
    for j, m in enumerate(clusters):
        merge[j, m] = 1.0 / len(m)
        unmerge[m, j] = 1.0
    return merge, unmerge


def _axis_map(src: list[_Segment], tgt: list[_Segment], reads: bool, s: int, n: int, matrices, shape) -> torch.Tensor:
    """The ``(target entries, source entries)`` matrix that maps source ``s``'s slice of one axis to the target's."""
    out = torch.zeros(shape)
    for a, b in zip(src, tgt, strict=True):
        if a.label in (_INPUT, _OUTPUT):
            # shared input channels are read as they are; output channels (and anything written onto fixed
            # channels) are the sources' mean
            block = torch.eye(a.size) if reads else torch.eye(a.size) / n
        else:
            merge, unmerge = matrices[a.label]
            cols = slice(s * a.size, (s + 1) * a.size)
            block = unmerge[cols].T if reads else merge[:, cols]
        if a.inner > 1:
            block = torch.kron(block.contiguous(), torch.eye(a.inner))
        out[b.offset : b.offset + b.size * b.inner, a.offset : a.offset + a.size * a.inner] = block
    return out


def _zip_state_dicts(
    states: Sequence[dict[str, torch.Tensor]],
    target: dict[str, torch.Tensor],
    src: _Layout,
    tgt: _Layout,
    matrices: dict[str, tuple[torch.Tensor, torch.Tensor]],
    roles: dict[str, tuple[int, int]],
) -> dict[str, torch.Tensor]:
    """The zipped target state dict: every tensor is the sum over sources of the source's tensor with each traced
    axis mapped by :func:`_axis_map` (merge matrix where it writes a group, unmerge matrix where it reads one).

    Tensors with no traced axis are averaged (floating point) or copied from source 0 (counters).
    """
    n = len(states)
    out = {}
    for key, like in target.items():
        axes = src.axes.get(key, {})
        if not axes:
            if like.is_floating_point():
                out[key] = (sum(st[key].double() for st in states) / n).to(like.dtype)
            else:
                out[key] = states[0][key].clone()
            continue
        total = torch.zeros(like.shape, dtype=torch.float64)
        in_axis = roles.get(key, (None, None))[1]
        for s, st in enumerate(states):
            t = st[key].detach().double().cpu()
            for axis, segments in axes.items():
                a = _axis_map(
                    segments, tgt.axes[key][axis], axis == in_axis, s, n, matrices, (like.shape[axis], t.shape[axis])
                )
                t = (t.movedim(axis, -1) @ a.double().T).movedim(-1, axis)
            total += t
        out[key] = total.to(like.dtype)
    return out


def zip_networks(
    sources: Sequence[nn.Module],
    target: nn.Module,
    data: Iterable | torch.Tensor,
    example_input: torch.Tensor | None = None,
    within_model: bool = True,
    recalibrate: bool = True,
    batch_size: int = 64,
    max_batches: int | None = None,
    report: dict | None = None,
) -> nn.Module:
    """Zip ``sources`` into a network shaped like ``target``: per channel group, the most correlated features of
    all sources are merged until the target's width is reached (ZipIt!, https://arxiv.org/abs/2305.03053).

    With every group of ``target`` N times as wide as the sources' nothing is merged and the result computes the
    mean of the sources' logits exactly (the ensemble, in one network of N times the cost); with the sources' own
    width it is one network as small as a source; widths in between keep more of the ensemble for more compute.

    Example::

        from monai.networks.nets import ResNet

        def net(widths):
            return ResNet("basic", [1, 1, 1, 1], widths, spatial_dims=2, n_input_channels=1, num_classes=10)

        a, b = net([16, 32, 64, 128]), net([16, 32, 64, 128])  # fine-tuned on one task from different inits
        wide = zip_networks([a, b], net([24, 48, 96, 192]), data=images)  # 1.5x the width, norm stats recomputed

    Args:
        sources: N >= 2 networks of one class and width; their output (class) channels are averaged, so their
            heads must predict the same classes.
        target: a plain instance of the sources' class at the chosen width (its weights are not used and it is not
            modified); every channel group must be between the sources' width and N times it.
        data: inputs for the feature correlations and the norm recalibration: a re-iterable of tensors,
            ``(input, label)`` or ``{"image": input}`` batches (a MONAI ``DataLoader``), or one tensor of inputs.
        example_input: input for tracing the networks' channel groups; by default the first batch of ``data``.
        within_model: let features of one source merge with each other (else, a merged feature takes at most one
            feature per source while that is possible).
        recalibrate: recompute the norm layers' running statistics on ``data`` (:func:`recalibrate_norm`) when any
            feature was merged: the zipped variances are only approximate. With nothing merged the statistics are
            exact and are kept.
        batch_size: batch size when ``data`` is one tensor.
        max_batches: use at most this many batches of ``data`` for the correlations and the recalibration.
        report: a dict to fill with the widths and merges per group.

    Returns:
        a new module (a deep copy of ``target``) holding the zipped weights, in eval mode.

    Raises:
        ValueError: for sources that cannot be merged (:func:`~monai_medmerge.sources.check_compatible`: fewer than
            two, of different classes, widths or dtypes, non-finite weights), a target of another class
            or structure, or a group of the target narrower than the sources' or wider than N times it (naming it).
        UnsupportedOperationError: for operations the channel tracer cannot follow, or hidden channels it keeps
            fixed (grouped convolutions other than depthwise, group norms with 1 < groups < channels).

    Norm layers that normalise across channels (LayerNorm over the channel axis, GroupNorm with one group) see the
    sources' features together, so they do not reproduce the ensemble exactly even at N times the width.
    """
    check_compatible(sources)  # one class, the same tensors and shapes (the heads too), one dtype, finite weights
    n = len(sources)
    if example_input is None:
        example_input = next(iter(_batches(data, batch_size, max_batches)), None)
        if example_input is None:
            raise ValueError("zip_networks: data yielded no batch.")
    device = next(sources[0].parameters()).device
    src = _trace_layout(sources[0], example_input.to(device))
    tgt = _trace_layout(target, example_input.to(next(target.parameters()).device))
    widths = _check_structure(sources, target, src, tgt, n)
    roles = _roles(target)
    _check_fixed(src, roles)
    correlations = feature_correlations(sources, data, batch_size, max_batches)
    matrices, merged = {}, False
    for g, (w, big) in widths.items():
        matrices[g] = zip_matrices(correlations[g], n, big, within_model)
        merged |= big < n * w
        if report is not None:
            sizes = matrices[g][1].sum(0)
            report.setdefault("groups", {})[g] = {"width": w, "target_width": big, "merges": n * w - big,
                                                  "largest_merge": int(sizes.max())}  # fmt: skip
    zipped = copy.deepcopy(target)
    state = _zip_state_dicts([s.state_dict() for s in sources], zipped.state_dict(), src, tgt, matrices, roles)
    zipped.load_state_dict(state)
    if merged and recalibrate:
        recalibrate_norm(zipped, _batches(data, batch_size, max_batches))
    if report is not None:
        report["recalibrated"] = bool(merged and recalibrate)
    return zipped.eval()


@torch.no_grad()
def inference_macs(model: nn.Module, example_input: torch.Tensor) -> int:
    """Multiply-accumulates of one eval-mode forward pass of ``model`` on ``example_input`` (the whole batch:
    pass one sample for the cost per image), counted by ``torch.utils.flop_counter.FlopCounterMode`` (convolutions
    and matrix products; norms and activations are not counted). The input is moved to the model's device."""
    from torch.utils.flop_counter import FlopCounterMode

    first = next(model.parameters(), None)
    if first is not None:
        example_input = example_input.to(first.device)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(example_input)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // 2

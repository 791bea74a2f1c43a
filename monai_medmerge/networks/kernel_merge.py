"""KernelMerge: learn per-kernel convex combinations of N source networks and run them as one network."""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from monai.utils import look_up_option
from torch import nn

from monai_medmerge.networks.heads import AUTO, find_head, head_names, head_size, replace_head
from monai_medmerge.networks.units import (
    MergeUnit,
    find_units,
    from_channel_major,
    module_names,
    tied_parameters,
    to_channel_major,
)
from monai_medmerge.sources import check_compatible

__all__ = ["KernelMerge", "GRANULARITIES", "DEFAULT_ANCHOR_WEIGHT", "replace_head"]

GRANULARITIES = ("kernel", "layer", "model")
DEFAULT_ANCHOR_WEIGHT = 0.9
# log(0) is -inf, whose softmax gradient is NaN; this is far enough below any real logit that exp() gives exactly 0.
_LOG_ZERO = -1.0e4


class KernelMerge(nn.Module):
    """Merge N pretrained networks of one class into one network with learned per-kernel coefficients.

    MedMerge (https://arxiv.org/abs/2403.11646). For every merge unit ``u`` (a conv, transposed conv, linear or
    norm layer) a coefficient matrix of shape ``(N, C_u)`` is learned; its softmax over the sources gives, for each
    output channel ``c``, a convex combination ``theta_u[c] = sum_i alpha_u[i, c] * theta_{i,u}[c]``. The merged
    weights are computed in weight space at every forward and run through ONE copy of the architecture, so a
    step costs about one network, not N. The sources are frozen (stored as buffers); only the coefficients and the
    new head (if any) are trainable. :meth:`collapse` returns a plain network of the sources' class.

    Buffers (norm running statistics) are those of the anchor (or of the first source); recompute them on target
    data with :func:`monai_medmerge.merging.recalibrate_norm` once the coefficients have been learned.

    Args:
        sources: N >= 2 networks of one class with equal parameter names and shapes, except inside ``head``.
        head: dotted name of the task head to replace (e.g. ``"fc"`` for MONAI ResNet, ``"class_layers.out"`` for
            MONAI DenseNet121, ``"final_conv"`` for BasicUNet; docs/api.md lists the segmentation networks), or
            ``"auto"`` to find it on source 0 with :func:`~monai_medmerge.networks.find_head`. Its parameters are
            not merged: freshly initialised layers with ``out_channels`` outputs replace it
            (:func:`~monai_medmerge.networks.replace_head`; a block such as MONAI UNet's ``"model.2"`` is rebuilt
            whole), and so do DynUNet's deep-supervision heads, which predict the source classes too. ``None``
            merges the heads like every other unit (their shapes must then agree).
        out_channels: number of target classes of the new head (for segmentation, labels with background);
            defaults to the head's own size when ``head`` is given (the sources' heads must then agree in size).
        granularity: ``"kernel"`` (one coefficient per source and output channel of each unit), ``"layer"`` (one
            per source and unit) or ``"model"`` (one per source).
        anchor: index of the source whose coefficients start at ``anchor_weight`` (the others share the rest
            equally) and whose buffers and non-parameter state the merged network uses. ``None``: uniform start,
            buffers of source 0.
        anchor_weight: starting share of the anchor, in (0, 1); defaults to 0.9 when ``anchor`` is given.
        example_input: an input batch for ``head="auto"``; by default a random one shaped from source 0's first
            convolution.

    Raises:
        ValueError: when fewer than two sources are given, they differ in class, names or shapes, hold NaN or Inf
            values, tie weights (one Parameter held by two modules; the message names both; a module reached under
            two names, as in MONAI's DynUNet, is one unit and fine), ``head`` does not exist or cannot be rebuilt,
            ``out_channels`` is given without ``head``, ``granularity`` is unknown, or ``anchor``/``anchor_weight``
            are out of range, or ``head="auto"`` finds no head (the message names the network and the last layers
            it ran).

    Example::

        from monai.networks.nets import resnet18
        a = resnet18(spatial_dims=2, n_input_channels=1, num_classes=3)
        b = resnet18(spatial_dims=2, n_input_channels=1, num_classes=7)
        merge = KernelMerge([a, b], head="fc", out_channels=5, anchor=1)
        logits = merge(torch.randn(4, 1, 32, 32))        # train coefficients + head with any optimizer
        plain = merge.collapse()                          # a ResNet with merged weights and a 5-class head
    """

    def __init__(
        self,
        sources: Sequence[nn.Module],
        head: str | None = None,
        out_channels: int | None = None,
        granularity: str = "kernel",
        anchor: int | None = None,
        anchor_weight: float | None = None,
        example_input: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if isinstance(sources, nn.Module) or not isinstance(sources, Sequence):
            raise ValueError(f"sources must be a sequence of nn.Module, got {type(sources).__name__}.")
        self.granularity = look_up_option(granularity, GRANULARITIES)
        if out_channels is not None and head is None:
            raise ValueError(
                f"out_channels={out_channels} was given without head: name the classifier module to replace, "
                'e.g. head="fc" for MONAI ResNet or head="class_layers.out" for MONAI DenseNet121.'
            )
        if out_channels is not None and (not isinstance(out_channels, int) or out_channels < 1):
            raise ValueError(f"out_channels must be a positive int, got {out_channels!r}.")
        if head is not None and not isinstance(head, str):
            raise ValueError(f'head must be a module name or "{AUTO}", got {type(head).__name__}.')
        if head == AUTO and len(sources) and isinstance(sources[0], nn.Module):
            head = find_head(sources[0], example_input)
        if head is not None:
            # the head must exist in every source before the architecture check, so that the error names it
            for i, s in enumerate(sources):
                if isinstance(s, nn.Module) and head not in dict(s.named_modules()):
                    raise ValueError(
                        f"head {head!r} is not a module of source {i} ({type(s).__name__}); "
                        f'candidates: {_linear_like_names(s)}, or head="{AUTO}" to find it.'
                    )
        excluded = [head] if head is not None else []
        if head is not None and len(sources) and isinstance(sources[0], nn.Module):
            # the head and its deep-supervision heads, each under every name it is reached by (DynUNet holds a
            # deep-supervision head in a list and in a skip layer), are left out of the comparison
            s0 = sources[0]
            excluded = [alias for name in head_names(s0, head) for alias in module_names(s0, s0.get_submodule(name))]
        check_compatible(sources, exclude=excluded)
        for i, s in enumerate(sources):
            tied = tied_parameters(s)
            if tied:
                shown = "; ".join(" and ".join(names) for names in tied[:5])
                raise ValueError(
                    f"source {i} ({type(s).__name__}) ties weights: one Parameter is held by different modules "
                    f"({shown}); tied weights cannot be merged yet."
                )
        n = len(sources)
        if head is not None and out_channels is None:
            sizes = [head_size(s.get_submodule(head)) for s in sources]
            if len(set(sizes)) > 1:
                raise ValueError(
                    f"the sources' heads {head!r} have different sizes {sizes}; give out_channels for the target task."
                )
        if anchor is not None and not (isinstance(anchor, int) and -n <= anchor < n):
            raise ValueError(f"anchor must be a source index in [0, {n - 1}], got {anchor!r}.")
        if anchor_weight is not None and anchor is None:
            raise ValueError(f"anchor_weight={anchor_weight} was given without anchor.")
        if anchor is not None:
            anchor = anchor % n
            anchor_weight = DEFAULT_ANCHOR_WEIGHT if anchor_weight is None else float(anchor_weight)
            if not 0.0 < anchor_weight < 1.0:
                raise ValueError(f"anchor_weight must lie in (0, 1), got {anchor_weight}.")
        self.num_sources = n
        self.head = head
        self.anchor = anchor
        self.anchor_weight = anchor_weight
        ref = sources[0 if anchor is None else anchor]

        template = _copy_network(ref)
        self.heads: tuple[str, ...] = tuple(replace_head(template, head, out_channels)) if head is not None else ()
        fresh = {id(m) for name in self.heads for m in template.get_submodule(name).modules()}
        self.units: list[MergeUnit] = [
            u for u in find_units(template, exclude=head) if id(template.get_submodule(u.module)) not in fresh
        ]
        widths = [u.channels for u in self.units]
        if self.granularity == "kernel":
            self._offsets = [sum(widths[:k]) for k in range(len(widths))]
            total = sum(widths)
        elif self.granularity == "layer":
            self._offsets = list(range(len(widths)))
            total = len(widths)
        else:
            self._offsets = [0] * len(widths)
            total = 1

        # Each merged tensor, in channel-major form (C, K), is a block of rows; row c takes logit column col[c].
        # Tensors with equal K are stored stacked in one (N, sum C, K) buffer, so that a step merges a whole group
        # with N fused multiply-adds: a few dozen groups instead of hundreds of tensors (a bias or norm parameter
        # has K = 1, so all of them form one group).
        device = _ref_device(ref)
        source_params = [dict(s.named_parameters()) for s in sources]
        dtype = next(iter(source_params[0].values())).dtype
        groups: dict[int, list[tuple[str, MergeUnit, list[torch.Tensor], torch.Tensor]]] = {}
        for k, unit in enumerate(self.units):
            col = self._columns(k, unit, device)
            for full in unit.full_names():
                rows = [to_channel_major(p[full].detach().to(device, dtype), unit) for p in source_params]
                groups.setdefault(rows[0].shape[1], []).append((full, unit, rows, col))
        self._groups: list[tuple[list[str], list[MergeUnit], list[int]]] = []
        self._shapes: dict[str, torch.Size] = {}
        for g, members in enumerate(groups.values()):
            names = [m[0] for m in members]
            for full in names:
                self._shapes[full] = source_params[0][full].shape
            stack = torch.stack([torch.cat([m[2][i] for m in members]) for i in range(n)])  # (N, sum C, K)
            self.register_buffer(f"_stack{g}", stack.contiguous(), persistent=False)
            self.register_buffer(f"_columns{g}", torch.cat([m[3] for m in members]), persistent=False)
            self._groups.append((names, [m[1] for m in members], [m[2][0].shape[0] for m in members]))
        del groups, source_params

        # (owning module, attribute, placeholder) per merged tensor, in merged_parameters() order
        self._slots = []
        for full, shape in self._shapes.items():
            mod_name, _, local = full.rpartition(".")
            owner = template.get_submodule(mod_name)
            del owner._parameters[local]
            # a shape-only placeholder keeps repr() and attribute checks working; forward swaps the real tensor in
            placeholder = torch.empty(shape, device="meta", dtype=dtype)
            object.__setattr__(owner, local, placeholder)
            self._slots.append((owner, local, placeholder))
        self.network = template

        self.merge_logits = nn.Parameter(_initial_logits(n, total, anchor, anchor_weight, dtype))
        # identifies the sources and their order, so that a checkpoint is never resumed onto other sources
        self.register_buffer("source_checksums", _checksums(self), persistent=True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs):
        saved = state_dict.get(prefix + "source_checksums")
        if saved is not None and saved.shape == self.source_checksums.shape:
            differs = [i for i in range(self.num_sources) if not torch.isclose(saved[i], self.source_checksums[i])]
            if differs:
                errs.append(
                    f"the state dict was saved from a KernelMerge of other sources (or in another order): source(s) "
                    f"{differs} differ. Build the KernelMerge from the same sources, in the same order, to resume."
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errs)

    # ------------------------------------------------------------------ coefficients
    def coefficients(self) -> dict[str, torch.Tensor]:
        """Merge weights per unit: unit name -> alpha of shape ``(N, C)``, columns summing to 1.

        ``C`` is the unit's output-channel count for ``"kernel"`` granularity and 1 for ``"layer"`` and ``"model"``.
        The tensors are detached copies.
        """
        alpha = torch.softmax(self.merge_logits.detach(), dim=0)
        return {u.name: alpha[:, s].clone() for u, s in zip(self.units, self._slices(), strict=True)}

    def set_coefficients(self, alpha: torch.Tensor | Sequence[float] | dict[str, torch.Tensor]) -> None:
        """Set the merge weights directly (e.g. one-hot, or fixed interpolation weights).

        Args:
            alpha: one weight per source for every coefficient (a length-N sequence or tensor), or a dict
                unit name -> ``(N, C)`` tensor as returned by :meth:`coefficients` (missing units keep theirs).

        Raises:
            ValueError: when the weights are negative, do not sum to 1 over the sources, or have a wrong shape.
        """
        logits = self.merge_logits.detach().clone()
        items = (
            [
                (s, torch.as_tensor(alpha[u.name]))
                for u, s in zip(self.units, self._slices(), strict=True)
                if u.name in alpha
            ]
            if isinstance(alpha, dict)
            else [(slice(None), torch.as_tensor(alpha, dtype=logits.dtype).reshape(-1, 1))]
        )
        for s, a in items:
            a = a.to(logits)
            target = logits[:, s]
            if a.shape[0] != self.num_sources or (a.dim() == 2 and a.shape[1] not in (1, target.shape[1])):
                raise ValueError(f"coefficients must have shape ({self.num_sources}, C), got {tuple(a.shape)}.")
            if (a < 0).any() or not torch.allclose(a.sum(0), torch.ones(()), atol=1e-5):
                raise ValueError(f"coefficients must be non-negative and sum to 1 over the sources, got {a.tolist()}.")
            logits[:, s] = torch.log(a).clamp_min(_LOG_ZERO).expand_as(target)
        with torch.no_grad():
            self.merge_logits.copy_(logits)

    def _slices(self) -> list[slice]:
        if self.granularity == "kernel":
            return [slice(o, o + u.channels) for o, u in zip(self._offsets, self.units, strict=True)]
        return [slice(o, o + 1) for o in self._offsets]

    # ------------------------------------------------------------------ merging
    def merged_parameters(self) -> dict[str, torch.Tensor]:
        """The merged tensors of every unit (differentiable w.r.t. the coefficients), by parameter name."""
        alpha = torch.softmax(self.merge_logits, dim=0)  # (N, total)
        out: dict[str, torch.Tensor] = {}
        for g, (names, units, rows) in enumerate(self._groups):
            stack = getattr(self, f"_stack{g}")  # (N, R, K)
            a = alpha.index_select(1, getattr(self, f"_columns{g}")).unsqueeze(-1)  # (N, R, 1)
            merged = _WeightedSum.apply(a, stack)
            for full, unit, part in zip(names, units, merged.split(rows), strict=True):
                out[full] = from_channel_major(part, unit, self._shapes[full])
        return out

    def _columns(self, k: int, unit: MergeUnit, device: torch.device) -> torch.Tensor:
        """Logit column of each output channel of unit ``k``."""
        if self.granularity == "kernel":
            return torch.arange(self._offsets[k], self._offsets[k] + unit.channels, device=device)
        return torch.full((unit.channels,), self._offsets[k], dtype=torch.long, device=device)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        """Merge the weights with the current coefficients, then run one forward pass of the merged network."""
        slots = self._slots
        merged = self.merged_parameters()
        try:
            # what torch.func.functional_call does, without its per-call name resolution and weight-tie analysis:
            # the merged tensors take the placeholders' place in the template for this one call
            for (owner, local, _), value in zip(slots, merged.values(), strict=True):
                owner.__dict__[local] = value
            return self.network(x, *args, **kwargs)
        finally:
            for owner, local, placeholder in slots:
                owner.__dict__[local] = placeholder

    def collapse(self) -> nn.Module:
        """A plain network of the sources' class holding the merged weights and the new head, in eval mode.

        It does not depend on this package: its ``state_dict`` has the keys of the sources (with the new head's
        shapes; a module reached under several names, as in DynUNet, under each of them with the same values), and
        in eval mode its outputs equal this module's outputs in eval mode.
        """
        with torch.no_grad():
            merged = {k: v.detach().clone() for k, v in self.merged_parameters().items()}
        plain = _copy_network(self.network)
        # register in the sources' order (merged is in storage-group order), so state_dict() keys come out the same
        for full in (name for unit in self.units for name in unit.full_names()):
            value = merged[full]
            mod_name, _, local = full.rpartition(".")
            owner = plain.get_submodule(mod_name)
            object.__delattr__(owner, local)
            owner.register_parameter(local, nn.Parameter(value))
        return plain.eval()

    def extra_repr(self) -> str:
        return (
            f"num_sources={self.num_sources}, granularity={self.granularity!r}, head={self.head!r}, "
            f"anchor={self.anchor}, coefficients={self.merge_logits.numel()}"
        )


def _copy_network(network: nn.Module) -> nn.Module:
    """``copy.deepcopy(network)``, also for a network that keeps activations of its last forward.

    DynUNet with deep supervision stores its heads' outputs in a plain list attribute; after a forward with
    gradients they are non-leaf tensors, which ``deepcopy`` refuses. They are copied detached (every forward
    overwrites them); parameters, buffers and the sharing of modules and lists are copied as ``deepcopy`` does.
    """
    memo: dict[int, object] = {}
    for module in network.modules():
        for name, value in vars(module).items():
            if name in ("_parameters", "_buffers", "_modules"):
                continue
            items = value.values() if isinstance(value, dict) else value if isinstance(value, list | tuple) else [value]
            for t in items:
                if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                    memo[id(t)] = t.detach()
    return copy.deepcopy(network, memo)


def _ref_device(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _initial_logits(n: int, total: int, anchor: int | None, weight: float | None, dtype: torch.dtype) -> torch.Tensor:
    logits = torch.zeros(n, total, dtype=dtype)
    if anchor is not None and weight is not None:
        logits.fill_(math.log((1.0 - weight) / (n - 1)))
        logits[anchor] = math.log(weight)
    return logits


class _WeightedSum(torch.autograd.Function):
    """``sum_i a[i] * stack[i]`` for a frozen ``stack`` of shape (N, R, K) and weights ``a`` of shape (N, R, 1).

    Forward is N fused multiply-adds; backward computes only the weights' gradient, as N row-wise dot products.
    Autograd's own graph for the same sum builds an (R, K) product per source in backward; on 2 CPU cores this
    version measured about 3x faster for ResNet-sized layers (512 x 4608, N = 4), forward and backward together.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, stack: torch.Tensor) -> torch.Tensor:
        out = stack[0] * a[0]
        for i in range(1, stack.shape[0]):
            out.addcmul_(stack[i], a[i])
        ctx.save_for_backward(stack)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (stack,) = ctx.saved_tensors
        grad = grad.contiguous()
        ga = torch.stack([torch.linalg.vecdot(stack[i], grad, dim=-1) for i in range(stack.shape[0])])
        return ga.unsqueeze(-1), None


def _checksums(merge: KernelMerge) -> torch.Tensor:
    """One float64 number per source: a position-weighted sum over its stacked values (order-sensitive)."""
    total = torch.zeros(merge.num_sources, dtype=torch.float64)
    for g in range(len(merge._groups)):
        stack = getattr(merge, f"_stack{g}").detach().to(torch.float64)  # (N, R, K)
        weights = torch.linspace(1.0, 2.0, stack.shape[1], dtype=torch.float64, device=stack.device)
        total += ((stack.sum(2) * weights).sum(1) * (1.0 + g / len(merge._groups))).cpu()
    return total


def _linear_like_names(module: nn.Module, limit: int = 5) -> list[str]:
    names = [n for n, m in module.named_modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and n]
    return names[-limit:]

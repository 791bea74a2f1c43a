"""Permutation groups of a network, derived by running it once: which tensor axes must be permuted together.

Hidden channels of a network can be reordered without changing its function as long as every tensor that reads
or writes those channels is reordered the same way. A *permutation group* is such a set of channels: the output
channels of a conv, joined with every other conv whose output is added to it (residual connections), the norm
layers that normalise them, the next layers' input axes (in slices, where outputs were concatenated, as in
DenseNet), squeeze-and-excitation gates (by the product that applies them) and the classifier's input axis.

The groups are found by tracing the network on an example input under a ``TorchFunctionMode``: every torch
function the forward calls is seen with its real arguments, so Python control flow, ``x.view(x.size(0), -1)`` and
shape arithmetic need no special care, and no spec has to be written by hand for an architecture. Each tensor in
the trace carries a description of its channel axis (which groups lie along it, in which slices); operations
that are not known to be channel-wise raise :class:`UnsupportedOperationError` naming the operation and module.

Channels that must not move form *fixed* groups: the network's input channels and output (class) channels, and
the channels around grouped convolutions (other than depthwise ones), group norms with 1 < groups < channels and
concatenations or sums whose slices do not line up. Fixed groups are left out of the spec.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "AxisSlice",
    "PermutationSpec",
    "UnsupportedOperationError",
    "example_input_for",
    "permutation_spec",
    "trace_activations",
]


class UnsupportedOperationError(ValueError):
    """The trace met an operation (or module) whose effect on channels it cannot reason about."""


@dataclass(frozen=True)
class AxisSlice:
    """Where a permutation group acts inside one tensor of the state dict.

    The slice ``[offset, offset + length)`` of axis ``axis`` of tensor ``key``, read as ``length`` logical channels
    of ``inner`` consecutive entries each (``inner > 1`` for a linear layer that reads a flattened feature map).
    """

    key: str
    axis: int
    offset: int
    length: int
    inner: int = 1


@dataclass
class PermutationSpec:
    """The permutation groups of a network: group name -> its size and the tensor slices it acts on."""

    sizes: dict[str, int] = field(default_factory=dict)
    slices: dict[str, list[AxisSlice]] = field(default_factory=dict)

    @property
    def groups(self) -> list[str]:
        return list(self.sizes)

    def by_key(self) -> dict[str, list[tuple[str, AxisSlice]]]:
        """State-dict key -> the ``(group, slice)`` pairs that act on that tensor."""
        out: dict[str, list[tuple[str, AxisSlice]]] = {}
        for group, slices in self.slices.items():
            for s in slices:
                out.setdefault(s.key, []).append((group, s))
        return out

    def __repr__(self) -> str:
        return f"PermutationSpec({len(self.sizes)} groups, {sum(self.sizes.values())} channels)"


# ---------------------------------------------------------------------------------------------------------------
# channel bookkeeping


class _Groups:
    """Union-find over channel groups; a group can be marked fixed (never permuted)."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.fixed: list[bool] = []
        self.name: list[str] = []

    def new(self, size: int, name: str, fixed: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.fixed.append(fixed)
        self.name.append(name)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int, where: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if self.size[ra] != self.size[rb]:
            raise UnsupportedOperationError(
                f"{where}: joins channel groups of different sizes ({self.size[ra]} and {self.size[rb]})."
            )
        lo, hi = min(ra, rb), max(ra, rb)  # the older group keeps its name
        self.parent[hi] = lo
        self.fixed[lo] = self.fixed[lo] or self.fixed[hi]

    def fix(self, g: int) -> None:
        self.fixed[self.find(g)] = True


@dataclass(frozen=True)
class _Feat:
    """The channel axis of a traced tensor: its position, the groups along it (in order) and the entries per channel."""

    axis: int
    segments: tuple[int, ...]
    inner: int = 1


_PASSTHROUGH = {
    # element-wise and spatial operations: channel c of the output depends only on channel c of the input
    "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "sigmoid", "tanh", "hardtanh",
    "hardswish", "hardsigmoid", "softplus", "softsign", "logsigmoid", "tanhshrink", "threshold", "rrelu", "glu_",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
    "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "lp_pool1d",
    "lp_pool2d", "lp_pool3d", "interpolate", "upsample", "upsample_nearest", "upsample_bilinear", "pixel_shuffle_",
    "clone", "contiguous", "to", "float", "double", "half", "bfloat16", "type", "detach", "abs", "neg", "exp", "log",
    "sqrt", "rsqrt", "square", "clamp", "clamp_min", "clamp_max", "clip", "pow", "reciprocal", "sign", "sin", "cos",
    "requires_grad",
}  # fmt: skip
_BINARY = {"add", "sub", "mul", "div", "true_divide", "maximum", "minimum", "radd", "rsub", "rmul", "rdiv", "rtruediv",
           "truediv", "iadd", "isub", "imul", "idiv", "itruediv"}  # fmt: skip
_IGNORED = {"size", "dim", "numel", "__get__", "is_floating_point", "is_contiguous", "__len__", "get_device",
            "__format__", "__bool__", "__index__", "__int__", "__float__", "item", "tolist", "__repr__"}  # fmt: skip
_REDUCTIONS = {"mean", "sum", "amax", "amin", "std", "var", "logsumexp", "norm"}
_CONV = {"conv1d": 1, "conv2d": 2, "conv3d": 3}
_CONV_T = {"conv_transpose1d": 1, "conv_transpose2d": 2, "conv_transpose3d": 3}

_F_NAMES = {id(getattr(F, n)): n for n in dir(F) if callable(getattr(F, n, None))}


def _op_name(func) -> str:
    name = _F_NAMES.get(id(func)) or getattr(func, "__name__", None) or repr(func)
    if name == "__get__":
        return name
    name = name.strip("_") if name.startswith("__") else name
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def _arg(args, kwargs, index: int, name: str, default=None):
    if name in kwargs:
        return kwargs[name]
    return args[index] if len(args) > index else default


class _Tracer(TorchFunctionMode):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.groups = _Groups()
        self.feats: dict[int, _Feat] = {}
        self.alive: list[torch.Tensor] = []  # keep traced tensors alive so that their ids are not reused
        self.params = {id(p): n for n, p in model.named_parameters()}
        self.params.update({id(b): n for n, b in model.named_buffers()})
        self.uses: dict[str, list[tuple[int, int, int, int]]] = {}  # key -> [(axis, offset, group, inner)]
        self.key_group: dict[tuple[str, int], int] = {}
        self.module_stack: list[str] = []
        self.handles = []
        for name, module in model.named_modules():
            self.handles.append(module.register_forward_pre_hook(self._enter(name or type(model).__name__)))
            self.handles.append(module.register_forward_hook(self._leave))

    # -- module context, for error messages and group names
    def _enter(self, name):
        def hook(_module, _inputs):
            self.module_stack.append(name)

        return hook

    def _leave(self, _module, _inputs, _output):
        self.module_stack.pop()

    @property
    def where(self) -> str:
        return f"module {self.module_stack[-1]!r}" if self.module_stack else "the network's forward"

    def remove_hooks(self) -> None:
        for h in self.handles:
            h.remove()

    # -- bookkeeping
    def feat(self, t) -> _Feat | None:
        return self.feats.get(id(t)) if isinstance(t, torch.Tensor) else None

    def set_feat(self, t, feat: _Feat | None) -> None:
        if isinstance(t, torch.Tensor) and feat is not None:
            self.feats[id(t)] = feat
            self.alive.append(t)

    def new_group(self, size: int, key: str, fixed: bool = False) -> int:
        # a weight used by several calls (a shared module) writes one group
        if (key, 0) in self.key_group:
            return self.key_group[(key, 0)]
        g = self.groups.new(size, key.rsplit(".", 1)[0] or key, fixed)
        self.key_group[(key, 0)] = g
        return g

    def use(self, key: str, axis: int, feat: _Feat, where: str) -> None:
        """Record that ``axis`` of tensor ``key`` runs along the channels of ``feat``."""
        offset, uses = 0, []
        for g in feat.segments:
            uses.append((axis, offset, g, feat.inner))
            offset += self.groups.size[g] * feat.inner
        old_axis = [u for u in self.uses.setdefault(key, []) if u[0] == axis]
        if not old_axis:
            self.uses[key].extend(uses)
            return
        # a tensor read twice (a shared module): the same slices must carry the same groups
        if [(u[1], u[3]) for u in old_axis] != [(u[1], u[3]) for u in uses]:
            for u in old_axis + uses:
                self.groups.fix(u[2])
            return
        for a, b in zip(old_axis, uses, strict=True):
            self.groups.union(a[2], b[2], where)

    def key_of(self, t, what: str, func_name: str) -> str | None:
        if t is None:
            return None
        key = self.params.get(id(t))
        if key is None:
            raise UnsupportedOperationError(
                f"{self.where}: the {what} of {func_name} is not a parameter or buffer of the network "
                "(computed weights, e.g. weight standardisation, cannot be permuted)."
            )
        return key

    def fix_feat(self, feat: _Feat | None) -> None:
        if feat is not None:
            for g in feat.segments:
                self.groups.fix(g)

    def channels(self, feat: _Feat) -> int:
        return sum(self.groups.size[g] for g in feat.segments)

    # -- the trace
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _op_name(func)
        if name in _IGNORED:
            return out
        tensors = [a for a in _flat(args) + _flat(list(kwargs.values())) if isinstance(a, torch.Tensor)]
        inputs = [(t, self.feat(t)) for t in tensors]
        with_channels = [(t, f) for t, f in inputs if f is not None]
        for t in tensors:
            if id(t) in self.params and not self._reads_weights(name):
                raise UnsupportedOperationError(
                    f"{self.where}: parameter {self.params[id(t)]!r} is used by {name!r}, which the alignment "
                    "cannot reason about."
                )
        handler = getattr(self, f"_op_{name}", None)
        if handler is None:
            if name in _CONV:
                handler = self._conv
            elif name in _CONV_T:
                handler = self._conv_transpose
            elif name in _PASSTHROUGH:
                handler = self._passthrough
            elif name in _BINARY:
                handler = self._binary
            elif name in _REDUCTIONS:
                handler = self._reduction
        if handler is None:
            if with_channels:
                raise UnsupportedOperationError(
                    f"{self.where}: operation {name!r} on a feature map is not known to the alignment; "
                    "its effect on channels cannot be reasoned about."
                )
            return out
        handler(name, args, kwargs, out, with_channels)
        return out

    @staticmethod
    def _reads_weights(name: str) -> bool:
        return name in _CONV or name in _CONV_T or name in {
            "linear", "batch_norm", "instance_norm", "group_norm", "layer_norm", "prelu", "detach", "to", "float"
        }  # fmt: skip

    def _passthrough(self, name, args, kwargs, out, with_channels):
        if not with_channels:
            return
        feat = with_channels[0][1]
        if name.startswith("interpolate") or name.startswith("upsample") or name.startswith("pixel"):
            if feat.axis != 1 or feat.inner != 1:
                raise UnsupportedOperationError(f"{self.where}: {name!r} on a tensor whose channels are not axis 1.")
        outs = out if isinstance(out, (tuple, list)) else (out,)
        for o in outs:
            if isinstance(o, torch.Tensor) and o.dtype.is_floating_point:
                self.set_feat(o, feat)

    def _binary(self, name, args, kwargs, out, with_channels):
        if not with_channels:
            return
        feats = [f for _, f in with_channels]
        t0 = with_channels[0][0]
        first = feats[0]
        for t, f in with_channels[1:]:
            if t.dim() != t0.dim() or f.axis != first.axis:
                raise UnsupportedOperationError(f"{self.where}: {name!r} of tensors with channels on different axes.")
            if f.inner == first.inner and [self.groups.size[g] for g in f.segments] == [
                self.groups.size[g] for g in first.segments
            ]:
                for a, b in zip(first.segments, f.segments, strict=True):
                    self.groups.union(a, b, self.where)
            else:  # slices do not line up (e.g. a concatenation added to a plain map): keep both in place
                self.fix_feat(first)
                self.fix_feat(f)
        self.set_feat(out, first)

    def _reduction(self, name, args, kwargs, out, with_channels):
        if not with_channels or not isinstance(out, torch.Tensor):
            return
        t, feat = with_channels[0]
        dim = _arg(args, kwargs, 1, "dim")
        if name == "norm":
            dim = _arg(args, kwargs, 2, "dim")
        keepdim = bool(_arg(args, kwargs, 2 if name != "norm" else 3, "keepdim", False))
        if dim is None:
            return  # reduced to a scalar: permutation-invariant
        dims = sorted(d % t.dim() for d in ((dim,) if isinstance(dim, int) else dim))
        if feat.axis in dims:
            return  # channels summed over: permutation-invariant
        axis = feat.axis if keepdim else feat.axis - sum(d < feat.axis for d in dims)
        self.set_feat(out, _Feat(axis, feat.segments, feat.inner))

    # shape operations
    def _op_view(self, name, args, kwargs, out, with_channels):
        if with_channels and isinstance(out, torch.Tensor):
            t, feat = with_channels[0]
            self.set_feat(out, self._reshape(feat, tuple(t.shape), tuple(out.shape), name))

    _op_reshape = _op_flatten = _op_view

    def _reshape(self, feat: _Feat, shape_in: tuple, shape_out: tuple, name: str) -> _Feat:
        """Follow the channel axis through a reshape: find the output axis that holds it, as blocks of entries."""
        outer = _prod(shape_in[: feat.axis])
        rest = _prod(shape_in[feat.axis + 1 :])
        n = self.channels(feat)
        for i in range(len(shape_out) + 1):
            if i == len(shape_out) or _prod(shape_out[:i]) > outer:
                break
            if _prod(shape_out[:i]) != outer:
                continue
            after = _prod(shape_out[i + 1 :])
            span = feat.inner * rest
            if shape_out[i] % n == 0 and span % after == 0 and shape_out[i] == n * (span // after):
                return _Feat(i, feat.segments, span // after)
        raise UnsupportedOperationError(
            f"{self.where}: {name!r} from {list(shape_in)} to {list(shape_out)} splits the channel axis; "
            "the alignment cannot follow it."
        )

    def _op_unsqueeze(self, name, args, kwargs, out, with_channels):
        if with_channels and isinstance(out, torch.Tensor):
            t, feat = with_channels[0]
            self.set_feat(out, self._reshape(feat, tuple(t.shape), tuple(out.shape), name))

    _op_squeeze = _op_expand_as = _op_unsqueeze

    def _op_expand(self, name, args, kwargs, out, with_channels):
        if with_channels and isinstance(out, torch.Tensor):
            t, feat = with_channels[0]
            shift = out.dim() - t.dim()
            if t.shape[feat.axis] != out.shape[feat.axis + shift]:
                raise UnsupportedOperationError(f"{self.where}: {name!r} expands the channel axis.")
            self.set_feat(out, _Feat(feat.axis + shift, feat.segments, feat.inner))

    def _op_permute(self, name, args, kwargs, out, with_channels):
        if with_channels:
            t, feat = with_channels[0]
            dims = args[1:] if len(args) > 2 or isinstance(_arg(args, kwargs, 1, "dims"), int) else args[1]
            dims = [d % t.dim() for d in (dims if dims else kwargs["dims"])]
            self.set_feat(out, _Feat(dims.index(feat.axis), feat.segments, feat.inner))

    def _op_transpose(self, name, args, kwargs, out, with_channels):
        if with_channels:
            t, feat = with_channels[0]
            d0, d1 = (_arg(args, kwargs, 1, "dim0") % t.dim(), _arg(args, kwargs, 2, "dim1") % t.dim())
            axis = d1 if feat.axis == d0 else d0 if feat.axis == d1 else feat.axis
            self.set_feat(out, _Feat(axis, feat.segments, feat.inner))

    _op_swapaxes = _op_transpose

    def _op_getitem(self, name, args, kwargs, out, with_channels):
        if not with_channels or args[0] is not with_channels[0][0]:
            if with_channels:
                raise UnsupportedOperationError(f"{self.where}: a feature map used as an index.")
            return
        t, feat = with_channels[0]
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        if Ellipsis in index or any(not isinstance(i, slice) for i in index):
            raise UnsupportedOperationError(f"{self.where}: indexing a feature map with {args[1]!r}.")
        if feat.axis < len(index) and index[feat.axis] != slice(None):
            raise UnsupportedOperationError(f"{self.where}: slicing the channel axis of a feature map.")
        self.set_feat(out, feat)

    def _op_cat(self, name, args, kwargs, out, with_channels):
        tensors = list(_arg(args, kwargs, 0, "tensors"))
        dim = _arg(args, kwargs, 1, "dim", 0) % tensors[0].dim()
        feats = [self.feat(t) for t in tensors]
        if all(f is None for f in feats):
            return
        axes = {f.axis for f in feats if f is not None}
        if any(f is None for f in feats) or len(axes) != 1 or len({f.inner for f in feats}) != 1:
            for f in feats:
                self.fix_feat(f)
            return
        axis = axes.pop()
        if dim == axis:
            segments = tuple(g for f in feats for g in f.segments)
            self.set_feat(out, _Feat(axis, segments, feats[0].inner))
        else:
            self._binary(name, args, kwargs, out, [(t, f) for t, f in zip(tensors, feats, strict=True)])

    _op_concat = _op_concatenate = _op_cat

    # layers with weights
    def _conv(self, name, args, kwargs, out, with_channels):
        x, weight, bias = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        groups = _arg(args, kwargs, 6, "groups", 1)
        self._layer(name, x, weight, bias, out, groups, out_axis=0, in_axis=1)

    def _conv_transpose(self, name, args, kwargs, out, with_channels):
        x, weight, bias = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        groups = _arg(args, kwargs, 6, "groups", 1)
        self._layer(name, x, weight, bias, out, groups, out_axis=1, in_axis=0)

    def _op_linear(self, name, args, kwargs, out, with_channels):
        x, weight, bias = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        feat = self.feat(x)
        if feat is not None and feat.axis != x.dim() - 1:
            raise UnsupportedOperationError(f"{self.where}: linear over an axis that is not the channel axis.")
        self._layer(name, x, weight, bias, out, 1, out_axis=0, in_axis=1, out_feat_axis=out.dim() - 1)

    def _layer(self, name, x, weight, bias, out, groups, out_axis, in_axis, out_feat_axis=1):
        wkey = self.key_of(weight, "weight", name)
        bkey = self.key_of(bias, "bias", name)
        feat = self.feat(x)
        c_out = weight.shape[out_axis] * (groups if out_axis == 1 else 1)
        c_in = weight.shape[in_axis] * (groups if in_axis == 1 else 1)
        if feat is None:
            raise UnsupportedOperationError(f"{self.where}: the input of {name!r} has no traced channel axis.")
        depthwise = groups > 1 and groups == c_in == c_out and weight.shape[in_axis if in_axis == 1 else out_axis] == 1
        if groups == 1:
            self.use(wkey, in_axis, feat, self.where)
            g = self.new_group(c_out, wkey)
        elif depthwise:
            # one filter per channel: the output channels are the input channels, in the same order
            g = None
        else:
            # channels may only move inside a group of a grouped convolution: keep both sides in place
            self.fix_feat(feat)
            g = self.new_group(c_out, wkey, fixed=True)
        out_feat = feat if g is None else _Feat(out_feat_axis, (g,))
        self.use(wkey, out_axis, out_feat, self.where)
        if bkey is not None:
            self.use(bkey, 0, out_feat, self.where)
        self.set_feat(out, out_feat)

    def _norm(self, name, x, keys, out, channelwise: bool = True):
        feat = self.feat(x)
        if feat is None:
            raise UnsupportedOperationError(f"{self.where}: the input of {name!r} has no traced channel axis.")
        if feat.axis != 1 or feat.inner != 1:
            raise UnsupportedOperationError(f"{self.where}: {name!r} over channels that are not axis 1.")
        if not channelwise:
            self.fix_feat(feat)
        for key in keys:
            if key is not None:
                self.use(key, 0, feat, self.where)
        self.set_feat(out, feat)

    def _op_batch_norm(self, name, args, kwargs, out, with_channels):
        keys = [self.key_of(_arg(args, kwargs, i, n), n, name) for i, n in
                ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]  # fmt: skip
        self._norm(name, args[0], keys, out)

    _op_instance_norm = _op_batch_norm

    def _op_group_norm(self, name, args, kwargs, out, with_channels):
        num_groups = _arg(args, kwargs, 1, "num_groups")
        keys = [self.key_of(_arg(args, kwargs, i, n), n, name) for i, n in ((2, "weight"), (3, "bias"))]
        channels = args[0].shape[1]
        self._norm(name, args[0], keys, out, channelwise=num_groups in (1, channels))

    def _op_layer_norm(self, name, args, kwargs, out, with_channels):
        x = args[0]
        feat = self.feat(x)
        shape = _arg(args, kwargs, 1, "normalized_shape")
        keys = [self.key_of(_arg(args, kwargs, i, n), n, name) for i, n in ((2, "weight"), (3, "bias"))]
        if feat is None:
            raise UnsupportedOperationError(f"{self.where}: the input of {name!r} has no traced channel axis.")
        first = x.dim() - len(shape)
        if feat.axis >= first:  # the channel axis is normalised over; the affine runs along it
            for key in keys:
                if key is not None:
                    self.use(key, feat.axis - first, feat, self.where)
        elif any(k is not None for k in keys):
            pass  # the affine runs along other axes: not permuted
        self.set_feat(out, feat)

    def _op_prelu(self, name, args, kwargs, out, with_channels):
        key = self.key_of(_arg(args, kwargs, 1, "weight"), "weight", name)
        feat = self.feat(args[0])
        if feat is None:
            raise UnsupportedOperationError(f"{self.where}: the input of {name!r} has no traced channel axis.")
        if args[1].numel() > 1:
            self.use(key, 0, feat, self.where)
        self.set_feat(out, feat)


def _flat(values) -> list:
    out = []
    for v in values:
        if isinstance(v, (list, tuple)):
            out.extend(_flat(v))
        else:
            out.append(v)
    return out


def _prod(values) -> int:
    p = 1
    for v in values:
        p *= int(v)
    return p


def example_input_for(model: nn.Module, spatial_size: int | None = None, batch: int = 2) -> torch.Tensor:
    """A random input for tracing ``model``: channels and dimensions from its first conv (or linear) layer.

    Raises:
        ValueError: when the model has no conv or linear layer to read them from.
    """
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            dims = m.weight.dim() - 2
            size = spatial_size or (64 if dims < 3 else 32)
            return torch.randn(batch, m.in_channels, *([size] * dims), generator=torch.Generator().manual_seed(0))
        if isinstance(m, nn.Linear):
            return torch.randn(batch, m.in_features, generator=torch.Generator().manual_seed(0))
    raise ValueError(f"{type(model).__name__} has no conv or linear layer; pass example_input to trace it.")


def permutation_spec(model: nn.Module, example_input: torch.Tensor | None = None) -> PermutationSpec:
    """Derive the permutation groups of ``model`` by running it once on ``example_input``.

    Args:
        model: any network built from conv, transposed conv, linear, norm and channel-wise operations.
        example_input: an input batch (at least 2 samples for batch norm); by default a random one shaped from
            the first conv layer (64 pixels a side in 1-D/2-D, 32 in 3-D).

    Returns:
        the :class:`PermutationSpec`: groups that may be permuted, each with the tensor slices it acts on.

    Raises:
        UnsupportedOperationError: naming the operation and module it cannot reason about.
    """
    if example_input is None:
        example_input = example_input_for(model)
    tracer, _, outputs = _trace(model, example_input)
    for o in outputs:
        tracer.fix_feat(tracer.feat(o))  # class outputs keep their order
    return _collect(tracer)


def _trace(model: nn.Module, x: torch.Tensor) -> tuple[_Tracer, int, list]:
    """Run ``model`` once on ``x`` under the tracer (eval mode, no gradients; the mode is restored): the tracer,
    the group of the input channels (fixed) and the network's outputs, flattened."""
    tracer = _Tracer(model)
    was_training = model.training
    model.eval()
    try:
        x = x.detach().clone()
        with torch.no_grad(), tracer:
            source = tracer.groups.new(x.shape[1] if x.dim() > 1 else 1, "input", fixed=True)
            tracer.set_feat(x, _Feat(1 if x.dim() > 1 else 0, (source,)))
            out = model(x)
    finally:
        tracer.remove_hooks()
        model.train(was_training)
    return tracer, source, _flat(list(out.values()) if isinstance(out, dict) else [out])


def _collect(tracer: _Tracer) -> PermutationSpec:
    groups = tracer.groups
    spec = PermutationSpec()
    names = _group_names(tracer)
    for key, uses in tracer.uses.items():
        for axis, offset, g, inner in uses:
            root = groups.find(g)
            if root in names:
                name = names[root]
                spec.sizes[name] = groups.size[root]
                spec.slices.setdefault(name, []).append(AxisSlice(key, axis, offset, groups.size[root], inner))
    return spec


def _group_names(tracer: _Tracer) -> dict[int, str]:
    """Root group id -> unique name, for the groups that may be permuted (deterministic for one architecture)."""
    groups = tracer.groups
    names: dict[int, str] = {}
    for uses in tracer.uses.values():
        for _, _, g, _ in uses:
            root = groups.find(g)
            if not groups.fixed[root] and root not in names:
                name = groups.name[root]
                names[root] = name if name not in names.values() else f"{name}#{root}"
    return names


def trace_activations(model: nn.Module, x: torch.Tensor) -> list[tuple[torch.Tensor, list[tuple[str, int, int]]]]:
    """Every feature map of ``model``'s forward on ``x``, as ``(samples, channels)`` matrices with their groups.

    Returns:
        in forward order, ``(matrix, [(group, offset, length), ...])`` per feature map that carries a group that may
        be permuted; ``matrix`` has one column per channel (batch and spatial positions are samples). The order and
        the group names are the same for every network of one architecture, so two networks' lists pair up.

    Raises:
        UnsupportedOperationError: as :func:`permutation_spec`.
    """
    tracer = _Tracer(model)
    was_training = model.training
    model.eval()
    try:
        x = x.detach().clone()
        with torch.no_grad(), tracer:
            source = tracer.groups.new(x.shape[1] if x.dim() > 1 else 1, "input", fixed=True)
            tracer.set_feat(x, _Feat(1 if x.dim() > 1 else 0, (source,)))
            out = model(x)
    finally:
        tracer.remove_hooks()
        model.train(was_training)
    for o in _flat(list(out.values()) if isinstance(out, dict) else [out]):
        tracer.fix_feat(tracer.feat(o))
    names = _group_names(tracer)
    records, seen = [], set()
    for t in tracer.alive:
        if id(t) in seen:
            continue
        seen.add(id(t))
        feat = tracer.feats[id(t)]
        segments, offset = [], 0
        for g in feat.segments:
            root = tracer.groups.find(g)
            if root in names:
                segments.append((names[root], offset, tracer.groups.size[root]))
            offset += tracer.groups.size[root]
        if segments:
            m = t.detach().float().movedim(feat.axis, -1)
            m = m.reshape(-1, offset, feat.inner).transpose(1, 2).reshape(-1, offset)
            records.append((m, segments))
    return records

"""Load, check and save the source networks that a merge combines.

A merge is only meaningful between networks of one architecture, so the sources are checked for the same class, the
same state-dict keys and the same tensor shapes before any weights are touched. Checkpoints are read without ever
unpickling arbitrary objects: pretrained weights are often downloaded from strangers, and a pickle can run code.
"""

from __future__ import annotations

import copy
import os
import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from monai.bundle import ConfigParser
from monai.utils import optional_import

from monai_medmerge.io import atomic_write
from monai_medmerge.safe_config import (
    UntrustedConfigError,
    build_network_def,
    read_config_file,
    read_network_def,
)

safetensors_torch, has_safetensors = optional_import(
    "safetensors.torch",
    descriptor="{} is needed for .safetensors files: pip install safetensors, or the extra monai_medmerge[io]",
)

__all__ = [
    "UntrustedConfigError",
    "check_compatible",
    "load_checkpoint",
    "load_source",
    "save_checkpoint",
    "state_dict_diff",
]

PathLike = str | os.PathLike[str]
NetworkDef = nn.Module | Callable[[], nn.Module] | Mapping[str, Any]

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
ALLOWED_SUFFIXES = (*TORCH_SUFFIXES, SAFETENSORS_SUFFIX)
# Tried in this order when a checkpoint holds more than a bare state dict (Lightning, MONAI, DDP training scripts).
CONTAINER_KEYS = ("state_dict", "model", "network", "model_state_dict", "net")
BUNDLE_CONFIG_NAMES = ("inference", "train")
BUNDLE_CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
BUNDLE_WEIGHT_NAMES = ("model.safetensors", "model.pt")
DDP_PREFIX = "module."
# Error messages list this many names and summarise the rest, so a wholly different network stays readable.
MAX_NAMES = 5
TRUST_HINT = (
    " If you trust this bundle, load it with load_source(..., trust_config=True) (as an entry of a bundle's "
    "sources list: {bundle: ..., trust_config: true}), which evaluates its config as MONAI does."
)


def _qualname(obj: Any) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _first_names(names: Sequence[str], limit: int = MAX_NAMES) -> str:
    shown = ", ".join(names[:limit])
    if len(names) > limit:
        shown += f" (and {len(names) - limit} more)"
    return shown


def _is_excluded(key: str, exclude: Sequence[str]) -> bool:
    return any(key == name or key.startswith(name + ".") for name in exclude)


def _attribute(tensor: torch.Tensor, attr: str):
    """A tensor's ``shape`` (as a tuple) or ``dtype``, as :func:`check_compatible` compares and prints it."""
    value = getattr(tensor, attr)
    return tuple(value) if attr == "shape" else value


def check_compatible(sources: Sequence[nn.Module], exclude: Sequence[str] = ()) -> None:
    """Check that several networks can be merged: same class, same state-dict keys, shapes and dtypes, finite
    weights.

    Source 0 is the reference that every other source is compared against.

    Args:
        sources: the networks to merge, at least two.
        exclude: dotted module names (for example ``"fc"`` or ``"class_layers.out"``) whose tensors are left out of
            every check, typically a task-specific head of different size that the merge replaces. A key is left
            out when it equals a name or starts with the name followed by a dot.

    Raises:
        ValueError: when there are fewer than two sources, a source is not an ``nn.Module``, the classes differ, a
            source lacks or has extra state-dict keys, shapes or dtypes differ, or a floating-point tensor holds NaN
            or Inf. The message names the source index and the offending class, keys or tensor.
    """
    if isinstance(exclude, str):
        # A bare string would otherwise be read as a sequence of one-letter module names.
        exclude = (exclude,)
    sources = list(sources)
    if len(sources) < 2:
        raise ValueError(f"need at least 2 sources, got {len(sources)}")
    for i, source in enumerate(sources):
        if not isinstance(source, nn.Module):
            raise ValueError(f"source {i} is not a torch.nn.Module, got {_qualname(source)}")
    ref_cls = type(sources[0])
    for i, source in enumerate(sources[1:], start=1):
        if type(source) is not ref_cls:
            raise ValueError(f"source {i} is {_qualname(source)}, source 0 is {_qualname(ref_cls)}")

    state_dicts = [{k: v for k, v in source.state_dict().items() if not _is_excluded(k, exclude)} for source in sources]
    ref = state_dicts[0]
    for i, sd in enumerate(state_dicts[1:], start=1):
        lacks = [k for k in ref if k not in sd]
        extra = [k for k in sd if k not in ref]
        problems = []
        if lacks:
            problems.append(f"source {i} lacks {len(lacks)} key(s) that source 0 has: {_first_names(lacks)}")
        if extra:
            problems.append(f"source {i} has {len(extra)} key(s) that source 0 lacks: {_first_names(extra)}")
        if problems:
            raise ValueError("; ".join(problems))
        # a merge computes in source 0's dtype: a source in another would be cast silently (half precision loses digits)
        for attr, hint in (
            ("shape", "a task-specific head of different size can be left out with exclude=[...]"),
            ("dtype", "convert the sources to one dtype first, e.g. network.float()"),
        ):
            differ = [
                f"{k} {_attribute(sd[k], attr)} vs {_attribute(v, attr)}"
                for k, v in ref.items()
                if isinstance(v, torch.Tensor) and isinstance(sd[k], torch.Tensor)
                if _attribute(sd[k], attr) != _attribute(v, attr)
            ]
            if differ:
                raise ValueError(
                    f"source {i} and source 0 differ in {attr} for {len(differ)} tensor(s) "
                    f"(source {i} vs source 0): {_first_names(differ)}; {hint}"
                )

    for i, sd in enumerate(state_dicts):
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor) or not (v.is_floating_point() or v.is_complex()):
                continue
            if bool(torch.isfinite(v).all()):
                continue
            n_nan = int(torch.isnan(v).sum())
            n_inf = int(torch.isinf(v).sum())
            raise ValueError(
                f"source {i} tensor {k} has {n_nan + n_inf} non-finite value(s) ({n_nan} NaN, {n_inf} Inf) "
                f"out of {v.numel()}"
            )


def _checkpoint_suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in ALLOWED_SUFFIXES:
        raise ValueError(
            f"unsupported checkpoint suffix {path.suffix!r} of {path}; allowed: {', '.join(ALLOWED_SUFFIXES)}"
        )
    return suffix


def _as_state_dict(obj: Any, path: Path, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where} in checkpoint {path} is a {_qualname(obj)}, not a state dict (a mapping)")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"{where} in checkpoint {path} is not a state dict: {len(not_tensors)} entry(ies) are not tensors "
            f"under string keys: {_first_names(not_tensors)}"
        )
    if not obj:
        raise ValueError(f"{where} in checkpoint {path} is empty: it holds no tensors")
    return dict(obj)


def _checkpoint_entry(ckpt: Any, path: Path, key: str | None) -> dict[str, torch.Tensor]:
    if key is not None:
        if not isinstance(ckpt, Mapping):
            raise ValueError(f"checkpoint {path} is a {_qualname(ckpt)}, so it has no key {key!r}")
        if key not in ckpt:
            raise ValueError(
                f"checkpoint {path} has no key {key!r}; available keys: {_first_names([str(k) for k in ckpt])}"
            )
        return _as_state_dict(ckpt[key], path, f"entry {key!r}")
    if isinstance(ckpt, Mapping) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return _as_state_dict(ckpt, path, "the top level")
    if isinstance(ckpt, Mapping):
        for candidate in CONTAINER_KEYS:
            if candidate in ckpt:
                return _as_state_dict(ckpt[candidate], path, f"entry {candidate!r}")
        raise ValueError(
            f"checkpoint {path} holds no state dict: its values are not all tensors and it has none of the keys "
            f"{', '.join(CONTAINER_KEYS)}; available keys: {_first_names([str(k) for k in ckpt])}; "
            "pass key=... to choose one"
        )
    return _as_state_dict(ckpt, path, "the top level")


def _strip_ddp_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # DistributedDataParallel saves its wrapped module under "module."; strip it only when every key has it, so a
    # network that happens to own a submodule called "module" keeps its names.
    if state_dict and all(k.startswith(DDP_PREFIX) for k in state_dict):
        return {k[len(DDP_PREFIX) :]: v for k, v in state_dict.items()}
    return state_dict


def load_checkpoint(path: PathLike, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.pt``, ``.pth``, ``.ckpt`` or ``.safetensors`` file, on the CPU.

    Torch files are read with ``weights_only=True``: only tensors and plain containers are accepted, never
    arbitrary pickled objects. Common containers are unwrapped: with ``key`` the state dict is ``ckpt[key]``;
    otherwise a mapping of tensors is the state dict itself, else the first of the keys ``"state_dict"``,
    ``"model"``, ``"network"``, ``"model_state_dict"``, ``"net"`` that is present. A ``"module."`` prefix that
    every key carries (saved from ``DistributedDataParallel``) is removed.

    Args:
        path: the checkpoint file.
        key: the entry of the checkpoint that holds the state dict, or ``None`` to find it as described above.

    Returns:
        the state dict, a plain ``dict`` from parameter and buffer names to tensors.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the suffix is not one of ``.pt``, ``.pth``, ``.ckpt``, ``.safetensors``; when the file
            holds objects other than tensors and plain containers (it is refused, not executed); when the file
            cannot be read; when ``key`` is absent or no state dict is found.
        OptionalImportError: for a ``.safetensors`` file when ``safetensors`` is not installed.
    """
    path = Path(path)
    suffix = _checkpoint_suffix(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if suffix == SAFETENSORS_SUFFIX:
        try:
            ckpt = safetensors_torch.load_file(str(path), device="cpu")
        except Exception as e:
            if not has_safetensors:
                raise
            raise ValueError(f"could not read safetensors checkpoint {path}: {type(e).__name__}: {e}") from e
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise ValueError(
                f"refused to load checkpoint {path}: it contains objects other than tensors and plain containers, "
                "and unpickling those can run arbitrary code; if you trust the file, re-save its state dict "
                "(model.state_dict()) with torch.save or as .safetensors"
            ) from e
        except Exception as e:
            raise ValueError(f"could not read checkpoint {path}: {type(e).__name__}: {e}") from e
    return _strip_ddp_prefix(_checkpoint_entry(ckpt, path, key))


def _build_network(network_def: NetworkDef, origin: str) -> nn.Module:
    if isinstance(network_def, nn.Module):
        return network_def
    if isinstance(network_def, Mapping):
        if "_target_" not in network_def:
            raise ValueError(
                f"network_def from {origin} is a mapping without '_target_'; give a MONAI config such as "
                '{"_target_": "monai.networks.nets.resnet18", "spatial_dims": 2, ...}'
            )
        target = network_def["_target_"]
        try:
            # Deep copy because ConfigParser resolves references in the mapping it is given.
            net = ConfigParser(copy.deepcopy(dict(network_def))).get_parsed_content()
        except Exception as e:
            raise ValueError(f"could not build network_def {target!r} from {origin}: {e}") from e
    elif callable(network_def):
        net = network_def()
    else:
        raise ValueError(
            f"network_def from {origin} is a {_qualname(network_def)}; expected an nn.Module, a callable "
            "returning one, or a MONAI config mapping with '_target_'"
        )
    if not isinstance(net, nn.Module):
        raise ValueError(f"network_def from {origin} built a {_qualname(net)}, not a torch.nn.Module")
    return net


def _bundle_network_def(folder: Path, trust_config: bool) -> nn.Module:
    configs = folder / "configs"
    for name in BUNDLE_CONFIG_NAMES:
        found = [configs / f"{name}{s}" for s in BUNDLE_CONFIG_SUFFIXES if (configs / f"{name}{s}").is_file()]
        if found:
            config_file = found[0]
            break
    else:
        wanted = " or ".join(f"configs/{n}.json|yaml|yml" for n in BUNDLE_CONFIG_NAMES)
        raise ValueError(f"bundle folder {folder} has no {wanted}, so network_def must be given")
    # JSON and YAML are read as data here (json.load, a yaml SafeLoader): nothing in them runs yet
    config, meta = read_config_file(config_file), None
    if (configs / "metadata.json").is_file():
        # Some configs refer to "_meta_#..." entries; reading the metadata keeps those references resolvable.
        meta = read_config_file(configs / "metadata.json")
    if "network_def" not in config:
        raise ValueError(f"bundle folder {folder}: {config_file.relative_to(folder)} has no id 'network_def'")
    if not trust_config:
        origin = f"source bundle {folder}: {config_file.relative_to(folder)}"
        network_def = read_network_def(
            config,
            "network_def",
            meta=meta,
            # Bundles usually set bundle_root to "." and rely on the runner to override it with the real folder.
            values={"bundle_root": str(folder)} if "bundle_root" in config else None,
            origin=origin,
            hint=TRUST_HINT,
        )
        return build_network_def(network_def, origin)
    parser = ConfigParser(config)
    if meta is not None:
        parser.read_meta(meta)
    if "bundle_root" in parser:
        parser["bundle_root"] = str(folder)
    origin = f"{config_file} id 'network_def'"
    try:
        net = parser.get_parsed_content("network_def")
    except Exception as e:
        raise ValueError(f"could not build {origin}: {e}") from e
    return _build_network(net, origin)


def state_dict_diff(
    network: nn.Module | Mapping[str, Any],
    state_dict: Mapping[str, Any],
    *,
    strict: bool = True,
    source: str = "checkpoint",
) -> list[str]:
    """What keeps ``state_dict`` from loading into ``network``, one readable line per kind of problem.

    The one comparison of a state dict against a network in this package (loading sources, exporting a checkpoint,
    collapsing a merge into a bundle's ``network_def``); ``torch``'s ``load_state_dict`` copies tensor by tensor
    and would leave a network half overwritten when it meets a mismatch, so callers check first.

    Args:
        network: the network, or its ``state_dict()``.
        state_dict: the tensors to load.
        strict: whether missing and unexpected keys count (shape mismatches always do).
        source: what ``state_dict`` is, for the shape lines (``"fc.weight (3, 512) in checkpoint vs (7, 512) in
            network"``).

    Returns:
        e.g. ``["1 missing key(s): fc.bias", "1 unexpected key(s): extra.weight", "1 shape mismatch(es): ..."]``,
        each listing the first five names; empty when ``state_dict`` fits.
    """
    expected = network.state_dict() if isinstance(network, nn.Module) else network
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(v.shape)} in {source} vs {tuple(expected[k].shape)} in network"
        for k, v in state_dict.items()
        if k in expected and hasattr(v, "shape") and hasattr(expected[k], "shape") and v.shape != expected[k].shape
    ]
    problems = []
    if strict and missing:
        problems.append(f"{len(missing)} missing key(s): {_first_names(missing)}")
    if strict and unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_first_names(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_first_names(mismatched)}")
    return problems


def _load_weights(net: nn.Module, state_dict: dict[str, torch.Tensor], checkpoint: Path, strict: bool) -> None:
    problems = state_dict_diff(net, state_dict, strict=strict)
    if problems:
        raise ValueError(f"checkpoint {checkpoint} does not fit {_qualname(net)}: {'; '.join(problems)}")
    try:
        net.load_state_dict(state_dict, strict=strict)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {checkpoint} does not fit {_qualname(net)}: {e}") from e


def load_source(
    path: PathLike,
    network_def: NetworkDef | None = None,
    *,
    key: str | None = None,
    strict: bool = True,
    trust_config: bool = False,
) -> nn.Module:
    """Build a source network and load its pretrained weights, from a checkpoint file or a MONAI bundle folder.

    For a bundle folder the architecture is the id ``network_def`` of ``configs/inference.json|yaml|yml`` (or of
    ``configs/train.*`` when there is no inference config); the weights are ``models/model.safetensors`` if present,
    else ``models/model.pt``. A bundle from elsewhere is untrusted, so its config is read as data and nothing in it
    runs (see :func:`monai_medmerge.safe_config.read_network_def`): ``network_def`` must be a ``_target_`` network
    of ``monai.networks.nets``, ``torch.nn`` or ``torchvision.models`` with literal arguments, and references such
    as ``@num_classes`` are followed to literal values only. ``trust_config=True`` parses the config with MONAI's
    ``ConfigParser`` instead, evaluating ``$`` expressions and any ``_target_``: only for bundles you trust.

    Args:
        path: a checkpoint file (see :func:`load_checkpoint`) or a MONAI bundle folder.
        network_def: the architecture: an ``nn.Module`` (its weights are replaced in place and it is returned), a
            callable returning one, or a MONAI config mapping with ``_target_``, for example
            ``{"_target_": "monai.networks.nets.resnet18", "spatial_dims": 2, "n_input_channels": 1,
            "num_classes": 3}``. Required for a checkpoint file; for a bundle it overrides the bundle's config.
        key: the checkpoint entry that holds the state dict, passed to :func:`load_checkpoint`.
        strict: whether missing and unexpected keys are errors. Shape mismatches always are.
        trust_config: evaluate a bundle folder's config as MONAI does (it can run code) instead of reading it as
            data.

    Returns:
        the network with the weights loaded, in eval mode.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        UntrustedConfigError: (a ``ValueError``) when a bundle's ``network_def`` holds an expression, a macro to
            another file, a reference to a non-literal or a ``_target_`` outside the allowed modules, and
            ``trust_config`` is False; the message names the bundle, the id and the value, and how to opt in.
        ValueError: when ``network_def`` is missing for a checkpoint file or cannot be built; when a bundle folder
            lacks its config, the id ``network_def`` or its weights file (the message names which); when the
            checkpoint cannot be read (see :func:`load_checkpoint`) or its keys or shapes do not fit the network.
    """
    path = Path(path)
    if path.is_dir():
        weights = next((path / "models" / n for n in BUNDLE_WEIGHT_NAMES if (path / "models" / n).is_file()), None)
        if weights is None:
            wanted = " nor ".join(f"models/{n}" for n in BUNDLE_WEIGHT_NAMES)
            raise ValueError(f"bundle folder {path} has neither {wanted}")
    elif path.is_file():
        if network_def is None:
            raise ValueError(
                f"network_def is required to load checkpoint file {path}: give an nn.Module, a callable returning "
                "one, or a MONAI config mapping with '_target_'"
            )
        weights = path
    else:
        raise FileNotFoundError(f"source not found: {path} is neither a checkpoint file nor a bundle folder")
    # Read the checkpoint first so that a refused or unreadable file fails before any network is built.
    state_dict = load_checkpoint(weights, key=key)
    if network_def is None:
        net = _bundle_network_def(path, trust_config)
    else:
        net = _build_network(network_def, "the network_def argument")
    _load_weights(net, state_dict, weights, strict)
    return net.eval()


def save_checkpoint(state_dict_or_module: nn.Module | Mapping[str, torch.Tensor], path: PathLike) -> None:
    """Write a state dict atomically, as a torch file or as safetensors according to the suffix of ``path``.

    The file is written with :func:`monai_medmerge.io.atomic_write` (a temporary file beside it, then one rename),
    so ``path`` is either the old file or the complete new one, never a partial write.

    Args:
        state_dict_or_module: a network (its ``state_dict()`` is saved) or a mapping from names to tensors.
        path: the target file; ``.pt``, ``.pth`` or ``.ckpt`` for ``torch.save`` of a plain dict, or
            ``.safetensors``.

    Raises:
        ValueError: when the suffix is not allowed or a value is not a tensor.
        FileNotFoundError: when the folder of ``path`` does not exist.
        OptionalImportError: for a ``.safetensors`` file when ``safetensors`` is not installed.
    """
    path = Path(path)
    suffix = _checkpoint_suffix(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} does not exist, cannot write {path.name}")
    if isinstance(state_dict_or_module, nn.Module):
        state_dict = state_dict_or_module.state_dict()
    else:
        state_dict = state_dict_or_module
    not_tensors = [str(k) for k, v in state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(
            f"cannot save to {path}: {len(not_tensors)} entry(ies) are not tensors under string keys: "
            f"{_first_names(not_tensors)}"
        )
    tensors = {k: v.detach() for k, v in state_dict.items()}

    if suffix == SAFETENSORS_SUFFIX:
        # safetensors refuses non-contiguous tensors and tensors that share memory (tied weights, views).
        seen: set[tuple[torch.device, int]] = set()
        for k, v in tensors.items():
            v = v.contiguous()
            ptr = (v.device, v.untyped_storage().data_ptr())
            if v.numel() and ptr in seen:
                v = v.clone()
            seen.add(ptr)
            tensors[k] = v
        payload = safetensors_torch.save(tensors)

    with atomic_write(path, "wb") as f:
        if suffix == SAFETENSORS_SUFFIX:
            f.write(payload)
        else:
            torch.save(tensors, f)

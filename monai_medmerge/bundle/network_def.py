"""Turn the ways users give an architecture (a config file, a bundle config, a mapping) into one plain config."""

from __future__ import annotations

import copy
import functools
import importlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser
from monai.bundle.config_item import ComponentLocator, ConfigItem
from torch import nn

from monai_medmerge.safe_config import read_config_file

__all__ = ["resolve_network_def"]

CONFIG_SUFFIXES = (".json", ".yaml", ".yml")
# keys that steer MONAI's instantiation but are no arguments of the network
_DROPPED_KEYS = ("_requires_", "_desc_")


def resolve_network_def(
    network_def: Mapping[str, Any] | str | os.PathLike | functools.partial, network_def_id: str = "network_def"
) -> dict[str, Any]:
    """A plain network config: ``{"_target_": <full dotted path>, <argument>: <plain value>, ...}``.

    References (``"@num_classes"``) and expressions (``"$2 * @width"``) are resolved to their values with MONAI's
    ``ConfigParser`` (``get_parsed_content(..., instantiate=False)``), so the result can be written into a bundle that
    holds no other ids; a short ``_target_`` (``"ResNet"``) becomes its full dotted path. The result holds literals
    only (no expression, no reference), so the exported bundle's ``network_def`` runs no code of its own.

    Evaluating expressions runs code: this is for the user's own configs (the training bundle's, or a file given to
    ``medmerge export``), as ``python -m monai.bundle run`` would run them. A config from elsewhere (a downloaded
    source bundle) is read as data with :func:`monai_medmerge.safe_config.read_network_def` instead; its result can
    be given here.

    Args:
        network_def: one of
            - a mapping with ``_target_`` (the network's config; it may refer to nothing outside itself),
            - a mapping without ``_target_``: a whole bundle config, whose id ``network_def_id`` is taken,
            - a ``.json``/``.yaml``/``.yml`` file holding either of those (``metadata.json`` beside a bundle config
              is read too, for ``@_meta_#...`` references),
            - a ``functools.partial`` of a network class, as MONAI builds for a config with ``_mode_: callable``.
        network_def_id: the id of the network in a whole bundle config.

    Returns:
        the config, made of dicts, lists, strings, numbers, booleans and ``None`` only.

    Raises:
        FileNotFoundError: when a file is given that does not exist.
        ValueError: for an unsupported suffix or an unreadable file; when a bundle config lacks ``network_def_id``; when
            a reference or expression cannot be resolved; when a value resolves to an object that a config file
            cannot hold (a class, a tensor); when ``_target_`` is unknown or ambiguous. Each message names the file
            or the field.
    """
    if isinstance(network_def, nn.Module):
        raise ValueError(
            f"network_def is a built {type(network_def).__name__} network; give its config instead (a mapping with "
            "'_target_', or a config file), so that the exported bundle can rebuild it"
        )
    if isinstance(network_def, functools.partial):
        if network_def.args:
            raise ValueError(f"network_def {network_def!r} has positional arguments; give them by name")
        func = network_def.func
        config: dict[str, Any] = {"_target_": f"{func.__module__}.{func.__qualname__}", **network_def.keywords}
        return _finish(config, origin=f"network_def {func.__qualname__}")
    meta_file = None
    if isinstance(network_def, str | os.PathLike):
        path = Path(network_def)
        if path.suffix.lower() not in CONFIG_SUFFIXES:
            raise ValueError(f"network_def file {path} must end with one of {', '.join(CONFIG_SUFFIXES)}")
        if not path.is_file():
            raise FileNotFoundError(f"network_def file not found: {path}")
        content = read_config_file(path, what="network_def file")
        origin = f"network_def file {path}"
        if (path.parent / "metadata.json").is_file() and "_target_" not in content:
            meta_file = path.parent / "metadata.json"
    elif isinstance(network_def, Mapping):
        content, origin = network_def, "network_def"
    else:
        raise ValueError(
            f"network_def is a {type(network_def).__name__}; give a mapping with '_target_', a bundle config mapping "
            "or file, or a functools.partial of a network class"
        )

    if "_target_" in content:
        config, item_id = {"network_def": copy.deepcopy(dict(content))}, "network_def"
    elif network_def_id in content:
        config, item_id = copy.deepcopy(dict(content)), network_def_id
        origin = f"{origin}, id '{network_def_id}'"
    else:
        raise ValueError(f"{origin} has neither '_target_' nor an id '{network_def_id}'")
    parser = ConfigParser(config)
    if meta_file is not None:
        parser.read_meta(meta_file)
    try:
        parsed = parser.get_parsed_content(item_id, instantiate=False)
    except Exception as e:
        raise ValueError(f"could not resolve {origin}: {type(e).__name__}: {e}") from e
    if isinstance(parsed, nn.Module):
        raise ValueError(
            f"{origin} is an expression that builds a {type(parsed).__name__}; give the network as a '_target_' "
            'mapping (e.g. network_def: "$dict(_target_=@network_target, **@network_args)" when called from a '
            "config)"
        )
    top = _plain(parsed, origin, "")
    if not isinstance(top, dict) or "_target_" not in top:
        raise ValueError(f"{origin} resolved to {top!r}, not a mapping with '_target_'")
    return _finish(top, origin)


def _finish(config: dict[str, Any], origin: str) -> dict[str, Any]:
    config = _plain(config, origin, "")
    if config.get("_disabled_") in (True, "true", "True"):
        raise ValueError(f"{origin} is disabled ('_disabled_'), so no network can be built from it")
    config.pop("_disabled_", None)
    config.pop("_mode_", None)  # the exported bundle must build the network, not a partial of it
    config["_target_"] = _full_target(config["_target_"], origin)
    return config


def _plain(value: Any, origin: str, field: str) -> Any:
    """``value`` made of plain containers and scalars; anything else is an error naming ``field``."""
    if isinstance(value, ConfigItem):
        value = value.get_config()
    if isinstance(value, Mapping):
        return {
            str(k): _plain(v, origin, f"{field}#{k}" if field else str(k))
            for k, v in value.items()
            if k not in _DROPPED_KEYS
        }
    if isinstance(value, list | tuple):
        return [_plain(v, origin, f"{field}#{i}") for i, v in enumerate(value)]
    if isinstance(value, str):
        if value.startswith(("@", "%")):
            raise ValueError(f"{origin}: field '{field}' is the unresolved reference {value!r}")
        if value.startswith("$"):
            # an exported bundle's network_def is data: MONAI would run this string as code when it loads the bundle
            raise ValueError(f"{origin}: field '{field}' resolved to the expression {value!r}; give a plain value")
        return value
    if value is None or isinstance(value, bool | int | float):
        return value
    raise ValueError(
        f"{origin}: field '{field}' resolved to a {type(value).__name__} ({value!r}), which a bundle config cannot "
        "hold; write it as a plain value (e.g. the name 'relu' rather than a class)"
    )


def _full_target(target: Any, origin: str) -> str:
    if not isinstance(target, str) or not target:
        raise ValueError(f"{origin}: '_target_' must be a class name or dotted path, got {target!r}")
    if "." in target:
        return target
    module = ComponentLocator().get_component_module_name(target)
    if module is None:
        raise ValueError(f"{origin}: '_target_' {target!r} is no MONAI component; give its full dotted path")
    if isinstance(module, list):
        raise ValueError(
            f"{origin}: '_target_' {target!r} is ambiguous ({', '.join(module)}); give its full dotted path"
        )
    # the shortest public path, as users write it: monai.networks.nets.ResNet rather than ...nets.resnet.ResNet
    obj = getattr(importlib.import_module(module), target)
    parts = module.split(".")
    for i in range(1, len(parts)):
        package = ".".join(parts[:i])
        if getattr(importlib.import_module(package), target, None) is obj:
            return f"{package}.{target}"
    return f"{module}.{target}"

"""Read a network from a MONAI config that someone else wrote, as data: no expression runs, only network classes build.

MONAI's ``ConfigParser`` evaluates ``$`` expressions and instantiates any ``_target_``, so parsing a downloaded bundle's
config runs whatever its author wrote. A source bundle's ``network_def`` is read here instead: its ``_target_`` must be
a network class (or network factory) of an allowed module, its arguments literal values; references ``@id`` are
followed only to literals. Anything else raises :class:`UntrustedConfigError`, which names the config, the id and the
value, and says how to opt in for a config the user trusts.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from monai.bundle import ConfigParser
from monai.bundle.config_item import ComponentLocator
from monai.bundle.utils import EXPR_KEY, ID_REF_KEY, ID_SEP_KEY, MACRO_KEY
from torch import nn

__all__ = [
    "ALLOWED_TARGET_MODULES",
    "UntrustedConfigError",
    "build_network_def",
    "read_config_file",
    "read_network_def",
]

# Packages whose network classes (nn.Module subclasses) and network factory functions a config may name.
ALLOWED_TARGET_MODULES = ("monai.networks.nets", "torch.nn", "torchvision.models")
# Functions of those packages that are helpers, not network factories (MONAI's get_pretrained_resnet_medicalnet
# downloads weights; torchvision's get_weight, list_models, ...).
_HELPER_PREFIXES = ("get_", "list_", "load_")
# Arguments that make a constructor download or read files (weights from a URL, a hub or a path). The weights of a
# source come from its own checkpoint, so these must be off; a URL could also point to a pickle that runs code.
_FETCH_ARGUMENTS = frozenset(
    {"weights", "weights_backbone", "url", "path_or_repo_id", "filename", "cache_dir", "model_dir"}
)
# Keys of a MONAI component that are no arguments of the callable.
_COMPONENT_KEYS = ("_target_", "_desc_", "_requires_", "_mode_", "_disabled_")


class UntrustedConfigError(ValueError):
    """A config read as data holds something that would run code: an expression, a macro that reads another file,
    a ``_target_`` outside :data:`ALLOWED_TARGET_MODULES`, or a reference to something that is not a literal."""


def read_config_file(path: str | os.PathLike, what: str = "config") -> dict[str, Any]:
    """The ids of a JSON or YAML config file, as data (``json.load``, a YAML safe loader: no tag builds an object).

    Raises:
        ValueError: when the file cannot be read or parsed, or holds something other than a mapping; the message
            names ``what`` and the file.
    """
    try:
        content = ConfigParser.load_config_file(path)
    except Exception as e:
        raise ValueError(f"could not read {what} {path}: {type(e).__name__}: {e}") from e
    if not isinstance(content, Mapping):
        raise ValueError(f"{what} {path} holds a {type(content).__name__}, not a mapping")
    return dict(content)


def read_network_def(
    config: Mapping[str, Any],
    network_def_id: str = "network_def",
    *,
    meta: Mapping[str, Any] | None = None,
    values: Mapping[str, Any] | None = None,
    origin: str = "config",
    hint: str = "",
) -> dict[str, Any]:
    """The network config at ``network_def_id`` of ``config``, read as data and checked, with references resolved.

    Nothing is evaluated or imported beyond the modules of the allowed ``_target_``\\ s. Allowed:

    - a ``_target_`` naming a class derived from ``torch.nn.Module``, or a network factory function, of
      ``monai.networks.nets``, ``torch.nn`` or ``torchvision.models`` (a full dotted path, or a short MONAI name);
    - arguments that are numbers, strings, booleans, ``None``, lists and mappings of those, or nested components that
      follow the same rules;
    - references ``@id`` (also ``@_meta_#...`` into ``meta``, and relative ``@#id``) and same-file macros ``%id`` to
      ids that hold such literals, followed recursively.

    Refused with :class:`UntrustedConfigError`: ``$`` expressions, ``%`` macros that name another file, references to
    ids that hold a component or an expression, ``_target_``\\ s outside the list, a ``_mode_`` other than
    ``"default"``, and arguments that would download or read weights (``pretrained`` and ``pretrained_*``,
    ``weights``, ``url``, ...) unless they are off (also when their default is on).

    Args:
        config: the whole config, as read from its JSON/YAML file.
        network_def_id: the id of the network (``#`` or ``::`` separate nested ids).
        meta: the bundle's ``metadata.json`` content, for ``@_meta_#...`` references.
        values: ids whose values replace the config's (e.g. ``{"bundle_root": "/path/to/bundle"}``).
        origin: names the config in messages, e.g. ``"source bundle /data/a: configs/inference.json"``.
        hint: appended to the message of a refusal: how to opt in for a trusted config.

    Returns:
        the network's config: a mapping with a full dotted ``_target_``, made of literals and nested components.

    Raises:
        UntrustedConfigError: for anything the list above refuses; the message names ``origin``, the id and the value.
        ValueError: when an id is missing, a reference points nowhere or loops, or the network is ``_disabled_``.
    """
    root = dict(config)
    if meta is not None:
        root["_meta_"] = dict(meta)
    root.update(values or {})
    reader = _Reader(root, origin, hint)
    item_id = _normalize(network_def_id)
    node = reader.lookup(item_id, f"the network id {_shown(item_id)!r}")
    network_def = reader.read(node, item_id, components=True, via=())
    if not isinstance(network_def, Mapping) or "_target_" not in network_def:
        reader.refuse(item_id, node, "is not a network config (a mapping with '_target_')")
    return network_def


def build_network_def(network_def: Mapping[str, Any], origin: str = "network_def") -> nn.Module:
    """Build the network of a config returned by :func:`read_network_def` (nested components first).

    Raises:
        UntrustedConfigError: when a ``_target_`` is outside :data:`ALLOWED_TARGET_MODULES` (the config was not read
            with :func:`read_network_def`).
        ValueError: when a constructor fails (the message names its ``_target_`` and the error) or the result is
            not an ``nn.Module``.
    """

    def build(value: Any, item_id: str) -> Any:
        if isinstance(value, Mapping) and "_target_" in value:

            def refuse(why: str) -> NoReturn:
                raise _refusal(origin, f"{item_id}{ID_SEP_KEY}_target_", value["_target_"], why)

            target = _allowed_callable(value["_target_"], refuse)
            kwargs = {k: build(v, f"{item_id}{ID_SEP_KEY}{k}") for k, v in value.items() if k not in _COMPONENT_KEYS}
            try:
                return target(**kwargs)
            except Exception as e:
                raise ValueError(
                    f"{origin}: could not build id {_shown(item_id)!r} ({value['_target_']}): {type(e).__name__}: {e}"
                ) from e
        if isinstance(value, Mapping):
            return {k: build(v, f"{item_id}{ID_SEP_KEY}{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [build(v, f"{item_id}{ID_SEP_KEY}{i}") for i, v in enumerate(value)]
        return value

    net = build(network_def, "network_def")
    if not isinstance(net, nn.Module):
        target = network_def.get("_target_")
        raise ValueError(f"{origin}: network_def {target} built a {type(net).__name__}, not a network")
    return net


class _Reader:
    """Walks one config: ``read`` returns a value with references resolved, refusing what could run code."""

    def __init__(self, root: dict[str, Any], origin: str, hint: str) -> None:
        self.root, self.origin, self.hint = root, origin, hint

    def refuse(self, item_id: str, value: Any, why: str, via: tuple[str, ...] = ()) -> NoReturn:
        raise _refusal(self.origin, item_id, value, why, via, self.hint)

    def lookup(self, item_id: str, what: str) -> Any:
        node: Any = self.root
        for part in item_id.split(ID_SEP_KEY) if item_id else []:
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise ValueError(f"{self.origin}: {what} names id {_shown(item_id)!r}, which the config does not have")
        return node

    def read(self, value: Any, item_id: str, components: bool, via: tuple[str, ...]) -> Any:
        if isinstance(value, str):
            return self._string(value, item_id, components, via)
        if isinstance(value, bool | int | float) or value is None:
            return value
        if isinstance(value, Mapping):
            if "_target_" in value:
                if not components:
                    self.refuse(item_id, dict(value), "builds an object, which a reference may not point to", via)
                return self._component(value, item_id, via)
            return {str(k): self.read(v, f"{item_id}{ID_SEP_KEY}{k}", components, via) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.read(v, f"{item_id}{ID_SEP_KEY}{i}", components, via) for i, v in enumerate(value)]
        self.refuse(item_id, value, f"is a {type(value).__name__}, not a literal", via)

    def _string(self, value: str, item_id: str, components: bool, via: tuple[str, ...]) -> Any:
        if value.startswith(EXPR_KEY):
            self.refuse(item_id, value, "is a Python expression, which would run as code", via)
        if not value.startswith((ID_REF_KEY, MACRO_KEY)):
            return value
        resolved = ConfigParser.resolve_relative_ids(item_id, _normalize(value))
        if value.startswith(MACRO_KEY):
            path, ref_id = ConfigParser.split_path_id(resolved[len(MACRO_KEY) :])
            if path:
                self.refuse(item_id, value, f"is a macro that reads another file ({path})", via)
        else:
            ref_id = _normalize(resolved[len(ID_REF_KEY) :])
        if ref_id in via:
            loop = " -> ".join(_shown(i) for i in (*via, item_id, ref_id))
            raise ValueError(f"{self.origin}: the references loop: {loop}")
        target = self.lookup(ref_id, f"id {_shown(item_id)!r} ({value!r})")
        # a macro copies the config in place (as MONAI does); a reference must hold a literal
        return self.read(target, ref_id, components and value.startswith(MACRO_KEY), (*via, item_id))

    def _component(self, value: Mapping[str, Any], item_id: str, via: tuple[str, ...]) -> dict[str, Any]:
        raw_target = value["_target_"]
        target = self.read(raw_target, f"{item_id}{ID_SEP_KEY}_target_", False, via)
        if not isinstance(target, str) or not target:
            self.refuse(item_id, raw_target, "is no class name or dotted path in '_target_'", via)
        full = _full_target(target, lambda why: self.refuse(f"{item_id}{ID_SEP_KEY}_target_", target, why, via))
        factory = _allowed_callable(full, lambda why: self.refuse(f"{item_id}{ID_SEP_KEY}_target_", target, why, via))
        out: dict[str, Any] = {"_target_": full}
        for key, v in value.items():
            if key in ("_target_", "_desc_"):
                continue
            sub_id = f"{item_id}{ID_SEP_KEY}{key}"
            if key == "_requires_":
                self.read(v, sub_id, False, via)  # only checked: it orders evaluation, which nothing here needs
            elif key == "_mode_":
                if self.read(v, sub_id, False, via) != "default":
                    self.refuse(sub_id, v, "asks for a mode other than 'default' (a partial or a debugger)", via)
            elif key == "_disabled_":
                disabled = self.read(v, sub_id, False, via)  # as MONAI reads it: "true" in any case, or truthy
                if disabled.strip().lower() == "true" if isinstance(disabled, str) else bool(disabled):
                    raise ValueError(f"{self.origin}: id {_shown(item_id)!r} is disabled ('_disabled_')")
            else:
                out[str(key)] = self.read(v, sub_id, True, via)
        for name, default in _fetch_arguments(factory):
            given = name in out
            if given and out[name] not in (None, False, "", 0):
                self.refuse(f"{item_id}{ID_SEP_KEY}{name}", out[name], _FETCH_REASON, via)
            if not given and default not in (None, False, "", 0, inspect.Parameter.empty):
                self.refuse(f"{item_id}{ID_SEP_KEY}{name}", default, f"(the default of {full}) {_FETCH_REASON}", via)
        return out


_FETCH_REASON = (
    "would download or read weights when the network is built; a source's weights come from its own checkpoint, "
    "so set it to false/null"
)


def _fetch_arguments(factory: Callable) -> list[tuple[str, Any]]:
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return []
    return [(n, p.default) for n, p in parameters.items() if n in _FETCH_ARGUMENTS or n.startswith("pretrained")]


def _full_target(target: str, refuse: Callable[[str], NoReturn]) -> str:
    if "." in target:
        return target
    module = ComponentLocator().get_component_module_name(target)
    if module is None:
        refuse("is no MONAI component name; give the full dotted path")
    if isinstance(module, list):
        refuse(f"is ambiguous ({', '.join(module)}); give the full dotted path")
    return f"{module}.{target}"


def _within_allowed(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in ALLOWED_TARGET_MODULES)


def _allowed_callable(target: str, refuse: Callable[[str], NoReturn]) -> Callable:
    """The class or function ``target`` names, once it is known to be a network of an allowed module."""
    allowed = ", ".join(ALLOWED_TARGET_MODULES)
    parts = target.split(".")
    if not all(p.isidentifier() and not p.startswith("_") for p in parts) or not _within_allowed(target):
        refuse(f"is outside the allowed network modules ({allowed})")
    module_name, name = ".".join(parts[:-1]), parts[-1]
    if not _within_allowed(module_name):
        refuse(f"is outside the allowed network modules ({allowed})")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        refuse(f"cannot be imported here ({e})")
    obj = getattr(module, name, None)
    # defined in an allowed module too: a name those modules import from elsewhere is not on the list
    is_network = inspect.isclass(obj) and issubclass(obj, nn.Module)
    is_factory = inspect.isfunction(obj) and not name.startswith(_HELPER_PREFIXES)
    if not (is_network or is_factory) or not _within_allowed(getattr(obj, "__module__", None) or ""):
        refuse(f"is no network class or network factory of {module_name}")
    return obj


def _normalize(item_id: str) -> str:
    return str(item_id).replace("#", ID_SEP_KEY)


def _shown(item_id: str) -> str:
    """Ids as this project's configs write them (``train#trainer``)."""
    return item_id.replace(ID_SEP_KEY, "#")


def _refusal(
    origin: str, item_id: str, value: Any, why: str, via: tuple[str, ...] = (), hint: str = ""
) -> UntrustedConfigError:
    shown = repr(value) if len(repr(value)) <= 200 else repr(value)[:200] + "..."
    reached = f" (reached from {' -> '.join(repr(_shown(v)) for v in via)})" if via else ""
    allowed = ", ".join(ALLOWED_TARGET_MODULES)
    return UntrustedConfigError(
        f"{origin}: id {_shown(item_id)!r}{reached} holds {shown}: it {why}. The config is read as data: a "
        f"'_target_' network of {allowed} with literal arguments, and references to literals only.{hint}"
    )

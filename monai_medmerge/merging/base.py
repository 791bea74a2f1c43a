"""The merge-method interface and its registry: each method is one small class; the merge loop knows none of them."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from monai_medmerge.merging.alignment import align_sources
from monai_medmerge.networks import KernelMerge

__all__ = ["MergeMethod", "MethodParameter", "register_method", "get_method", "list_methods", "METHODS"]


@dataclass(frozen=True)
class MethodParameter:
    """A declared setting of a merge method: its name, default and a one-line description."""

    name: str
    default: Any
    doc: str


COMMON_PARAMETERS = (
    MethodParameter("align", False, "permute each source's channels onto the anchor's first (weight matching)"),
    MethodParameter("matching", "weights", "how to align: 'weights' (no data) or 'activations' (needs align_data)"),
)


class MergeMethod(ABC):
    """Base of the merge methods.

    A method turns N compatible sources into a :class:`~monai_medmerge.networks.KernelMerge` whose coefficients
    are either fixed (``learned = False``: collapse it right away) or to be learned on target data
    (``learned = True``). Subclasses set ``name``, ``pretty_name``, ``reference``, ``learned`` and ``parameters``
    and implement :meth:`_build` (the public :meth:`build` aligns first when asked, then calls it); settings are
    checked at construction.

    Args:
        settings: values for the declared ``parameters``; undeclared names raise ``ValueError``.
    """

    name: ClassVar[str] = ""
    pretty_name: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    learned: ClassVar[bool] = False
    parameters: ClassVar[tuple[MethodParameter, ...]] = ()

    def __init__(self, **settings: Any) -> None:
        known = {p.name: p.default for p in (*self.parameters, *COMMON_PARAMETERS)}
        unknown = sorted(set(settings) - set(known))
        if unknown:
            raise ValueError(
                f"merge method {self.name!r} has no setting(s) {unknown}; its settings are {sorted(known) or 'none'}."
            )
        self.settings: dict[str, Any] = {**known, **settings}

    def build(
        self,
        sources: Sequence[nn.Module],
        head: str | None = None,
        out_channels: int | None = None,
        example_input: torch.Tensor | None = None,
        align_data: Iterable | None = None,
    ) -> KernelMerge:
        """Wrap ``sources`` in a :class:`KernelMerge` set up for this method (``head``/``out_channels`` as there).

        With ``align=True`` the sources are first aligned onto the anchor (or source 0) by weight matching, or by
        activation matching on ``align_data`` when ``matching="activations"``
        (:func:`~monai_medmerge.merging.alignment.align_sources`, which also receives ``example_input``); the given
        modules are not modified.
        """
        if self.settings["align"]:
            anchor = self.settings.get("anchor")
            sources = align_sources(
                sources,
                anchor=0 if anchor is None else anchor,
                example_input=example_input,
                matching=self.settings["matching"],
                data=align_data,
            )
        if head == "auto" and len(sources) and isinstance(sources[0], nn.Module):
            # resolved here, with the caller's example input (a method's _build sees a plain module name)
            from monai_medmerge.networks.heads import find_head

            head = find_head(sources[0], example_input)
        return self._build(sources, head, out_channels)

    @abstractmethod
    def _build(self, sources: Sequence[nn.Module], head: str | None, out_channels: int | None) -> KernelMerge:
        """The method's own :class:`KernelMerge` over (possibly aligned) ``sources``."""

    def merge(
        self, sources: Sequence[nn.Module], head: str | None = None, out_channels: int | None = None
    ) -> nn.Module:
        """Merge straight into a plain network. Only for methods with fixed coefficients (``learned = False``).

        Raises:
            ValueError: for a learned method, whose coefficients need training first (use :meth:`build`).
        """
        if self.learned:
            raise ValueError(f"merge method {self.name!r} learns its coefficients: build() it and train it first.")
        return self.build(sources, head=head, out_channels=out_channels).collapse()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"{type(self).__name__}({args})"


METHODS: dict[str, type[MergeMethod]] = {}


def register_method(cls: type[MergeMethod]) -> type[MergeMethod]:
    """Class decorator: add a merge method to the registry under ``cls.name``.

    Raises:
        ValueError: when the name is empty or already taken by another class.
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name.")
    if METHODS.get(cls.name, cls) is not cls:
        raise ValueError(f"merge method name {cls.name!r} is already registered by {METHODS[cls.name].__name__}.")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str, **settings: Any) -> MergeMethod:
    """Instantiate the registered merge method ``name`` with ``settings``.

    Raises:
        ValueError: for an unknown name (the message lists the registered ones) or unknown settings.
    """
    if name not in METHODS:
        raise ValueError(f"unknown merge method {name!r}; available: {sorted(METHODS)}.")
    return METHODS[name](**settings)


def list_methods() -> list[dict[str, Any]]:
    """One record per registered method: name, pretty name, reference, learned, and its parameters with defaults."""
    return [
        {
            "name": cls.name,
            "pretty_name": cls.pretty_name,
            "reference": cls.reference,
            "learned": cls.learned,
            "parameters": {p.name: {"default": p.default, "doc": p.doc} for p in (*cls.parameters, *COMMON_PARAMETERS)},
        }
        for cls in METHODS.values()
    ]

"""Errors a person can read: one final line that names the file or item and says what to do, not a traceback.

MONAI wraps every error raised inside a bundle config in ``RuntimeError: Failed to evaluate ConfigExpression`` (and
``Compose`` in ``RuntimeError: applying transform``), so the line that names the culprit ends up in the middle of a
long traceback. :func:`user_error` finds the user's error inside such a chain; the ``medmerge`` command and the
bundles (through :func:`install_excepthook`, called from their ``initialize``) print it as one line. Setting
``MEDMERGE_DEBUG=1`` shows the whole traceback instead; errors that are not the user's to fix (bugs) always show it.
"""

from __future__ import annotations

import os
import sys
import traceback
from types import TracebackType

from monai_medmerge.data.transforms import BadImageError

__all__ = ["DEBUG_ENV", "describe", "install_excepthook", "is_debug", "user_error"]

DEBUG_ENV = "MEDMERGE_DEBUG"
# what a person can do about an error of these types, after its own message
_HINTS = {
    BadImageError: "set skip_bad: true (--skip_bad True) to leave unreadable images out and list them in a report",
}


def is_debug() -> bool:
    """Whether ``MEDMERGE_DEBUG`` asks for tracebacks."""
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _chain(error: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while error is not None and all(error is not e for e in seen):
        seen.append(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return seen


def _is_users(error: BaseException) -> bool:
    return isinstance(error, (OSError, ValueError)) or type(error).__module__.startswith("monai_medmerge")


def user_error(error: BaseException) -> BaseException | None:
    """The error in ``error``'s chain (causes and contexts) that is the user's to fix, or ``None`` for a bug.

    A :class:`~monai_medmerge.data.transforms.BadImageError` wins (it names the image); then the outermost error of
    this package's own types; then the outermost ``OSError`` or ``ValueError``: the one raised closest to what the
    user asked for (an error this package raises from a library's error says more than the library's own).
    """
    chain = _chain(error)
    for wanted in (
        lambda e: isinstance(e, BadImageError),
        lambda e: type(e).__module__.startswith("monai_medmerge"),
        _is_users,
    ):
        found = [e for e in chain if wanted(e)]
        if found:
            return found[0]
    return None


def describe(error: BaseException) -> str:
    """One line for ``error`` (a user error): its message's first line, what to do, and how to see more."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    text = lines[0]
    hint = next((h for t, h in _HINTS.items() if isinstance(error, t)), "")
    more = f"; {hint}" if hint else ""
    return f"{text}{more} (details: {DEBUG_ENV}=1)"


def _hook(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    found = None if is_debug() else user_error(error)
    if found is None:
        traceback.print_exception(kind, error, tb)
        return
    print(f"error: {describe(found)}", file=sys.stderr)


def install_excepthook() -> None:
    """Print an uncaught user error of this process as one line ``error: ...`` on stderr (see :func:`user_error`).

    The bundles call it in ``initialize``, so that ``python -m monai.bundle run`` ends a failed run with the line
    that names the culprit. The exit status stays 1; ``MEDMERGE_DEBUG=1`` prints the traceback as usual.
    """
    sys.excepthook = _hook

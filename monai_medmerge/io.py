"""Writing files and folders so that a reader never sees half of one: write under a temporary name, then rename.

Every file the package writes (checkpoints, reports, datalists, pictures, configs) goes through :func:`atomic_write`
or one of its shorthands, so a crash or a kill leaves either the old file or the complete new one. Every folder it
writes as a whole (exported bundles, example workspaces, materialized DICOM series) goes through
:func:`atomic_folder`, which replaces exactly the folder it is given and nothing else.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_folder",
    "atomic_write",
    "check_folder_target",
    "output_folder",
    "write_bytes",
    "write_json",
    "write_text",
]

PathLike = str | os.PathLike[str]

logger = logging.getLogger(__name__)

# Suffixes of the temporary names beside a target folder: unique (mkdtemp), hidden, and named for what they are.
_TMP_SUFFIX = ".medmerge-tmp"
_OLD_SUFFIX = ".medmerge-old"


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_write(
    path: PathLike,
    mode: str = "wb",
    fsync: bool = True,
    *,
    permissions: int | None = None,
    tmp_dir: PathLike | None = None,
    **open_kwargs: Any,
) -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path`` in one rename.

    The folder of ``path`` is created when missing. On an error the temporary file is removed and ``path`` keeps
    what it held before. The new file gets the permissions a plain ``open`` would give it (the process umask), not
    the owner-only mode of ``tempfile``, unless ``permissions`` says otherwise.

    Args:
        path: the file to write.
        mode: ``"wb"`` (bytes) or ``"w"`` (text; pass ``encoding``).
        fsync: flush the data to disk before the rename, so that a crash right after it cannot leave an empty file
            under the final name.
        permissions: the new file's mode bits (e.g. ``0o600`` for a private cache); None: ``0o666`` less the umask.
        tmp_dir: where the temporary file is made instead of beside ``path`` (it must be on the same file system),
            for folders that must never hold a partial file, not even under a hidden name.
        open_kwargs: more arguments for ``open`` (for example ``encoding="utf-8"``).

    Yields:
        the open temporary file.

    Raises:
        ValueError: for a mode that does not write a new file.
        IsADirectoryError: when ``path`` is an existing folder.
    """
    if mode not in ("w", "wb", "wt"):
        raise ValueError(f"atomic_write writes a whole new file: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; expected a file path to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if tmp_dir is None else tmp_dir
    )
    tmp = Path(tmp_name)
    try:
        os.chmod(fd, (0o666 & ~_umask()) if permissions is None else permissions)
        with os.fdopen(fd, mode, **open_kwargs) as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: PathLike, data: bytes, *, permissions: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path. ``permissions`` as for :func:`atomic_write`."""
    with atomic_write(path, "wb", permissions=permissions) as f:
        f.write(data)
    return Path(path).expanduser()


def write_text(path: PathLike, text: str, encoding: str = "utf-8", *, permissions: int | None = None) -> Path:
    """Write ``text`` to ``path`` atomically; returns the path. ``permissions`` as for :func:`atomic_write`."""
    with atomic_write(path, "w", encoding=encoding, permissions=permissions) as f:
        f.write(text)
    return Path(path).expanduser()


def write_json(
    path: PathLike, data: Any, indent: int | None = 2, *, permissions: int | None = None, **dump_kwargs: Any
) -> Path:
    """Write ``data`` as JSON (with a final newline) to ``path`` atomically; returns the path.

    The JSON text is made before the file is opened, so data that cannot be serialised leaves ``path`` untouched.
    ``permissions`` as for :func:`atomic_write`.
    """
    return write_text(path, json.dumps(data, indent=indent, **dump_kwargs) + "\n", permissions=permissions)


def _named_inputs(inputs: Mapping[str, Any] | Sequence[Any]) -> list[tuple[str, Path]]:
    items = inputs.items() if isinstance(inputs, Mapping) else (("input", p) for p in inputs)
    named = []
    for name, value in items:
        if value is None or not isinstance(value, (str, os.PathLike)):
            continue  # an input given as data (a config mapping), not as a file
        named.append((name, Path(value).expanduser().resolve()))
    return named


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing place at or above ``path`` when it is not a folder (a folder cannot be made there)."""
    for place in (path, *path.parents):
        if place.exists():
            return None if place.is_dir() else place
    return None


def output_folder(path: PathLike, what: str = "output folder") -> Path:
    """``path`` made (with its parents) as a folder to write into, as ``mkdir -p`` would, but with an error that
    names the file in the way where ``path`` or a folder above it is a file (``mkdir`` says only "File exists").

    Raises:
        NotADirectoryError: when ``path`` or a folder above it is a file; nothing is created.
    """
    folder = Path(path).expanduser()
    blocked = _file_in_the_way(folder)
    if blocked == folder:
        raise NotADirectoryError(f"the {what} {folder} is a file, not a folder: give another path")
    if blocked is not None:
        raise NotADirectoryError(f"cannot make the {what} {folder}: {blocked} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def check_folder_target(
    target: PathLike,
    overwrite: bool = False,
    inputs: Mapping[str, Any] | Sequence[Any] = (),
    what: str = "folder",
) -> Path:
    """Check that ``target`` may be written as a whole folder, before any work is done; returns it as an absolute
    path (symbolic links above it resolved, ``target`` itself not followed).

    Args:
        target: the folder to create or replace.
        overwrite: whether an existing folder may be replaced.
        inputs: the files and folders the new folder is made from (name -> path, or paths); entries that are not
            paths (a config given as a mapping) are ignored.
        what: how messages name the folder (``"bundle folder"``).

    Raises:
        ValueError: when ``target`` is or contains one of ``inputs``, or would replace a folder that is or contains
            the current folder.
        NotADirectoryError: when ``target`` (or a folder above it) is a file, or ``target`` is a symbolic link.
        FileExistsError: when ``target`` exists and ``overwrite`` is False.
    """
    given = Path(target).expanduser()
    if given.name in ("", ".", ".."):
        given = given.resolve()
    path = given.parent.resolve() / given.name
    for name, value in _named_inputs(inputs):
        if value == path or path in value.parents:
            relation = "is" if value == path else "contains"
            raise ValueError(
                f"{what} {path} {relation} the {name} {value}: writing it would remove its own input; "
                "choose another output folder"
            )
    above = _file_in_the_way(path.parent)
    if above is not None:
        raise NotADirectoryError(f"cannot write {what} {path}: {above} is a file, not a folder")
    if path.is_symlink():
        raise NotADirectoryError(
            f"{what} {path} is a symbolic link; give the folder itself, so that it is clear which one is replaced"
        )
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"{what} {path} is a file, not a folder; it is left as it is: choose another path")
        if not overwrite:
            raise FileExistsError(f"{what} {path} exists; pass overwrite=True (--overwrite) to replace it")
        cwd = Path.cwd().resolve()
        if cwd == path or path in cwd.parents:
            relation = "is" if cwd == path else "contains"
            raise ValueError(f"{what} {path} {relation} the current folder; it is not replaced: choose another one")
    return path


@contextlib.contextmanager
def atomic_folder(
    target: PathLike,
    overwrite: bool = False,
    inputs: Mapping[str, Any] | Sequence[Any] = (),
    what: str = "folder",
) -> Iterator[Path]:
    """Build a folder under a temporary name beside ``target``; on success it takes ``target``'s place.

    The temporary folder is made with :func:`tempfile.mkdtemp` (a new, unique, hidden name: it cannot be a folder of
    the user's) and given the permissions a plain ``mkdir`` would give it (``0o777`` less the umask), not mkdtemp's
    owner-only mode. When the body of the ``with`` succeeds and ``target`` exists (and ``overwrite`` allows it), the
    old folder is moved into another new unique folder, the new one renamed into place, and the old one deleted: no
    other path is touched. On an error, or when the old folder cannot be moved away, the temporary folder is removed
    and ``target`` keeps what it held. A kill during the build leaves a hidden ``.<name>.*.medmerge-tmp`` folder
    beside ``target`` (never ``target`` half written).

    Args:
        target: the folder to create or replace.
        overwrite: replace an existing folder.
        inputs: the files and folders the new folder is made from; see :func:`check_folder_target`.
        what: how messages name the folder (``"bundle folder"``).

    Yields:
        the temporary folder, to fill.

    Raises:
        ValueError, NotADirectoryError, FileExistsError: as :func:`check_folder_target` (at the start, and again
            before the rename for a folder that appeared meanwhile).
        PermissionError: when the folder above ``target`` cannot be written; the message names ``target``.
    """
    path = check_folder_target(target, overwrite, inputs, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=_TMP_SUFFIX, dir=path.parent))
    except OSError as e:
        raise type(e)(f"cannot write {what} {path}: {e.strerror or e} ({e.filename or path.parent})") from None
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if os.path.lexists(path):
            check_folder_target(path, overwrite, inputs, what)  # it may have appeared or changed meanwhile
            old_home = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=_OLD_SUFFIX, dir=path.parent))
            old = old_home / path.name
            try:
                os.rename(path, old)
            except OSError as e:
                old_home.rmdir()
                raise type(e)(f"cannot replace {what} {path}: {e.strerror or e}") from None
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                old_home.rmdir()
                raise
            shutil.rmtree(old_home, ignore_errors=True)
            if old_home.exists():
                logger.warning(
                    "could not delete all of the replaced %s, moved to %s; remove it by hand", what, old_home
                )
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""Paths named by clients (jobs by reference, ``--data-root``): resolved, then confined.

A path in a request is hostile input.  It is joined to the data root, resolved with every
symlink followed (``os.path.realpath``), and refused unless the result is still inside the
root; inputs must be regular files (a FIFO named ``.png`` would block a reader forever).
Workers then open exactly the resolved path.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Any

from .errors import PathRefused


def data_root(path: str) -> Path:
    """The resolved ``--data-root``: an existing folder."""
    root = Path(os.path.realpath(path))
    if not root.is_dir():
        raise PathRefused(f"--data-root {path}: no such folder")
    return root


def inside(root: Path, path: str, what: str) -> Path:
    """``path`` (relative to ``root``, or absolute) resolved, if it stays inside ``root``."""
    if not path or "\0" in path:
        raise PathRefused(f"{what} {path!r}: not a path")
    resolved = os.path.realpath(os.path.join(root, path))
    if os.path.commonpath([root, resolved]) != str(root):
        raise PathRefused(f"{what} {path!r} is outside the server's data root")
    return Path(resolved)


def input_file(root: Path, path: str) -> Path:
    """An input of a by-reference job: resolved, inside the root, a regular readable file."""
    resolved = inside(root, path, "input")
    try:
        mode = os.stat(resolved).st_mode
    except OSError as exc:
        raise PathRefused(f"input {path!r}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):
        raise PathRefused(f"input {path!r} is not a regular file")
    if not os.access(resolved, os.R_OK):
        raise PathRefused(f"input {path!r} is not readable by the server")
    return resolved


def relative(root: Path, path: str | Path) -> str:
    """How a path under the root is named back to the client."""
    return os.path.relpath(path, root)


# -- using the paths: every open is checked again, on the file actually opened ---------------
# The checks above run when a job is accepted; the files are used later, by other processes.
# A symlink swapped in between must not lead outside the root, so every open below is made
# without following a final symlink, and the path the kernel reports for the open file
# (/proc/self/fd/N) must still be inside the root.  Readers and writers that only take paths
# (tifffile, NumPy's memory maps) are given that /proc path: it names the checked file itself.


def open_beneath(root: str, path: str, directory: bool = False) -> int:
    """A file descriptor for ``path``, proven to be inside ``root`` (and a regular file, or with
    ``directory`` a folder); PathRefused otherwise."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | (os.O_DIRECTORY if directory else 0))
    except OSError as exc:
        raise PathRefused(f"{path}: {exc.strerror} (not a plain file under the root)") from None
    try:
        real = os.readlink(f"/proc/self/fd/{fd}")
        if os.path.commonpath([root, real]) != root:
            raise PathRefused(f"{path} now leads outside the server's data root")
        if not directory and not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PathRefused(f"{path} is no longer a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd


def fd_path(fd: int, name: str = "") -> str:
    """The path that names an open file (or, with ``name``, an entry of an open folder)."""
    return f"/proc/self/fd/{fd}" + (f"/{name}" if name else "")


def use_beneath(root: str | None, path: str, use: Any, entry: bool = False) -> Any:
    """``use(path)`` for a reader or writer that takes only paths; under ``root`` it is given
    the checked open file instead (with ``entry``, ``path`` is a new file of a checked folder).
    Without a root (batch mode's plain paths) ``path`` is used as it is."""
    if not root:
        return use(path)
    folder, name = os.path.split(path)
    fd = open_beneath(root, folder if entry else path, directory=entry)
    try:
        return use(fd_path(fd, name) if entry else fd_path(fd))
    finally:
        os.close(fd)


def read_beneath(root: str, path: str) -> bytes:
    """The bytes of a file under ``root`` (see ``open_beneath``)."""
    with os.fdopen(open_beneath(root, path), "rb") as f:
        return f.read()


def write_beneath(root: str, target: str, data: bytes | memoryview) -> None:
    """Write ``target`` under ``root`` atomically: a temporary file in its folder, opened
    through the checked folder itself, then renamed over the target within that folder."""
    folder, name = os.path.split(target)
    dfd = open_beneath(root, folder, directory=True)
    tmp = f".{name[:64]}.{os.getpid()}.part"
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        with os.fdopen(os.open(tmp, flags, 0o666, dir_fd=dfd), "wb") as f:
            f.write(data)
        os.replace(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise
    finally:
        os.close(dfd)


def replace_beneath(root: str, source: str, target: str) -> None:
    """Rename ``source`` to ``target``, both in one folder under ``root``."""
    folder = os.path.dirname(target)
    dfd = open_beneath(root, folder, directory=True)
    try:
        os.replace(
            os.path.basename(source), os.path.basename(target), src_dir_fd=dfd, dst_dir_fd=dfd
        )
    finally:
        os.close(dfd)


def _in_folder(root: str | None, path: str, use: Any) -> Any:
    """``use(folder_fd, name)`` for the entry ``path``: its folder opened (and, under
    ``root``, checked to be inside it), so that ``name`` is resolved in that very folder."""
    folder, name = os.path.split(path)
    dfd = open_beneath(root, folder, directory=True) if root else os.open(
        folder or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
    )  # fmt: skip
    try:
        return use(dfd, name)
    finally:
        os.close(dfd)


def open_entry(root: str | None, path: str, flags: int) -> int:
    """A file descriptor for the entry ``path`` of a checked folder, opened with ``flags``
    (``O_CREAT`` and the like included) and never through a symlink at the name."""
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    return _in_folder(root, path, lambda dfd, name: os.open(name, flags, 0o666, dir_fd=dfd))


def unlink_beneath(root: str | None, path: str) -> None:
    """Remove the entry ``path`` of a checked folder (a symlink there, not what it names)."""
    _in_folder(root, path, lambda dfd, name: os.unlink(name, dir_fd=dfd))


def create_beneath(root: str | None, path: str, make: Any) -> Any:
    """``make(new)`` for a file created at ``path`` by this call: exclusively (an existing
    file or a symlink planted at the name is refused, never followed), in a folder checked to
    be under ``root`` when given; ``new`` is the created file's ``/proc/self/fd`` path, so a
    writer that takes only paths writes that file and no other."""
    try:
        fd = open_entry(root, path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    except FileExistsError:
        raise PathRefused(f"{path}: something is already there") from None
    try:
        return make(fd_path(fd))
    finally:
        os.close(fd)

"""Paths named by clients (jobs by reference, ``--data-root``): resolved, then confined.

A path in a request is hostile input.  It is joined to the data root, resolved with every
symlink followed (``os.path.realpath``), and refused unless the result is still inside the
root; inputs must be regular files (a FIFO named ``.png`` would block a reader forever).
Workers then open exactly the resolved path.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

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

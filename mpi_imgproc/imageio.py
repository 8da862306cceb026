"""Decode and encode image files with errors that say why (callers add which file).

OpenCV decodes a truncated JPEG or PNG silently (it only prints a warning) and returns a partly
grey image; such a file must be reported, not processed.  ``decode`` therefore checks that JPEG
and PNG data end where their format says they end before handing them to OpenCV.
"""

from __future__ import annotations

import glob
import os
import threading
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np

from .errors import ImageReadError, ImageWriteError
from .ops import check_image

FORMATS = ("png", "jpg", "tif", "same")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".pgm", ".ppm")
_EXTENSIONS = {"png": ".png", "jpg": ".jpg", "tif": ".tif"}
_JPEG_EOI = b"\xff\xd9"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"


def _check_complete(data: bytes) -> None:
    if data[:3] == b"\xff\xd8\xff" and _JPEG_EOI not in data[-64:]:
        raise ImageReadError("truncated JPEG (no end-of-image marker)")
    if data[:8] == _PNG_SIGNATURE and _PNG_IEND not in data[-64:]:
        raise ImageReadError("truncated PNG (no IEND chunk)")


def decode(data: bytes | memoryview) -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, TIFF, BMP, …) keeping depth and alpha."""
    raw = bytes(data) if isinstance(data, memoryview) else data
    if not raw:
        raise ImageReadError("empty file (0 bytes)")
    _check_complete(raw)
    try:
        image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageReadError(f"cannot decode: {exc}") from None
    if image is None:
        raise ImageReadError("not an image OpenCV can decode (corrupt or unknown format)")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    try:
        check_image(image)
    except Exception as exc:
        raise ImageReadError(str(exc)) from None
    return image


def read_image(path: str | Path) -> np.ndarray:
    """Read and decode one image file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageReadError(f"cannot read: {exc.strerror or exc}") from None
    return decode(data)


def encode(image: np.ndarray, fmt: str) -> bytes:
    """Encode to ``png``, ``jpg`` or ``tif`` bytes (JPEG takes 8-bit gray or BGR only)."""
    ext = _EXTENSIONS.get(fmt.lower().lstrip("."), "." + fmt.lower().lstrip("."))
    if ext in (".jpg", ".jpeg"):
        if image.dtype != np.uint8:
            raise ImageWriteError("JPEG holds 8-bit images only; use png or tif")
        if image.ndim == 3 and image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    try:
        ok, buf = cv2.imencode(ext, image)
    except cv2.error as exc:
        raise ImageWriteError(f"cannot encode as {ext}: {exc}") from None
    if not ok:
        raise ImageWriteError(f"cannot encode as {ext}")
    return buf.tobytes()


def output_path(source: str | Path, outdir: str | Path, fmt: str) -> Path:
    """Where the result of ``source`` goes: ``outdir/<stem>.<ext>`` (``same`` keeps the suffix)."""
    source = Path(source)
    suffix = (source.suffix or ".png") if fmt == "same" else _EXTENSIONS[fmt]
    return Path(outdir) / (source.stem + suffix)


def write_atomic(path: str | Path, data: bytes | memoryview | np.ndarray) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename: never a partial file.

    The temporary name is unique to this process and thread, and the file is created with mode
    0666 less the umask, as a plain ``open`` would.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Encode by the path's suffix and write atomically."""
    path = Path(path)
    write_atomic(path, encode(image, path.suffix))


def expand_inputs(items: Iterable[str]) -> list[str]:
    """Files named by paths, folders (their image files, sorted) and globs, in order.

    A path that does not exist is kept, so that it is reported as unreadable like any other
    bad input rather than silently skipped.
    """
    files: list[str] = []
    for item in items:
        if os.path.isdir(item):
            names = sorted(os.listdir(item))
            files += [
                os.path.join(item, n)
                for n in names
                if n.lower().endswith(IMAGE_SUFFIXES) and os.path.isfile(os.path.join(item, n))
            ]
        elif glob.has_magic(item):
            files += sorted(f for f in glob.glob(item) if os.path.isfile(f))
        else:
            files.append(item)
    return files

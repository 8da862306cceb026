"""Errors users can act on.

Every error carries a message that names what was wrong and why, e.g.
``InvalidParameter("gaussian_blur: ksize must be odd, got 4")``.  The server sends
``code`` and ``str(error)`` to clients, so the classes double as the protocol's error codes.
"""

from __future__ import annotations


class ImgprocError(Exception):
    """Base class of every error this package raises on purpose."""

    code = "error"


class UnknownOp(ImgprocError):
    """An op name that is not in the registry."""

    code = "unknown_op"


class InvalidParameter(ImgprocError):
    """A parameter of an op that is missing, unknown, of the wrong type or out of range."""

    code = "invalid_parameter"


class InvalidPipeline(ImgprocError):
    """A pipeline spec (string, list or JSON file) that cannot be parsed."""

    code = "invalid_pipeline"


class UnsupportedImage(ImgprocError):
    """An image whose depth or channel count an op cannot handle."""

    code = "unsupported_image"


class ImageReadError(ImgprocError):
    """Bytes that cannot be decoded as an image: corrupt, truncated, empty or not an image."""

    code = "image_read_error"


class ImageWriteError(ImgprocError):
    """An image that cannot be encoded or written in the requested format."""

    code = "image_write_error"


class LimitExceeded(ImgprocError):
    """A request or image over the server's configured limits."""

    code = "limit_exceeded"


class EngineCrashed(ImgprocError):
    """A worker process of the processes engine died twice on the same tiles."""

    code = "engine_crashed"


class EngineUnavailable(ImgprocError):
    """A local engine that cannot run here (for example ``gpu`` without CuPy or a device)."""

    code = "engine_unavailable"


def describe(exc: BaseException) -> str:
    """One line for a user: our errors as they are, anything else with its type."""
    if isinstance(exc, ImgprocError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else 'no detail'}"


def error_code(exc: BaseException) -> str:
    """The protocol's error code for ``exc`` (``internal`` for anything unexpected)."""
    return exc.code if isinstance(exc, ImgprocError) else "internal"


class PathRefused(ImgprocError):
    """A path of a by-reference job that the server will not touch: outside its data root, not
    a regular file, or an output that would overwrite an input or an existing file."""

    code = "path_refused"

"""The client–server wire format (``docs/protocol.md``): JSON header frame, raw data frames.

This module only builds and checks messages; it knows nothing about sockets, so the server,
the client and the tests share one definition.  Nothing here pickles.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ImgprocError

VERSION = 1
SUPPORTED_VERSIONS = (1,)
REQUEST_TYPES = ("submit", "status", "cancel", "info", "heartbeat")
RESULT_ENCODINGS = ("raw", "png", "jpg", "tif", "same")
RAW_DTYPES = ("uint8", "uint16")
MAX_IMAGES_PER_REQUEST = 10_000


class ProtocolError(ImgprocError):
    """A message that does not follow the protocol; ``code`` is the error code to reply."""

    def __init__(self, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.code = code
        self.extra = extra


def pack(kind: str, frames: Sequence[bytes | memoryview] = (), **fields: Any) -> list:
    """A message: the header (``v``, ``type`` and ``fields``) then the data frames."""
    header = {"v": VERSION, "type": kind, **{k: v for k, v in fields.items() if v is not None}}
    return [json.dumps(header, separators=(",", ":")).encode(), *frames]


def unpack(frames: Sequence[bytes | memoryview]) -> tuple[dict[str, Any], list]:
    """Split a received message into its header dict and data frames, checking the envelope."""
    if not frames:
        raise ProtocolError("malformed", "empty message")
    try:
        header = json.loads(bytes(frames[0]))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError("malformed", f"header frame is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("malformed", "header frame must be a JSON object")
    version = header.get("v")
    if version not in SUPPORTED_VERSIONS:
        raise ProtocolError(
            "unsupported_version",
            f"protocol version {version!r} is not supported",
            versions=list(SUPPORTED_VERSIONS),
        )
    if not isinstance(header.get("type"), str):
        raise ProtocolError("malformed", "header needs a string field 'type'")
    req = header.get("req")
    if req is not None and (not isinstance(req, str) or len(req) > 64):
        raise ProtocolError("malformed", "'req' must be a string of at most 64 characters")
    return header, list(frames[1:])


@dataclass(frozen=True)
class ImageFrame:
    """One image of a submit: its name and either encoded file bytes or raw pixels."""

    name: str
    data: bytes | memoryview
    shape: tuple[int, ...] | None = None  # raw only
    dtype: str | None = None  # raw only

    @property
    def raw(self) -> bool:
        return self.shape is not None

    def pixels(self) -> np.ndarray:
        """The raw pixels as an array over the frame's buffer (no copy)."""
        assert self.shape is not None and self.dtype is not None
        return np.frombuffer(self.data, dtype=self.dtype).reshape(self.shape)


def _raw_descriptor(index: int, desc: dict[str, Any], size: int) -> tuple[tuple[int, ...], str]:
    shape, dtype = desc.get("shape"), desc.get("dtype")
    where = f"images[{index}]"
    if dtype not in RAW_DTYPES:
        raise ProtocolError("malformed", f"{where}: dtype must be one of {RAW_DTYPES}")
    if (
        not isinstance(shape, list)
        or len(shape) not in (2, 3)
        or not all(isinstance(n, int) and n > 0 for n in shape)
        or (len(shape) == 3 and shape[2] not in (1, 3, 4))
    ):
        raise ProtocolError("malformed", f"{where}: shape must be [h, w] or [h, w, 1|3|4]")
    expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if expected != size:
        raise ProtocolError(
            "malformed", f"{where}: shape {shape} of {dtype} needs {expected} bytes, got {size}"
        )
    return tuple(shape), dtype


def parse_images(header: dict[str, Any], frames: Sequence[bytes | memoryview]) -> list[ImageFrame]:
    """Check a submit's image descriptors against its data frames."""
    descs = header.get("images")
    if not isinstance(descs, list) or not descs:
        raise ProtocolError("malformed", "submit needs a non-empty list 'images'")
    if len(descs) > MAX_IMAGES_PER_REQUEST:
        raise ProtocolError(
            "limit_exceeded",
            f"{len(descs)} images in one request; at most {MAX_IMAGES_PER_REQUEST}",
        )
    if len(descs) != len(frames):
        raise ProtocolError(
            "malformed", f"{len(descs)} image descriptors but {len(frames)} data frames"
        )
    images = []
    for i, (desc, data) in enumerate(zip(descs, frames)):
        if not isinstance(desc, dict) or not isinstance(desc.get("name", ""), str):
            raise ProtocolError("malformed", f"images[{i}] must be an object with a string name")
        name = desc.get("name") or f"image{i}"
        encoding = desc.get("encoding", "file")
        if encoding == "file":
            images.append(ImageFrame(name, data))
        elif encoding == "raw":
            shape, dtype = _raw_descriptor(i, desc, len(data))
            images.append(ImageFrame(name, data, shape, dtype))
        else:
            raise ProtocolError("malformed", f"images[{i}]: encoding must be 'file' or 'raw'")
    return images


def parse_tile(value: Any) -> int | str:
    """``tile`` of a submit: a non-negative int or ``"auto"``."""
    if value is None or value == "auto":
        return "auto"
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError(
            "invalid_parameter", f"tile must be 'auto' or an integer >= 0, got {value!r}"
        )
    return value


def parse_result_encoding(value: Any) -> str:
    """``result`` of a submit: ``raw`` or an image encoding."""
    value = "raw" if value is None else value
    if value not in RESULT_ENCODINGS:
        raise ProtocolError(
            "invalid_parameter",
            f"result must be one of {', '.join(RESULT_ENCODINGS)}; got {value!r}",
        )
    return value


def raw_fields(image: np.ndarray) -> dict[str, Any]:
    """Header fields describing a raw-pixel frame."""
    return {"encoding": "raw", "shape": list(image.shape), "dtype": str(image.dtype)}


def tile_arg(text: str) -> int | str:
    """``--tile`` on the command line: ``auto`` or an integer >= 0 (0: whole images)."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be 'auto' or an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 'auto' or >= 0, got {value}")
    return value

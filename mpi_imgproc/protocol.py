"""The client–server wire format (``docs/protocol.md``): JSON header frame, raw data frames.

Every request and reply is declared here as a :mod:`msgspec` schema, and every request is
decoded against it before any field is used, so a hostile or careless header (a list where a
job id belongs, a shape of ``[true, 3]``, JSON nested 100,000 deep) is refused with an error that
names the field, never a traceback.  ``tests/test_protocol_doc.py`` checks ``docs/protocol.md``
against these schemas.  This module knows nothing about sockets; nothing here pickles.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import msgspec
import numpy as np

from .errors import ImgprocError

VERSION = 2
SUPPORTED_VERSIONS = (2,)
RAW_DTYPES = ("uint8", "uint16")
MAX_IMAGES_PER_REQUEST = 10_000
MAX_PIPELINE_OPS = 64
MAX_SIDE = 2**31 - 1  # pixels along one side of a raw image
HEADER_LIMIT = 1 << 20  # bytes of one header frame (10,000 image descriptors fit)

ShortText = Annotated[str, msgspec.Meta(max_length=64)]
Name = Annotated[str, msgspec.Meta(max_length=1024)]
Side = Annotated[int, msgspec.Meta(ge=1, le=MAX_SIDE)]
Count = Annotated[int, msgspec.Meta(ge=0)]
ParamValue = str | int | float | bool | None


class ProtocolError(ImgprocError):
    """A message that does not follow the protocol; ``code`` is the error code to reply."""

    def __init__(self, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.code = code
        self.extra = extra


# -- requests (client -> server) ---------------------------------------------------------


class Request(msgspec.Struct, tag_field="type", kw_only=True):
    """Fields every request has: the protocol version and an optional request id."""

    v: int
    req: ShortText | None = None


class OpItem(msgspec.Struct, forbid_unknown_fields=True):
    """One op of a pipeline in object form: ``{"op": NAME, "params": {...}}``."""

    op: ShortText
    params: dict[ShortText, ParamValue] = {}


class SegmentRef(msgspec.Struct, forbid_unknown_fields=True):
    """A client's shared-memory segment (:mod:`mpi_imgproc.shm`): its process, descriptor
    number and the nonce its header holds."""

    pid: Annotated[int, msgspec.Meta(ge=1, le=2**22)]
    fd: Annotated[int, msgspec.Meta(ge=0, le=2**20)]
    nonce: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{32}$")]


class ImageDesc(msgspec.Struct, forbid_unknown_fields=True):
    """One image of a submit: its name, its encoding and its exact size in bytes.  ``file``
    and ``raw`` images are uploaded after ``accepted``; ``shm`` ones are read from the
    client's ``segment``, and their result is written into its ``result_segment``."""

    size: Count
    name: Name = ""
    encoding: Literal["file", "raw", "shm"] = "file"
    shape: Annotated[list[Side], msgspec.Meta(min_length=2, max_length=3)] | None = None
    dtype: Literal["uint8", "uint16"] | None = None
    segment: SegmentRef | None = None
    result_segment: SegmentRef | None = None


class Submit(Request, tag="submit", forbid_unknown_fields=True):
    """Run a pipeline over images: uploaded afterwards one ``upload`` each (``images``), or
    named by path under the server's data root (``paths``, written to ``output``)."""

    pipeline: Annotated[list[ShortText | OpItem], msgspec.Meta(max_length=MAX_PIPELINE_OPS)]
    images: list[ImageDesc] = []
    paths: list[Name] = []
    output: Name | None = None
    overwrite: bool = False
    tile: Count | Literal["auto"] = "auto"
    result: Literal["raw", "png", "jpg", "tif", "same"] = "raw"
    progress: bool = True


class JobRequest(Request, kw_only=True):
    """A request about one job: its id and the secret token from ``accepted``."""

    job: ShortText
    token: ShortText


class Upload(JobRequest, tag="upload", forbid_unknown_fields=True):
    """The data of one image of an accepted submit: exactly one data frame follows."""

    index: Count


class Status(JobRequest, tag="status", forbid_unknown_fields=True):
    """Where a job stands (its owner only)."""


class Cancel(JobRequest, tag="cancel", forbid_unknown_fields=True):
    """End a job now (its owner only)."""


class Attach(JobRequest, tag="attach", forbid_unknown_fields=True):
    """Make this connection the job's owner (after a reconnect) and receive what is left;
    ``segments``: this client holds the job's shm segments (it is the submitter, reconnected),
    so results may still be left in them; otherwise they come as raw frames."""

    segments: bool = False


class Info(Request, tag="info", forbid_unknown_fields=True):
    """Ranks, hosts, engines, versions, queue and limits of the server; with ``probe`` (a
    1×1 8-bit segment), also whether rank 0 can open this client's segments."""

    probe: SegmentRef | None = None


class Heartbeat(Request, tag="heartbeat", forbid_unknown_fields=True):
    """I am still here; the server answers with a ``heartbeat``."""


AnyRequest = Submit | Upload | Status | Cancel | Attach | Info | Heartbeat
REQUEST_TYPES = tuple(t.__struct_config__.tag for t in AnyRequest.__args__)
# Requests that carry data frames, and how many.
DATA_FRAMES = {"upload": 1}


class _Envelope(msgspec.Struct):
    v: Any = None
    type: Any = None
    req: Any = None


_envelope = msgspec.json.Decoder(_Envelope)
_request = msgspec.json.Decoder(AnyRequest)


def decode_request(frames: Sequence[bytes | memoryview]) -> tuple[AnyRequest, list]:
    """The request in ``frames`` checked against its schema, and its data frames.

    Raises ProtocolError with ``req`` in ``extra`` when it can be read, so that the error
    reply still reaches the right request.
    """
    if not frames:
        raise ProtocolError("malformed", "empty message")
    if len(frames[0]) > HEADER_LIMIT:
        raise ProtocolError("limit_exceeded", f"header frame over {HEADER_LIMIT} bytes")
    envelope = _decode(_envelope, frames[0])
    req = envelope.req if isinstance(envelope.req, str) and len(envelope.req) <= 64 else None
    if envelope.v not in SUPPORTED_VERSIONS:
        raise ProtocolError(
            "unsupported_version",
            f"protocol version {envelope.v!r} is not supported",
            versions=list(SUPPORTED_VERSIONS),
        )
    if envelope.type not in REQUEST_TYPES:
        raise ProtocolError(
            "unknown_type",
            f"unknown message type {envelope.type!r}; requests: {', '.join(REQUEST_TYPES)}",
            req=req,
        )
    request = _decode(_request, frames[0], req)
    data = list(frames[1:])
    expected = DATA_FRAMES.get(envelope.type, 0)
    if len(data) != expected:
        raise ProtocolError(
            "malformed", f"{envelope.type} takes {expected} data frames, got {len(data)}", req=req
        )
    return request, data


def _decode(decoder: msgspec.json.Decoder, frame: bytes | memoryview, req: str | None = None):
    try:
        return decoder.decode(frame)
    except msgspec.ValidationError as exc:
        raise ProtocolError("malformed", f"invalid header: {exc}", req=req) from None
    except msgspec.DecodeError as exc:
        raise ProtocolError("malformed", f"header frame is not JSON: {exc}", req=req) from None
    except RecursionError:
        raise ProtocolError("malformed", "header frame is nested too deeply", req=req) from None


def check_image_desc(index: int, desc: ImageDesc) -> tuple[tuple[int, ...], str] | None:
    """A raw descriptor's (shape, dtype), checked against its declared size; None for files."""
    where = f"images[{index}]"
    has_segments = desc.segment is not None or desc.result_segment is not None
    if desc.encoding == "shm" and (desc.segment is None or desc.result_segment is None):
        raise ProtocolError("malformed", f"{where}: a shm image needs segment and result_segment")
    if desc.encoding != "shm" and has_segments:
        raise ProtocolError("malformed", f"{where}: segments are for shm images only")
    if desc.encoding == "file":
        if desc.shape is not None or desc.dtype is not None:
            raise ProtocolError("malformed", f"{where}: shape and dtype are for raw images only")
        return None
    if desc.shape is None or desc.dtype is None:
        raise ProtocolError("malformed", f"{where}: a {desc.encoding} image needs shape and dtype")
    if len(desc.shape) == 3 and desc.shape[2] not in (1, 3, 4):
        raise ProtocolError("malformed", f"{where}: shape must be [h, w] or [h, w, 1|3|4]")
    expected = math.prod(desc.shape) * np.dtype(desc.dtype).itemsize  # exact: Python ints
    if expected != desc.size:
        raise ProtocolError(
            "malformed",
            f"{where}: shape {desc.shape} of {desc.dtype} needs {expected} bytes, "
            f"but size says {desc.size}",
        )
    return tuple(desc.shape), desc.dtype


def pipeline_json(submit: Submit) -> list[Any]:
    """The submit's pipeline as the plain JSON list :meth:`Pipeline.from_json` reads."""
    return msgspec.to_builtins(submit.pipeline)


def raw_pixels(data: bytes | memoryview, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """Raw pixels over a frame's buffer, without a copy when the buffer is aligned.

    A frame's bytes may start at any address (ZeroMQ keeps small messages inside the message
    struct); a 16-bit view of an odd address is legal NumPy but not every consumer takes it, so
    an unaligned buffer is copied once into aligned memory.
    """
    array = np.frombuffer(data, dtype=dtype).reshape(shape)
    return array if array.flags.aligned else array.copy()


# -- replies (server -> client) ----------------------------------------------------------
# The server builds replies with ``pack``; these schemas are what it promises, checked by the
# tests against every reply they receive and against docs/protocol.md.


class Reply(msgspec.Struct, tag_field="type", kw_only=True, forbid_unknown_fields=True):
    v: int
    req: str | None = None


class Accepted(Reply, tag="accepted"):
    job: str
    token: str
    images: int


class Progress(Reply, tag="progress"):
    job: str
    tiles_done: int
    tiles_total: int
    images_done: int
    images_total: int


class Result(Reply, tag="result"):
    job: str
    index: int
    name: str
    encoding: str
    path: str
    tiles: int
    reason: str | None = None
    shape: list[int] | None = None
    dtype: str | None = None
    written: str | None = None


class ImageError(Reply, tag="image_error"):
    job: str
    index: int
    name: str
    code: str
    message: str


class Done(Reply, tag="done"):
    job: str
    state: str
    ok: int
    failed: int
    cancelled: int
    stats: dict[str, Any]
    message: str | None = None


class Error(Reply, tag="error"):
    code: str
    message: str
    versions: list[int] | None = None
    job: str | None = None


class JobSummary(Reply):
    """A job's counts and state: the ``status`` and ``attached`` replies."""

    job: str
    state: str
    images_done: int
    images_total: int
    tiles_done: int
    tiles_total: int


class StatusReply(JobSummary, tag="status"):
    pass


class Cancelled(Reply, tag="cancelled"):
    job: str
    state: str


class Attached(JobSummary, tag="attached"):
    pass


class InfoReply(Reply, tag="info"):
    ranks: int
    workers: int
    hosts: dict[str, int]
    engine: str
    engines: list[dict[str, Any]]
    workers_per_rank: int
    tile: int | str
    cutover_ms: float
    inline_ms: float
    client_timeout: float
    heartbeat_s: float
    versions: dict[str, str]
    queue: dict[str, int]
    limits: dict[str, int]
    curve: bool
    by_reference: bool
    shm: dict[str, Any] | None = None
    shm_probe: bool | None = None


class HeartbeatReply(Reply, tag="heartbeat"):
    pass


AnyReply = (
    Accepted
    | Progress
    | Result
    | ImageError
    | Done
    | Error
    | StatusReply
    | Cancelled
    | Attached
    | InfoReply
    | HeartbeatReply
)
_reply = msgspec.json.Decoder(AnyReply)


def decode_reply(frame: bytes | memoryview) -> AnyReply:
    """A server message checked against its schema (the tests hold the server to it)."""
    return _reply.decode(frame)


def pack(kind: str, frames: Sequence[bytes | memoryview] = (), **fields: Any) -> list:
    """A message: the header (``v``, ``type`` and ``fields``) then the data frames."""
    header = {"v": VERSION, "type": kind, **{k: v for k, v in fields.items() if v is not None}}
    return [msgspec.json.encode(header), *frames]


def unpack(frames: Sequence[bytes | memoryview]) -> tuple[dict[str, Any], list]:
    """Split a received reply into its header dict and data frames, checking the envelope."""
    if not frames:
        raise ProtocolError("malformed", "empty message")
    try:
        header = msgspec.json.decode(frames[0])
    except (msgspec.DecodeError, RecursionError) as exc:
        raise ProtocolError("malformed", f"header frame is not JSON: {exc}") from None
    if not isinstance(header, dict) or not isinstance(header.get("type"), str):
        raise ProtocolError("malformed", "header frame must be a JSON object with a 'type'")
    if header.get("v") not in SUPPORTED_VERSIONS:
        raise ProtocolError("unsupported_version", f"protocol version {header.get('v')!r}")
    return header, list(frames[1:])


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

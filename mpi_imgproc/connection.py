"""The connection core the clients share: one I/O thread owns a server's DEALER socket.

ZeroMQ sockets are not thread-safe, so one thread alone sends, receives, heartbeats at the rate
the server asks for, watches the socket's monitor and re-attaches jobs after a reconnect,
whatever the application does meanwhile; the synchronous :class:`mpi_imgproc.client.Client`
and :class:`mpi_imgproc.aio.AsyncClient` talk to it through a queue and one lock.  Here too are
the client's errors (each names which case happened), the events it routes and what a submit
sends.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from .errors import ImgprocError, LimitExceeded, describe
from .imageio import decode, read_bytes
from .pipeline import Pipeline
from .protocol import ProtocolError, pack, raw_fields, unpack
from .shm import Segment, host_identity, owner_of

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
# Until the server's ``info`` says its ``heartbeat_s`` (it is asked on every connect), beat
# often: a server may run with a short --client-timeout.
FALLBACK_HEARTBEAT_S = 1.0
# How long a dropped connection may take to come back before its jobs count as lost, when the
# server's ``client_timeout`` (after which it cancels them anyway) is not known.
FALLBACK_CLIENT_TIMEOUT_S = 30.0
# ZeroMQ-level heartbeats: the server's I/O thread answers them even while rank 0 is busy, so
# silence past the timeout means the server (or the network to it) is gone.
ZMTP_HEARTBEAT_MS, ZMTP_TIMEOUT_MS = 1000, 6000
WAIT_SLICE_S = 0.5  # waits wake this often, so Ctrl-C is never held up
IDLE_POLL_S = 1.0  # the I/O thread's longest sleep with nothing to do
RECEIVE_BATCH = 256  # messages routed per lock taken
JOB_STATES_FINAL = ("done", "cancelled", "failed")
LOST_MESSAGE = "its result was sent on a connection that dropped; submit it again"
_JOB_EVENTS = ("progress", "result", "image_error", "done")
_MONITOR_EVENTS = (
    zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_DISCONNECTED
)
_REFUSALS = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
)


class ServerError(ImgprocError):
    """The server refused a request; ``code`` is the protocol's error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class ServerTimeout(ImgprocError):
    """Connected, but no answer from the server in time (it may be overloaded)."""

    code = "timeout"


class ServerUnavailable(ImgprocError):
    """The server cannot be talked to; the subclass says which case happened."""

    code = "unavailable"


class NothingListening(ServerUnavailable):
    """Nothing accepted the connection at the address (no server, or a wrong address)."""

    code = "nothing_listening"


class CurveRefused(ServerUnavailable):
    """The server refused the connection's security handshake (CURVE keys, or their absence)."""

    code = "curve_refused"


class ServerGone(ServerUnavailable):
    """The connection was lost, or the server said it is failing: unfinished jobs are lost."""

    code = "server_gone"


class RequestTooLarge(LimitExceeded):
    """A submit over the server's limits (from its ``info``), refused before sending."""


@dataclass
class Event:
    """One message about a job: ``progress``, ``result``, ``image_error`` or ``done``."""

    type: str
    header: dict[str, Any]
    frames: list = field(default_factory=list)

    def image(self) -> np.ndarray:
        """The pixels of a ``result`` event (raw or encoded on the wire)."""
        data = self.frames[0]
        if self.header.get("encoding") in ("raw", "shm"):  # shm: the mapped result segment
            array = np.frombuffer(data, dtype=self.header["dtype"])
            return array.reshape(self.header["shape"])
        return decode(bytes(data))


@dataclass
class JobResult:
    """Everything a finished job produced."""

    job: str
    state: str
    images: list[np.ndarray | None]
    errors: dict[int, tuple[str, str]]
    stats: dict[str, Any]
    message: str | None = None
    written: dict[int, str] = field(default_factory=dict)  # by reference: the files written

    @property
    def ok(self) -> bool:
        """The job is done and every image has a result."""
        return self.state == "done" and not self.errors


# -- what a submit sends ------------------------------------------------------------------------


class Outs:
    """The ``out`` arrays of one submit (then of its job), by image index, and which of them
    are still *marked* written (``Segment.writer``): from the submit until the image's result
    comes (every task that wrote it is over by then), or the submit was never sent or was
    refused.  An image that ends otherwise (an error, a cancel, a lost job) leaves its ``out``
    marked for good: a task of it may still be running, and would write there."""

    def __init__(self, arrays: dict[int, np.ndarray] | None = None):
        self.arrays = dict(arrays or {})
        self.marked: set[int] = set()

    def mark(self, images: Sequence[Any]) -> None:
        """Mark every ``out`` and give it a fresh nonce, so a late task of an earlier job is
        refused on open.  Raises ValueError, marking nothing, when an ``out`` or an image (or
        the array an image is a view of) is marked already."""
        segments = {i: owner_of(a) for i, a in self.arrays.items()}
        with _MARKS:
            for i, segment in segments.items():
                if segment.writer:
                    raise ValueError(f"out[{i}]: {WRITTEN}")
            for j, image in enumerate(images):
                if isinstance(image, np.ndarray) and written(image):
                    raise ValueError(f"image {j}: {WRITTEN}")
            for segment in segments.values():
                segment.renew()
            for segment in segments.values():
                segment.writer = True
            self.marked = set(segments)

    def release(self, index: int | None = None) -> None:
        """Unmark ``out`` ``index`` (all of them: None)."""
        with _MARKS:
            for i in [index] if index is not None else list(self.marked):
                if i in self.marked:
                    self.marked.discard(i)
                    owner_of(self.arrays[i]).writer = False

    def take(self) -> Outs:
        """These arrays and marks for the job, leaving none here (a late refusal of the
        submit then cannot unmark what the job holds)."""
        taken = Outs(self.arrays)
        taken.marked, self.marked = self.marked, set()
        return taken


@dataclass
class Submission:
    """A submit made ready to send: the pipeline, one descriptor and one frame per image."""

    pipeline: list[dict[str, Any]]
    descs: list[dict[str, Any]]
    frames: list[Any]  # None for an image in shared memory: nothing to upload
    # index -> (input, result) segments of images sent through shared memory (:mod:`shm`)
    segments: dict[int, tuple[Segment, Segment]] = field(default_factory=dict)
    outs: Outs = field(default_factory=lambda: Outs())  # the caller's ``out`` arrays

    @property
    def size(self) -> int:
        """Bytes of image data the submit uploads."""
        return sum(d["size"] for d in self.descs if d.get("encoding") != "shm")

    def names(self) -> list[str]:
        """The images' names, in submit order."""
        return [d["name"] for d in self.descs]


WRITTEN = (
    "this shared array is the out of an unfinished job, or of one that ended without its "
    "result (a late task of it may still write there): use another"
)


def written(image: np.ndarray) -> bool:
    """Whether ``image`` is, or is a view of, a shared array some job writes (``out``)."""
    base: Any = image
    while isinstance(base, np.ndarray):
        segment = owner_of(base)
        if segment is not None:
            return segment.writer
        base = base.base
    return False


def as_pipeline(pipeline: Pipeline | Sequence[str] | list[dict]) -> Pipeline:
    """A Pipeline from specs (``"NAME:key=value"``) or JSON steps, validated here."""
    if isinstance(pipeline, Pipeline):
        return pipeline
    if all(isinstance(p, str) for p in pipeline):
        return Pipeline.parse(list(pipeline))
    return Pipeline.from_json(list(pipeline))


def check_out(image: Any, out: Any, steps: Pipeline, index: int, shared: bool) -> Segment:
    """The segment of ``out``, refused unless it can take ``image``'s result: a whole array
    made by :func:`~mpi_imgproc.shm.shared_array` (the workers write into it), a server that
    takes shared memory, an array image without a unit channel axis, the result's shape and
    dtype.  (Whether it is in use, :meth:`Outs.mark` decides.)"""
    what = f"out[{index}]"
    segment = owner_of(out) if isinstance(out, np.ndarray) else None
    if segment is None:
        raise ValueError(
            f"{what}: out takes whole arrays made by mpi_imgproc.shm.shared_array (the "
            f"workers write into them); got a {type(out).__name__} that is none"
        )
    if not shared:
        raise ValueError(f"{what}: out needs a server on this host that takes shared memory")
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{what}: out is for array images; image {index} is a path")
    if image.shape[2:] == (1,):
        raise ValueError(f"{what}: image {index} has a unit channel axis; give it as (H, W)")
    shape = steps.output_shape(image.shape)  # raises what the server would for bad params
    if out.shape != shape or out.dtype != image.dtype:
        raise ValueError(
            f"{what}: the result is {shape} {image.dtype}; out is {out.shape} {out.dtype}"
        )
    return segment


# ``Segment.writer`` marks are checked and set under this lock, so two threads cannot both
# take one shared array as ``out``.
_MARKS = threading.Lock()


def load_image(
    image: str | Path | np.ndarray,
    name: str,
    pipeline: Pipeline | None = None,
    out: np.ndarray | None = None,
) -> tuple[dict[str, Any], Any]:
    """The descriptor and upload frame of one image: a path's file bytes, an array's pixels.
    With ``pipeline`` (the server shares this host), an array goes in a shared-memory segment
    instead, with a second one for its result: the frame is then the pair of segments.  The
    result's segment is ``out``'s own when ``out`` is a
    :func:`~mpi_imgproc.shm.shared_array` (checked by :func:`check_out`): workers then write
    the result straight into it, into pages that exist already.

    Raises ImageReadError for a path that is not a readable regular file (a FIFO, a folder).
    """
    out_shape = None
    # (h, w, 1) arrays keep the socket: its results keep the shape OpenCV gives them.  So
    # do small ones, which cost the socket little and would each hold two descriptors.
    if (
        isinstance(image, np.ndarray)
        and pipeline is not None
        and image.shape[2:] != (1,)
        and (image.nbytes >= SHARED_MIN_BYTES or out is not None)
    ):
        with contextlib.suppress(ImgprocError):  # sent as pixels: the server says why it fails
            out_shape = pipeline.output_shape(image.shape)
    if isinstance(image, np.ndarray) and out_shape is not None:
        source = owner_of(image) or Segment.holding(image, name)
        result = owner_of(out) if out is not None else None
        result = result or Segment(out_shape, image.dtype, f"{name}.result")
        desc = {"name": name, "size": image.nbytes, **raw_fields(image), "encoding": "shm"}
        desc.update(segment=source.ref(), result_segment=result.ref())
        return desc, (source, result)
    if isinstance(image, np.ndarray):
        image = np.ascontiguousarray(image)
        return {"name": name, "size": image.nbytes, **raw_fields(image)}, image
    data = read_bytes(image)
    return {"name": name, "encoding": "file", "size": len(data)}, data


def default_name(image: Any, index: int) -> str:
    """A path's file name, ``imageN`` for an array."""
    return f"image{index}" if isinstance(image, np.ndarray) else Path(image).name


def prepare_submit(
    images: Sequence[str | Path | np.ndarray],
    pipeline: Pipeline | Sequence[str] | list[dict],
    names: Sequence[str] | None = None,
    shared: bool = False,
    out: Sequence[np.ndarray | None] | None = None,
    result: str = "raw",
) -> Submission:
    """Validate the pipeline, the ``out`` arrays (one per image, or None; raw results only)
    and read every image, before anything is sent; with ``shared`` (a server on this host
    that takes them), arrays go through shared memory."""
    steps = as_pipeline(pipeline)
    if out is not None and result != "raw":
        raise ValueError(f"out takes raw results; this submit asks for {result!r}")
    if isinstance(out, np.ndarray):
        raise ValueError("out is a list: one array (or None) per image")
    outs = list(out) if out is not None else [None] * len(images)
    if len(outs) != len(images):
        raise ValueError(f"out has {len(outs)} arrays for {len(images)} images")
    writes = {i: check_out(images[i], a, steps, i, shared) for i, a in enumerate(outs)
              if a is not None}  # fmt: skip
    for i, segment in writes.items():
        for j, image in enumerate(images):
            if isinstance(image, np.ndarray) and np.may_share_memory(outs[i], image):
                raise ValueError(f"out[{i}] is also image[{j}]: strips read what it overwrites")
            if j != i and writes.get(j) is segment:
                raise ValueError(f"out[{i}] is also out[{j}]")
    sub = Submission(steps.to_json(), [], [], outs=Outs({i: outs[i] for i in writes}))
    sub.outs.mark(images)
    try:
        loaded = [
            load_image(
                image,
                names[i] if names else default_name(image, i),
                steps if shared and (i < SHARED_PER_SUBMIT or i in writes) else None,
                outs[i],
            )
            for i, image in enumerate(images)
        ]
    except BaseException:
        sub.outs.release()
        raise
    sub.descs, sub.frames = [d for d, _ in loaded], [f for _, f in loaded]
    for index, (desc, frame) in enumerate(loaded):
        if desc.get("encoding") == "shm":
            sub.segments[index], sub.frames[index] = frame, None
    return sub


# Images of one submit sent through shared memory; the rest go through the socket.  Each
# holds two descriptors in this process until its result comes.
SHARED_PER_SUBMIT = 128
SHARED_MIN_BYTES = 256 * 2**10  # smaller arrays go through the socket


def shares_memory(info: dict[str, Any]) -> bool:
    """Whether a server that sent this ``info`` may open this process's segments: it says
    it takes them, runs on this host and namespaces, as this user or as root (whether it
    really can, a ``probe`` tells: see :func:`probe_segment`)."""
    offer = info.get("shm")
    if not isinstance(offer, dict) or host_identity() is None:
        return False
    return offer.get("host") == host_identity() and offer.get("uid") in (0, os.geteuid())


def probe_segment() -> Segment:
    """A 1×1 segment for an ``info`` ``probe``: rank 0 opens it exactly as an image's, so a
    client it cannot reach (another user's, a non-dumpable process) keeps to the socket."""
    return Segment.holding(np.zeros((1, 1), np.uint8), "probe")


@contextlib.contextmanager
def released_if_unsent(sub: Submission) -> Iterator[None]:
    """Around queueing ``sub``: if that fails, it was never sent, and its ``out`` arrays are
    unmarked (see :class:`Outs`)."""
    try:
        yield
    except BaseException:
        sub.outs.release()
        raise


@contextlib.contextmanager
def released_if_refused(sub: Submission) -> Iterator[None]:
    """Around waiting for ``sub``'s reply: when the server refuses it (``error``), it never
    ran, and its ``out`` arrays are unmarked; when the reply is only missing (a timeout, a
    dropped connection), the server may have it, and they stay marked."""
    try:
        yield
    except ServerError:
        sub.outs.release()
        raise


def check_limits(limits: dict[str, Any], descs: list[dict[str, Any]]) -> None:
    """Refuse here what the server would refuse, before sending a byte of image data."""
    size = sum(d["size"] for d in descs if d.get("encoding") != "shm")  # shm: never sent
    most = limits.get("max_request_bytes")
    if most is not None and size > most:
        raise RequestTooLarge(
            f"{len(descs)} images of {size} bytes are over the server's limit of "
            f"{most} bytes per request (--max-request-mb); submit fewer at a time"
        )
    count = limits.get("max_images")
    if count is not None and len(descs) > count:
        raise RequestTooLarge(f"{len(descs)} images in one request; the server takes {count}")


SEGMENT_ELSEWHERE = (
    "the result was written into the shared memory of the client that submitted the job "
    "(sent before this client attached)"
)


def _within(timeout: float | None) -> str:
    return "" if timeout is None else f" within {timeout:g} s"


# -- the connection core ------------------------------------------------------------------------


class JobRecord:
    """What the I/O thread has routed to one job; read and written under the core's lock.

    ``uploads`` keeps the job's image frames until it is done, so that images whose upload
    was lost with a dropped connection can be sent again after the re-attach.
    """

    def __init__(self, job_id: str, token: str, names: list[str], uploads: Sequence[Any] = ()):
        self.id, self.token, self.names = job_id, token, names
        self.uploads = list(uploads)
        self.segments: dict[int, tuple[Segment, Segment]] = {}  # shm images: (input, result)
        self.outs = Outs()  # the caller's arrays for results, marked while written
        self.queue: deque[Event] = deque()
        self.results: dict[int, Event] = {}  # decoded only when asked
        self.errors: dict[int, tuple[str, str]] = {}
        self.final: Event | None = None
        self.lost: ImgprocError | None = None  # set when the job cannot end any more

    @property
    def done(self) -> bool:
        """The job's ``done`` has been routed."""
        return self.final is not None

    @property
    def open(self) -> bool:
        """Still expecting messages from the server."""
        return self.final is None and self.lost is None

    def add(self, event: Event) -> None:
        """Record one message; nothing counts after ``done``."""
        if self.done:
            return
        index = event.header.get("index")
        if event.type == "result" and isinstance(index, int) and index >= 0:
            self.results[index] = event
            pair = self.segments.pop(index, None)
            if event.header.get("encoding") == "shm" and pair is None:
                del self.results[index]  # not this process's segment: the pixels are not here
                self.errors[index] = ("lost", SEGMENT_ELSEWHERE)
            elif pair is not None and event.header.get("encoding") == "shm":
                event.frames = [pair[1].array]  # the result is in its segment, mapped
            self._release(pair)
            if pair is not None:  # written by now: the result comes after its last strip
                self.outs.release(index)
        elif event.type == "image_error" and isinstance(index, int) and index >= 0:
            self.errors[index] = (event.header.get("code", ""), event.header.get("message", ""))
            self._release(self.segments.pop(index, None))
        elif event.type == "done":
            self.final, self.uploads = event, []
            self.release_segments()
        self.queue.append(event)

    @staticmethod
    def _release(pair: tuple[Segment, Segment] | None) -> None:
        for segment in pair or ():
            if not segment.kept:  # a shared_array's stays open while the array lives
                segment.close()  # the server holds its own descriptors; the mappings live on

    def release_segments(self) -> None:
        """Close every segment's descriptor (the job is over, or lost)."""
        for pair in self.segments.values():
            self._release(pair)
        self.segments.clear()

    def unfinished(self) -> list[int]:
        """Indices of images with neither a result nor an error."""
        finished = self.results.keys() | self.errors.keys()
        return [i for i in range(len(self.names)) if i not in finished]

    def outcome(self) -> JobResult:
        """The JobResult of a done job (call outside the lock: it decodes images)."""
        assert self.final is not None
        header, errors = self.final.header, dict(self.errors)
        if header.get("state") == "done":
            errors.update((i, ("lost", LOST_MESSAGE)) for i in self.unfinished())
        results = [self.results.get(i) for i in range(len(self.names))]
        images = [event.image() if event and event.frames else None for event in results]
        for i, out in self.outs.arrays.items():  # the result segment is out's own: out itself
            if i < len(images) and images[i] is not None:
                images[i] = out
        written = {
            i: e.header["written"] for i, e in enumerate(results) if e and e.header.get("written")
        }
        stats, message = header.get("stats", {}), header.get("message")
        return JobResult(self.id, header["state"], images, errors, stats, message, written)


class Connection:
    """One connection to a server, served by an I/O thread of its own.

    The thread alone touches the DEALER socket and its monitor: it sends what other threads
    queue (through a ``queue.SimpleQueue``, waking it through a pipe it polls beside the
    sockets), routes every message it receives to its job or request, sends a ``heartbeat``
    whenever this client has unfinished jobs and has been quiet for the server's
    ``heartbeat_s`` (learnt from ``info`` on every connect), and after a dropped connection
    comes back re-attaches every unfinished job.  Everything it routes is guarded by one
    ``threading.Condition``; threads wait on it, asyncio loops on an ``asyncio.Event`` the
    thread sets through ``call_soon_threadsafe``.
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        curve_keys: str | Path | None = None,
        heartbeat: float | None = None,
    ):
        self.address, self.heartbeat = address, heartbeat
        self.curve_keys = Path(curve_keys) if curve_keys else None
        self.lock = threading.Condition()
        # Routed state, guarded by ``lock``.
        self.jobs: dict[str, JobRecord] = {}
        self.replies: dict[str, tuple[dict, list] | ImgprocError] = {}
        self.waiting: set[str] = set()  # requests whose caller waits for the reply
        self.submits: dict[str, Submission] = {}  # submit requests awaiting ``accepted``
        self.abandoned: set[str] = set()  # submits whose caller stopped waiting
        self.info: dict[str, Any] = {}  # the server's latest ``info``
        self.connected = False  # a handshake has succeeded, no disconnect since
        self.retries = 0  # connection attempts refused since the last handshake
        self.dropped: ServerGone | None = None  # why the connection is down, if it dropped
        self.fatal: ImgprocError | None = None  # no wait can succeed any more (refused, closed)
        self._wakers: set[Callable[[], None]] = set()
        self._ids = itertools.count(1)
        # The I/O thread's own state.
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._outgoing: deque[list] = deque()
        self._last_sent = time.monotonic()
        self._give_up_at: float | None = None  # a dropped connection's jobs are lost then
        self._closing_at: float | None = None
        self._pipe_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        try:
            self._open()
        except ImgprocError:
            self._close_pipe()
            raise
        # Thread.start is a full memory barrier: the sockets move to the I/O thread for good.
        self._thread = threading.Thread(target=self._run, name="mpi_imgproc-client-io", daemon=True)
        self._thread.start()

    # -- any thread ---------------------------------------------------------------------------

    def send(self, frames: list) -> None:
        """Queue one message for the server."""
        self._command(self._outgoing.append, frames)

    def request(
        self,
        kind: str,
        frames: Sequence[Any] = (),
        submission: Submission | None = None,
        **fields: Any,
    ) -> str:
        """Send a request whose reply a caller will wait for; returns its ``req``.

        With ``submission`` (a submit), the I/O thread registers the job and queues its
        uploads the moment it routes the ``accepted`` (see :meth:`take_job`).
        """
        with self.lock:
            if self.fatal is not None:
                raise type(self.fatal)(str(self.fatal))
            req = f"r{next(self._ids)}"
            self.waiting.add(req)
            if submission is not None:
                self.submits[req] = submission
        self.send(pack(kind, list(frames), req=req, **fields))
        return req

    def attach(self, job_id: str, token: str, names: Sequence[str]) -> tuple[str, JobRecord]:
        """Send an ``attach``; the job's record exists before the reply, so none of the
        messages that follow the reply can be missed."""
        with self.lock:
            record = self.jobs.get(job_id) or JobRecord(job_id, token, list(names))
            self.jobs[job_id] = record
        req = self.request("attach", job=job_id, token=token)
        self.send(pack("status", req=f"_sync:{job_id}", job=job_id, token=token))
        return req, record

    def answered(self, req: str) -> bool:
        """True once ``req`` has its reply, or cannot get one (call under the lock)."""
        return req in self.replies or self.fatal is not None

    def take_reply(self, req: str, kind: str, timeout: float | None) -> tuple[dict, list]:
        """The reply to ``req``; raises what happened instead, naming the case."""
        with self.lock:
            self.waiting.discard(req)
            answer = self.replies.pop(req, None)
            if answer is None:
                if self.submits.pop(req, None) is not None:
                    self.abandoned.add(req)  # cancel the job should it be accepted late
                raise self.silence(f"no reply to {kind}{_within(timeout)}")
            self.submits.pop(req, None)
        if isinstance(answer, ImgprocError):
            raise answer
        header, data = answer
        if header["type"] == "error":
            raise ServerError(header.get("code", "error"), header.get("message", ""))
        return header, data

    def take_job(self, header: dict[str, Any]) -> JobRecord:
        """The record of a job whose ``accepted`` is ``header``."""
        with self.lock:
            return self.jobs[header["job"]]

    def job_ready(self, record: JobRecord) -> bool:
        """True when the job has an event to read, or no wait on it can go on (under lock)."""
        return bool(record.queue) or self.job_over(record)

    def job_over(self, record: JobRecord) -> bool:
        """True when the job is done, lost, or the connection is over (under the lock)."""
        return not record.open or self.fatal is not None

    def pop_event(self, record: JobRecord) -> Event | None:
        """The job's next event if one has come; raises the job's loss once all are read."""
        with self.lock:
            if record.queue:
                return record.queue.popleft()
            if not record.done and (record.lost or self.fatal):
                raise record.lost or self.silence("")
            return None

    def next_event(self, record: JobRecord, what: str) -> Event | None:
        """The job's next event, None after ``done``; raises why there is none."""
        event = self.pop_event(record)
        if event is None and not record.done:
            raise self.why(record, what)
        return event

    def why(self, record: JobRecord, what: str) -> ImgprocError:
        """Why a wait on the job ran out."""
        with self.lock:
            return record.lost or self.silence(what)

    def outcome(self, record: JobRecord, what: str) -> JobResult:
        """The result of a done job; raises why it is not done."""
        with self.lock:
            if not record.done:
                raise record.lost or self.silence(what)
            record.queue.clear()
        return record.outcome()

    def forget(self, job_id: str) -> None:
        """Stop routing (and heartbeating for) a job nobody will read any more."""
        with self.lock:
            self.jobs.pop(job_id, None)

    def server_info(self) -> dict[str, Any]:
        """What the server's last ``info`` said (empty before the first)."""
        with self.lock:
            return dict(self.info)

    def limits(self) -> dict[str, Any] | None:
        """The server's limits, once an ``info`` has come."""
        with self.lock:
            return self.info.get("limits")

    def heartbeat_s(self) -> float:
        """Seconds between messages while jobs are unfinished (under the lock or not)."""
        server = self.info.get("heartbeat_s") or FALLBACK_HEARTBEAT_S
        return min(server, self.heartbeat) if self.heartbeat else server

    def silence(self, what: str) -> ImgprocError:
        """The error for a wait that ran out, by what the connection has seen (under lock)."""
        if self.fatal is not None:
            return type(self.fatal)(str(self.fatal))
        if self.dropped is not None:
            return ServerGone(f"{what}: {self.dropped}")
        if not self.connected:
            why = "connection refused" if self.retries > 0 else "no connection made"
            return NothingListening(
                f"{what}: nothing is listening at {self.address} ({why}; is the server "
                "running, and at that address?)"
            )
        return ServerTimeout(
            f"{what}: connected to {self.address}, but no answer yet (the server may be busy, "
            "or the work takes longer)"
        )

    def wait(self, ready: Callable[[], bool], timeout: float | None) -> bool:
        """Block until ``ready()`` (called under the lock) or ``timeout``; True if ready."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            while not ready():
                left = WAIT_SLICE_S if deadline is None else deadline - time.monotonic()
                if left <= 0:
                    return False
                self.lock.wait(min(left, WAIT_SLICE_S))
            return True

    async def wait_async(self, ready: Callable[[], bool], timeout: float | None) -> bool:
        """:meth:`wait` for an asyncio task: the loop is never blocked."""
        loop, flag = asyncio.get_running_loop(), asyncio.Event()

        def wake() -> None:
            try:
                loop.call_soon_threadsafe(flag.set)
            except RuntimeError:  # the loop has closed: nobody is waiting any more
                pass

        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            self._wakers.add(wake)
        try:
            while True:
                with self.lock:
                    if ready():
                        return True
                    flag.clear()  # under the lock: any later change sets it again
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                try:
                    await asyncio.wait_for(flag.wait(), left)
                except asyncio.TimeoutError:
                    pass
        finally:
            with self.lock:
                self._wakers.discard(wake)

    def reconnect(self) -> None:
        """Drop the connection and make a new one; unfinished jobs are re-attached."""
        self._command(self._reopen, "the connection was reopened (reconnect)")

    def close(self, linger: float = 2.0) -> None:
        """Send what is still queued (for up to ``linger`` seconds), then stop the thread."""
        try:
            self._command(self._begin_close, linger)
        except ImgprocError:
            return  # closed already
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=linger + 5.0)

    def _command(self, fn: Callable, *args: Any) -> None:
        """Run ``fn(*args)`` on the I/O thread, soon."""
        with self._pipe_lock:
            if self._wake_w < 0:
                raise ImgprocError(f"the client of {self.address} is closed")
            self._commands.put((fn, args))
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:  # the pipe is full of wake-ups already
                pass

    def _notify(self) -> None:
        """Wake every waiter after the routed state changed."""
        with self.lock:
            self.lock.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    # -- the I/O thread -----------------------------------------------------------------------

    def _open(self) -> None:
        """Make the DEALER and its monitor, and connect."""
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.HEARTBEAT_IVL, ZMTP_HEARTBEAT_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ZMTP_TIMEOUT_MS)
        # A reconnect to a host that has dropped off the network is never refused, only
        # unanswered: without a limit it waits for the kernel (minutes), and no error comes.
        sock.setsockopt(zmq.CONNECT_TIMEOUT, ZMTP_TIMEOUT_MS)
        # Heartbeats queue behind a large message: a send stalled on a dead link is ended by
        # the kernel instead (TCP_USER_TIMEOUT on Linux), so a cut mid-upload is noticed.
        sock.setsockopt(zmq.TCP_MAXRT, ZMTP_TIMEOUT_MS)
        monitor = sock.get_monitor_socket(_MONITOR_EVENTS)
        try:
            if self.curve_keys:
                _configure_curve(sock, self.curve_keys)
            sock.connect(self.address)
        except (zmq.ZMQError, OSError, ValueError) as exc:
            sock.disable_monitor()
            monitor.close(linger=0)
            sock.close(linger=0)
            raise ImgprocError(
                f"invalid server address {self.address!r} or keys ({exc}); "
                "expected e.g. tcp://127.0.0.1:5555"
            ) from None
        self.sock, self.monitor = sock, monitor
        self._poller = zmq.Poller()
        for item in (self._wake_r, monitor, sock):
            self._poller.register(item, zmq.POLLIN)

    def _run(self) -> None:
        """The I/O thread: one loop, until closed."""
        try:
            while self._step():
                pass
        except Exception as exc:  # noqa: BLE001 - a bug here must end every wait, not hang it
            with self.lock:
                self.fatal = ServerGone(f"the client's I/O thread failed: {describe(exc)}")
        finally:
            self._shut()

    def _step(self) -> bool:
        """Wait for a socket, a command or a timer and handle it; False once closed."""
        flags = zmq.POLLIN | (zmq.POLLOUT if self._outgoing else 0)
        self._poller.modify(self.sock, flags)
        ready = dict(self._poller.poll(self._sleep_ms()))
        if self._wake_r in ready:
            self._drain_pipe()
        self._run_commands()
        if self.monitor in ready:
            self._watch()
        if ready.get(self.sock, 0) & zmq.POLLIN:
            self._receive()
        self._flush()
        self._timers()
        return self._closing_at is None or (
            bool(self._outgoing) and time.monotonic() < self._closing_at
        )

    def _sleep_ms(self) -> int:
        """Milliseconds until the next timer (heartbeat, give-up, close), at most a second."""
        now, waits = time.monotonic(), [IDLE_POLL_S]
        with self.lock:
            if self.connected and not self._outgoing and self._unfinished():
                waits.append(self._last_sent + self.heartbeat_s() - now)
        for at in (self._give_up_at, self._closing_at):
            if at is not None:
                waits.append(at - now)
        return max(0, int(min(waits) * 1000) + 1)

    def _drain_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _run_commands(self) -> None:
        while True:
            try:
                fn, args = self._commands.get_nowait()
            except queue.Empty:
                return
            fn(*args)

    def _flush(self) -> None:
        """Send queued messages while ZeroMQ takes them; the rest waits for POLLOUT."""
        while self._outgoing:
            frames = self._outgoing[0]
            big = any(not isinstance(f, bytes) or len(f) >= 65536 for f in frames[1:])
            try:
                self.sock.send_multipart(frames, zmq.NOBLOCK, copy=not big)
            except zmq.Again:
                return
            self._outgoing.popleft()
            self._last_sent = time.monotonic()

    def _receive(self) -> None:
        """Receive what has arrived (a batch at most) and route it under one lock."""
        messages = []
        for _ in range(RECEIVE_BATCH):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                header, data = unpack(frames)
            except ProtocolError:
                continue  # a message this client cannot read is dropped
            messages.append((header, [f.buffer for f in data]))
        with self.lock:
            for header, data in messages:
                self._route(header, data)
        self._notify()

    def _route(self, header: dict[str, Any], data: list) -> None:
        """Hand one message to its job or its request (under the lock)."""
        kind, req = header["type"], header.get("req")
        record = self.jobs.get(header.get("job")) if kind in _JOB_EVENTS else None
        if kind in ("info", "accepted"):
            self._learn(header)
        if record is not None:
            record.add(Event(kind, header, data))
        elif isinstance(req, str) and req.startswith("_"):
            self._internal(req, header)
        elif isinstance(req, str) and req in self.waiting:
            if kind == "accepted" and req in self.submits:
                self._register(header, self.submits.pop(req))
            self.replies[req] = (header, data)
        elif kind == "accepted" and req in self.abandoned:  # its caller gave up waiting
            self.abandoned.discard(req)
            self._queue(pack("cancel", job=header.get("job"), token=header.get("token")))
        elif kind == "error" and header.get("code") == "server_failed":
            why = ServerGone(f"the server at {self.address}: {header.get('message')}")
            self._fail_requests(why)
            self._lose_jobs(why)

    def _learn(self, header: dict[str, Any]) -> None:
        """Keep what ``info`` (or an ``accepted`` that carries them) says about the server."""
        for key in ("heartbeat_s", "client_timeout", "limits"):
            if key in header:
                self.info[key] = header[key]
        if header["type"] == "info":
            self.info.update(header)

    def _register(self, header: dict[str, Any], sub: Submission) -> None:
        """An accepted submit: record the job and queue its uploads straight away."""
        job_id, token = header["job"], header["token"]
        record = self.jobs[job_id] = JobRecord(job_id, token, sub.names(), sub.frames)
        record.segments, record.outs = dict(sub.segments), sub.outs.take()
        for index, frame in enumerate(sub.frames):
            if frame is not None:
                self._queue(pack("upload", [frame], job=job_id, token=token, index=index))

    def _internal(self, req: str, header: dict[str, Any]) -> None:
        """Replies to the requests the I/O thread makes itself."""
        kind, _, job_id = req.partition(":")
        record = self.jobs.get(job_id)
        if kind == "_attach" and record is not None and header["type"] == "error":
            record.lost = ServerGone(
                f"job {job_id}: the server no longer has it after the reconnect "
                f"({header.get('message')}); it restarted, or cancelled the job when this "
                "client was silent for its client_timeout"
            )
        elif kind == "_sync" and record is not None and header["type"] == "status":
            if header.get("state") in JOB_STATES_FINAL and not record.done:
                record.add(_lost_done(job_id, header["state"]))

    def _queue(self, frames: list) -> None:
        self._outgoing.append(frames)

    def _watch(self) -> None:
        """Read the monitor: what happened to the connection."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            with self.lock:
                self._on_monitor(event)
        self._notify()

    def _on_monitor(self, event: int) -> None:
        """One connection event (under the lock)."""
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._connected()
        elif event == zmq.EVENT_CONNECT_RETRIED:
            self.retries += 1
            if self.dropped is not None and self.retries > 0:  # refused: nobody to re-attach to
                self._lose_jobs(ServerGone(f"{self.dropped}; nothing listens there any more"))
        elif event == zmq.EVENT_DISCONNECTED and self.connected:
            self._drop(
                f"lost the connection to {self.address}: the server stopped or died, "
                "the network failed, or it dropped a message over its size limit"
            )
        elif event in _REFUSALS:
            hint = (
                "this client's key is not among the server's allowed keys, or the server key "
                "is wrong"
                if self.curve_keys
                else "the server requires CURVE: pass --curve-keys DIR"
            )
            self.fatal = CurveRefused(f"{self.address} refused the connection: {hint}")

    def _connected(self) -> None:
        """A handshake succeeded: learn the server's rates; after a drop, re-attach."""
        was_dropped = self.dropped is not None
        self.connected, self.retries, self.dropped, self._give_up_at = True, 0, None, None
        self._queue(pack("info", req="_info"))
        if was_dropped:
            for record in [r for r in self.jobs.values() if r.open]:
                self._reattach(record)

    def _reattach(self, record: JobRecord) -> None:
        """Take a job over on the new connection; send again uploads that may be lost."""
        job_id, token = record.id, record.token
        held = bool(record.segments)  # results may still go into this client's segments
        self._queue(pack("attach", req=f"_attach:{job_id}", job=job_id, token=token, segments=held))
        if record.uploads:
            for index in record.unfinished():
                frame = record.uploads[index]
                if frame is not None:
                    self._queue(pack("upload", [frame], job=job_id, token=token, index=index))
        self._queue(pack("status", req=f"_sync:{job_id}", job=job_id, token=token))

    def _drop(self, why: str, reopened: bool = False) -> None:
        """The connection is down: requests in flight fail; jobs wait for a reconnect for as
        long as the server keeps them (its ``client_timeout``)."""
        # libzmq announces the reconnect it schedules after a drop as one "retry" of its own;
        # a fresh socket's first retry already means a refused attempt.
        self.connected, self.retries = False, 0 if reopened else -1
        self.dropped = ServerGone(why)
        self._fail_requests(self.dropped)
        self.abandoned.clear()  # no reply can come on a new connection
        grace = self.info.get("client_timeout") or FALLBACK_CLIENT_TIMEOUT_S
        self._give_up_at = time.monotonic() + grace

    def _fail_requests(self, error: ImgprocError) -> None:
        for req in self.waiting - self.replies.keys():
            self.replies[req] = type(error)(str(error))

    def _lose_jobs(self, error: ImgprocError) -> None:
        for record in self.jobs.values():
            if record.open:
                record.lost = type(error)(str(error))
                record.release_segments()
        self._give_up_at = None

    def _unfinished(self) -> bool:
        return any(r.open for r in self.jobs.values())

    def _timers(self) -> None:
        """Heartbeat when due; give up on a connection that did not come back."""
        now = time.monotonic()
        with self.lock:
            quiet = now - self._last_sent >= self.heartbeat_s()
            if self.connected and quiet and not self._outgoing and self._unfinished():
                self._queue(pack("heartbeat"))
            given_up = self._give_up_at is not None and now >= self._give_up_at
            if given_up:
                self._lose_jobs(ServerGone(f"{self.dropped}; it did not come back"))
        if given_up:
            self._notify()

    def _reopen(self, why: str) -> None:
        """Close the socket and connect a new one (ZeroMQ queues nothing across)."""
        self._close_sockets(linger=0)
        self._open()
        with self.lock:
            self._drop(why, reopened=True)
        self._notify()

    def _begin_close(self, linger: float) -> None:
        self._closing_at = time.monotonic() + linger

    def _close_sockets(self, linger: float) -> None:
        if self.sock.closed:
            return
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=int(linger * 1000))

    def _shut(self) -> None:
        """Close everything; every wait still running ends with an error that says so."""
        left = 0.0 if self._closing_at is None else max(0.0, self._closing_at - time.monotonic())
        self._close_sockets(linger=left)
        with self.lock:
            if self.fatal is None:
                self.fatal = ImgprocError(f"the client of {self.address} is closed")
            self.connected = False
        self._close_pipe()
        self._notify()

    def _close_pipe(self) -> None:
        with self._pipe_lock:
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1


def _lost_done(job_id: str, state: str) -> Event:
    """A ``done`` for a job whose own ``done`` went to a connection that dropped."""
    message = "the job ended while its messages went to a connection that dropped"
    header = {"v": 2, "type": "done", "job": job_id, "state": state, "message": message}
    return Event("done", {**header, "stats": {}})


def _configure_curve(sock: zmq.Socket, keys: Path) -> None:
    from zmq.auth import load_certificate

    public, secret = load_certificate(keys / "client.key_secret")
    server_public, _ = load_certificate(keys / "server.key")
    sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server_public

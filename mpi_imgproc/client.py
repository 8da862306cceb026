"""Python API for the cluster: ``Client(address).submit(images, pipeline)`` → a job handle.

>>> with Client("tcp://127.0.0.1:5555") as client:          # doctest: +SKIP
...     job = client.submit(["a.png", "b.jpg"], ["grayscale", "gaussian_blur:ksize=9"])
...     for event in job.events():
...         print(event.type, event.header)
...     result = job.result(timeout=60)

One DEALER socket carries every job of a client; the client routes incoming messages to the
job they belong to, so several jobs can be in flight at once from one thread.  While it waits
it sends heartbeats, so the server knows it is still there.  Sockets are not thread-safe: use
one ``Client`` per thread.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import recv_monitor_message

from .errors import ImgprocError, LimitExceeded
from .imageio import decode
from .pipeline import Pipeline
from .protocol import pack, raw_fields, unpack

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
HEARTBEAT_INTERVAL = 5.0
# ZeroMQ-level heartbeats: the server's I/O thread answers them even while rank 0 is busy, so
# silence past the timeout means the server (or the network to it) is gone.
ZMTP_HEARTBEAT_MS, ZMTP_TIMEOUT_MS = 1000, 6000
_MONITOR_EVENTS = (
    zmq.EVENT_CONNECT_RETRIED
    | zmq.EVENT_HANDSHAKE_SUCCEEDED
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_DISCONNECTED
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
        if self.header.get("encoding") == "raw":
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

    @property
    def ok(self) -> bool:
        return self.state == "done" and not self.errors


class Job:
    """A submitted job: iterate its events, wait for its result, or cancel it.

    ``id`` and ``token`` together are the job's ticket: only their holder may see, cancel or
    re-attach to it (see :meth:`Client.attach`).
    """

    def __init__(self, client: Client, job_id: str, token: str, names: list[str]):
        self.client = client
        self.id = job_id
        self.token = token
        self.names = names
        self.queue: deque[Event] = deque()
        self.done = False
        self.results: list[Event | None] = [None] * len(names)  # decoded only when asked
        self.errors: dict[int, tuple[str, str]] = {}
        self.final: Event | None = None
        self.lost: ServerUnavailable | None = None  # set when the connection is lost

    def _record(self, event: Event) -> None:
        index = event.header.get("index")
        if event.type == "result" and isinstance(index, int) and 0 <= index < len(self.names):
            self.results[index] = event
        elif event.type == "image_error" and isinstance(index, int):
            self.errors[index] = (event.header.get("code", ""), event.header.get("message", ""))
        elif event.type == "done":
            self.done, self.final = True, event
        self.queue.append(event)

    def _check(self) -> None:
        """Raise the connection's loss, once the messages that arrived before it are read."""
        if self.lost is not None and not self.done:
            self.client._drain()
            if not self.done:
                raise self.lost

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Yield events as they come until ``done`` (``timeout``: the longest silence).

        Raises ServerGone if the connection is lost first (the client notices within
        seconds, through ZeroMQ's heartbeats), ServerTimeout after ``timeout`` of silence.
        """
        while True:
            while self.queue:
                event = self.queue.popleft()
                yield event
                if event.type == "done":
                    return
            if self.done:
                return
            self._check()
            if not self.queue:
                self.client._pump(timeout)

    def result(self, timeout: float | None = None) -> JobResult:
        """Wait for the job to end and return its images and errors."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
            self._check()
            if self.done:
                break
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if left == 0.0:
                raise ServerTimeout(f"job {self.id} not done within {timeout} s")
            self.client._pump(left)
        self.queue.clear()
        assert self.final is not None
        h = self.final.header
        return JobResult(
            self.id,
            h["state"],
            [e.image() if e is not None else None for e in self.results],
            self.errors,
            h.get("stats", {}),
            h.get("message"),
        )

    def cancel(self) -> dict[str, Any]:
        """Ask the server to cancel this job."""
        return self.client.request("cancel", job=self.id, token=self.token)[0]

    def status(self) -> dict[str, Any]:
        """The server's view of this job."""
        return self.client.request("status", job=self.id, token=self.token)[0]


class Client:
    """A connection to one server.

    ``curve_keys``: a folder from ``mpi-imgproc keys``.  ``timeout``: how long to wait for a
    direct reply.  ``heartbeat``: the longest silence towards the server; keep it under a third
    of the server's ``--client-timeout`` (``info`` reports it).

    Every wait is bounded and every failure says which case it is: :class:`NothingListening`,
    :class:`CurveRefused`, :class:`ServerGone` (the connection dropped, or the server reported
    its own failure), :class:`RequestTooLarge` (checked against the server's ``info`` before
    anything is sent), :class:`ServerTimeout` (connected, but no answer in time) and
    :class:`ServerError` (the server refused the request, with its code).
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        curve_keys: str | Path | None = None,
        timeout: float = 30.0,
        heartbeat: float = HEARTBEAT_INTERVAL,
    ):
        self.address = address
        self.timeout = timeout
        self.heartbeat = heartbeat
        self.curve = curve_keys is not None
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, ZMTP_HEARTBEAT_MS)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ZMTP_TIMEOUT_MS)
        self.monitor = self.sock.get_monitor_socket(_MONITOR_EVENTS)
        try:
            if curve_keys:
                _configure_curve(self.sock, Path(curve_keys))
            self.sock.connect(address)
        except (zmq.ZMQError, OSError, ValueError) as exc:
            self.close()
            raise ImgprocError(
                f"invalid server address {address!r} or keys ({exc}); "
                "expected e.g. tcp://127.0.0.1:5555"
            ) from None
        self.jobs: dict[str, Job] = {}
        self.replies: dict[str, tuple[dict, list]] = {}
        self.limits: dict[str, int] | None = None
        self._ids = itertools.count(1)
        self._last_sent = time.monotonic()
        self.connected = False  # a handshake has succeeded (and no disconnect since)
        self.refused: CurveRefused | None = None
        self.retries = 0
        self.lost: ServerGone | None = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, linger: float = 2.0) -> None:
        """Close the socket, waiting up to ``linger`` seconds for uploads still queued to go
        out.  The server keeps this client's jobs for ``attach`` until it has been silent for
        the server's ``client_timeout``, then cancels them."""
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=int(linger * 1000))

    # -- requests ---------------------------------------------------------------------------

    def submit(
        self,
        images: Sequence[str | Path | np.ndarray],
        pipeline: Pipeline | Sequence[str] | list[dict],
        tile: int | str = "auto",
        names: Sequence[str] | None = None,
        result: str = "raw",
    ) -> Job:
        """Send images (paths: file bytes; arrays: raw pixels) with a pipeline; returns a Job.

        The pipeline is validated here first, and the request is checked against the server's
        limits, so a bad op or an oversized request fails before any image data is sent.
        """
        if not isinstance(pipeline, Pipeline):
            pipeline = (
                Pipeline.parse(pipeline)
                if all(isinstance(p, str) for p in pipeline)
                else Pipeline.from_json(list(pipeline))
            )
        descs, frames = [], []
        for i, image in enumerate(images):
            name = (
                names[i]
                if names
                else (Path(image).name if not isinstance(image, np.ndarray) else f"image{i}")
            )
            if isinstance(image, np.ndarray):
                image = np.ascontiguousarray(image)
                descs.append({"name": name, "size": image.nbytes, **raw_fields(image)})
                frames.append(image)
            else:
                data = Path(image).read_bytes()
                descs.append({"name": name, "encoding": "file", "size": len(data)})
                frames.append(data)
        self._check_limits(descs)
        header, _ = self.request(
            "submit", pipeline=pipeline.to_json(), images=descs, tile=tile, result=result
        )
        job = Job(self, header["job"], header["token"], [d["name"] for d in descs])
        self.jobs[job.id] = job
        for index, frame in enumerate(frames):
            upload = pack("upload", [frame], job=job.id, token=job.token, index=index)
            self.sock.send_multipart(upload, copy=len(frame) < 65536)
        self._last_sent = time.monotonic()
        return job

    def _check_limits(self, descs: list[dict[str, Any]]) -> None:
        """Refuse here what the server would refuse, before sending a byte of image data."""
        if self.limits is None:
            self.limits = self.info().get("limits", {})
        size, limit = sum(d["size"] for d in descs), self.limits.get("max_request_bytes")
        if limit is not None and size > limit:
            raise RequestTooLarge(
                f"{len(descs)} images of {size} bytes are over the server's limit of "
                f"{limit} bytes per request (--max-request-mb); submit fewer at a time"
            )
        most = self.limits.get("max_images")
        if most is not None and len(descs) > most:
            raise RequestTooLarge(f"{len(descs)} images in one request; the server takes {most}")

    def attach(self, job_id: str, token: str, names: Sequence[str] = ()) -> Job:
        """Take over a job submitted through another connection (after a reconnect or a
        restart of this program): its undelivered messages come here from now on."""
        header, _ = self.request("attach", job=job_id, token=token)
        job = Job(self, job_id, token, list(names) or [""] * header["images_total"])
        self.jobs[job_id] = job
        return job

    def status(self, job_id: str, token: str) -> dict[str, Any]:
        """``status`` of a job (its owner only: ``token`` is from ``accepted``)."""
        return self.request("status", job=job_id, token=token)[0]

    def cancel(self, job_id: str, token: str) -> dict[str, Any]:
        """Cancel a job (its owner only); returns its state afterwards."""
        return self.request("cancel", job=job_id, token=token)[0]

    def info(self) -> dict[str, Any]:
        """Ranks, hosts, engines, versions, queue and limits of the server."""
        return self.request("info")[0]

    def request(self, kind: str, frames: Sequence[Any] = (), **fields: Any) -> tuple[dict, list]:
        """Send one request and wait for its direct reply (raises ServerError on ``error``)."""
        if self.lost is not None and not self.connected:
            self.lost = None  # a new request may find a server again
        req = f"r{next(self._ids)}"
        self.sock.send_multipart(pack(kind, frames, req=req, **fields), copy=len(frames) == 0)
        self._last_sent = time.monotonic()
        deadline = time.monotonic() + self.timeout
        while req not in self.replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._silence(f"no reply to {kind} within {self.timeout:g} s")
            self._pump(left, waiting_for_reply=True)
        header, data = self.replies.pop(req)
        if header["type"] == "error":
            raise ServerError(header.get("code", "error"), header.get("message", ""))
        return header, data

    def poll_events(self, timeout: float | None = None) -> list[tuple[Job, Event]]:
        """Wait (at most ``timeout``) for messages about any of this client's jobs; return
        every event that has arrived, oldest first.  Finished jobs are forgotten."""
        if not any(job.queue for job in self.jobs.values()):
            for job in self.jobs.values():
                job._check()
            self._pump(timeout)
        events = []
        for job in list(self.jobs.values()):
            while job.queue:
                events.append((job, job.queue.popleft()))
            if job.done:
                del self.jobs[job.id]
        return events

    # -- the receive side ---------------------------------------------------------------

    def _heartbeat(self) -> None:
        """Tell the server we are still here, at least every ``heartbeat`` seconds —
        also while messages keep arriving, since the server hears only what we send."""
        if time.monotonic() - self._last_sent >= self.heartbeat:
            self.sock.send_multipart(pack("heartbeat"))
            self._last_sent = time.monotonic()

    def _silence(self, what: str) -> ServerUnavailable | ServerTimeout:
        """The error for a wait that ran out, by what the connection has seen."""
        if self.refused is not None:
            return self.refused
        if self.lost is not None:
            return self.lost
        if not self.connected:
            why = "connection refused" if self.retries else "no connection made"
            return NothingListening(
                f"{what}: nothing is listening at {self.address} ({why}; is the server "
                "running, and at that address?)"
            )
        return ServerTimeout(f"{what}: connected to {self.address}, but the server is silent")

    def _pump(self, timeout: float | None, waiting_for_reply: bool = False) -> None:
        """Receive one message (waiting at most ``timeout``) and route it; heartbeat meanwhile.

        Raises at once what cannot get better by waiting: a refused handshake, a lost
        connection (for a job or a request in flight).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        while True:
            self._heartbeat()
            wait = (
                self.heartbeat
                if deadline is None
                else min(self.heartbeat, max(0.0, deadline - time.monotonic()))
            )
            ready = dict(poller.poll(int(wait * 1000)))
            if self.monitor in ready:
                self._watch()
            if self.refused is not None:
                raise self.refused
            if self.sock in ready:
                self._receive()
                return
            if self.lost is not None and (waiting_for_reply or self._unfinished()):
                raise self.lost
            if deadline is not None and time.monotonic() >= deadline:
                raise self._silence(f"no message within {timeout:g} s")

    def _receive(self) -> None:
        """Receive one message and route it to its job or request."""
        header, data = unpack(self.sock.recv_multipart(copy=False))
        data = [f.buffer for f in data]
        job = self.jobs.get(header.get("job")) if header["type"] in _JOB_EVENTS else None
        if job is not None:
            job._record(Event(header["type"], header, data))
        elif isinstance(header.get("req"), str):
            self.replies[header["req"]] = (header, data)
        elif header["type"] == "error" and header.get("code") == "server_failed":
            self._lose(ServerGone(f"the server at {self.address}: {header.get('message')}"))

    def _drain(self) -> None:
        """Route every message that has already arrived."""
        while self.sock.poll(0, zmq.POLLIN):
            self._receive()

    def _unfinished(self) -> bool:
        return any(not job.done for job in self.jobs.values())

    def _watch(self) -> None:
        """Read the socket's monitor events: what happened to the connection."""
        while self.monitor.poll(0):
            event = recv_monitor_message(self.monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected, self.retries = True, 0
            elif event == zmq.EVENT_CONNECT_RETRIED:
                self.retries += 1
            elif event == zmq.EVENT_DISCONNECTED and self.connected:
                self.connected = False
                self._lose(
                    ServerGone(
                        f"lost the connection to {self.address}: the server stopped or died, "
                        "the network failed, or it dropped a message over its size limit"
                    )
                )
            elif event in (
                zmq.EVENT_HANDSHAKE_FAILED_AUTH,
                zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL,
            ):
                hint = (
                    "this client's key is not among the server's allowed keys, or the "
                    "server key is wrong"
                    if self.curve
                    else "the server requires CURVE: pass --curve-keys DIR"
                )
                self.refused = CurveRefused(f"{self.address} refused the connection: {hint}")

    def _lose(self, error: ServerGone) -> None:
        """The connection is gone: every unfinished job's wait ends with ``error``."""
        self.lost = error
        for job in self.jobs.values():
            if not job.done:
                job.lost = error


_JOB_EVENTS = ("progress", "result", "image_error", "done")


def _configure_curve(sock: zmq.Socket, keys: Path) -> None:
    from zmq.auth import load_certificate

    public, secret = load_certificate(keys / "client.key_secret")
    server_public, _ = load_certificate(keys / "server.key")
    sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server_public

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

from .errors import ImgprocError
from .imageio import decode
from .pipeline import Pipeline
from .protocol import pack, raw_fields, unpack

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
HEARTBEAT_INTERVAL = 5.0


class ServerError(ImgprocError):
    """The server refused a request; ``code`` is the protocol's error code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class ServerTimeout(ImgprocError):
    """No answer from the server in time (is it running, and at that address?)."""

    code = "timeout"


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
    """A submitted job: iterate its events, wait for its result, or cancel it."""

    def __init__(self, client: Client, job_id: str, names: list[str]):
        self.client = client
        self.id = job_id
        self.names = names
        self.queue: deque[Event] = deque()
        self.done = False
        self.results: list[Event | None] = [None] * len(names)  # decoded only when asked
        self.errors: dict[int, tuple[str, str]] = {}
        self.final: Event | None = None

    def _record(self, event: Event) -> None:
        if event.type == "result":
            self.results[event.header["index"]] = event
        elif event.type == "image_error":
            self.errors[event.header["index"]] = (event.header["code"], event.header["message"])
        elif event.type == "done":
            self.done, self.final = True, event
        self.queue.append(event)

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Yield events as they come until ``done`` (``timeout``: the longest silence)."""
        while True:
            while self.queue:
                event = self.queue.popleft()
                yield event
                if event.type == "done":
                    return
            if self.done:
                return
            self.client._pump(timeout)

    def result(self, timeout: float | None = None) -> JobResult:
        """Wait for the job to end and return its images and errors."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done:
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
        return self.client.cancel(self.id)

    def status(self) -> dict[str, Any]:
        """The server's view of this job."""
        return self.client.status(self.id)


class Client:
    """A connection to one server.

    ``curve_keys``: a folder from ``mpi-imgproc keys``.  ``timeout``: how long to wait for a
    direct reply.  ``heartbeat``: the longest silence towards the server; keep it under a third
    of the server's ``--client-timeout`` (``info`` reports it).
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
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        if curve_keys:
            _configure_curve(self.sock, Path(curve_keys))
        try:
            self.sock.connect(address)
        except zmq.ZMQError as exc:
            self.sock.close()
            raise ImgprocError(
                f"invalid server address {address!r} ({exc}); expected e.g. tcp://127.0.0.1:5555"
            ) from None
        self.jobs: dict[str, Job] = {}
        self.replies: dict[str, tuple[dict, list]] = {}
        self._ids = itertools.count(1)
        self._last_sent = time.monotonic()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the socket (the server cancels this client's unfinished jobs)."""
        self.sock.close(linger=0)

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

        The pipeline is validated here first, so a bad op fails before anything is sent.
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
                descs.append({"name": name, **raw_fields(image)})
                frames.append(image)
            else:
                descs.append({"name": name, "encoding": "file"})
                frames.append(Path(image).read_bytes())
        header, _ = self.request(
            "submit", frames, pipeline=pipeline.to_json(), images=descs, tile=tile, result=result
        )
        job = Job(self, header["job"], [d["name"] for d in descs])
        self.jobs[job.id] = job
        return job

    def status(self, job_id: str) -> dict[str, Any]:
        """``status`` of a job (any client may ask)."""
        return self.request("status", job=job_id)[0]

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job (any client may ask); returns its state afterwards."""
        return self.request("cancel", job=job_id)[0]

    def info(self) -> dict[str, Any]:
        """Ranks, hosts, engines, versions, queue and limits of the server."""
        return self.request("info")[0]

    def request(self, kind: str, frames: Sequence[Any] = (), **fields: Any) -> tuple[dict, list]:
        """Send one request and wait for its direct reply (raises ServerError on ``error``)."""
        req = f"r{next(self._ids)}"
        self.sock.send_multipart(pack(kind, frames, req=req, **fields), copy=len(frames) == 0)
        self._last_sent = time.monotonic()
        deadline = time.monotonic() + self.timeout
        while req not in self.replies:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ServerTimeout(
                    f"no reply from {self.address} within {self.timeout:g} s "
                    "(is the server running at that address?)"
                )
            self._pump(left)
        header, data = self.replies.pop(req)
        if header["type"] == "error":
            raise ServerError(header.get("code", "error"), header.get("message", ""))
        return header, data

    def poll_events(self, timeout: float | None = None) -> list[tuple[Job, Event]]:
        """Wait (at most ``timeout``) for messages about any of this client's jobs; return
        every event that has arrived, oldest first.  Finished jobs are forgotten."""
        if not any(job.queue for job in self.jobs.values()):
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

    def _pump(self, timeout: float | None) -> None:
        """Receive one message (waiting at most ``timeout``) and route it; heartbeat meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._heartbeat()
            wait = (
                self.heartbeat
                if deadline is None
                else min(self.heartbeat, max(0.0, deadline - time.monotonic()))
            )
            if self.sock.poll(int(wait * 1000), zmq.POLLIN):
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise ServerTimeout(
                    f"no message from {self.address} within {timeout:g} s "
                    "(is the server running at that address?)"
                )
        header, data = unpack(self.sock.recv_multipart(copy=False))
        data = [f.buffer for f in data]
        job = self.jobs.get(header.get("job")) if header["type"] in _JOB_EVENTS else None
        if job is not None:
            job._record(Event(header["type"], header, data))
        elif "req" in header:
            self.replies[header["req"]] = (header, data)


_JOB_EVENTS = ("progress", "result", "image_error", "done")


def _configure_curve(sock: zmq.Socket, keys: Path) -> None:
    from zmq.auth import load_certificate

    public, secret = load_certificate(keys / "client.key_secret")
    server_public, _ = load_certificate(keys / "server.key")
    sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server_public

"""Python API for the cluster: ``Client(address).submit(images, pipeline)`` → a job handle.

>>> with Client("tcp://127.0.0.1:5555") as client:          # doctest: +SKIP
...     job = client.submit(["a.png", "b.jpg"], ["grayscale", "gaussian_blur:ksize=9"])
...     for event in job.events():
...         print(event.type, event.header)
...     result = job.result(timeout=60)
...     for item in client.map(paths, ["invert"], window=4):   # any number of files
...         print(item.name, item.error or item.image().shape)

The connection lives in :class:`mpi_imgproc.connection.Connection`: one I/O thread owns the
DEALER socket (ZeroMQ sockets are not thread-safe), sends, receives, heartbeats at the rate the
server asks for and re-attaches the jobs after a reconnect, whatever the application does
meanwhile.  The synchronous :class:`Client` here and :class:`mpi_imgproc.aio.AsyncClient` are
two faces of that one core.  A ``Client`` may be shared by threads.  The full reference is
``docs/api.md``.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .connection import (
    DEFAULT_ADDRESS,
    LOST_MESSAGE,
    WRITTEN,
    Connection,
    CurveRefused,
    Event,
    JobRecord,
    JobResult,
    NothingListening,
    RequestTooLarge,
    ServerError,
    ServerGone,
    ServerTimeout,
    ServerUnavailable,
    Submission,
    _within,
    as_pipeline,
    check_limits,
    default_name,
    load_image,
    prepare_submit,
    probe_segment,
    released_if_refused,
    released_if_unsent,
    shares_memory,
    written,
)
from .errors import ImageReadError, ImgprocError, InvalidParameter
from .pipeline import Pipeline
from .protocol import pack

__all__ = [
    "DEFAULT_ADDRESS",
    "Client",
    "CurveRefused",
    "Event",
    "Job",
    "JobResult",
    "MapItem",
    "MapStream",
    "NothingListening",
    "RequestTooLarge",
    "ServerError",
    "ServerGone",
    "ServerTimeout",
    "ServerUnavailable",
]


# -- the synchronous face -----------------------------------------------------------------------


class JobHandle:
    """What every job handle shows of its record: ``id`` and ``token`` (together the job's
    ticket: only their holder may see, cancel or re-attach to it), ``names`` and ``done``."""

    def __init__(self, client: Any, record: JobRecord):
        self.client, self._record = client, record

    @property
    def id(self) -> str:
        """The job id."""
        return self._record.id

    @property
    def token(self) -> str:
        """The job's secret token."""
        return self._record.token

    @property
    def names(self) -> list[str]:
        """The images' names, in submit order."""
        return self._record.names

    @property
    def done(self) -> bool:
        """The job's ``done`` has arrived."""
        return self._record.done


class Job(JobHandle):
    """A submitted job: iterate its events, wait for its result, or cancel it (see
    :meth:`Client.attach` for the ticket)."""

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Yield events as they come until ``done`` (``timeout``: the longest silence).

        Raises ServerGone if the connection is lost for good first (the client notices within
        seconds, through ZeroMQ's heartbeats), ServerTimeout after ``timeout`` of silence.
        """
        core, what = self.client._core, f"no word about job {self.id}{_within(timeout)}"
        while True:
            core.wait(lambda: core.job_ready(self._record), timeout)
            event = core.next_event(self._record, what)
            if event is None:
                break
            yield event
            if event.type == "done":
                break
        self.client._forget(self)

    def result(self, timeout: float | None = None) -> JobResult:
        """Wait for the job to end (at most ``timeout``) and return its images and errors."""
        core = self.client._core
        core.wait(lambda: core.job_over(self._record), timeout)
        outcome = core.outcome(self._record, f"job {self.id} not done{_within(timeout)}")
        self.client._forget(self)
        return outcome

    def cancel(self) -> dict[str, Any]:
        """Ask the server to cancel this job; returns its state afterwards."""
        return self.client.request("cancel", job=self.id, token=self.token)[0]

    def status(self) -> dict[str, Any]:
        """The server's view of this job."""
        return self.client.request("status", job=self.id, token=self.token)[0]


class Client:
    """A connection to one server.

    ``curve_keys``: a folder from ``mpi-imgproc keys``.  ``timeout``: how long to wait for a
    direct reply.  ``heartbeat``: at most this many seconds between messages while jobs are
    unfinished; by default (and whenever it is shorter) the server's own ``heartbeat_s``.
    ``shared_memory``: send arrays to a server on this host (same machine, PID and network
    namespaces and user, as its ``info`` says) through shared memory, and take raw results
    back the same way, instead of through the socket (:mod:`mpi_imgproc.shm`); False: always
    the socket.

    Every wait is bounded and every failure says which case it is: :class:`NothingListening`,
    :class:`CurveRefused`, :class:`ServerGone` (the connection dropped and did not come back,
    or the server reported its own failure), :class:`RequestTooLarge` (checked against the
    server's ``info`` before anything is sent), :class:`ServerTimeout` (connected, but no
    answer in time) and :class:`ServerError` (the server refused the request, with its code).
    """

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        curve_keys: str | Path | None = None,
        timeout: float = 30.0,
        heartbeat: float | None = None,
        shared_memory: bool = True,
    ):
        self.address, self.timeout = address, timeout
        self.shared_memory = shared_memory
        self._probed: bool | None = None  # rank 0 can open this process's segments
        self._core = Connection(address, curve_keys, heartbeat)
        self._handles: dict[str, Job] = {}
        # A client dropped without close() still stops its thread (and its heartbeats).
        self._finalizer = weakref.finalize(self, self._core.close, 0.0)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, linger: float = 2.0) -> None:
        """Close the connection, waiting up to ``linger`` seconds for uploads still queued to
        go out.  The server keeps this client's jobs for ``attach`` until it has been silent
        for the server's ``client_timeout``, then cancels them."""
        self._finalizer.detach()
        self._core.close(linger)

    @property
    def heartbeat_s(self) -> float:
        """Seconds between heartbeats now (the server's ``heartbeat_s`` once known)."""
        return self._core.heartbeat_s()

    # -- requests ---------------------------------------------------------------------------

    def submit(
        self,
        images: Sequence[str | Path | np.ndarray],
        pipeline: Pipeline | Sequence[str] | list[dict],
        tile: int | str = "auto",
        names: Sequence[str] | None = None,
        result: str = "raw",
        progress: bool = True,
        out: Sequence[np.ndarray | None] | None = None,
    ) -> Job:
        """Send images (paths: file bytes; arrays: raw pixels) with a pipeline; returns a Job.

        The pipeline is validated here first, and the request is checked against the server's
        limits, so a bad op or an oversized request fails before any image data is sent.
        The images are uploaded as soon as the server accepts (in the background).  To a
        server on this host, arrays (and raw results) go through shared memory instead: an
        array from :func:`mpi_imgproc.shm.shared_array` is not even copied.

        ``out`` (raw results from a server on this host): one array or None per image, a
        whole :func:`mpi_imgproc.shm.shared_array` of the result's shape and dtype, which the
        workers write the result into (``JobResult.images[i]`` is then ``out[i]``): reused
        job after job, that saves the kernel allocating a fresh segment each time.  It may
        not be any image of the submit or another ``out``; while a job writes it, and for
        good after an image that ended without its result, it is refused as an ``out`` and
        as an image (see ``docs/api.md``).
        """
        shared = result == "raw" and self.shared_memory and self._shares_memory()
        sub = prepare_submit(images, pipeline, names, shared, out, result)
        return self._submit(sub, tile, result, progress)

    def _shares_memory(self) -> bool:
        """Whether arrays go through shared memory: the server's info says it may open this
        process's segments, and a probe (once per client) shows it can."""
        self._limits()  # the server's info has come
        if self._probed is None:
            self._probed = False
            if shares_memory(self._core.server_info()):
                probe = probe_segment()
                self._probed = self.info(probe=probe.ref()).get("shm_probe") is True
                probe.close()
        return self._probed

    def _submit(self, sub: Submission, tile: int | str, result: str, progress: bool) -> Job:
        with released_if_unsent(sub):
            check_limits(self._limits(), sub.descs)
            fields = {"pipeline": sub.pipeline, "images": sub.descs, "tile": tile, "result": result}
            req = self._core.request("submit", submission=sub, progress=progress, **fields)
        with released_if_refused(sub):
            header, _ = self._reply(req, "submit")
        return self._handle(self._core.take_job(header))

    def submit_paths(
        self,
        paths: Sequence[str | Path],
        pipeline: Pipeline | Sequence[str] | list[dict],
        output: str | Path,
        result: str = "same",
        overwrite: bool = False,
        tile: int | str = "auto",
        progress: bool = True,
    ) -> Job:
        """A job by reference: ``paths`` are files the server reads itself (under its
        ``--data-root``; absolute, or relative to it), and the results are written into
        ``output`` there; each ``result`` event names the file written (``written``), with no
        pixels.  Nothing but the request crosses the connection."""
        steps = as_pipeline(pipeline).to_json()
        names = [Path(p).name for p in paths]
        sub = Submission(steps, [{"name": n, "size": 0} for n in names], [])  # no uploads
        fields = {"pipeline": steps, "paths": [str(p) for p in paths], "output": str(output)}
        fields.update(result=result, overwrite=overwrite, tile=tile)
        req = self._core.request("submit", submission=sub, progress=progress, **fields)
        header, _ = self._reply(req, "submit")
        return self._handle(self._core.take_job(header))

    def attach(self, job_id: str, token: str, names: Sequence[str] = ()) -> Job:
        """Take over a job submitted through another connection (after a reconnect or a
        restart of this program): its undelivered messages come here from now on."""
        req, record = self._core.attach(job_id, token, names)
        try:
            header, _ = self._reply(req, "attach")
        except ImgprocError:
            self._core.forget(job_id)
            raise
        with self._core.lock:
            record.names = record.names or [""] * header["images_total"]
        return self._handle(record)

    def map(
        self,
        images: Iterable[str | Path | np.ndarray],
        pipeline: Pipeline | Sequence[str] | list[dict],
        window: int = 4,
        chunk: int = 16,
        tile: int | str = "auto",
        result: str = "raw",
        timeout: float | None = None,
        on_submit: Callable[[Job, list[int]], None] | None = None,
    ) -> MapStream:
        """Stream any number of images through the server, at most ``window`` jobs of
        ``chunk`` images in flight; iterate the returned :class:`MapStream` for one
        :class:`MapItem` per image, in the order they complete."""
        return MapStream(self, images, pipeline, window, chunk, tile, result, timeout, on_submit)

    def status(self, job_id: str, token: str) -> dict[str, Any]:
        """``status`` of a job (its owner only: ``token`` is from ``accepted``)."""
        return self.request("status", job=job_id, token=token)[0]

    def cancel(self, job_id: str, token: str) -> dict[str, Any]:
        """Cancel a job (its owner only); returns its state afterwards."""
        return self.request("cancel", job=job_id, token=token)[0]

    def info(self, **fields: Any) -> dict[str, Any]:
        """Ranks, hosts, engines, versions, queue, limits and heartbeat rate of the server."""
        return self.request("info", **fields)[0]

    def request(self, kind: str, frames: Sequence[Any] = (), **fields: Any) -> tuple[dict, list]:
        """Send one request and wait for its direct reply (raises ServerError on ``error``)."""
        return self._reply(self._core.request(kind, frames, **fields), kind)

    def reconnect(self) -> None:
        """Drop the connection and open a new one; unfinished jobs are re-attached by the
        client itself (requests in flight fail with ServerGone)."""
        self._core.reconnect()

    def send_raw(self, frames: list) -> None:
        """Queue one message of raw frames, unchecked (for protocol tests)."""
        self._core.send(frames)

    def poll_events(self, timeout: float | None = None) -> list[tuple[Job, Event]]:
        """Wait (at most ``timeout``) for messages about any of this client's jobs; return
        every event that has arrived, oldest first.  Finished jobs are forgotten."""
        core, jobs = self._core, list(self._handles.values())
        if not jobs:
            return []
        if not core.wait(lambda: any(core.job_ready(j._record) for j in jobs), timeout):
            raise core.why(jobs[0]._record, f"no message{_within(timeout)}")
        events = []
        for job in jobs:
            while (event := core.pop_event(job._record)) is not None:
                events.append((job, event))
            self._forget(job)
        return events

    def _reply(self, req: str, kind: str) -> tuple[dict, list]:
        self._core.wait(lambda: self._core.answered(req), self.timeout)
        return self._core.take_reply(req, kind, self.timeout)

    def _limits(self) -> dict[str, Any]:
        limits = self._core.limits()
        return self.info().get("limits", {}) if limits is None else limits

    def _handle(self, record: JobRecord) -> Job:
        job = Job(self, record)
        self._handles[record.id] = job
        return job

    def _forget(self, job: Job) -> None:
        """The job's end has been read: stop tracking it."""
        if job.done or not job._record.open:
            self._handles.pop(job.id, None)
            self._core.forget(job.id)


# -- map: a bounded window over any number of images --------------------------------------------


@dataclass
class MapItem:
    """One image's outcome in :meth:`Client.map`: its result, or why it has none.

    ``error`` is ``(code, message)``: an ``image_error`` from the server, ``image_read_error``
    or ``limit_exceeded`` found by the client before sending, ``lost`` (the result went to a
    connection that dropped), or the job's state (``cancelled``, ``failed``) for an image its
    job ended without.
    """

    index: int
    source: Any
    name: str
    job: str | None = None
    event: Event | None = None
    error: tuple[str, str] | None = None

    @property
    def ok(self) -> bool:
        """The image has a result."""
        return self.error is None

    def image(self) -> np.ndarray:
        """The result's pixels (decoded if the result came encoded)."""
        if self.event is None or self.event.type != "result":
            raise ImgprocError(f"{self.name}: no result ({self.error})")
        return self.event.image()


class MapStream:
    """The iterator :meth:`Client.map` returns.

    Reads the input lazily, a chunk at a time; submits while fewer than ``window`` of its jobs
    are in flight; yields a :class:`MapItem` per image as results and errors arrive, so
    memory stays flat whatever the number of images.  ``jobs`` lists each finished job's
    ``done`` header; ``in_flight`` and ``most_in_flight`` count jobs.  :meth:`stop` submits
    no more (the jobs in flight still drain); :meth:`close` (also on leaving a ``with``
    block) cancels the jobs still in flight.  ``timeout``: the longest wait for any word.
    """

    def __init__(
        self,
        client: Client,
        images: Iterable[Any],
        pipeline: Pipeline | Sequence[str] | list[dict],
        window: int,
        chunk: int,
        tile: int | str,
        result: str,
        timeout: float | None,
        on_submit: Callable[[Job, list[int]], None] | None,
    ):
        for name, value in (("window", window), ("chunk", chunk)):
            if not isinstance(value, int) or value < 1:
                raise InvalidParameter(f"map: {name} must be an integer >= 1, got {value!r}")
        self.client, self.window, self.chunk = client, window, chunk
        # Progress is not yielded, but keeps ``timeout`` (the longest silence) about the work.
        self.options = {"tile": tile, "result": result, "progress": True}
        self.timeout, self.on_submit = timeout, on_submit
        self.pipeline = as_pipeline(pipeline).to_json()
        self.jobs: list[dict[str, Any]] = []
        self.most_in_flight, self.stopped = 0, False
        self._inputs = enumerate(images)
        self._held: tuple[int, Any, dict, Any] | None = None  # read, waits for the next chunk
        # The pipeline when arrays go through shared memory, False when not (None: not known)
        self._shared: Pipeline | bool | None = None
        self._exhausted = False
        self._flight: dict[str, tuple[Job, list[tuple[int, Any]]]] = {}
        self._ready: deque[MapItem | dict[str, Any]] = deque()

    @property
    def in_flight(self) -> int:
        """Jobs of this map submitted and not yet done."""
        return len(self._flight)

    def __iter__(self) -> MapStream:
        return self

    def __next__(self) -> MapItem:
        while True:
            self._top_up()
            while not self._ready:
                if not self._flight:
                    raise StopIteration
                self._collect()
                self._top_up()
            item = self._ready.popleft()
            if isinstance(item, MapItem):
                return item
            self.jobs.append(item)  # a job's done header, queued behind its last item

    def __enter__(self) -> MapStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stop(self) -> None:
        """Submit no more chunks; the jobs in flight still come through."""
        self.stopped = True

    def close(self) -> None:
        """Stop, and cancel the jobs still in flight (without waiting for the server)."""
        self.stopped = True
        for job, _ in self._flight.values():
            try:
                self.client.send_raw(pack("cancel", job=job.id, token=job.token))
            except ImgprocError:
                pass  # the client is closed: the server cancels them after its timeout
            self.client._core.forget(job.id)
        self._flight.clear()

    def _top_up(self) -> None:
        """Submit chunks while the window has room, input is left and few items wait."""
        while (
            not (self.stopped or self._exhausted)
            and len(self._flight) < self.window
            and len(self._ready) < self.chunk
        ):
            members, sub = self._next_chunk()
            if members:
                self._send(members, sub)

    def _send(self, members: list[tuple[int, Any]], sub: Submission) -> None:
        job = self.client._submit(sub, **self.options)
        self._flight[job.id] = (job, members)
        self.most_in_flight = max(self.most_in_flight, len(self._flight))
        if self.on_submit is not None:
            self.on_submit(job, [index for index, _ in members])

    def _next_chunk(self) -> tuple[list[tuple[int, Any]], Submission]:
        """Read up to ``chunk`` images that fit in one request; unreadable ones and ones over
        the request limit alone become error items at once."""
        limits = self.client._limits()
        most = limits.get("max_request_bytes") or float("inf")
        count = min(self.chunk, limits.get("max_images") or self.chunk)
        members: list[tuple[int, Any]] = []
        sub = Submission(self.pipeline, [], [])
        while len(members) < count:
            loaded, self._held = self._held or self._read(), None
            if loaded is None:
                break
            index, source, desc, frame = loaded
            if desc.get("encoding") == "shm":  # nothing to upload: no size limit to mind
                sub.segments[len(sub.descs)], frame = frame, None
                members.append((index, source))
                sub.descs.append(desc)
                sub.frames.append(frame)
            elif desc["size"] > most:
                self._refuse(index, source, desc["name"], "limit_exceeded", _too_large(desc, most))
            elif members and sub.size + desc["size"] > most:
                self._held = loaded  # it starts the next chunk
                break
            else:
                members.append((index, source))
                sub.descs.append(desc)
                sub.frames.append(frame)
        return members, sub

    def _read(self) -> tuple[int, Any, dict, Any] | None:
        """The next readable input (unreadable ones become error items), None at the end."""
        for index, source in self._inputs:
            name = default_name(source, index)
            if isinstance(source, np.ndarray) and written(source):
                self._refuse(index, source, name, "in_use", f"image {index}: {WRITTEN}")
                continue
            try:
                desc, frame = load_image(source, name, self._shared_pipeline())
            except ImageReadError as exc:
                self._refuse(index, source, name, "image_read_error", str(exc))
                continue
            return index, source, desc, frame
        self._exhausted = True
        return None

    def _shared_pipeline(self) -> Pipeline | None:
        """The pipeline, when arrays go through shared memory (see :class:`Client`)."""
        if self._shared is None:
            client = self.client
            raw = self.options["result"] == "raw" and client.shared_memory
            self._shared = (
                Pipeline.from_json(self.pipeline) if raw and client._shares_memory() else False
            )
        return self._shared or None

    def _refuse(self, index: int, source: Any, name: str, code: str, message: str) -> None:
        self._ready.append(MapItem(index, source, name, error=(code, message)))

    def _collect(self) -> None:
        """Wait for news of any job in flight; turn it into items."""
        core = self.client._core
        flight = list(self._flight.values())
        if not core.wait(lambda: any(core.job_ready(j._record) for j, _ in flight), self.timeout):
            raise core.why(flight[0][0]._record, f"no word about map's jobs{_within(self.timeout)}")
        for job, members in flight:
            while (event := core.pop_event(job._record)) is not None:
                self._take(job, members, event)

    def _take(self, job: Job, members: list[tuple[int, Any]], event: Event) -> None:
        """One event of a job in flight: an item, or the job's end."""
        index = event.header.get("index")
        if event.type == "done":
            self._finish(job, members, event.header)
        elif event.type in ("result", "image_error") and isinstance(index, int):
            error = None
            if event.type == "image_error":
                error = (event.header.get("code", ""), event.header.get("message", ""))
            position, source = members[index]
            self._ready.append(MapItem(position, source, job.names[index], job.id, event, error))

    def _finish(self, job: Job, members: list[tuple[int, Any]], header: dict[str, Any]) -> None:
        """A job is done: an item for each image it ended without; the window has room."""
        state = header.get("state", "done")
        error = ("lost", LOST_MESSAGE) if state == "done" else (state, header.get("message", ""))
        for index in job._record.unfinished():
            position, source = members[index]
            self._ready.append(MapItem(position, source, job.names[index], job.id, None, error))
        self._ready.append(header)  # into ``jobs`` once every item before it is yielded
        del self._flight[job.id]
        self.client._forget(job)


def _too_large(desc: dict[str, Any], most: float) -> str:
    return (
        f"{desc['size']} bytes, over the server's limit of {int(most)} bytes per request "
        "(--max-request-mb)"
    )

"""The asyncio face of the client, on the same connection core as the synchronous ``Client``.

>>> async with AsyncClient("tcp://127.0.0.1:5555") as client:     # doctest: +SKIP
...     job = await client.submit(["a.png", "b.jpg"], ["grayscale", "gaussian_blur:ksize=9"])
...     async for event in job.events(timeout=60):
...         print(event.type, event.header)
...     result = await job.result(timeout=60)

The socket, heartbeats and reconnects live on the :class:`~mpi_imgproc.connection.Connection`'s
I/O thread; a coroutine here only queues messages and awaits an ``asyncio.Event`` that thread
sets, so the event loop never blocks on ZeroMQ (reading files and decoding images run in
``asyncio.to_thread``).  Errors are those of :mod:`mpi_imgproc.client`.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .client import (
    DEFAULT_ADDRESS,
    Connection,
    Event,
    JobHandle,
    JobResult,
    _within,
    check_limits,
    prepare_submit,
    probe_segment,
    released_if_refused,
    released_if_unsent,
    shares_memory,
)
from .errors import ImgprocError
from .pipeline import Pipeline

__all__ = ["AsyncClient", "AsyncJob"]


class AsyncJob(JobHandle):
    """A submitted job, for coroutines: ``await result()``, ``async for`` over ``events()``.

    ``id`` and ``token`` are the job's ticket, as for :class:`mpi_imgproc.client.Job`.
    """

    async def events(self, timeout: float | None = None) -> AsyncIterator[Event]:
        """Yield events as they come until ``done`` (``timeout``: the longest silence).

        Raises ServerGone if the connection is lost for good first, ServerTimeout after
        ``timeout`` of silence.
        """
        core, what = self.client._core, f"no word about job {self.id}{_within(timeout)}"
        while True:
            await core.wait_async(lambda: core.job_ready(self._record), timeout)
            event = core.next_event(self._record, what)
            if event is None:
                break
            yield event
            if event.type == "done":
                break
        core.forget(self.id)

    async def result(self, timeout: float | None = None) -> JobResult:
        """Wait for the job to end (at most ``timeout``) and return its images and errors."""
        core = self.client._core
        await core.wait_async(lambda: core.job_over(self._record), timeout)
        what = f"job {self.id} not done{_within(timeout)}"
        outcome = await asyncio.to_thread(core.outcome, self._record, what)
        core.forget(self.id)
        return outcome

    async def cancel(self) -> dict[str, Any]:
        """Ask the server to cancel this job; returns its state afterwards."""
        return (await self.client.request("cancel", job=self.id, token=self.token))[0]

    async def status(self) -> dict[str, Any]:
        """The server's view of this job."""
        return (await self.client.request("status", job=self.id, token=self.token))[0]


class AsyncClient:
    """A connection to one server, for asyncio code (``async with AsyncClient(addr) as c``).

    The arguments and every error are those of :class:`mpi_imgproc.client.Client`.  One
    ``AsyncClient`` may serve many tasks at once, and other threads' loops too.
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
        self._finalizer = weakref.finalize(self, self._core.close, 0.0)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self, linger: float = 2.0) -> None:
        """Close the connection, sending what is still queued for up to ``linger`` seconds."""
        self._finalizer.detach()
        await asyncio.to_thread(self._core.close, linger)

    @property
    def heartbeat_s(self) -> float:
        """Seconds between heartbeats now (the server's ``heartbeat_s`` once known)."""
        return self._core.heartbeat_s()

    async def submit(
        self,
        images: Sequence[str | Path | np.ndarray],
        pipeline: Pipeline | Sequence[str] | list[dict],
        tile: int | str = "auto",
        names: Sequence[str] | None = None,
        result: str = "raw",
        progress: bool = True,
        out: Sequence[np.ndarray | None] | None = None,
    ) -> AsyncJob:
        """Send images with a pipeline, as :meth:`Client.submit` (``out`` included); returns
        an AsyncJob."""
        limits = await self._limits()  # the server's info has come
        shared = result == "raw" and self.shared_memory and await self._shares_memory()
        sub = await asyncio.to_thread(prepare_submit, images, pipeline, names, shared, out, result)
        with released_if_unsent(sub):
            check_limits(limits, sub.descs)
            fields = {"pipeline": sub.pipeline, "images": sub.descs, "tile": tile, "result": result}
            req = self._core.request("submit", submission=sub, progress=progress, **fields)
        with released_if_refused(sub):
            header, _ = await self._reply(req, "submit")
        return AsyncJob(self, self._core.take_job(header))

    async def attach(self, job_id: str, token: str, names: Sequence[str] = ()) -> AsyncJob:
        """Take over a job submitted through another connection, as :meth:`Client.attach`."""
        req, record = self._core.attach(job_id, token, names)
        try:
            header, _ = await self._reply(req, "attach")
        except ImgprocError:
            self._core.forget(job_id)
            raise
        with self._core.lock:
            record.names = record.names or [""] * header["images_total"]
        return AsyncJob(self, record)

    async def status(self, job_id: str, token: str) -> dict[str, Any]:
        """``status`` of a job (its owner only)."""
        return (await self.request("status", job=job_id, token=token))[0]

    async def cancel(self, job_id: str, token: str) -> dict[str, Any]:
        """Cancel a job (its owner only); returns its state afterwards."""
        return (await self.request("cancel", job=job_id, token=token))[0]

    async def info(self) -> dict[str, Any]:
        """Ranks, hosts, engines, versions, queue, limits and heartbeat rate of the server."""
        return (await self.request("info"))[0]

    async def request(
        self, kind: str, frames: Sequence[Any] = (), **fields: Any
    ) -> tuple[dict, list]:
        """Send one request and await its direct reply (raises ServerError on ``error``)."""
        return await self._reply(self._core.request(kind, frames, **fields), kind)

    def reconnect(self) -> None:
        """Drop the connection and open a new one; unfinished jobs are re-attached."""
        self._core.reconnect()

    async def _reply(self, req: str, kind: str) -> tuple[dict, list]:
        await self._core.wait_async(lambda: self._core.answered(req), self.timeout)
        return self._core.take_reply(req, kind, self.timeout)

    async def _shares_memory(self) -> bool:
        """As :meth:`mpi_imgproc.client.Client._shares_memory`."""
        if self._probed is None:
            self._probed = False
            if shares_memory(self._core.server_info()):
                probe = probe_segment()
                reply = await self.request("info", probe=probe.ref())
                self._probed = reply[0].get("shm_probe") is True
                probe.close()
        return self._probed

    async def _limits(self) -> dict[str, Any]:
        limits = self._core.limits()
        return (await self.info()).get("limits", {}) if limits is None else limits

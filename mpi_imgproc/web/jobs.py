"""The web app's jobs: uploads checked one by one, submitted through the cluster's client,
their events recorded for every browser that asks, their results kept within a byte budget.

The app is one more user of the cluster: it holds an :class:`~mpi_imgproc.aio.AsyncClient`
and nothing else.  Each upload is checked here before a byte reaches the server (size, then
pixels from the header alone), and a file that fails a check fails alone: it gets an
``image_error`` in the job's event list and the others go on.  Web job ids are random (a
browser that knows one may see and cancel that job, so they must not be guessable).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..aio import AsyncClient, AsyncJob
from ..connection import ServerError, ServerUnavailable
from ..errors import ImgprocError, LimitExceeded
from ..imageio import probe

MB = 2**20
SUFFIXES = {
    b"\x89PNG": ".png",
    b"\xff\xd8\xff": ".jpg",
    b"II*\x00": ".tif",
    b"MM\x00*": ".tif",
    b"BM": ".bmp",
}
DISPLAYABLE = {".png": "image/png", ".jpg": "image/jpeg", ".bmp": "image/bmp"}


@dataclass(frozen=True)
class Limits:
    """What one request and the whole app may hold; every bound has a flag in ``web``."""

    max_files: int = 32
    max_file_bytes: int = 64 * MB
    max_request_bytes: int = 256 * MB
    max_pixels: int = 50_000_000
    max_pipeline_bytes: int = 16 * 1024
    max_jobs: int = 64
    max_store_bytes: int = 1024 * MB
    max_name_chars: int = 120


class UploadRefused(ImgprocError):
    """A request refused whole (too many files, too many bytes, a bad pipeline field)."""

    code = "limit_exceeded"

    def __init__(self, message: str, status: int = 413):
        super().__init__(message)
        self.status = status
        self.code = "limit_exceeded" if status == 413 else "malformed"


def safe_name(name: str | None, index: int, most: int) -> str:
    """A file name fit to show and to put in a zip: the last path part, printable, bounded."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip().lstrip(".")
    return base[:most] or f"image{index}"


def sniff_suffix(head: bytes) -> str:
    """The file suffix of an upload, from its first bytes (the client's name is not trusted)."""
    for magic, suffix in SUFFIXES.items():
        if head.startswith(magic):
            return suffix
    return ".bin"


def check_upload(data: bytes, limits: Limits, server_pixels: int | None) -> str | None:
    """Why this one upload cannot be sent (``None``: it may be); read from its header only."""
    if not data:
        return "empty file (0 bytes)"
    if len(data) > limits.max_file_bytes:
        return f"{len(data)} bytes; the limit is {limits.max_file_bytes} bytes per file"
    shape = probe(data)
    most = min(limits.max_pixels, server_pixels or limits.max_pixels)
    if shape is not None and shape[0] * shape[1] > most:
        return f"{shape[1]}x{shape[0]} is {shape[0] * shape[1]} pixels; the limit is {most}"
    return None


@dataclass
class WebJob:
    """One submit from a browser: its images, what happened to each, and its event log."""

    id: str
    names: list[str]
    folder: Path
    inputs: list[Path | None]
    pipeline: list[Any]
    submitted: float = field(default_factory=time.time)
    state: str = "queued"
    results: dict[int, bytes] = field(default_factory=dict)
    errors: dict[int, tuple[str, str]] = field(default_factory=dict)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    progress: dict[str, int] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    message: str | None = None
    ended: float | None = None
    remote: AsyncJob | None = None
    sent: list[int] = field(default_factory=list)  # web index of each server index
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    @property
    def finished(self) -> bool:
        """The job's ``done`` has been recorded."""
        return self.ended is not None

    @property
    def size(self) -> int:
        """Bytes this job holds in memory (its results) and on disk (its inputs)."""
        on_disk = sum(p.stat().st_size for p in self.inputs if p is not None and p.exists())
        return on_disk + sum(len(r) for r in self.results.values())

    def summary(self) -> dict[str, Any]:
        """What ``GET /api/jobs/{id}`` answers."""
        return {
            "job": self.id,
            "state": self.state,
            "names": self.names,
            "images_total": len(self.names),
            "results": sorted(self.results),
            "errors": {str(i): {"code": c, "message": m} for i, (c, m) in self.errors.items()},
            "progress": self.progress,
            "stats": self.stats,
            "message": self.message,
            "submitted": self.submitted,
            "ended": self.ended,
        }

    async def record(self, kind: str, fields: dict[str, Any]) -> None:
        """Append one event (with seconds since submit) and wake every stream waiting."""
        fields = {"t": round(time.time() - self.submitted, 4), **fields}
        async with self.changed:
            self.events.append((kind, fields))
            self.changed.notify_all()

    async def stream(self, start: int = 0) -> AsyncIterator[tuple[int, str, dict[str, Any]]]:
        """Every event from number ``start`` on, as they come, until ``done``."""
        seen = start
        while True:
            async with self.changed:
                while seen >= len(self.events):
                    if self.finished:
                        return
                    await self.changed.wait()
                batch = self.events[seen:]
            for kind, fields in batch:
                yield seen, kind, fields
                seen += 1
                if kind == "done":
                    return


class JobStore:
    """Every job of the app, oldest first, within ``Limits.max_jobs`` and ``max_store_bytes``."""

    def __init__(self, client: AsyncClient, limits: Limits, root: Path | None = None):
        self.client, self.limits = client, limits
        self.root = Path(tempfile.mkdtemp(prefix="mpi-imgproc-web-", dir=root))
        self.jobs: dict[str, WebJob] = {}
        self.finished: list[dict[str, Any]] = []  # done stats of recent jobs, for the cluster
        self._pumps: set[asyncio.Task] = set()

    def get(self, job_id: str) -> WebJob | None:
        """The job called ``job_id``, if the app still holds it."""
        return self.jobs.get(job_id)

    async def submit(
        self,
        uploads: list[tuple[str | None, bytes]],
        pipeline: list[Any],
        tile: int | str,
        server_pixels: int | None,
    ) -> WebJob:
        """Check each upload, send the good ones as one cluster job, and start recording."""
        self._make_room()
        job_id = secrets.token_urlsafe(12)
        folder = self.root / job_id
        folder.mkdir()
        names = [safe_name(n, i, self.limits.max_name_chars) for i, (n, _) in enumerate(uploads)]
        job = WebJob(job_id, names, folder, [None] * len(uploads), pipeline)
        refused: list[tuple[int, str]] = []
        for index, (_, data) in enumerate(uploads):
            why = check_upload(data, self.limits, server_pixels)
            if why is not None:
                refused.append((index, why))
                continue
            path = folder / f"{index}{sniff_suffix(data[:8])}"
            path.write_bytes(data)
            job.inputs[index] = path
            job.sent.append(index)
        self.jobs[job_id] = job
        for index, why in refused:
            code = "image_read_error" if why.startswith("empty") else "limit_exceeded"
            await self._image_error(job, index, code, why)
        if not job.sent:
            await self._finish(job, "done", {}, "no image could be sent")
            return job
        try:
            job.remote = await self.client.submit(
                [job.inputs[i] for i in job.sent],
                pipeline,
                tile=tile,
                names=[names[i] for i in job.sent],
                result="png",
            )
        except (ServerError, ServerUnavailable, ImgprocError):
            self._drop(job)
            raise
        job.state = "running"
        task = asyncio.create_task(self._pump(job))
        self._pumps.add(task)
        task.add_done_callback(self._pumps.discard)
        return job

    async def cancel(self, job: WebJob) -> str:
        """Ask the cluster to cancel the job; its ``done`` (cancelled) follows on the stream."""
        if job.remote is not None and not job.finished:
            with contextlib.suppress(ServerError):
                await job.remote.cancel()
        return job.state

    async def close(self) -> None:
        """Stop recording and remove every job's files."""
        for task in list(self._pumps):
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        shutil.rmtree(self.root, ignore_errors=True)

    # -- recording --------------------------------------------------------------------------

    async def _pump(self, job: WebJob) -> None:
        """Record the cluster's events of one job until its ``done`` (or the connection's end)."""
        assert job.remote is not None
        try:
            async for event in job.remote.events():
                await self._take(job, event.type, event.header, event.frames)
        except (ServerUnavailable, ImgprocError) as exc:
            await self._finish(job, "failed", {}, f"the cluster connection ended: {exc}")

    async def _take(self, job: WebJob, kind: str, header: dict[str, Any], frames: list) -> None:
        server_index = header.get("index")
        index = job.sent[server_index] if isinstance(server_index, int) else None
        if kind == "progress":
            job.progress = {k: header[k] for k in header if k.endswith(("_done", "_total"))}
            await job.record("progress", job.progress)
        elif kind == "result" and index is not None and frames:
            job.results[index] = bytes(frames[0])
            fields = {k: header.get(k) for k in ("path", "tiles", "reason")}
            url = f"/api/jobs/{job.id}/images/{index}"
            await job.record(
                "result", {"index": index, "name": job.names[index], "url": url, **fields}
            )
        elif kind == "image_error" and index is not None:
            await self._image_error(job, index, header.get("code", ""), header.get("message", ""))
        elif kind == "done":
            await self._finish(
                job, header.get("state", "done"), header.get("stats", {}), header.get("message")
            )

    async def _image_error(self, job: WebJob, index: int, code: str, message: str) -> None:
        job.errors[index] = (code, message)
        fields = {"index": index, "name": job.names[index], "code": code, "message": message}
        await job.record("image_error", fields)

    async def _finish(self, job: WebJob, state: str, stats: dict, message: str | None) -> None:
        if job.finished:
            return
        job.state, job.stats, job.message = state, stats, message
        job.ended = time.time()
        if stats.get("ranks"):
            started = job.ended - float(stats.get("total", 0.0)) + float(stats.get("queue", 0.0))
            self.finished.append({"job": job.id, "start": started, "end": job.ended, **stats})
            del self.finished[: -self.limits.max_jobs]
        fields = {
            "state": state,
            "ok": len(job.results),
            "failed": len(job.errors),
            "stats": stats,
            "message": message,
        }
        await job.record("done", fields)

    # -- room -------------------------------------------------------------------------------

    def _make_room(self) -> None:
        """Forget the oldest finished jobs while the app holds too many jobs or bytes."""
        while self.jobs:
            over = len(self.jobs) >= self.limits.max_jobs or (
                sum(j.size for j in self.jobs.values()) > self.limits.max_store_bytes
            )
            if not over:
                return
            oldest = next((j for j in self.jobs.values() if j.finished), None)
            if oldest is None:
                raise LimitExceeded(
                    f"{len(self.jobs)} jobs are running (the limit is {self.limits.max_jobs}); "
                    "wait for one to finish"
                )
            self._drop(oldest)

    def _drop(self, job: WebJob) -> None:
        self.jobs.pop(job.id, None)
        shutil.rmtree(job.folder, ignore_errors=True)


def input_media(path: Path) -> str | None:
    """The browser media type of an input file, or ``None`` if it must be converted to show."""
    return DISPLAYABLE.get(os.path.splitext(path.name)[1])

"""``mpi-imgproc web``: a page and a JSON API over a running cluster.

FastAPI gives the routes, request validation and the OpenAPI page at ``/docs`` with no code
of ours; uvicorn serves it; python-multipart parses uploads.  The app talks to the cluster
only through :class:`~mpi_imgproc.aio.AsyncClient`, on the same event loop as the routes, so
one process holds every browser's jobs without a thread per job.

Every field of a request is hostile: the body is cut off past ``max_request_bytes`` before
it is parsed whole (:class:`BodyLimit`), the number of files and fields is bounded by the
parser, each file's size and pixel count are checked alone (a bad file fails alone), and the
pipeline is validated before anything is sent.  The app binds 127.0.0.1 unless told.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
import zipfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles

from ..aio import AsyncClient
from ..connection import DEFAULT_ADDRESS, ServerUnavailable
from ..errors import ImgprocError
from ..imageio import decode, encode
from ..ops import REGISTRY
from ..pipeline import Pipeline
from .jobs import MB, JobStore, Limits, UploadRefused, WebJob, input_media

STATIC = Path(__file__).parent / "static"
MEDIA = {"png": "image/png", "jpg": "image/jpeg", "tif": "image/tiff"}
LOAD_WINDOW_S = 10.0  # the busy share of each rank is over this many seconds
TIMELINE_S = 120.0  # jobs that ended this long ago drop off the task stream
SSE_KEEPALIVE_S = 15.0
DRAIN_BYTES = 64 * MB  # of a refused body, read and dropped so the client sees the 413


class BodyLimit:
    """ASGI middleware: a request body over ``most`` bytes is answered 413 and not read on.

    Content-Length is checked first; a chunked body is counted as it arrives, so a client
    that lies about (or omits) its length still cannot make the parser spool more.
    """

    def __init__(self, app: Any, most: int):
        self.app, self.most = app, most

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT"):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.most):
            await self._refuse(receive, send)
            return
        seen = 0

        async def counted() -> dict:
            """The next body message, counted against the limit."""
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.most:
                raise UploadRefused(self._message())
            return message

        try:
            await self.app(scope, counted, send)
        except UploadRefused:
            await self._refuse(receive, send)

    def _message(self) -> str:
        return f"request body over {self.most} bytes (--max-request-mb)"

    async def _refuse(self, receive: Any, send: Any) -> None:
        # Read on (discarding, up to DRAIN_BYTES) so that a client still sending sees the
        # answer instead of a reset connection; a larger body is cut off.
        drained = 0
        while drained < DRAIN_BYTES:
            message = await receive()
            drained += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        body = json.dumps({"detail": self._message(), "code": "limit_exceeded"}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def create_app(server: str = DEFAULT_ADDRESS, limits: Limits | None = None) -> FastAPI:
    """The web app for the cluster at ``server`` (a ZeroMQ address)."""
    limits = limits or Limits()
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        """One cluster client and one job store for the app's life; files removed after."""
        client = AsyncClient(server, timeout=30.0)
        state["client"], state["store"] = client, JobStore(client, limits)
        state["info"], state["info_at"] = None, 0.0
        try:
            yield
        finally:
            await state["store"].close()
            await client.close(linger=0.5)

    app = FastAPI(
        title="mpi_imgproc",
        summary="Exact, tiled image processing on an MPI cluster.",
        lifespan=lifespan,
    )
    app.state.web = state
    app.state.limits = limits

    @app.exception_handler(ImgprocError)
    async def imgproc_error(_: Request, exc: ImgprocError) -> JSONResponse:
        """Every error of this package as JSON: its message and protocol code."""
        status = getattr(exc, "status", None)
        if status is None:
            status = 503 if isinstance(exc, ServerUnavailable) else 400
            status = 413 if exc.code == "limit_exceeded" else status
        return JSONResponse({"detail": str(exc), "code": exc.code}, status_code=status)

    async def info(fresh: bool = False) -> dict[str, Any]:
        """The cluster's ``info``, asked at most once a second (``fresh``: now)."""
        if fresh or state["info"] is None or time.monotonic() - state["info_at"] > 1.0:
            state["info"], state["info_at"] = await state["client"].info(), time.monotonic()
        return state["info"]

    def job_or_404(job_id: str) -> WebJob:
        """The job, or 404 saying it is unknown or forgotten."""
        job = state["store"].get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id[:40]!r} here (unknown, or forgotten)")
        return job

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        """The page."""
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/ops", summary="The op catalogue: classes, parameters, ranges")
    async def ops() -> list[dict[str, Any]]:
        """Every op with its class, halo and parameters (type, default, range, choices)."""
        return [op.describe() for op in REGISTRY.values()]

    @app.get("/api/limits", summary="What one upload may hold")
    async def upload_limits() -> dict[str, Any]:
        """The app's bounds and the cluster's, whichever is lower."""
        server_limits = (await info()).get("limits", {})
        return {
            "max_files": min(limits.max_files, server_limits.get("max_images", limits.max_files)),
            "max_file_bytes": limits.max_file_bytes,
            "max_request_bytes": limits.max_request_bytes,
            "max_pixels": min(
                limits.max_pixels, server_limits.get("max_pixels", limits.max_pixels)
            ),
        }

    @app.post(
        "/api/jobs",
        summary="Submit images with a pipeline",
        openapi_extra={"requestBody": _upload_schema()},
    )
    async def submit(request: Request) -> dict[str, str]:
        """Check each upload, send the good ones as one cluster job; ``{"job": ID}``."""
        server_limits = (await info()).get("limits", {})
        most_files = min(limits.max_files, server_limits.get("max_images", limits.max_files))
        form = await request.form(max_files=most_files, max_fields=8)
        try:
            pipeline = _pipeline_field(form.get("pipeline"), limits)
            tile = _tile_field(form.get("tile"))
            files = [f for key, f in form.multi_items() if key in ("file", "files")]
            files = [f for f in files if not isinstance(f, str)]
            if not files:
                raise UploadRefused("no file in the upload (send one or more 'files' parts)", 400)
            uploads = [(f.filename, await f.read(limits.max_file_bytes + 1)) for f in files]
        finally:
            await form.close()
        total = sum(len(d) for _, d in uploads)
        server_bytes = server_limits.get("max_request_bytes")
        if server_bytes is not None and total > server_bytes:
            raise UploadRefused(f"{total} bytes of images; the cluster takes {server_bytes}")
        job = await state["store"].submit(uploads, pipeline, tile, server_limits.get("max_pixels"))
        return {"job": job.id}

    @app.get("/api/jobs/{job_id}", summary="A job's state, counts, errors and stats")
    async def job_status(job_id: str) -> dict[str, Any]:
        """The job's state, names, results so far, errors, progress and stats."""
        return job_or_404(job_id).summary()

    @app.get(
        "/api/jobs/{job_id}/events",
        summary="Server-Sent Events: progress, result, image_error, done",
        response_class=StreamingResponse,
    )
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        """The job's events as Server-Sent Events, resumed after ``Last-Event-ID``."""
        job = job_or_404(job_id)
        last = request.headers.get("last-event-id", "")
        start = int(last) + 1 if last.isdigit() and int(last) < 10**9 else 0
        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(_sse(job, start), media_type="text/event-stream", headers=headers)

    @app.get("/api/jobs/{job_id}/images/{index}", summary="One result: png, jpg or tif")
    async def job_image(job_id: str, index: int, format: str = "png") -> Response:
        """One result: PNG as the cluster made it, or JPEG/TIFF converted from it."""
        job = job_or_404(job_id)
        data = job.results.get(index)
        if data is None:
            raise HTTPException(404, _missing(job, index))
        if format not in MEDIA:
            raise HTTPException(400, f"format must be one of {', '.join(MEDIA)}; got {format!r}")
        if format != "png":
            data = await asyncio.to_thread(lambda: encode(decode(data), format))
        name = f"{Path(job.names[index]).stem}.{format}"
        return Response(data, media_type=MEDIA[format], headers=_attachment(name))

    @app.get("/api/jobs/{job_id}/inputs/{index}", summary="One uploaded image, to show")
    async def job_input(job_id: str, index: int) -> Response:
        """One uploaded image, for the before view (PNG where a browser cannot show it)."""
        job = job_or_404(job_id)
        path = job.inputs[index] if 0 <= index < len(job.inputs) else None
        if path is None:
            raise HTTPException(404, f"no input {index} in job {job_id}")
        media = input_media(path)
        if media is not None:
            return FileResponse(path, media_type=media)
        try:
            data = await asyncio.to_thread(lambda: encode(decode(path.read_bytes()), "png"))
        except ImgprocError as exc:
            raise HTTPException(415, f"cannot show input {index}: {exc}") from None
        return Response(data, media_type="image/png")

    @app.get("/api/jobs/{job_id}/archive", summary="Every result of a job as a zip")
    async def job_archive(job_id: str, format: str = "png") -> Response:
        """Every result of the job in one zip."""
        job = job_or_404(job_id)
        if format not in MEDIA:
            raise HTTPException(400, f"format must be one of {', '.join(MEDIA)}; got {format!r}")
        if not job.results:
            raise HTTPException(404, f"job {job_id} has no result (yet)")
        data = await asyncio.to_thread(_zip, job, format)
        return Response(data, media_type="application/zip", headers=_attachment(f"{job_id}.zip"))

    @app.delete("/api/jobs/{job_id}", summary="Cancel a job")
    async def job_cancel(job_id: str) -> dict[str, str]:
        """Ask the cluster to cancel the job; the stream then ends with ``done``."""
        job = job_or_404(job_id)
        return {"job": job.id, "state": await state["store"].cancel(job)}

    @app.get("/api/cluster", summary="Ranks, hosts, engines, queue and per-rank load")
    async def cluster() -> dict[str, Any]:
        """Ranks, hosts, engines, queue; per-rank busy share; the recent jobs' task stream."""
        return cluster_view(await info(), state["store"].finished, time.time())

    from .compare_view import add_compare_routes

    add_compare_routes(app, server, limits, info)
    app.add_middleware(BodyLimit, most=limits.max_request_bytes + MB)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def _sse(job: WebJob, start: int) -> AsyncIterator[bytes]:
    """The job's events as Server-Sent Events, a keep-alive comment while it is quiet."""
    stream = job.stream(start).__aiter__()
    while True:
        try:
            number, kind, fields = await asyncio.wait_for(stream.__anext__(), SSE_KEEPALIVE_S)
        except asyncio.TimeoutError:
            yield b": keep-alive\n\n"
            continue
        except StopAsyncIteration:
            return
        data = json.dumps(fields, separators=(",", ":"))
        yield f"id: {number}\nevent: {kind}\ndata: {data}\n\n".encode()


def _pipeline_field(raw: Any, limits: Limits) -> list[Any]:
    """The ``pipeline`` form field: the protocol's JSON list, bounded and validated here."""
    if not isinstance(raw, str) or not raw:
        raise UploadRefused("'pipeline' is missing: a JSON list such as [\"invert\"]", 400)
    if len(raw) > limits.max_pipeline_bytes:
        raise UploadRefused(f"'pipeline' is over {limits.max_pipeline_bytes} bytes", 400)
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise UploadRefused(f"'pipeline' is not JSON: {exc}", 400) from None
    return Pipeline.from_json(data).to_json()  # InvalidParameter etc. name the op and field


def _tile_field(raw: Any) -> int | str:
    """The optional ``tile`` field: ``auto`` or whole pixels (0: whole images)."""
    if raw is None or raw == "" or raw == "auto":
        return "auto"
    if not isinstance(raw, str) or not raw.isdigit() or int(raw) > 1 << 16:
        raise UploadRefused(f"'tile' must be auto or 0..65536 pixels; got {str(raw)[:20]!r}", 400)
    return int(raw)


def _missing(job: WebJob, index: int) -> str:
    if not 0 <= index < len(job.names):
        return f"job {job.id} has images 0..{len(job.names) - 1}; no image {index}"
    if index in job.errors:
        code, message = job.errors[index]
        return f"image {index} ({job.names[index]}) failed: {code}: {message}"
    return f"image {index} ({job.names[index]}) has no result yet"


def _attachment(name: str) -> dict[str, str]:
    ascii_name = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)
    return {"Content-Disposition": f'attachment; filename="{ascii_name}"'}


def _zip(job: WebJob, fmt: str) -> bytes:
    """A zip of the job's results, one entry per image, names made unique."""
    buffer, used = io.BytesIO(), set()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for index in sorted(job.results):
            data = job.results[index]
            data = data if fmt == "png" else encode(decode(data), fmt)
            stem = Path(job.names[index]).stem or f"image{index}"
            name = f"{stem}.{fmt}"
            if name in used:
                name = f"{stem}-{index}.{fmt}"
            used.add(name)
            archive.writestr(name, data)
    return buffer.getvalue()


def cluster_view(info: dict[str, Any], finished: list[dict[str, Any]], now: float) -> dict:
    """Ranks with host, engine and recent busy share; the task stream of recent jobs.

    The figures come from each job's ``done`` stats (busy seconds and tiles per rank): a
    rank's busy share is its busy seconds in jobs that ended within ``LOAD_WINDOW_S``, over
    that window and its engine workers; the task stream has one bar per task (from the
    ``tasks`` the stats list), or, for a job without them, one per job and rank from the job's
    start to its end with the rank's busy share inside it.
    """
    ranks, per_rank = int(info.get("ranks", 1)), max(1, int(info.get("workers_per_rank", 1)))
    hosts = info.get("hosts", {})
    engines = info.get("engines", [])
    first = 1 if ranks > 1 else 0
    busy = {r: 0.0 for r in range(first, ranks)}
    tiles = dict.fromkeys(busy, 0)
    for job in finished:
        if now - job["end"] > LOAD_WINDOW_S:
            continue
        for rank, figures in job.get("ranks", {}).items():
            if rank.isdigit() and int(rank) in busy:
                busy[int(rank)] += float(figures.get("busy_s", 0.0))
                tiles[int(rank)] += int(figures.get("tiles", 0))
    only_host = next(iter(hosts)) if len(hosts) == 1 else f"one of {len(hosts)} hosts"
    rows = []
    for rank in busy:
        described = engines[rank - first] if 0 <= rank - first < len(engines) else None
        described = described if isinstance(described, dict) else {}
        share = min(1.0, busy[rank] / (LOAD_WINDOW_S * per_rank))
        rows.append(
            {
                "rank": rank,
                "host": described.get("host", only_host),
                "engine": described.get("engine", info.get("engine")),
                "engine_workers": described.get("workers", per_rank),
                "busy_share": round(share, 4),
                "busy_s": round(busy[rank], 4),
                "tiles": tiles[rank],
            }
        )
    stream = [
        {
            "job": job["job"],
            "start": job["start"],
            "end": job["end"],
            "ranks": job.get("ranks", {}),
            "total": job.get("total"),
            "tasks": _task_bars(job),
        }
        for job in finished
        if now - job["end"] <= TIMELINE_S
    ]
    keep = ("ranks", "workers", "hosts", "engine", "workers_per_rank", "queue", "versions")
    return {
        "info": {k: info.get(k) for k in keep},
        "rank_rows": rows,
        "window_s": LOAD_WINDOW_S,
        "now": now,
        "stream": stream,
    }


def _task_bars(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The job's tasks (``done`` stats ``tasks``: rank, start and end since the submit) on this
    page's clock: the submit was ``total`` seconds before the job ended."""
    submitted = job["end"] - float(job.get("total") or 0.0)
    bars = []
    for task in job.get("tasks") or []:
        if isinstance(task, list) and len(task) == 3:
            rank, start, end = task
            bars.append({"rank": rank, "start": submitted + start, "end": submitted + end})
    return bars


def _upload_schema() -> dict[str, Any]:
    """The multipart body of ``POST /api/jobs``, for the OpenAPI page."""
    fields = {
        "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
        "pipeline": {"type": "string", "description": 'JSON list, e.g. ["grayscale"]'},
        "tile": {"type": "string", "description": "auto (default) or pixels; 0: whole"},
    }
    schema = {"type": "object", "required": ["files", "pipeline"], "properties": fields}
    return {"content": {"multipart/form-data": {"schema": schema}}, "required": True}


__all__ = ["BodyLimit", "cluster_view", "create_app"]

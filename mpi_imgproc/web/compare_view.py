"""The compare view's routes: the uploaded set through every method, as ``mpi-imgproc
compare`` does, against the cluster the app is connected to.

One comparison runs at a time (each one takes every core for its measurements); it runs on a
thread of its own, so the app keeps serving jobs and streams meanwhile.  Its files (report,
CSV, plots) live in a temporary folder until the next comparison replaces them.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse

from ..compare import LOCAL_METHODS, CompareSettings, run_compare, write_outputs
from ..errors import ImgprocError
from ..imageio import decode
from ..pipeline import Pipeline
from .jobs import Limits, UploadRefused, check_upload, safe_name

REPORTS = {"md": ("report.md", "text/markdown"), "html": ("report.html", "text/html"),
           "csv": ("summary.csv", "text/csv")}  # fmt: skip
MAX_REPEAT = 5
MAX_TOTAL_PIXELS = 100_000_000  # every method holds the whole set (and its outputs) at once


class Comparison:
    """One comparison: its state, the line it is on, its result and its folder."""

    def __init__(self, folder: Path):
        self.id = secrets.token_urlsafe(12)
        self.folder = folder
        self.state, self.progress, self.message = "running", "starting", None
        self.result: dict[str, Any] | None = None

    def view(self) -> dict[str, Any]:
        """What ``GET /api/compare/{id}`` answers."""
        out: dict[str, Any] = {"compare": self.id, "state": self.state,
                               "progress": self.progress, "message": self.message}  # fmt: skip
        if self.result is not None:
            keep = ("summary", "findings", "headline", "notes", "ranks_measured", "images")
            out["result"] = {k: self.result[k] for k in keep}
        return out


def add_compare_routes(
    app: FastAPI,
    server: str,
    limits: Limits,
    info: Callable[[], Awaitable[dict[str, Any]]],
) -> None:
    """``POST /api/compare``, ``GET /api/compare/{id}`` and its reports."""
    current: dict[str, Comparison] = {}

    @app.post("/api/compare", summary="Compare every method on the uploaded images")
    async def start(request: Request) -> dict[str, str]:
        """Decode the uploads and start the comparison on a thread; ``{"compare": ID}``."""
        running = next(iter(current.values()), None)
        if running is not None and running.state == "running":
            raise HTTPException(409, "a comparison is running; wait for it to finish")
        server_limits = (await info()).get("limits", {})
        form = await request.form(max_files=limits.max_files, max_fields=8)
        try:
            raw = form.get("pipeline")
            if not isinstance(raw, str) or len(raw) > limits.max_pipeline_bytes:
                raise UploadRefused("'pipeline' must be a JSON list of ops", 400)
            pipeline = Pipeline.from_json(_json(raw))
            repeat = _repeat(form.get("repeat"))
            methods = _methods(form.get("methods"))
            files = [
                f for key, f in form.multi_items() if key == "files" and not isinstance(f, str)
            ]
            uploads = [(f.filename, await f.read(limits.max_file_bytes + 1)) for f in files]
        finally:
            await form.close()
        images, names, notes = _decoded(uploads, limits, server_limits.get("max_pixels"))
        if not images:
            raise UploadRefused("no image to compare: " + "; ".join(notes), 400)
        for old in current.values():
            shutil.rmtree(old.folder, ignore_errors=True)
        current.clear()
        job = Comparison(Path(tempfile.mkdtemp(prefix="mpi-imgproc-compare-")))
        current[job.id] = job
        settings = CompareSettings(pipeline, methods, (), repeat, server=server)
        settings.notes.extend(notes)
        asyncio.get_running_loop().run_in_executor(None, _run, job, images, names, settings)
        return {"compare": job.id}

    @app.get("/api/compare/{compare_id}", summary="A comparison's state and result")
    async def status(compare_id: str) -> dict[str, Any]:
        """The comparison's state, the step it is on and, when done, its result."""
        return _get(current, compare_id).view()

    @app.get("/api/compare/{compare_id}/report.{ext}", summary="The report: md, html or csv")
    async def report(compare_id: str, ext: str) -> FileResponse:
        """The finished comparison's report (Markdown, HTML) or summary table (CSV)."""
        job = _get(current, compare_id)
        if ext not in REPORTS:
            raise HTTPException(404, f"reports are report.md, report.html, report.csv; not {ext!r}")
        if job.state != "done":
            raise HTTPException(409, f"comparison {compare_id} is {job.state}")
        name, media = REPORTS[ext]
        return FileResponse(job.folder / name, media_type=media, filename=f"compare-{name}")


def _run(job: Comparison, images: list, names: list[str], settings: CompareSettings) -> None:
    """The comparison itself, on an executor thread."""
    try:
        result = run_compare(images, names, settings, lambda line: setattr(job, "progress", line))
        write_outputs(result, job.folder)
        job.result, job.state = result, "done"
    except ImgprocError as exc:
        job.state, job.message = "failed", str(exc)
    except Exception as exc:  # noqa: BLE001 - the page must hear why, whatever it was
        job.state, job.message = "failed", f"{type(exc).__name__}: {exc}"


def _get(current: dict[str, Comparison], compare_id: str) -> Comparison:
    job = current.get(compare_id)
    if job is None:
        raise HTTPException(404, f"no comparison {compare_id[:40]!r} here (unknown or replaced)")
    return job


def _json(raw: str) -> Any:
    import json

    try:
        return json.loads(raw)
    except ValueError as exc:
        raise UploadRefused(f"'pipeline' is not JSON: {exc}", 400) from None


def _repeat(raw: Any) -> int:
    if raw is None or raw == "":
        return 3
    if not isinstance(raw, str) or not raw.isdigit() or not 1 <= int(raw) <= MAX_REPEAT:
        raise UploadRefused(f"'repeat' must be 1..{MAX_REPEAT}; got {str(raw)[:20]!r}", 400)
    return int(raw)


def _methods(raw: Any) -> list[str]:
    """The optional ``methods`` field: local methods, comma-separated (default: all)."""
    if raw is None or raw == "":
        return list(LOCAL_METHODS)
    names = [m.strip() for m in str(raw)[:200].split(",") if m.strip()]
    unknown = [m for m in names if m not in LOCAL_METHODS]
    if unknown or not names:
        raise UploadRefused(f"'methods' must name some of {', '.join(LOCAL_METHODS)}", 400)
    return ["sequential", *[m for m in names if m != "sequential"]]


def _decoded(
    uploads: list[tuple[str | None, bytes]], limits: Limits, server_pixels: int | None
) -> tuple[list, list[str], list[str]]:
    """The uploads that pass the checks, decoded; a note for each one that does not."""
    images, names, notes, total = [], [], [], 0
    for index, (filename, data) in enumerate(uploads):
        name = safe_name(filename, index, limits.max_name_chars)
        why = check_upload(data, limits, server_pixels)
        try:
            if why is None:
                image = decode(data)
                total += image.shape[0] * image.shape[1]
                if total <= MAX_TOTAL_PIXELS:
                    images.append(image)
                    names.append(name)
                    continue
                why = f"the set is over {MAX_TOTAL_PIXELS} pixels with it"
        except ImgprocError as exc:
            why = str(exc)
        notes.append(f"{name}: left out ({why})")
    return images, names, notes

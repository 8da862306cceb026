"""Rank 0's scheduler: jobs → images → stages → tile tasks, handed out dynamically.

The scheduler knows nothing about ZeroMQ or folders: a front (the ZeroMQ server, the batch
runner) adds jobs and hears about them through a :class:`JobListener`.  It knows nothing about
MPI either: tasks go to a :class:`Backend` (worker ranks, or a local engine when running alone).

Scheduling is dynamic: each worker has a bounded number of tasks in flight, and the next task
goes out when a result comes back, so a slow rank gets less work.  Jobs take turns (round
robin), so a large job does not starve a small one submitted after it.  Results are merged in
whatever order they arrive.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial as partial_fn
from pathlib import Path
from typing import Any

import numpy as np

from . import shm, streamio
from .chain import ChainStage
from .datapaths import create_beneath, fd_path, open_beneath, replace_beneath, use_beneath
from .errors import ImgprocError, describe, error_code
from .imageio import encode
from .imagetask import ENCODED, PATH, PIXELS, as_buffer
from .pipeline import Pipeline, ReduceStage, Stage, TiledStage, ViewStage
from .planner import (
    DEFAULT_CUTOVER_S,
    DEFAULT_INLINE_S,
    MAX_TILES_PER_IMAGE,
    ImageSource,
    Plan,
    bound_tiles,
    plan_image,
)
from .regionio import REGION_SUFFIXES, create_output, open_region, partial_name
from .tiling import Merger, Tile, split_with_halo

# Where a job's time goes, summed over its images and tasks (seconds).  Rank 0 measures decode
# (of tiled images), split, send, receive and merge; workers report compute, and the decode and
# encode they do for whole images; the front adds its own encode.
# Input bytes per region task.  A strip's halo rows and its task's fixed costs (opening the
# files, a message each way) are paid per strip, so short strips cost throughput: at 4 MiB a
# 40000-wide RGB strip had 35 rows, and blur(9) + sobel read 45.  At 8 MiB the workers of
# benchmarks/bench_large.py peak at about 200 MiB (float kernels, such as 16-bit sobel, need
# up to ~30 times the strip while they run).
REGION_TASK_BYTES = 8 * 2**20
TIMED_STAGES = ("decode", "split", "send", "compute", "receive", "merge", "encode")


@dataclass
class Task:
    """One unit of work for a worker: a tile of a stage, or a whole image (``tile`` is None).

    ``header`` is what the worker needs besides the pixels (JSON-ready); ``payload`` is the one
    buffer sent with it, if any (a tile region view, raw pixels, or encoded file bytes).
    """

    id: int
    image: ImageWork
    header: dict[str, Any]
    payload: np.ndarray | None
    tile: Tile | None = None
    sent_at: float = 0.0


@dataclass
class Completion:
    """What a backend reports for a finished task."""

    task_id: int
    result: np.ndarray | None
    error: tuple[str, str] | None  # (code, message)
    rank: int
    busy: float = 0.0
    cpu: float = 0.0
    maxrss_kb: int = 0
    fields: dict[str, Any] = field(default_factory=dict)
    received_s: float = 0.0  # rank 0's time receiving the result
    lost: bool = False  # the worker died with it: run it again elsewhere


@dataclass
class ImageResult:
    """A finished image: merged pixels, or encoded bytes, or a file a worker wrote."""

    pixels: np.ndarray | None = None
    encoded: np.ndarray | None = None
    written: str | None = None

    def encoded_as(self, fmt: str) -> bytes | np.ndarray:
        """The encoded image: as the worker encoded it, or encoded here (a tiled image)."""
        return self.encoded if self.encoded is not None else encode(self.pixels, fmt)


@dataclass
class ImageWork:
    """One image of a job moving through the pipeline's stages."""

    job: Job
    index: int
    source: ImageSource
    pixels: np.ndarray | None = None
    stages: list[Stage] = field(default_factory=list)
    stage_no: int = 0
    pending: int = 0
    plan: Plan | None = None
    merger: Merger | None = None
    statistic: np.ndarray | None = None
    tiles_used: int = 0
    started_at: float = 0.0
    finished: bool = False
    uploaded: bool = True  # False until a client's upload of it arrives (server jobs)
    partial: str | None = None  # a region output being filled, renamed into place when done
    decoded: str | None = None  # a streamed input's raw pixels (streamio), removed at the end
    built: str | None = None  # a streamed output being encoded, renamed into place when done
    decoder: streamio.Decoder | None = None
    encoder: streamio.Encoder | None = None
    gated: deque[tuple[int, Task]] = field(default_factory=deque)  # waiting for decoded rows
    # A same-host client's input and result segments (rank 0's descriptors, :mod:`shm`).
    segments: tuple[shm.Attached, ...] = ()
    open_segments: Callable[[], tuple[shm.Attached, ...]] | None = None  # at the image's start
    shared: bool = False  # its region tasks read and write the segments themselves

    @property
    def name(self) -> str:
        return self.source.name

    @property
    def path(self) -> str:
        """``whole`` or ``tiled``: how the image went."""
        return self.plan.path if self.plan else "whole"


@dataclass
class Job:
    """A client's request: a pipeline over some images, and where it stands."""

    id: str
    pipeline: Pipeline
    tile: int | str
    listener: JobListener
    owner: Any = None
    # How results come back: "pixels", an encoding ("png", "jpg", "tif"), or "same" (each
    # image's own suffix).  With ``targets`` and ``shared_fs``, workers read sources and write
    # ``targets(image)`` themselves.
    output: str = "pixels"
    shared_fs: bool = False
    targets: Callable[[ImageWork], str] | None = None
    root: str | None = None  # a job by reference: every open is confined to this folder
    segments_held: bool = True  # its owner holds its shm images' segments (not attached)
    state: str = "queued"
    images: list[ImageWork] = field(default_factory=list)
    ready: deque[Task] = field(default_factory=deque)
    tiles_done: int = 0
    tiles_total: int = 0
    images_done: int = 0
    ok: int = 0
    failed: int = 0
    message: str | None = None
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    ended: float | None = None
    times: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIMED_STAGES, 0.0))
    ranks: dict[int, dict[str, float]] = field(default_factory=dict)
    # (rank, start, end) of the first MAX_TASK_TIMES tasks, seconds since the submit
    task_times: list[tuple[int, float, float]] = field(default_factory=list)
    next_image: int = 0  # images before this one have been started
    paths: dict[str, int] = field(default_factory=dict)  # images done, by path taken

    @property
    def active(self) -> bool:
        return self.state in ("queued", "running")

    def summary(self) -> dict[str, Any]:
        """The fields of a ``status`` reply."""
        return {
            "job": self.id,
            "state": self.state,
            "images_done": self.images_done,
            "images_total": len(self.images),
            "tiles_done": self.tiles_done,
            "tiles_total": self.tiles_total,
        }

    def stats(self) -> dict[str, Any]:
        """Wall time per stage and work per rank, for the ``done`` message."""
        end = self.ended or time.perf_counter()
        start = self.started or end
        return {
            "queue": round(start - self.submitted, 6),
            **{k: round(v, 6) for k, v in self.times.items()},
            "total": round(end - self.submitted, 6),
            "paths": dict(self.paths),
            "ranks": {
                str(r): {k: round(v, 6) for k, v in s.items()} for r, s in self.ranks.items()
            },
            "tasks": [list(t) for t in self.task_times],
        }


class JobListener:
    """What a front hears about its jobs; the default hears nothing."""

    def progress(self, job: Job, image_finished: bool) -> None: ...

    def image_done(self, job: Job, image: ImageWork, result: ImageResult) -> bool | None:
        """An image is finished; return False if it could not be delivered (encoded, written),
        after reporting why, so that it counts as failed."""

    def image_failed(self, job: Job, image: ImageWork, code: str, message: str) -> None: ...

    def finished(self, job: Job) -> None: ...

    def blocked(self, job: Job) -> bool:
        """True while the job's results cannot be delivered (back-pressure): hold its tiles."""
        return False


class Backend:
    """Where tasks run: worker ranks over MPI, or a local engine on rank 0."""

    workers = 1
    synchronous = False  # True: submit() runs the task itself

    # Set by the scheduler: where to receive a task's result (header -> array or None).
    destination: Callable[[dict[str, Any]], np.ndarray | None] | None = None

    def free_slots(self) -> int:
        raise NotImplementedError

    def submit(self, task: Task) -> None:
        raise NotImplementedError

    def poll(self) -> list[Completion]:
        raise NotImplementedError

    def moving_pixels(self) -> bool:
        """Whether a task in flight sends or brings back pixels, whose transfer moves only
        while rank 0 calls into MPI (so rank 0 polls fast meanwhile)."""
        return False

    def close(self, deadline: float) -> None:
        """Stop the workers; wait for them until ``deadline`` (a perf_counter time)."""


class Scheduler:
    """Turns jobs into tasks, hands them to the backend, and merges what comes back."""

    def __init__(
        self,
        backend: Backend,
        max_pixels: int = 400_000_000,
        cutover_s: float = DEFAULT_CUTOVER_S,
        local: Backend | None = None,
        inline_s: float = DEFAULT_INLINE_S,
    ):
        self.backend = backend
        self.max_pixels = max_pixels
        self.cutover_s = cutover_s
        self.local = local  # runs "inline" images on rank 0 (see planner)
        backend.destination = self.receive_buffer
        self.inline_s = inline_s if local is not None else 0.0
        self.hold = False  # True: hand out no new task (draining before a shutdown)
        self.jobs: dict[str, Job] = {}
        self.turns: deque[str] = deque()
        self.running: dict[int, Task] = {}
        self.streams: list[ImageWork] = []  # images with a decoder or encoder thread
        self.stream_min_bytes = streamio.STREAM_MIN_BYTES
        self.promised: dict[int, int] = {}  # id(image) -> disk bytes its region files need
        self.shared_memory = False  # every worker reaches rank 0's descriptors (shm images)
        self._task_ids = itertools.count(1)

    # -- jobs -------------------------------------------------------------------------

    def add(self, job: Job) -> None:
        """Queue a job; its images start as workers become free."""
        self.jobs[job.id] = job
        self.turns.append(job.id)

    def cancel(self, job: Job, message: str, state: str = "cancelled") -> None:
        """End a job now: drop its queued tasks, ignore its results still in flight."""
        if not job.active:
            return
        job.ready.clear()
        for image in job.images:
            image.pixels, image.merger, image.finished = None, None, True
            image.source.pixels = image.source.data = None
            self._discard(image)  # now: a shutdown does not step again
        self._finish(job, state, message)

    def forget(self, job_id: str) -> None:
        """Drop a finished job from the table."""
        self.jobs.pop(job_id, None)

    def receive_buffer(self, header: dict[str, Any]) -> np.ndarray | None:
        """Where a tile result announced by ``header`` can be received straight into the
        merged output (full-width strips are contiguous), saving a copy on rank 0."""
        task = self.running.get(header.get("task", -1))
        if task is None or task.tile is None or task.image.merger is None:
            return None
        return task.image.merger.view_for(task.tile, header["shape"], header["dtype"])

    @property
    def busy(self) -> bool:
        """Whether any task is queued or running."""
        return bool(self.running) or any(j.active for j in self.jobs.values())

    @property
    def moving_pixels(self) -> bool:
        """Whether any task in flight moves pixels over MPI (see Backend.moving_pixels)."""
        return any(b.moving_pixels() for b in (self.backend, self.local) if b is not None)

    # -- the loop's one step --------------------------------------------------------------

    def step(self) -> bool:
        """Collect finished tasks and hand out new ones; True if anything happened."""
        progressed = False
        for backend in (self.local, self.backend) if self.local else (self.backend,):
            for done in backend.poll():
                progressed = True
                self._complete(done)
        if self.streams:
            progressed = self._advance_streams() or progressed
        while not self.hold and self.backend.free_slots() > 0:
            task = self._next_task()
            if task is None:
                break
            task.sent_at = time.perf_counter()
            self.running[task.id] = task
            self.backend.submit(task)
            if not self.backend.synchronous:
                task.image.job.times["send"] += time.perf_counter() - task.sent_at
            progressed = True
        return progressed

    def _next_task(self) -> Task | None:
        """The next task, taking jobs in turn; starts a job's next image when it has none."""
        for _ in range(len(self.turns)):
            job_id = self.turns[0]
            self.turns.rotate(-1)
            job = self.jobs.get(job_id)
            if job is None or not job.active:
                self.turns.remove(job_id)
                continue
            if job.listener.blocked(job):
                continue
            if not job.ready:
                self._start_next_image(job)
            if job.ready:
                return job.ready.popleft()
        return None

    def _start_next_image(self, job: Job) -> None:
        """Start images in order until one yields a task (a bad image yields none)."""
        while job.next_image < len(job.images) and not job.ready and job.active:
            if sum(1 for i in self.streams if i.job is job) >= MAX_STREAMS_PER_JOB:
                return  # their tasks wait for decoded rows: start no more decoders meanwhile
            image = job.images[job.next_image]
            if not image.uploaded:
                return  # images start in order; this one's data has not arrived yet
            job.next_image += 1
            if image.finished:
                continue  # failed before its turn (a front refused it)
            image.started_at = time.perf_counter()
            if job.started is None:
                job.started, job.state = time.perf_counter(), "running"
            self._start_image(image)

    # -- images and stages ----------------------------------------------------------------

    def _start_image(self, image: ImageWork) -> None:
        """Plan the image; send it whole as one task, or decode it here and start stage one;
        or, for a file in a format built for random access, hand out regions of it."""
        job = image.job
        if job.shared_fs and job.targets is not None and self._start_regions(image):
            return
        if image.open_segments is not None:
            try:
                image.segments, image.open_segments = image.open_segments(), None
            except ImgprocError as exc:  # the segment is not the one declared: this image fails
                self._fail_image(image, exc.code, str(exc))
                return
        if image.segments:
            if self.shared_memory and self._start_shared(image):
                return
            try:
                image.source.pixels = image.segments[0].pixels()  # mapped: tiles go from there
            except OSError as exc:
                self._fail_image(image, "shm_refused", f"cannot map the segment: {exc.strerror}")
                return
        if image.source.path and image.source.data is None and not job.shared_fs:
            try:  # read once: probed and sent from memory
                image.source.data = image.source.encoded()
            except OSError as exc:
                self._fail_image(image, "image_read_error", f"cannot read: {exc.strerror or exc}")
                return
            except ImgprocError as exc:  # the reader names the cause itself
                self._fail_image(image, exc.code, str(exc))
                return
        try:  # from the header, before any planning or decoding is spent on the image
            shape = image.source.probe()
            if shape is not None:
                job.pipeline.check_pixel_limit(shape[:2], self.max_pixels)
        except Exception as exc:  # noqa: BLE001 - one bad image must not stop its job
            self._fail_image(image, error_code(exc), describe(exc))
            return
        image.plan = plan_image(
            job.pipeline,
            image.source,
            job.tile,
            self.backend.workers,
            self.cutover_s,
            self.inline_s,
        )
        if image.plan.path == "inline" and self.local is not None:
            self._queue(image, self._image_task(image), None)
            task = job.ready.pop()
            self.running[task.id] = task
            self.local.submit(task)
            return
        if image.plan.path in ("whole", "inline"):
            self._queue(image, self._image_task(image), None)
            return
        started = time.perf_counter()
        try:
            pixels = image.source.decode()
            job.pipeline.check_pixel_limit(pixels.shape, self.max_pixels)
        except Exception as exc:  # noqa: BLE001 - one bad image must not stop its job
            self._fail_image(image, error_code(exc), describe(exc))
            return
        finally:
            job.times["decode"] += time.perf_counter() - started
        image.source.pixels = image.source.data = None  # the decoded copy is the one we keep
        image.pixels = pixels
        image.plan = bound_tiles(image.plan, *pixels.shape[:2], job.pipeline.halo)
        image.stages = list(job.pipeline.stages_for(pixels.shape))
        self._start_stage(image)

    def _start_regions(self, image: ImageWork) -> bool:
        """Start a by-reference image as region tasks, if its pipeline is one tiled stage or
        one chain (:mod:`mpi_imgproc.chain`) and its input and output are region formats or
        streamed ones (:mod:`mpi_imgproc.streamio`): each worker reads its strip (plus halo, or
        a chain's input window) and writes its rows of the output itself, and rank 0 moves only
        task descriptions (and, for a JPEG or PNG, decodes or encodes it on threads, strip by
        strip, as the strips are needed or finished).  No process ever holds the image, so the
        pixel limit does not apply.  False: not such an image (it goes the usual way)."""
        job, source = image.job, image.source.path
        assert job.targets is not None
        target = job.targets(image)
        if source is None:
            return False
        kinds = [_io_kind(source), _io_kind(target)]
        if None in kinds:
            return False
        try:
            if kinds[0] == "region":
                reader = use_beneath(job.root, source, partial_fn(open_region, name=source))
                if reader is None:
                    return False
                in_shape, dtype = reader.shape, reader.dtype
                reader.close()  # each task opens its own
            else:
                probed = streamio.streamable(job.root, source)
                if probed is None:
                    return False
                in_shape, dtype = probed
            stages = job.pipeline.stages_for(in_shape)
            if len(stages) != 1 or type(stages[0]) not in (TiledStage, ChainStage):
                return False
            shape = job.pipeline.output_shape(in_shape)
            if kinds[1] == "stream" and not streamio.encodable(target, shape, dtype):
                return False
            largest = max(math.prod(in_shape), math.prod(shape)) * dtype.itemsize
            if "stream" in kinds and (largest < self.stream_min_bytes or job.tile == 0):
                return False
            self._make_region_files(image, kinds, in_shape, shape, dtype)
        except Exception as exc:  # noqa: BLE001 - one bad image must not stop its job
            self._fail_image(image, error_code(exc), describe(exc))
            return True
        how = " and ".join(
            f"{what} {'streamed by rank 0' if kind == 'stream' else 'by regions'}"
            for what, kind in zip(("read", "written"), kinds)
        )
        files = {"source": image.decoded or source, "root": job.root, "target": image.partial}
        self._queue_regions(image, stages[0], in_shape, shape, dtype, how, files)
        image.gated = deque(sorted(image.gated, key=lambda g: g[0]))  # flips read rows late
        for thread in (image.decoder, image.encoder):
            if thread is not None:
                thread.start()
        if image.decoder or image.encoder:
            self.streams.append(image)
        return True

    def _start_shared(self, image: ImageWork) -> bool:
        """Start a same-host client's image as region tasks on its segments: each worker
        reads its strip (plus halo, or a chain's window) from the input segment and writes
        its rows into the result segment, and rank 0 moves only task descriptions.  False:
        the pipeline is not one tiled stage or chain, or a tile size was asked for (the
        image goes the usual way, its tiles sent from the mapped input)."""
        source, target = image.segments
        stages = image.job.pipeline.stages_for(source.shape)
        if image.job.tile != "auto" or len(stages) != 1:
            return False
        if type(stages[0]) not in (TiledStage, ChainStage):
            return False
        image.shared = True
        files = {"source": source.path, "source_layout": source.layout()}
        files.update(target=target.path, target_layout=target.layout())
        how = "read and written by regions of shared memory"
        self._queue_regions(image, stages[0], source.shape, target.shape, source.dtype, how, files)
        return True

    def _queue_regions(
        self,
        image: ImageWork,
        stage: Stage,
        in_shape: tuple[int, ...],
        shape: tuple[int, ...],
        dtype: np.dtype,
        how: str,
        files: dict[str, Any],
    ) -> None:
        """Queue an image's region tasks: full-width strips of the output ``shape``, each
        reading what ``files`` names (``source``, ``target`` and how to open them).  A strip
        is ``tile`` rows when the job names a size, else about :data:`REGION_TASK_BYTES`."""
        height, width = shape[:2]  # of the output: strips are cut there
        row_bytes = width * math.prod(shape[2:]) * dtype.itemsize
        asked = image.job.tile
        if isinstance(asked, int) and asked > 0:
            rows = asked
        else:
            rows = max(16, stage.halo, REGION_TASK_BYTES // max(1, row_bytes))
        rows = max(rows, math.ceil(height / MAX_TILES_PER_IMAGE))
        image.plan = Plan("regions", rows, True, f"{how}: strips of {rows} rows")
        stage_json = json.dumps(stage.to_json(), separators=(",", ":"))
        for tile, margins in _strips(stage, in_shape, rows):
            header = {"kind": "region", "stage": stage_json, **files}
            header.update(region=tile.region, core=tile.core, margins=margins)
            gate = tile.region[1] if image.decoder is not None else None
            self._queue(image, (header, None), tile, gate)

    def _make_region_files(
        self,
        image: ImageWork,
        kinds: list[str],
        in_shape: tuple[int, ...],
        shape: tuple[int, ...],
        dtype: np.dtype,
    ) -> None:
        """Create what an image's region tasks read and write: the output (or, when it is to
        be encoded, its raw rows), the decoded input when it is streamed, and the threads."""
        job = image.job
        assert job.targets is not None and image.source.path is not None
        target = job.targets(image)
        if not job.root:  # batch mode's plain paths: the output tree is made as it is filled
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
        # The output (raw, for streamed ones, and then its encoding; a resize may make it far
        # larger than the input) and a streamed input's decoded pixels must fit on the disk,
        # beside what the images already running have been promised, before any is written.
        out_bytes = math.prod(shape) * dtype.itemsize
        scratch = out_bytes * (2 if kinds[1] == "stream" else 1)
        what = "the output"
        if kinds[0] == "stream":
            scratch += math.prod(in_shape) * dtype.itemsize
            what = "the output and the decoded input"
        folder = os.path.dirname(target)
        fd = open_beneath(job.root, folder, directory=True) if job.root else None
        try:
            promised = sum(self.promised.values())
            streamio.check_scratch(
                fd_path(fd) if fd is not None else folder, scratch + promised, what
            )
        finally:
            if fd is not None:
                os.close(fd)
        self.promised[id(image)] = scratch
        tag = f"{job.id[-8:]}{image.index}"  # two jobs writing one target never share files
        if kinds[1] == "stream":
            image.partial = streamio.temporary(target, "out", tag)
            image.built = partial_name(target, tag)
            image.encoder = streamio.Encoder(job.root, image.partial, image.built, shape, dtype)
        else:
            image.partial = partial_name(target, tag)
        make = partial_fn(create_output, shape=shape, dtype=dtype, name=image.partial)
        create_beneath(job.root, image.partial, make)
        if kinds[0] == "stream":
            image.decoded = streamio.temporary(target, "in", tag)
            make = partial_fn(create_output, shape=in_shape, dtype=dtype, name=image.decoded)
            create_beneath(job.root, image.decoded, make)
            image.decoder = streamio.Decoder(job.root, image.source.path, image.decoded)

    def _advance_streams(self) -> bool:
        """Hand out the region tasks whose rows are decoded, fail images whose decoder or
        encoder failed, and finish those whose encoder is done; True if anything happened."""
        progressed = False
        for image in list(self.streams):
            if image.finished:  # failed or cancelled: its threads stop and its files go
                self._discard(image)
                continue
            # ``finished`` is read before ``error``: a thread sets its error, then finished.
            ended = [t is not None and t.finished for t in (image.decoder, image.encoder)]
            failed = next(
                (t.error for t, end in zip((image.decoder, image.encoder), ended)
                 if end and t is not None and t.error is not None),
                None,
            )  # fmt: skip
            if failed is not None:
                self._fail_image(image, *failed)
                progressed = True
                continue
            if image.decoder is not None:
                while image.gated and image.gated[0][0] <= image.decoder.rows:
                    image.job.ready.append(image.gated.popleft()[1])
                    progressed = True
            if image.pending == 0 and (image.encoder is None or ended[1]):
                self._regions_done(image)
                progressed = True
        return progressed

    def _discard(self, image: ImageWork, keep: str | None = None) -> None:
        """Stop an image's decoder and encoder and remove its files by regions: the scratch
        files, and (unless it is ``keep``, the finished output about to take its name) the
        partial output."""
        with contextlib.suppress(ValueError):
            self.streams.remove(image)
        self.promised.pop(id(image), None)
        for thread in (image.decoder, image.encoder):
            if thread is not None:
                thread.stop()
                if thread.ident is not None:  # started
                    thread.join(timeout=10)
        leftovers = (image.decoded, image.partial, image.built)
        streamio.remove(image.job.root, *(p for p in leftovers if p and p != keep))
        image.decoder = image.encoder = None
        image.decoded = image.partial = image.built = None
        image.gated.clear()
        self._close_segments(image)

    @staticmethod
    def _close_segments(image: ImageWork) -> None:
        """Close rank 0's descriptors of the image's segments (a late task that opens the
        number again finds another file or none, and its nonce check refuses it)."""
        for segment in image.segments:
            segment.close()
        image.segments = ()

    def _regions_done(self, image: ImageWork) -> None:
        """Every strip is written (and encoded): the output takes its name."""
        job = image.job
        if image.shared:  # the result segment is the output
            self._image_done(image, ImageResult())
            return
        assert job.targets is not None and image.partial is not None
        target = job.targets(image)
        built = image.built or image.partial
        self._discard(image, keep=built)
        try:
            if job.root:
                replace_beneath(job.root, built, target)
            else:
                os.replace(built, target)
        except (OSError, ImgprocError) as exc:
            streamio.remove(job.root, built)
            why = f"cannot put the output in place: {describe(exc)}"
            self._fail_image(image, "image_write_error", why)
            return
        self._image_done(image, ImageResult(written=target))

    def _image_task(self, image: ImageWork) -> tuple[dict[str, Any], np.ndarray | None]:
        """Header and payload of a whole-image task (see :mod:`mpi_imgproc.imagetask`)."""
        job, source = image.job, image.source
        spec: dict[str, Any] = {
            "kind": "image",
            "pipeline": job.pipeline.to_json(),
            "format": output_format(job.output, source.name),
            "max_pixels": self.max_pixels,
        }
        payload: np.ndarray | None = None
        if source.pixels is not None:
            spec["input"], payload = PIXELS, source.pixels
        elif job.shared_fs and source.path:
            spec["input"], spec["source"] = PATH, source.path
        else:
            try:
                spec["input"], payload = ENCODED, as_buffer(source.encoded())
            except (OSError, ImgprocError):
                spec["input"], spec["source"] = PATH, source.path  # the worker will report it
        if job.root:
            spec["root"] = job.root
        if job.output == "pixels":
            spec["output"] = PIXELS
        elif job.shared_fs and job.targets is not None:
            spec["output"], spec["target"] = PATH, job.targets(image)
        else:
            spec["output"] = ENCODED
        return spec, payload

    def _queue(
        self,
        image: ImageWork,
        task: tuple[dict[str, Any], np.ndarray | None],
        tile: Tile | None,
        gate: int | None = None,
    ) -> None:
        """Queue a task; with ``gate``, only once the image's decoder has that many rows."""
        header, payload = task
        image.pending += 1
        image.tiles_used += 1
        image.job.tiles_total += 1
        made = Task(next(self._task_ids), image, header, payload, tile)
        if gate is None:
            image.job.ready.append(made)
        else:
            image.gated.append((gate, made))

    def _start_stage(self, image: ImageWork) -> None:
        """Cut the image's current stage into tasks; views (crop, flip, quarter turns) are
        applied here first, and an image with no stage left is done."""
        started = time.perf_counter()
        while image.stage_no < len(image.stages) and isinstance(
            image.stages[image.stage_no], ViewStage
        ):
            assert image.pixels is not None
            image.pixels = image.stages[image.stage_no].process(image.pixels)
            image.stage_no += 1
        if image.stage_no < len(image.stages):
            self._cut_stage(image)
        image.job.times["split"] += time.perf_counter() - started
        if image.stage_no == len(image.stages):
            pixels, image.pixels = np.ascontiguousarray(image.pixels), None
            self._image_done(image, ImageResult(pixels=pixels))

    def _cut_stage(self, image: ImageWork) -> None:
        assert image.pixels is not None
        stage = image.stages[image.stage_no]
        height, width = image.pixels.shape[:2]
        assert image.plan is not None
        size, strips = image.plan.tile, image.plan.strips
        if isinstance(stage, ReduceStage):
            tiles = split_with_halo(height, width, size, 0, strips)
            image.statistic = None
        elif isinstance(stage, ChainStage):
            chained = _strips(stage, image.pixels.shape, size)
            image.merger = Merger(*stage.output_shape[:2], [t for t, _ in chained])
        else:
            size = 0 if stage.whole else size
            tiles = split_with_halo(height, width, size, stage.halo, strips or stage.full_rows)
            image.merger = Merger(height, width, tiles)
        stage_json = json.dumps(stage.to_json(), separators=(",", ":"))  # once per stage
        if not isinstance(stage, ChainStage):
            chained = [(t, t.margins) for t in tiles]
        for tile, margins in chained:
            header = {"kind": "tile", "stage": stage_json, "margins": margins}
            self._queue(image, (header, tile.region_of(image.pixels)), tile)

    def _complete(self, done: Completion) -> None:
        task = self.running.pop(done.task_id, None)
        if task is None:
            return
        if done.lost:  # its rank died: the task goes out again, first in its job's line
            if task.image.job.active and not task.image.finished:
                task.image.job.ready.appendleft(task)
            return
        image, job = task.image, task.image.job
        rank = job.ranks.setdefault(done.rank, {"tiles": 0, "busy_s": 0.0, "bytes": 0})
        rank["tiles"] += 1
        rank["busy_s"] += done.busy
        moved = (task.payload.nbytes if task.payload is not None else 0) + (
            done.result.nbytes if done.result is not None else 0
        )
        rank["bytes"] += moved
        rank["cpu_s"] = rank.get("cpu_s", 0.0) + done.cpu
        rank["maxrss_mb"] = max(rank.get("maxrss_mb", 0.0), done.maxrss_kb / 1024)
        if len(job.task_times) < MAX_TASK_TIMES:  # for task timelines: when it ran, roughly
            now = time.perf_counter() - job.submitted
            job.task_times.append((done.rank, round(max(0.0, now - done.busy), 4), round(now, 4)))
        job.times["compute"] += done.busy
        job.times["receive"] += done.received_s
        job.times["decode"] += done.fields.pop("decode_s", 0.0)
        job.times["encode"] += done.fields.pop("encode_s", 0.0)
        if not job.active or image.finished:
            return
        job.tiles_done += 1
        if done.error is not None:
            self._fail_image(image, *done.error)
            return
        if task.tile is None:
            self._whole_image_done(image, done)
            return
        if image.partial is not None or image.shared:  # a region task: its rows are written
            image.pending -= 1
            if image.encoder is not None:
                image.encoder.finish(task.tile.core[0], task.tile.core[1])
            if image.pending == 0 and image.encoder is None:
                self._regions_done(image)
            else:
                job.listener.progress(job, False)
            return
        assert done.result is not None
        stage = image.stages[image.stage_no]
        if isinstance(stage, ReduceStage):
            image.statistic = (
                done.result if image.statistic is None else image.statistic + done.result
            )
        else:
            assert image.merger is not None
            started = time.perf_counter()
            image.merger.place(task.tile, done.result)
            job.times["merge"] += time.perf_counter() - started
        image.pending -= 1
        if image.pending == 0:
            self._stage_finished(image)
        else:
            job.listener.progress(job, False)

    def _stage_finished(self, image: ImageWork) -> None:
        stage = image.stages[image.stage_no]
        if isinstance(stage, ReduceStage):
            image.stages[image.stage_no] = stage.applier(image.statistic)
            self._start_stage(image)
            return
        assert image.merger is not None and image.merger.output is not None
        image.pixels, image.merger = image.merger.output, None
        image.stage_no += 1
        self._start_stage(image)

    def _whole_image_done(self, image: ImageWork, done: Completion) -> None:
        image.source.pixels = image.source.data = None
        if done.fields.get("written"):
            self._image_done(image, ImageResult(written=done.fields["written"]))
        elif image.job.output == "pixels":
            self._image_done(image, ImageResult(pixels=done.result))
        else:
            self._image_done(image, ImageResult(encoded=done.result))

    def _image_done(self, image: ImageWork, result: ImageResult) -> None:
        job = image.job
        image.finished = True
        job.images_done += 1
        delivered = job.listener.image_done(job, image, result)
        self._close_segments(image)
        if delivered is False:
            job.failed += 1  # the front could not deliver it (and has said why)
        else:
            job.ok += 1
            job.paths[image.path] = job.paths.get(image.path, 0) + 1
        self._image_finished(job)

    def fail_image(self, image: ImageWork, code: str, message: str) -> None:
        """Report one image as failed (a front that found its data bad); the job goes on."""
        if image.job.active and not image.finished:
            self._fail_image(image, code, message)

    def _fail_image(self, image: ImageWork, code: str, message: str) -> None:
        job = image.job
        image.finished, image.pixels, image.merger = True, None, None
        image.source.pixels = image.source.data = None
        self._discard(image)  # never leave a half-written output or scratch file behind
        job.ready = deque(t for t in job.ready if t.image is not image)
        job.failed += 1
        job.images_done += 1
        job.listener.image_failed(job, image, code, message)
        self._image_finished(job)

    def _image_finished(self, job: Job) -> None:
        job.listener.progress(job, True)
        if job.images_done == len(job.images) and job.active:
            self._finish(job, "done", None)

    def _finish(self, job: Job, state: str, message: str | None) -> None:
        job.state, job.message, job.ended = state, message, time.perf_counter()
        job.listener.finished(job)


MAX_STREAMS_PER_JOB = 2  # images of one job decoded or encoded by rank 0 at the same time
# Tasks whose times a job's ``done`` stats list: a timeline needs no more, and the message
# stays small (a 4096-tile image sends that many).
MAX_TASK_TIMES = 2000


def _io_kind(path: str) -> str | None:
    """How region tasks read or write a file: ``region`` (random access), ``stream``
    (decoded or encoded by rank 0 strip by strip), or None (not at all)."""
    suffix = Path(path).suffix.lower()
    if suffix in REGION_SUFFIXES:
        return "region"
    # (streamio.streamable says whether an input can be decoded so: that takes libvips;
    # encoding does not)
    return "stream" if suffix in streamio.STREAM_SUFFIXES else None


def _strips(stage: Stage, shape: tuple[int, ...], rows: int) -> list[tuple[Tile, tuple]]:
    """Full-width strips of a tiled stage or a chain over an input of ``shape``, each with the
    ``margins`` its task carries (a chain's: the tile's placement)."""
    if isinstance(stage, ChainStage):
        rows = max(rows, math.ceil(stage.output_shape[0] / MAX_TILES_PER_IMAGE))
        return [(t, stage.placement(t)) for t in stage.tiles(rows)]
    tiles = split_with_halo(shape[0], shape[1], rows, stage.halo, full_rows=True)
    return [(t, t.margins) for t in tiles]


def output_format(output: str, name: str) -> str:
    """The encoding of a result: the job's ``output``, or for ``same`` the name's suffix."""
    if output != "same":
        return output
    suffix = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return suffix or "png"

"""The cluster: ``mpiexec -n N python -m mpi_imgproc.server``.

Rank 0 serves clients on a ZeroMQ ROUTER socket (``docs/protocol.md``) and schedules their
jobs' tiles over MPI; every other rank is a worker (:mod:`mpi_imgproc.worker`).  With ``-n 1``
rank 0 serves and processes with a local engine itself.

Rank 0 runs one thread that watches ZeroMQ and MPI in turn: it polls the socket with a short
timeout while tiles are in flight and a long one while idle, so it neither spins nor adds
latency.  An unhandled exception on any rank aborts the whole MPI job instead of leaving the
other ranks waiting.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import ipaddress
import os
import re
import secrets
import signal
import socket
import sys
import time
import traceback
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import msgspec
import numpy as np
import zmq
from mpi4py import MPI

from . import __version__, datapaths, shm
from .errors import ImgprocError, PathRefused, describe, error_code
from .imageio import output_path
from .launch_check import refuse_mismatched_launch
from .local_engines import ENGINES, check_engine, get_engine
from .mpi_transport import Backoff, run_or_abort
from .pipeline import Pipeline
from .planner import DEFAULT_CUTOVER_S, DEFAULT_INLINE_S, MAX_TILES_PER_IMAGE, ImageSource
from .protocol import (
    HEADER_LIMIT,
    MAX_IMAGES_PER_REQUEST,
    VERSION,
    Attach,
    Cancel,
    Heartbeat,
    ImageDesc,
    Info,
    ProtocolError,
    Status,
    Submit,
    Upload,
    check_image_desc,
    decode_request,
    pack,
    pipeline_json,
    raw_fields,
    raw_pixels,
    tile_arg,
)
from .scheduler import (
    Backend,
    ImageResult,
    ImageWork,
    Job,
    JobListener,
    Scheduler,
    output_format,
)
from .streamio import STREAM_MIN_BYTES

DEFAULT_BIND = "tcp://127.0.0.1:5555"
PROGRESS_INTERVAL = 0.05  # seconds between progress messages of one job
FINISHED_JOBS_KEPT = 1000
OUTBOX_BLOCK = 16  # replies waiting for one client before its tiles are held back
OUTBOX_LIMIT = 256  # replies waiting for one client before its direct replies are dropped
OUTBOX_BLOCK_BYTES = 256 * 2**20  # bytes of replies waiting for one client: tiles held back
MAX_IMAGES_WAITING = 2 * MAX_IMAGES_PER_REQUEST  # images of one client's unfinished jobs
RCVHWM = 100  # requests queued per client connection in ZeroMQ before it stops reading
SNDHWM = 64  # replies ZeroMQ queues per client connection (results can be large)
# ZeroMQ-level heartbeats: libzmq's I/O thread answers them even while rank 0 computes, so a
# dead peer (either side) is noticed within the timeout whatever the application is doing.
ZMTP_HEARTBEAT_MS, ZMTP_TIMEOUT_MS = 2000, 10000
_BIND = re.compile(r"^(tcp://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):(\*|\d{1,5})|ipc://\S+)$")


class Options(argparse.Namespace):
    bind: str
    engine: str
    workers_per_rank: int | None
    tile: int | str
    max_request_mb: float
    max_pixels: int
    curve_keys: str | None
    data_root: str | None
    insecure: bool
    client_timeout: float
    in_flight: int | None
    cutover_ms: float
    inline_ms: float
    stream_min_mb: float
    no_shm: bool


def _number(kind: type, minimum: float, strict: bool = False, maximum: float = float("inf")):
    """An argparse type: a ``kind`` number at least (or, ``strict``, above) ``minimum``, and
    at most ``maximum``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        if value < minimum or (strict and value == minimum):
            raise argparse.ArgumentTypeError(
                f"must be {'>' if strict else '>='} {minimum:g}, got {text!r}"
            )
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum:g}, got {text!r}")
        return value

    return parse


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """The server's command line; every value is checked here (exit 2 with one line)."""
    parser = argparse.ArgumentParser(
        prog="mpiexec -n N python -m mpi_imgproc.server",
        description="Serve image jobs on rank 0 and process their tiles on every other rank.",
    )
    parser.add_argument("--bind", default=DEFAULT_BIND, help="ZeroMQ endpoint (port * = any)")
    add_cluster_options(parser)
    parser.add_argument(
        "--inline-ms",
        type=_number(float, 0),
        default=DEFAULT_INLINE_S * 1e3,
        help="raw-pixel images cheaper than this (and than moving them) run on rank 0; 0: never",
    )
    parser.add_argument(
        "--max-request-mb",
        type=_number(float, 0, strict=True, maximum=2**20),
        default=1024.0,
        help="bytes of image data one submit may declare (MiB)",
    )
    parser.add_argument(
        "--max-pixels",
        type=_number(int, 1),
        default=400_000_000,
        help="pixels per image, input and every op's output",
    )
    parser.add_argument(
        "--data-root",
        metavar="DIR",
        help="serve jobs by reference: clients name files under DIR, workers read and write them",
    )
    parser.add_argument(
        "--no-shm",
        action="store_true",
        help="take no shared-memory images from clients on this host (they send pixels)",
    )
    parser.add_argument("--curve-keys", metavar="DIR", help="enable CURVE with keys from DIR")
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow --bind beyond loopback without --curve-keys (anyone reaching it may submit)",
    )
    parser.add_argument(
        "--client-timeout",
        type=_number(float, 1),
        default=30.0,
        help="seconds of client silence before its jobs are cancelled",
    )
    options = parser.parse_args(argv, namespace=Options())
    problem = _bind_problem(options)
    if problem:
        parser.exit(2, f"{parser.prog}: error: {problem}\n")
    return options


def _bind_problem(options: Options) -> str | None:
    """Why ``--bind`` cannot be used as given, or None."""
    match = _BIND.match(options.bind)
    if not match:
        return (
            f"--bind {options.bind!r} is not an endpoint; expected tcp://HOST:PORT "
            "(PORT may be *) or ipc://PATH"
        )
    if match.group(3) and match.group(3) != "*" and not 0 < int(match.group(3)) < 65536:
        return f"--bind {options.bind!r}: port must be 1-65535"
    host = match.group(2)
    if host is None or options.curve_keys or options.insecure or _is_loopback(host):
        return None
    return (
        f"--bind {options.bind} listens beyond this machine without --curve-keys, so anyone "
        "who can reach it could submit jobs; give --curve-keys DIR (made by `mpi-imgproc "
        "keys DIR`), or --insecure if the network is trusted"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host or interface name: it may reach beyond this machine


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by the server and batch mode: engine, workers, tiling and scheduling."""
    parser.add_argument("--engine", choices=ENGINES, default="threads", help="engine per rank")
    parser.add_argument(
        "--workers-per-rank",
        type=_number(int, 1),
        default=None,
        help="engine workers per rank (default: this node's cores / its worker ranks)",
    )
    parser.add_argument("--tile", type=tile_arg, default="auto", help="tile size, 0 or auto")
    parser.add_argument(
        "--in-flight", type=_number(int, 1), default=None, help="tasks in flight per worker"
    )
    parser.add_argument(
        "--cutover-ms",
        type=_number(float, 0),
        default=DEFAULT_CUTOVER_S * 1e3,
        help="with --tile auto: images estimated to take less compute go to a worker whole",
    )
    parser.add_argument(
        "--stream-min-mb",
        type=_number(float, 0),
        default=STREAM_MIN_BYTES / 2**20,
        help="by reference: JPEG/PNG images whose pixels take at least this many MiB are "
        "decoded and encoded strip by strip (docs/protocol.md, Jobs by reference)",
    )


def make_backend(comm: MPI.Comm, options: argparse.Namespace) -> tuple[Backend, int, list, list]:
    """Rank 0's backend (the worker ranks, or a local engine when alone), the engine workers
    per rank, every rank's host name and the workers' engine descriptions.  Collective: the
    workers call :func:`run_worker` at the same time."""
    from .backends import LocalBackend, MPIBackend

    per_rank = workers_per_rank(comm, options)
    hosts = comm.gather(MPI.Get_processor_name(), root=0)
    engines = comm.gather(None, root=0)[1:]
    if comm.Get_size() == 1:
        local = LocalBackend(get_engine(options.engine, per_rank))
        return local, per_rank, hosts, [{**local.engine.describe(), "host_id": shm.host_identity()}]
    in_flight = options.in_flight or 2 * per_rank  # one batch running, the next one waiting
    return MPIBackend(comm, in_flight), per_rank, hosts, engines


def workers_per_rank(comm: MPI.Comm, options: Options) -> int:
    """Engine workers for each rank: ``--workers-per-rank``, or this rank's share of its CPU
    set (see :func:`cores_for_worker`).  Collective: every rank calls it."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    affinity = getattr(os, "sched_getaffinity", None)  # Linux only
    mine = frozenset(affinity(0) if affinity else range(os.cpu_count() or 1))
    placed = node.allgather((comm.Get_rank(), mine))
    node.Free()
    workers = [cpus for rank, cpus in placed if rank != 0]
    return options.workers_per_rank or cores_for_worker(mine, workers)


def cores_for_worker(mine: frozenset[int], workers_on_node: Sequence[frozenset[int]]) -> int:
    """A rank's CPU set divided between the worker ranks on its node whose sets overlap it:
    unbound ranks all see the whole node and share it; ranks bound to CPUs of their own
    (``srun --cpus-per-task``, ``mpirun --bind-to``) each keep theirs whole."""
    sharing = sum(1 for cpus in workers_on_node if cpus & mine)
    return max(1, len(mine) // max(1, sharing))


def versions() -> dict[str, str]:
    """Versions of everything a bug report needs."""
    import mpi4py

    return {
        "mpi_imgproc": __version__,
        "protocol": str(VERSION),
        "mpi": MPI.Get_library_version().replace("\0", "").splitlines()[0].strip(),  # Open MPI: NUL
        "mpi4py": mpi4py.__version__,
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "pyzmq": zmq.__version__,
        "zmq": zmq.zmq_version(),
    }


class ClientReplies(JobListener):
    """Turns job events into protocol messages for the job's owner."""

    def __init__(self, server: Server, progress: bool = True):
        self.server = server
        self.wants_progress = progress
        self.last_progress = 0.0

    def progress(self, job: Job, image_finished: bool) -> None:
        now = time.perf_counter()
        if not self.wants_progress or self.blocked(job):
            return  # progress is advisory: never queue it for a client that is not reading
        if not image_finished and now - self.last_progress < PROGRESS_INTERVAL:
            return
        self.last_progress = now
        fields = job.summary()
        fields.pop("state")
        self.server.reply(job.owner, pack("progress", **fields), job.id)

    def image_done(self, job: Job, image: ImageWork, result: ImageResult) -> bool:
        fields: dict[str, Any] = {"job": job.id, "index": image.index, "name": image.name}
        fields.update(path=image.path, tiles=image.tiles_used)
        if image.plan is not None:
            fields["reason"] = image.plan.reason
        frames: list[Any] = []
        if image.segments:  # into the client's result segment; only the header goes back
            target = image.segments[1]
            try:
                if result.pixels is not None:  # not by regions: the workers wrote it already
                    target.write(result.pixels)
            except (ImgprocError, OSError) as exc:
                self.image_failed(job, image, error_code(exc), describe(exc))
                return False
            fields.update(encoding="shm", shape=list(target.shape), dtype=str(target.dtype))
            if not job.segments_held:  # attached by another process: the pixels go along
                try:
                    frames.append(target.pixels())
                except OSError as exc:
                    why = f"cannot map the result segment: {exc.strerror}"
                    self.image_failed(job, image, "shm_refused", why)
                    return False
                fields["encoding"] = "raw"
            else:  # kept open until sent, for an attach from another process meanwhile
                frames = SegmentFrames(target)
                image.segments = image.segments[:1]
        elif job.output == "pixels":
            frames.append(np.ascontiguousarray(result.pixels))
            fields.update(raw_fields(frames[0]))
        else:
            fields["encoding"] = output_format(job.output, image.name)
            started = time.perf_counter()
            try:
                if job.targets is None:
                    frames.append(result.encoded_as(fields["encoding"]))
                else:  # by reference: a worker wrote it, or (tiled) rank 0 writes it now
                    fields["written"] = self._written(job, image, result, fields["encoding"])
            except (ImgprocError, OSError) as exc:
                self.image_failed(job, image, error_code(exc), describe(exc))
                return False
            finally:
                job.times["encode"] += time.perf_counter() - started
        message = pack("result", frames, **fields)
        if isinstance(frames, SegmentFrames):
            message = SegmentFrames(frames.segment, message)
        self.server.reply(job.owner, message, job.id)
        return True

    def _written(self, job: Job, image: ImageWork, result: ImageResult, fmt: str) -> str:
        """The output file of a by-reference image, named relative to the data root."""
        assert job.targets is not None and self.server.root is not None
        target = result.written or job.targets(image)
        if result.written is None:
            datapaths.write_beneath(str(self.server.root), target, result.encoded_as(fmt))
        return datapaths.relative(self.server.root, target)

    def image_failed(self, job: Job, image: ImageWork, code: str, message: str) -> None:
        fields = {"job": job.id, "index": image.index, "name": image.name}
        self.server.reply(
            job.owner, pack("image_error", code=code, message=message, **fields), job.id
        )

    def finished(self, job: Job) -> None:
        fields = {"job": job.id, "state": job.state, "ok": job.ok, "failed": job.failed}
        fields["cancelled"] = len(job.images) - job.ok - job.failed
        done = pack("done", stats=job.stats(), message=job.message, **fields)
        self.server.reply(job.owner, done, job.id)
        self.server.retire(job)

    def blocked(self, job: Job) -> bool:
        return self.server.backlogged(job.owner)


class SegmentFrames(list):
    """A ``result`` message whose pixels are in a client's result segment, which it keeps
    open (rank 0's descriptor closes with the message): should the job be attached from
    another process before it is sent, the pixels can still go along (:meth:`as_raw`)."""

    def __init__(self, segment: shm.Attached, frames: Sequence[Any] = ()):
        super().__init__(frames)
        self.segment = segment

    def as_raw(self) -> list:
        """The message with the pixels as a raw frame (a mapping of the segment)."""
        header = msgspec.json.decode(self[0])
        header["encoding"] = "raw"
        return [msgspec.json.encode(header), self.segment.pixels()]


@dataclass(frozen=True)
class Ticket:
    """Who owns a job: the secret token sent in ``accepted``, and the CURVE key if CURVE is on."""

    token: str
    user: str | None

    def admits(self, token: str, user: str | None) -> bool:
        return secrets.compare_digest(self.token, token) and self.user == user


class Server:
    """Rank 0: the ZeroMQ front, the job table and the loop that drives the scheduler."""

    def __init__(self, sock: zmq.Socket, scheduler: Scheduler, options: Options, info: dict):
        self.sock = sock
        self.scheduler = scheduler
        self.options = options
        self.info_fields = info
        self.max_request = int(options.max_request_mb * 2**20)
        self.outbox: dict[bytes, deque[tuple[str | None, list]]] = {}
        self.unreachable: set[bytes] = set()  # connections gone; their outbox waits for attach
        self.last_seen: dict[bytes, float] = {}
        self.tickets: dict[str, Ticket] = {}
        self.uploads: dict[str, list[ImageDesc]] = {}  # declared images of jobs still uploading
        self.writing: dict[str, str] = {}  # by-reference outputs of unfinished jobs -> job id
        self.finished: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.root = datapaths.data_root(options.data_root) if options.data_root else None
        self.stopping = False

    # -- the loop --------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Serve until SIGTERM or SIGINT, then end every job and stop the workers.

        A fault of the loop itself (a bug, never a client's doing: those end in ``_handle``)
        is logged, told to every client, and raised, so that the MPI job ends non-zero.
        """
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        # While only region tasks run (workers read and write the pixels themselves), rank 0
        # has nothing to move: it looks for finished tasks every few ms, and with two tasks
        # in flight per worker none waits for that.  On a 16000x16000 job that took rank 0
        # from 0.78 s of CPU (polling every 0.2 ms) to 0.27 s.
        backoff = Backoff(floor=20e-6, ceiling=1e-3, calm_ceiling=5e-3)
        next_check = 0.0
        try:
            while not self.stopping:
                # Idle: sleep in ZeroMQ's poll, woken at once by a client.  Busy: poll ZeroMQ
                # without waiting and sleep in short steps, so that MPI (whose large transfers
                # advance only while rank 0 calls into MPI) keeps moving.
                busy = self.scheduler.busy or bool(self.outbox)
                handled = bool(poller.poll(0 if busy else 100)) and self._read_requests()
                started = time.monotonic()
                progressed = self.scheduler.step() or handled
                self._excuse_clients(time.monotonic() - started)
                progressed = self._flush() or progressed
                if progressed:
                    backoff.reset()
                elif busy:  # region tasks alone (workers do the I/O) need no fast polling
                    backoff.sleep(calm=not self.scheduler.moving_pixels and not self.outbox)
                if time.monotonic() >= next_check:
                    self._drop_silent_clients()
                    next_check = time.monotonic() + 1.0
        except Exception as exc:
            self._fail_everyone(exc)
            raise
        self.shutdown()

    def _stop(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def shutdown(self) -> None:
        """End unfinished jobs with an error to their clients, then stop every rank."""
        for job in list(self.scheduler.jobs.values()):
            self.scheduler.cancel(job, "the server is shutting down", state="failed")
        self._flush_for(1.0)
        self.scheduler.backend.close(deadline=time.perf_counter() + 7.0)
        self.sock.close(linger=500)

    def _fail_everyone(self, exc: BaseException) -> None:
        """The loop failed: log why, fail every job and tell every client we know of."""
        print("mpi_imgproc server: internal failure, stopping", file=sys.stderr, flush=True)
        traceback.print_exc()
        why = f"the server failed and is stopping ({describe(exc)})"
        try:
            for job in list(self.scheduler.jobs.values()):
                self.scheduler.cancel(job, why, state="failed")
            for identity in set(self.last_seen) - self.unreachable:
                self.reply(identity, pack("error", code="server_failed", message=why))
            self._flush_for(1.0)
        except Exception:  # noqa: BLE001 - the original fault is what matters
            traceback.print_exc()

    def _flush_for(self, seconds: float) -> None:
        deadline = time.perf_counter() + seconds
        while self.outbox.keys() - self.unreachable and time.perf_counter() < deadline:
            if not self._flush():
                time.sleep(0.01)

    # -- requests -------------------------------------------------------------------------

    def _read_requests(self) -> bool:
        """Handle every request waiting on the socket (up to a batch, to keep MPI moving)."""
        for count in range(64):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return count > 0
            identity, body = frames[0].bytes, [f.buffer for f in frames[1:]]
            self.last_seen[identity] = time.monotonic()
            self.unreachable.discard(identity)
            user = _curve_user(frames[1]) if self.options.curve_keys and len(frames) > 1 else None
            self._handle(identity, user, body)
        return True

    def _handle(self, identity: bytes, user: str | None, body: list[memoryview]) -> None:
        """Answer one request.  Whatever goes wrong becomes an ``error`` to this client: the
        server keeps serving everyone else."""
        req = None
        try:
            request, data = decode_request(body)
            req = request.req
            handler = getattr(self, f"_on_{type(request).__struct_config__.tag}")
            handler(identity, user, request, data)
        except ProtocolError as exc:
            extra = {"req": req, **exc.extra}
            self.reply(identity, pack("error", code=exc.code, message=str(exc), **extra))
        except ImgprocError as exc:
            self.reply(identity, pack("error", req=req, code=exc.code, message=str(exc)))
        except Exception as exc:  # noqa: BLE001 - a bug must cost one request, not the server
            print("mpi_imgproc server: internal error in a request", file=sys.stderr)
            traceback.print_exc()
            self.reply(identity, pack("error", req=req, code="internal", message=describe(exc)))

    def _on_submit(self, identity: bytes, user: str | None, msg: Submit, data: list) -> None:
        if self.stopping:
            raise ProtocolError("shutting_down", "the server is shutting down")
        if bool(msg.images) == bool(msg.paths):
            raise ProtocolError(
                "malformed",
                "a submit names its images in 'images' (uploaded after 'accepted') or in "
                "'paths' (files under the server's data root): one of them, not empty",
            )
        count = len(msg.images) + len(msg.paths)
        if count > MAX_IMAGES_PER_REQUEST:
            raise ProtocolError(
                "limit_exceeded", f"{count} images in one request; at most {MAX_IMAGES_PER_REQUEST}"
            )
        waiting = sum(
            len(j.images) - j.images_done
            for j in self.scheduler.jobs.values()
            if j.active and j.owner == identity
        )
        if waiting + count > MAX_IMAGES_WAITING:
            raise ProtocolError(
                "limit_exceeded",
                f"this client has {waiting} images waiting; at most {MAX_IMAGES_WAITING} at a "
                "time: wait for some jobs to finish",
            )
        pipeline = Pipeline.from_json(pipeline_json(msg))
        tile = self.options.tile if msg.tile == "auto" else msg.tile
        job_id, token = f"j{secrets.token_urlsafe(16)}", secrets.token_urlsafe(16)
        output = "pixels" if msg.result == "raw" else msg.result
        job = Job(job_id, pipeline, tile, ClientReplies(self, msg.progress), identity, output)
        refused = self._by_reference(job, msg) if msg.paths else self._expect_uploads(job, msg)
        self.tickets[job_id] = Ticket(token, user)
        self.reply(identity, pack("accepted", req=msg.req, job=job_id, token=token, images=count))
        self.scheduler.add(job)
        code = PathRefused.code if msg.paths else shm.SegmentRefused.code
        for index, why in refused.items():
            self.scheduler.fail_image(job.images[index], code, why)

    def _expect_uploads(self, job: Job, msg: Submit) -> dict[int, str]:
        """Images whose data will come in ``upload`` messages: checked from their declared
        sizes, before a byte of them is accepted."""
        for i, desc in enumerate(msg.images):
            check_image_desc(i, desc)
        shared = [i for i, d in enumerate(msg.images) if d.encoding == "shm"]
        if shared and msg.result != "raw":
            raise ProtocolError("malformed", "shm images return raw results ('result': 'raw')")
        size = sum(d.size for d in msg.images if d.encoding != "shm")  # none of it is sent
        if size > self.max_request:
            raise ProtocolError(
                "limit_exceeded",
                f"request of {size} bytes is over the limit of {self.max_request} bytes "
                "(--max-request-mb)",
            )
        held = sum(  # declared by this client's jobs that are still uploading
            sum(d.size for d in self.uploads[j.id] if d.encoding != "shm")
            for j in self.scheduler.jobs.values()
            if j.owner == job.owner and j.id in self.uploads
        )
        if held + size > 2 * self.max_request:
            raise ProtocolError(
                "limit_exceeded",
                f"this client's jobs still uploading declare {held} bytes; with {size} more "
                f"that is over {2 * self.max_request} (twice --max-request-mb): finish those "
                "uploads first",
            )
        job.images = [
            ImageWork(job, i, ImageSource(d.name or f"image{i}"), uploaded=False)
            for i, d in enumerate(msg.images)
        ]
        self.uploads[job.id] = list(msg.images)
        refused: dict[int, str] = {}
        for i in shared:
            job.images[i].uploaded = True  # its pixels are in the client's segment
            if self.info_fields.get("shm") is None:
                refused[i] = "this server takes no shared-memory images (--no-shm)"
            else:  # opened when the image starts: rank 0 holds descriptors of running ones only
                job.images[i].open_segments = partial(self._attach, job, msg.images[i], i)
        if all(image.uploaded for image in job.images):
            del self.uploads[job.id]  # nothing to upload
        return refused

    def _attach(self, job: Job, desc: ImageDesc, index: int) -> tuple[shm.Attached, ...]:
        """Open a shm image's two segments, checked against its shape and the shape the
        pipeline gives it (see :mod:`mpi_imgproc.shm`); called when the image starts."""
        assert desc.shape is not None and desc.dtype is not None
        shape = tuple(desc.shape)
        job.pipeline.check_pixel_limit(shape, self.scheduler.max_pixels)  # as for uploads
        out_shape = job.pipeline.output_shape(shape)
        where = f"images[{index}]"
        source = shm.attach(desc.segment, shape, desc.dtype, False, f"{where}.segment")
        try:
            target = shm.attach(
                desc.result_segment, out_shape, desc.dtype, True, f"{where}.result_segment"
            )
        except BaseException:
            source.close()
            raise
        return source, target

    def _by_reference(self, job: Job, msg: Submit) -> dict[int, str]:
        """Images named by path: workers read them and write ``output`` themselves.  Every path
        is confined to the data root; an input that cannot be used fails alone."""
        if self.root is None:
            raise ProtocolError(
                "by_reference_disabled",
                "this server takes no paths (start it with --data-root DIR), upload the images",
            )
        if msg.result == "raw" or not msg.output:
            raise ProtocolError(
                "malformed",
                "a by-reference submit writes files: it needs 'output' (a folder under the "
                "data root) and 'result' png, jpg, tif or same",
            )
        outdir = datapaths.inside(self.root, msg.output, "output")
        try:
            if outdir.exists() and not outdir.is_dir():
                raise PathRefused(f"output {msg.output!r} is not a folder")
            outdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PathRefused(f"output {msg.output!r}: {exc.strerror or exc}") from None
        refused: dict[int, str] = {}
        targets: dict[int, str] = {}
        for i, path in enumerate(msg.paths):
            image = ImageWork(job, i, ImageSource(os.path.basename(path) or f"image{i}"))
            job.images.append(image)
            try:
                image.source.path = str(datapaths.input_file(self.root, path))
                image.source.root = str(self.root)
                target = output_path(image.source.path, outdir, msg.result)
                _check_target(path, target, image.source.path, targets, msg.overwrite)
                if str(target) in self.writing:  # both would succeed, the last rename winning
                    raise PathRefused(
                        f"input {path!r}: output {target.name} is being written by another job "
                        f"({self.writing[str(target)]}); wait for it or choose another output"
                    )
                targets[i] = str(target)
            except PathRefused as exc:
                refused[i] = str(exc)
        job.shared_fs, job.targets = True, lambda image: targets[image.index]
        self.writing.update(dict.fromkeys(targets.values(), job.id))
        job.root = str(self.root)
        return refused

    def _on_upload(self, identity: bytes, user: str | None, msg: Upload, data: list) -> None:
        job = self._owned(msg.job, msg.token, user)
        declared = self.uploads.get(msg.job)
        if not isinstance(job, Job) or declared is None:
            return  # the job has ended (cancelled, failed): its late uploads are dropped
        if msg.index >= len(declared):
            raise ProtocolError(
                "malformed", f"upload index {msg.index}: the job has {len(declared)} images"
            )
        image, desc, frame = job.images[msg.index], declared[msg.index], data[0]
        if image.uploaded:
            raise ProtocolError(
                "malformed", f"image {msg.index} of job {job.id} was already uploaded"
            )
        image.uploaded = True
        if len(frame) != desc.size:
            why = f"upload of {len(frame)} bytes, but the submit declared {desc.size}"
            self.scheduler.fail_image(image, "malformed", why)
        elif desc.encoding == "raw":
            image.source.pixels = raw_pixels(frame, tuple(desc.shape), desc.dtype)
        else:
            image.source.data = frame
        if all(i.uploaded for i in job.images):
            del self.uploads[job.id]

    def _owned(self, job_id: str, token: str, user: str | None) -> Job | dict[str, Any]:
        """The job (or a finished job's summary) if this client owns it; else ``unknown_job``,
        the same answer as for a job that does not exist, so ids cannot be probed."""
        ticket = self.tickets.get(job_id)
        if ticket is None or not ticket.admits(token, user):
            raise ProtocolError("unknown_job", f"no job {job_id!r} of yours on this server")
        return self.scheduler.jobs.get(job_id) or self.finished[job_id]

    def _on_status(self, identity: bytes, user: str | None, msg: Status, data: list) -> None:
        job = self._owned(msg.job, msg.token, user)
        summary = job.summary() if isinstance(job, Job) else job
        self.reply(identity, pack("status", req=msg.req, **summary))

    def _on_cancel(self, identity: bytes, user: str | None, msg: Cancel, data: list) -> None:
        job = self._owned(msg.job, msg.token, user)
        if isinstance(job, Job):
            self.scheduler.cancel(job, "cancelled by request")
            job = self.finished.get(job.id, job.summary())
        self.reply(identity, pack("cancelled", req=msg.req, job=job["job"], state=job["state"]))

    def _on_attach(self, identity: bytes, user: str | None, msg: Attach, data: list) -> None:
        """Move a job (and its undelivered messages) to this connection."""
        job = self._owned(msg.job, msg.token, user)
        summary = job.summary() if isinstance(job, Job) else job
        self.reply(identity, pack("attached", req=msg.req, **summary))
        if isinstance(job, Job):
            job.owner = identity
            job.segments_held = msg.segments
        for old in list(self.outbox):
            if old == identity:
                continue
            queue = self.outbox[old]
            mine = [m for m in queue if m[0] == msg.job]
            if not msg.segments:  # results left in the submitter's segments: pixels go along
                mine = [(j, _raw(f) if isinstance(f, SegmentFrames) else f) for j, f in mine]
            if mine:
                self.outbox[old] = deque(m for m in queue if m[0] != msg.job)
                self.outbox.setdefault(identity, deque()).extend(mine)
                if not self.outbox[old]:
                    del self.outbox[old]

    def _on_info(self, identity: bytes, user: str | None, msg: Info, data: list) -> None:
        queue = {
            "jobs": sum(1 for j in self.scheduler.jobs.values() if j.active),
            "tasks_queued": sum(len(j.ready) for j in self.scheduler.jobs.values()),
            "tasks_in_flight": len(self.scheduler.running),
            "workers_alive": self.scheduler.backend.workers,
        }
        extra: dict[str, Any] = {}
        if msg.probe is not None:  # can rank 0 open this client's segments? (1 x 1, 8-bit)
            extra["shm_probe"] = False
            if self.info_fields.get("shm") is not None:
                with contextlib.suppress(ImgprocError):
                    shm.attach(msg.probe, (1, 1), "uint8", False, "probe").close()
                    extra["shm_probe"] = True
        self.reply(identity, pack("info", req=msg.req, queue=queue, **self.info_fields, **extra))

    def _on_heartbeat(self, identity: bytes, user: str | None, msg: Heartbeat, data: list) -> None:
        self.reply(identity, pack("heartbeat", req=msg.req))

    # -- replies and clients ---------------------------------------------------------------

    def reply(self, identity: bytes | None, frames: list, job_id: str | None = None) -> None:
        """Queue a message for a client; ``_flush`` sends it without ever blocking.

        A job's messages are bounded by back-pressure (``backlogged`` holds its tiles); direct
        replies to a client that does not read are dropped past ``OUTBOX_LIMIT``.
        """
        if identity is None:
            return
        queue = self.outbox.setdefault(identity, deque())
        if job_id is None and len(queue) >= OUTBOX_LIMIT:
            return
        queue.append((job_id, frames))

    def backlogged(self, identity: bytes | None) -> bool:
        """True while a client's replies are piling up, in count or in bytes (or its connection
        is gone): its jobs' tiles are held until it reads."""
        queue = self.outbox.get(identity, ())
        if identity in self.unreachable or len(queue) >= OUTBOX_BLOCK:
            return True
        queued = sum(memoryview(f).nbytes for _, frames in queue for f in frames)
        return queued >= OUTBOX_BLOCK_BYTES

    def _flush(self) -> bool:
        sent = False
        for identity in list(self.outbox.keys() - self.unreachable):
            queue = self.outbox[identity]
            while queue:
                try:
                    self.sock.send_multipart([identity, *queue[0][1]], zmq.NOBLOCK, copy=False)
                except zmq.Again:  # the client's pipe is full: keep the rest for later
                    break
                except zmq.ZMQError as exc:
                    if exc.errno != errno.EHOSTUNREACH:
                        raise
                    # Gone: keep what is undelivered for a reconnect (``attach``) until the
                    # client's silence passes --client-timeout.
                    self.unreachable.add(identity)
                    break
                queue.popleft()
                sent = True
            if not queue:
                self.outbox.pop(identity, None)
        return sent

    def _excuse_clients(self, stalled: float) -> None:
        """Rank 0 could not read for ``stalled`` seconds (a long local task, waiting on a dying
        worker's pixels): that silence is the server's, not its clients'."""
        if stalled > 1.0:
            for identity in self.last_seen:
                self.last_seen[identity] += stalled

    def _drop_silent_clients(self) -> None:
        """Cancel the jobs of clients silent for longer than ``--client-timeout`` (a silent
        client that can still be reached is told, in each job's ``done``) and forget them."""
        limit = time.monotonic() - self.options.client_timeout
        for identity, seen in list(self.last_seen.items()):
            if seen >= limit:
                continue
            why = f"no word from the client for {self.options.client_timeout:g} s"
            for job in list(self.scheduler.jobs.values()):
                if job.owner == identity and job.active:
                    self.scheduler.cancel(job, why)
            self._flush()
            self.outbox.pop(identity, None)
            self.unreachable.discard(identity)
            del self.last_seen[identity]

    def retire(self, job: Job) -> None:
        """Keep a finished job's summary for ``status``; free everything else."""
        self.scheduler.forget(job.id)
        self.uploads.pop(job.id, None)
        for target in [t for t, owner in self.writing.items() if owner == job.id]:
            del self.writing[target]
        self.finished[job.id] = job.summary()
        while len(self.finished) > FINISHED_JOBS_KEPT:
            old, _ = self.finished.popitem(last=False)
            self.tickets.pop(old, None)


def _raw(frames: SegmentFrames) -> list:
    try:
        return frames.as_raw()
    except OSError as exc:  # cannot be mapped: the client hears why, not nothing
        header = msgspec.json.decode(frames[0])
        why = f"cannot map the result segment: {exc.strerror}"
        fields = {k: header[k] for k in ("job", "index", "name")}
        return pack("image_error", code="shm_refused", message=why, **fields)


def _check_target(
    path: str, target: Path, source: str, taken: dict[int, str], overwrite: bool
) -> None:
    """Refuse an output that would destroy data: its own input, another image's output, or
    (without ``overwrite``) a file that is already there."""
    if str(target) == source:
        raise PathRefused(f"input {path!r}: its output would overwrite it; choose another output")
    if str(target) in taken.values():
        raise PathRefused(f"input {path!r}: another input of this job has the same output")
    if target.exists() and not overwrite:
        raise PathRefused(f"input {path!r}: output {target.name} exists (overwrite: true)")


def _curve_user(frame: zmq.Frame) -> str | None:
    """The CURVE public key (Z85) the ZAP handler authenticated this message's sender with."""
    try:
        return frame.get("User-Id") or None
    except zmq.ZMQError:
        return None


@dataclass
class Front:
    """Rank 0's ZeroMQ side: the context, the ROUTER socket and the CURVE authenticator."""

    ctx: zmq.Context
    sock: zmq.Socket
    auth: Any = None

    @property
    def address(self) -> str:
        return self.sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def close(self) -> None:
        """Stop the authenticator and close every socket (``term`` alone would wait forever
        on a socket left open)."""
        if self.auth is not None:
            self.auth.stop()
        self.ctx.destroy(linger=500)


def open_front(options: Options) -> Front | str:
    """Bind the ROUTER socket (with CURVE when ``--curve-keys`` is given); or say why not,
    in one line, so that the server can stop before any cluster work."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    front = Front(ctx, sock)
    try:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, SNDHWM)
        sock.setsockopt(zmq.RCVHWM, RCVHWM)
        # A frame larger than any valid one closes the sender's connection before libzmq
        # allocates it.  (Frames of one multipart message are all buffered before the first is
        # readable, which is why image data comes in ``upload`` messages of one frame each.)
        max_frame = max(int(options.max_request_mb * 2**20), HEADER_LIMIT) + 2**16
        sock.setsockopt(zmq.MAXMSGSIZE, max_frame)
        sock.setsockopt(zmq.HEARTBEAT_IVL, ZMTP_HEARTBEAT_MS)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, ZMTP_TIMEOUT_MS)
        if options.data_root:
            datapaths.data_root(options.data_root)  # refused now, not at the first job
        if options.curve_keys:
            front.auth = _start_curve(ctx, sock, Path(options.curve_keys))
        sock.bind(options.bind)
    except (zmq.ZMQError, OSError, ValueError) as exc:
        front.close()
        return f"cannot serve on {options.bind}: {exc}"
    except ImgprocError as exc:
        front.close()
        return str(exc)
    return front


def _start_curve(ctx: zmq.Context, sock: zmq.Socket, keys: Path) -> Any:
    from zmq.auth import load_certificate
    from zmq.auth.thread import ThreadAuthenticator

    secret_file, clients = keys / "server.key_secret", keys / "clients"
    if not secret_file.is_file():
        raise ImgprocError(
            f"--curve-keys {keys}: no {secret_file.name} (make keys with `mpi-imgproc keys {keys}`)"
        )
    if not clients.is_dir() or not any(clients.glob("*.key")):
        raise ImgprocError(f"--curve-keys {keys}: no allowed client keys in {clients}/*.key")
    public, secret = load_certificate(secret_file)
    if secret is None:
        raise ImgprocError(f"--curve-keys {keys}: {secret_file} holds no secret key")
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(clients))
    sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True
    return auth


def run_rank0(comm: MPI.Comm, options: Options, front: Front) -> None:
    """Set up the backend, announce, serve."""
    from .backends import LocalBackend

    size = comm.Get_size()
    early: list[int] = []  # a stop before the loop starts is kept for it, not lost
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: early.append(signum))
    try:
        backend, per_rank, hosts, engines = make_backend(comm, options)
        here = shm.host_identity()
        host_counts: dict[str, int] = {}
        for host in hosts:
            host_counts[host] = host_counts.get(host, 0) + 1
        info = {
            "ranks": size,
            "workers": max(1, size - 1),
            "hosts": host_counts,
            "engine": options.engine,
            "engines": engines,
            "workers_per_rank": per_rank,
            "tile": options.tile,
            "cutover_ms": options.cutover_ms,
            "inline_ms": options.inline_ms,
            "client_timeout": options.client_timeout,
            "heartbeat_s": options.client_timeout / 3,
            "versions": versions(),
            "limits": {
                "max_request_bytes": int(options.max_request_mb * 2**20),
                "max_pixels": options.max_pixels,
                "max_images": MAX_IMAGES_PER_REQUEST,
                "max_tiles_per_image": MAX_TILES_PER_IMAGE,
                "max_header_bytes": HEADER_LIMIT,
            },
            "curve": bool(options.curve_keys),
            "by_reference": bool(options.data_root),
            "shm": None if options.no_shm or not here else {"host": here, "uid": os.geteuid()},
        }
        alone = " (alone: rank 0 serves and processes with its local engine)" if size == 1 else ""
        print(f"mpi_imgproc server listening on {front.address}", flush=True)
        print(
            f"ranks {size}, workers {max(1, size - 1)}{alone}; hosts "
            + ", ".join(f"{h} ({n})" for h, n in host_counts.items())
            + f"; engine {options.engine} x{per_rank} per rank; tile {options.tile}; "
            f"CURVE {'on' if options.curve_keys else 'off'}; pid {os.getpid()}",
            flush=True,
        )
        local = LocalBackend(get_engine("sequential")) if size > 1 else None
        scheduler = Scheduler(
            backend, options.max_pixels, options.cutover_ms / 1e3, local, options.inline_ms / 1e3
        )
        scheduler.stream_min_bytes = int(options.stream_min_mb * 2**20)
        # Workers that reach rank 0's descriptors read and write shm images themselves.
        reach = here is not None and all(e.get("host_id") == here for e in engines)
        scheduler.shared_memory = reach
        server = Server(front.sock, scheduler, options, info)
        server.stopping = bool(early)
        server.serve_forever()
    finally:
        front.close()
    print("mpi_imgproc server stopped", flush=True)


def run_worker(comm: MPI.Comm, options: Options) -> None:
    """Create this rank's engine, report it to rank 0, then work until told to stop."""
    from .worker import serve

    per_rank = workers_per_rank(comm, options)
    comm.gather(MPI.Get_processor_name(), root=0)
    engine = get_engine(options.engine, per_rank)
    described = {**engine.describe(), "host": socket.gethostname()}
    comm.gather({**described, "host_id": shm.host_identity()}, root=0)
    try:
        serve(comm, engine)
    finally:
        engine.close()


def _first_problem(comm: MPI.Comm, front: Front | str | None, options: Options) -> str | None:
    """Why the cluster cannot start, agreed by every rank: rank 0's endpoint, or an engine
    that cannot run on some rank (each node has its own devices).  Collective."""
    runs_engine = comm.Get_rank() > 0 or comm.Get_size() == 1
    local = None
    if runs_engine:
        try:
            check_engine(options.engine)
        except ImgprocError as exc:
            local = f"rank {comm.Get_rank()} ({socket.gethostname()}): {exc}"
    found = comm.gather(local, root=0)
    if comm.Get_rank() == 0:
        endpoint = front if isinstance(front, str) else None
        local = endpoint or next((p for p in found if p), None)
    return comm.bcast(local, root=0)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of every rank; any unhandled error aborts the whole MPI job.

    A bad command line or an endpoint that cannot be bound ends every rank with one line and
    exit 2, before any cluster work: rank 0 binds first and tells the workers.  So does a
    launcher that started several processes which each see a world of one (a mismatched MPI).
    """
    if refuse_mismatched_launch("mpi_imgproc server"):
        return 2
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()

    def body() -> int:
        quiet = contextlib.redirect_stderr(io.StringIO()) if rank else contextlib.nullcontext()
        with quiet:  # every rank parses the same line; rank 0 alone says what is wrong
            options = parse_args(argv)
        front = open_front(options) if rank == 0 else None
        problem = _first_problem(comm, front, options)
        if problem:
            if rank == 0:
                if isinstance(front, Front):
                    front.close()
                print(f"mpi_imgproc server: {problem}", file=sys.stderr, flush=True)
            return 2
        if rank == 0:
            assert isinstance(front, Front)
            run_rank0(comm, options, front)
        else:
            run_worker(comm, options)
        return 0

    return run_or_abort(comm, body)


if __name__ == "__main__":
    sys.exit(main())

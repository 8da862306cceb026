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
import errno
import itertools
import os
import secrets
import signal
import socket
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import zmq
from mpi4py import MPI

from . import __version__
from .errors import ImgprocError
from .local_engines import ENGINES, default_workers, get_engine
from .mpi_transport import Backoff, run_or_abort
from .pipeline import Pipeline
from .planner import DEFAULT_CUTOVER_S, DEFAULT_INLINE_S, ImageSource
from .protocol import (
    REQUEST_TYPES,
    VERSION,
    ImageFrame,
    ProtocolError,
    pack,
    parse_images,
    parse_result_encoding,
    parse_tile,
    raw_fields,
    tile_arg,
    unpack,
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

DEFAULT_BIND = "tcp://127.0.0.1:5555"
PROGRESS_INTERVAL = 0.05  # seconds between progress messages of one job
FINISHED_JOBS_KEPT = 1000
OUTBOX_BLOCK = 16  # replies waiting for one client before its tiles are held back


class Options(argparse.Namespace):
    bind: str
    engine: str
    workers_per_rank: int | None
    tile: int | str
    max_request_mb: float
    max_pixels: int
    curve_keys: str | None
    client_timeout: float
    in_flight: int | None
    cutover_ms: float
    inline_ms: float


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """The server's command line."""
    parser = argparse.ArgumentParser(
        prog="mpiexec -n N python -m mpi_imgproc.server",
        description="Serve image jobs on rank 0 and process their tiles on every other rank.",
    )
    parser.add_argument("--bind", default=DEFAULT_BIND, help="ZeroMQ endpoint (port * = any)")
    add_cluster_options(parser)
    parser.add_argument(
        "--inline-ms",
        type=float,
        default=DEFAULT_INLINE_S * 1e3,
        help="raw-pixel images cheaper than this (and than moving them) run on rank 0; 0: never",
    )
    parser.add_argument("--max-request-mb", type=float, default=1024.0, help="request size limit")
    parser.add_argument("--max-pixels", type=int, default=400_000_000, help="pixels per image")
    parser.add_argument("--curve-keys", metavar="DIR", help="enable CURVE with keys from DIR")
    parser.add_argument(
        "--client-timeout",
        type=float,
        default=30.0,
        help="seconds of client silence before its jobs are cancelled",
    )
    return parser.parse_args(argv, namespace=Options())


def add_cluster_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by the server and batch mode: engine, workers, tiling and scheduling."""
    parser.add_argument("--engine", choices=ENGINES, default="threads", help="engine per rank")
    parser.add_argument(
        "--workers-per-rank",
        type=int,
        default=None,
        help="engine workers per rank (default: this node's cores / its worker ranks)",
    )
    parser.add_argument("--tile", type=tile_arg, default="auto", help="tile size, 0 or auto")
    parser.add_argument("--in-flight", type=int, default=None, help="tasks in flight per worker")
    parser.add_argument(
        "--cutover-ms",
        type=float,
        default=DEFAULT_CUTOVER_S * 1e3,
        help="with --tile auto: images estimated to take less compute go to a worker whole",
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
        return local, per_rank, hosts, [local.engine.describe()]
    in_flight = options.in_flight or 2 * per_rank  # one batch running, the next one waiting
    return MPIBackend(comm, in_flight), per_rank, hosts, engines


def workers_per_rank(comm: MPI.Comm, options: Options) -> int:
    """Engine workers for each rank: ``--workers-per-rank``, or this node's cores shared out
    between the worker ranks (rank > 0) on it.  Collective: every rank calls it."""
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    ranks = node.allgather(comm.Get_rank())
    node.Free()
    local_workers = max(1, sum(1 for r in ranks if r != 0))
    return options.workers_per_rank or max(1, default_workers() // local_workers)


def versions() -> dict[str, str]:
    """Versions of everything a bug report needs."""
    import mpi4py

    return {
        "mpi_imgproc": __version__,
        "protocol": str(VERSION),
        "mpi": MPI.Get_library_version().splitlines()[0].strip(),
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
        if not self.wants_progress:
            return
        if not image_finished and now - self.last_progress < PROGRESS_INTERVAL:
            return
        self.last_progress = now
        fields = job.summary()
        fields.pop("state")
        self.server.reply(job.owner, pack("progress", **fields))

    def image_done(self, job: Job, image: ImageWork, result: ImageResult) -> bool:
        fields: dict[str, Any] = {"job": job.id, "index": image.index, "name": image.name}
        fields.update(path=image.path, tiles=image.tiles_used)
        if image.plan is not None:
            fields["reason"] = image.plan.reason
        if job.output == "pixels":
            data: Any = np.ascontiguousarray(result.pixels)
            fields.update(raw_fields(data))
        else:
            fields["encoding"] = output_format(job.output, image.name)
            started = time.perf_counter()
            try:
                data = result.encoded_as(fields["encoding"])
            except ImgprocError as exc:
                self.image_failed(job, image, exc.code, str(exc))
                return False
            finally:
                job.times["encode"] += time.perf_counter() - started
        self.server.reply(job.owner, pack("result", [data], **fields))
        return True

    def image_failed(self, job: Job, image: ImageWork, code: str, message: str) -> None:
        fields = {"job": job.id, "index": image.index, "name": image.name}
        self.server.reply(job.owner, pack("image_error", code=code, message=message, **fields))

    def finished(self, job: Job) -> None:
        fields = {"job": job.id, "state": job.state, "ok": job.ok, "failed": job.failed}
        self.server.reply(job.owner, pack("done", stats=job.stats(), message=job.message, **fields))
        self.server.retire(job)

    def blocked(self, job: Job) -> bool:
        return len(self.server.outbox.get(job.owner, ())) >= OUTBOX_BLOCK


class Server:
    """Rank 0: the ZeroMQ front, the job table and the loop that drives the scheduler."""

    def __init__(self, sock: zmq.Socket, scheduler: Scheduler, options: Options, info: dict):
        self.sock = sock
        self.scheduler = scheduler
        self.options = options
        self.info_fields = info
        self.max_request = int(options.max_request_mb * 2**20)
        self.outbox: dict[bytes, deque[list]] = {}
        self.last_seen: dict[bytes, float] = {}
        self.finished: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.job_numbers = itertools.count(1)
        self.stopping = False

    # -- the loop --------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Serve until SIGTERM or SIGINT, then end every job and stop the workers."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        backoff = Backoff(floor=20e-6, ceiling=1e-3)
        next_check = 0.0
        while not self.stopping:
            # Idle: sleep in ZeroMQ's poll, woken at once by a client.  Busy: poll ZeroMQ
            # without waiting and sleep in short steps, so that MPI (whose large transfers
            # advance only while rank 0 calls into MPI) keeps moving.
            busy = self.scheduler.busy or bool(self.outbox)
            handled = bool(poller.poll(0 if busy else 100)) and self._read_requests()
            progressed = self.scheduler.step() or handled
            progressed = self._flush() or progressed
            if progressed:
                backoff.reset()
            elif busy:
                backoff.sleep()
            if time.monotonic() >= next_check:
                self._drop_silent_clients()
                next_check = time.monotonic() + 1.0
        self.shutdown()

    def _stop(self, signum: int, frame: Any) -> None:
        self.stopping = True

    def shutdown(self) -> None:
        """End unfinished jobs with an error to their clients, then stop every rank."""
        for job in list(self.scheduler.jobs.values()):
            self.scheduler.cancel(job, "the server is shutting down", state="failed")
        deadline = time.perf_counter() + 1.0
        while self.outbox and time.perf_counter() < deadline:
            if not self._flush():
                time.sleep(0.01)
        self.scheduler.backend.close(deadline=time.perf_counter() + 7.0)
        self.sock.close(linger=500)

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
            self._handle(identity, body)
        return True

    def _handle(self, identity: bytes, body: list[memoryview]) -> None:
        req = None
        try:
            header, data = unpack(body)
            req = header.get("req")
            if header["type"] not in REQUEST_TYPES:
                raise ProtocolError("unknown_type", f"unknown message type {header['type']!r}")
            getattr(self, f"_on_{header['type']}")(identity, header, data)
        except ProtocolError as exc:
            self.reply(
                identity, pack("error", req=req, code=exc.code, message=str(exc), **exc.extra)
            )
        except ImgprocError as exc:
            self.reply(identity, pack("error", req=req, code=exc.code, message=str(exc)))

    def _on_submit(self, identity: bytes, header: dict, data: list[memoryview]) -> None:
        if self.stopping:
            raise ProtocolError("shutting_down", "the server is shutting down")
        size = sum(len(d) for d in data)
        if size > self.max_request:
            raise ProtocolError(
                "limit_exceeded",
                f"request of {size} bytes is over the limit of {self.max_request} bytes "
                "(--max-request-mb)",
            )
        pipeline = Pipeline.from_json(header.get("pipeline"))
        tile = parse_tile(header.get("tile", self.options.tile))
        if tile == "auto":
            tile = self.options.tile
        encoding = parse_result_encoding(header.get("result"))
        images = parse_images(header, data)
        job_id = f"j{next(self.job_numbers)}-{secrets.token_hex(3)}"
        output = "pixels" if encoding == "raw" else encoding
        replies = ClientReplies(self, progress=header.get("progress", True) is not False)
        job = Job(job_id, pipeline, tile, replies, owner=identity, output=output)
        job.images = [ImageWork(job, i, _source(f)) for i, f in enumerate(images)]
        self.reply(
            identity, pack("accepted", req=header.get("req"), job=job_id, images=len(images))
        )
        self.scheduler.add(job)

    def _job(self, header: dict) -> Job | dict[str, Any]:
        job_id = header.get("job")
        if job_id in self.scheduler.jobs:
            return self.scheduler.jobs[job_id]
        if job_id in self.finished:
            return self.finished[job_id]
        raise ProtocolError("unknown_job", f"no job {job_id!r} on this server")

    def _on_status(self, identity: bytes, header: dict, data: list) -> None:
        job = self._job(header)
        summary = job.summary() if isinstance(job, Job) else job
        self.reply(identity, pack("status", req=header.get("req"), **summary))

    def _on_cancel(self, identity: bytes, header: dict, data: list) -> None:
        job = self._job(header)
        if isinstance(job, Job):
            self.scheduler.cancel(job, "cancelled by request")
            job = self.finished.get(job.id, job.summary())
        self.reply(
            identity, pack("cancelled", req=header.get("req"), job=job["job"], state=job["state"])
        )

    def _on_info(self, identity: bytes, header: dict, data: list) -> None:
        queue = {
            "jobs": sum(1 for j in self.scheduler.jobs.values() if j.active),
            "tasks_queued": sum(len(j.ready) for j in self.scheduler.jobs.values()),
            "tasks_in_flight": len(self.scheduler.running),
        }
        self.reply(identity, pack("info", req=header.get("req"), queue=queue, **self.info_fields))

    def _on_heartbeat(self, identity: bytes, header: dict, data: list) -> None:
        self.reply(identity, pack("heartbeat", req=header.get("req")))

    # -- replies and clients ---------------------------------------------------------------

    def reply(self, identity: bytes | None, frames: list) -> None:
        """Queue a message for a client; ``_flush`` sends it without ever blocking."""
        if identity is not None:
            self.outbox.setdefault(identity, deque()).append(frames)

    def _flush(self) -> bool:
        sent = False
        for identity in list(self.outbox):
            queue = self.outbox[identity]
            while queue:
                try:
                    self.sock.send_multipart([identity, *queue[0]], zmq.NOBLOCK, copy=False)
                except zmq.Again:  # the client's pipe is full: keep the rest for later
                    break
                except zmq.ZMQError as exc:
                    if exc.errno != errno.EHOSTUNREACH:
                        raise
                    self._client_gone(identity, "the client disconnected")
                    break
                queue.popleft()
                sent = True
            if not queue:
                self.outbox.pop(identity, None)
        return sent

    def _client_gone(self, identity: bytes, why: str, reachable: bool = False) -> None:
        """Cancel a client's jobs and free their memory.  A silent client (``reachable``) is
        still told, in each job's ``done``; one whose connection is gone cannot be."""
        if not reachable:
            self.outbox.pop(identity, None)
        self.last_seen.pop(identity, None)
        for job in list(self.scheduler.jobs.values()):
            if job.owner == identity and job.active:
                if not reachable:
                    job.owner = None  # nobody to tell
                self.scheduler.cancel(job, why)

    def _drop_silent_clients(self) -> None:
        """Cancel the jobs of clients silent for longer than ``--client-timeout``; forget
        clients with nothing running."""
        limit = time.monotonic() - self.options.client_timeout
        owners = {j.owner for j in self.scheduler.jobs.values() if j.active and j.owner}
        for identity, seen in list(self.last_seen.items()):
            if seen >= limit:
                continue
            if identity in owners:
                why = f"no word from the client for {self.options.client_timeout:g} s"
                self._client_gone(identity, why, reachable=True)
            else:
                del self.last_seen[identity]

    def retire(self, job: Job) -> None:
        """Keep a finished job's summary for ``status``; free everything else."""
        self.scheduler.forget(job.id)
        self.finished[job.id] = job.summary()
        while len(self.finished) > FINISHED_JOBS_KEPT:
            self.finished.popitem(last=False)


def _source(frame: ImageFrame) -> ImageSource:
    """An image of a request; decoded when its turn comes (by a worker, if it goes whole)."""
    if frame.raw:
        return ImageSource(frame.name, pixels=frame.pixels())
    return ImageSource(frame.name, data=frame.data)


def bind_socket(ctx: zmq.Context, options: Options) -> tuple[zmq.Socket, Any]:
    """The ROUTER socket, with CURVE when ``--curve-keys`` is given; and the authenticator."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.SNDHWM, 1000)
    sock.setsockopt(zmq.RCVHWM, 1000)
    sock.setsockopt(zmq.MAXMSGSIZE, int(options.max_request_mb * 2**20) + 2**20)
    auth = None
    if options.curve_keys:
        from zmq.auth import load_certificate
        from zmq.auth.thread import ThreadAuthenticator

        keys = Path(options.curve_keys)
        public, secret = load_certificate(keys / "server.key_secret")
        auth = ThreadAuthenticator(ctx)
        auth.start()
        auth.configure_curve(domain="*", location=str(keys / "clients"))
        sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True
    sock.bind(options.bind)
    return sock, auth


def run_rank0(comm: MPI.Comm, options: Options) -> None:
    """Set up the backend and the socket, announce, serve."""
    from .backends import LocalBackend

    size = comm.Get_size()
    backend, per_rank, hosts, engines = make_backend(comm, options)
    ctx = zmq.Context()
    sock, auth = bind_socket(ctx, options)
    address = sock.getsockopt_string(zmq.LAST_ENDPOINT)
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
        "versions": versions(),
        "limits": {
            "max_request_bytes": int(options.max_request_mb * 2**20),
            "max_pixels": options.max_pixels,
        },
        "curve": bool(options.curve_keys),
    }
    alone = " (alone: rank 0 serves and processes with its local engine)" if size == 1 else ""
    print(f"mpi_imgproc server listening on {address}", flush=True)
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
    try:
        Server(sock, scheduler, options, info).serve_forever()
    finally:
        if auth is not None:
            auth.stop()
        ctx.term()
    print("mpi_imgproc server stopped", flush=True)


def run_worker(comm: MPI.Comm, options: Options) -> None:
    """Create this rank's engine, report it to rank 0, then work until told to stop."""
    from .worker import serve

    per_rank = workers_per_rank(comm, options)
    comm.gather(MPI.Get_processor_name(), root=0)
    engine = get_engine(options.engine, per_rank)
    comm.gather({**engine.describe(), "host": socket.gethostname()}, root=0)
    try:
        serve(comm, engine)
    finally:
        engine.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of every rank; any unhandled error aborts the whole MPI job."""
    comm = MPI.COMM_WORLD

    def body() -> int:
        options = parse_args(argv)
        if comm.Get_rank() == 0:
            run_rank0(comm, options)
        else:
            run_worker(comm, options)
        return 0

    return run_or_abort(comm, body)


if __name__ == "__main__":
    sys.exit(main())

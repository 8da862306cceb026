"""Where rank 0's tasks run: the worker ranks over MPI, or a local engine when alone (``-n 1``)."""

from __future__ import annotations

import resource
import sys
import time

import numpy as np
from mpi4py import MPI

from .errors import ImgprocError, describe, error_code
from .imagetask import run_image_task, run_region_tasks
from .local_engines import Engine
from .mpi_transport import (
    TAG_BYE,
    TAG_PING,
    TAG_PONG,
    TAG_RESULT,
    TAG_RESULT_PIXELS,
    TAG_STOP,
    TAG_TASK,
    TAG_TASK_PIXELS,
    Backoff,
    RankWatch,
    as_bytes,
    encode_header,
    pixel_fields,
    recv_header,
    recv_pixels,
    recv_within,
)
from .pipeline import stage_from_text
from .scheduler import Backend, Completion, Task


class RankLost(ImgprocError):
    """Every worker rank has died: nothing is left to run tasks on."""

    code = "rank_lost"


class MPIBackend(Backend):
    """Tasks go to worker ranks, at most ``per_worker`` in flight on each.

    Sends are non-blocking (``Isend``): rank 0 never waits for a worker to receive, and keeps
    each buffer alive until its request completes.  Results are found with ``Iprobe``; the
    pixels that follow a result header are received with a deadline.

    A dead worker (only survivable under ``mpiexec -disable-auto-cleanup``, see
    docs/fault-tolerance.md) is found by pinging every worker when Hydra signals a death, or
    when a worker's pixels do not arrive in time, or when a worker has not been heard of for
    ``SILENCE_S`` (a cut link between nodes is silent: nobody dies, nothing arrives): a worker
    that does not answer within ``PING_TIMEOUT_S`` is buried, and its tasks come back as
    ``lost`` for the scheduler to hand to the others.  What a buried worker sends later (its
    link back) is ignored.

    The three times add up to less than the ~20 s after which UCX's TCP transport gives up on
    a silent peer: MPICH's UCX device then crashes the next send to that rank, so rank 0 must
    have buried it, and stopped sending to it, before (docs/multinode.md).
    """

    PING_TIMEOUT_S = 3.0
    PIXELS_TIMEOUT_S = 10.0
    SILENCE_S = 10.0

    def __init__(self, comm: MPI.Comm, per_worker: int):
        self.comm = comm
        self.workers = comm.Get_size() - 1
        self.per_worker = per_worker
        self.load = {rank: 0 for rank in range(1, comm.Get_size())}  # live workers only
        self.assigned: dict[int, int] = {}  # task id -> rank
        self.sending: list[tuple[int, list[MPI.Request], tuple]] = []  # rank, requests, buffers
        self.pinging: dict[int, float] = {}  # rank -> deadline for its pong
        self.heard = dict.fromkeys(self.load, time.monotonic())  # rank -> last word from it
        self.abandoned: list = []  # requests to dead ranks: never complete, never waited for
        # Tasks in flight whose pixels go out or come back (all but region tasks, whose
        # workers read and write files or shared memory themselves).
        self.pixel_tasks: set[int] = set()

    def free_slots(self) -> int:
        return sum(self.per_worker - n for n in self.load.values())

    def submit(self, task: Task) -> None:
        rank = min(self.load, key=self.load.__getitem__)
        fields = {"task": task.id, **task.header}
        payload = None
        if task.payload is not None:
            payload = as_bytes(task.payload)  # no copy for full-width strips
            fields.update(pixel_fields(task.payload))
        header = encode_header(fields)
        requests = [self.comm.Isend([header, MPI.BYTE], dest=rank, tag=TAG_TASK)]
        if payload is not None:
            requests.append(self.comm.Isend(payload, dest=rank, tag=TAG_TASK_PIXELS))
        self.sending.append((rank, requests, (header, payload)))
        self.load[rank] += 1
        self.assigned[task.id] = rank
        if payload is not None or task.header.get("kind") != "region":
            self.pixel_tasks.add(task.id)

    def moving_pixels(self) -> bool:
        return bool(self.pixel_tasks)

    def poll(self) -> list[Completion]:
        self.sending = [s for s in self.sending if not self._sent(s)]
        done = self._results()
        if RankWatch.take():
            self._ping_all()
        self._ping_silent()
        return done + self._check_pings()

    def _results(self) -> list[Completion]:
        done = []
        status = MPI.Status()
        while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_RESULT, status=status):
            started = time.perf_counter()
            rank = status.Get_source()
            header = recv_header(self.comm, status)
            if rank not in self.load:  # buried: its tasks already run elsewhere
                continue
            self.heard[rank] = time.monotonic()
            result = None
            if "shape" in header:
                into = self.destination(header) if self.destination else None
                if into is None:
                    into = np.empty(header["shape"], dtype=header["dtype"])
                pixels = as_bytes(into)
                wait = self.PIXELS_TIMEOUT_S
                if not recv_within(
                    self.comm, pixels, rank, TAG_RESULT_PIXELS, wait, self.abandoned
                ):
                    self._ping(rank)  # its pixels never came: is it still there?
                    header = {"task": header["task"], "lost": f"rank {rank}'s pixels never came"}
                else:
                    result = into
            self.load[rank] -= 1
            self.assigned.pop(header["task"], None)
            self.pixel_tasks.discard(header["task"])
            done.append(completion(header, result, rank))
            done[-1].received_s = time.perf_counter() - started
        return done

    def _sent(self, sending: tuple[int, list[MPI.Request], tuple]) -> bool:
        """Whether a send has completed; one that failed (its receiver died) is given up."""
        try:
            return MPI.Request.Testall(sending[1])
        except MPI.Exception:
            self._ping(sending[0])
            self.abandoned.append(sending)
            return True

    def _ping_all(self) -> None:
        print("a rank has died: asking every worker", file=sys.stderr, flush=True)
        for rank in self.load:
            self._ping(rank)

    def _ping_silent(self) -> None:
        now = time.monotonic()
        for rank in self.load:
            if now - self.heard[rank] > self.SILENCE_S:
                self._ping(rank)

    def _ping(self, rank: int) -> None:
        if rank in self.pinging or rank not in self.load:
            return
        ping = encode_header({})
        self.sending.append((rank, [self.comm.Isend([ping, MPI.BYTE], rank, TAG_PING)], (ping,)))
        self.pinging[rank] = time.monotonic() + self.PING_TIMEOUT_S

    def _check_pings(self) -> list[Completion]:
        """Hear pongs; bury workers whose pong is overdue; their tasks come back as lost."""
        status = MPI.Status()
        while self.pinging and self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_PONG, status=status):
            recv_header(self.comm, status)
            self.pinging.pop(status.Get_source(), None)
            self.heard[status.Get_source()] = time.monotonic()
        lost: list[Completion] = []
        now = time.monotonic()
        for rank in [r for r, deadline in self.pinging.items() if deadline < now]:
            lost += self._bury(rank)
        return lost

    def _bury(self, rank: int) -> list[Completion]:
        del self.pinging[rank], self.load[rank]
        self.workers = len(self.load)
        tasks = [t for t, r in self.assigned.items() if r == rank]
        for task_id in tasks:
            del self.assigned[task_id]
            self.pixel_tasks.discard(task_id)
        self.abandoned += [s for s in self.sending if s[0] == rank]
        self.sending = [s for s in self.sending if s[0] != rank]
        print(
            f"worker rank {rank} is gone; {len(tasks)} of its tasks go to the "
            f"{len(self.load)} other workers",
            file=sys.stderr,
            flush=True,
        )
        if not self.load:
            raise RankLost("every worker rank has died; the cluster cannot go on")
        return [
            Completion(t, None, ("rank_lost", f"rank {rank} died"), rank, lost=True) for t in tasks
        ]

    def close(self, deadline: float) -> None:
        """Tell every live worker to stop, drain what they still send, wait for their goodbyes.

        A worker still busy past ``deadline`` would keep the job from ending: then the whole
        job is aborted rather than left hanging.
        """
        stop = encode_header({})
        requests = [self.comm.Isend([stop, MPI.BYTE], dest=r, tag=TAG_STOP) for r in self.load]
        left = set(self.load)
        backoff = Backoff(ceiling=0.01)
        status = MPI.Status()
        while left and time.perf_counter() < deadline:
            if not self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
                backoff.sleep()
                continue
            rank, tag = status.Get_source(), status.Get_tag()
            header = recv_header(self.comm, status)
            if tag == TAG_RESULT and "shape" in header:
                recv_pixels(self.comm, rank, TAG_RESULT_PIXELS, header)  # a result nobody wants
            elif tag == TAG_BYE:
                left.discard(rank)
        if left:
            print(f"workers {sorted(left)} did not stop in time; aborting", flush=True)
            self.comm.Abort(1)
        # Every worker has received all it was sent before its goodbye: these complete now.
        MPI.Request.Waitall(requests + [r for _, reqs, _ in self.sending for r in reqs])
        self.sending.clear()


class LocalBackend(Backend):
    """Rank 0 alone: run each task at once with a local engine (``mpiexec -n 1``)."""

    workers = 1
    synchronous = True  # submit() does the work: no transfer to time

    def __init__(self, engine: Engine):
        self.engine = engine
        self.done: list[Completion] = []

    def free_slots(self) -> int:
        return 0 if self.done else 1

    def submit(self, task: Task) -> None:
        started, cpu_started = time.perf_counter(), time.process_time()
        fields: dict = {}
        try:
            if task.tile is None:
                result, fields = run_image_task(task.header, task.payload)
            elif task.header.get("kind") == "region":
                result = None
                failure = run_region_tasks(self.engine, [task.header])[0]
                if failure is not None:
                    raise failure
            else:
                stage = stage_from_text(task.header["stage"])
                result = self.engine.run(stage, [task.payload], [task.tile.margins])[0]
            error = None
        except Exception as exc:  # noqa: BLE001 - reported as this task's error
            result, error = None, (error_code(exc), describe(exc))
        busy, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.done.append(Completion(task.id, result, error, 0, busy, cpu, maxrss, fields))

    def poll(self) -> list[Completion]:
        done, self.done = self.done, []
        return done

    def close(self, deadline: float) -> None:
        self.engine.close()


_COMPLETION_KEYS = ("task", "busy", "cpu", "maxrss_kb", "error", "shape", "dtype")


def completion(header: dict, result: np.ndarray | None, rank: int) -> Completion:
    """A worker's result header (and buffer) as the scheduler's Completion."""
    error = header.get("error")
    if "lost" in header:
        return Completion(header["task"], None, ("rank_lost", header["lost"]), rank, lost=True)
    return Completion(
        header["task"],
        result,
        (error["code"], error["message"]) if error else None,
        rank,
        header.get("busy", 0.0),
        header.get("cpu", 0.0),
        header.get("maxrss_kb", 0),
        {k: v for k, v in header.items() if k not in _COMPLETION_KEYS},
    )

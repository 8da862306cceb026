"""Where rank 0's tasks run: the worker ranks over MPI, or a local engine when alone (``-n 1``)."""

from __future__ import annotations

import resource
import time

import numpy as np
from mpi4py import MPI

from .errors import describe, error_code
from .imagetask import run_image_task
from .local_engines import Engine
from .mpi_transport import (
    TAG_BYE,
    TAG_RESULT,
    TAG_RESULT_PIXELS,
    TAG_STOP,
    TAG_TASK,
    TAG_TASK_PIXELS,
    Backoff,
    as_bytes,
    encode_header,
    pixel_fields,
    recv_header,
    recv_into,
    recv_pixels,
)
from .pipeline import stage_from_text
from .scheduler import Backend, Completion, Task


class MPIBackend(Backend):
    """Tasks go to worker ranks, at most ``per_worker`` in flight on each.

    Sends are non-blocking (``Isend``): rank 0 never waits for a worker to receive, and keeps
    each buffer alive until its request completes.  Results are found with ``Iprobe``, so rank 0
    only ever blocks in ``Recv`` for pixels whose header has already arrived.
    """

    def __init__(self, comm: MPI.Comm, per_worker: int):
        self.comm = comm
        self.workers = comm.Get_size() - 1
        self.per_worker = per_worker
        self.load = {rank: 0 for rank in range(1, comm.Get_size())}
        self.sending: list[tuple[list[MPI.Request], tuple]] = []

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
        self.sending.append((requests, (header, payload)))
        self.load[rank] += 1

    def poll(self) -> list[Completion]:
        self.sending = [s for s in self.sending if not MPI.Request.Testall(s[0])]
        done = []
        status = MPI.Status()
        while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_RESULT, status=status):
            started = time.perf_counter()
            rank = status.Get_source()
            header = recv_header(self.comm, status)
            result = None
            if "shape" in header:
                into = self.destination(header) if self.destination else None
                if into is None:
                    result = recv_pixels(self.comm, rank, TAG_RESULT_PIXELS, header)
                else:
                    result = recv_into(self.comm, into, rank, TAG_RESULT_PIXELS)
            self.load[rank] -= 1
            done.append(completion(header, result, rank))
            done[-1].received_s = time.perf_counter() - started
        return done

    def close(self, deadline: float) -> None:
        """Tell every worker to stop, drain what they still send, wait for their goodbyes.

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
        MPI.Request.Waitall(requests + [r for reqs, _ in self.sending for r in reqs])
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

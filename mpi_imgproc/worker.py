"""Worker ranks (> 0): receive tiles from rank 0, run them with the local engine, send results.

One loop with one exit (``TAG_STOP``).  The worker takes every task that has arrived, runs
tile tasks of the same stage as one batch through its engine (so a threads or processes engine
keeps all of its cores busy) and whole-image tasks side by side on the engine's workers, and
sends each result back with its timings.  A task that fails
is answered with an error, never with silence, so rank 0 can report it and carry on.

The engine runs each round of tasks on a thread of its own, while the main thread -- the only
one that ever calls MPI -- waits for it and keeps looking for ``TAG_STOP``.  A long OpenCV
call cannot be interrupted, so a worker told to stop in the middle of one drops that round,
says goodbye at once and leaves without waiting for it: rank 0 gives its workers only a few
seconds before it aborts the whole job.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import queue
import resource
import signal
import sys
import threading
import time
from collections import defaultdict
from typing import Any

import numpy as np
from mpi4py import MPI

from .errors import describe, error_code
from .imagetask import run_image_task, run_region_tasks
from .local_engines import Engine
from .local_engines.base import keep_buffers
from .mpi_transport import (
    TAG_BYE,
    TAG_PING,
    TAG_PONG,
    TAG_RESULT,
    TAG_RESULT_PIXELS,
    TAG_STOP,
    TAG_TASK_PIXELS,
    Backoff,
    as_bytes,
    encode_header,
    pixel_fields,
    recv_header,
    recv_pixels,
)
from .pipeline import stage_from_text

Task = tuple[dict[str, Any], np.ndarray | None]
Outcome = tuple[int, Any, float, float]  # task id, result (or exception), busy s, CPU s

STOP_CHECK_S = 0.02  # while a round computes, how often the main thread looks for TAG_STOP


def _receive_tasks(comm: MPI.Comm, limit: int) -> tuple[list[Task], bool]:
    """Up to ``limit`` tasks that have arrived, and whether rank 0 said stop.

    Taking no more than the engine has workers leaves the rest queued in MPI: rank 0 keeps
    about two batches in flight, so the next batch is waiting when this one is done.
    """
    tasks: list[Task] = []
    status = MPI.Status()
    while len(tasks) < limit and comm.Iprobe(source=0, tag=MPI.ANY_TAG, status=status):
        if status.Get_tag() == TAG_STOP:
            recv_header(comm, status)
            return tasks, True
        header = recv_header(comm, status)
        if status.Get_tag() == TAG_PING:
            _pong(comm)
            continue
        payload = recv_pixels(comm, 0, TAG_TASK_PIXELS, header) if "shape" in header else None
        tasks.append((header, payload))
    return tasks, False


def _stop_arrived(comm: MPI.Comm) -> bool:
    """Whether rank 0 has said stop; if so, receive (and drop) everything up to its stop.

    Rank 0 waits for every send it started before it finalises, so the tasks it sent ahead
    must still be received even though they will not run.  They were sent before the stop,
    so they are all here by now.
    """
    if not comm.Iprobe(source=0, tag=TAG_STOP):
        return False
    status = MPI.Status()
    while True:
        comm.Probe(source=0, tag=MPI.ANY_TAG, status=status)
        header = recv_header(comm, status)
        if status.Get_tag() == TAG_STOP:
            return True
        if status.Get_tag() != TAG_PING and "shape" in header:
            recv_pixels(comm, 0, TAG_TASK_PIXELS, header)


def _answer_pings(comm: MPI.Comm) -> None:
    """Answer rank 0's "are you alive?" (it asks after a rank has died somewhere)."""
    status = MPI.Status()
    while comm.Iprobe(source=0, tag=TAG_PING, status=status):
        recv_header(comm, status)
        _pong(comm)


def _pong(comm: MPI.Comm) -> None:
    # Two bytes go out eagerly: this blocking send returns at once.
    comm.Send([encode_header({}), MPI.BYTE], dest=0, tag=TAG_PONG)


def _run_batch(engine: Engine, stage_json: str, tasks: list[Task]) -> list[Any]:
    """Results (arrays) or exceptions, one per task, in order."""
    margins = [tuple(h["margins"]) for h, _ in tasks]
    try:
        return list(engine.run(stage_from_text(stage_json), [p for _, p in tasks], margins))
    except Exception:  # noqa: BLE001 - find which task failed by running them one by one
        pass
    out: list[Any] = []
    for (_, pixels), margin in zip(tasks, margins):
        try:
            out.append(engine.run(stage_from_text(stage_json), [pixels], [margin])[0])
        except Exception as exc:  # noqa: BLE001 - reported to rank 0 as this task's error
            out.append(exc)
    return out


def _run_images(engine: Engine, tasks: list[Task]) -> list[Any]:
    """Whole-image tasks, side by side on the engine's workers: (buffer, fields) or exception."""

    def one(task: Task) -> Any:
        try:
            return run_image_task(*task)
        except Exception as exc:  # noqa: BLE001 - reported to rank 0 as this task's error
            return exc

    return engine.map(one, tasks)


def _run_round(engine: Engine, tasks: list[Task]) -> list[Outcome]:
    """Run tasks as the engine likes them (tiles of one stage as one batch, whole images side
    by side); each task's result or error with its share of the batch's time."""
    batches: dict[tuple[str, str], list[Task]] = defaultdict(list)
    for task in tasks:
        batches[task[0].get("kind", "tile"), task[0].get("stage", "")].append(task)
    outcomes: list[Outcome] = []
    for (kind, stage), batch in batches.items():
        started, cpu_started = time.perf_counter(), time.process_time()
        if kind == "image":
            results = _run_images(engine, batch)
        elif kind == "region":
            results = run_region_tasks(engine, [h for h, _ in batch])
        else:
            results = _run_batch(engine, stage, batch)
        busy = (time.perf_counter() - started) / len(batch)
        cpu = (time.process_time() - cpu_started) / len(batch)
        outcomes.extend((h["task"], r, busy, cpu) for (h, _), r in zip(batch, results))
    return outcomes


class _Compute:
    """Runs one round of tasks at a time on a thread of its own, so the main thread is free to
    answer rank 0.  That thread runs the engine and never calls MPI, so MPI's
    ``THREAD_FUNNELED`` is enough; below it (an MPI that allows no other threads) rounds run in
    the main thread, as they did before.  The thread is a daemon: a worker that leaves
    mid-round is not held back by it."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._rounds: queue.SimpleQueue[list[Task] | None] = queue.SimpleQueue()
        self._finished = threading.Event()
        self._outcome: list[Outcome] | BaseException = []
        self._pending = False  # a round started whose outcome has not been collected
        self._thread: threading.Thread | None = None
        if MPI.Query_thread() >= MPI.THREAD_FUNNELED:
            self._thread = threading.Thread(target=self._loop, name="imgproc-compute", daemon=True)
            self._thread.start()

    @property
    def pending(self) -> bool:
        """A round has been started and its outcome not yet collected."""
        return self._pending

    @property
    def computing(self) -> bool:
        """The engine is still working on the current round."""
        return self._pending and not self._finished.is_set()

    def start(self, tasks: list[Task]) -> None:
        self._pending = True
        self._finished.clear()
        if self._thread is None:
            self._run(tasks)
        else:
            self._rounds.put(tasks)

    def wait(self, timeout: float) -> list[Outcome] | None:
        """The round's outcomes once it is done (or what it raised), or None after ``timeout``."""
        if not self._finished.wait(timeout):
            return None
        self._pending = False
        if isinstance(self._outcome, BaseException):
            raise self._outcome  # a bug, not a task's error: the rank aborts the MPI job
        return self._outcome

    def close(self) -> None:
        """End the thread (it is idle: nothing to wait for)."""
        if self._thread is not None:
            self._rounds.put(None)
            self._thread.join()

    def _loop(self) -> None:
        while (tasks := self._rounds.get()) is not None:
            self._run(tasks)

    def _run(self, tasks: list[Task]) -> None:
        try:
            self._outcome = _run_round(self.engine, tasks)
        except BaseException as exc:  # noqa: BLE001 - raised again by wait() on the MPI thread
            self._outcome = exc
        self._finished.set()


Sending = tuple[list[MPI.Request], tuple[Any, ...]]  # requests, and the buffers they use


def _send_result(comm: MPI.Comm, task_id: int, result: Any, busy: float, cpu: float) -> Sending:
    """Start sending a result header (with timings) and, if there is one, its buffer.

    Non-blocking: a blocking send would spin (MPICH polls) until rank 0 receives; instead the
    worker goes on with its next task and the buffers are kept until the sends complete.
    """
    header: dict[str, Any] = {
        "task": task_id,
        "busy": busy,
        "cpu": cpu,
        "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    buffer, fields = result if isinstance(result, tuple) else (result, {})
    if isinstance(buffer, BaseException):
        header["error"] = {"code": error_code(buffer), "message": describe(buffer)}
        buffer = None
    header.update(fields)
    if buffer is not None:
        buffer = np.ascontiguousarray(buffer)
        header.update(pixel_fields(buffer))
    encoded = encode_header(header)
    requests = [comm.Isend([encoded, MPI.BYTE], dest=0, tag=TAG_RESULT)]
    if buffer is not None:
        requests.append(comm.Isend(as_bytes(buffer), dest=0, tag=TAG_RESULT_PIXELS))
    return requests, (encoded, buffer)


def _leave_now(engine: Engine) -> None:
    """Exit at once, while the engine is still inside a call that nothing can interrupt.

    A normal exit would wait for that very call: ``engine.close()`` and the interpreter join
    the engine's threads.  ``os._exit`` will not do either: MPICH tells mpiexec that a rank
    has finalised in a C ``atexit`` handler, and mpiexec kills every rank (exit 9) when one
    ends without it.  So MPI is finalised and C's ``exit()`` runs, which calls those handlers
    and skips the interpreter's shutdown; through ``PyDLL`` it keeps the GIL, so no other
    Python thread runs again.

    First the engine's helper processes are killed (they would go on computing, with
    mpiexec's output open), and the processes engine's shared-memory arena is unlinked: only
    its ``close()`` frees it, and nothing would after this exit (mpiexec ends the resource
    tracker with the job).  Unlinking leaves the mapping valid for whatever still uses it.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    MPI.Finalize()
    arena = getattr(engine, "_arena", None)
    if arena is not None:
        arena.unlink()
    for child in multiprocessing.active_children():
        child.kill()
    ctypes.PyDLL(None).exit(0)


def serve(comm: MPI.Comm, engine: Engine) -> None:
    """Work until rank 0 sends ``TAG_STOP``; then say goodbye so rank 0 can finalise.

    A stop that comes while a round computes drops that round: rank 0 wants no more results.
    """
    keep_buffers()
    # Rank 0 decides when to stop; a worker that died on SIGTERM would end the whole MPI job
    # with an error instead of a clean shutdown.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    backoff = Backoff()
    compute = _Compute(engine)
    sending: list[Sending] = []
    stop = False
    while not stop:
        sending = [s for s in sending if not MPI.Request.Testall(s[0])]
        _answer_pings(comm)
        if compute.pending:
            # Sleep until the round is done (woken at once), looking now and then for a stop.
            for task_id, result, busy, cpu in compute.wait(STOP_CHECK_S) or ():
                sending.append(_send_result(comm, task_id, result, busy, cpu))
            stop = compute.pending and _stop_arrived(comm)
            continue
        tasks, stop = _receive_tasks(comm, max(1, engine.workers))
        if stop:
            continue  # tasks that came with the stop are dropped, unrun
        if tasks:
            backoff.reset()
            compute.start(tasks)
        else:
            backoff.sleep()
    MPI.Request.Waitall([r for requests, _ in sending for r in requests])
    comm.Send([encode_header({}), MPI.BYTE], dest=0, tag=TAG_BYE)
    if compute.computing:
        _leave_now(engine)
    compute.close()

"""Worker ranks (> 0): receive tiles from rank 0, run them with the local engine, send results.

One loop with one exit (``TAG_STOP``).  The worker takes every task that has arrived, runs
tile tasks of the same stage as one batch through its engine (so a threads or processes engine
keeps all of its cores busy) and whole-image tasks side by side on the engine's workers, and
sends each result back with its timings.  A task that fails
is answered with an error, never with silence, so rank 0 can report it and carry on.
"""

from __future__ import annotations

import resource
import signal
import time
from collections import defaultdict
from typing import Any

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
    TAG_TASK_PIXELS,
    Backoff,
    encode_header,
    pixel_fields,
    recv_header,
    recv_pixels,
)
from .pipeline import stage_from_text

Task = tuple[dict[str, Any], np.ndarray | None]


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
        payload = recv_pixels(comm, 0, TAG_TASK_PIXELS, header) if "shape" in header else None
        tasks.append((header, payload))
    return tasks, False


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
        requests.append(comm.Isend(buffer, dest=0, tag=TAG_RESULT_PIXELS))
    return requests, (encoded, buffer)


def serve(comm: MPI.Comm, engine: Engine) -> None:
    """Work until rank 0 sends ``TAG_STOP``; then say goodbye so rank 0 can finalise."""
    # Rank 0 decides when to stop; a worker that died on SIGTERM would end the whole MPI job
    # with an error instead of a clean shutdown.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    backoff = Backoff()
    sending: list[Sending] = []
    stop = False
    while not stop:
        sending = [s for s in sending if not MPI.Request.Testall(s[0])]
        tasks, stop = _receive_tasks(comm, max(1, engine.workers))
        if not tasks:
            if not stop:
                backoff.sleep()
            continue
        backoff.reset()
        batches: dict[str, list[Task]] = defaultdict(list)
        for task in tasks:
            batches[task[0].get("stage", "image")].append(task)
        for key, batch in batches.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            if key == "image":
                results = _run_images(engine, batch)
            else:
                results = _run_batch(engine, key, batch)
            busy = (time.perf_counter() - started) / len(batch)
            cpu = (time.process_time() - cpu_started) / len(batch)
            for (header, _), result in zip(batch, results):
                sending.append(_send_result(comm, header["task"], result, busy, cpu))
    MPI.Request.Waitall([r for requests, _ in sending for r in requests])
    comm.Send([encode_header({}), MPI.BYTE], dest=0, tag=TAG_BYE)

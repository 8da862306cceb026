"""A fault in rank 0's own loop never hangs: it is logged, every client is told, and it is
raised (so the MPI job ends non-zero).  The fault is a real exception from a backend that
fails once a task is running, standing in for a bug in the loop."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from mpi_imgproc.client import Client, ServerGone
from mpi_imgproc.scheduler import Backend, Scheduler
from mpi_imgproc.server import Front, Server, open_front, parse_args

pytestmark = pytest.mark.timeout(60)


class FailsOnceBusy(Backend):
    """Takes one task, then fails in ``poll``."""

    workers = 1

    def __init__(self) -> None:
        self.armed = False

    def free_slots(self) -> int:
        return 0 if self.armed else 1

    def submit(self, task) -> None:
        self.armed = True

    def poll(self) -> list:
        if self.armed:
            raise RuntimeError("the backend broke")
        return []


def test_a_loop_fault_fails_every_job_tells_clients_and_is_raised(capfd):
    options = parse_args(["--bind", "tcp://127.0.0.1:*", "--tile", "0", "--inline-ms", "0"])
    front = open_front(options)
    assert isinstance(front, Front)
    seen: list[BaseException] = []

    def client() -> None:
        image = np.zeros((30, 30), np.uint8)
        with Client(front.address, timeout=10) as c:
            try:
                result = c.submit([image], ["invert"]).result(timeout=20)
                seen.append(AssertionError(f"job ended {result.state}: {result.message}"))
                if result.state == "failed" and "the server failed" in (result.message or ""):
                    seen[-1] = ServerGone(result.message)
            except ServerGone as exc:
                seen.append(exc)

    thread = threading.Thread(target=client)
    thread.start()
    server = Server(front.sock, Scheduler(FailsOnceBusy()), options, {"ranks": 1})
    try:
        with pytest.raises(RuntimeError, match="the backend broke"):
            server.serve_forever()
    finally:
        thread.join(timeout=30)
        front.close()
    assert seen and isinstance(seen[0], ServerGone), seen
    assert "the backend broke" in str(seen[0])
    assert "internal failure" in capfd.readouterr().err

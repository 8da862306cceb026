"""How rank 0 and the workers talk over MPI: a small JSON header, then the pixels as a buffer.

Headers are JSON bytes (never pickles), sent with the buffer-based calls like the pixels, so a
rank written in another language could join.  Pixels move with ``Send``/``Recv`` at C speed:
the receiver allocates from the header and receives straight into the new array.

Messages between rank 0 and a worker are matched by tag; MPI keeps messages of one tag from
one sender in order, so a header is always followed by its own pixels.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
from mpi4py import MPI

TAG_TASK = 11  # rank 0 -> worker: task header (JSON)
TAG_TASK_PIXELS = 12  # rank 0 -> worker: the tile region
TAG_RESULT = 21  # worker -> rank 0: result header (JSON)
TAG_RESULT_PIXELS = 22  # worker -> rank 0: the cropped result
TAG_STOP = 31  # rank 0 -> worker: finish and leave
TAG_BYE = 32  # worker -> rank 0: left the loop, about to finalise
TAG_PING = 41  # rank 0 -> worker: are you alive? (after a rank died somewhere)
TAG_PONG = 42  # worker -> rank 0: yes


class RankWatch:
    """Hydra's only notice that a rank has died: SIGUSR1 to every surviving rank.

    With ``mpiexec -disable-auto-cleanup`` the job outlives a dead rank, but MPI itself reports
    nothing (docs/fault-tolerance.md); the signal says *that* a rank died, and rank 0 then asks
    every worker which.  The handler only sets a flag: the loop looks at it.  Every rank
    installs it, since the signal's default action would end the process.
    """

    noticed = False

    @classmethod
    def install(cls) -> None:
        signal.signal(signal.SIGUSR1, cls._note)

    @classmethod
    def _note(cls, signum: int, frame: Any) -> None:
        cls.noticed = True

    @classmethod
    def take(cls) -> bool:
        """Whether a death was noticed since the last call."""
        noticed, cls.noticed = cls.noticed, False
        return noticed


def recv_within(
    comm: MPI.Comm, buffer: list, source: int, tag: int, seconds: float, keep: list
) -> bool:
    """Receive into ``buffer`` from ``source``, giving up after ``seconds`` (a dead sender).

    Rank 0 must never block for good on one worker: a blocking ``Recv`` from a rank that died
    between its header and its pixels would never return.  The wait is a throttled poll.  A
    receive given up is not cancelled (cancelling one whose transfer has begun, as over a cut
    link, crashes MPICH's UCX device): it goes into ``keep`` with its buffer, to stay alive.
    """
    request = comm.Irecv(buffer, source=source, tag=tag)
    deadline = time.monotonic() + seconds
    backoff = Backoff(floor=1e-5, ceiling=1e-3, warm_ceiling=1e-4)
    try:
        while not request.Test():
            # A rank has died (maybe this sender, maybe another): the transfer gets a second
            # to finish, then the task is run again elsewhere if need be.
            if RankWatch.noticed:
                deadline = min(deadline, time.monotonic() + 1.0)
            if time.monotonic() > deadline:
                keep.append((source, [request], (buffer,)))
                return False
            backoff.sleep()
    except MPI.Exception:  # e.g. a shared-memory copy from a process that no longer exists
        return False
    return True


def encode_header(header: dict[str, Any]) -> bytearray:
    """A header as JSON bytes in a buffer MPI can send."""
    return bytearray(json.dumps(header, separators=(",", ":")).encode())


def recv_header(comm: MPI.Comm, status: MPI.Status) -> dict[str, Any]:
    """Receive the JSON header that ``status`` (from a probe) describes."""
    buf = bytearray(status.Get_count(MPI.BYTE))
    comm.Recv([buf, MPI.BYTE], source=status.Get_source(), tag=status.Get_tag())
    return json.loads(buf) if buf else {}


def as_bytes(array: np.ndarray) -> list:
    """An array as an MPI byte buffer (C-contiguous first, which is free for full-width strips).

    Handing MPI bytes, never a typed buffer, means any dtype at any alignment goes through:
    mpi4py cannot map some buffer formats (``=H`` for a 16-bit view of an odd address).
    """
    return [np.ascontiguousarray(array).reshape(-1).view(np.uint8), MPI.BYTE]


def recv_into(comm: MPI.Comm, array: np.ndarray, source: int, tag: int) -> np.ndarray:
    """Receive pixels as bytes straight into ``array`` (C-contiguous), and return it."""
    comm.Recv([array.reshape(-1).view(np.uint8), MPI.BYTE], source=source, tag=tag)
    return array


def recv_pixels(comm: MPI.Comm, source: int, tag: int, header: dict[str, Any]) -> np.ndarray:
    """Receive the array a header announced (``shape``, ``dtype``) straight into new memory."""
    return recv_into(comm, np.empty(header["shape"], dtype=header["dtype"]), source, tag)


def pixel_fields(array: np.ndarray) -> dict[str, Any]:
    """The header fields that let the receiver allocate ``array``."""
    return {"shape": list(array.shape), "dtype": array.dtype.str}


class Backoff:
    """Throttled polling: short sleeps while work is recent, long ones once idle.

    MPICH's blocking calls poll hard; a rank waiting that way burns a core.  Instead a rank
    probes, then sleeps: from ``floor`` doubling up to ``warm_ceiling`` for ``warm_period``
    seconds after the last activity (so the next task of a busy stream is picked up within a
    fraction of a millisecond), then up to ``ceiling`` (so an idle rank stays near 0 % CPU).
    A *calm* sleep (nothing waits on this rank's polling) grows up to ``calm_ceiling``.
    """

    def __init__(
        self,
        floor: float = 50e-6,
        ceiling: float = 0.01,
        warm_ceiling: float = 2e-4,
        warm_period: float = 1.0,
        calm_ceiling: float | None = None,
    ):
        self.floor, self.ceiling = floor, ceiling
        self.warm_ceiling, self.warm_period = min(warm_ceiling, ceiling), warm_period
        self.calm_ceiling = ceiling if calm_ceiling is None else calm_ceiling
        self.delay = floor
        self.last_activity = time.monotonic()

    def reset(self) -> None:
        """Something happened: poll fast again."""
        self.delay = self.floor
        self.last_activity = time.monotonic()

    def sleep(self, calm: bool = False) -> None:
        """Nothing happened: sleep a little longer than last time.  ``calm``: nothing needs
        fast polling even while work is recent (no transfer waits on this rank's calls into
        MPI), so sleeps grow up to ``calm_ceiling``."""
        time.sleep(self.delay)
        if calm:
            self.delay = min(self.calm_ceiling, self.delay * 2)
            return
        warm = time.monotonic() - self.last_activity < self.warm_period
        self.delay = min(self.warm_ceiling if warm else self.ceiling, self.delay * 2)


def run_or_abort(comm: MPI.Comm, body: Callable[[], int]) -> int:
    """Run a rank's ``body``; an unhandled exception on rank 0 aborts the whole MPI job, one
    on a worker ends that rank.

    Without this, one rank's crash leaves the others waiting forever in a receive or in
    ``MPI_Finalize``.  A worker aborts only itself (``COMM_SELF``): under plain ``mpiexec``
    that still ends the whole job, and under ``-disable-auto-cleanup`` rank 0 outlives it and
    gives its tasks to the other workers.  ``SystemExit`` (argparse's ``--help`` or usage
    errors) is not a crash: every rank parses the same command line and exits alike.
    """
    RankWatch.install()
    try:
        code = body()
        # This rank is done; other ranks' normal exits now signal it too, and the default
        # action of SIGUSR1 would kill it while it finalises.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        return code
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    except BaseException:
        print(f"rank {comm.Get_rank()}: fatal error, aborting the MPI job", file=sys.stderr)
        traceback.print_exc()
        sys.stderr.flush()
        (comm if comm.Get_rank() == 0 else MPI.COMM_SELF).Abort(1)
        return 1

"""How rank 0 and the workers talk over MPI: a small JSON header, then the pixels as a buffer.

Headers are JSON bytes (never pickles), sent with the buffer-based calls like the pixels, so a
rank written in another language could join.  Pixels move with ``Send``/``Recv`` at C speed:
the receiver allocates from the header and receives straight into the new array.

Messages between rank 0 and a worker are matched by tag; MPI keeps messages of one tag from
one sender in order, so a header is always followed by its own pixels.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from mpi4py import MPI

TAG_TASK = 11  # rank 0 -> worker: task header (JSON)
TAG_TASK_PIXELS = 12  # rank 0 -> worker: the tile region
TAG_RESULT = 21  # worker -> rank 0: result header (JSON)
TAG_RESULT_PIXELS = 22  # worker -> rank 0: the cropped result
TAG_STOP = 31  # rank 0 -> worker: finish and leave
TAG_BYE = 32  # worker -> rank 0: left the loop, about to finalise


def encode_header(header: dict[str, Any]) -> bytearray:
    """A header as JSON bytes in a buffer MPI can send."""
    return bytearray(json.dumps(header, separators=(",", ":")).encode())


def recv_header(comm: MPI.Comm, status: MPI.Status) -> dict[str, Any]:
    """Receive the JSON header that ``status`` (from a probe) describes."""
    buf = bytearray(status.Get_count(MPI.BYTE))
    comm.Recv([buf, MPI.BYTE], source=status.Get_source(), tag=status.Get_tag())
    return json.loads(buf) if buf else {}


def recv_pixels(comm: MPI.Comm, source: int, tag: int, header: dict[str, Any]) -> np.ndarray:
    """Receive the array a header announced (``shape``, ``dtype``) straight into new memory."""
    array = np.empty(header["shape"], dtype=header["dtype"])
    comm.Recv(array, source=source, tag=tag)
    return array


def pixel_fields(array: np.ndarray) -> dict[str, Any]:
    """The header fields that let the receiver allocate ``array``."""
    return {"shape": list(array.shape), "dtype": array.dtype.str}


class Backoff:
    """Throttled polling: sleep a little longer each idle round, start over on activity.

    MPICH's blocking calls poll hard; a rank waiting that way burns a core.  Probing, then
    sleeping between 50 µs (busy) and ``ceiling`` (idle), keeps latency low under load and an
    idle rank near 0 % CPU.
    """

    def __init__(self, floor: float = 50e-6, ceiling: float = 0.02):
        self.floor, self.ceiling = floor, ceiling
        self.delay = floor

    def reset(self) -> None:
        self.delay = self.floor

    def sleep(self) -> None:
        time.sleep(self.delay)
        self.delay = min(self.ceiling, self.delay * 2)

"""Start ``mpiexec -n N python -m mpi_imgproc.server`` from Python, and always clean up.

Used by the tests, the benchmarks and ``mpi-imgproc bench``.  The server binds
``tcp://127.0.0.1:*`` (a free port chosen by ZeroMQ) and prints the address it got; the caller
reads it from the first line.  The whole process group is killed on exit, so a failure never
leaves ranks behind.
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import psutil

STARTUP_TIMEOUT = 60.0


def mpiexec() -> str:
    """The mpiexec beside this Python (the venv's mpich wheel), else the one on PATH."""
    local = Path(sys.executable).parent / "mpiexec"
    found = str(local) if local.exists() else shutil.which("mpiexec")
    if not found:
        raise RuntimeError("mpiexec not found: run `make install`")
    return found


# Under ``survive``: a shell around each rank that ignores Hydra's SIGUSR1 and exits
# normally whatever the rank died of, so that Hydra does not end the whole job (it does when a
# process it started is killed by a signal, even with -disable-auto-cleanup).
RANK_SHELL = ("sh", "-c", 'trap "" USR1 TERM INT; "$@"', "rank")


def mpi_command(ranks: int, module: str, *args: str, survive: bool = False) -> list[str]:
    """``mpiexec -n RANKS python -m MODULE ARGS...`` with this Python and its mpiexec.

    ``survive``: launch so that the job outlives a dead worker rank (docs/fault-tolerance.md).
    """
    launcher = [mpiexec(), "-disable-auto-cleanup"] if survive else [mpiexec()]
    rank = [*RANK_SHELL, sys.executable] if survive else [sys.executable]
    # The processes engine sets MPI4PY_RC_INITIALIZE=0 in its own process for its children;
    # a cluster started from such a process must still initialise MPI on every rank.  `env -u`
    # works in front of any launcher (Open MPI's mpiexec has no -genv).
    unset = ["env", "-u", "MPI4PY_RC_INITIALIZE"]
    return [*unset, *launcher, "-n", str(ranks), *rank, "-m", module, *args]


class Cluster:
    """A running server: its address, its output so far, and its process."""

    proc: subprocess.Popen

    def __init__(self, proc: subprocess.Popen, lines: queue.Queue):
        self.proc = proc
        self.lines = lines
        self.output: list[str] = []
        self.address = ""

    def read_until(self, marker: str, timeout: float) -> str:
        """Wait for a line containing ``marker``; the output so far is in the error."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.output.append(line)
            if marker in line:
                return line
        raise RuntimeError(f"server did not print {marker!r}; output:\n" + "".join(self.output))

    def drain(self) -> str:
        """Everything the server printed so far."""
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return "".join(self.output)
            if line is None:
                return "".join(self.output)
            self.output.append(line)

    @property
    def rank0_pid(self) -> int:
        """Rank 0's process id, from the server's announcement."""
        return int(re.search(r"; pid (\d+)", self.drain()).group(1))

    def ranks(self) -> list[psutil.Process]:
        """Every rank's process (not mpiexec, Hydra's proxies or launch wrappers)."""
        return [
            p
            for p in psutil.Process(self.proc.pid).children(recursive=True)
            if p.name().startswith("python") and "mpi_imgproc.server" in " ".join(p.cmdline())
        ]

    def workers(self) -> list[psutil.Process]:
        """The worker ranks' processes (every rank but 0)."""
        rank0 = self.rank0_pid
        return [p for p in self.ranks() if p.pid != rank0]

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig`` to mpiexec and wait; returns its exit code."""
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


def _pump(stream, lines: queue.Queue) -> None:
    for line in iter(stream.readline, ""):
        lines.put(line)
    lines.put(None)


@contextmanager
def running_cluster(ranks: int = 3, *args: str, survive: bool = False) -> Iterator[Cluster]:
    """Start the server on ``ranks`` ranks with extra ``args``; kill its process group after.

    ``survive``: launched to outlive a dead worker rank (see ``mpi_command``)."""
    cmd = mpi_command(
        ranks, "mpi_imgproc.server", "--bind", "tcp://127.0.0.1:*", *args, survive=survive
    )
    with serving(cmd) as cluster:
        yield cluster


@contextmanager
def serving(cmd: Sequence[str], env: dict[str, str] | None = None) -> Iterator[Cluster]:
    """Run ``cmd`` (an mpiexec line that starts the server) until its address is printed;
    SIGTERM, then kill its process group after.  ``env``: extra environment variables."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    env.pop("MPI4PY_RC_INITIALIZE", None)  # see mpi_command
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=env,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    cluster = Cluster(proc, lines)
    try:
        line = cluster.read_until("listening on", STARTUP_TIMEOUT)
        cluster.address = line.rsplit(" ", 1)[1].strip()
        cluster.read_until("ranks", 5)
        yield cluster
    finally:
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)

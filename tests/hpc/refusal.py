"""What a server started by a launcher that does not match mpi4py's MPI must show."""

from __future__ import annotations

import subprocess

SERVE = ("-m", "mpi_imgproc.server", "--bind", "tcp://127.0.0.1:*")


def the_one_refusal(ran: subprocess.CompletedProcess) -> str:
    """The single line every process of a mismatched start agreed on (exit 2, no server
    listening, one line from the launcher's first process, none from the others)."""
    assert ran.returncode == 2, ran.stdout + ran.stderr
    assert "listening on" not in ran.stdout
    ours = [line for line in ran.stderr.splitlines() if line.startswith("mpi_imgproc server:")]
    assert len(ours) == 1, ran.stderr
    return ours[0]

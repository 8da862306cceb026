"""Refuse to start when the launcher and mpi4py's MPI do not belong together.

An mpi4py built against one MPI and started by another MPI's launcher (Open MPI's ``mpirun``
with the MPICH wheel, Hydra's ``mpiexec`` with an mpi4py built against Open MPI, ``srun``
with a PMI plugin the library does not speak) does not fail: every process initialises as a
singleton, sees ``COMM_WORLD`` of size 1 and becomes its own rank 0 — N separate servers, or N
batch runs over the same folder.  Every launcher tells its processes how many it started
through the environment, so a size of 1 next to a launcher that says more is a mismatch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from mpi4py import MPI

# (variable holding the number of processes started, variable holding this one's index, who,
# what to do).  srun comes first because it also sets PMI_SIZE under --mpi=pmi2.
# SLURM_STEP_NUM_TASKS is set in job steps only, not in the batch script itself.
REBUILD = "or build mpi4py against the launcher's MPI (README.md, 'Running across nodes')"
LAUNCHER_VARIABLES = (
    (
        "SLURM_STEP_NUM_TASKS",
        "SLURM_PROCID",
        "srun",
        "give srun a --mpi plugin it speaks (srun --mpi=list; pmi2 for MPICH)",
    ),
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "Open MPI's mpirun", "use its own launcher"),
    ("PMI_SIZE", "PMI_RANK", "MPICH's mpiexec (or another PMI launcher)", "use its own launcher"),
)


def launcher_mismatch(world_size: int, environ: Mapping[str, str]) -> tuple[str, bool] | None:
    """Why this start is a mismatch, and whether this process is the launcher's first one,
    or None when MPI and the launcher agree (or no launcher says anything)."""
    if world_size != 1:
        return None
    for size_name, rank_name, launcher, remedy in LAUNCHER_VARIABLES:
        started = environ.get(size_name, "")
        if started.isdigit() and int(started) > 1:
            first = environ.get(rank_name, "0") == "0"
            library = " ".join(MPI.Get_library_version().replace("\0", "").split("\n")[0].split())
            reason = (
                f"{launcher} started {started} processes ({size_name}={started}) but MPI sees "
                f"one: mpi4py uses {library}; {remedy}, {REBUILD}"
            )
            return reason, first
    return None


def refuse_mismatched_launch(prefix: str, environ: Mapping[str, str] | None = None) -> bool:
    """True (after one line on stderr, from the launcher's first process only) when this
    process is one of several singletons a mismatched launcher started; callers exit 2."""
    found = launcher_mismatch(MPI.COMM_WORLD.Get_size(), os.environ if environ is None else environ)
    if found is None:
        return False
    reason, first = found
    if first:
        print(f"{prefix}: {reason}", file=sys.stderr, flush=True)
    return True

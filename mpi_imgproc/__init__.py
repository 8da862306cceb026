"""mpi_imgproc: an MPI image-processing cluster with a ZeroMQ front and exact tiling."""

import os

# MPICH's MPI_Finalize waits in a process-manager barrier for every rank, so after a worker
# rank has died (see docs/fault-tolerance.md) the survivors would never exit.  The cluster
# ends every exchange itself (stop, goodbye) before finalising, so the barrier adds nothing.
# Set here because it must be in the environment before MPI_Init; other MPIs ignore it.
os.environ.setdefault("MPIR_CVAR_NO_COLLECTIVE_FINALIZE", "1")

__version__ = "0.1.0"

"""The tests start real servers through :mod:`mpi_imgproc.launch`."""

from mpi_imgproc.launch import Cluster, mpi_command, mpiexec, running_cluster

__all__ = ["Cluster", "mpi_command", "mpiexec", "running_cluster"]

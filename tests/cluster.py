"""The tests start real servers through :mod:`mpi_imgproc.launch`."""

from mpi_imgproc.launch import Cluster, mpiexec, running_cluster

__all__ = ["Cluster", "mpiexec", "running_cluster"]

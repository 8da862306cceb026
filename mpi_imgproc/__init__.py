"""mpi_imgproc: an MPI image-processing cluster with a ZeroMQ front and exact tiling."""

__version__ = "0.1.0"

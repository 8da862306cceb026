"""Local engines: how one process (one MPI rank, or the ``run --local`` command) runs tiles.

All engines share one interface, :class:`Engine`: ``run(stage, pieces, margins)``.

================  ============================================================================
``sequential``    one tile after another; the reference and the baseline of every speedup
``threads``       a thread pool; OpenCV releases the GIL, so threads scale with cores
``processes``     a process pool fed through shared memory (forkserver, safe after MPI_Init)
``gpu``           CuPy on a CUDA device; see :mod:`mpi_imgproc.local_engines.gpu` for exactness
================  ============================================================================
"""

from __future__ import annotations

from .base import Engine, default_workers, process_tile

ENGINES = ("sequential", "threads", "processes", "gpu")


def get_engine(name: str, workers: int | None = None) -> Engine:
    """Create the engine called ``name`` with ``workers`` workers (default: usable cores)."""
    from ..errors import InvalidParameter

    if name == "sequential":
        from .sequential import SequentialEngine

        return SequentialEngine()
    if name == "threads":
        from .threads import ThreadEngine

        return ThreadEngine(workers)
    if name == "processes":
        from .processes import ProcessEngine

        return ProcessEngine(workers)
    if name == "gpu":
        from .gpu import GpuEngine

        return GpuEngine(workers)
    raise InvalidParameter(f"engine must be one of {', '.join(ENGINES)}; got {name!r}")


def check_engine(name: str) -> None:
    """Raise EngineUnavailable if the engine called ``name`` cannot run here (CuPy or a CUDA
    device missing for ``gpu``), without creating it: a cluster checks before it starts."""
    if name == "gpu":
        from .gpu import _load_cupy

        _load_cupy()


__all__ = ["ENGINES", "Engine", "check_engine", "default_workers", "get_engine", "process_tile"]

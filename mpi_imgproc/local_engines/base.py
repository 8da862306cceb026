"""The one interface every local engine implements: run tiles through a stage."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import cv2
import numpy as np

from ..pipeline import Stage
from ..tiling import Box

T = TypeVar("T")
R = TypeVar("R")


def process_tile(stage: Stage, pixels: np.ndarray, margins: Box) -> np.ndarray:
    """Run ``stage`` on one tile region and crop its halo off: the unit of work of every engine
    (``Stage.run_tile``)."""
    return stage.run_tile(pixels, margins)


# glibc serves allocations over 128 KiB with a fresh mmap and returns them on free, so every
# strip's buffers (a few MiB each: read, intermediates, result) fault in all their pages again,
# task after task: a fifth of a region task's time.  Kept in the heap instead, they are reused.
MALLOC_MMAP_THRESHOLD = 32 * 2**20  # glibc's largest on 64-bit systems
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_buffers() -> None:
    """Let this process reuse freed buffers of up to 32 MiB (no-op without glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, 4 * MALLOC_MMAP_THRESHOLD)


def default_workers() -> int:
    """Cores this process may use (respects CPU affinity, e.g. under Slurm or taskset)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


class Engine:
    """Runs a stage over many tiles inside one process (or its helpers).

    Engines own the parallelism: they pin OpenCV to one thread per call so that the engine's
    workers and OpenCV's own pool do not fight over the same cores.
    """

    name = "engine"

    def __init__(self, workers: int | None = None):
        self.workers = workers or default_workers()
        cv2.setNumThreads(1)

    def process(self, stage: Stage, piece: np.ndarray, margins: Box) -> np.ndarray:
        """One tile: run ``stage`` on its region and crop the halo (engines may override)."""
        return process_tile(stage, piece, margins)

    def run(
        self, stage: Stage, pieces: Sequence[np.ndarray], margins: Sequence[Box]
    ) -> list[np.ndarray]:
        """Process each piece (a tile region) with ``stage``; results in the same order."""
        return self.map(lambda i: self.process(stage, pieces[i], margins[i]), range(len(pieces)))

    def run_into(
        self,
        stage: Stage,
        pieces: Sequence[np.ndarray],
        margins: Sequence[Box],
        dests: Sequence[np.ndarray],
    ) -> None:
        """Like ``run``, but write each cropped result into ``dests[i]`` (the tile's core in the
        merged output), so that merging happens on the engine's workers, not after them."""

        def one(i: int) -> None:
            dests[i][...] = self.process(stage, pieces[i], margins[i])

        self.map(one, range(len(pieces)))

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """``fn`` over ``items`` on the engine's workers where they can share Python objects
        (threads), else one after another in this thread."""
        return [fn(item) for item in items]

    def close(self) -> None:
        """Release threads, processes or device memory."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> dict[str, object]:
        """Name and worker count, for ``info`` and benchmark reports."""
        return {"engine": self.name, "workers": self.workers}

"""Threads: OpenCV releases the GIL inside its calls, so a thread pool keeps all cores busy."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..pipeline import Stage
from ..tiling import Box
from .base import Engine, process_tile


class ThreadEngine(Engine):
    """A pool of ``workers`` threads sharing the tiles; no copies, tiles stay NumPy views."""

    name = "threads"

    def __init__(self, workers: int | None = None):
        super().__init__(workers)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="imgproc")

    def run(
        self, stage: Stage, pieces: Sequence[np.ndarray], margins: Sequence[Box]
    ) -> list[np.ndarray]:
        if len(pieces) == 1:  # nothing to share: skip the hand-off
            return [process_tile(stage, pieces[0], margins[0])]
        return list(self._pool.map(lambda pm: process_tile(stage, *pm), zip(pieces, margins)))

    def map(self, fn, items):  # noqa: ANN001 - see Engine.map
        if len(items) <= 1:
            return [fn(item) for item in items]
        return list(self._pool.map(fn, items))

    def close(self) -> None:
        self._pool.shutdown(wait=True)

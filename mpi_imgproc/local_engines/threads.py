"""Threads: OpenCV releases the GIL inside its calls, so a thread pool keeps all cores busy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from .base import Engine, R, T


class ThreadEngine(Engine):
    """A pool of ``workers`` threads sharing the tiles; no copies, tiles stay NumPy views."""

    name = "threads"

    def __init__(self, workers: int | None = None):
        super().__init__(workers)
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="imgproc")

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        if len(items) <= 1:  # nothing to share: skip the hand-off
            return [fn(item) for item in items]
        return list(self._pool.map(fn, items))

    def close(self) -> None:
        self._pool.shutdown(wait=True)

"""Processes: tiles travel through shared memory, never through pickles.

The parent copies each tile region into a ``SharedMemory`` block and sends the child only its
name, shape, dtype and the stage as JSON.  The child writes its cropped result into a new block
and returns that block's name.  Children are started with ``forkserver`` (``spawn`` where that is
missing): ``fork()`` after ``MPI_Init`` is unsafe with many MPI libraries.

A child that dies (a segfault in a codec, the OOM killer) breaks the pool; the engine starts a
fresh pool and retries the batch once before giving up with a clear error.
"""

from __future__ import annotations

import json
import multiprocessing as mp
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.shared_memory import SharedMemory

import cv2
import numpy as np

from ..errors import ImgprocError
from ..pipeline import Stage, stage_from_text
from ..tiling import Box
from .base import Engine, process_tile

Descriptor = tuple[str, tuple[int, ...], str]  # shared-memory name, shape, dtype


class EngineCrashed(ImgprocError):
    """A worker process died twice on the same batch of tiles."""

    code = "engine_crashed"


def _child_init() -> None:
    cv2.setNumThreads(1)


def _to_shared(array: np.ndarray) -> tuple[SharedMemory, Descriptor]:
    shm = SharedMemory(create=True, size=max(1, array.nbytes))
    np.ndarray(array.shape, array.dtype, buffer=shm.buf)[...] = array
    return shm, (shm.name, array.shape, array.dtype.str)


def _child_run(stage_json: str, source: Descriptor, margins: Box) -> Descriptor:
    name, shape, dtype = source
    shm = SharedMemory(name=name)
    try:
        pixels = np.ndarray(shape, np.dtype(dtype), buffer=shm.buf)
        result = process_tile(stage_from_text(stage_json), pixels, margins)
        del pixels
    finally:
        shm.close()
    out, descriptor = _to_shared(np.ascontiguousarray(result))
    out.close()
    return descriptor


def _take_shared(descriptor: Descriptor) -> np.ndarray:
    name, shape, dtype = descriptor
    shm = SharedMemory(name=name)
    try:
        return np.ndarray(shape, np.dtype(dtype), buffer=shm.buf).copy()
    finally:
        shm.close()
        shm.unlink()


class ProcessEngine(Engine):
    """A pool of ``workers`` processes fed through shared memory."""

    name = "processes"

    def __init__(self, workers: int | None = None):
        super().__init__(workers)
        methods = mp.get_all_start_methods()
        self._context = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        self._pool = self._new_pool()

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=self._context, initializer=_child_init)

    def run(
        self, stage: Stage, pieces: Sequence[np.ndarray], margins: Sequence[Box]
    ) -> list[np.ndarray]:
        stage_json = json.dumps(stage.to_json())
        try:
            return self._run_once(stage_json, pieces, margins)
        except BrokenProcessPool:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
        try:
            return self._run_once(stage_json, pieces, margins)
        except BrokenProcessPool as exc:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            raise EngineCrashed(f"a worker process died twice on the same tiles: {exc}") from None

    def _run_once(
        self, stage_json: str, pieces: Sequence[np.ndarray], margins: Sequence[Box]
    ) -> list[np.ndarray]:
        inputs = [_to_shared(p) for p in pieces]
        try:
            futures = [
                self._pool.submit(_child_run, stage_json, desc, m)
                for (_, desc), m in zip(inputs, margins)
            ]
            results, error = [], None
            for future in futures:  # collect every block, even after a failure, so none leaks
                try:
                    results.append(_take_shared(future.result()))
                except Exception as exc:  # noqa: BLE001 - re-raised below, after cleanup
                    error = error or exc
            if error is not None:
                raise error
            return results
        finally:
            for shm, _ in inputs:
                shm.close()
                shm.unlink()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

"""Processes: tiles travel through shared memory, never through pickles.

Children get only names, offsets, shapes and the stage as JSON; pixels stay in shared memory.
Children are started with ``forkserver`` (``spawn`` where that is missing): ``fork()`` after
``MPI_Init`` is unsafe with many MPI libraries.

Two paths:

* ``run_into`` (tiled stages, the common case): one *arena* — a shared block kept and reused
  from call to call, so its pages are faulted in once, not on every image — holds every tile
  region and every tile result.  The parent copies a region in and submits it at once, so the
  children start while it copies the next; each child writes its cropped result into the
  arena; the parent copies each result into the output as it arrives.
* ``run`` for tiled stages allocates the results and goes through the arena too; for the rest
  (whole-image stages, histograms: results of unknown shape) each region goes in its own block,
  and the child returns its result in a block it creates.

A child that dies (a segfault in a codec, the OOM killer) breaks the pool; the engine starts a
fresh pool and retries the call once before giving up with a clear error.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from multiprocessing.shared_memory import SharedMemory
from typing import TypeVar

import cv2
import numpy as np

from ..errors import EngineCrashed
from ..pipeline import Stage, TiledStage, stage_from_text
from ..tiling import Box, crop_halo, output_like
from .base import Engine, keep_buffers, process_tile

Descriptor = tuple[str, tuple[int, ...], str]  # shared-memory name, shape, dtype
Slot = tuple[int, tuple[int, ...], str]  # offset in the arena, shape, dtype
R = TypeVar("R")
T = TypeVar("T")


# ------------------------------------------------------------------------- in the children

_attached: dict[str, SharedMemory] = {}


def _child_init() -> None:
    cv2.setNumThreads(1)
    keep_buffers()


def _arena(name: str) -> SharedMemory:
    """The parent's arena, attached once per child (a new name means the arena grew)."""
    if name not in _attached:
        for old in _attached.values():
            old.close()
        _attached.clear()
        _attached[name] = SharedMemory(name=name)
    return _attached[name]


def _view(buf: memoryview, slot: Slot) -> np.ndarray:
    offset, shape, dtype = slot
    return np.ndarray(shape, np.dtype(dtype), buffer=buf, offset=offset)


def _child_into(stage_json: str, arena: str, source: Slot, target: Slot, margins: Box) -> None:
    buf = _arena(arena).buf
    _view(buf, target)[...] = process_tile(stage_from_text(stage_json), _view(buf, source), margins)


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


# --------------------------------------------------------------------------- in the parent


def _layout(arrays: Sequence[np.ndarray], start: int) -> tuple[list[Slot], int]:
    """Consecutive 64-byte-aligned slots for arrays shaped like ``arrays``; and the end."""
    slots, offset = [], start
    for a in arrays:
        slots.append((offset, a.shape, a.dtype.str))
        offset += -(-a.nbytes // 64) * 64
    return slots, offset


def _gather(futures: Sequence[Future], on_result: Callable[[int, object], None]) -> None:
    """Wait for every future (even after a failure, so nothing is left running on our
    memory), hand each result to ``on_result``, then raise the first error."""
    index = {f: i for i, f in enumerate(futures)}
    error = None
    for future in as_completed(futures):
        try:
            on_result(index[future], future.result())
        except Exception as exc:  # noqa: BLE001 - re-raised below, once all are done
            error = error or exc
    if error is not None:
        raise error


class ProcessEngine(Engine):
    """A pool of ``workers`` processes fed through shared memory."""

    name = "processes"

    def __init__(self, workers: int | None = None):
        super().__init__(workers)
        # The children (and the fork server) import the parent's main module; under
        # ``python -m mpi_imgproc.server`` that imports mpi4py, which must not initialise MPI
        # in a process mpiexec did not start.  mpi4py reads this when it is first imported.
        os.environ["MPI4PY_RC_INITIALIZE"] = "0"
        methods = mp.get_all_start_methods()
        self._context = mp.get_context("forkserver" if "forkserver" in methods else "spawn")
        self._pool = self._new_pool()
        self._arena: SharedMemory | None = None
        self._threads: ThreadPoolExecutor | None = None

    def map(self, fn: Callable[[T], R], items: Sequence[T]) -> list[R]:
        """Whole-image tasks (Python callables over objects, not tiles): side by side on
        threads of this process — OpenCV releases the GIL — since pickling images to the
        children would cost more than it saves."""
        if len(items) <= 1:
            return [fn(item) for item in items]
        if self._threads is None:
            self._threads = ThreadPoolExecutor(self.workers, thread_name_prefix="imgproc")
        return list(self._threads.map(fn, items))

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=self._context, initializer=_child_init)

    def _retrying(self, call: Callable[[], R]) -> R:
        """Run ``call``; if a child died, start a fresh pool and run it once more."""
        for attempt in (1, 2):
            try:
                return call()
            except BrokenProcessPool as exc:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = self._new_pool()
                if attempt == 2:
                    raise EngineCrashed(
                        f"a worker process died twice on the same tiles: {exc}"
                    ) from None
        raise AssertionError("unreachable")

    def run(
        self, stage: Stage, pieces: Sequence[np.ndarray], margins: Sequence[Box]
    ) -> list[np.ndarray]:
        if isinstance(stage, TiledStage) and not stage.whole:  # result shapes known: arena
            results = [output_like(stage, crop_halo(p, m)) for p, m in zip(pieces, margins)]
            self.run_into(stage, pieces, margins, results)
            return results
        stage_json = json.dumps(stage.to_json())
        return self._retrying(lambda: self._run_blocks(stage_json, pieces, margins))

    def _run_blocks(
        self, stage_json: str, pieces: Sequence[np.ndarray], margins: Sequence[Box]
    ) -> list[np.ndarray]:
        inputs: list[tuple[SharedMemory, Descriptor]] = []
        results: list[np.ndarray] = [np.empty(0)] * len(pieces)
        try:
            inputs.extend(_to_shared(p) for p in pieces)
            futures = [
                self._pool.submit(_child_run, stage_json, desc, m)
                for (_, desc), m in zip(inputs, margins)
            ]

            def take(i: int, descriptor: object) -> None:
                results[i] = _take_shared(descriptor)  # type: ignore[arg-type]

            _gather(futures, take)
            return results
        finally:
            for shm, _ in inputs:
                shm.close()
                shm.unlink()

    def run_into(
        self,
        stage: Stage,
        pieces: Sequence[np.ndarray],
        margins: Sequence[Box],
        dests: Sequence[np.ndarray],
    ) -> None:
        stage_json = json.dumps(stage.to_json())
        self._retrying(lambda: self._run_arena(stage_json, pieces, margins, dests))

    def _run_arena(
        self,
        stage_json: str,
        pieces: Sequence[np.ndarray],
        margins: Sequence[Box],
        dests: Sequence[np.ndarray],
    ) -> None:
        sources, middle = _layout(pieces, 0)
        targets, end = _layout(dests, middle)
        arena = self._reserve(end)
        futures = []
        for piece, source, target, margin in zip(pieces, sources, targets, margins):
            _view(arena.buf, source)[...] = piece
            futures.append(
                self._pool.submit(_child_into, stage_json, arena.name, source, target, margin)
            )

        def place(i: int, _: object) -> None:
            dests[i][...] = _view(arena.buf, targets[i])

        _gather(futures, place)

    def _reserve(self, nbytes: int) -> SharedMemory:
        """The arena, replaced by a larger one (at least double) when too small."""
        if self._arena is None or self._arena.size < nbytes:
            size = max(nbytes, 2 * self._arena.size if self._arena else 0, 1 << 20)
            self._release_arena()
            self._arena = SharedMemory(create=True, size=size)
        return self._arena

    def _release_arena(self) -> None:
        if self._arena is not None:
            self._arena.close()
            self._arena.unlink()
            self._arena = None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._threads is not None:
            self._threads.shutdown(wait=True)
        self._release_arena()

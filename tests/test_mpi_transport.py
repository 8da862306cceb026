"""In-process MPI tests, run by ``make test`` as
``mpiexec -n 3 python -m pytest --with-mpi -m mpi tests/test_mpi_transport.py``.

Rank 0 drives the real scheduler with the MPI backend; the other ranks run the real worker
loop.  Rank 0 always stops the workers in ``finally``, so a failed assertion cannot leave them
waiting.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import random_image

from mpi_imgproc.local_engines import get_engine
from mpi_imgproc.pipeline import Pipeline
from mpi_imgproc.planner import ImageSource
from mpi_imgproc.scheduler import ImageWork, Job, JobListener, Scheduler

MPI = pytest.importorskip("mpi4py.MPI")


class Collect(JobListener):
    def __init__(self):
        self.images: dict[int, np.ndarray] = {}
        self.errors: dict[int, tuple[str, str]] = {}
        self.done = False

    def image_done(self, job, image, result):
        self.images[image.index] = result.pixels

    def image_failed(self, job, image, code, message):
        self.errors[image.index] = (code, message)

    def finished(self, job):
        self.done = True


def run_on_cluster(jobs: list[tuple[list[np.ndarray], list[str], int]]) -> list[Collect]:
    """Rank 0: run jobs through the workers and return what each collected; workers: serve."""
    from mpi_imgproc.backends import MPIBackend
    from mpi_imgproc.worker import serve

    comm = MPI.COMM_WORLD
    if comm.rank != 0:
        serve(comm, get_engine("sequential"))
        return []
    backend = MPIBackend(comm, per_worker=2)
    listeners = []
    try:
        scheduler = Scheduler(backend)
        for n, (images, specs, tile) in enumerate(jobs):
            listener = Collect()
            job = Job(f"j{n}", Pipeline.parse(specs), tile, listener)
            job.images = [
                ImageWork(job, i, ImageSource(f"i{i}", pixels=im)) for i, im in enumerate(images)
            ]
            scheduler.add(job)
            listeners.append(listener)
        deadline = time.monotonic() + 60
        while not all(lst.done for lst in listeners) and time.monotonic() < deadline:
            if not scheduler.step():
                time.sleep(1e-4)
    finally:
        backend.close(deadline=time.perf_counter() + 10)
    return listeners


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_scheduler_and_workers_over_mpi_give_the_whole_image_result():
    rng = np.random.default_rng(0)
    images = [random_image(rng, 61, 47, 3), random_image(rng, 9, 130, 1)]
    jobs = [
        (images, ["gaussian_blur:ksize=5", "grayscale", "equalize_hist"], 8),
        (images, ["dilate:ksize=3,iterations=2", "resize:scale=1.5"], 5),
        (images, ["crop:x=20,y=0,width=30", "invert"], 0),
    ]
    listeners = run_on_cluster(jobs)
    if MPI.COMM_WORLD.rank != 0:
        return
    for (imgs, specs, _), listener in zip(jobs, listeners):
        assert listener.done
        for i, image in enumerate(imgs):
            try:
                expected = Pipeline.parse(specs).apply(image)
            except Exception as exc:  # noqa: BLE001 - the cluster must report the same failure
                assert i in listener.errors and type(exc).__name__ != "", listener.errors
                continue
            assert np.array_equal(listener.images[i], expected), (specs, i)


@pytest.mark.mpi(min_size=2)
@pytest.mark.timeout(120)
def test_a_failing_tile_on_a_worker_fails_its_image_only():
    rng = np.random.default_rng(1)
    gray, colour = random_image(rng, 40, 40, 1), random_image(rng, 40, 40, 3)
    listeners = run_on_cluster([([colour, gray, colour], ["otsu_threshold"], 10)])
    if MPI.COMM_WORLD.rank != 0:
        return
    (listener,) = listeners
    assert set(listener.errors) == {0, 2}
    assert listener.errors[0][0] == "unsupported_image"
    assert "otsu_threshold: needs a gray image" in listener.errors[0][1]
    assert set(listener.images) == {1}


def test_polling_sleeps_grow_to_the_calm_ceiling_only_when_nothing_waits():
    """Rank 0's loop: right after activity, sleeps stay under the warm ceiling (a transfer may
    be waiting on rank 0's calls into MPI); calm sleeps (only region tasks in flight) grow to
    the calm ceiling, and activity brings them back to the floor."""
    from mpi_imgproc.mpi_transport import Backoff

    backoff = Backoff(floor=1e-6, ceiling=1e-4, warm_ceiling=1e-5, calm_ceiling=4e-4)
    for _ in range(12):
        backoff.sleep()
    assert backoff.delay == pytest.approx(1e-5)  # warm: activity is recent
    for _ in range(12):
        backoff.sleep(calm=True)
    assert backoff.delay == pytest.approx(4e-4)
    backoff.reset()
    assert backoff.delay == pytest.approx(1e-6)

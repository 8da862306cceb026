"""The client API as applications use it, against real ``mpiexec`` clusters.

A background heartbeat keeps the jobs of an application that sleeps or computes; the asyncio
client streams events and exact results; ``map`` keeps a bounded window over any number of
files; a dropped connection comes back with its jobs re-attached; every wait ends and says
why.
"""

from __future__ import annotations

import asyncio
import threading
import time

import cv2
import numpy as np
import pytest
from cluster import running_cluster
from conftest import random_image, write_images

from mpi_imgproc.aio import AsyncClient
from mpi_imgproc.client import (
    Client,
    NothingListening,
    ServerGone,
    ServerTimeout,
)
from mpi_imgproc.errors import InvalidParameter
from mpi_imgproc.pipeline import Pipeline

pytestmark = pytest.mark.timeout(120)
SLOW = ["bilateral:d=15"]  # about 30 ms per 600x600 image on one core, 0.15 s under load
HEAVY = ["bilateral:d=31"]  # about 2.5 times that


@pytest.fixture(scope="module")
def cluster():
    with running_cluster(3, "--max-request-mb", "8") as running:
        yield running


def _busy(seconds: float) -> None:
    """Hold the interpreter in pure Python, as a busy application does."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sum(range(1000))


@pytest.mark.timeout(180)
@pytest.mark.parametrize("pause", [time.sleep, _busy], ids=["sleeps", "computes"])
def test_a_job_survives_an_application_pausing_three_client_timeouts(pause):
    image = random_image(np.random.default_rng(0), 600, 600, 3)
    with running_cluster(2, "--client-timeout", "1") as short:
        with Client(short.address) as client:
            assert client.info()["heartbeat_s"] == pytest.approx(1 / 3)
            assert client.heartbeat_s == pytest.approx(1 / 3)  # learnt, not hard-coded
            # seconds of work (about 80 ms an image on one core of a quiet machine)
            job = client.submit([image] * 128, HEAVY, tile=0)
            pause(3.0)  # no client call at all for 3x the server's --client-timeout
            result = job.result(timeout=120)
    assert result.state == "done" and result.ok, result.message
    assert result.stats["total"] > 2.0  # the job really outlived the client timeout twice
    expected = Pipeline.parse(HEAVY).apply(image)
    assert all(np.array_equal(out, expected) for out in result.images)


def test_the_asyncio_client_streams_events_and_gets_exact_results(cluster):
    images = [random_image(np.random.default_rng(i), 120, 90, 3) for i in range(3)]
    specs = ["gaussian_blur:ksize=5", "invert"]

    async def main():
        async with AsyncClient(cluster.address, timeout=10) as client:
            info = await client.info()
            streamed = await client.submit(images[:1], specs, tile=32)
            events = [event async for event in streamed.events(timeout=60)]
            jobs = [await client.submit([im], specs, tile=16) for im in images]
            results = await asyncio.gather(*(job.result(timeout=60) for job in jobs))
            return info, events, results

    info, events, results = asyncio.run(main())
    assert info["ranks"] == 3
    kinds = [event.type for event in events]
    assert kinds[-1] == "done" and kinds.count("result") == 1 and "progress" in kinds
    reference = Pipeline.parse(specs)
    got = next(event for event in events if event.type == "result").image()
    assert np.array_equal(got, reference.apply(images[0]))
    for image, result in zip(images, results):
        assert result.ok and np.array_equal(result.images[0], reference.apply(image))


def test_asyncio_waits_do_not_block_the_event_loop(cluster):
    image = random_image(np.random.default_rng(1), 600, 600, 3)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        async with AsyncClient(cluster.address) as client:
            task = asyncio.create_task(ticker())
            job = await client.submit([image] * 8, HEAVY, tile=0)  # about 0.3 s or more
            result = await job.result(timeout=60)
            task.cancel()
        return result, ticks

    result, ticks = asyncio.run(main())
    assert result.ok and ticks > 10


def test_map_over_40_files_with_window_2_yields_each_once_and_holds_2_jobs(cluster, tmp_path):
    files = write_images(tmp_path / "in", 40, size=(24, 32))
    seen_by_server: list[int] = []
    stop = threading.Event()

    def watch() -> None:  # another client samples the server's queue meanwhile
        with Client(cluster.address, timeout=10) as observer:
            while not stop.is_set():
                seen_by_server.append(observer.info()["queue"]["jobs"])
                time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    submitted: list[list[int]] = []
    try:
        with Client(cluster.address) as client:
            stream = client.map(
                files, ["invert"], window=2, chunk=3, result="png",
                on_submit=lambda job, indices: submitted.append(indices),
            )  # fmt: skip
            items = []
            for item in stream:
                assert stream.in_flight <= 2
                items.append(item)
    finally:
        stop.set()
        watcher.join(timeout=30)
    assert sorted(item.index for item in items) == list(range(40))  # each exactly once
    assert all(item.ok for item in items), [item.error for item in items if not item.ok]
    assert stream.most_in_flight == 2 and len(stream.jobs) == len(submitted) == 14
    assert seen_by_server and max(seen_by_server) <= 2
    for item in items:
        source = cv2.imread(str(files[item.index]), cv2.IMREAD_UNCHANGED)
        assert item.name == files[item.index].name
        assert np.array_equal(item.image(), 255 - source)


def test_map_yields_unreadable_and_oversized_inputs_as_errors_and_goes_on(cluster, tmp_path):
    good = write_images(tmp_path / "in", 3, size=(20, 20))
    huge = np.zeros((1800, 1800, 3), np.uint8)  # 9.7 MB raw: over --max-request-mb 8 alone
    inputs = [good[0], tmp_path / "missing.png", huge, good[1], tmp_path, good[2]]
    with Client(cluster.address, shared_memory=False) as client:  # shared memory: no limit
        items = sorted(client.map(inputs, ["invert"], window=1, chunk=2), key=lambda i: i.index)
    assert [item.index for item in items] == list(range(6))
    codes = [item.error[0] if item.error else "ok" for item in items]
    assert codes == ["ok", "image_read_error", "limit_exceeded", "ok", "image_read_error", "ok"]
    assert "--max-request-mb" in items[2].error[1]


def test_map_checks_its_window_up_front(cluster):
    with Client(cluster.address) as client:
        with pytest.raises(InvalidParameter, match="window must be an integer >= 1"):
            client.map([], ["invert"], window=0)


def test_leaving_a_map_early_cancels_its_jobs_in_flight(cluster):
    image = random_image(np.random.default_rng(2), 600, 600, 3)
    with Client(cluster.address) as client, Client(cluster.address) as observer:
        with client.map([image] * 12, SLOW, window=2, chunk=2, tile=0) as stream:
            next(stream)
        deadline = time.monotonic() + 20
        while observer.info()["queue"]["jobs"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert observer.info()["queue"]["jobs"] == 0


def test_a_job_completes_after_the_client_reopens_its_connection(cluster):
    image = random_image(np.random.default_rng(3), 600, 600, 3)
    with Client(cluster.address) as client:
        job = client.submit([image] * 4, SLOW, tile=0)
        client.reconnect()  # a new socket, a new identity at the server's ROUTER
        result = job.result(timeout=60)
    assert result.state == "done" and result.ok, (result.message, result.errors)
    expected = Pipeline.parse(SLOW).apply(image)
    assert all(np.array_equal(out, expected) for out in result.images)


def test_after_an_automatic_reconnect_the_client_reattaches_its_jobs(cluster):
    image = random_image(np.random.default_rng(4), 600, 600, 3)
    with Client(cluster.address, timeout=10) as client:
        job = client.submit([image] * 4, SLOW, tile=0)
        client.send_raw([b"x" * (9 * 2**20)])  # over --max-request-mb 8: the server cuts us off
        with pytest.raises(ServerGone, match="size limit"):
            client.info()  # the request in flight is lost with the connection
        result = job.result(timeout=60)  # ZeroMQ reconnects; the client re-attaches the job
        assert client.info()["ranks"] == 3
    assert result.state == "done", result.message
    _exact_or_lost(result, Pipeline.parse(SLOW).apply(image))


def test_attach_from_another_async_client_takes_the_job_over(cluster):
    image = random_image(np.random.default_rng(5), 600, 600, 3)
    first = Client(cluster.address)
    job = first.submit([image] * 3, SLOW, tile=0)
    ticket = (job.id, job.token)
    first.close()

    async def main():
        async with AsyncClient(cluster.address) as second:
            return await (await second.attach(*ticket)).result(timeout=60)

    result = asyncio.run(main())
    assert result.state == "done" and len(result.images) == 3
    _exact_or_lost(result, Pipeline.parse(SLOW).apply(image))


def _exact_or_lost(result, expected: np.ndarray) -> None:
    """Every image came back exact, or is reported lost with the old connection; most came."""
    for index, out in enumerate(result.images):
        if out is None:
            assert result.errors[index][0] == "lost", result.errors
        else:
            assert np.array_equal(out, expected)
    assert sum(out is not None for out in result.images) >= len(result.images) - 1


def test_a_result_wait_that_runs_out_says_so_and_the_job_goes_on(cluster):
    image = random_image(np.random.default_rng(6), 600, 600, 3)
    with Client(cluster.address) as client:
        job = client.submit([image] * 16, HEAVY, tile=0)  # over 0.6 s on two workers
        with pytest.raises(ServerTimeout, match=r"not done within 0.2 s.*connected"):
            job.result(timeout=0.2)
        assert job.result(timeout=60).ok


def test_one_client_serves_many_threads_at_once(cluster):
    images = [random_image(np.random.default_rng(10 + i), 64, 48, 3) for i in range(6)]
    failures: list[BaseException] = []
    with Client(cluster.address) as client:

        def work(image: np.ndarray) -> None:
            try:
                for _ in range(3):
                    result = client.submit([image], ["median_blur:ksize=5"], tile=16).result(60)
                    assert np.array_equal(result.images[0], cv2.medianBlur(image, 5))
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                failures.append(exc)

        threads = [threading.Thread(target=work, args=(image,)) for image in images]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=100)
    assert not failures, failures


def test_nothing_listening_is_named_by_the_asyncio_client_too():
    async def main():
        async with AsyncClient("tcp://127.0.0.1:9", timeout=1) as client:
            await client.info()

    with pytest.raises(NothingListening, match="nothing is listening"):
        asyncio.run(main())


def test_a_closed_client_says_so():
    client = Client("tcp://127.0.0.1:9", timeout=1)
    client.close()
    with pytest.raises(Exception, match="closed"):
        client.info()

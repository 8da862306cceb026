"""The server against hostile and careless requests: each trigger that once hung or bloated it.

Every test talks to a real ``mpiexec`` cluster over real ZeroMQ sockets and, after the attack,
checks that the server still answers another client and still computes exactly.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import psutil
import pytest
import zmq
from cluster import mpi_command, running_cluster
from conftest import random_image

from mpi_imgproc.client import Client, NothingListening, ServerError, ServerGone
from mpi_imgproc.pipeline import Pipeline

pytestmark = pytest.mark.timeout(120)
CLI = [sys.executable, "-m", "mpi_imgproc.cli"]


@pytest.fixture(scope="module")
def cluster():
    with running_cluster(3, "--max-request-mb", "8") as running:
        yield running


@pytest.fixture
def dealer(cluster):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.address)
    yield sock
    sock.close()


def rank0(cluster) -> psutil.Process:
    return psutil.Process(cluster.rank0_pid)


def ask(sock, header: dict, *frames: bytes, timeout_ms: int = 10000) -> dict:
    sock.send_multipart([json.dumps({"v": 2, **header}).encode(), *frames])
    assert sock.poll(timeout_ms), "no reply: the server hangs"
    return json.loads(sock.recv_multipart()[0])


def still_serving(cluster) -> None:
    """Another client's info is answered and a normal job is exact."""
    image = random_image(np.random.default_rng(0), 41, 37, 3)
    with Client(cluster.address, timeout=10) as client:
        assert client.info()["ranks"] == 3
        result = client.submit([image], ["gaussian_blur:ksize=5"], tile=16).result(timeout=30)
    assert np.array_equal(result.images[0], cv2.GaussianBlur(image, (5, 5), 0))


RAW = {"name": "a", "encoding": "raw", "shape": [2, 3], "dtype": "uint8", "size": 6}


@pytest.mark.parametrize(
    "header",
    [
        {"type": "status", "job": ["j1"], "token": "t"},
        {"type": "cancel", "job": {"id": "j1"}, "token": "t"},
        {
            "type": "submit",
            "pipeline": [{"op": "gaussian_blur", "params": {"ksize": [3]}}],
            "images": [RAW],
        },
        {
            "type": "submit",
            "pipeline": [{"op": "gaussian_blur", "params": {"ksize": None}}],
            "images": [RAW],
        },
        {
            "type": "submit",
            "pipeline": [{"op": "gaussian_blur", "params": {"ksize": {}}}],
            "images": [RAW],
        },
        {"type": "submit", "pipeline": ["invert"], "images": [{**RAW, "shape": [True, 3]}]},
        {
            "type": "submit",
            "pipeline": ["invert"],
            "images": [{**RAW, "shape": [2**31 - 1, 2**31 - 1, 4], "size": 0}],
        },
        {"type": "submit", "pipeline": ["invert"], "images": [{**RAW, "shape": [2**40, 2]}]},
        {
            "type": "submit",
            "pipeline": ["resize:width=99999999,height=99999999"],
            "images": [RAW],
            "tile": 2**70,
        },
    ],
)
def test_a_hostile_field_gets_an_error_and_the_server_keeps_serving(cluster, dealer, header):
    reply = ask(dealer, {**header, "req": "x"})
    assert reply["type"] == "error" and reply["req"] == "x"
    assert reply["code"] in ("malformed", "invalid_parameter", "limit_exceeded"), reply
    still_serving(cluster)


def test_json_nested_100000_deep_is_malformed_not_fatal(cluster, dealer):
    deep = b'{"v":2,"type":"info","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    dealer.send(deep)
    assert dealer.poll(10000)
    assert json.loads(dealer.recv())["code"] == "malformed"
    still_serving(cluster)


@pytest.mark.parametrize("tile", [0, 2])
def test_16_bit_raw_images_go_through_mpi_whatever_their_alignment(cluster, tile):
    tiny = np.arange(18, dtype=np.uint16).reshape(2, 3, 3) * 3000  # lands at an odd address
    big = random_image(np.random.default_rng(1), 61, 47, 3, np.uint16)
    with Client(cluster.address, timeout=10) as client:
        result = client.submit([tiny, big], ["gaussian_blur:ksize=3"], tile=tile).result(30)
    for image, out in zip([tiny, big], result.images):
        assert np.array_equal(out, cv2.GaussianBlur(image, (3, 3), 0))


def test_tile_1_on_a_large_image_is_bounded_in_tiles_and_memory(cluster):
    image = random_image(np.random.default_rng(2), 2000, 2000, 1)
    before = rank0(cluster).memory_info().rss
    with Client(cluster.address, timeout=10) as client:
        job = client.submit([image], ["gaussian_blur:ksize=3"], tile=1)
        result = job.result(timeout=90)
    grown = rank0(cluster).memory_info().rss - before
    assert np.array_equal(result.images[0], cv2.GaussianBlur(image, (3, 3), 0))
    assert result.stats["ranks"] and sum(r["tiles"] for r in result.stats["ranks"].values()) <= 4096
    assert grown < 300 * 2**20, f"rank 0 grew by {grown / 2**20:.0f} MiB"


def test_a_request_over_the_size_limit_is_refused_from_its_header(cluster, dealer):
    before = rank0(cluster).memory_info().rss
    descs = [{"name": f"i{i}", "size": 8 * 2**20} for i in range(67)]  # 536 MiB declared
    reply = ask(dealer, {"type": "submit", "pipeline": ["invert"], "images": descs})
    assert reply["code"] == "limit_exceeded" and "--max-request-mb" in reply["message"]
    assert rank0(cluster).memory_info().rss - before < 50 * 2**20
    still_serving(cluster)


def test_a_frame_over_the_limit_is_dropped_unread_and_the_client_is_told(cluster):
    before = rank0(cluster).memory_info().rss
    with Client(cluster.address, timeout=10) as client:
        client.info()
        client.send_raw([b"x" * (9 * 2**20)])  # over --max-request-mb 8: the server cuts it off
        with pytest.raises(ServerGone, match="size limit"):
            client.info()
    assert rank0(cluster).memory_info().rss - before < 50 * 2**20
    still_serving(cluster)


def test_pixels_are_limited_from_the_header_before_decoding(tmp_path):
    from PIL import Image

    path = tmp_path / "huge.png"
    Image.new("1", (30000, 30000)).save(path)  # a few hundred KB, 900 megapixels
    with running_cluster(2, "--max-pixels", "400000000") as cluster:
        ranks = cluster.ranks()
        before = {p.pid: p.memory_info().rss for p in ranks}
        with Client(cluster.address, timeout=10) as client:
            for tile in (0, 512):
                result = client.submit([path], ["invert"], tile=tile).result(timeout=60)
                assert result.errors[0][0] == "limit_exceeded", result.errors
                assert "limit of 400000000 pixels" in result.errors[0][1]
        grown = max(p.memory_info().rss - before[p.pid] for p in ranks)
        assert grown < 200 * 2**20, f"a rank grew by {grown / 2**20:.0f} MiB"


def test_an_op_whose_output_is_over_the_pixel_limit_fails_before_it_runs(cluster):
    """resize to 100000x100000 would be 10^10 pixels (30 GB): refused, nothing allocated."""
    image = random_image(np.random.default_rng(3), 100, 100, 3)
    ranks = cluster.ranks()
    before = {p.pid: p.memory_info().rss for p in ranks}
    with Client(cluster.address, timeout=10) as client:
        for tile in (0, 16):
            result = client.submit(
                [image, image], ["resize:width=100000,height=100000"], tile=tile
            ).result(30)
            assert result.state == "done" and len(result.errors) == 2
            assert all("resize: output 100000x100000" in m for _, m in result.errors.values())
    grown = max(p.memory_info().rss - before[p.pid] for p in ranks)
    assert grown < 100 * 2**20, f"a rank grew by {grown / 2**20:.0f} MiB"


def test_a_client_that_never_reads_cannot_grow_the_server(cluster, dealer):
    before = rank0(cluster).memory_info().rss
    sent = 0
    for _ in range(20000):
        try:
            dealer.send_multipart([b'{"v":2,"type":"info"}'], zmq.NOBLOCK)
            sent += 1
        except zmq.Again:  # ZeroMQ's own back-pressure: the pipe to the server is full
            time.sleep(0.001)
    assert sent > 1000
    time.sleep(1.0)
    still_serving(cluster)
    assert rank0(cluster).memory_info().rss - before < 100 * 2**20


def test_only_the_owner_can_see_or_cancel_a_job(cluster):
    image = random_image(np.random.default_rng(4), 800, 800, 3)
    with Client(cluster.address) as owner, Client(cluster.address) as other:
        job = owner.submit([image] * 2, ["bilateral:d=9"], tile=0)
        for call in (other.status, other.cancel):
            with pytest.raises(ServerError, match="of yours") as info:
                call(job.id, "x" * 22)
            assert info.value.code == "unknown_job"
        assert len(job.id) >= 22 and len(job.token) >= 22  # 128 random bits each
        assert other.status(job.id, job.token)["job"] == job.id  # the token is the proof
        assert job.result(timeout=60).ok


def test_a_client_can_reattach_to_its_job_after_reconnecting(cluster):
    """Results the server had sent before the first connection closed are gone with it, so
    the job must outlast the close: a few tenths of a second of work per image, against the
    milliseconds from ``accepted`` to the close."""
    image = random_image(np.random.default_rng(5), 800, 800, 3)
    pipeline = ["gaussian_blur:ksize=31"] * 8
    first = Client(cluster.address)
    job = first.submit([image] * 3, pipeline, tile=0)
    ticket = (job.id, job.token)
    first.close()
    with Client(cluster.address) as second:
        again = second.attach(*ticket)
        result = again.result(timeout=60)
    assert result.state == "done"
    got = [im for im in result.images if im is not None]
    expected = Pipeline.parse(pipeline).apply(image)
    assert got and all(np.array_equal(g, expected) for g in got), result.errors


def test_nothing_listening_is_named_as_such():
    with Client("tcp://127.0.0.1:9", timeout=2) as client:
        with pytest.raises(NothingListening, match="nothing is listening"):
            client.info()


def test_a_dead_cluster_ends_a_waiting_result_with_server_gone():
    """Killed while it computes a job that has seconds to go (see the dead-worker test)."""
    image = random_image(np.random.default_rng(6), 1500, 1500, 3)
    with running_cluster(3) as dying, Client(dying.address) as client:
        job = client.submit([image] * 12, ["bilateral:d=15"], tile=0)
        _wait_until_a_worker_computes(dying)
        for proc in dying.ranks():
            proc.kill()  # every rank: the cluster is gone
        started = time.monotonic()
        with pytest.raises(ServerGone):
            job.result()  # no timeout given: the client still must not wait forever
        assert time.monotonic() - started < 15


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--bind", "garbage"], "not an endpoint"),
        (["--bind", "tcp://0.0.0.0:*"], "without --curve-keys"),
        (["--curve-keys", "/nonexistent/keys"], "no server.key_secret"),
        (["--workers-per-rank", "-1"], "must be >= 1"),
        (["--client-timeout", "0"], "must be >= 1"),
        (["--max-request-mb", "-1"], "must be > 0"),
    ],
)
def test_bad_server_flags_end_in_one_line_and_exit_2(args, says):
    cmd = mpi_command(3, "mpi_imgproc.server", "--bind", "tcp://127.0.0.1:*", *args)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if says in line]
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr and "Abort" not in done.stderr


def test_a_port_in_use_ends_in_one_line_and_exit_2(cluster):
    cmd = mpi_command(3, "mpi_imgproc.server", "--bind", cluster.address)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Address already in use" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_insecure_allows_binding_beyond_loopback():
    with running_cluster(2, "--bind", "tcp://0.0.0.0:*", "--insecure") as open_cluster:
        port = open_cluster.address.rsplit(":", 1)[1]
        with Client(f"tcp://127.0.0.1:{port}", timeout=10) as client:
            assert client.info()["ranks"] == 2


def test_secret_keys_are_written_0600(tmp_path):
    done = subprocess.run([*CLI, "keys", str(tmp_path / "k")], capture_output=True, timeout=30)
    assert done.returncode == 0
    secrets = list((tmp_path / "k").glob("*.key_secret"))
    assert len(secrets) == 2 and all(p.stat().st_mode & 0o777 == 0o600 for p in secrets)


def test_sigterm_during_a_job_exits_0_and_the_client_hears_why():
    image = random_image(np.random.default_rng(7), 1500, 1500, 3)
    with running_cluster(3) as stopping, Client(stopping.address) as client:
        job = client.submit([image] * 12, ["bilateral:d=15"], tile=0)
        _wait_until_a_worker_computes(stopping)  # not a fixed wait a fast job could outlive
        assert stopping.terminate(signal.SIGTERM, timeout=15) == 0
        result = job.result(timeout=10)
    assert result.state == "failed" and "shutting down" in result.message


def test_pipeline_spec_check_is_the_same_everywhere():
    with pytest.raises(Exception, match="ksize"):
        Pipeline.from_json([{"op": "gaussian_blur", "params": {"ksize": None}}])


def test_a_dead_worker_rank_reaches_the_client_as_server_gone_in_bounded_time():
    """MPICH's launcher ends the whole job when one rank dies (docs/fault-tolerance.md): the
    client must hear of it within seconds, not wait forever.  The job (a dozen images of a few
    tenths of a second each, on two workers) must still be running when the worker dies: it is
    killed as soon as the workers compute, not after a fixed sleep that a fast job outlives."""
    image = random_image(np.random.default_rng(8), 1500, 1500, 3)
    with running_cluster(3) as dying, Client(dying.address) as client:
        job = client.submit([image] * 12, ["bilateral:d=15"], tile=0)
        _wait_until_a_worker_computes(dying)
        dying.workers()[0].kill()
        started = time.monotonic()
        with pytest.raises(ServerGone):
            job.result()
        assert time.monotonic() - started < 15
        assert dying.proc.wait(timeout=15) != 0


@pytest.mark.parametrize("tile", [0, 200])
def test_a_worker_that_dies_has_its_tasks_run_by_the_others(tile):
    """Under -disable-auto-cleanup rank 0 outlives a killed worker and finishes every job."""
    rng = np.random.default_rng(9)
    images = [random_image(rng, 1000, 1000, 3) for _ in range(10)]
    with running_cluster(4, survive=True) as cluster, Client(cluster.address) as client:
        job = client.submit(images, ["bilateral:d=15"], tile=tile)
        _wait_until_a_worker_computes(cluster)
        cluster.workers()[0].kill()
        result = job.result(timeout=120)
        assert result.state == "done" and not result.errors, result.errors
        for image, out in zip(images, result.images):
            assert np.array_equal(out, Pipeline.parse(["bilateral:d=15"]).apply(image))
        deadline = time.monotonic() + 15
        while client.info()["queue"]["workers_alive"] == 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.info()["queue"]["workers_alive"] == 2
        output = cluster.drain()
        assert re.search(r"worker rank \d is gone; [1-9]\d* of its tasks go to the 2", output), (
            output
        )
        again = client.submit([images[0][:60, :60]], ["invert"]).result(timeout=30)
        assert again.ok
        code = cluster.terminate(signal.SIGTERM, timeout=20)
    assert code != 0  # mpiexec reports the dead rank's status


def _wait_until_a_worker_computes(cluster) -> None:
    workers = cluster.workers()
    for p in workers:
        p.cpu_percent()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        time.sleep(0.3)
        if max(p.cpu_percent() for p in workers) > 25:
            return
    raise AssertionError("no worker started computing")


def test_declared_but_never_uploaded_data_is_bounded_per_client(cluster, dealer):
    before = rank0(cluster).memory_info().rss
    codes = []
    for i in range(4):  # 8 MiB limit: two jobs of 7 MiB may wait, the third is refused
        desc = {"name": f"i{i}", "size": 7 * 2**20}
        codes.append(ask(dealer, {"type": "submit", "pipeline": ["invert"], "images": [desc]}))
    assert [c["type"] for c in codes] == ["accepted", "accepted", "error", "error"]
    assert "finish those uploads first" in codes[2]["message"]
    assert rank0(cluster).memory_info().rss - before < 50 * 2**20
    for accepted in codes[:2]:  # the first reply is the job's done, then the cancelled
        ticket = {"job": accepted["job"], "token": accepted["token"]}
        assert ask(dealer, {"type": "cancel", **ticket})["type"] in ("done", "cancelled")

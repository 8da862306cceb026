"""End-to-end: a real ``mpiexec`` server, real ZeroMQ on 127.0.0.1, real files and clients.

Every test has a timeout, and ``running_cluster`` kills the process group afterwards.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest
from cluster import mpi_command, running_cluster
from conftest import random_image, write_images

from mpi_imgproc.client import Client, CurveRefused, RequestTooLarge, ServerError
from mpi_imgproc.pipeline import Pipeline

pytestmark = pytest.mark.timeout(120)
CLI = [sys.executable, "-m", "mpi_imgproc.cli"]

PIPELINES = [
    ["grayscale", "gaussian_blur:ksize=9"],
    ["bilateral:d=7", "sharpen:amount=0.5"],
    ["grayscale", "equalize_hist", "otsu_threshold:invert=true"],
    ["median_blur:ksize=5", "canny:low=50,high=120"],
    ["resize:scale=0.7,interpolation=lanczos", "erode:ksize=3,iterations=2", "rotate:angle=90"],
    ["sobel:ksize=5", "laplacian", "invert", "flip:axis=both"],
    # one chain (mpi_imgproc.chain): 30 rows to 27 has a period of 9 rows
    ["crop:x=1,y=1,width=30,height=30", "resize:scale=0.9,interpolation=linear", "sharpen"],
]


@pytest.fixture(scope="module")
def cluster3():
    with running_cluster(3) as cluster:
        yield cluster


def test_cluster_output_is_bit_identical_to_the_local_reference(cluster3):
    rng = np.random.default_rng(5)
    images = [
        random_image(rng, 97, 131, 3),
        random_image(rng, 64, 33, 1),
        random_image(rng, 40, 50, 3, np.uint16),
    ]
    with Client(cluster3.address) as client:
        for specs in PIPELINES:
            for tile in (0, 7, 32, "auto"):
                result = client.submit(images, specs, tile=tile).result(timeout=60)
                for image, out in zip(images, result.images):
                    try:
                        expected = Pipeline.parse(specs).apply(image)
                    except Exception:  # noqa: BLE001 - e.g. bilateral on 16-bit
                        continue
                    assert out is not None, (specs, tile, result.errors)
                    assert np.array_equal(out, expected), (specs, tile, image.shape)


def test_progress_streams_as_tiles_finish(cluster3):
    image = random_image(np.random.default_rng(1), 300, 300, 3)
    with Client(cluster3.address) as client:
        job = client.submit([image], ["gaussian_blur:ksize=15"], tile=32)
        events = list(job.events(timeout=60))
    kinds = [e.type for e in events]
    assert kinds[-1] == "done" and "result" in kinds
    progress = [e.header for e in events if e.type == "progress"]
    assert progress and progress[-1]["tiles_done"] == progress[-1]["tiles_total"] == 100
    assert events[-1].header["ok"] == 1
    stats = events[-1].header["stats"]  # when each task ran, for timelines
    assert len(stats["tasks"]) == 100 and {t[0] for t in stats["tasks"]} <= {1, 2}
    assert all(0 <= start <= end <= stats["total"] for _, start, end in stats["tasks"])


def test_cli_submit_writes_results_and_reports_bad_files(cluster3, tmp_path):
    good = write_images(tmp_path / "in", 3, size=(150, 170))
    bad = tmp_path / "in" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    files = [str(good[0]), str(bad), str(good[1]), str(good[2])]
    cmd = [
        *CLI,
        "submit",
        "--server",
        cluster3.address,
        *files,
        "-o",
        str(tmp_path / "out"),
        "--op",
        "grayscale",
        "--op",
        "box_blur:ksize=5",
        "--tile",
        "40",
        "--format",
        "png",
        "--quiet",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"{bad}: truncated PNG" in result.stderr
    assert "3 of 4 images written" in result.stdout
    local = subprocess.run(
        [
            *CLI,
            "run",
            "--local",
            *map(str, good),
            "-o",
            str(tmp_path / "ref"),
            "--op",
            "grayscale",
            "--op",
            "box_blur:ksize=5",
        ],
        capture_output=True,
        timeout=60,
    )
    assert local.returncode == 0
    for path in good:
        ours = cv2.imread(str(tmp_path / "out" / path.name), cv2.IMREAD_UNCHANGED)
        ref = cv2.imread(str(tmp_path / "ref" / path.name), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(ours, ref)


def test_bad_requests_get_errors_and_the_server_keeps_serving(cluster3):
    image = random_image(np.random.default_rng(2), 20, 20, 3)
    raw = {"name": "x", "encoding": "raw", "shape": [20, 20, 3], "dtype": "uint8", "size": 1200}
    with Client(cluster3.address) as client:
        with pytest.raises(ServerError, match="unknown op 'blurr'") as info:
            client.request("submit", pipeline=[{"op": "blurr"}], images=[raw])
        assert info.value.code == "unknown_op"
        with pytest.raises(ServerError, match="gaussian_blur: ksize must be odd, got 4"):
            client.request(
                "submit", pipeline=[{"op": "gaussian_blur", "params": {"ksize": 4}}], images=[raw]
            )
        with pytest.raises(ServerError, match="needs 1200 bytes, but size says 5"):
            client.request("submit", pipeline=["invert"], images=[{**raw, "size": 5}])
        with pytest.raises(ServerError, match="no job 'nope' of yours"):
            client.status("nope", "token")
        result = client.submit([image], ["invert"]).result(timeout=30)
        assert np.array_equal(result.images[0], 255 - image)


def test_an_image_an_op_cannot_take_fails_alone(cluster3):
    rng = np.random.default_rng(3)
    gray, colour = random_image(rng, 30, 30, 1), random_image(rng, 30, 30, 3)
    with Client(cluster3.address) as client:
        result = client.submit([gray, colour, gray], ["otsu_threshold"], tile=8).result(timeout=30)
    assert result.state == "done" and set(result.errors) == {1}
    code, message = result.errors[1]
    assert code == "unsupported_image" and "otsu_threshold: needs a gray image, got BGR" in message
    assert result.images[0] is not None and result.images[2] is not None


def test_concurrent_clients_all_get_exact_results(cluster3):
    failures: list[str] = []

    def one_client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        images = [random_image(rng, 120 + seed, 90, 3) for _ in range(3)]
        specs = PIPELINES[seed % len(PIPELINES)]
        try:
            with Client(cluster3.address) as client:
                result = client.submit(images, specs, tile=25).result(timeout=90)
            for image, out in zip(images, result.images):
                if not np.array_equal(out, Pipeline.parse(specs).apply(image)):
                    failures.append(f"client {seed}: mismatch")
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            failures.append(f"client {seed}: {exc!r}")

    threads = [threading.Thread(target=one_client, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=100)
    assert not failures


def test_cancel_ends_a_running_job(cluster3):
    image = random_image(np.random.default_rng(4), 1500, 1500, 3)
    with Client(cluster3.address) as client:
        job = client.submit([image] * 4, ["bilateral:d=15", "median_blur:ksize=9"], tile=100)
        reply = job.cancel()
        assert reply["state"] == "cancelled"
        result = job.result(timeout=30)
        assert result.state == "cancelled"
        assert job.status()["state"] == "cancelled"
        after = client.submit([image[:50, :50]], ["invert"]).result(timeout=30)
        assert after.ok


def test_a_client_that_disappears_has_its_jobs_cancelled_after_the_client_timeout():
    image = random_image(np.random.default_rng(6), 1500, 1500, 3)
    with running_cluster(3, "--client-timeout", "2") as cluster:
        leaving = Client(cluster.address)
        job = leaving.submit([image] * 4, ["bilateral:d=15"], tile=100)
        leaving.close()
        with Client(cluster.address) as client:  # holds the ticket, so it may look
            deadline = time.monotonic() + 30
            state = client.status(job.id, job.token)["state"]
            while state in ("queued", "running") and time.monotonic() < deadline:
                time.sleep(0.2)
                state = client.status(job.id, job.token)["state"]
            assert state == "cancelled"
            assert client.info()["queue"]["jobs"] == 0


def test_info_reports_ranks_hosts_engines_and_versions(cluster3):
    with Client(cluster3.address) as client:
        info = client.info()
    assert info["ranks"] == 3 and info["workers"] == 2
    assert sum(info["hosts"].values()) == 3
    assert [e["engine"] for e in info["engines"]] == ["threads", "threads"]
    assert info["versions"]["protocol"] == "2" and "MPICH" in info["versions"]["mpi"]


def test_idle_ranks_sleep_instead_of_spinning():
    with running_cluster(4) as cluster:
        ranks = cluster.ranks()
        assert len(ranks) == 4
        time.sleep(1.0)  # let start-up settle
        for p in ranks:
            p.cpu_percent()
        time.sleep(5.0)
        usage = [p.cpu_percent() for p in ranks]
    assert max(usage) < 2.0, usage


def test_four_ranks_are_exact_and_sigterm_stops_every_rank_cleanly():
    image = random_image(np.random.default_rng(8), 211, 157, 3)
    specs = ["grayscale", "gaussian_blur:ksize=7", "equalize_hist"]
    with running_cluster(4) as cluster:
        with Client(cluster.address) as client:
            result = client.submit([image], specs, tile=16).result(timeout=60)
            assert np.array_equal(result.images[0], Pipeline.parse(specs).apply(image))
            big = random_image(np.random.default_rng(9), 2000, 2000, 3)
            job = client.submit([big] * 3, ["bilateral:d=15"], tile=100)
            next(e for e in job.events(timeout=30) if e.type == "progress")
            started = time.monotonic()
            code = cluster.terminate(signal.SIGTERM, timeout=15)
            elapsed = time.monotonic() - started
            final = job.result(timeout=5)
    assert code == 0, cluster.drain()
    assert elapsed < 10
    assert final.state == "failed" and "shutting down" in final.message
    assert "server stopped" in cluster.drain()


@pytest.mark.parametrize("ranks", [1, 2])
def test_one_and_two_ranks_serve(ranks):
    image = random_image(np.random.default_rng(10), 50, 70, 3)
    with running_cluster(ranks) as cluster:
        if ranks == 1:
            assert "alone" in "".join(cluster.output)
        with Client(cluster.address) as client:
            result = client.submit([image], ["sharpen", "dilate"], tile=16).result(timeout=60)
    assert np.array_equal(result.images[0], Pipeline.parse(["sharpen", "dilate"]).apply(image))


def test_limits_reject_oversize_requests_and_images():
    small = random_image(np.random.default_rng(11), 20, 20, 1)
    large = random_image(np.random.default_rng(11), 100, 100, 1)
    with running_cluster(2, "--max-pixels", "5000", "--max-request-mb", "0.02") as cluster:
        huge = random_image(np.random.default_rng(11), 600, 600, 1)  # over 256 KiB: shm
        for shared, big in ((True, huge), (False, large)):  # shared memory, or the socket
            with Client(cluster.address, shared_memory=shared) as client:
                result = client.submit([small, big, small], ["invert"]).result(timeout=30)
                assert set(result.errors) == {1}
                assert result.errors[1][0] == "limit_exceeded"
                assert "more than the server's limit of 5000 pixels" in result.errors[1][1]
        with Client(cluster.address, shared_memory=False) as client:  # its bytes are sent
            with pytest.raises(RequestTooLarge, match="over the server's limit"):
                client.submit([large] * 3, ["invert"])  # refused before sending
            descs = [{"name": "l", "encoding": "raw", "shape": [100, 100], "dtype": "uint8"}] * 3
            descs = [{**d, "size": 10000} for d in descs]
            with pytest.raises(ServerError, match="over the limit") as info:
                client.request("submit", pipeline=["invert"], images=descs)
            assert info.value.code == "limit_exceeded"


def test_an_engine_that_cannot_run_ends_every_rank_with_one_line():
    """No GPU here: every rank checks its engine first, and all exit 2 with one line."""
    pytest.importorskip("mpi4py")
    try:
        import cupy  # noqa: F401

        pytest.skip("CuPy is installed: the gpu engine may start here")
    except ImportError:
        pass
    cmd = mpi_command(3, "mpi_imgproc.server", "--bind", "tcp://127.0.0.1:*", "--engine", "gpu")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2  # found by every rank before the cluster starts
    lines = [line for line in result.stderr.splitlines() if "CuPy" in line]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr


def test_curve_allows_known_clients_and_refuses_others(tmp_path):
    keys, strangers = tmp_path / "keys", tmp_path / "strangers"
    for folder in (keys, strangers):
        made = subprocess.run(
            [*CLI, "keys", str(folder)],
            capture_output=True,
            timeout=30,
        )
        assert made.returncode == 0
    # The stranger has a valid key pair and knows the server's public key, but is not allowed.
    (strangers / "server.key").write_bytes((keys / "server.key").read_bytes())
    image = random_image(np.random.default_rng(12), 10, 10, 1)
    with running_cluster(2, "--curve-keys", str(keys)) as cluster:
        with Client(cluster.address, curve_keys=keys) as client:
            assert client.submit([image], ["invert"]).result(timeout=30).ok
        with Client(cluster.address, curve_keys=strangers, timeout=5) as stranger:
            with pytest.raises(CurveRefused, match="not among the server's allowed keys"):
                stranger.info()
        with Client(cluster.address, timeout=5) as plain:
            with pytest.raises(CurveRefused, match="requires CURVE"):
                plain.info()


def test_cli_submit_streams_a_folder_through_a_bounded_window(cluster3, tmp_path):
    good = write_images(tmp_path / "in", 30, size=(40, 50), suffix=".jpg")
    (tmp_path / "in" / "zero.jpg").write_bytes(b"")
    stats = tmp_path / "stats.json"
    cmd = [
        *CLI,
        "submit",
        "--server",
        cluster3.address,
        str(tmp_path / "in"),
        "-o",
        str(tmp_path / "out"),
        "--op",
        "invert",
        "--chunk",
        "4",
        "--window",
        "2",
        "--quiet",
        "--stats-json",
        str(stats),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert result.returncode == 1
    assert "zero.jpg: empty file" in result.stderr
    assert "30 of 31 images written" in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in good)
    recorded = __import__("json").loads(stats.read_text())
    assert len(recorded["jobs"]) == 8 and recorded["paths"] == {"whole": 30}
    ours = cv2.imread(str(tmp_path / "out" / good[0].name), cv2.IMREAD_UNCHANGED)
    source = cv2.imread(str(good[0]), cv2.IMREAD_UNCHANGED)
    expected = cv2.imdecode(cv2.imencode(".jpg", 255 - source)[1], cv2.IMREAD_UNCHANGED)
    assert np.array_equal(ours, expected)


@pytest.mark.parametrize("engine", ["sequential", "processes"])
def test_other_engines_serve_exactly_inside_mpi_ranks(engine):
    """The processes engine starts helper processes inside an MPI rank: they must not try to
    join the MPI job."""
    image = random_image(np.random.default_rng(13), 120, 90, 3)
    specs = ["median_blur:ksize=5", "sharpen"]
    args = ("--engine", engine, "--workers-per-rank", "2")
    with running_cluster(2, *args) as cluster, Client(cluster.address) as client:
        result = client.submit([image, image[:40]], specs, tile=32).result(timeout=60)
        info = client.info()
    assert result.ok and info["engines"][0]["engine"] == engine
    for out, src in zip(result.images, [image, image[:40]]):
        assert np.array_equal(out, Pipeline.parse(specs).apply(src))


def test_a_long_job_of_a_client_that_heartbeats_is_not_dropped():
    """Progress keeps arriving, but the server hears only what the client sends: the client
    must heartbeat anyway, or a job longer than --client-timeout would be cancelled."""
    image = random_image(np.random.default_rng(14), 900, 900, 3)
    with running_cluster(2, "--client-timeout", "1.5") as cluster:
        with Client(cluster.address, heartbeat=0.3) as client:
            started = time.monotonic()
            # about 3 s of work on a quiet machine (16 images took 1.46 s, under the timeout)
            job = client.submit([image] * 32, ["bilateral:d=15", "median_blur:ksize=9"], tile=64)
            result = job.result(timeout=100)
            elapsed = time.monotonic() - started
    assert result.state == "done" and result.ok, result.message
    assert elapsed > 1.5  # the job really did outlast the client timeout


def test_an_image_that_cannot_be_encoded_counts_as_failed(cluster3):
    deep = (np.arange(200 * 150, dtype=np.uint16).reshape(200, 150) * 7).astype(np.uint16)
    with Client(cluster3.address) as client:
        for tile in (0, 64):
            result = client.submit([deep], ["invert"], tile=tile, result="jpg").result(30)
            assert result.errors[0][0] == "image_write_error", tile
            assert "JPEG holds 8-bit images only" in result.errors[0][1]
            final = result.stats
            assert sum(final["paths"].values()) == 0

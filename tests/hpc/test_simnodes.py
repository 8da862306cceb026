"""The cluster across simulated nodes: network namespaces on one bridge, each with its own host
name and address, ranks started by Hydra through the namespace launcher, MPI over TCP.

Rank 0 runs alone on the first node; the results are exact; each node shares its own cores
between its own worker ranks; ``info`` names every host; batch mode works with and without a
shared file system; a CURVE client on another node is served; a worker node cut off mid-job is
buried and its tasks run elsewhere; cutting rank 0's node gives the client an error, not a
hang.  Every test starts and removes its nodes and processes itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import cv2
import numpy as np
import pytest

from mpi_imgproc.bench_nodes import LinkWatch, summarise
from mpi_imgproc.client import Client, ServerGone
from mpi_imgproc.pipeline import Pipeline
from mpi_imgproc.simnodes import (
    NETNS_ETC,
    Link,
    LinkCounters,
    SimNodes,
    SimNodesError,
    run_to_end,
    running_server,
    simulated_nodes,
)

pytestmark = pytest.mark.timeout(120)
OPS = ["gaussian_blur:ksize=5", "bilateral:d=5"]
PLACEMENT = [1, 2, 1]  # rank 0 alone on the first node, two workers on the second, one on the third
CORES = len(os.sched_getaffinity(0))


def noise(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), np.uint8)


def in_node(sim: SimNodes, node: int, code: str, *args: str, timeout: float = 60) -> str:
    """Run Python ``code`` inside node ``node`` (0: the head); its stdout."""
    where = sim.head if node == 0 else sim.nodes[node - 1]
    cmd = where.command(sys.executable, "-c", code, *args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout


# -- the nodes themselves ----------------------------------------------------------------------


def test_a_link_is_parsed_from_rate_and_delay():
    assert Link.parse("10gbit/50us") == Link("10gbit", "50us")
    assert Link.parse("1gbit").bits_per_second == 1e9
    assert Link.parse("none").bits_per_second is None
    with pytest.raises(SimNodesError, match="link rate must look like 1gbit"):
        Link.parse("fast")


def test_each_node_has_its_own_host_name_address_and_cpu_set(can_make_nodes):
    with simulated_nodes(2, cpus=["0", None]) as sim:
        code = "import os, socket; print(socket.gethostname(), len(os.sched_getaffinity(0)))"
        assert in_node(sim, 1, code).split() == [sim.nodes[0].name, "1"]
        assert in_node(sim, 2, code).split() == [sim.nodes[1].name, str(CORES)]
        addresses = subprocess.run(
            ["ip", "netns", "exec", sim.nodes[1].name, "ip", "-4", "-o", "addr"],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        assert f"inet {sim.nodes[1].address}/" in addresses


def test_everything_made_is_removed_after_an_error(can_make_nodes):
    with pytest.raises(RuntimeError, match="inside"):
        with simulated_nodes(2) as sim:
            sleeper = subprocess.Popen(sim.nodes[0].command("sleep", "600"))
            raise RuntimeError("inside")
    assert sleeper.wait(timeout=10) != 0  # killed, not left running in a deleted namespace
    names = [n.name for n in [sim.head, *sim.nodes]]
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert not [n for n in names if n in netns or f" {n}@" in links or f" {n}:" in links]
    assert f" {sim.bridge}:" not in links
    assert not [n for n in names if (NETNS_ETC / n).exists()]


SINK = """
import socket, sys
s = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("ready", flush=True)
conn, _ = s.accept()
total = 0
while chunk := conn.recv(1 << 20):
    total += len(chunk)
print(total, flush=True)
"""
SOURCE = """
import socket, sys, time
data = bytes(int(sys.argv[3]))
with socket.create_connection((sys.argv[1], int(sys.argv[2]))) as s:
    started = time.perf_counter()
    s.sendall(data)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)
print(time.perf_counter() - started)
"""


def test_a_shaped_link_carries_no_faster_than_its_rate(can_make_nodes):
    size = 25_000_000  # 0.2 s at 1 Gbit/s
    with simulated_nodes(2, link=Link("1gbit")) as sim:
        sink = subprocess.Popen(
            sim.nodes[1].command(sys.executable, "-c", SINK, "9100"),
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert sink.stdout.readline().strip() == "ready"
            before = sim.counters()[sim.nodes[0].name]
            seconds = float(in_node(sim, 1, SOURCE, sim.nodes[1].address, "9100", str(size)))
            sent = (sim.counters()[sim.nodes[0].name] - before).sent
            assert int(sink.stdout.readline()) == size
        finally:
            sink.kill()
    assert sent >= size  # every byte went through the first node's link
    assert seconds >= 0.9 * size * 8 / 1e9, f"{size} bytes in {seconds:.3f} s beat 1 Gbit/s"


# -- the server on three nodes ------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(three_nodes, curve_keys):
    """The server with CURVE on nodes 1-3 (ranks 1, 2, 1), threads engine."""
    args = ["--curve-keys", str(curve_keys), "--engine", "threads"]
    with running_server(three_nodes, PLACEMENT, *args) as cluster:
        yield cluster


def test_info_names_each_node_with_its_ranks(three_nodes, server, curve_keys):
    with Client(server.address, curve_keys=curve_keys, timeout=30) as client:
        info = client.info()
    names = [n.name for n in three_nodes.nodes]
    assert info["hosts"] == dict(zip(names, PLACEMENT))
    assert server.address.startswith(f"tcp://{three_nodes.nodes[0].address}:")


def test_each_node_shares_its_own_cores_between_its_workers(three_nodes, server, curve_keys):
    with Client(server.address, curve_keys=curve_keys, timeout=30) as client:
        engines = client.info()["engines"]
    second, third = (n.name for n in three_nodes.nodes[1:])
    per_host = sorted((e["host"], e["workers"]) for e in engines)
    assert per_host == [(second, max(1, CORES // 2))] * 2 + [(third, CORES)]


def test_results_are_exact_and_cross_the_links(three_nodes, server, curve_keys):
    images = [noise(600, 800, seed) for seed in range(3)]
    before = three_nodes.counters()
    with Client(server.address, curve_keys=curve_keys, timeout=30) as client:
        result = client.submit(images, Pipeline.parse(OPS), tile=128).result(timeout=90)
    moved = {name: c - before[name] for name, c in three_nodes.counters().items()}
    assert result.ok, result.errors
    for image, out in zip(images, result.images):
        assert np.array_equal(out, Pipeline.parse(OPS).apply(image))
    pixels = sum(im.nbytes for im in images)
    rank0, second, third = (moved[n.name] for n in three_nodes.nodes)
    assert rank0.received >= 2 * pixels  # the upload, then every tile's result
    assert rank0.sent >= 2 * pixels  # tiles (with halos) out, then the results
    assert second.received + third.received >= pixels  # the tiles, over TCP, not shared memory
    assert second.received and third.received  # both worker nodes got work


CURVE_CLIENT = """
import socket, sys
import numpy as np
from mpi_imgproc.client import Client
from mpi_imgproc.pipeline import Pipeline
address, keys, out = sys.argv[1:4]
image = np.random.default_rng(7).integers(0, 256, (300, 400, 3), np.uint8)
with Client(address, curve_keys=keys, timeout=30) as client:
    result = client.submit([image], Pipeline.parse(sys.argv[4:]), tile=128).result(timeout=60)
np.save(out, result.images[0])
print(socket.gethostname(), result.state)
"""


def test_a_curve_client_on_another_node_gets_exact_results(
    three_nodes, server, curve_keys, tmp_path
):
    out = tmp_path / "out.npy"
    said = in_node(three_nodes, 0, CURVE_CLIENT, server.address, str(curve_keys), str(out), *OPS)
    assert said.split() == [three_nodes.head.name, "done"]
    expected = Pipeline.parse(OPS).apply(noise(300, 400, 7))
    assert np.array_equal(np.load(out), expected)


# -- batch mode across nodes --------------------------------------------------------------------


BATCH_OPS = ["gaussian_blur:ksize=5", "resize:width=96,height=72,interpolation=lanczos"]


@pytest.mark.parametrize("shared_fs", [False, True], ids=["rank0-io", "shared-fs"])
def test_batch_writes_every_image_exactly(three_nodes, tmp_path, shared_fs):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    images = {f"img{i:02d}.png": noise(240, 320, i) for i in range(12)}
    for name, image in images.items():
        cv2.imwrite(str(inputs / name), image)
    args = ["--input", str(inputs), "--output", str(outputs), "--format", "png"]
    args += [a for op in BATCH_OPS for a in ("--op", op)] + (["--shared-fs"] if shared_fs else [])
    before = three_nodes.counters()
    done = run_to_end(three_nodes.mpi_command(PLACEMENT, "mpi_imgproc.batch", *args), 90)
    rank0 = three_nodes.counters()[three_nodes.nodes[0].name] - before[three_nodes.nodes[0].name]
    assert done.returncode == 0, done.stdout
    summary = json.loads((outputs / "batch-summary.json").read_text())
    assert (summary["ok"], summary["failed"]) == (12, 0)
    for name, image in images.items():
        written = cv2.imread(str(outputs / name), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(written, Pipeline.parse(BATCH_OPS).apply(image)), name
    pixels = sum(im.nbytes for im in images.values())
    if shared_fs:  # the workers read and write the files themselves: rank 0 sends names
        assert rank0.sent < pixels / 10
    else:  # rank 0 decodes and sends the pixels
        assert rank0.sent >= pixels


# -- a link cut mid-job -------------------------------------------------------------------------

BLUR = Pipeline.parse(["bilateral:d=9"])


def whole_images(count: int) -> list[np.ndarray]:
    return [noise(1500, 1500, seed) for seed in range(count)]


def wait_until(check, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "waited in vain"
        time.sleep(0.005)


def cut_and_finish(sim: SimNodes, cluster, when) -> float:
    """Submit four whole images, cut the third node's link once ``when(sent)`` holds for the
    bytes it has sent since; check the job still ends exact; seconds from cut to result."""
    victim = sim.nodes[2]
    with Client(cluster.address, timeout=30) as client:
        work = whole_images(4)
        start = sim.counters()[victim.name]
        job = client.submit(work, BLUR, tile=0)
        wait_until(lambda: when((sim.counters()[victim.name] - start).sent), 60)
        sim.cut(victim)
        cut_at = time.monotonic()
        result = job.result(timeout=90)
        seconds = time.monotonic() - cut_at
        assert result.ok, result.errors
        assert all(np.array_equal(o, BLUR.apply(i)) for o, i in zip(result.images, work))
        sim.mend(victim)  # what the buried worker sends now is ignored
        time.sleep(1)
        assert client.info()["queue"]["workers_alive"] == 1
        assert client.submit(work[:1], BLUR, tile=0).result(60).ok
    assert "worker rank 2 is gone" in cluster.drain()
    return seconds


def test_a_worker_node_cut_off_while_computing_is_buried_and_the_job_completes(can_make_nodes):
    # The third node has had its first image and sent nothing back yet: it is computing.
    image = whole_images(1)[0].nbytes
    with simulated_nodes(3) as sim, running_server(sim, [1, 1, 1], "--insecure") as cluster:
        sim.shape(Link("1gbit"))
        received = {}

        def computing(sent: int) -> bool:
            now = sim.counters()[sim.nodes[2].name].received
            received.setdefault("start", now)
            return now - received["start"] >= image and sent < 100_000

        seconds = cut_and_finish(sim, cluster, computing)
    assert seconds < 45  # silence for 10 s, a ping unanswered for 3 s, then the rerun


def test_a_worker_node_cut_off_mid_transfer_is_buried_and_the_job_completes(can_make_nodes):
    # At 200 Mbit/s one result takes 0.3 s to cross: cut when a fifth of it has.
    with simulated_nodes(3, link=Link("200mbit")) as sim:
        with running_server(sim, [1, 1, 1], "--insecure") as cluster:
            seconds = cut_and_finish(sim, cluster, lambda sent: sent > 1_500_000)
    assert seconds < 45  # pixels given up after 10 s, a ping unanswered for 3 s, the rerun


@pytest.mark.parametrize("when", ["mid-upload", "after-upload"])
def test_cutting_rank_0s_node_gives_the_client_an_error_not_a_hang(can_make_nodes, when):
    with simulated_nodes(2) as sim, running_server(sim, [1, 1], "--insecure") as cluster:
        with Client(cluster.address, timeout=30) as client:
            job = client.submit(whole_images(4), BLUR, tile=0)  # 27 MB to upload
            if when == "after-upload":
                next(e for e in job.events(timeout=60) if e.type in ("progress", "result"))
            # Rank 0, cut off, buries its silent worker within about 13 s and ends the cluster
            # with an error, which mpiexec hears once the link is back.  The link comes back
            # 15 s after the cut whenever the client finds out: later, and UCX (which gives up
            # on a silent peer after ~20 s) could crash a rank first.
            sim.cut(sim.nodes[0])
            started = time.monotonic()
            mender = threading.Timer(15.0, sim.mend, args=(sim.nodes[0],))
            mender.start()
            try:
                with pytest.raises(ServerGone, match="nothing listens there any more"):
                    job.result()  # no timeout of its own: the connection must find out
                assert time.monotonic() - started < 25
            finally:
                mender.join()
        assert cluster.proc.wait(timeout=30) != 0
        assert "every worker rank has died" in cluster.drain()


# -- bench --nodes ------------------------------------------------------------------------------


def test_the_peak_link_rate_is_the_busiest_tenth_of_a_second():
    watch = LinkWatch(sim=None)
    total = 0
    for i in range(51):  # 1 MB per 20 ms (400 Mbit/s), and 5 MB in the 20 ms after 0.5 s
        total += 0 if i == 0 else 5_000_000 if i == 26 else 1_000_000
        watch.samples.append((i * 0.02, {"n": LinkCounters(sent=total, received=0)}))
    assert watch.peak_bps("n") == pytest.approx(8 * 9_000_000 / 0.1)
    assert watch.carried()["n"] == LinkCounters(total, 0)


def test_speedups_are_against_one_process_and_against_one_node():
    samples = [
        {"workload": "strong", "link": "1gbit", "nodes": n, "round": r, "wall_s": w}
        for n, walls in ((1, [4.0, 4.2]), (2, [2.5, 2.5])) for r, w in enumerate(walls, 1)
    ]  # fmt: skip
    one, two = summarise(samples, {"strong": 8.2})
    assert (one["wall_s"], one["speedup"], one["vs_one_node"]) == (4.1, 2.0, 1.0)
    assert (two["speedup"], two["vs_one_node"], two["efficiency"]) == (3.28, 1.64, 0.82)


def test_bench_across_nodes_checks_its_outputs_and_reports_every_link(can_make_nodes, tmp_path):
    cmd = [sys.executable, "-m", "mpi_imgproc.cli", "bench", "--nodes", "2", "--link", "1gbit"]
    cmd += ["--size", "400x300", "--op", "gaussian_blur:ksize=5", "--batch-images", "6"]
    cmd += ["--repeat", "1", "--out", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "nodes.json").read_text())
    rows = {(r["workload"], r["nodes"]): r for r in result["summary"]}
    assert set(rows) == {(w, n) for w in ("strong", "batch") for n in (1, 2)}
    assert rows["strong", 1]["rank0_received_mb"] >= 400 * 300 * 3 / 1e6  # the upload at least
    assert all(mb > 0 for mb in rows["batch", 2]["workers_received_mb"])  # both got files
    assert len(rows["batch", 2]["workers_received_mb"]) == 2
    assert 0 < rows["strong", 1]["rank0_peak_use"] <= 1.05
    report = (tmp_path / "nodes.md").read_text()
    assert f"The nodes share one machine's {CORES} cores" in report

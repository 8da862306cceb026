"""Nothing lost by mistake, and a ``submit`` people can steer: real files, a real ``mpiexec``
server where the command needs one, the command line as a user runs it."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from cluster import running_cluster
from conftest import random_image, write_images

from mpi_imgproc.bench import Workload, settings_from_args
from mpi_imgproc.cli import build_parser

pytestmark = pytest.mark.timeout(120)
CLI = [sys.executable, "-m", "mpi_imgproc.cli"]


def cli(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def free_address() -> str:
    """A loopback address nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


# ------------------------------------------------------------------ run: outputs never inputs


def test_run_refuses_an_output_folder_that_is_the_input_folder(tmp_path):
    write_images(tmp_path / "in", 2)
    before = contents(tmp_path / "in")
    result = cli("run", str(tmp_path / "in"), "-o", str(tmp_path / "in"), "--op", "invert")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0  # one line
    assert f"output {tmp_path / 'in' / 'img000.png'} is the input" in result.stderr
    assert contents(tmp_path / "in") == before


def test_run_refuses_an_output_folder_that_links_to_the_input_folder(tmp_path):
    write_images(tmp_path / "in", 1)
    (tmp_path / "link").symlink_to(tmp_path / "in")
    before = contents(tmp_path / "in")
    result = cli("run", str(tmp_path / "in"), "-o", str(tmp_path / "link"), "--op", "invert")
    assert result.returncode == 2 and "would replace the original" in result.stderr
    assert contents(tmp_path / "in") == before


def test_run_into_the_input_folder_with_another_format_keeps_the_inputs(tmp_path):
    write_images(tmp_path / "in", 1)
    before = contents(tmp_path / "in")
    result = cli(
        "run", str(tmp_path / "in"), "-o", str(tmp_path / "in"), "--op", "invert", "--format", "tif"
    )
    assert result.returncode == 0, result.stderr
    assert {k: v for k, v in contents(tmp_path / "in").items() if k in before} == before
    assert (tmp_path / "in" / "img000.tif").exists()


def test_run_works_without_local(tmp_path):
    source = write_images(tmp_path / "in", 1)[0]
    result = cli("run", str(source), "-o", str(tmp_path / "out"), "--op", "invert")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / source.name).exists()


@pytest.mark.timeout(30)
def test_run_refuses_a_fifo_named_like_an_image_without_hanging(tmp_path):
    good = write_images(tmp_path / "in", 1)[0]
    os.mkfifo(tmp_path / "in" / "pipe.png")
    pipe = str(tmp_path / "in" / "pipe.png")
    result = cli("run", pipe, str(good), "-o", str(tmp_path / "out"), "--op", "invert", timeout=20)
    assert result.returncode == 1
    assert f"{pipe}: cannot read: a FIFO, not a regular file" in result.stderr
    assert (tmp_path / "out" / good.name).exists()


# ------------------------------------------------------------------ pipelines: one line each


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"ksize": None}, "gaussian_blur: ksize must be an integer, got None"),
        ({"ksize": [3]}, "gaussian_blur: ksize must be an integer, got [3]"),
        ({"sigma": None}, "gaussian_blur: sigma must be a number, got None"),
        ({"sigma": {"x": 1}}, "gaussian_blur: sigma must be a number, got {'x': 1}"),
    ],
)
def test_pipeline_file_with_a_wrong_value_type_is_one_line_and_exit_2(tmp_path, params, message):
    source = write_images(tmp_path / "in", 1)[0]
    spec = tmp_path / "p.json"
    spec.write_text(json.dumps([{"op": "gaussian_blur", "params": params}]))
    result = cli("run", str(source), "-o", str(tmp_path / "o"), "--pipeline", str(spec))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {message}"]


def test_a_misspelt_op_gets_a_suggestion(tmp_path):
    source = write_images(tmp_path / "in", 1)[0]
    result = cli("run", str(source), "-o", str(tmp_path / "o"), "--op", "gausian_blur")
    assert result.returncode == 2
    assert "unknown op 'gausian_blur'" in result.stderr
    assert "did you mean 'gaussian_blur'?" in result.stderr


def test_a_misspelt_parameter_gets_a_suggestion(tmp_path):
    source = write_images(tmp_path / "in", 1)[0]
    result = cli("run", str(source), "-o", str(tmp_path / "o"), "--op", "gaussian_blur:ksise=5")
    assert result.returncode == 2
    assert "unknown parameter 'ksise'" in result.stderr and "did you mean 'ksize'?" in result.stderr


# ------------------------------------------------------------------ bench --size


def test_bench_size_is_width_by_height():
    args = build_parser().parse_args(["bench", "--size", "640x480", "--op", "invert"])
    assert settings_from_args(args).size == Workload(height=480, width=640)


def test_bench_size_round_trips_through_the_reproduce_command():
    args = build_parser().parse_args(["bench", "--size", "640x480", "--op", "invert"])
    assert "--size 640x480" in settings_from_args(args).command


def test_bench_bad_size_is_one_line_and_exit_2(tmp_path):
    result = cli("bench", "--size", "640by480", "--out", str(tmp_path / "b"))
    assert result.returncode == 2
    assert result.stderr.strip() == "error: size must be N or WxH (width x height), got '640by480'"


# ------------------------------------------------------------------ submit: no server needed


@pytest.mark.timeout(60)
def test_submit_with_nothing_listening_exits_2_with_one_line(tmp_path):
    source = write_images(tmp_path / "in", 1)[0]
    out = str(tmp_path / "o")
    address = free_address()
    result = cli("submit", str(source), "-o", out, "--op", "invert", "--server", address,
                 "--timeout", "2", "--quiet")  # fmt: skip
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert f"nothing is listening at {address}" in result.stderr


def test_submit_refuses_an_existing_output_before_sending_anything(tmp_path):
    sources = write_images(tmp_path / "in", 3)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "img001.png").write_bytes(b"keep me")
    result = cli("submit", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--op", "invert",
                 "--server", free_address(), "--timeout", "2")  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: {tmp_path / 'out' / 'img001.png'} exists (the output of {sources[1]}; 1 of 3 "
        "outputs exist): add --overwrite to replace or --skip-existing to keep them"
    ]
    assert contents(tmp_path / "out") == {"img001.png": b"keep me"}


def test_submit_refuses_an_output_folder_that_is_the_input_folder(tmp_path):
    write_images(tmp_path / "in", 1)
    result = cli("submit", str(tmp_path / "in"), "-o", str(tmp_path / "in"), "--op", "invert",
                 "--overwrite", "--server", free_address(), "--timeout", "2")  # fmt: skip
    assert result.returncode == 2 and "would replace the original" in result.stderr


# ------------------------------------------------------------------ submit against a server


@pytest.fixture(scope="module")
def server():
    with running_cluster(2) as cluster:
        yield cluster


def submit(server, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return cli("submit", "--server", server.address, *args, timeout=timeout)


def test_submit_prints_each_job_id_and_token_usable_with_status(server, tmp_path):
    write_images(tmp_path / "in", 3, size=(40, 50))
    result = submit(server, str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--op", "invert",
                    "--chunk", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    accepted = [line.split() for line in result.stderr.splitlines() if line.startswith("accepted:")]
    assert len(accepted) == 2  # 3 images in chunks of 2
    _, _, job, _, token, *_ = accepted[0]
    status = cli("status", job, "--token", token, "--server", server.address)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["state"] == "done"


def test_submit_json_prints_one_event_per_line_for_scripts(server, tmp_path):
    write_images(tmp_path / "in", 2, size=(40, 50))
    (tmp_path / "in" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n no chunks")
    result = submit(server, str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--op", "invert",
                    "--json")  # fmt: skip
    assert result.returncode == 1
    events = [json.loads(line) for line in result.stdout.splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "accepted" and kinds[-2:] == ["done", "summary"]
    assert sorted(kinds[1:-2]) == ["image_error", "result", "result"]
    assert all(Path(e["output"]).exists() for e in events if e["event"] == "result")
    error = next(e for e in events if e["event"] == "image_error")
    assert error["input"].endswith("bad.png") and "truncated PNG" in error["message"]
    assert events[-1] == {
        "event": "summary",
        "images": 3,
        "written": 2,
        "failed": 1,
        "skipped": 0,
        "interrupted": False,
        "stopped": None,
    }


def test_submit_reports_an_image_error_as_it_happens_not_at_the_end(server, tmp_path):
    write_images(tmp_path / "in", 3, size=(40, 50))
    (tmp_path / "in" / "a-empty.png").write_bytes(b"")  # sorted first: in the first job
    result = submit(server, str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--op", "invert",
                    "--chunk", "1", "--window", "1")  # fmt: skip
    lines = result.stderr.splitlines()
    error = next(i for i, line in enumerate(lines) if "a-empty.png: empty file" in line)
    last_accepted = max(i for i, line in enumerate(lines) if line.startswith("accepted:"))
    assert error < last_accepted


def test_submit_skip_existing_sends_only_the_missing_outputs(server, tmp_path):
    write_images(tmp_path / "in", 3, size=(40, 50))
    args = [str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--op", "invert"]
    assert submit(server, *args).returncode == 0
    (tmp_path / "out" / "img001.png").unlink()
    kept = (tmp_path / "out" / "img000.png").stat().st_mtime_ns
    result = submit(server, *args, "--skip-existing", "--json")
    assert result.returncode == 0, result.stderr
    results = [json.loads(e) for e in result.stdout.splitlines()]
    assert [Path(e["input"]).name for e in results if e["event"] == "result"] == ["img001.png"]
    assert "skipped 2 inputs whose output exists" in result.stderr
    assert (tmp_path / "out" / "img000.png").stat().st_mtime_ns == kept


def test_submit_overwrite_replaces_existing_outputs(server, tmp_path):
    source = write_images(tmp_path / "in", 1, size=(40, 50))[0]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / source.name).write_bytes(b"old")
    result = submit(server, str(source), "-o", str(tmp_path / "out"), "--op", "invert",
                    "--overwrite")  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = cv2.imread(str(tmp_path / "out" / source.name), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(out, 255 - cv2.imread(str(source), cv2.IMREAD_UNCHANGED))


def test_submit_stats_prints_one_table_with_totals_and_rank_shares(server, tmp_path):
    write_images(tmp_path / "in", 6, size=(40, 50))
    stats = tmp_path / "stats.json"
    result = submit(server, str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--op", "invert",
                    "--chunk", "2", "--stats", "--stats-json", str(stats))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "{" not in result.stdout  # a table, not JSON blocks
    assert "6 written, 0 failed, 0 skipped" in result.stdout and "images/s, 3 jobs" in result.stdout
    assert "rank  tiles  busy s  share" in result.stdout
    recorded = json.loads(stats.read_text())
    assert len(recorded["jobs"]) == 3 and recorded["written"] == 6
    assert set(recorded["ranks"]) == {"1"} and recorded["ranks"]["1"]["busy_share"] == 1.0
    assert recorded["ranks"]["1"]["tiles"] == sum(
        j["ranks"]["1"]["tiles"] for j in recorded["jobs"]
    )


@pytest.mark.timeout(60)
def test_submit_refuses_a_fifo_without_hanging_and_writes_the_rest(server, tmp_path):
    good = write_images(tmp_path / "in", 1, size=(40, 50))[0]
    os.mkfifo(tmp_path / "in" / "pipe.png")
    pipe = str(tmp_path / "in" / "pipe.png")
    result = submit(server, pipe, str(good), "-o", str(tmp_path / "out"), "--op", "invert",
                    "--quiet", timeout=30)  # fmt: skip
    assert result.returncode == 1
    assert f"{pipe}: cannot read" in result.stderr
    assert "1 of 2 images written" in result.stdout


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.timeout(150)
def test_ctrl_c_cancels_the_jobs_reports_progress_writes_stats_and_exits_130(server, tmp_path):
    rng = np.random.default_rng(3)
    (tmp_path / "in").mkdir()
    for i in range(32):
        cv2.imwrite(str(tmp_path / "in" / f"img{i:02d}.png"), random_image(rng, 500, 500, 3))
    stats = tmp_path / "stats.json"
    cmd = [*CLI, "submit", "--server", server.address, str(tmp_path / "in"),
           "-o", str(tmp_path / "out"), "--op", "bilateral:d=31,sigma_color=50,sigma_space=50",
           "--tile", "0", "--chunk", "1", "--window", "2", "--stats-json", str(stats)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        out = tmp_path / "out"
        wait_for(lambda: out.exists() and any(out.glob("img*.png")), 90, "no output written")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    written = len(list((tmp_path / "out").glob("img*.png")))
    assert f"interrupted: {written} of 32 written\n" in stderr
    assert 0 < written < 32
    recorded = json.loads(stats.read_text())
    assert recorded["interrupted"] and recorded["written"] == written
    assert not list((tmp_path / "out").glob(".*part"))

    def nothing_running() -> bool:
        info = cli("info", "--server", server.address)
        return json.loads(info.stdout)["queue"]["jobs"] == 0

    wait_for(nothing_running, 5, "the interrupted submit's jobs are still running")


# ------------------------------------------------------------------ what the README names

ROOT = Path(__file__).resolve().parent.parent


def test_the_open_mpi_hostfile_the_readme_names_is_shipped_in_open_mpi_form():
    assert "hostfile.openmpi" in (ROOT / "README.md").read_text()
    lines = (ROOT / "hostfile.openmpi").read_text().splitlines()
    hosts = [line for line in lines if line.strip() and not line.startswith("#")]
    assert hosts and all(re.fullmatch(r"\S+ slots=\d+", line) for line in hosts)


def test_make_test_shows_why_tests_were_skipped():
    target = (ROOT / "Makefile").read_text().split("\ntest:\n", 1)[1].split("\n\n", 1)[0]
    runs = [line for line in target.splitlines() if "pytest" in line]
    assert runs and all(re.search(r" -r\w*s", line) for line in runs)


def test_bench_with_a_bad_tile_is_one_line_and_exit_2(tmp_path):
    done = cli("bench", "--tile", "abc", "--out", str(tmp_path / "b"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == "error: tile must be a non-negative integer or auto, got 'abc'"

"""``examples/slurm/*.sbatch`` submitted to a real one-host Slurm (munged, slurmctld, slurmd).

The batch job finishes with its summary; ``scancel --signal=TERM`` drains it (exit 3) and the
same script submitted again completes the rest, or with ``RESUBMIT`` the job requeues itself
with its command-line options; the server job prints its address and a CURVE
client gets exact results from it; ``srun`` with a PMI plugin the MPI does not speak is
refused with one line.  The jobs use this test run's own virtual environment (``VENV``).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from refusal import SERVE, the_one_refusal
from slurm import Slurm, free_port, missing_requirements, one_host_slurm

from mpi_imgproc.client import Client
from mpi_imgproc.pipeline import Pipeline

REPO = Path(__file__).resolve().parents[2]
BATCH = REPO / "examples" / "slurm" / "batch.sbatch"
SERVER = REPO / "examples" / "slurm" / "server.sbatch"
VENV = sys.prefix  # the jobs run with the same environment as the tests
# One node, rank 0 and two workers with one CPU each: fits the four CPUs of the test node.
SMALL = ["--nodes=1", "--ntasks=3", "--ntasks-per-node=3", "--cpus-per-task=1", "--time=10"]

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(missing_requirements() is not None, reason=str(missing_requirements())),
]


@pytest.fixture(scope="module")
def slurm() -> Iterator[Slurm]:
    with one_host_slurm(cpus=4) as running:
        yield running


def write_photos(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """``count`` smooth, noisy BGR PNGs (filters have work, files stay small)."""
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True)
    height, width = size
    ramp = np.linspace(0, 200, width, dtype=np.float32)[None, :, None]
    paths = []
    for i in range(count):
        noise = rng.normal(0, 20, (height, width, 3)).astype(np.float32)
        image = np.clip(ramp + noise + 3 * i, 0, 255).astype(np.uint8)
        paths.append(folder / f"photo{i:03d}.png")
        cv2.imwrite(str(paths[-1]), image)
    return paths


def wait_for_text(path: Path, pattern: str, timeout: float) -> re.Match:
    """Wait until the job's output file holds ``pattern``; the output so far is in the error."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text(errors="replace") if path.exists() else ""
        found = re.search(pattern, text)
        if found:
            return found
        time.sleep(0.3)
    raise AssertionError(f"{pattern!r} not in {path.name} after {timeout} s:\n{text}")


def expected(path: Path, ops: list[str]) -> np.ndarray:
    return Pipeline.parse(ops).apply(cv2.imread(str(path), cv2.IMREAD_UNCHANGED))


def test_srun_with_pmi2_gives_the_mpich_wheel_one_world(slurm):
    ran = slurm.run(
        "srun", "-n", "3", "--mpi=pmi2", sys.executable, "-c",
        "from mpi4py import MPI; c = MPI.COMM_WORLD; print(c.Get_rank(), c.Get_size())",
        timeout=60,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert sorted(ran.stdout.split("\n")[:-1]) == ["0 3", "1 3", "2 3"]


def test_srun_with_a_pmi_the_mpi_does_not_speak_is_refused_in_one_line(slurm):
    # --mpi=none: MPICH finds no PMI and every task initialises alone, a world of one each.
    ran = slurm.run("srun", "-n", "3", "--mpi=none", sys.executable, *SERVE, timeout=60)
    line = the_one_refusal(ran)
    assert "srun started 3 processes (SLURM_STEP_NUM_TASKS=3) but MPI sees one" in line
    assert "--mpi plugin" in line


def test_batch_sbatch_finishes_with_its_summary(slurm, tmp_path):
    photos = write_photos(tmp_path / "in", 8, (90, 120))
    log = tmp_path / "batch.out"
    job = slurm.sbatch(
        BATCH, *SMALL, f"--output={log}", cwd=REPO,
        INPUT=str(tmp_path / "in"), OUTPUT=str(tmp_path / "out"), VENV=VENV,
    )  # fmt: skip
    fields = slurm.wait_job(job, timeout=120)
    text = log.read_text()
    assert fields["ExitCode"] == "0:0", text + slurm.logs()
    assert "batch: 8 ok, 0 failed, 0 skipped, 0 not done" in text
    assert "batch.sbatch: exit status 0" in text
    summary = json.loads((tmp_path / "out" / "batch-summary.json").read_text())
    assert (summary["ok"], summary["ranks"]) == (8, 3)
    for path in photos:
        out = cv2.imread(str(tmp_path / "out" / path.name), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(out, expected(path, ["grayscale", "gaussian_blur:ksize=5"]))


SLOW = ["bilateral:d=15"]  # about 0.4 s an image here: the run is still going when stopped


def slow_batch_env(tmp_path: Path, count: int, **extra: str) -> tuple[list[Path], dict]:
    """``count`` photos and the environment of a batch job that runs SLOW on them."""
    pipeline = tmp_path / "pipeline.json"
    pipeline.write_text(json.dumps(Pipeline.parse(SLOW).to_json()))
    photos = write_photos(tmp_path / "in", count, (600, 800))
    env = dict(INPUT=str(tmp_path / "in"), OUTPUT=str(tmp_path / "out"), VENV=VENV)
    return photos, {**env, "PIPELINE": str(pipeline), **extra}


def stop_after_two_outputs(slurm: Slurm, job: str, out: Path) -> None:
    """``scancel --signal=TERM`` the job once two outputs are written."""
    deadline = time.monotonic() + 90
    while len(list(out.glob("photo*.png"))) < 2:
        assert time.monotonic() < deadline and slurm.job(job)["JobState"] in ("PENDING", "RUNNING")
        time.sleep(0.2)
    cancelled = slurm.run("scancel", "--signal=TERM", job)
    assert cancelled.returncode == 0, cancelled.stderr


def test_scancel_term_drains_and_a_resubmission_completes_the_rest(slurm, tmp_path):
    photos, env = slow_batch_env(tmp_path, 30)
    ops = SLOW
    first = tmp_path / "first.out"
    job = slurm.sbatch(BATCH, *SMALL, f"--output={first}", cwd=REPO, **env)
    stop_after_two_outputs(slurm, job, tmp_path / "out")
    fields = slurm.wait_job(job, timeout=60)
    text = first.read_text()
    assert fields["ExitCode"] == "3:0", text
    assert "batch.sbatch: exit status 3" in text
    summary = json.loads((tmp_path / "out" / "batch-summary.json").read_text())
    assert summary["not_done"] > 0 and summary["ok"] >= 2, summary
    done_first = summary["ok"]
    assert not list((tmp_path / "out").glob(".*part"))

    second = tmp_path / "second.out"
    job = slurm.sbatch(BATCH, *SMALL, f"--output={second}", cwd=REPO, **env)
    fields = slurm.wait_job(job, timeout=180)
    text = second.read_text()
    assert fields["ExitCode"] == "0:0", text
    summary = json.loads((tmp_path / "out" / "batch-summary.json").read_text())
    assert (summary["skipped"], summary["ok"]) == (done_first, 30 - done_first), summary
    for path in photos[:3] + photos[-3:]:
        out = cv2.imread(str(tmp_path / "out" / path.name), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(out, expected(path, ops)), path.name


@pytest.mark.timeout(420)
def test_resubmit_requeues_the_same_job_with_its_command_line_options(slurm, tmp_path):
    """RESUBMIT=1: a drained run (exit 3) requeues its own job, which runs again with the
    sizes given on sbatch's command line (the script's own ask for two nodes would never
    start here), completes the rest, and ends COMPLETED under the same id."""
    _, env = slow_batch_env(tmp_path, 24, RESUBMIT="1")
    log = tmp_path / "batch.out"
    job = slurm.sbatch(BATCH, *SMALL, f"--output={log}", cwd=REPO, **env)
    stop_after_two_outputs(slurm, job, tmp_path / "out")
    wait_for_text(log, r"requeued for run 2 of at most 2", timeout=60)
    deadline = time.monotonic() + 60
    while (fields := slurm.job(job)).get("JobState") != "PENDING" or fields["Restarts"] != "1":
        assert time.monotonic() < deadline, fields
        time.sleep(0.5)
    # Slurm holds a requeued job about two minutes (Reason=BeginTime); no need to wait here
    assert slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now").returncode == 0
    deadline = time.monotonic() + 240
    while (fields := slurm.job(job)).get("JobState") != "COMPLETED":
        assert time.monotonic() < deadline and fields["JobState"] in (
            "PENDING", "RUNNING", "CONFIGURING", "COMPLETING"
        ), (fields, log.read_text())  # fmt: skip
        time.sleep(0.5)
    text = log.read_text()
    assert fields["ExitCode"] == "0:0" and fields["Restarts"] == "1", text
    assert "batch.sbatch: exit status 3" in text and "batch.sbatch: exit status 0" in text
    summary = json.loads((tmp_path / "out" / "batch-summary.json").read_text())
    assert summary["ranks"] == 3 and summary["skipped"] + summary["ok"] == 24, summary
    assert len(list((tmp_path / "out").glob("photo*.png"))) == 24


def test_server_sbatch_prints_its_address_and_serves_a_curve_client(slurm, tmp_path):
    keys, port = tmp_path / "keys", free_port()
    log = tmp_path / "server.out"
    options = ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=2", "--time=10"]
    job = slurm.sbatch(
        SERVER, *options, f"--output={log}", cwd=REPO,
        PORT=str(port), KEYS=str(keys), VENV=VENV, PYTHONUNBUFFERED="1",
    )  # fmt: skip
    try:
        told = wait_for_text(log, r"mpi-imgproc info --server (tcp://\S+) --curve-keys (\S+)", 60)
        address = told.group(1)
        assert (address, told.group(2)) == (f"tcp://{slurm.host}:{port}", str(keys))
        wait_for_text(log, r"listening on", 60)
        rng = np.random.default_rng(3)
        images = [rng.integers(0, 256, (130, 170, 3), dtype=np.uint8) for _ in range(3)]
        specs = ["median_blur:ksize=5", "sharpen:amount=0.5"]
        with Client(address, curve_keys=keys) as client:
            info = client.info()
            result = client.submit(images, specs, tile=32).result(timeout=60)
        assert info["workers_per_rank"] == 2, info
        for image, out in zip(images, result.images):
            assert np.array_equal(out, Pipeline.parse(specs).apply(image))
    finally:
        slurm.run("scancel", job)
    slurm.wait_job(job, timeout=60)
    assert "mpi_imgproc server stopped" in log.read_text()

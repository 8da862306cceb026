"""``mpiexec -n N python -m mpi_imgproc.batch``: every good image written, every bad one
reported, resumable, and interruptible by SIGTERM without partial files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from cluster import mpi_command
from conftest import random_image, write_images

from mpi_imgproc.pipeline import Pipeline

pytestmark = pytest.mark.timeout(120)
OPS = ["--op", "gaussian_blur:ksize=5", "--op", "resize:width=64,height=48,interpolation=lanczos"]


def make_folder(folder: Path, count: int, size: tuple[int, int] = (90, 120)) -> list[Path]:
    return write_images(folder, count, size=size)


def add_bad_files(folder: Path) -> dict[str, str]:
    jpeg = cv2.imencode(".jpg", np.full((40, 40, 3), 120, np.uint8))[1].tobytes()
    (folder / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    return {
        "cut.jpg": "truncated JPEG",
        "empty.png": "empty file",
        "notes.png": "not an image OpenCV can decode",
    }


def batch(*args: str, ranks: int = 3, timeout: float = 90) -> subprocess.CompletedProcess:
    cmd = mpi_command(ranks, "mpi_imgproc.batch", *args)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def expected(path: Path, ops: list[str]) -> np.ndarray:
    return Pipeline.parse(ops[1::2]).apply(cv2.imread(str(path), cv2.IMREAD_UNCHANGED))


@pytest.mark.parametrize("shared_fs", [False, True])
def test_good_images_are_written_exactly_and_bad_ones_reported(tmp_path, shared_fs):
    good = make_folder(tmp_path / "in", 12)
    bad = add_bad_files(tmp_path / "in")
    extra = ["--shared-fs"] if shared_fs else []
    result = batch("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *OPS, *extra)
    assert result.returncode == 1, result.stderr
    summary = json.loads((tmp_path / "out" / "batch-summary.json").read_text())
    assert (summary["ok"], summary["failed"], summary["total"]) == (12, 3, 15)
    by_name = {Path(r["input"]).name: r for r in summary["images"]}
    for name, cause in bad.items():
        assert by_name[name]["status"] == "failed" and cause in by_name[name]["error"]
        assert f"{name}: {cause}" in result.stderr
    for path in good:
        out = cv2.imread(str(tmp_path / "out" / path.name), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(out, expected(path, OPS))
    assert not list((tmp_path / "out").glob(".*part"))


def test_large_images_are_tiled_and_small_ones_go_whole(tmp_path):
    make_folder(tmp_path / "in", 2, size=(60, 80))
    big = tmp_path / "in" / "big.png"
    cv2.imwrite(str(big), random_image(np.random.default_rng(1), 1600, 1500, 3))
    ops = ["--op", "bilateral:d=9", "--op", "sharpen"]
    result = batch("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *ops)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "batch-summary.json").read_text())
    paths = {Path(r["input"]).name: r["path"] for r in summary["images"]}
    assert paths == {"img000.png": "whole", "img001.png": "whole", "big.png": "tiled"}
    out = cv2.imread(str(tmp_path / "out" / "big.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(out, expected(big, ops))


def test_resume_skips_finished_outputs(tmp_path):
    make_folder(tmp_path / "in", 8)
    args = ["--input", str(tmp_path / "in" / "*.png"), "--output", str(tmp_path / "out"), *OPS]
    assert batch(*args).returncode == 0
    (tmp_path / "out" / "img002.png").unlink()
    (tmp_path / "out" / "img005.png").unlink()
    result = batch(*args, "--resume")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "batch-summary.json").read_text())
    assert (summary["ok"], summary["skipped"]) == (2, 6)
    assert (tmp_path / "out" / "img005.png").exists()


def test_a_bad_op_stops_every_rank_with_a_clear_error(tmp_path):
    make_folder(tmp_path / "in", 1)
    result = batch(
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        "--op",
        "gaussian_blur:ksize=4",
    )
    assert result.returncode == 2
    assert "gaussian_blur: ksize must be odd, got 4" in result.stderr


def test_sigterm_mid_batch_leaves_no_partial_file_and_resume_finishes(tmp_path):
    make_folder(tmp_path / "in", 100, size=(300, 300))
    ops = ["--op", "bilateral:d=15,sigma_color=50,sigma_space=50", "--op", "median_blur:ksize=7"]
    args = [
        "--input",
        str(tmp_path / "in"),
        "--output",
        str(tmp_path / "out"),
        *ops,
        "--format",
        "png",
    ]
    cmd = mpi_command(3, "mpi_imgproc.batch", *args)
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while len(list((tmp_path / "out").glob("img*.png"))) < 3:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        proc.wait(timeout=25)
        assert time.monotonic() - started < 20
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    summary = json.loads((tmp_path / "out" / "batch-summary.json").read_text())
    assert summary["interrupted"] and summary["not_done"] > 0 and proc.returncode == 1
    written = sorted((tmp_path / "out").glob("img*.png"))
    assert len(written) == summary["ok"]
    assert not list((tmp_path / "out").glob(".*part"))
    for path in written[:5]:
        out = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(out, expected(tmp_path / "in" / path.name, ops))
    result = batch(*args, "--resume", timeout=110)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "out").glob("img*.png"))) == 100

"""``mpi-imgproc verify``: passes on the outputs of ``run --local``, and names every output that
was tampered with or deleted; undecodable inputs are listed but are not mismatches."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import pytest

from mpi_imgproc.dataset import DatasetSpec, generate

pytestmark = pytest.mark.timeout(60)
CLI = [sys.executable, "-m", "mpi_imgproc.cli"]
OPS = ["--op", "gaussian_blur:ksize=5", "--op", "sharpen"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated folder (with bad files) and its ``run --local`` outputs as png and jpg."""
    root = tmp_path_factory.mktemp("verify")
    spec = DatasetSpec(count=6, min_size=40, max_size=80, formats=("jpg", "png"), corrupt=2)
    generate(root / "in", spec)
    files = sorted(str(p) for p in (root / "in").iterdir() if p.suffix != ".json")
    for fmt in ("png", "jpg"):
        result = run_cli("run", "--local", *files, "-o", str(root / fmt), "--format", fmt, *OPS)
        assert result.returncode == 1 and "6 of 8 images written" in result.stdout
    return root


def verify(inputs: str, outputs: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_cli("verify", "--input", inputs, "-o", str(outputs), *OPS, *extra)


@pytest.fixture
def copy(processed: Path, tmp_path: Path) -> Path:
    """A copy of the png outputs that a test may tamper with."""
    return Path(shutil.copytree(processed / "png", tmp_path / "out"))


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_untouched_outputs_pass_and_bad_inputs_are_only_listed(processed, fmt):
    result = verify(str(processed / "in"), processed / fmt, "--format", fmt)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "6 outputs match, 0 differ, 0 missing" in result.stdout
    assert result.stdout.count("unreadable input: ") == 2


def test_a_changed_pixel_fails_and_names_the_file(processed, copy):
    target = copy / "img00001.png"
    image = cv2.imread(str(target), cv2.IMREAD_UNCHANGED)
    image[3, 5] = image[3, 5] ^ 0xFF
    cv2.imwrite(str(target), image)
    result = verify(str(processed / "in"), copy, "--format", "png")
    assert result.returncode == 1
    assert f"differs: {target}" in result.stdout
    assert "1 of" in result.stdout and "(first at y=3, x=5)" in result.stdout


def test_a_deleted_output_fails_and_names_the_file(processed, copy):
    (copy / "img00002.png").unlink()
    result = verify(str(processed / "in" / "*.jpg"), copy, "--format", "png")
    assert result.returncode == 1
    assert f"missing: {copy / 'img00002.png'}" in result.stdout


def test_sample_checks_only_that_many_inputs(processed):
    result = verify(str(processed / "in"), processed / "png", "--format", "png", "--sample", "3")
    assert result.returncode == 0
    assert "checked 3 of 8 inputs" in result.stdout


def test_no_op_is_a_usage_error(processed):
    result = run_cli("verify", "--input", str(processed / "in"), "-o", str(processed / "png"))
    assert result.returncode == 2 and "no op given" in result.stderr

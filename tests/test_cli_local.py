"""``mpi-imgproc run --local`` and ``mpi-imgproc ops`` on real files, as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import write_images

from mpi_imgproc.pipeline import Pipeline

CLI = [sys.executable, "-m", "mpi_imgproc.cli"]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_ops_json_lists_every_op_with_name_class_and_params():
    result = run_cli("ops", "--json")
    assert result.returncode == 0
    ops = json.loads(result.stdout)
    assert len(ops) >= 18
    blur = next(o for o in ops if o["name"] == "gaussian_blur")
    assert blur["class"] == "neighbourhood"
    assert {p["name"] for p in blur["params"]} == {"ksize", "sigma"}


def test_ops_text_shows_parameters_and_halo():
    out = run_cli("ops").stdout
    assert "gaussian_blur" in out and "ksize=5" in out and "halo 2 at defaults" in out


@pytest.mark.parametrize("engine", ["sequential", "threads", "processes"])
def test_run_local_tiled_equals_whole_image_reference(tmp_path, engine):
    sources = write_images(tmp_path / "in", 2, size=(97, 131))
    ops = ["--op", "grayscale", "--op", "gaussian_blur:ksize=9", "--op", "equalize_hist"]
    files = [str(p) for p in sources]
    assert run_cli("run", "--local", *files, "-o", str(tmp_path / "whole"), *ops).returncode == 0
    tiled = run_cli(
        "run",
        "--local",
        *files,
        "-o",
        str(tmp_path / "tiled"),
        *ops,
        "--tile",
        "16",
        "--engine",
        engine,
        "--workers",
        "2",
    )
    assert tiled.returncode == 0, tiled.stderr
    for source in sources:
        whole = cv2.imread(str(tmp_path / "whole" / source.name), cv2.IMREAD_UNCHANGED)
        part = cv2.imread(str(tmp_path / "tiled" / source.name), cv2.IMREAD_UNCHANGED)
        expected = Pipeline.parse(ops[1::2]).apply(cv2.imread(str(source), cv2.IMREAD_UNCHANGED))
        assert np.array_equal(whole, expected) and np.array_equal(part, expected)


def test_bad_files_get_one_line_each_and_good_ones_are_still_written(tmp_path):
    good = write_images(tmp_path / "in", 2)
    bad_dir = tmp_path / "in"
    (bad_dir / "empty.png").write_bytes(b"")
    (bad_dir / "notes.png").write_text("not an image")
    jpeg = cv2.imencode(".jpg", np.full((64, 64, 3), 90, np.uint8))[1].tobytes()
    (bad_dir / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    files = [
        str(good[0]),
        str(bad_dir / "empty.png"),
        str(bad_dir / "notes.png"),
        str(bad_dir / "cut.jpg"),
        str(bad_dir / "missing.png"),
        str(good[1]),
    ]
    result = run_cli("run", "--local", *files, "-o", str(tmp_path / "out"), "--op", "invert")
    assert result.returncode == 1
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 4
    assert any("empty.png: empty file" in e for e in errors)
    assert any("notes.png: not an image" in e for e in errors)
    assert any("cut.jpg: truncated JPEG" in e for e in errors)
    assert any("missing.png: cannot read" in e for e in errors)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["img000.png", "img001.png"]


def test_op_that_cannot_take_the_image_names_file_and_op(tmp_path):
    source = write_images(tmp_path / "in", 1)[0]
    result = run_cli(
        "run", "--local", str(source), "-o", str(tmp_path / "o"), "--op", "otsu_threshold"
    )
    assert result.returncode == 1
    assert f"{source}: otsu_threshold: needs a gray image, got BGR" in result.stderr


def test_bad_parameter_fails_before_any_file_with_exit_2(tmp_path):
    source = write_images(tmp_path / "in", 1)[0]
    result = run_cli(
        "run", "--local", str(source), "-o", str(tmp_path / "o"), "--op", "gaussian_blur:ksize=4"
    )
    assert result.returncode == 2
    assert "gaussian_blur: ksize must be odd, got 4" in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(("fmt", "suffix"), [("png", ".png"), ("jpg", ".jpg"), ("tif", ".tif")])
def test_format_choice_keeps_the_stem(tmp_path, fmt, suffix):
    source = write_images(tmp_path / "in", 1, suffix=".png")[0]
    result = run_cli(
        "run", "--local", str(source), "-o", str(tmp_path / "o"), "--op", "flip", "--format", fmt
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "o" / f"{source.stem}{suffix}").exists()


def test_json_pipeline_file(tmp_path):
    source = write_images(tmp_path / "in", 1)[0]
    spec = tmp_path / "p.json"
    spec.write_text(json.dumps([{"op": "rotate", "params": {"angle": 90}}, "grayscale"]))
    result = run_cli(
        "run", "--local", str(source), "-o", str(tmp_path / "o"), "--pipeline", str(spec)
    )
    assert result.returncode == 0, result.stderr
    out = cv2.imread(str(tmp_path / "o" / source.name), cv2.IMREAD_UNCHANGED)
    assert out.shape == (160, 120)


def test_sixteen_bit_png_round_trip(tmp_path):
    image = (np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 30).astype(np.uint16)
    src = tmp_path / "deep.png"
    cv2.imwrite(str(src), image)
    result = run_cli(
        "run",
        "--local",
        str(src),
        "-o",
        str(tmp_path / "o"),
        "--op",
        "gaussian_blur:ksize=5",
        "--tile",
        "8",
    )
    assert result.returncode == 0, result.stderr
    out = cv2.imread(str(tmp_path / "o" / "deep.png"), cv2.IMREAD_UNCHANGED)
    assert out.dtype == np.uint16
    assert np.array_equal(out, cv2.GaussianBlur(image, (5, 5), 0))


def test_jpeg_output_of_sixteen_bit_image_is_refused_clearly(tmp_path):
    src = tmp_path / "deep.png"
    cv2.imwrite(str(src), np.zeros((8, 8), np.uint16))
    result = run_cli(
        "run", "--local", str(src), "-o", str(tmp_path / "o"), "--op", "invert", "--format", "jpg"
    )
    assert result.returncode == 1
    assert "deep.png: JPEG holds 8-bit images only" in result.stderr


def test_two_inputs_with_the_same_stem_are_refused(tmp_path):
    a = write_images(tmp_path / "a", 1)[0]
    b = write_images(tmp_path / "b", 1)[0]
    result = run_cli("run", "--local", str(a), str(b), "-o", str(tmp_path / "o"), "--op", "invert")
    assert result.returncode == 2 and "would both be written to" in result.stderr


def test_outputs_get_the_usual_permissions(tmp_path):
    source = write_images(tmp_path / "in", 1)[0]
    old = os.umask(0o022)
    try:
        assert (
            run_cli(
                "run", "--local", str(source), "-o", str(tmp_path / "o"), "--op", "invert"
            ).returncode
            == 0
        )
    finally:
        os.umask(old)
    assert (tmp_path / "o" / source.name).stat().st_mode & 0o777 == 0o644

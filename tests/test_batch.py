"""``mpiexec -n N python -m mpi_imgproc.batch``: every good image written, every bad one
reported, resumable (only over outputs of the same pipeline), interruptible by SIGTERM without
partial files, and never at the cost of an input or of an earlier run's summary."""

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
    assert summary["interrupted"] and summary["not_done"] > 0
    assert proc.returncode == 3  # not finished: submit again
    written = sorted((tmp_path / "out").glob("img*.png"))
    assert len(written) == summary["ok"]
    assert not list((tmp_path / "out").glob(".*part"))
    for path in written[:5]:
        out = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(out, expected(tmp_path / "in" / path.name, ops))
    result = batch(*args, "--resume", timeout=110)
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "out").glob("img*.png"))) == 100
    resumed = json.loads((tmp_path / "out" / "batch-summary.json").read_text())
    assert resumed["skipped"] == summary["ok"]


def summary_of(folder: Path) -> dict:
    return json.loads((folder / "batch-summary.json").read_text())


def test_all_written_exits_0_and_some_bad_inputs_exit_1(tmp_path):
    make_folder(tmp_path / "in", 2)
    args = ["--output", str(tmp_path / "out"), "--op", "invert"]
    assert batch("--input", str(tmp_path / "in"), *args).returncode == 0
    add_bad_files(tmp_path / "in")
    assert batch("--input", str(tmp_path / "in"), *args).returncode == 1


def test_resume_redoes_outputs_of_another_pipeline(tmp_path):
    make_folder(tmp_path / "in", 3)
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--resume"]
    assert batch(*args, "--op", "invert").returncode == 0
    result = batch(*args, "--op", "flip")
    assert result.returncode == 0, result.stderr
    summary = summary_of(tmp_path / "out")
    assert (summary["ok"], summary["skipped"], summary["redone"]) == (3, 0, 3)
    for path in (tmp_path / "in").glob("*.png"):
        out = cv2.imread(str(tmp_path / "out" / path.name), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(out, expected(path, ["--op", "flip"]))


def test_resume_redoes_an_output_that_changed_since_it_was_written(tmp_path):
    make_folder(tmp_path / "in", 2)
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *OPS, "--resume"]
    assert batch(*args).returncode == 0
    (tmp_path / "out" / "img001.png").write_bytes(b"replaced by something else")
    result = batch(*args)
    assert result.returncode == 0, result.stderr
    assert (summary_of(tmp_path / "out")["ok"], summary_of(tmp_path / "out")["skipped"]) == (1, 1)
    out = cv2.imread(str(tmp_path / "out" / "img001.png"), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(out, expected(tmp_path / "in" / "img001.png", OPS))


def test_resume_into_the_input_folder_never_counts_the_inputs(tmp_path):
    make_folder(tmp_path / "in", 2, size=(40, 50))
    for path in list((tmp_path / "in").glob("*.png")):
        cv2.imwrite(str(path.with_suffix(".jpg")), cv2.imread(str(path)))
        path.unlink()
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "in"), "--op", "invert"]
    args += ["--format", "png", "--resume"]
    first = batch(*args)
    assert first.returncode == 0, first.stderr
    assert summary_of(tmp_path / "in")["ok"] == 2
    again = batch(*args)  # the png outputs are now in the input folder too
    assert again.returncode == 0, again.stderr
    summary = summary_of(tmp_path / "in")
    assert (summary["ok"], summary["skipped"], summary["total"]) == (0, 2, 2)
    ignored = {Path(e["path"]).name: e["reason"] for e in summary["ignored"]}
    assert ignored["img000.png"].startswith("an output of an earlier run")


def test_output_folder_equal_to_the_input_folder_is_refused_with_one_line(tmp_path):
    make_folder(tmp_path / "in", 2)
    before = {p.name: p.read_bytes() for p in (tmp_path / "in").iterdir()}
    result = batch("--input", str(tmp_path / "in"), "--output", str(tmp_path / "in"), *OPS)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: output {tmp_path / 'in' / 'img000.png'} is the input "
        f"{tmp_path / 'in' / 'img000.png'}: writing it would replace the original; choose "
        "another output folder or --format"
    ]
    assert {p.name: p.read_bytes() for p in (tmp_path / "in").iterdir()} == before


def test_a_second_run_keeps_the_first_runs_summary(tmp_path):
    make_folder(tmp_path / "in", 2)
    add_bad_files(tmp_path / "in")
    args = ["--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--op", "invert"]
    assert batch(*args).returncode == 1
    first = summary_of(tmp_path / "out")
    assert batch(*args, "--resume").returncode == 1
    second = summary_of(tmp_path / "out")
    assert second["skipped"] == 2 and second["failed"] == 3
    assert second["previous_runs"] == [first]


def test_an_unwritable_summary_still_prints_every_error_and_one_line(tmp_path):
    make_folder(tmp_path / "in", 2)
    bad = add_bad_files(tmp_path / "in")
    (tmp_path / "not-a-folder").write_text("")
    summary = tmp_path / "not-a-folder" / "summary.json"
    result = batch("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"),
                   "--op", "invert", "--summary", str(summary))  # fmt: skip
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    for name, cause in bad.items():
        assert f"{name}: {cause}" in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    counts = "2 ok, 3 failed (listed above), 0 not done"
    assert last == f"error: cannot write {summary}: Not a directory; {counts}"


def test_folder_entries_that_are_not_images_are_listed_in_the_summary(tmp_path):
    make_folder(tmp_path / "in", 1)
    (tmp_path / "in" / "anim.gif").write_bytes(b"GIF89a")
    (tmp_path / "in" / "notes.txt").write_text("x")
    (tmp_path / "in" / "sub").mkdir()
    result = batch("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *OPS)
    assert result.returncode == 0, result.stderr
    assert "3 entries not read (anim.gif, notes.txt, sub)" in result.stdout
    ignored = {Path(e["path"]).name: e["reason"] for e in summary_of(tmp_path / "out")["ignored"]}
    assert set(ignored) == {"anim.gif", "notes.txt", "sub"}
    assert ignored["anim.gif"].startswith("suffix .gif: not an image suffix")


def test_a_fifo_named_as_an_input_is_refused_without_hanging(tmp_path):
    make_folder(tmp_path / "in", 1)
    os.mkfifo(tmp_path / "pipe.png")
    inputs = ["--input", str(tmp_path / "in"), "--input", str(tmp_path / "pipe.png")]
    result = batch(*inputs, "--output", str(tmp_path / "out"), *OPS, "--shared-fs", timeout=60)
    assert result.returncode == 1
    assert f"{tmp_path / 'pipe.png'}: cannot read: a FIFO, not a regular file" in result.stderr
    assert (summary_of(tmp_path / "out")["ok"], summary_of(tmp_path / "out")["failed"]) == (1, 1)


def test_images_with_bytes_after_their_end_are_processed(tmp_path):
    (tmp_path / "in").mkdir()
    image = random_image(np.random.default_rng(2), 50, 60, 3)
    data = cv2.imencode(".jpg", image)[1].tobytes()
    (tmp_path / "in" / "camera.jpg").write_bytes(data + b"\x00" * 200 + b"maker notes")
    result = batch("--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), *OPS)
    assert result.returncode == 0, result.stderr
    out = cv2.imread(str(tmp_path / "out" / "camera.jpg"), cv2.IMREAD_UNCHANGED)
    reference = Pipeline.parse(OPS[1::2]).apply(cv2.imdecode(np.frombuffer(data, np.uint8), -1))
    assert np.array_equal(out, cv2.imdecode(cv2.imencode(".jpg", reference)[1], -1))


def test_shared_fs_reads_and_writes_region_formats_by_regions_in_nested_folders(tmp_path):
    """--shared-fs uses the by-reference machinery: a TIFF goes by regions through one chain,
    into an output folder tree that does not exist yet."""
    import tifffile

    image = random_image(np.random.default_rng(9), 300, 210, 3)
    (tmp_path / "in").mkdir()
    tifffile.imwrite(tmp_path / "in" / "scan.tif", image[..., ::-1], rowsperstrip=16)
    ops = ["--op", "crop:x=5,y=0,width=200,height=300", "--op",
           "resize:scale=0.5,interpolation=area", "--op", "sharpen"]  # fmt: skip
    out = tmp_path / "out" / "new" / "deeper"
    done = batch("--input", str(tmp_path / "in"), "--output", str(out), *ops, "--format", "same",
                 "--shared-fs")  # fmt: skip
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "batch-summary.json").read_text())
    assert [r["path"] for r in summary["images"]] == ["regions"]
    written = cv2.imread(summary["images"][0]["output"], cv2.IMREAD_UNCHANGED)
    assert np.array_equal(written, Pipeline.parse(ops[1::2]).apply(image))


def test_shared_fs_streams_png_from_the_stream_min_mb_it_is_given(tmp_path):
    """--stream-min-mb applies to batch mode as to the server: a small PNG is streamed by
    rank 0 strip by strip at 0, and goes the usual way at the default."""
    pytest.importorskip("pyvips")
    image = random_image(np.random.default_rng(10), 200, 150, 3)
    (tmp_path / "in").mkdir()
    cv2.imwrite(str(tmp_path / "in" / "a.png"), image)
    paths = []
    for extra in (["--stream-min-mb", "0"], []):
        out = tmp_path / f"out{len(paths)}"
        done = batch("--input", str(tmp_path / "in"), "--output", str(out), "--op", "sharpen",
                     "--format", "same", "--shared-fs", *extra)  # fmt: skip
        assert done.returncode == 0, done.stderr
        summary = json.loads((out / "batch-summary.json").read_text())
        paths.append(summary["images"][0]["path"])
        written = cv2.imread(summary["images"][0]["output"], cv2.IMREAD_UNCHANGED)
        assert np.array_equal(written, Pipeline.parse(["sharpen"]).apply(image))
    assert paths[0] == "regions" and paths[1] != "regions"

"""``mpi_imgproc.imageio``: files as users have them — bytes after the end, truncated files,
FIFOs named like images, and folders with entries that are not images."""

from __future__ import annotations

import os
import threading
import time

import cv2
import numpy as np
import pytest
from conftest import random_image

from mpi_imgproc.errors import ImageReadError
from mpi_imgproc.imageio import decode, jpeg_end, list_inputs, png_end, probe, read_bytes

pytestmark = pytest.mark.timeout(30)
TRAILER = b"\x00\x01 camera maker notes, an editor's history, or a second image \xff\xd8\xff"


@pytest.fixture
def image(rng) -> np.ndarray:
    return random_image(rng, 61, 83, 3)


def jpeg(image: np.ndarray, *params: int) -> bytes:
    return cv2.imencode(".jpg", image, list(params))[1].tobytes()


def png(image: np.ndarray) -> bytes:
    return cv2.imencode(".png", image)[1].tobytes()


def with_app_segment(data: bytes, payload: bytes) -> bytes:
    """``data`` with an APP1 segment right after its SOI (where EXIF and its thumbnail go)."""
    segment = b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload
    return data[:2] + segment + data[2:]


@pytest.mark.parametrize(
    "params",
    [(), (cv2.IMWRITE_JPEG_PROGRESSIVE, 1), (cv2.IMWRITE_JPEG_RST_INTERVAL, 2)],
    ids=["baseline", "progressive", "restart-markers"],
)
def test_jpeg_with_bytes_after_its_end_decodes_as_without(image, params):
    data = jpeg(image, *params)
    assert np.array_equal(decode(data + TRAILER), decode(data))


def test_png_with_bytes_after_iend_decodes_as_without(image):
    data = png(image)
    assert np.array_equal(decode(data + TRAILER), image)


def test_jpeg_end_is_found_past_a_thumbnail_with_its_own_end_marker(image):
    thumbnail = jpeg(image[:8, :8])
    data = with_app_segment(jpeg(image), b"Exif\x00\x00" + thumbnail)
    assert jpeg_end(data) == len(data)
    assert np.array_equal(decode(data + TRAILER), decode(jpeg(image)))


def test_jpeg_cut_after_a_thumbnail_is_still_truncated(image):
    data = with_app_segment(jpeg(image), b"Exif\x00\x00" + jpeg(image[:8, :8]))
    cut = data[: len(data) * 2 // 3]
    assert cut.count(b"\xff\xd9") >= 1  # an end marker, but the thumbnail's
    with pytest.raises(ImageReadError, match="truncated JPEG"):
        decode(cut)


@pytest.mark.parametrize("keep", [0.5, 0.9, -2, -1])
def test_truncated_jpeg_is_reported(image, keep):
    data = jpeg(image)
    cut = data[: int(len(data) * keep)] if keep > 0 else data[:keep]
    with pytest.raises(ImageReadError, match="truncated JPEG"):
        decode(cut)


@pytest.mark.parametrize("drop", [1, 12, 100])
def test_truncated_png_is_reported(image, drop):
    data = png(image)
    assert png_end(data) == len(data)
    with pytest.raises(ImageReadError, match="truncated PNG"):
        decode(data[:-drop])


def fifo(tmp_path, name: str = "pipe.png"):
    path = tmp_path / name
    os.mkfifo(path)
    return path


def returns_promptly(call) -> object:
    """``call()``'s result, failing (instead of hanging the suite) if it blocks."""
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(_capture(call)), daemon=True)
    thread.start()
    thread.join(5)
    assert outcome, "blocked on a FIFO"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def _capture(call):
    try:
        return call()
    except BaseException as exc:  # noqa: BLE001 - handed back to the test's thread
        return exc


def test_reading_a_fifo_is_refused_without_blocking(tmp_path):
    path = fifo(tmp_path)
    with pytest.raises(ImageReadError, match="a FIFO, not a regular file"):
        returns_promptly(lambda: read_bytes(path))


def test_probing_a_fifo_gives_no_size_without_blocking(tmp_path):
    assert returns_promptly(lambda: probe(fifo(tmp_path))) is None


def test_reading_a_folder_is_refused(tmp_path):
    with pytest.raises(ImageReadError, match="a folder, not a regular file"):
        read_bytes(tmp_path)


def test_folder_entries_that_are_not_read_are_listed_with_their_reason(tmp_path, image):
    cv2.imwrite(str(tmp_path / "a.png"), image)
    (tmp_path / "anim.gif").write_bytes(b"GIF89a")
    (tmp_path / "sub").mkdir()
    fifo(tmp_path, "pipe.png")
    files, left_out = list_inputs([str(tmp_path)])
    assert files == [str(tmp_path / "a.png")]
    reasons = {os.path.basename(path): why for path, why in left_out}
    assert set(reasons) == {"anim.gif", "sub", "pipe.png"}
    assert reasons["anim.gif"].startswith("suffix .gif: not an image suffix")
    assert reasons["sub"].startswith("a folder")
    assert reasons["pipe.png"] == "a FIFO, not a regular file"


def test_a_glob_leaves_out_folders_and_fifos_and_says_so(tmp_path, image):
    cv2.imwrite(str(tmp_path / "a.png"), image)
    (tmp_path / "b.png").mkdir()
    fifo(tmp_path, "c.png")
    files, left_out = list_inputs([str(tmp_path / "*.png")])
    assert files == [str(tmp_path / "a.png")]
    assert [os.path.basename(p) for p, _ in left_out] == ["b.png", "c.png"]


def test_a_named_path_is_kept_so_that_reading_it_reports_it(tmp_path):
    path = fifo(tmp_path)
    assert list_inputs([str(path)]) == ([str(path)], [])


def test_finding_the_end_of_a_large_jpeg_is_cheap(rng):
    data = jpeg(random_image(rng, 2000, 3000, 3), cv2.IMWRITE_JPEG_QUALITY, 100)
    started = time.perf_counter()
    assert jpeg_end(data) == len(data)
    assert time.perf_counter() - started < 1.0

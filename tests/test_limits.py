"""Pixel limits hold before the memory is spent: op output shapes are known without running,
encoded images are sized from their headers, and run_image_task refuses before decoding."""

from __future__ import annotations

import io
import json
import re
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import random_image
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image
from strategies import OP_SPECS, images, pipelines

from mpi_imgproc import imagetask
from mpi_imgproc.errors import ImgprocError, InvalidParameter, LimitExceeded, UnsupportedImage
from mpi_imgproc.imageio import decode, encode, probe
from mpi_imgproc.imagetask import ENCODED, PATH, PIXELS, as_buffer, run_image_task
from mpi_imgproc.ops import REGISTRY
from mpi_imgproc.pipeline import Pipeline, parse_spec

LIMIT = 400_000_000
HUGE_SIDE = 30_000  # 9e8 pixels: 900 MB once decoded to 8-bit gray
SHAPES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _run_or_none(fn, *args):
    """The result, or None when running refuses the input (unsupported depth, bad crop)."""
    try:
        return fn(*args)
    except ImgprocError:
        return None


# ------------------------------------------------------------------------ op output shapes


@SHAPES
@given(data=st.data(), image=images(max_side=40))
def test_output_shape_equals_the_result_shape_of_every_op(data, image):
    name = data.draw(st.sampled_from(sorted(REGISTRY)))
    step = parse_spec(data.draw(OP_SPECS[name]))
    result = _run_or_none(step.run, image)
    assume(result is not None)
    assert step.op.output_shape(image.shape, step.params) == result.shape


resize_specs = st.one_of(
    st.floats(0.01, 8).map(lambda s: f"resize:scale={s:.3f}"),
    st.integers(1, 90).map(lambda w: f"resize:width={w}"),
    st.integers(1, 90).map(lambda h: f"resize:height={h}"),
    st.tuples(st.integers(1, 90), st.integers(1, 90)).map(
        lambda wh: f"resize:width={wh[0]},height={wh[1]}"
    ),
)


@SHAPES
@given(spec=resize_specs, height=st.integers(1, 60), width=st.integers(1, 60))
def test_resize_output_shape_equals_the_result_for_scale_width_and_height(spec, height, width):
    step = parse_spec(spec)
    image = np.zeros((height, width, 3), np.uint8)
    assert step.op.output_shape(image.shape, step.params) == step.run(image).shape


crop_specs = st.tuples(*[st.integers(0, 30)] * 4).map(
    lambda v: f"crop:x={v[0]},y={v[1]},width={v[2]},height={v[3]}"
)


@SHAPES
@given(spec=crop_specs, height=st.integers(1, 30), width=st.integers(1, 30))
def test_crop_output_shape_equals_the_result_or_raises_the_same_error(spec, height, width):
    step = parse_spec(spec)
    image = np.zeros((height, width), np.uint16)
    try:
        expected = step.run(image).shape
    except InvalidParameter as exc:
        with pytest.raises(InvalidParameter, match=f"^{re.escape(str(exc))}$"):
            step.op.output_shape(image.shape, step.params)
    else:
        assert step.op.output_shape(image.shape, step.params) == expected


@pytest.mark.parametrize("angle", [90, 180, 270])
def test_rotate_turns_the_canvas_without_enlarging_it(angle):
    step = parse_spec(f"rotate:angle={angle}")
    image = np.zeros((5, 8, 4), np.uint8)
    assert step.op.output_shape(image.shape, step.params) == step.run(image).shape
    assert step.op.output_shape(image.shape, step.params)[:2] == (
        (5, 8) if angle == 180 else (8, 5)
    )


@pytest.mark.parametrize("name", ["grayscale", "canny"])
def test_ops_that_make_one_channel_drop_the_channel_axis(name):
    assert REGISTRY[name].output_shape((6, 9, 4), REGISTRY[name].bind()) == (6, 9)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_output_shape_of_a_unit_channel_axis_matches_the_result_up_to_that_axis(name):
    step = parse_spec("resize:scale=0.5" if name == "resize" else name)
    image = np.zeros((7, 9, 1), np.uint8)
    result = step.run(image)
    assert step.op.output_shape(image.shape, step.params) == result.shape[:2]


@pytest.mark.parametrize("shape", [(4,), (4, 5, 2), (0, 5), (4, 0, 3)])
def test_output_shape_refuses_shapes_that_are_no_image(shape):
    with pytest.raises(UnsupportedImage):
        REGISTRY["invert"].output_shape(shape, {})


# ----------------------------------------------------------------------- pipeline shapes


def test_output_shapes_gives_the_shape_after_each_step():
    pipeline = Pipeline.parse(["resize:width=100", "rotate", "crop:width=10", "grayscale"])
    image = np.zeros((50, 200, 3), np.uint8)
    expected = []
    for step in pipeline.steps:
        image = step.run(image)
        expected.append(image.shape)
    assert expected == [(25, 100, 3), (100, 25, 3), (100, 10, 3), (100, 10)]
    assert pipeline.output_shapes((50, 200, 3)) == expected


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=pipelines, image=images(max_side=32))
def test_pipeline_output_shape_equals_the_shape_apply_gives(specs, image):
    pipeline = Pipeline.parse(specs)
    result = _run_or_none(pipeline.apply, image)
    assume(result is not None)
    assert pipeline.output_shape(image.shape) == result.shape


# ----------------------------------------------------------------------- limit checking


def test_a_step_whose_output_is_over_the_limit_is_named_with_its_size():
    pipeline = Pipeline.parse(["invert", "resize:width=60000,height=60000"])
    with pytest.raises(LimitExceeded) as info:
        pipeline.check_pixel_limit((100, 100, 3), LIMIT)
    assert str(info.value) == (
        "resize: output 60000x60000 has more than the server's limit of 400000000 pixels "
        "(--max-pixels)"
    )


def test_an_input_over_the_limit_is_named_as_the_input_width_by_height():
    with pytest.raises(LimitExceeded, match=r"^input 30000x20000 has more than the server's"):
        Pipeline.parse(["invert"]).check_pixel_limit((20_000, 30_000), LIMIT)


def test_an_intermediate_output_over_the_limit_is_refused_even_if_the_result_is_small():
    pipeline = Pipeline.parse(["resize:scale=100", "resize:width=10"])
    with pytest.raises(LimitExceeded, match=r"^resize: output 30000x30000 "):
        pipeline.check_pixel_limit((300, 300), LIMIT)


def test_outputs_of_exactly_the_limit_pass():
    Pipeline.parse(["resize:width=200,height=50"]).check_pixel_limit((10, 10), 200 * 50)
    with pytest.raises(LimitExceeded):
        Pipeline.parse(["resize:width=201,height=50"]).check_pixel_limit((10, 10), 200 * 50)


def test_parameters_that_do_not_fit_are_left_for_the_run_to_report():
    Pipeline.parse(["crop:x=500", "resize:scale=100"]).check_pixel_limit((100, 100), 10_000)


def test_imagetask_check_pixel_limit_keeps_its_message():
    with pytest.raises(LimitExceeded, match=r"^30x20 has more than the server's limit of 100 "):
        imagetask.check_pixel_limit((20, 30, 3), 100)
    imagetask.check_pixel_limit((10, 10), 100)


# ----------------------------------------------------------------------- header probing


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_without_pixels(height: int, width: int) -> bytes:
    """A PNG whose header declares the size, with an empty IDAT: no pixel data at all."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", b"")
        + _png_chunk(b"IEND", b"")
    )


ENCODINGS = [
    ((20, 30), np.uint8, ".png"),
    ((20, 30), np.uint16, ".png"),
    ((20, 30, 3), np.uint16, ".png"),
    ((20, 30, 4), np.uint8, ".png"),
    ((20, 30), np.uint8, ".jpg"),
    ((20, 30, 3), np.uint8, ".jpg"),
    ((20, 30, 3), np.uint16, ".tif"),
    ((20, 30, 4), np.uint8, ".tif"),
    ((20, 30, 3), np.uint8, ".bmp"),
    ((20, 30), np.uint16, ".pgm"),
    ((20, 30, 3), np.uint8, ".webp"),
    ((20, 30, 4), np.uint8, ".webp"),
]


@pytest.mark.parametrize(("shape", "dtype", "ext"), ENCODINGS)
def test_probe_reads_what_decode_will_give_from_the_header(shape, dtype, ext):
    data = encode(np.zeros(shape, dtype), ext)
    image = decode(data)
    nch = 1 if image.ndim == 2 else image.shape[2]
    assert probe(data) == (image.shape[0], image.shape[1], nch, image.dtype.itemsize)


@pytest.mark.parametrize("transparency", [None, 0])
def test_probe_reads_gif_size_and_transparency(transparency):
    buffer = io.BytesIO()
    extra = {} if transparency is None else {"transparency": transparency}
    Image.new("P", (30, 20)).save(buffer, "GIF", **extra)
    data = buffer.getvalue()
    image = decode(data)
    assert probe(data) == (20, 30, image.shape[2], 1)


def test_probe_reads_a_path(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(encode(np.zeros((20, 30, 3), np.uint8), "png"))
    assert probe(path) == probe(str(path)) == (20, 30, 3, 1)


@pytest.mark.parametrize(
    "data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0\x00"]
)
def test_probe_gives_none_when_the_size_cannot_be_known(data):
    assert probe(data) is None


def test_probe_gives_none_for_a_missing_path(tmp_path):
    assert probe(tmp_path / "missing.png") is None


def test_probe_sizes_a_huge_image_without_pillow_bomb_checks_or_changing_them():
    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail the test
        assert probe(_png_without_pixels(60_000, 50_000)) == (60_000, 50_000, 1, 1)
    assert Image.MAX_IMAGE_PIXELS == before


# ------------------------------------------------------------------------ run_image_task


def _write_huge_png(path: Path, side: int) -> None:
    """An all-zero 1-bit gray PNG, streamed: megabytes to write, ``side``² bytes to decode."""
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    row = bytes(1 + (side + 7) // 8)  # filter byte 0, then the packed bits

    compressor = zlib.compressobj(9)
    block = row * 1000
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr))
        for start in range(0, side, 1000):
            rows = min(1000, side - start)
            f.write(_png_chunk(b"IDAT", compressor.compress(block[: rows * len(row)])))
        f.write(_png_chunk(b"IDAT", compressor.flush()) + _png_chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    _write_huge_png(path, HUGE_SIDE)
    return path


def test_the_huge_png_is_small_and_declares_its_size(huge_png):
    assert huge_png.stat().st_size < 2_000_000
    assert probe(huge_png) == (HUGE_SIDE, HUGE_SIDE, 1, 1)


_MEASURE = """
import json, resource, sys
from mpi_imgproc.errors import LimitExceeded
from mpi_imgproc.imagetask import as_buffer, run_image_task

path, kind = sys.argv[1], sys.argv[2]
spec = {"pipeline": ["invert"], "input": kind, "output": "pixels", "max_pixels": 400_000_000}
payload = None
if kind == "path":
    spec["source"] = path
else:
    payload = as_buffer(open(path, "rb").read())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    run_image_task(spec, payload)
    error = None
except LimitExceeded as exc:
    error = str(exc)
grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"error": error, "grown_kib": grown_kib}))
"""


@pytest.mark.parametrize("kind", [ENCODED, PATH])
def test_a_huge_png_is_refused_without_the_process_growing(huge_png, kind):
    # A fresh process, so that its peak RSS before the call is its RSS then: any decoding
    # (900 MB) would raise the peak.
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(huge_png), kind],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["error"] == (
        "input 30000x30000 has more than the server's limit of 400000000 pixels (--max-pixels)"
    )
    assert report["grown_kib"] < 100 * 1024


def _spec(kind: str, pipeline: list[str], max_pixels: int, source: str = "") -> dict:
    spec = {"pipeline": pipeline, "input": kind, "output": PIXELS, "max_pixels": max_pixels}
    if kind == PATH:
        spec["source"] = source
    return spec


def _task(kind: str, image: np.ndarray, tmp_path: Path, pipeline: list[str], max_pixels: int):
    data = encode(image, "png")
    path = tmp_path / "in.png"
    path.write_bytes(data)
    payload = {PIXELS: image, ENCODED: as_buffer(data), PATH: None}[kind]
    return _spec(kind, pipeline, max_pixels, str(path)), payload


@pytest.mark.parametrize("kind", [PIXELS, ENCODED, PATH])
def test_a_resize_over_the_limit_is_refused_naming_resize(kind, rng, tmp_path):
    image = random_image(rng, 50, 40)
    spec, payload = _task(kind, image, tmp_path, ["gaussian_blur", "resize:scale=4"], 10_000)
    with pytest.raises(LimitExceeded, match=r"^resize: output 160x200 has more than .* 10000 "):
        run_image_task(spec, payload)


@pytest.mark.parametrize("kind", [ENCODED, PATH])
def test_an_encoded_image_over_the_limit_is_refused_without_decoding(kind, tmp_path, monkeypatch):
    def no_decode(data):
        raise AssertionError("decoded an image the header had already refused")

    monkeypatch.setattr(imagetask, "decode", no_decode)
    image = np.zeros((50, 40), np.uint8)
    spec, payload = _task(kind, image, tmp_path, ["resize:scale=4"], 10_000)
    with pytest.raises(LimitExceeded, match=r"^resize: output"):
        run_image_task(spec, payload)


def test_an_image_the_header_does_not_size_is_checked_after_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(imagetask, "probe", lambda data: None)
    spec, payload = _task(ENCODED, np.zeros((50, 40), np.uint8), tmp_path, ["invert"], 1_000)
    with pytest.raises(LimitExceeded, match=r"^input 40x50 has more than"):
        run_image_task(spec, payload)


@pytest.mark.parametrize("kind", [PIXELS, ENCODED, PATH])
def test_images_within_the_limit_still_run(kind, rng, tmp_path):
    image = random_image(rng, 50, 40)
    pipeline = ["gaussian_blur", "resize:scale=2", "rotate"]
    spec, payload = _task(kind, image, tmp_path, pipeline, 100 * 80)
    result, fields = run_image_task(spec, payload)
    expected = Pipeline.parse(pipeline).apply(image)
    assert np.array_equal(result, expected)
    assert fields["out_shape"] == [80, 100, 3]


def test_a_task_without_a_limit_is_not_checked(rng, tmp_path):
    spec, payload = _task(ENCODED, random_image(rng, 50, 40), tmp_path, ["resize:scale=4"], 0)
    del spec["max_pixels"]
    result, _ = run_image_task(spec, payload)
    assert result.shape == (200, 160, 3)


def test_a_missing_path_is_still_reported_as_unreadable(tmp_path):
    spec = _spec(PATH, ["invert"], LIMIT, str(tmp_path / "missing.png"))
    with pytest.raises(ImgprocError, match="^cannot read: "):
        run_image_task(spec, None)


def test_encoded_input_shape_is_what_cv2_decodes(tmp_path):
    # The probe-then-decode path gives the very pixels a plain decode gives.
    image = np.arange(20 * 30 * 4, dtype=np.uint16).reshape(20, 30, 4)
    data = encode(image, "png")
    result, _ = run_image_task(_spec(ENCODED, ["flip"], LIMIT), as_buffer(data))
    assert np.array_equal(result, cv2.flip(decode(data), 1))

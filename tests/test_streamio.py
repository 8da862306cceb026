"""Streamed decode (libvips through pyvips) gives OpenCV's pixels, strip by strip, and the
streamed encode gives OpenCV's files.

The files streamed are exactly those whose pixels the two libraries read alike; the others are
refused here (and take the usual path).  The encoder's PNG is lossless, so it is checked bit
for bit; its JPEG byte for byte against ``cv2.imencode`` of the whole image.
"""

from __future__ import annotations

import io
import threading
from unittest.mock import patch

import cv2
import numpy as np
import pytest
from PIL import Image

from mpi_imgproc import streamio
from mpi_imgproc.errors import ImageWriteError
from mpi_imgproc.regionio import create_output

needs_vips = pytest.mark.skipif(not streamio.available(), reason="pyvips (libvips) not installed")


def _photo(rng, height=301, width=217, channels=3, dtype=np.uint8):
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([np.sin(x / 9) * 80 + 128, np.cos(y / 13) * 80 + 128, (x + y) % 256], -1)
    base = base[..., :channels] if channels <= 3 else np.dstack([base, (x * 3) % 256])
    noisy = (base + rng.integers(0, 24, base.shape)).clip(0, 255)
    out = noisy.astype(np.uint8)
    if dtype == np.uint16:
        out = out.astype(np.uint16) * 257 + rng.integers(0, 256, out.shape).astype(np.uint16)
    return out[..., 0] if channels == 1 else out


def _pil(image, fmt, **options):
    buf = io.BytesIO()
    Image.fromarray(image[..., ::-1] if image.ndim == 3 else image).save(buf, fmt, **options)
    return buf.getvalue()


FILES = {
    "baseline.jpg": lambda im: cv2.imencode(".jpg", im)[1].tobytes(),
    "subsampled-422.jpg": lambda im: _pil(im, "JPEG", quality=85, subsampling=1),
    "gray.jpg": lambda im: cv2.imencode(".jpg", im[..., 1])[1].tobytes(),
    "rgb.png": lambda im: cv2.imencode(".png", im)[1].tobytes(),
    "gray.png": lambda im: cv2.imencode(".png", im[..., 0])[1].tobytes(),
    "rgba.png": lambda im: cv2.imencode(".png", np.dstack([im, im[..., 2]]))[1].tobytes(),
    "deep.png": lambda im: cv2.imencode(".png", im.astype(np.uint16) * 257 + 3)[1].tobytes(),
}


def _decode(root, name):
    shape, dtype = streamio.streamable(str(root), str(root / name))
    target = str(root / f"{name}.npy")
    create_output(target, shape, dtype)
    decoder = streamio.Decoder(str(root), str(root / name), target)
    decoder.run()
    assert decoder.error is None, decoder.error
    return np.load(target)


@needs_vips
@pytest.mark.parametrize("name", sorted(FILES))
def test_streamed_decode_gives_opencvs_pixels(tmp_path, name):
    image = _photo(np.random.default_rng(len(name)))
    (tmp_path / name).write_bytes(FILES[name](image))
    expected = cv2.imread(str(tmp_path / name), cv2.IMREAD_UNCHANGED)
    got = _decode(tmp_path, name)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert np.array_equal(got, expected)


@needs_vips
@pytest.mark.parametrize(
    "name, data",
    [
        ("palette.png", None),
        ("progressive.jpg", None),
        ("interlaced.png", None),
        ("gray-alpha.png", None),
        ("cmyk.jpg", None),
        ("transparent.png", None),
    ],
)
def test_files_the_libraries_read_differently_are_not_streamed(tmp_path, name, data):
    image = _photo(np.random.default_rng(1))
    rgb = Image.fromarray(image[..., ::-1])
    buf = io.BytesIO()
    if name == "palette.png":
        rgb.convert("P").save(buf, "PNG")
    elif name == "gray-alpha.png":
        rgb.convert("LA").save(buf, "PNG")
    elif name == "cmyk.jpg":
        rgb.convert("CMYK").save(buf, "JPEG")
    elif name == "progressive.jpg":  # libvips would hold these whole to decode them
        buf.write(cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes())
    elif name == "interlaced.png":  # Pillow and OpenCV write no interlaced PNG; libvips does
        import pyvips

        rgb_array = np.ascontiguousarray(image[..., ::-1])
        vips = pyvips.Image.new_from_memory(rgb_array.data, image.shape[1], image.shape[0], 3,
                                            "uchar")  # fmt: skip
        buf.write(vips.pngsave_buffer(interlace=True))
    else:
        rgb.save(buf, "PNG", transparency=(0, 0, 0))
    (tmp_path / name).write_bytes(buf.getvalue())
    assert streamio.streamable(str(tmp_path), str(tmp_path / name)) is None


def _encode(root, pixels, name, order):
    """Encode ``pixels`` (from a raw .npy) into ``name``, its strips finished in ``order``."""
    source = str(root / f"{name}.rows.npy")
    create_output(source, pixels.shape, pixels.dtype)
    np.load(source, mmap_mode="r+")[...] = pixels
    encoder = streamio.Encoder(str(root), source, str(root / name), pixels.shape, pixels.dtype)
    runner = threading.Thread(target=encoder.run)
    runner.start()
    strips = [(y, min(len(pixels), y + 40)) for y in range(0, len(pixels), 40)]
    for y0, y1 in strips[::-1] if order == "backwards" else strips:
        encoder.finish(y0, y1)
    runner.join(30)
    assert not runner.is_alive() and encoder.error is None, encoder.error


@pytest.mark.parametrize("order", ["forwards", "backwards"])
@pytest.mark.parametrize("channels, dtype", [(3, np.uint8), (1, np.uint8), (3, np.uint16)])
def test_streamed_png_is_lossless_whatever_order_strips_finish_in(tmp_path, order, channels, dtype):
    pixels = _photo(np.random.default_rng(3), channels=channels, dtype=dtype)
    _encode(tmp_path, pixels, "out.png", order)
    written = cv2.imread(str(tmp_path / "out.png"), cv2.IMREAD_UNCHANGED)
    assert written.dtype == pixels.dtype and np.array_equal(written, pixels)


@pytest.mark.parametrize("shape", [(301, 203, 3), (77, 1000, 3), (150, 97), (8, 8, 3), (1, 1)])
def test_streamed_jpeg_is_opencvs_whole_image_encoding_byte_for_byte(tmp_path, shape):
    """Blocks of whole MCU rows, encoded alone and joined with restart markers, are exactly
    ``cv2.imencode`` of the whole image with that restart interval; and they decode to the
    pixels of OpenCV's plain encoding.  Blocks of one MCU row here, so that the markers'
    numbers wrap around (RST0-RST7, 18 of them on the first image) and the last is short."""
    channels = shape[2] if len(shape) == 3 else 1
    pixels = _photo(np.random.default_rng(4), shape[0], shape[1], channels)
    with patch.object(streamio, "ENCODE_BLOCK_BYTES", pixels[:1].nbytes):
        _encode(tmp_path, pixels, "out.jpg", "backwards")
    written = (tmp_path / "out.jpg").read_bytes()
    mcu = 16 if channels == 3 else 8
    assert streamio.jpeg_block_rows(pixels.shape, 1) == mcu
    params = [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_RST_INTERVAL, -(-shape[1] // mcu)]
    assert written == cv2.imencode(".jpg", pixels, params)[1].tobytes()
    markers = sum(written.count(bytes([0xFF, 0xD0 + n])) for n in range(8))
    assert markers == -(-shape[0] // mcu) - 1  # one before every block but the first
    plain = cv2.imdecode(cv2.imencode(".jpg", pixels)[1], cv2.IMREAD_UNCHANGED)
    assert np.array_equal(cv2.imdecode(np.frombuffer(written, np.uint8), -1), plain)


@needs_vips
def test_a_truncated_jpeg_is_an_error_not_a_short_image(tmp_path):
    data = FILES["baseline.jpg"](_photo(np.random.default_rng(5)))
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    shape, dtype = streamio.streamable(str(tmp_path), str(tmp_path / "cut.jpg"))
    create_output(str(tmp_path / "cut.npy"), shape, dtype)
    decoder = streamio.Decoder(str(tmp_path), str(tmp_path / "cut.jpg"), str(tmp_path / "cut.npy"))
    decoder.run()
    assert decoder.error is not None and decoder.rows < shape[0]
    assert decoder.error[0] == "image_read_error", decoder.error


def test_a_jpeg_stream_that_ends_early_is_an_error_not_a_short_image():
    """The frame header declares the whole height; fewer rows must not end in a valid EOI."""
    pixels = _photo(np.random.default_rng(6), 64, 64)
    pieces = streamio.jpeg_stream(iter([pixels[:16]]), pixels.shape, 16)
    with pytest.raises(OSError, match="stopped at row 16 of 64"):
        b"".join(pieces)


def test_scratch_space_is_checked_before_anything_is_written(tmp_path):
    with pytest.raises(ImageWriteError, match="the output needs .* GiB of free space"):
        streamio.check_scratch(str(tmp_path), 2**62)


def test_an_encode_that_cannot_be_done_ends_with_its_reason_instead_of_waiting(tmp_path):
    """A JPEG wider than libjpeg allows: the encoder says why at once, without waiting for
    rows (streaming never sends such an output here: ``encodable`` says no)."""
    shape = (40, 70000, 3)
    source = str(tmp_path / "rows.npy")
    create_output(source, shape, np.uint8)
    assert not streamio.encodable(str(tmp_path / "out.jpg"), shape, np.dtype(np.uint8))
    encoder = streamio.Encoder(str(tmp_path), source, str(tmp_path / "out.jpg"), shape, np.uint8)
    encoder.start()
    encoder.finish(0, 20)  # half the rows
    encoder.join(30)
    assert not encoder.is_alive() and encoder.finished
    assert encoder.error[0] == "image_write_error" and "65500" in encoder.error[1]
    assert not (tmp_path / "out.jpg").exists()


def test_scratch_files_are_created_exclusively_never_through_a_planted_symlink(tmp_path):
    from mpi_imgproc.datapaths import create_beneath
    from mpi_imgproc.errors import PathRefused

    root = tmp_path / "root"
    (root / "out").mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    planted = root / "out" / ".o.png.in.part.npy"
    planted.symlink_to(victim)
    make = lambda path: create_output(path, (4, 4), np.uint8, name=str(planted))  # noqa: E731
    with pytest.raises(PathRefused, match="already there"):
        create_beneath(str(root), str(planted), make)
    assert victim.read_text() == "keep me"
    fresh = root / "out" / ".o.png.x.in.part.npy"
    create_beneath(
        str(root), str(fresh), lambda p: create_output(p, (4, 4), np.uint8, name=str(fresh))
    )
    assert np.load(fresh).shape == (4, 4)

"""Streamed decode and encode for files without random access (baseline JPEG, PNG).

A by-reference image in such a format is never held whole by any process.  Rank 0 decodes it
with libvips (through pyvips, in sequential mode: libvips keeps a few strips in memory) into a
raw ``.npy`` beside the output, strip after strip, on a thread of its own; the workers' region
tasks (:mod:`mpi_imgproc.regionio`) are handed out as soon as the rows each one reads are
there, so compute overlaps decode.  Output likewise: the workers write their rows into a raw
``.npy``, and an encoder thread on rank 0 encodes the rows in order, a block at a time, as
they are finished, so encoding overlaps compute too.  Both temporary files live in the
output's folder (every rank sees it) and are removed when the image ends, however it ends.

Why libvips for decoding: it is the library built for exactly this (demand-driven, strip-wise
codecs on libjpeg-turbo and libpng), and ``pyvips[binary]`` ships it as a wheel.  Its decoder
gives the same pixels as OpenCV's for the files streamed here (8-bit JPEG with 1 or 3
components, PNG gray, RGB or RGBA, 8 or 16 bits, no palette or ``tRNS``;
``tests/test_streamio.py`` checks it); other files take the usual path.

Encoding needs no library of its own.  A JPEG is OpenCV's (libjpeg-turbo) encoding of blocks of
whole MCU rows, joined with restart markers (:func:`jpeg_stream`): byte for byte what
``cv2.imencode`` writes for the whole image with that restart interval, and the same pixels
as its plain encoding.  (It replaced libvips' encoder, fed a PNG through a pipe: that cost
about three times the CPU and 40 MiB on rank 0, and its bytes matched no OpenCV encoding.)
A PNG is framed here (:func:`png_stream`, zlib, filter 0), so its pixels are exact.  Writing
goes into a partial file renamed into place.
"""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .datapaths import fd_path, open_beneath, open_entry, unlink_beneath, use_beneath
from .errors import ImageReadError, ImageWriteError, ImgprocError, describe, error_code
from .imageio import jpeg_header, probe
from .regionio import pwrite_all, swap_red_blue

STREAM_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"})
# Rows decoded (and made available to workers) at a time.  libvips' sequential JPEG decode
# holds more the more rows are asked at once: in the libvips task (a 10000-wide RGB JPEG)
# rank 0 peaked at about 180 MiB with 32 rows, 188 with 64 and 208 with 128, while 32 rows
# looked slower (the time is noisy here); 64 is the middle.
STRIP_ROWS = 64
# Below this many bytes of pixels, a JPEG or PNG goes the usual way (one worker decodes, runs
# and encodes it, or rank 0 decodes it and tiles it): a thread and two scratch files would cost
# more than they save.  The server's --stream-min-mb sets it.
STREAM_MIN_BYTES = 32 << 20
MAX_ROW_BYTES = 64 << 20  # a wider image is not streamed (a strip holds at least one row)
# Rows handed to the encoder at a time: each block is read, reordered, framed and compressed,
# a few copies of it at once; 1 MiB (not 4) took 20 MiB off an encode measured alone.
ENCODE_BLOCK_BYTES = 1 << 20
STRIP_BYTES = 16 << 20  # at most this much of the image is decoded at a time
JPEG_MAX_SIDE = 65500  # libjpeg's limit


@cache
def available() -> bool:
    """Whether libvips can be loaded here (``pip install pyvips[binary]``)."""
    try:
        import pyvips
    except (ImportError, OSError):
        return False
    # Every stream is read once, in order: libvips' cache of operations (up to 100 MiB and
    # 100 operations by default) would only hold memory on rank 0.  And its decoders here are
    # serial (libjpeg, libpng), with nothing to compute after them: one libvips thread (not
    # one per core) decoded a 10000x10000 JPEG as fast, with 6 MiB less (measured alone).
    pyvips.cache_set_max(0)
    pyvips.cache_set_max_mem(0)
    pyvips.concurrency_set(1)
    return True


def temporary(target: str, role: str, tag: str = "") -> str:
    """A hidden raw file beside ``target`` for its decoded input or its rows before encoding;
    ``tag`` (a job's and image's) keeps two jobs writing one target apart."""
    path = Path(target)
    return str(path.with_name(f".{path.name}{f'.{tag}' if tag else ''}.{role}.part.npy"))


def _png_is_plain(fp: Any) -> bool:
    """A PNG whose pixels OpenCV and libvips read alike: gray, RGB or RGBA, no palette, no
    ``tRNS`` transparency chunk."""
    head = fp.read(33)
    if head[:8] != b"\x89PNG\r\n\x1a\n" or len(head) < 33:
        return False
    if head[25] not in (0, 2, 6) or head[28] != 0:  # gray, RGB, RGBA; not interlaced
        return False
    fp.seek(33)
    while True:
        chunk = fp.read(8)
        if len(chunk) < 8:
            return False
        size, kind = struct.unpack(">I4s", chunk)
        if kind == b"tRNS":
            return False
        if kind == b"IDAT":
            return True
        fp.seek(size + 4, os.SEEK_CUR)


_PROGRESSIVE = (0xC2, 0xC6, 0xCA, 0xCE)  # SOF markers of progressive JPEGs


def _jpeg_frame(fp: Any) -> tuple[int, int] | None:
    """(sample precision, components) from a JPEG's frame header (SOFn); None if not found."""
    if fp.read(2) != b"\xff\xd8":
        return None
    while True:
        marker = fp.read(2)
        if len(marker) < 2 or marker[0] != 0xFF:
            return None
        if marker[1] in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            continue
        length = fp.read(2)
        if len(length) < 2:
            return None
        (size,) = struct.unpack(">H", length)
        if 0xC0 <= marker[1] <= 0xCF and marker[1] not in (0xC4, 0xC8, 0xCC):
            if marker[1] in _PROGRESSIVE:  # libvips holds the whole image to decode these
                return None
            frame = fp.read(6)
            return (frame[0], frame[5]) if len(frame) == 6 else None
        fp.seek(size - 2, os.SEEK_CUR)


def streamable(root: str | None, path: str) -> tuple[tuple[int, ...], np.dtype] | None:
    """The array shape and dtype decoding ``path`` gives, if it is a file streamed here;
    else None."""
    suffix = Path(path).suffix.lower()
    if suffix not in STREAM_SUFFIXES or not available():
        return None

    def look(name: str) -> tuple[tuple[int, ...], np.dtype] | None:
        probed = probe(name)
        if probed is None:
            return None
        height, width, channels, nbytes = probed
        if width * channels * nbytes > MAX_ROW_BYTES:
            return None
        if suffix == ".png":
            with open(name, "rb") as fp:
                if not _png_is_plain(fp):
                    return None
        else:
            with open(name, "rb") as fp:
                if _jpeg_frame(fp) not in ((8, 1), (8, 3)):  # CMYK, 12-bit: the usual path
                    return None
        shape = (height, width) if channels == 1 else (height, width, channels)
        return shape, np.dtype(np.uint16 if nbytes == 2 else np.uint8)

    return use_beneath(root, path, look)


def check_scratch(folder: str, nbytes: int, what: str = "the output") -> None:
    """Refuse (OSError with the figures) when ``folder`` has not ``nbytes`` free, plus 5 %."""
    stat = os.statvfs(folder)
    free = stat.f_bavail * stat.f_frsize
    if nbytes * 1.05 > free:
        raise ImageWriteError(
            f"{what} needs {nbytes / 2**30:.2f} GiB of free space beside the output, and "
            f"{free / 2**30:.2f} GiB are free there"
        )


def encodable(target: str, shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """Whether an output of ``shape``/``dtype`` can be written to ``target`` by streaming."""
    suffix = Path(target).suffix.lower()
    channels = shape[2] if len(shape) == 3 else 1
    if suffix in (".jpg", ".jpeg"):
        return max(shape[:2]) <= JPEG_MAX_SIDE and channels in (1, 3) and dtype == np.uint8
    return suffix == ".png" and channels in (1, 3) and dtype in (np.uint8, np.uint16)


def _npy_header(fd: int) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and where the pixels start, of the ``.npy`` file open as ``fd``."""
    with os.fdopen(os.dup(fd), "rb") as fp:
        fp.seek(0)
        np.lib.format.read_magic(fp)
        shape, _, dtype = np.lib.format.read_array_header_1_0(fp)
        return shape, dtype, fp.tell()


def _as_project_order(strip: np.ndarray) -> np.ndarray:
    """libvips' RGB(A) bands in the project's BGR(A) order; gray as (rows, width)."""
    return strip[:, :, 0] if strip.shape[2] == 1 else swap_red_blue(strip)


class _Worker(threading.Thread):
    """A thread that records its outcome: ``error`` is ``(code, message)`` or None."""

    failure: type[ImgprocError] = ImgprocError  # what an unexpected error is reported as
    doing = "streaming"

    def __init__(self, name: str):
        super().__init__(name=name, daemon=True)
        self.error: tuple[str, str] | None = None
        self.finished = False
        self.stopped = False
        self.wake = threading.Condition()

    def stop(self) -> None:
        """Ask the thread to end soon (the image failed or its job was cancelled)."""
        with self.wake:
            self.stopped = True
            self.wake.notify_all()

    def run(self) -> None:
        try:
            self.work()
        except Exception as exc:  # noqa: BLE001 - reported to the scheduler as the image's error
            if not self.stopped:
                if not isinstance(exc, ImgprocError):  # libvips' or the OS's words, one line
                    exc = self.failure(f"{self.doing}: {' '.join(str(exc).split())}")
                self.error = (error_code(exc), describe(exc))
        finally:
            self.finished = True

    def work(self) -> None:
        raise NotImplementedError


class Decoder(_Worker):
    """Decodes ``source`` into the preallocated ``.npy`` ``target``, strip by strip; ``rows``
    tells how many rows are there so far (see the module docstring)."""

    failure, doing = ImageReadError, "cannot decode"

    def __init__(self, root: str | None, source: str, target: str):
        super().__init__("decode")
        self.root, self.source, self.target = root, source, target
        self.rows = 0

    def work(self) -> None:
        import pyvips

        with contextlib.ExitStack() as stack:
            fd_in = open_beneath(self.root, self.source) if self.root else os.open(
                self.source, os.O_RDONLY | os.O_CLOEXEC
            )  # fmt: skip
            stack.callback(os.close, fd_in)
            fd_out = open_entry(self.root, self.target, os.O_RDWR)
            stack.callback(os.close, fd_out)
            shape, declared, offset = _npy_header(fd_out)
            image = pyvips.Image.new_from_file(
                fd_path(fd_in), access="sequential", fail_on="truncated"
            )
            dtype = np.uint16 if image.format == "ushort" else np.uint8
            got = (image.height, image.width) + ((image.bands,) if image.bands > 1 else ())
            if got != tuple(shape) or np.dtype(dtype) != declared:
                raise OSError(f"decoded as {got} {np.dtype(dtype)}, the header said {shape}")
            row_bytes = image.width * image.bands * np.dtype(dtype).itemsize
            step = max(1, min(STRIP_ROWS, STRIP_BYTES // row_bytes))
            for y in range(0, image.height, step):
                if self.stopped:
                    return
                rows = min(step, image.height - y)
                data = image.crop(0, y, image.width, rows).write_to_memory()
                strip = np.frombuffer(data, dtype).reshape(rows, image.width, image.bands)
                block = np.ascontiguousarray(_as_project_order(strip))
                pwrite_all(fd_out, block, offset + y * row_bytes)
                self.rows = y + rows


class Encoder(_Worker):
    """Encodes the rows of the ``.npy`` ``source`` into ``target`` (JPEG or PNG, by its
    suffix) as they are finished: ``finish(y0, y1)`` says rows ``y0:y1`` are written."""

    failure, doing = ImageWriteError, "cannot encode"

    def __init__(self, root: str | None, source: str, target: str, shape: tuple, dtype: Any):
        super().__init__("encode")
        self.root, self.source, self.target = root, source, target
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.bands = shape[2] if len(shape) == 3 else 1
        self.row_bytes = shape[1] * self.bands * self.dtype.itemsize
        self.done_rows: dict[int, int] = {}  # y0 -> y1 of finished strips not yet contiguous
        self.ready = 0  # rows 0:ready are finished

    def finish(self, y0: int, y1: int) -> None:
        with self.wake:
            self.done_rows[y0] = y1
            while self.ready in self.done_rows:
                self.ready = self.done_rows.pop(self.ready)
            self.wake.notify_all()

    def _rows(self, fd: int, offset: int, block: int) -> Iterator[np.ndarray]:
        """The image's rows in the project's order (``(n, width, bands)``), as soon as they
        are finished, ``block`` rows at a time (the last block may be shorter)."""
        height, width = self.shape[:2]
        row_bytes = self.row_bytes
        served = 0
        while served < height:
            upto = min(height, served + block)
            with self.wake:
                while self.ready < upto and not self.stopped:
                    self.wake.wait(0.5)
            if self.stopped:
                return
            raw = os.pread(fd, (upto - served) * row_bytes, offset + served * row_bytes)
            yield np.frombuffer(raw, self.dtype).reshape(upto - served, width, self.bands)
            served = upto

    def work(self) -> None:
        jpeg = Path(self.target).suffix.lower() != ".png"
        if jpeg and max(self.shape[:2]) > JPEG_MAX_SIDE:
            raise ImageWriteError(
                f"a JPEG's sides are at most {JPEG_MAX_SIDE} pixels; this image is "
                f"{self.shape[1]}x{self.shape[0]}: write it as PNG or TIFF"
            )
        block = max(1, ENCODE_BLOCK_BYTES // self.row_bytes)
        if jpeg:
            block = jpeg_block_rows(self.shape, block)
        fd_in = open_entry(self.root, self.source, os.O_RDONLY)
        fd_out = -1
        try:
            rows = self._rows(fd_in, _npy_header(fd_in)[2], block)
            fd_out = open_entry(self.root, self.target, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            if jpeg:
                pieces = jpeg_stream(rows, self.shape, block)
            else:
                png_rows = (_png_order(b, self.dtype) for b in rows)
                pieces = png_stream(png_rows, self.shape, self.dtype, level=1)
            for piece in pieces:
                _write_all(fd_out, piece)
        finally:
            os.close(fd_in)
            if fd_out >= 0:
                os.close(fd_out)


def _png_order(block: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Rows in PNG's order: RGB, big-endian."""
    block = swap_red_blue(block) if block.shape[2] == 3 else block
    return block.astype(dtype.newbyteorder(">")) if dtype.itemsize > 1 else block


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def png_stream(
    rows: Iterable[np.ndarray], shape: tuple, dtype: np.dtype, level: int
) -> Iterator[bytes]:
    """A PNG of ``shape``/``dtype`` from blocks of its rows (``(n, width, bands)`` in RGB order,
    big-endian), piece by piece: zlib compresses (``level`` 0: stored, the cheapest way to hand
    pixels to libvips), and every row has PNG's filter 0 (none)."""
    height, width = shape[:2]
    bands = shape[2] if len(shape) == 3 else 1
    colour = {1: 0, 3: 2, 4: 6}[bands]
    row_bytes = width * bands * dtype.itemsize

    def chunk(kind: bytes, data: bytes) -> Iterator[bytes]:
        yield struct.pack(">I", len(data)) + kind
        yield data
        yield struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))

    yield b"\x89PNG\r\n\x1a\n"
    yield from chunk(
        b"IHDR", struct.pack(">IIBBBBB", width, height, 8 * dtype.itemsize, colour, 0, 0, 0)
    )
    packer = zlib.compressobj(level)
    written = 0
    for block in rows:
        n = block.shape[0]
        framed = np.zeros((n, row_bytes + 1), np.uint8)  # a filter byte (0) before every row
        if block.dtype.itemsize == 1:
            framed[:, 1:].reshape(n, width, bands)[...] = block
        else:
            framed[:, 1:] = np.ascontiguousarray(block).reshape(n, -1).view(np.uint8)
        data = packer.compress(framed)
        written += n
        if data:
            yield from chunk(b"IDAT", data)
    if written < height:
        raise OSError(f"the encoder stopped at row {written} of {height}")
    yield from chunk(b"IDAT", packer.flush())
    yield from chunk(b"IEND", b"")


JPEG_QUALITY = 95  # OpenCV's default, as cv2.imwrite uses it
_SOF0, _SOS, _DQT, _DHT = 0xC0, 0xDA, 0xDB, 0xC4


def _mcu(shape: tuple) -> int:
    """The side of a JPEG's MCU as OpenCV encodes it: 16 for colour (4:2:0), 8 for gray."""
    return 16 if len(shape) == 3 and shape[2] == 3 else 8


def jpeg_block_rows(shape: tuple, rows: int) -> int:
    """Rows per block of :func:`jpeg_stream`: ``rows`` rounded down to whole MCU rows (16 for
    colour, which OpenCV subsamples 4:2:0; 8 for gray), and few enough that one block's MCUs
    fit a restart interval (at most 65535)."""
    mcu = _mcu(shape)
    per_row = -(-shape[1] // mcu)  # MCUs across
    return mcu * max(1, min(rows // mcu, 65535 // per_row))


def _segments(data: memoryview) -> tuple[dict[int, list[int]], int]:
    """Where a JPEG's marker segments up to its scan start, by marker, and where the scan's
    data start."""
    found: dict[int, list[int]] = {}
    for marker, at in jpeg_header(data):
        found.setdefault(marker, []).append(at)
        if marker == _SOS:
            return found, at + 2 + _length(data, at)
    raise ImageWriteError("the JPEG encoder wrote a header this code does not parse")


def _length(data: memoryview, at: int) -> int:
    """The length field of the marker segment at ``at`` (it counts itself, not the marker)."""
    return int.from_bytes(data[at + 2 : at + 4], "big")


def _tables(data: memoryview, found: dict[int, list[int]]) -> bytes:
    """The quantization and Huffman tables' segments, as they are written."""
    starts = sorted(found.get(_DQT, []) + found.get(_DHT, []))
    return b"".join(data[at : at + 2 + _length(data, at)] for at in starts)


def _encode_block(block: np.ndarray, interval: int) -> memoryview:
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY, cv2.IMWRITE_JPEG_RST_INTERVAL, interval]
    ok, data = cv2.imencode(".jpg", block, params)
    if not ok:
        raise ImageWriteError(f"OpenCV could not encode a {block.shape} block as JPEG")
    return memoryview(data).cast("B")  # OpenCV's buffer itself: sliced, never copied


def jpeg_stream(
    blocks: Iterable[np.ndarray], shape: tuple, rows: int
) -> Iterator[bytes | bytearray | memoryview]:
    """A baseline JPEG of ``shape`` (8-bit gray or BGR) from blocks of ``rows`` rows (the last
    may be shorter; ``rows`` from :func:`jpeg_block_rows`), piece by piece, in constant memory.

    Each block is encoded on its own by OpenCV (libjpeg-turbo, quality 95, 4:2:0), and the
    blocks' entropy-coded data are joined with restart markers, one restart interval a block.
    A block is whole MCU rows, so its DCT blocks, their coefficients and (after a restart) its
    DC prediction are exactly the whole image's: the file is byte for byte what
    ``cv2.imencode`` writes for the whole image with ``IMWRITE_JPEG_RST_INTERVAL`` set to a
    block's MCUs (``tests/test_streamio.py`` checks it), and it decodes to the same pixels as
    OpenCV's plain encoding of the whole image.  Restart markers are baseline JPEG, which
    every decoder reads.
    """
    mcu = _mcu(shape)
    interval = (rows // mcu) * -(-shape[1] // mcu)
    tables = b""
    written = 0
    for index, block in enumerate(blocks):
        data = _encode_block(block, interval if index == 0 else 0)
        found, scan = _segments(data)
        mine = _tables(data, found)
        written += block.shape[0]
        if index == 0:
            if _SOF0 not in found:
                raise ImageWriteError("the JPEG encoder wrote no baseline frame header")
            header = bytearray(data[:scan])
            sof = found[_SOF0][0]
            header[sof + 5 : sof + 7] = shape[0].to_bytes(2, "big")  # the whole image's height
            tables = mine
            yield header
        elif mine != tables:  # every block must be coded with the same tables
            raise ImageWriteError("the JPEG encoder changed its tables between blocks")
        else:
            yield bytes([0xFF, 0xD0 + (index - 1) % 8])  # RSTn before every block but the first
        yield data[scan:-2]  # the block's entropy-coded data, without its EOI
    if written < shape[0]:  # stopped early: never a short image with the full height declared
        raise OSError(f"the encoder stopped at row {written} of {shape[0]}")
    yield b"\xff\xd9"


def remove(root: str | None, *paths: str | None) -> None:
    """Remove temporary files under ``root`` (each opened folder checked), ignoring absent ones."""
    for path in paths:
        if not path:
            continue
        with contextlib.suppress(OSError, ImgprocError):  # already gone, or its folder is
            unlink_beneath(root, path)

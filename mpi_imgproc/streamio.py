"""Streamed decode and encode for files without random access (baseline JPEG, PNG).

A by-reference image in such a format is never held whole by any process.  Rank 0 decodes it
with libvips (through pyvips, in sequential mode: libvips keeps a few strips in memory) into a
raw ``.npy`` beside the output, strip after strip, on a thread of its own; the workers' region
tasks (:mod:`mpi_imgproc.regionio`) are handed out as soon as the rows each one reads are
there, so compute overlaps decode.  Output likewise: the workers write their rows into a raw
``.npy``, and an encoder thread on rank 0 feeds the rows to libvips' JPEG or PNG writer in
order, as they are finished, so encoding overlaps compute too.  Both temporary files live in
the output's folder (every rank sees it) and are removed when the image ends, however it ends.

Why libvips: it is the library built for exactly this (demand-driven, strip-wise codecs on
libjpeg-turbo and libpng), and ``pyvips[binary]`` ships it as a wheel.  Its decoder gives the
same pixels as OpenCV's for the files streamed here (8-bit JPEG with 1 or 3 components, PNG
gray, RGB or RGBA, 8 or 16 bits, no palette or ``tRNS``; ``tests/test_streamio.py`` checks it);
other files take the usual path.  Writing goes into a partial file renamed into place.  The
JPEG written here is libvips' encoding at OpenCV's settings (quality 95, 4:2:0), so its bytes
differ from ``cv2.imencode``'s; PNG is lossless, so its pixels are exact.
"""

from __future__ import annotations

import contextlib
import os
import select
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from .datapaths import fd_path, open_beneath, open_entry, unlink_beneath, use_beneath
from .errors import ImageReadError, ImageWriteError, ImgprocError, describe, error_code
from .imageio import probe
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
    # 100 operations by default) would only hold memory on rank 0.  And its codecs here are
    # serial (libjpeg, libpng, zlib), with nothing to compute between them: one libvips thread
    # each (not one per core) decoded and encoded a 10000x10000 JPEG as fast, with 9 MiB less
    # (measured alone).
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
        fits = max(shape[:2]) <= JPEG_MAX_SIDE
        return fits and channels in (1, 3) and dtype == np.uint8 and available()
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
        self.done_rows: dict[int, int] = {}  # y0 -> y1 of finished strips not yet contiguous
        self.ready = 0  # rows 0:ready are finished
        self.quit = threading.Event()  # the writer gave up: stop reading rows

    def finish(self, y0: int, y1: int) -> None:
        with self.wake:
            self.done_rows[y0] = y1
            while self.ready in self.done_rows:
                self.ready = self.done_rows.pop(self.ready)
            self.wake.notify_all()

    def _rows(self, fd: int, offset: int) -> Iterator[np.ndarray]:
        """The image's rows in PNG's order (RGB, big-endian), as soon as they are finished,
        a few MiB at a time."""
        height, width = self.shape[:2]
        bands = self.shape[2] if len(self.shape) == 3 else 1
        row_bytes = width * bands * self.dtype.itemsize
        served = 0
        while served < height:
            with self.wake:
                while self.ready <= served and not self.stopped and not self.quit.is_set():
                    self.wake.wait(0.5)
                upto = self.ready
            if self.stopped or self.quit.is_set():
                return
            upto = min(upto, served + max(1, ENCODE_BLOCK_BYTES // row_bytes))
            raw = os.pread(fd, (upto - served) * row_bytes, offset + served * row_bytes)
            rows = np.frombuffer(raw, self.dtype).reshape(upto - served, width, bands)
            rows = swap_red_blue(rows) if bands == 3 else rows
            yield rows.astype(self.dtype.newbyteorder(">")) if self.dtype.itemsize > 1 else rows
            served = upto

    def work(self) -> None:
        fd_in = open_entry(self.root, self.source, os.O_RDONLY)
        fd_out = -1
        try:
            rows = self._rows(fd_in, _npy_header(fd_in)[2])
            fd_out = open_entry(self.root, self.target, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            if Path(self.target).suffix.lower() == ".png":
                for piece in png_stream(rows, self.shape, self.dtype, level=1):
                    _write_all(fd_out, piece)
            else:
                png = png_stream(rows, self.shape, self.dtype, level=0)
                _jpeg_from(png, fd_out, self.quit)
        finally:
            os.close(fd_in)
            if fd_out >= 0:
                os.close(fd_out)


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


def _jpeg_from(png: Iterator[bytes], fd_out: int, quit: threading.Event) -> None:
    """Encode a streamed PNG as JPEG (quality 95, 4:2:0: OpenCV's defaults) with libvips,
    which reads it from a pipe as it comes; a thread here writes the pipe.  If libvips gives
    up, ``quit`` stops that thread (its writes do not block) and the rows it was waiting for."""
    import pyvips

    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    failure: list[BaseException] = []

    def feed() -> None:
        try:
            for piece in png:
                view = memoryview(piece).cast("B")
                while view:
                    if quit.is_set():
                        return
                    try:
                        view = view[os.write(write_end, view) :]
                    except BlockingIOError:
                        select.select([], [write_end], [], 0.2)
        except BrokenPipeError:  # libvips has stopped reading
            pass
        except BaseException as exc:  # noqa: BLE001 - raised again below
            failure.append(exc)
        finally:
            os.close(write_end)

    feeder = threading.Thread(target=feed, name="png-feed", daemon=True)
    feeder.start()
    try:
        source = pyvips.Source.new_from_descriptor(read_end)
        image = pyvips.Image.new_from_source(source, "", access="sequential", fail_on="truncated")
        image.jpegsave_target(pyvips.Target.new_to_descriptor(fd_out), Q=95, subsample_mode="on")
        del image, source  # libvips' own copy of the pipe's end goes with them
    finally:
        quit.set()
        os.close(read_end)
        feeder.join(timeout=30)
    if failure:
        raise failure[0]


def remove(root: str | None, *paths: str | None) -> None:
    """Remove temporary files under ``root`` (each opened folder checked), ignoring absent ones."""
    for path in paths:
        if not path:
            continue
        with contextlib.suppress(OSError, ImgprocError):  # already gone, or its folder is
            unlink_beneath(root, path)

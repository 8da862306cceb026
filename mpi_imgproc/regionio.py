"""Read and write rectangles of an image file without ever holding the whole image.

Formats built for random access: raw NumPy ``.npy`` and TIFF/BigTIFF through tifffile.  The
pixels of a ``.npy`` and of an uncompressed contiguous TIFF page are read with ``pread`` (no
memory map: a file truncated under a reader is an error, not a SIGBUS); a striped or tiled page
(any codec tifffile decodes) is read strip by strip or tile by tile, only those the rectangle
touches.  Outputs are uncompressed BigTIFF or ``.npy``, preallocated once, then filled by each
worker for its own strip (whole rows with ``pwrite``), so several processes write one file
side by side.

Pixels use the project's channel order (gray, BGR, BGRA, as OpenCV decodes files); TIFF stores
RGB(A), so colour channels are reversed on the way in and out.  tifffile was chosen over
writing a TIFF reader: it knows every layout and codec, and exposes the per-segment decoder
that region reads need; imagecodecs gives it every codec beyond zlib (LZW, OpenCV's default
for TIFF, among them).  An 8-bit RGBA page with unassociated alpha is read as stored, as
:func:`mpi_imgproc.imageio.decode` reads it too (OpenCV would premultiply it).
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

from .errors import ImageReadError, ImageWriteError
from .imageio import jpeg_frame_size

REGION_SUFFIXES = (".npy", ".tif", ".tiff")
_DTYPES = (np.uint8, np.uint16)


_SWAPS = {3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGBA}


def swap_red_blue(block: np.ndarray, own: bool = False) -> np.ndarray:
    """RGB(A) as BGR(A), or back (the same swap), as a new contiguous array (``own``: the
    caller's fresh array, swapped in place, one copy fewer); other shapes unchanged.
    ``cvtColor`` rather than NumPy's ``block[..., [2, 1, 0]]``: that gives an array laid out
    channel-first, which every later copy (``ascontiguousarray``, OpenCV's own conversion)
    walks element by element, about 20 times slower for a 6 MB strip."""
    if block.ndim == 3 and block.shape[2] in _SWAPS:
        if block.size == 0:
            return block.copy()
        if not block.dtype.isnative:  # OpenCV would read a big-endian TIFF's bytes as they are
            block, own = block.astype(block.dtype.newbyteorder("=")), True
        in_place = own and block.flags.c_contiguous
        return cv2.cvtColor(block, _SWAPS[block.shape[2]], dst=block if in_place else None)
    return block


class RegionReader:
    """Random access to one image: ``shape``, ``dtype``, ``read(y0, y1, x0, x1)`` (the box
    clipped to the image, in the project's channel order) and ``close()``."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release the file (also done when the reader is collected)."""

    def _clip(self, y0: int, y1: int, x0: int, x1: int) -> tuple[int, int, int, int]:
        h, w = self.shape[:2]
        y0, x0 = min(max(0, y0), h), min(max(0, x0), w)
        return y0, max(y0, min(y1, h)), x0, max(x0, min(x1, w))


# A strip or tile that a region read decodes whole may be at most this big: a file laid out as
# one strip for the whole image (or with huge tiles) would have every region task decode all
# of it.  Such a file is read whole instead (within --max-pixels), as a JPEG is.
MAX_SEGMENT_BYTES = 64 * 2**20


def _open_regular(path: str) -> int:
    """A descriptor of ``path``, a regular file: opened without blocking (a FIFO swapped in
    would otherwise hang the open) and checked on the descriptor itself."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageReadError(f"cannot open: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ImageReadError("not a regular file")
    return fd


class FileReader(RegionReader):
    """Pixels stored row after row (C order) at ``offset`` of an open file, in the file's own
    byte order ``stored``: boxes are read with ``pread``, never through a memory map, so a file
    truncated under a worker is an ImageReadError, not a SIGBUS that kills the rank."""

    def __init__(self, fd: int, offset: int, shape: tuple[int, ...], stored: np.dtype):
        self.fd, self.offset, self.stored = fd, offset, stored
        self.shape, self.dtype = tuple(shape), stored.newbyteorder("=")
        self.pixel = math.prod(self.shape[2:]) * stored.itemsize
        self.row = self.shape[1] * self.pixel

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The clipped box as stored (channel order and all), in native byte order."""
        y0, y1, x0, x1 = self._clip(y0, y1, x0, x1)
        width, inner = self.shape[1], self.shape[2:]
        if (x1 - x0) * 2 >= width:  # whole rows in one read, cut after
            block = np.empty((y1 - y0, width, *inner), self.stored)
            pread_into(self.fd, block, self.offset + y0 * self.row)
            if (x0, x1) != (0, width):
                block = np.ascontiguousarray(block[:, x0:x1])
        else:  # a narrow box: each row's run on its own
            block = np.empty((y1 - y0, x1 - x0, *inner), self.stored)
            for i in range(y1 - y0):
                pread_into(self.fd, block[i], self.offset + (y0 + i) * self.row + x0 * self.pixel)
        return block if self.stored.isnative else block.astype(self.dtype)

    def close(self) -> None:
        fd, self.fd = getattr(self, "fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        with contextlib.suppress(OSError):
            self.close()


class NpyReader(FileReader):
    """A ``.npy`` file: its header parsed by NumPy, its pixels read by ``pread``."""

    def __init__(self, path: str):
        fd = _open_regular(path)
        try:
            with open(fd, "rb", closefd=False) as fh:
                version = np.lib.format.read_magic(fh)
                if version == (1, 0):
                    shape, fortran, stored = np.lib.format.read_array_header_1_0(fh)
                elif version == (2, 0):
                    shape, fortran, stored = np.lib.format.read_array_header_2_0(fh)
                else:
                    raise ImageReadError(f".npy format version {version} is not read here")
                offset = fh.tell()
            if stored.hasobject:
                raise ImageReadError(".npy holds Python objects, not pixels")
            if fortran and len(shape) > 1:
                raise ImageReadError(".npy is Fortran-ordered: save it in C order")
            need = offset + math.prod(shape) * stored.itemsize
            if os.fstat(fd).st_size < need:
                raise ImageReadError(f".npy is truncated: {need} bytes expected")
            super().__init__(fd, offset, tuple(shape), stored)
        except BaseException:
            os.close(fd)
            raise


def _unplain(page: Any) -> str | None:
    """Why a TIFF page's stored samples are not the pixels OpenCV decodes from it (so a region
    read would differ from the whole file's), or None when they are: 8- or 16-bit unsigned,
    one image deep, top-left oriented, gray, RGB or RGBA (or JPEG-coded YCbCr, which the
    codec turns into RGB), samples interleaved."""
    photometric, spp = page.photometric, page.samplesperpixel
    orientation = page.tags.get(274)  # Orientation
    checks = [
        (page.imagedepth == 1, "volumetric"),
        (orientation is None or orientation.value == 1, "not top-left oriented"),
        (page.fillorder == 1, "bits filled lowest first"),
        (page.bitspersample in (8, 16) and page.sampleformat == tifffile.SAMPLEFORMAT.UINT,
         f"{page.bitspersample}-bit samples"),
        (page.planarconfig == tifffile.PLANARCONFIG.CONTIG or spp == 1, "planar-separate"),
        (photometric == tifffile.PHOTOMETRIC.MINISBLACK and spp == 1
         or photometric == tifffile.PHOTOMETRIC.RGB and spp in (3, 4)
         or photometric == tifffile.PHOTOMETRIC.YCBCR and spp == 3
         and page.compression in (tifffile.COMPRESSION.JPEG, tifffile.COMPRESSION.OJPEG),
         f"photometric {photometric.name} with {spp} samples"),
    ]  # fmt: skip
    return next((why for ok, why in checks if not ok), None)


class TiffReader(RegionReader):
    """The first page of a TIFF: an uncompressed contiguous one by ``pread`` of its rows, a
    striped or tiled one (any codec tifffile decodes) by the strips or tiles a box touches.
    Made by :meth:`open`, which says None for a page a region read would get wrong or that
    would cost too much (see ``_unplain`` and :data:`MAX_SEGMENT_BYTES`)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.fh = open(fd, "rb", closefd=False)
        self.tif = tifffile.TiffFile(self.fh, name="image.tif")
        page = self.tif.pages.first
        self.page = page
        self.shape, self.dtype = tuple(page.shape), np.dtype(page.dtype).newbyteorder("=")
        self.chunk = page.chunks[:2]  # rows, columns of one strip or tile
        self.rows_reader: FileReader | None = None
        if page.is_final:  # stored as it is decoded, from dataoffsets[0] on (tifffile)
            stored = np.dtype(page.dtype).newbyteorder(self.tif.byteorder)
            self.rows_reader = FileReader(os.dup(fd), page.dataoffsets[0], self.shape, stored)

    @classmethod
    def open(cls, path: str) -> TiffReader | None:
        reader = cls(_open_regular(path))
        try:
            page = reader.page
            segment = math.prod(page.chunks) * np.dtype(page.dtype).itemsize
            if _unplain(page) or (reader.rows_reader is None and segment > MAX_SEGMENT_BYTES):
                reader.close()
                return None
        except BaseException:
            reader.close()
            raise
        return reader

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        try:
            if self.rows_reader is not None:  # one copy out of the page cache, then the swap
                return swap_red_blue(self.rows_reader.read(y0, y1, x0, x1), own=True)
            return swap_red_blue(self._segments(*self._clip(y0, y1, x0, x1)), own=True)
        except ImageReadError:
            raise
        except MemoryError:
            raise ImageReadError("a strip or tile does not fit in memory") from None
        except Exception as exc:  # noqa: BLE001 - a damaged file: its reader says what it met
            raise ImageReadError(f"cannot read TIFF: {type(exc).__name__}: {exc}") from None

    def _segments(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        out = np.zeros((y1 - y0, x1 - x0, *self.shape[2:]), self.dtype)  # sparse ones: zeros
        rows, cols = self.chunk
        across = math.ceil(self.shape[1] / cols)
        wanted = [
            r * across + c
            for r in range(y0 // rows, math.ceil(y1 / rows))
            for c in range(x0 // cols, math.ceil(x1 / cols))
        ]
        page, decode = self.page, self.page.decode
        offsets = [page.dataoffsets[i] for i in wanted]
        counts = [page.databytecounts[i] for i in wanted]
        jpeg = page.compression in (tifffile.COMPRESSION.JPEG, tifffile.COMPRESSION.OJPEG)
        fh = self.tif.filehandle
        for data, index in fh.read_segments(offsets, counts, wanted, sort=True):
            if not data:
                continue
            if jpeg and (size := jpeg_frame_size(data)) and (size[0] > rows or size[1] > cols):
                raise ImageReadError(f"JPEG tile {index} declares {size[1]}x{size[0]} pixels")
            try:
                segment, _, _ = decode(data, index, jpegtables=page.jpegtables)
            except (ValueError, RuntimeError) as exc:  # a codec missing, or corrupt data
                raise ImageReadError(f"cannot decode TIFF segment {index}: {exc}") from None
            if segment is None:
                continue
            top, left = (index // across) * rows, (index % across) * cols
            segment = segment.reshape(segment.shape[-3:])  # (rows, cols, samples)
            self._paste(out, segment, top, left, y0, x0)
        return out

    def _paste(self, out, segment, top, left, y0, x0) -> None:
        sy0, sx0 = max(top, y0), max(left, x0)
        sy1 = min(top + segment.shape[0], y0 + out.shape[0], self.shape[0])
        sx1 = min(left + segment.shape[1], x0 + out.shape[1], self.shape[1])
        if sy1 <= sy0 or sx1 <= sx0:
            return
        block = segment[sy0 - top : sy1 - top, sx0 - left : sx1 - left]
        target = out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0]
        target[...] = block.reshape(target.shape)

    def close(self) -> None:
        if getattr(self, "rows_reader", None) is not None:
            self.rows_reader.close()
        if getattr(self, "tif", None) is not None:
            self.tif.close()
        if getattr(self, "fh", None) is not None:
            self.fh.close()
        fd, self.fd = getattr(self, "fd", -1), -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        self.close()


def open_region(path: str, name: str | None = None) -> RegionReader | None:
    """A region reader for ``path``, or None if it has no random access here: not a region
    format, or a TIFF whose region reads would differ from OpenCV's whole decoding or cost too
    much (read whole instead); ``name`` gives the format by its suffix where ``path`` has none
    (an open file's path).

    Raises ImageReadError for a file of a region format that cannot be read.
    """
    suffix = Path(name or path).suffix.lower()
    if suffix not in REGION_SUFFIXES:
        return None
    try:
        reader = NpyReader(path) if suffix == ".npy" else TiffReader.open(path)
    except ImageReadError:
        raise
    except MemoryError:
        raise ImageReadError("cannot read for regions: its header does not fit in memory") from None
    except Exception as exc:  # noqa: BLE001 - a damaged header: say what the parser met
        raise ImageReadError(f"cannot read for regions: {type(exc).__name__}: {exc}") from None
    if reader is None:
        return None
    try:
        _check_region_image(reader, suffix)
    except BaseException:
        reader.close()
        raise
    return reader


def _check_region_image(reader: RegionReader, suffix: str) -> None:
    shape, dtype = reader.shape, reader.dtype
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
        raise ImageReadError(f"region input must be gray, BGR or BGRA; shape {shape}")
    if 0 in shape:
        raise ImageReadError(f"image is empty: shape {shape}")
    if dtype not in _DTYPES:
        raise ImageReadError(f"region input must be 8- or 16-bit; got {dtype}")


def create_output(
    path: str, shape: tuple[int, ...], dtype: np.dtype, name: str | None = None
) -> None:
    """Preallocate an output that workers fill region by region (``write_region``); ``name``
    gives the format by its suffix where ``path`` has none (a file just created, by its
    ``/proc/self/fd`` path, see :func:`mpi_imgproc.datapaths.create_beneath`)."""
    try:
        if Path(name or path).suffix.lower() == ".npy":
            np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape).flush()
            return
        channels = shape[2] if len(shape) == 3 else 1
        extra = {"extrasamples": ["unassalpha"]} if channels == 4 else {}
        photometric = "rgb" if channels in (3, 4) else "minisblack"
        out = tifffile.memmap(
            path, shape=shape, dtype=dtype, bigtiff=True, photometric=photometric, **extra
        )
        out.flush()
        del out
    except (OSError, ValueError) as exc:
        raise ImageWriteError(f"cannot create {path}: {exc}") from None


def write_region(path: str, y0: int, x0: int, block: np.ndarray) -> None:
    """Write ``block`` (project channel order) at ``(y0, x0)`` of an output made by
    ``create_output``; other processes may be writing other rows at the same time."""
    if Path(path).suffix.lower() == ".npy":
        out = np.load(path, mmap_mode="r+", allow_pickle=False)
    else:
        out = tifffile.memmap(path, mode="r+")
        block = swap_red_blue(block)  # BGR -> RGB
    rows = out[y0 : y0 + block.shape[0], x0 : x0 + block.shape[1]]
    block = np.ascontiguousarray(block.reshape(rows.shape), out.dtype)
    if x0 == 0 and block.shape[1] == out.shape[1] and out.flags.c_contiguous:
        # Whole rows are one run of the file: written with pwrite, not through the mapping,
        # whose flush (msync) would wait for the disk on every strip.
        offset = out.offset + y0 * (out.strides[0] if out.ndim else 0)
        del rows, out
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            pwrite_all(fd, block, offset)
        finally:
            os.close(fd)
        return
    rows[...] = block
    out.flush()
    del rows, out


def pwrite_all(fd: int, data: Any, offset: int) -> None:
    """Write all of ``data`` (any buffer) at ``offset``: one call writes at most about 2 GiB,
    and a short write is continued."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def pread_into(fd: int, buffer: Any, offset: int) -> None:
    """Fill ``buffer`` (any writable buffer) from ``offset``, continuing short reads."""
    view = memoryview(buffer).cast("B")
    while view:
        got = os.preadv(fd, [view], offset)
        if got == 0:
            raise ImageReadError(f"file ends before byte {offset + len(view)}")
        view, offset = view[got:], offset + got


def partial_name(target: str, tag: str = "") -> str:
    """Where an output is built before it is renamed into place (same folder, same suffix);
    ``tag`` (a job's and image's) keeps two jobs writing one target from sharing it."""
    path = Path(target)
    return str(path.with_name(f".{path.stem}{f'.{tag}' if tag else ''}.part{path.suffix}"))

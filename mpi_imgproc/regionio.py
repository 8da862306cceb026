"""Read and write rectangles of an image file without ever holding the whole image.

Formats built for random access: raw NumPy ``.npy`` (memory-mapped) and TIFF/BigTIFF through
tifffile: an uncompressed contiguous page is memory-mapped; a striped or tiled page (any codec
tifffile decodes) is read strip by strip or tile by tile, only those the rectangle touches.
Outputs are uncompressed BigTIFF or ``.npy``, preallocated once, then filled by each worker for
its own strip through a memory map, so several processes write one file side by side.

Pixels use the project's channel order (gray, BGR, BGRA, as OpenCV decodes files); TIFF stores
RGB(A), so colour channels are reversed on the way in and out.  tifffile was chosen over
writing a TIFF reader: it knows every layout and codec, and exposes the per-segment decoder
that region reads need; imagecodecs gives it every codec beyond zlib (LZW, OpenCV's default
for TIFF, among them).  An 8-bit RGBA page with unassociated alpha is read as stored, as
:func:`mpi_imgproc.imageio.decode` reads it too (OpenCV would premultiply it).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

from .errors import ImageReadError, ImageWriteError

REGION_SUFFIXES = (".npy", ".tif", ".tiff")
_DTYPES = (np.uint8, np.uint16)


_SWAPS = {3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGBA}


def swap_red_blue(block: np.ndarray) -> np.ndarray:
    """RGB(A) as BGR(A), or back (the same swap), as a new contiguous array; other shapes
    unchanged.  ``cvtColor`` rather than NumPy's ``block[..., [2, 1, 0]]``: that gives an
    array laid out channel-first, which every later copy (``ascontiguousarray``, OpenCV's
    own conversion) walks element by element, about 20 times slower for a 6 MB strip."""
    if block.ndim == 3 and block.shape[2] in _SWAPS:
        if block.size == 0:
            return block.copy()
        if not block.dtype.isnative:  # OpenCV would read a big-endian TIFF's bytes as they are
            block = block.astype(block.dtype.newbyteorder("="))
        return cv2.cvtColor(block, _SWAPS[block.shape[2]])
    return block


class RegionReader:
    """Random access to one image: ``shape``, ``dtype`` and ``read(y0, y1, x0, x1)``."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        raise NotImplementedError


class NpyReader(RegionReader):
    def __init__(self, path: str):
        self.array = np.load(path, mmap_mode="r", allow_pickle=False)
        self.shape, self.dtype = self.array.shape, self.array.dtype.newbyteorder("=")

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        return np.array(self.array[y0:y1, x0:x1], self.dtype)  # a big-endian file: native


class TiffReader(RegionReader):
    """The first page of a TIFF, by memory map or by the strips/tiles a rectangle touches."""

    def __init__(self, path: str):
        self.tif = tifffile.TiffFile(path)
        page = self.tif.pages.first
        if page.planarconfig == tifffile.PLANARCONFIG.SEPARATE and page.samplesperpixel > 1:
            raise ImageReadError("planar-separate TIFF has no region access here")
        self.page = page
        self.shape, self.dtype = page.shape, np.dtype(page.dtype).newbyteorder("=")
        self.memmap = page.asarray(out="memmap") if page.is_memmappable else None
        self.chunk = page.chunks[:2]  # rows, columns of one strip or tile

    def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        if self.memmap is not None:  # one copy out of the page cache, swapping as it goes
            block = self.memmap[y0:y1, x0:x1]
            swapped = swap_red_blue(block)  # in native byte order, as self.dtype
            return np.array(block, self.dtype) if swapped is block else swapped
        out = np.empty((y1 - y0, x1 - x0, *self.shape[2:]), self.dtype)
        rows, cols = self.chunk
        across = math.ceil(self.shape[1] / cols)
        wanted = [
            r * across + c
            for r in range(y0 // rows, math.ceil(y1 / rows))
            for c in range(x0 // cols, math.ceil(x1 / cols))
        ]
        offsets = [self.page.dataoffsets[i] for i in wanted]
        counts = [self.page.databytecounts[i] for i in wanted]
        decode = self.page.decode
        fh = self.tif.filehandle
        for (data, index), _ in zip(fh.read_segments(offsets, counts, wanted, sort=True), wanted):
            try:
                segment, _, _ = decode(data, index, jpegtables=self.page.jpegtables)
            except (ValueError, RuntimeError) as exc:  # a codec missing, or corrupt data
                raise ImageReadError(f"cannot decode TIFF segment {index}: {exc}") from None
            top, left = (index // across) * rows, (index % across) * cols
            segment = segment.reshape(segment.shape[-3:])  # (rows, cols, samples)
            self._paste(out, segment, top, left, y0, x0)
        return swap_red_blue(out)

    def _paste(self, out, segment, top, left, y0, x0) -> None:
        sy0, sx0 = max(top, y0), max(left, x0)
        sy1 = min(top + segment.shape[0], y0 + out.shape[0], self.shape[0])
        sx1 = min(left + segment.shape[1], x0 + out.shape[1], self.shape[1])
        if sy1 <= sy0 or sx1 <= sx0:
            return
        block = segment[sy0 - top : sy1 - top, sx0 - left : sx1 - left]
        target = out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0]
        target[...] = block.reshape(target.shape)


def open_region(path: str, name: str | None = None) -> RegionReader | None:
    """A region reader for ``path``, or None if its format has no random access here;
    ``name`` gives the format by its suffix where ``path`` has none (an open file's path).

    Raises ImageReadError for a file of a region format that cannot be read.
    """
    suffix = Path(name or path).suffix.lower()
    if suffix not in REGION_SUFFIXES:
        return None
    try:
        reader: RegionReader = NpyReader(path) if suffix == ".npy" else TiffReader(path)
    except (OSError, ValueError, tifffile.TiffFileError) as exc:
        raise ImageReadError(f"cannot read for regions: {exc}") from None
    shape, dtype = reader.shape, reader.dtype
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
        raise ImageReadError(f"region input must be gray, BGR or BGRA; shape {shape}")
    if dtype not in _DTYPES:
        raise ImageReadError(f"region input must be 8- or 16-bit; got {dtype}")
    return reader


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

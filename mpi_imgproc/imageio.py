"""Decode and encode image files with errors that say why (callers add which file).

OpenCV decodes a truncated JPEG or PNG silently (it only prints a warning) and returns a partly
grey image; such a file must be reported, not processed.  ``decode`` therefore walks JPEG
markers to the end-of-image marker and PNG chunks to ``IEND`` before handing the data to OpenCV:
a file that runs out first is truncated, while bytes after the end (which cameras and editors
often leave, and which OpenCV and Pillow ignore) are accepted.

Files are opened without blocking and must be regular files, so that a FIFO or a device named
``x.png`` is refused instead of hanging the reader.

``probe`` reads an image's size from its header alone, so that a pixel limit can refuse a
30000x30000 PNG of a few hundred kilobytes before decoding it would take 900 MB.
"""

from __future__ import annotations

import glob
import io
import os
import stat
import struct
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
from PIL import (
    BmpImagePlugin,
    ImageFile,
    Jpeg2KImagePlugin,
    JpegImagePlugin,
    PngImagePlugin,
    PpmImagePlugin,
    SunImagePlugin,
    TiffImagePlugin,
)

from .errors import ImageReadError, ImageWriteError
from .ops import check_image

FORMATS = ("png", "jpg", "tif", "same")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".pgm", ".ppm")
_EXTENSIONS = {"png": ".png", "jpg": ".jpg", "tif": ".tif"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG markers that stand alone, without a length (TEM, SOI; RST0-7 and EOI are handled apart).
_JPEG_STANDALONE = (0x01, 0xD8)
_JPEG_EOI = 0xD9
_JPEG_SOS = 0xDA


def png_end(data: bytes) -> int | None:
    """Offset just past a PNG's ``IEND`` chunk, walking the chunks; None if the data ends first."""
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        end = pos + 12 + length  # length, type, data, CRC
        if end > len(data):
            return None
        if data[pos + 4 : pos + 8] == b"IEND":
            return end
        pos = end
    return None


def jpeg_end(data: bytes) -> int | None:
    """Offset just past a JPEG's end-of-image marker; None if the data ends first.

    Segments are skipped by their lengths (so an EXIF thumbnail's own end marker is not taken
    for the image's), and the entropy-coded data after each start-of-scan segment is searched
    for the next real marker: ``FF`` followed by neither a stuffed ``00`` nor a restart marker.
    """
    pos = 2
    while True:
        pos = data.find(b"\xff", pos)
        while 0 <= pos < len(data) - 1 and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes before a marker
        if pos < 0 or pos + 1 >= len(data):
            return None
        marker = data[pos + 1]
        if marker == 0 or 0xD0 <= marker <= 0xD7:
            pos += 2  # a stuffed byte or a restart marker: inside a scan, not a segment
            continue
        if marker == _JPEG_EOI:
            return pos + 2
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if pos + 4 > len(data):
            return None
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")  # past a segment, maybe beyond


def jpeg_header(data: bytes | memoryview) -> Iterator[tuple[int, int]]:
    """``(marker, offset)`` of each marker segment of a JPEG stream, from its start (after
    the SOI, if any) up to and including its first start-of-scan; it stops early where the
    data is no marker segment (so a caller that needs the scan checks it came)."""
    at = 2 if bytes(data[:2]) == b"\xff\xd8" else 0
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker == 0xFF:  # a fill byte
            at += 1
            continue
        yield marker, at
        if marker == _JPEG_SOS:
            return
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_frame_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """The (height, width) a JPEG stream's frame header declares, or None if it has none
    before its first scan (a tables-only stream)."""
    for marker, at in jpeg_header(data):
        if marker in _JPEG_SOF and at + 9 <= len(data):
            return int.from_bytes(data[at + 5 : at + 7]), int.from_bytes(data[at + 7 : at + 9])
    return None


def _check_complete(data: bytes) -> None:
    if data[:3] == b"\xff\xd8\xff" and jpeg_end(data) is None:
        raise ImageReadError("truncated JPEG (no end-of-image marker)")
    if data[:8] == _PNG_SIGNATURE and png_end(data) is None:
        raise ImageReadError("truncated PNG (no IEND chunk)")


OPENCV_MAX_PIXELS = 2**30  # OpenCV's own cap on a decoded image (CV_IO_MAX_IMAGE_PIXELS)


def _unassociated_alpha_tiff(raw: bytes) -> np.ndarray | None:
    """An 8-bit RGBA TIFF with unassociated alpha (the kind region outputs are), decoded by
    tifffile as stored, in BGRA; None for any other file.

    OpenCV reads such a file through libtiff's RGBA interface, which premultiplies the
    colours by alpha (a pixel of alpha 0 comes out black), and only for 8 bits.  The region
    reader (``regionio``) reads the stored values, so a file would give other pixels by
    reference than uploaded; this keeps one reading, the lossless one, everywhere.  Larger
    than OpenCV would decode, it is left to OpenCV, which refuses it.
    """
    if raw[:4] not in _TIFF_MAGIC:
        return None
    import tifffile

    try:
        tif = tifffile.TiffFile(io.BytesIO(raw))
        page = tif.pages.first
        ours = (
            page.samplesperpixel == 4
            and page.imagelength * page.imagewidth <= OPENCV_MAX_PIXELS
            and page.photometric == tifffile.PHOTOMETRIC.RGB
            and page.planarconfig == tifffile.PLANARCONFIG.CONTIG
            and tuple(page.extrasamples) == (tifffile.EXTRASAMPLE.UNASSALPHA,)
            and np.dtype(page.dtype) == np.uint8
        )
    except Exception:  # noqa: BLE001 - a header tifffile cannot parse: OpenCV says what it is
        return None
    try:
        if not ours:
            return None
        rgba = page.asarray().reshape(page.imagelength, page.imagewidth, 4)
    except MemoryError:
        raise ImageReadError("cannot decode TIFF: it does not fit in memory") from None
    except Exception as exc:  # noqa: BLE001 - a damaged file: say what the decoder met
        raise ImageReadError(f"cannot decode TIFF: {type(exc).__name__}: {exc}") from None
    finally:
        tif.close()
    return cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA, dst=rgba)


def decode(data: bytes | memoryview) -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, TIFF, BMP, …) keeping depth and alpha."""
    raw = bytes(data) if isinstance(data, memoryview) else data
    if not raw:
        raise ImageReadError("empty file (0 bytes)")
    _check_complete(raw)
    try:
        image = _unassociated_alpha_tiff(raw)
        if image is None:
            image = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise ImageReadError(f"cannot decode: {exc}") from None
    if image is None:
        raise ImageReadError("not an image OpenCV can decode (corrupt or unknown format)")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    try:
        check_image(image)
    except Exception as exc:
        raise ImageReadError(str(exc)) from None
    return image


def _kind(mode: int) -> str:
    """What a non-regular file is, for messages."""
    for test, name in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a plain file"


def open_regular(path: str | Path) -> BinaryIO:
    """Open a regular file for reading; ImageReadError for anything else (a FIFO, a folder).

    The file is opened with ``O_NONBLOCK`` and checked with ``fstat`` on the open descriptor:
    opening a FIFO with no writer then returns at once instead of waiting forever, and the file
    checked is the file read.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ImageReadError(f"cannot read: {exc.strerror or exc}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ImageReadError(f"cannot read: {_kind(mode)}, not a regular file")
    return os.fdopen(fd, "rb")


def read_bytes(path: str | Path) -> bytes:
    """The bytes of one image file; ImageReadError says why it cannot be read."""
    with open_regular(path) as fp:
        try:
            return fp.read()
        except OSError as exc:
            raise ImageReadError(f"cannot read: {exc.strerror or exc}") from None


def read_image(path: str | Path) -> np.ndarray:
    """Read and decode one image file."""
    return decode(read_bytes(path))


# --------------------------------------------------------------------------- header probing

_HEADER_BYTES = 32
_TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")  # classic and BigTIFF
_JP2_MAGIC = (b"\xff\x4f\xff\x51", b"\0\0\0\x0cjP  \r\n\x87\n")  # codestream, JP2 box
_ONE_CHANNEL_MODES = ("1", "L", "I", "F")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_OPENCV_CHANNELS = {("TIFF", "LA"): 1, ("TIFF", "CMYK"): 4}  # OpenCV's own readings of these


def _pillow_class(prefix: bytes) -> type[ImageFile.ImageFile] | None:
    """The Pillow image class that reads the header of a format OpenCV decodes, by its magic.

    The classes are used directly, not through ``Image.open``: its decompression-bomb check
    (which warns above ``Image.MAX_IMAGE_PIXELS`` and refuses above twice that) is about
    Pillow decoding, which is not done here, and would hide the very sizes a pixel limit must
    see.  Only formats whose header reader reads headers alone are listed: Pillow's WebP and
    GIF readers start decoding (or check sizes themselves) when opened, so those two headers
    are parsed here; JPEG is read as plain JPEG (OpenCV decodes an MPO's first image).
    """
    if prefix.startswith(_PNG_SIGNATURE):
        return PngImagePlugin.PngImageFile
    if prefix[:3] == b"\xff\xd8\xff":
        return JpegImagePlugin.JpegImageFile
    if prefix[:4] in _TIFF_MAGIC:
        return TiffImagePlugin.TiffImageFile
    if prefix[:2] == b"BM":
        return BmpImagePlugin.BmpImageFile
    if len(prefix) >= 2 and prefix[0:1] == b"P" and prefix[1:2] in b"1234567fF":
        return PpmImagePlugin.PpmImageFile
    if prefix[:4] == b"\x59\xa6\x6a\x95":
        return SunImagePlugin.SunImageFile
    if prefix.startswith(_JP2_MAGIC):
        return Jpeg2KImagePlugin.Jpeg2KImageFile
    if prefix[4:8] == b"ftyp" and prefix[8:12] in (b"avif", b"avis", b"mif1", b"msf1"):
        try:
            from PIL import AvifImagePlugin  # Pillow >= 11.2, and only with libavif
        except ImportError:
            return None
        return AvifImagePlugin.AvifImageFile if AvifImagePlugin.SUPPORTED else None
    return None


def _webp_header(head: bytes) -> tuple[int, int, int, int] | None:
    """Size and channels from a WebP file's first chunk (lossy, lossless or extended)."""
    if len(head) < 30 or head[:4] != b"RIFF" or head[8:12] != b"WEBP":
        return None
    chunk = head[12:16]
    if chunk == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack("<HH", head[26:30])
        return height & 0x3FFF, width & 0x3FFF, 3, 1
    if chunk == b"VP8L" and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        return height, width, 4 if bits >> 28 & 1 else 3, 1
    if chunk == b"VP8X":
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
        return height, width, 4 if head[20] & 0x10 else 3, 1
    return None


def _gif_header(fp: BinaryIO) -> tuple[int, int, int, int] | None:
    """Size from a GIF's logical screen; BGRA if its first frame has a transparent colour."""
    head = fp.read(13)
    if len(head) < 13 or head[:6] not in (b"GIF87a", b"GIF89a"):
        return None
    width, height = struct.unpack("<HH", head[6:10])
    if head[10] & 0x80:  # global colour table
        fp.seek(3 << ((head[10] & 7) + 1), io.SEEK_CUR)
    channels = 3
    for _ in range(64):  # extensions before the first image: a graphic control one tells
        introducer = fp.read(2)
        if len(introducer) < 2 or introducer[0] != 0x21:
            break
        block = fp.read(2) if introducer[1] == 0xF9 else b""
        if len(block) == 2 and block[0] >= 1:
            channels = 4 if block[1] & 1 else 3
            break
        fp.seek(-len(block), io.SEEK_CUR)
        while size := fp.read(1):  # skip the extension's sub-blocks
            if size[0] == 0:
                break
            fp.seek(size[0], io.SEEK_CUR)
    return height, width, channels, 1


def _pillow_header(fp: BinaryIO, prefix: bytes) -> tuple[int, int, int, int] | None:
    cls = _pillow_class(prefix)
    if cls is None:
        return None
    try:
        with cls(fp) as image:
            width, height = image.size
            mode, fmt = image.mode, image.format
            transparent = "transparency" in image.info
            args = [arg for tile in image.tile for arg in _tile_args(tile)]
    except Exception:  # noqa: BLE001 - a header Pillow cannot read: size unknown
        return None
    if (fmt, mode) in _OPENCV_CHANNELS:
        nch = _OPENCV_CHANNELS[fmt, mode]
    elif mode == "P":
        nch = 4 if transparent else 3
    elif mode in _ONE_CHANNEL_MODES or mode.startswith("I;"):
        nch = 1
    else:
        nch = 4 if mode in _ALPHA_MODES else 3  # RGB, CMYK JPEG (decoded as BGR), YCbCr, ...
    deep_ppm = fmt == "PPM" and any(isinstance(a, int) and a > 255 for a in args)  # maxval
    if "16" in mode or deep_ppm or any(";16" in str(a) for a in args):
        nbytes = 2
    elif mode in ("I", "F"):
        nbytes = 4
    else:
        nbytes = 1
    return height, width, nch, nbytes


def _tile_args(tile: object) -> tuple:
    args = getattr(tile, "args", None)
    if args is None and isinstance(tile, tuple) and len(tile) > 3:
        args = tile[3]  # Pillow < 11 tiles are plain tuples
    return args if isinstance(args, tuple) else (args,)


def probe(
    source: bytes | bytearray | memoryview | str | os.PathLike[str],
) -> tuple[int, int, int, int] | None:
    """``(height, width, channels, bytes per value)`` of an encoded image, from its header only.

    ``source`` is the encoded bytes or a path (of which only the header is read).  No pixels
    are decoded and no memory in proportion to the image's size is taken, so a pixel limit
    can be checked first.  Channels and bytes per value are what ``decode`` will most likely
    give (OpenCV's reading of the format: gray 1, BGR 3, BGRA 4; 1 or 2 bytes).  None when the
    size cannot be known this way: unreadable, corrupt, or a format this does not read
    (OpenCV may still decode it).

    Pillow's ``Image.open`` is not used (see ``_pillow_class``), so its global
    ``Image.MAX_IMAGE_PIXELS`` neither refuses large sizes here nor is changed.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _probe_file(io.BytesIO(source))
    try:
        with open_regular(source) as fp:
            return _probe_file(fp)
    except (OSError, ImageReadError):
        return None


def _probe_file(fp: BinaryIO) -> tuple[int, int, int, int] | None:
    head = fp.read(_HEADER_BYTES)
    fp.seek(0)
    if head[:3] == b"GIF":
        return _gif_header(fp)
    return _webp_header(head) or _pillow_header(fp, head)


def encode(image: np.ndarray, fmt: str) -> bytes:
    """Encode to ``png``, ``jpg`` or ``tif`` bytes (JPEG takes 8-bit gray or BGR only)."""
    ext = _EXTENSIONS.get(fmt.lower().lstrip("."), "." + fmt.lower().lstrip("."))
    if ext in (".jpg", ".jpeg"):
        if image.dtype != np.uint8:
            raise ImageWriteError("JPEG holds 8-bit images only; use png or tif")
        if image.ndim == 3 and image.shape[2] == 4:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    try:
        ok, buf = cv2.imencode(ext, image)
    except cv2.error as exc:
        raise ImageWriteError(f"cannot encode as {ext}: {exc}") from None
    if not ok:
        raise ImageWriteError(f"cannot encode as {ext}")
    return buf.tobytes()


def output_path(source: str | Path, outdir: str | Path, fmt: str) -> Path:
    """Where the result of ``source`` goes: ``outdir/<stem>.<ext>`` (``same`` keeps the suffix)."""
    source = Path(source)
    suffix = (source.suffix or ".png") if fmt == "same" else _EXTENSIONS[fmt]
    return Path(outdir) / (source.stem + suffix)


def write_atomic(path: str | Path, data: bytes | memoryview | np.ndarray) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename: never a partial file.

    The temporary name is unique to this process and thread, and the file is created with mode
    0666 less the umask, as a plain ``open`` would.
    """
    path = Path(path)
    # Short whatever the name's length (a 250-character name must still leave room).
    tmp = path.with_name(f".{path.name[:64]}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_image(path: str | Path, image: np.ndarray) -> None:
    """Encode by the path's suffix and write atomically."""
    path = Path(path)
    write_atomic(path, encode(image, path.suffix))


def expand_inputs(items: Iterable[str]) -> list[str]:
    """Files named by paths, folders (their image files, sorted) and globs, in order.

    A path that does not exist is kept, so that it is reported as unreadable like any other
    bad input rather than silently skipped.  :func:`list_inputs` also says what was left out.
    """
    return list_inputs(items)[0]


def list_inputs(items: Iterable[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """``expand_inputs``, and every folder or glob entry it leaves out with the reason why.

    A folder gives its regular files with an image suffix; its other entries (sub-folders,
    other suffixes such as ``.gif`` or ``.json``, FIFOs) are left out.  A glob gives what it
    matches except folders and other non-regular files.  A path named on its own is always
    kept, so that reading it reports what is wrong with it.
    """
    files: list[str] = []
    left_out: list[tuple[str, str]] = []
    for item in items:
        if os.path.isdir(item):
            for name in sorted(os.listdir(item)):
                path = os.path.join(item, name)
                reason = _not_taken(path, check_suffix=True)
                files += [path] if reason is None else []
                left_out += [(path, reason)] if reason is not None else []
        elif glob.has_magic(item):
            for path in sorted(glob.glob(item)):
                reason = _not_taken(path, check_suffix=False)
                files += [path] if reason is None else []
                left_out += [(path, reason)] if reason is not None else []
        else:
            files.append(item)
    return files, left_out


def not_regular(path: str | Path) -> str | None:
    """What ``path`` is if it is not a regular file (``"a FIFO, not a regular file"``); None
    for a regular file, or for a path that cannot be stat'ed (reading it will say why)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else f"{_kind(mode)}, not a regular file"


def _not_taken(path: str, check_suffix: bool) -> str | None:
    """Why a folder or glob entry is not an input; None if it is one."""
    if os.path.isdir(path):
        return "a folder (folders are not searched recursively)"
    kind = not_regular(path)
    if kind is not None:
        return kind
    if check_suffix and not path.lower().endswith(IMAGE_SUFFIXES):
        suffix = f"suffix {Path(path).suffix}" if Path(path).suffix else "no suffix"
        return f"{suffix}: not an image suffix ({', '.join(IMAGE_SUFFIXES)})"
    return None

"""OpenCV's ``warpAffine`` source coordinates, reproduced in NumPy, so a strip can be remapped.

``cv2.warpAffine`` (called with ``WARP_INVERSE_MAP``, an output-to-input matrix ``M``) computes,
for every output pixel ``(x, y)``, a source coordinate from the *absolute* ``x`` and ``y``, then
interpolates the source there.  To compute output rows ``y0 .. y1`` of the whole image from a
window of the source, :func:`source_maps` repeats that coordinate arithmetic bit for bit for
those rows, and :func:`remap_window` hands the coordinates, shifted by the window's integer
origin, to ``cv2.remap`` on the window, which interpolates exactly as ``warpAffine`` does.

OpenCV 5.0 has two implementations, and which one runs depends on the interpolation; each was
established by comparing ``cv2.warpAffine`` with ``cv2.remap`` on candidate maps over hundreds
of random images, matrices and sizes (gray, BGR, BGRA; 8 and 16 bits; constant and replicate
borders; ``tests/test_warpmaps.py`` keeps the check):

``linear``, ``nearest``
    single-precision coordinates.  ``M`` is rounded to float32; per row ``r = y*M1 + M2``
    (a float32 multiply, then an add); in the vector loop, which covers the first
    ``(width // V) * V`` columns (``V`` is twice the float32 lanes of the dispatched SIMD:
    16 with AVX2), ``x' = fma(M0, x, r)``; in the scalar tail ``x' = fma(x, M0, y*M1) + M2``
    (as if the compiler fused the first product).  Nearest rounds half to even.  ``V``
    depends on the CPU, so :func:`vector_width` reads it off OpenCV once per process (and is
    None, so that these modes are not tiled, if no width reproduces OpenCV).
``cubic``
    single-precision coordinates without fused operations: ``x' = M0*x + (y*M1 + M2)``, every
    operation rounded to float32, in every column.
``lanczos``
    OpenCV's classic fixed-point maps: ``INTER_BITS = 5``, ``AB_BITS = 10``; per column
    ``round(M0*x*1024)``, per row ``round((M1*y + M2)*1024) + 16`` (rounding half to even,
    as ``cvRound``); their sum shifted right by 5 gives a coordinate in 1/32 pixel, whose
    integer part is the map and whose fractions index the interpolation table.

Shifting by the window's origin ``(ox, oy)`` is exact: a float32 ``x' >= ox`` (the window
starts at or before every sample) loses no bit in ``x' - ox`` below ``2**24``, so ``floor``
and the fraction are the whole image's, less ``ox``; with an even origin, rounding half to
even picks the same pixel too.  The integer maps shift exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import cv2
import numpy as np

from .errors import ImgprocError

FLOAT_MODES = ("nearest", "linear", "cubic")
WARP_INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
}
WARP_BORDERS = {"constant": cv2.BORDER_CONSTANT, "replicate": cv2.BORDER_REPLICATE}
# source pixels a kernel reads before and after its base pixel (floor, or the nearest one)
TAPS = {"nearest": (0, 0), "linear": (0, 1), "cubic": (1, 2), "lanczos": (3, 4)}
_INTER_BITS, _AB_BITS = 5, 10
_VECTOR_WIDTHS = (16, 32, 8, 64, 4)  # AVX2, AVX-512, SSE/NEON, wider; tried in this order

Maps = tuple[np.ndarray, np.ndarray, np.ndarray | None]


_LOW29, _HALF29 = (1 << 29) - 1, 1 << 28  # float64 mantissa bits below float32's, and half


def fma32(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``a*b + c`` rounded once to float32, as a fused multiply-add of float32 operands.

    The product of two float32 values is exact in float64, and the sum ``s`` is rounded to
    float64 once.  Rounding ``s`` to float32 then gives the correctly rounded result unless
    ``s`` landed exactly on a float32 rounding midpoint (25 significant bits: the 29 mantissa
    bits below float32's read ``1000…``): a float32 midpoint is a float64 value, so the exact
    sum cannot lie across one from ``s``.  Only at those few places is the sum's rounding
    error (Knuth's two-sum) consulted, and ``s`` nudged off the midpoint to its side.
    """
    p = np.asarray(a, np.float64) * np.asarray(b, np.float64)
    c = np.asarray(c, np.float64)
    s = np.asarray(p + c)
    out = s.astype(np.float32)
    mid = (s.view(np.int64) & _LOW29) == _HALF29
    if mid.any():
        ps, cs, ss = np.broadcast_to(p, s.shape)[mid], np.broadcast_to(c, s.shape)[mid], s[mid]
        t = ss - ps
        err = (ps - (ss - t)) + (cs - t)
        nudged = np.where(err == 0, ss, np.nextafter(ss, np.where(err > 0, np.inf, -np.inf)))
        out[mid] = nudged.astype(np.float32)
    return out[()] if out.ndim == 0 else out


def _float_coords(
    m: np.ndarray, rows: np.ndarray, width: int, mode: str, vector: int
) -> tuple[np.ndarray, np.ndarray]:
    """warpAffine's float32 source coordinates (x', y') for ``rows`` x ``width`` outputs."""
    f = m.astype(np.float32).ravel()
    x = np.arange(width, dtype=np.float32)[None, :]
    y = rows.astype(np.float32)[:, None]
    out = []
    for m0, m1, m2 in ((f[0], f[1], f[2]), (f[3], f[4], f[5])):
        if mode == "cubic":
            out.append((m0 * x) + ((y * m1) + m2))
            continue
        per_row = (y * m1) + m2
        split = (width // vector) * vector  # the vector loop's columns, then the scalar tail
        body = fma32(m0, x[:, :split], per_row)
        tail = fma32(x[:, split:], m0, y * m1) + m2
        out.append(np.concatenate([body, tail], axis=1))
    return out[0], out[1]


def _fixed_coords(m: np.ndarray, rows: np.ndarray, width: int) -> Maps:
    """warpAffine's fixed-point maps (integer x, integer y, table index) for lanczos."""
    scale, delta = 1 << _AB_BITS, (1 << _AB_BITS) >> (_INTER_BITS + 1)
    x = np.arange(width, dtype=np.float64)
    y = rows.astype(np.float64)
    fx = np.rint(m[0, 0] * x * scale).astype(np.int64)[None, :]
    fy = np.rint(m[1, 0] * x * scale).astype(np.int64)[None, :]
    x0 = np.rint((m[0, 1] * y + m[0, 2]) * scale).astype(np.int64)[:, None] + delta
    y0 = np.rint((m[1, 1] * y + m[1, 2]) * scale).astype(np.int64)[:, None] + delta
    sx = (x0 + fx) >> (_AB_BITS - _INTER_BITS)
    sy = (y0 + fy) >> (_AB_BITS - _INTER_BITS)
    tab = (1 << _INTER_BITS) - 1
    alpha = ((sy & tab) << _INTER_BITS) + (sx & tab)
    limit = np.iinfo(np.int16)
    ix = np.clip(sx >> _INTER_BITS, limit.min, limit.max)  # saturate_cast<short>
    iy = np.clip(sy >> _INTER_BITS, limit.min, limit.max)
    return ix, iy, alpha.astype(np.uint16)


def source_maps(m: np.ndarray, rows: range, width: int, mode: str, vector: int | None) -> Maps:
    """warpAffine's source coordinates for output ``rows`` (absolute) and columns 0..width-1.

    Float modes give float32 ``(x', y', None)``; lanczos gives integer ``(x, y, table index)``.
    ``vector`` is OpenCV's vector-loop width (:func:`vector_width`; unused by cubic/lanczos).
    """
    ys = np.arange(rows.start, rows.stop)
    if mode == "lanczos":
        return _fixed_coords(m, ys, width)
    if vector is None and mode != "cubic":  # rank 0's CPU chained it; this one differs
        raise ImgprocError(
            f"rotate: this machine's OpenCV warps {mode} with a vector loop none of the known "
            "widths reproduces, so its strips cannot be cut here; use tile 0 for this pipeline"
        )
    sx, sy = _float_coords(m, ys, width, mode, vector or 1)
    return sx, sy, None


def tap_range(coords: np.ndarray, mode: str) -> tuple[int, int]:
    """The first and last source index the kernel reads along one axis (before clipping)."""
    before, after = TAPS[mode]
    if mode == "lanczos":
        base_lo, base_hi = int(coords.min()), int(coords.max())
    elif mode == "nearest":
        base = np.rint(coords)  # half to even, as OpenCV's v_round and cvRound
        base_lo, base_hi = int(base.min()), int(base.max())
    else:
        base_lo, base_hi = int(np.floor(coords.min())), int(np.floor(coords.max()))
    return base_lo - before, base_hi + after


def remap_window(
    window: np.ndarray,
    maps: Maps,
    origin: tuple[int, int],
    mode: str,
    border: str,
    value: float,
) -> np.ndarray:
    """``cv2.remap`` of ``window`` (whose top-left pixel is source pixel ``origin = (y, x)``)
    through absolute ``maps``: the whole image's warpAffine over those maps' rows."""
    oy, ox = origin
    sx, sy, alpha = maps
    if alpha is None:
        map1 = (sx.astype(np.float64) - ox).astype(np.float32)  # exact, see the module doc
        map2 = (sy.astype(np.float64) - oy).astype(np.float32)
    else:
        map1 = np.stack([sx - ox, sy - oy], axis=-1).astype(np.int16)
        map2 = alpha
    cv2.ipp.setUseIPP(False)
    return cv2.remap(
        window,
        map1,
        map2,
        WARP_INTERPOLATIONS[mode],
        borderMode=WARP_BORDERS[border],
        borderValue=(value,) * 4,
    )


@lru_cache(maxsize=1)
def vector_width() -> int | None:
    """The width of warpAffine's vector loop on this CPU, read off OpenCV itself.

    A 16-bit probe is warped by ``cv2.warpAffine`` and remapped through the maps of every
    candidate width; the first width that reproduces warpAffine for every probe matrix wins.
    None when none does: then linear and nearest rotations are not cut into strips.
    """
    rng = np.random.default_rng(20240601)
    src = rng.integers(0, 65536, (41, 67), dtype=np.uint16)
    width = 125  # no multiple of any candidate, so every candidate has its own tail
    matrices = [_probe_matrix(a, src.shape, (57, width)) for a in (17.3, 101.7, -33.1, 251.9)]
    cv2.ipp.setUseIPP(False)
    for vector in _VECTOR_WIDTHS:
        if all(_probe_agrees(src, m, width, vector) for m in matrices):
            return vector
    return None


def _probe_matrix(angle: float, shape: Sequence[int], out: Sequence[int]) -> np.ndarray:
    c, s = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    oy, ox = (out[0] - 1) / 2, (out[1] - 1) / 2
    return np.array([[c, s, cx - c * ox - s * oy], [-s, c, cy + s * ox - c * oy]])


def _probe_agrees(src: np.ndarray, m: np.ndarray, width: int, vector: int) -> bool:
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    want = cv2.warpAffine(src, m, (width, 57), flags=flags, borderMode=cv2.BORDER_REPLICATE)
    maps = source_maps(m, range(57), width, "linear", vector)
    got = remap_window(src, maps, (0, 0), "linear", "replicate", 0)
    return bool(np.array_equal(got, want))

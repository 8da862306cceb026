"""Chains: crop, flip, rotations, resize and tiled ops fused into one tiled pass.

A pipeline such as ``crop -> resize -> sharpen`` used to run as three whole-image stages.  A
:class:`ChainStage` runs it as one: the output is cut into strips, and each strip is traced
back through every step to the exact window of the *input* it depends on.  A worker gets (or,
by reference, reads) only that window and runs the steps on it, cutting each intermediate to
what the next step needs.  No process holds the image or any intermediate whole.

How each step maps an output box back to an input box (boxes are ``(y0, y1, x0, x1)``):

* a point or neighbourhood op: the box grown by its halo and clipped to the image (the halo
  argument of :mod:`mpi_imgproc.tiling`); ops marked ``full_rows`` take whole rows;
* crop, flip and quarter turns: the same pixels, shifted, mirrored or transposed;
* resize: whole rows, aligned to the ratio's *period*.  OpenCV maps output row ``dy`` to
  source ``(dy + 0.5) * in/out - 0.5``.  With ``in/out = q/p`` in lowest terms, output rows
  ``k*p + j`` and input rows ``k*q + j'`` line up exactly like rows ``j`` and ``j'``, so
  ``cv2.resize`` of a window that starts at input row ``k*q``, called with the whole image's
  scale factors (``fx``, ``fy``, not a size), computes the whole image's rows ``k*p ...`` —
  the same arithmetic on the same values.  Columns span the whole width, so they see the whole
  image's column mapping unchanged.  The window has a margin of whole periods beyond the
  widest kernel (Lanczos' 8 taps, or a downscale's cell), so no kept row sees the window's edge.

Where that alignment is exact (checked by the property tests in ``tests/test_chain.py``):

* ``nearest`` needs no alignment at all: OpenCV's row and column maps are read off OpenCV once
  (a resize of an index column) and the strip is gathered through them, at any sizes;
* ``linear`` (OpenCV's bit-exact bilinear, ``INTER_LINEAR_EXACT``, whose coefficients are
  computed in double precision) and ``area`` when neither side grows, for any period up to
  :data:`MAX_RESIZE_PERIOD` rows; an enlarging ``area`` takes OpenCV's generic path, whose
  double-precision ``floor`` of a window's small coordinates can differ from the whole image's
  large ones, so it runs whole;
* ``cubic`` and ``lanczos`` compute the source coordinate in single precision, whose rounding
  depends on the coordinate's magnitude: a window's small local coordinates round differently
  from the whole image's large ones.  They are aligned only when every coordinate is exactly
  representable in single precision (the period a power of two and ``2·p·size < 2**24``: scale
  factors such as 1/2, 1/3, 2 or 4).  At any other ratio they go *row by row*
  (:func:`single_row_resize`): each output row is asked of OpenCV on its own, from its source
  rows, with a factor that puts it at the whole image's coordinate fraction, so it gets the
  whole image's weights and runs the same code.  That costs 3.5 (cubic) to 5.4 (lanczos) times
  the whole resize's CPU, so it is used for inputs of :data:`MIN_ROW_BY_ROW_PIXELS` and more;
  smaller ones run as a whole-image stage.  (Emulating OpenCV's arithmetic in NumPy instead
  was tried and is not exact: its vector loops round in their own order.)

A ``linear`` or ``area`` resize whose period is too long (e.g. 1000 rows to 999) runs whole: a
strip would have to span the period anyway.

A rotation by an angle that is no quarter turn (``ops.rotate``: ``cv2.warpAffine`` with the
output-to-input matrix ``ops.rotate_matrix``) computes whole rows of its output per strip.
OpenCV derives each output pixel's source coordinate from the pixel's *absolute* position, so
:mod:`mpi_imgproc.warpmaps` recomputes those coordinates for the strip's rows bit for bit, and
``cv2.remap`` interpolates the strip from its window through them, shifted by the window's
integer origin.  The window is the box of every source pixel any kernel tap reads (bounded
from the strip's corners, widened by a pixel and the taps; each strip checks that its exact
taps lie inside), clipped to the image, its origin even.  That is exact for ``constant`` and
``replicate`` borders: an in-image tap lies in the window; a tap outside the image lies
outside the window too, so it reads the fill value, and with ``replicate`` it puts the
window's edge on the image's edge, so it reads the same edge pixel.  OpenCV 5.0 computes the
coordinates in single precision for nearest, linear and cubic (with fused multiply-adds, and
a vector-loop width read off OpenCV per process), in fixed point for lanczos; see
:mod:`mpi_imgproc.warpmaps`.  Established empirically, windows against the whole image on
thousands of random images (gray, BGR, BGRA; 8 and 16 bits; thin ones), and kept by the
property tests:

* exact and chained: nearest, linear and lanczos with either border; cubic with ``constant``;
* whole: cubic with ``replicate`` (OpenCV's bicubic kernel then gives, for taps far outside the
  source, results that depend on the source's size: a window differs by 1 on a few pixels),
  and nearest and linear where no vector-loop width reproduces OpenCV (``vector_width``).

A strip of a rotation reads the bounding box of a tilted band, about ``rows*|cos a| +
width*|sin a|`` input rows (columns, near 90 degrees): near 45 degrees most of the input.  So a
rotation is chained only while that *skew* (``min(|sin a|, |cos a|)`` times the canvas' longer
side) is at most :data:`MAX_ROTATION_SKEW` of the input's smaller side, or 64 pixels: a deskew
by a few degrees, not a steep turn of a large image, which runs as one whole-image warp (its
memory is the image and the canvas; a chain's windows would hold most of the image, with
coordinate maps of about 50 bytes an output pixel on top).  And only for inputs of at least
:data:`MIN_CHAINED_ROTATION_PIXELS` (128 Mpixel): recomputing the coordinates in NumPy costs
about fifteen times the CPU of OpenCV's own warp, which smaller images do not need to avoid.
Within the chain, strips grow (as for halos) until the windows together read at most three
times the input, and the maps are computed :data:`ROTATE_BLOCK_PIXELS` output pixels at a
time.  Sides of 32767 pixels or more
(OpenCV's remap limit) run whole.  A quarter turn or another rotation may not follow a
rotation in a chain.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

import cv2
import numpy as np

from .ops import INTERPOLATIONS, WARP_SIDE_LIMIT, canonical_shape, quarter_turn, rotate_matrix
from .pipeline import Stage, Step
from .tiling import Box, Tile
from .warpmaps import TAPS, remap_window, source_maps, tap_range, vector_width

MAX_RESIZE_PERIOD = 256
_FLOAT_MANTISSA = 2**24
_SINGLE_PRECISION_MODES = ("cubic", "lanczos")


def resize_period(in_rows: int, out_rows: int, interpolation: str) -> tuple[int, int] | None:
    """``(p, q)`` with ``out_rows/in_rows = p/q`` in lowest terms, when a resize between these
    row counts can be cut into aligned strips exactly; None when it must run whole."""
    g = math.gcd(in_rows, out_rows)
    p, q = out_rows // g, in_rows // g
    if p > MAX_RESIZE_PERIOD or out_rows < 2 * p:
        return None
    if interpolation in _SINGLE_PRECISION_MODES and (
        p & (p - 1) or 2 * p * max(in_rows, out_rows) >= _FLOAT_MANTISSA
    ):
        return None
    return p, q


def resize_cut(shape: tuple[int, ...], out: tuple[int, ...], interpolation: str) -> str | None:
    """How a resize from ``shape`` to ``out`` is cut into strips exactly: ``gather`` (nearest:
    OpenCV's own row and column maps, then indexing), ``aligned`` (windows on the ratio's
    period), ``rows`` (cubic and lanczos without such a period, on inputs of at least
    :data:`MIN_ROW_BY_ROW_PIXELS`: each output row from its own taps, see
    :func:`single_row_resize`), or None (it runs whole).

    ``area`` is aligned only when neither side grows: enlarging, OpenCV's area mode takes its
    generic path, whose double-precision ``floor`` differs between a window's coordinates and
    the whole image's.
    """
    if interpolation == "nearest":
        return "gather"
    if interpolation == "area" and (out[0] > shape[0] or out[1] > shape[1]):
        return None
    if resize_period(shape[0], out[0], interpolation):
        return "aligned"
    if (
        interpolation in _SINGLE_PRECISION_MODES
        and shape[0] * shape[1] >= MIN_ROW_BY_ROW_PIXELS
        and top_rows(*shape[:2], *out[:2], interpolation) <= MAX_TOP_ROWS
    ):
        return "rows"
    return None


# A row-by-row resize horizontally resizes each output row's 4 (cubic) or 8 (lanczos) source
# rows again for every output row: about 3.5 (cubic) and 5.4 (lanczos) times the CPU of the
# whole-image resize of an 8000x8000 BGR image to 90 %.  Worth it where the whole image would
# not fit one process comfortably (as for rotations, 128 Mpixel), and the only way past
# ``--max-pixels`` by reference.
MIN_ROW_BY_ROW_PIXELS = 2**27
# The first strip resizes the input's top rows as a window (``top_rows``).  At the same width
# and a height ratio within about 1/(2*MAX_TOP_ROWS) of 1, OpenCV would copy a short window
# instead, and the window must grow towards half the image: such a resize runs whole.
MAX_TOP_ROWS = 4096


@dataclass(frozen=True)
class RowMap:
    """Where OpenCV's cubic or lanczos resize takes each output row from, along the rows.

    OpenCV computes output row ``dy``'s source coordinate ``float32((dy + 0.5) * scale - 0.5)``
    (``scale`` the reciprocal of the ``fy`` it is given), its floor ``sy`` and the fraction
    ``phase``, whose kernel weights combine source rows ``sy - before ... sy - before + taps - 1``
    (clamped to the image).  Rows from ``first`` on have a coordinate of at least ``before``.
    """

    sy: np.ndarray
    phase: np.ndarray
    taps: int
    first: int

    @property
    def before(self) -> int:
        return self.taps // 2 - 1

    def sources(self, y0: int, y1: int, height: int) -> np.ndarray:
        """The clamped source rows of output rows ``[y0, y1)``, one row of taps each."""
        taps = self.sy[y0:y1, None] + np.arange(self.taps) - self.before
        return np.clip(taps, 0, height - 1)


@lru_cache(maxsize=16)
def row_map(height: int, out: int, interpolation: str) -> RowMap:
    """OpenCV's row mapping for a cubic or lanczos resize of ``height`` rows to ``out``."""
    scale = 1.0 / (out / height)  # as OpenCV: the reciprocal of the factor it is given
    coords = ((np.arange(out) + 0.5) * scale - 0.5).astype(np.float32)
    sy = np.floor(coords)
    taps = 4 if interpolation == "cubic" else 8
    first = int(np.searchsorted(coords, taps // 2 - 1))  # coordinates grow with the row
    return RowMap(sy.astype(np.int64), (coords - sy).astype(np.float64), taps, first)


@lru_cache(maxsize=16)
def top_rows(height: int, width: int, out_h: int, out_w: int, interpolation: str) -> int:
    """Input rows from 0 whose own resize computes output rows ``[0, first)`` as the whole
    image does: the same coordinates (a window from row 0 with the whole image's factors
    computes them alike), every tap inside, at least ``first`` output rows, and not as many
    output rows as input rows when the width stays (OpenCV then copies the window)."""
    rows = row_map(height, out_h, interpolation)
    if rows.first == 0:
        return 0
    last_tap = int(rows.sources(rows.first - 1, rows.first, height)[0, -1]) + 1
    enough = math.ceil((rows.first + 1) * height / out_h) + 1  # rows giving ``first`` rows
    top = min(height, max(last_tap + 1, enough))
    while top < height and out_w == width and round(top * (out_h / height)) == top:
        top += 1
        if top > MAX_TOP_ROWS:
            return height  # no short window: resize_cut lets such a resize run whole
    return top


def single_row_resize(rows: np.ndarray, phase: float, fx: float, interpolation: str) -> np.ndarray:
    """One output row of OpenCV's resize from its clamped source ``rows`` (``taps`` of them),
    exactly as the whole image's resize computes it.

    A window's own resize would compute its rows from small local coordinates, whose
    single-precision fractions differ from the whole image's (at row 40000, the whole image's
    are multiples of 2**-8).  So each row is asked of OpenCV on its own: its source rows as a
    ``taps``-row image, resized with the whole image's ``fx`` (so columns, computed across the
    whole width, are the whole image's) and an ``fy`` that puts output row 0 at coordinate
    ``before + phase``.  That coordinate is exact in single precision (``phase`` is a multiple
    of 2**-23 for cubic, 2**-22 for lanczos, from rows at or past ``RowMap.first``), so row 0
    gets the whole image's row weights, taps the same rows, and runs the same code.  Tried
    against whole-image resizes on random gray, BGR and BGRA images of 8 and 16 bits, at
    random sizes up and down, thin ones of up to 2**24 rows among them; kept by the property
    tests.
    """
    before = len(rows) // 2 - 1  # as RowMap.before: 1 for cubic's 4 taps, 3 for lanczos' 8
    fy = 1.0 / (2 * before + 1 + 2 * phase)  # (0 + 0.5) / fy - 0.5 == before + phase
    mode = INTERPOLATIONS[interpolation]
    return cv2.resize(rows, None, fx=fx, fy=fy, interpolation=mode)


@lru_cache(maxsize=64)
def nearest_map(size: int, out: int) -> np.ndarray:
    """The source index OpenCV's nearest resize takes for each of ``out`` outputs along an axis
    of ``size``, read off OpenCV itself (the map along one axis does not depend on the other)."""
    cv2.ipp.setUseIPP(False)
    index = np.arange(size, dtype=np.int32).reshape(size, 1)
    mapped = cv2.resize(index, (1, out), interpolation=cv2.INTER_NEAREST)
    return mapped.reshape(out)


def rotation_cut(params: Mapping[str, Any]) -> bool:
    """Whether a rotation by an angle that is no quarter turn, with these bound parameters, is
    cut into strips exactly (see the module docstring); otherwise it runs whole."""
    mode = params["interpolation"]
    if mode == "cubic":
        return params["border"] == "constant"
    return mode == "lanczos" or vector_width() is not None


# A rotation is chained only while a strip's window stays a small part of the input: the
# strip's full-width rows span a tilted band of about ``skew`` input rows (or columns, near 90
# degrees), so past this share of the input's smaller side (or 64 rows on a small image) the
# windows would hold most of the image, and the whole-image warp costs less.
MAX_ROTATION_SKEW = 1 / 8
# A chained strip recomputes warpAffine's coordinates in NumPy, at about fifteen times the CPU
# of the whole-image warp: worth it only where the whole image and its canvas would not fit
# one process comfortably (at 2**27 pixels, 128 Mpixel: 0.4 GB of 8-bit BGR, twice that to
# warp), and the only way for images past ``--max-pixels`` (by reference).
MIN_CHAINED_ROTATION_PIXELS = 2**27
ROTATE_BLOCK_PIXELS = 1 << 19  # output pixels whose source maps are computed at a time


def rotation_bounded(shape: Sequence[int], out: Sequence[int], params: Mapping[str, Any]) -> bool:
    """Whether a rotation from ``shape`` onto ``out`` is chained: the input has at least
    :data:`MIN_CHAINED_ROTATION_PIXELS`, OpenCV's remap takes its sides (below 32767; the
    whole-image warp has no such limit), and the band a strip reads is at most
    :data:`MAX_ROTATION_SKEW` of the input's smaller side."""
    if max(*shape[:2], *out[:2]) >= WARP_SIDE_LIMIT:
        return False
    if shape[0] * shape[1] < MIN_CHAINED_ROTATION_PIXELS:
        return False
    a = math.radians(params["angle"])
    skew = min(abs(math.sin(a)), abs(math.cos(a))) * max(out[:2])
    return skew <= max(64.0, MAX_ROTATION_SKEW * min(shape[:2]))


def _whole_rows(step: Step) -> bool:
    """Whether a chained step computes whole rows of its output for any box asked of it."""
    return step.op.name == "resize" or step.op.full_rows or _rotation(step)


def _rotation(step: Step) -> bool:
    return step.op.name == "rotate" and not step.is_view


def chainable(step: Step, shape: tuple[int, ...], after: Sequence[Step] = ()) -> bool:
    """Whether ``step`` on an input of ``shape`` can join a chain of the steps ``after``.

    A quarter turn that swaps rows and columns, and a rotation by any other angle, may not
    follow a step that computes whole rows (a resize, a ``full_rows`` op, a rotation): an
    output strip would then need (nearly) every row of theirs, and each strip would redo them.
    """
    if _rotation(step):
        return (
            rotation_cut(step.params)
            and rotation_bounded(shape, step.op.output_shape(shape, step.params), step.params)
            and not any(_whole_rows(s) for s in after)
        )
    if step.op.name == "rotate" and quarter_turn(step.params["angle"]) in (90, 270):
        return not any(_whole_rows(s) for s in after)
    if step.op.tileable or step.is_view:
        return True
    if step.op.name != "resize":
        return False
    out = step.op.output_shape(shape, step.params)
    return resize_cut(shape, out, step.params["interpolation"]) is not None


def _clip(box: Box, shape: Sequence[int]) -> Box:
    y0, y1, x0, x1 = box
    return max(0, y0), min(shape[0], y1), max(0, x0), min(shape[1], x1)


@dataclass(frozen=True)
class Link:
    """One step of a chain with the shapes it reads and writes."""

    step: Step
    shape_in: tuple[int, ...]
    shape_out: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.step.op.name

    def need(self, box: Box) -> Box:
        """The input box this step needs to produce output ``box`` exactly."""
        y0, y1, x0, x1 = box
        h, w = self.shape_in[:2]
        p = self.step.params
        if self.step.op.tileable:
            halo = self.step.halo
            grown = _clip((y0 - halo, y1 + halo, x0 - halo, x1 + halo), self.shape_in)
            return (*grown[:2], 0, w) if self.step.op.full_rows else grown
        if self.name == "crop":
            return y0 + p["y"], y1 + p["y"], x0 + p["x"], x1 + p["x"]
        if self.name == "flip":
            if p["axis"] in ("vertical", "both"):
                y0, y1 = h - y1, h - y0
            if p["axis"] in ("horizontal", "both"):
                x0, x1 = w - x1, w - x0
            return y0, y1, x0, x1
        if self.name == "rotate" and self.step.is_view:
            turn = quarter_turn(p["angle"])
            if turn == 90:  # out[i, j] = in[h-1-j, i]
                return h - x1, h - x0, y0, y1
            if turn == 270:  # out[i, j] = in[j, w-1-i]
                return x0, x1, w - y1, w - y0
            if turn == 0:
                return box
            return h - y1, h - y0, w - x1, w - x0
        if self.name == "rotate":
            return self._rotation_window(y0, y1)[0]
        if self._cut == "gather":
            rows, cols = self._maps
            return (int(rows[y0:y1].min()), int(rows[y0:y1].max()) + 1,
                    int(cols[x0:x1].min()), int(cols[x0:x1].max()) + 1)  # fmt: skip
        if self._cut == "rows":
            return self._row_window(y0, y1)
        return self._resize_window(y0, y1)[0]

    @cached_property
    def _cut(self) -> str | None:
        """How this resize is cut (:func:`resize_cut`); None for any other step."""
        if self.name != "resize":
            return None
        cut = resize_cut(self.shape_in, self.shape_out, self.step.params["interpolation"])
        assert cut is not None, "a resize is chained only where it can be cut"
        return cut

    @cached_property
    def _row_map(self) -> RowMap:
        return row_map(self.shape_in[0], self.shape_out[0], self.step.params["interpolation"])

    def _row_window(self, y0: int, y1: int) -> Box:
        """The input rows (all columns) output rows ``[y0, y1)`` of a row-by-row resize read:
        their taps, and for rows before ``RowMap.first`` the input's top (see ``_rows``)."""
        h, w = self.shape_in[:2]
        taps = self._row_map.sources(y0, y1, h)
        top = 0 if y0 < self._row_map.first else int(taps[0, 0])
        bottom = int(taps[-1, -1]) + 1
        if y0 < self._row_map.first:
            bottom = max(bottom, self._top_rows())
        return top, bottom, 0, w

    def _top_rows(self) -> int:
        (h, w), (out_h, out_w) = self.shape_in[:2], self.shape_out[:2]
        return top_rows(h, w, out_h, out_w, self.step.params["interpolation"])

    @cached_property
    def _maps(self) -> tuple[np.ndarray, np.ndarray]:
        (h, w), (out_h, out_w) = self.shape_in[:2], self.shape_out[:2]
        return nearest_map(h, out_h), nearest_map(w, out_w)

    def _resize_window(self, y0: int, y1: int) -> tuple[Box, int]:
        """The aligned input window for output rows ``[y0, y1)`` and its first output row."""
        (h, w), out_h = self.shape_in[:2], self.shape_out[0]
        mode = self.step.params["interpolation"]
        period = resize_period(h, out_h, mode)
        assert period is not None, "a resize is chained only with a period"
        p, q = period
        first, last = y0 // p, -(-y1 // p)  # whole periods covering the rows
        # input rows of margin beyond the kernel: its taps past the centre, a cell when shrinking
        taps = {"linear": 2, "area": 2, "cubic": 3, "lanczos": 5}[mode] + math.ceil(q / p)
        reach = -(-taps // q)  # in whole periods
        start = max(0, first - reach)
        return (start * q, min(h, (last + reach) * q), 0, w), start * p

    @cached_property
    def _matrix(self) -> np.ndarray:
        return rotate_matrix(self.shape_in, self.shape_out, self.step.params["angle"])

    def _rotation_window(self, y0: int, y1: int) -> tuple[Box, tuple[int, int, int, int]]:
        """The input window for output rows ``[y0, y1)`` (all columns) of a rotation, and the
        range of source indices ``(x_lo, x_hi, y_lo, y_hi)`` it was cut from.

        The range bounds the exact one: the affine map's extremes over the strip's corners, in
        double precision, widened by a pixel (more than float32's rounding of coordinates below
        ``2**20``, and than the fixed-point maps' 1/32) and by the kernel's taps.  The window is
        that range clipped to the image (at least one pixel), its origin made even.
        """
        (h, w), out_w = self.shape_in[:2], self.shape_out[1]
        before, after = TAPS[self.step.params["interpolation"]]
        xs, ys = np.array([0, out_w - 1] * 2, float), np.array([y0, y0, y1 - 1, y1 - 1], float)
        lo_hi = []
        for row in self._matrix:
            coords = row[0] * xs + row[1] * ys + row[2]
            lo_hi += [math.floor(coords.min() - 1) - before, math.floor(coords.max() + 1) + after]
        x_lo, x_hi, y_lo, y_hi = lo_hi
        top, left = min(max(y_lo, 0), h - 1), min(max(x_lo, 0), w - 1)
        bottom, right = max(min(y_hi, h - 1), 0) + 1, max(min(x_hi, w - 1), 0) + 1
        return (top - top % 2, bottom, left - left % 2, right), (x_lo, x_hi, y_lo, y_hi)

    def _rotate(self, block: np.ndarray, need: Box, want: Box) -> np.ndarray:
        """Output box ``want`` of a rotation from ``block``, the input window ``need``.

        The strip's rows are computed whole (OpenCV's vector loop and scalar tail take columns
        at fixed positions), through warpAffine's own maps for those rows (:mod:`.warpmaps`).
        The window holds every in-image pixel any kernel tap reads, and nothing outside the
        image, so each tap reads what it reads on the whole image: an in-image pixel, or for a
        tap outside the image the border's fill (``constant``: outside the window too) or the
        nearest edge pixel (``replicate``: such a tap puts the window's edge on the image's).
        """
        self.step.op.check_image(block)
        p, out_w = self.step.params, self.shape_out[1]
        mode = p["interpolation"]
        x_lo, x_hi, y_lo, y_hi = self._rotation_window(want[0], want[1])[1]
        step = max(1, ROTATE_BLOCK_PIXELS // out_w)  # the maps take ~50 bytes an output pixel
        parts = []
        for y in range(want[0], want[1], step):
            rows = range(y, min(want[1], y + step))
            maps = source_maps(self._matrix, rows, out_w, mode, vector_width())
            (ax, bx), (ay, by) = tap_range(maps[0], mode), tap_range(maps[1], mode)
            if not (x_lo <= ax and bx <= x_hi and y_lo <= ay and by <= y_hi):
                raise RuntimeError(f"rotate: taps {ax}..{bx}, {ay}..{by} outside the window")
            out = remap_window(block, maps, (need[0], need[2]), mode, p["border"], p["value"])
            parts.append(out[:, want[2] : want[3]])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def forward(self, pixels: np.ndarray, have: Box, want: Box) -> np.ndarray:
        """This step's output over ``want``, from ``pixels`` covering input box ``have``."""
        need = self.need(want)
        if self._cut == "aligned":
            need, first_row = self._resize_window(want[0], want[1])
        top, left = need[0] - have[0], need[2] - have[2]
        block = pixels[top : top + need[1] - need[0], left : left + need[3] - need[2]]
        if self._cut == "gather":
            self.step.op.check_image(block)
            rows, cols = self._maps
            picked = np.take(block, rows[want[0] : want[1]] - need[0], axis=0)
            picked = np.take(picked, cols[want[2] : want[3]] - need[2], axis=1)
            return picked[:, :, 0] if picked.ndim == 3 and picked.shape[2] == 1 else picked
        if self._cut == "rows":
            return self._rows(block, need, want)
        if self.name == "resize":
            return self._resize(block, first_row, want)
        if self.name == "rotate" and not self.step.is_view:
            return self._rotate(block, need, want)
        if self.step.is_view:
            self.step.op.check_image(block)
            if block.ndim == 3 and block.shape[2] == 1:  # as OpenCV's kernel shapes it
                return self.step.op.func(block, **self._block_params(block))
            return np.ascontiguousarray(self.step.op.view(block, **self._block_params(block)))
        out = self.step.run(block)
        y0, x0 = want[0] - need[0], want[2] - need[2]
        return out[y0 : y0 + want[1] - want[0], x0 : x0 + want[3] - want[2]]

    def _block_params(self, block: np.ndarray) -> dict[str, Any]:
        """A view op's parameters for a block that already is its input box (crop: all of it)."""
        if self.name == "crop":
            return {"x": 0, "y": 0, "width": 0, "height": 0}
        return dict(self.step.params)

    def _resize(self, block: np.ndarray, first_row: int, want: Box) -> np.ndarray:
        self.step.op.check_image(block)
        cv2.ipp.setUseIPP(False)  # as Op.run: the whole image is computed without IPP
        (h, w), (out_h, out_w) = self.shape_in[:2], self.shape_out[:2]
        mode = INTERPOLATIONS[self.step.params["interpolation"]]
        out = cv2.resize(block, None, fx=out_w / w, fy=out_h / h, interpolation=mode)
        top = want[0] - first_row
        return out[top : top + want[1] - want[0], want[2] : want[3]]

    def _rows(self, block: np.ndarray, need: Box, want: Box) -> np.ndarray:
        """Output box ``want`` of a row-by-row resize from ``block``, the input rows ``need``:
        rows before ``RowMap.first`` from a resize of the input's top (``_top_rows``), every
        other row on its own (:func:`single_row_resize`)."""
        self.step.op.check_image(block)
        cv2.ipp.setUseIPP(False)  # as Op.run: the whole image is computed without IPP
        (h, w), out_w = self.shape_in[:2], self.shape_out[1]
        mode, fx, rows = self.step.params["interpolation"], out_w / w, self._row_map
        y0, y1 = want[:2]
        parts = []
        if y0 < rows.first:
            top = self._resize(block[: self._top_rows()], 0, (y0, min(y1, rows.first), 0, out_w))
            parts.append(top)
            y0 = min(y1, rows.first)
        taps = rows.sources(y0, y1, h) - need[0]
        for dy, source in zip(range(y0, y1), taps):
            parts.append(single_row_resize(block[source], rows.phase[dy], fx, mode))
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return out[:, want[2] : want[3]]


@dataclass(frozen=True)
class ChainStage(Stage):
    """Steps fused into one tiled pass over an input of ``shape`` (see the module docstring).

    A tile's ``region`` is a box of this stage's input and its ``core`` a box of its output;
    its *placement*, sent as the task's ``margins``, is the two boxes together.
    """

    steps: tuple[Step, ...]
    shape: tuple[int, ...]

    @cached_property
    def links(self) -> tuple[Link, ...]:
        links, shape = [], canonical_shape(self.shape)
        for step in self.steps:
            out = step.op.output_shape(shape, step.params)
            links.append(Link(step, shape, out))
            shape = out
        return tuple(links)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.links[-1].shape_out

    def source_box(self, core: Box) -> Box:
        """The input box the output box ``core`` depends on."""
        for link in reversed(self.links):
            core = link.need(core)
        return core

    def min_rows(self) -> int:
        """Strips are at least twice the longest resize period, so that the aligned windows
        do not dwarf the strips (no quarter turn follows a resize in a chain, so a period's
        rows stay rows)."""
        rows = 1
        for link in self.links:
            if link._cut == "aligned":
                period = resize_period(link.shape_in[0], link.shape_out[0], "linear")
                assert period is not None
                rows = max(rows, 2 * period[0])
        return rows

    def tiles(self, rows: int) -> list[Tile]:
        """Output strips of ``rows`` rows (0: one tile), each with its exact input region.

        Strips are made taller (doubling) while their input windows together would read more
        than three times the input: halos before a resize, or a resize's aligned windows, can
        otherwise dwarf thin strips."""
        out_h, out_w = self.output_shape[:2]
        rows = out_h if rows <= 0 else max(rows, self.min_rows())
        area = self.shape[0] * self.shape[1]
        while True:
            tiles = []
            for i, y in enumerate(range(0, out_h, rows)):
                core = (y, min(out_h, y + rows), 0, out_w)
                tiles.append(Tile(i, core, self.source_box(core)))
            read = sum((r[1] - r[0]) * (r[3] - r[2]) for r in (t.region for t in tiles))
            if rows >= out_h or read <= 3 * area:
                return tiles
            rows *= 2

    @staticmethod
    def placement(tile: Tile) -> tuple[int, ...]:
        """What a worker needs besides the pixels: the region's and the core's boxes."""
        return (*tile.region, *tile.core)

    def run_tile(self, pixels: np.ndarray, margins: Sequence[int]) -> np.ndarray:
        """The core of one tile from its region's pixels (``margins`` is its placement)."""
        have, core = tuple(margins[:4]), tuple(margins[4:8])
        wants = [core]
        for link in reversed(self.links[1:]):
            wants.append(link.need(wants[-1]))
        wants.reverse()  # wants[i]: the box of step i's output that step i+1 needs
        for link, want in zip(self.links, wants):
            pixels, have = link.forward(pixels, have, want), want
        return np.ascontiguousarray(pixels)

    def process(self, pixels: np.ndarray) -> np.ndarray:
        """The whole image as one tile."""
        (tile,) = self.tiles(0)
        return self.run_tile(pixels, self.placement(tile))

    def to_json(self) -> dict[str, Any]:
        return {
            "stage": "chain",
            "steps": [s.to_json() for s in self.steps],
            "shape": list(self.shape),
        }

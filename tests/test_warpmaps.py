"""warpAffine's source coordinates, reproduced in NumPy, are OpenCV's own, bit for bit.

``cv2.remap`` through :func:`~mpi_imgproc.warpmaps.source_maps` of the whole output equals
``cv2.warpAffine`` for every interpolation, border, depth and channel count, and through the
maps of one strip, shifted to a window of the source, equals that strip of the whole result.
"""

from __future__ import annotations

from fractions import Fraction

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpi_imgproc.ops import rotate_canvas, rotate_matrix
from mpi_imgproc.warpmaps import (
    WARP_BORDERS,
    WARP_INTERPOLATIONS,
    fma32,
    remap_window,
    source_maps,
    tap_range,
    vector_width,
)

finite32 = st.floats(-1e6, 1e6, width=32, allow_nan=False)


@given(finite32, finite32, finite32)
def test_fma32_rounds_the_exact_result_once(a, b, c):
    exact = Fraction(a) * Fraction(b) + Fraction(c)
    got = float(fma32(np.float32(a), np.float32(b), np.float32(c)))
    below, above = sorted((got, float(np.nextafter(np.float32(got), np.float32(exact)))))
    # the nearest float32, ties to even: no float32 is closer to the exact value
    assert abs(Fraction(got) - exact) <= abs(Fraction(below if got == above else above) - exact)


def test_fma32_is_not_two_roundings():
    a, b = np.float32(1 + 2**-12), np.float32(1 + 2**-12)
    c = np.float32(-(1 + 2**-11))
    assert float(fma32(a, b, c)) == 2**-24  # a*b rounded to float32 first would give 0


def test_the_vector_width_is_found_on_this_cpu():
    assert vector_width() in (4, 8, 16, 32, 64)


def _case(rng, mode):
    h, w = int(rng.integers(1, 70)), int(rng.integers(1, 70))
    channels = int(rng.choice([1, 3, 4]))
    dtype = rng.choice([np.uint8, np.uint16])
    shape = (h, w) if channels == 1 else (h, w, channels)
    src = rng.integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)
    angle = float(rng.uniform(-360, 360))
    out = rotate_canvas(h, w, angle)
    return src, out, rotate_matrix(src.shape, out, angle)


def _warp(src, m, out, mode, border, value):
    flags = WARP_INTERPOLATIONS[mode] | cv2.WARP_INVERSE_MAP
    cv2.ipp.setUseIPP(False)
    return cv2.warpAffine(src, m, out[::-1], flags=flags, borderMode=WARP_BORDERS[border],
                          borderValue=(value,) * 4)  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(list(WARP_INTERPOLATIONS)),
       st.sampled_from(list(WARP_BORDERS)))  # fmt: skip
def test_remap_through_the_whole_maps_is_warpaffine(seed, mode, border):
    src, out, m = _case(np.random.default_rng(seed), mode)
    maps = source_maps(m, range(out[0]), out[1], mode, vector_width())
    got = remap_window(src, maps, (0, 0), mode, border, 99)
    assert np.array_equal(got, _warp(src, m, out, mode, border, 99))


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic", "lanczos"])
def test_a_strip_remapped_from_its_window_is_that_strip_of_the_whole(mode):
    """Constant borders for every mode (cubic with a replicated border runs whole)."""
    rng = np.random.default_rng(len(mode))
    for _ in range(40):
        src, out, m = _case(rng, mode)
        want = _warp(src, m, out, mode, "constant", 7)
        rows = int(rng.integers(1, 8))
        for y0 in range(0, out[0], rows):
            y1 = min(out[0], y0 + rows)
            maps = source_maps(m, range(y0, y1), out[1], mode, vector_width())
            (x_lo, x_hi), (y_lo, y_hi) = tap_range(maps[0], mode), tap_range(maps[1], mode)
            top, left = min(max(y_lo, 0), src.shape[0] - 1), min(max(x_lo, 0), src.shape[1] - 1)
            bottom = max(min(y_hi, src.shape[0] - 1), 0) + 1
            right = max(min(x_hi, src.shape[1] - 1), 0) + 1
            top, left = top - top % 2, left - left % 2
            window = src[top:bottom, left:right]
            got = remap_window(window, maps, (top, left), mode, "constant", 7)
            assert np.array_equal(got, want[y0:y1]), (mode, src.shape, y0)

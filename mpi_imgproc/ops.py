"""Pure image operations on NumPy arrays, each with a declared class and validated parameters.

Images are OpenCV-style arrays: ``(H, W)`` gray, ``(H, W, 3)`` BGR or ``(H, W, 4)`` BGRA, of
``uint8`` or (where OpenCV supports the op) ``uint16``.

Every op declares its *class*, which tells the tiler how it may be cut up:

``point``
    each output pixel depends on the same input pixel only: tiles need no halo.
``neighbourhood``
    each output pixel depends on a window of radius ``halo(params)``: tiles need that halo.
    At the true image border OpenCV's own border rule applies, so tiles are cut as they are
    and never padded by hand.
``global``
    a statistic of the whole image is needed.  Ops with a ``reduce``/``apply`` pair
    (Otsu, histogram equalisation) run in two phases: per-tile statistics are summed, then
    applied per tile.  Ops without one (Canny, whose hysteresis connects edges across any
    distance) run on the whole image as one tile.
``geometric``
    output coordinates differ from input ones (resize, crop, rotate, flip); they run on the
    whole image as their own stage.

Point ops are built as lookup tables computed in float64 and rounded once, so every engine and
tile layout produces the same bits.  To add an op, write one function and one ``_register``
call, then one test.  An op whose output shape differs from its input's (geometric ops,
``grayscale``, ``canny``) also registers a ``shape_rule``, so that ``Op.output_shape`` tells the
shape without running it (limits are checked before the memory is spent).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

from .errors import InvalidParameter, UnknownOp, UnsupportedImage
from .warpmaps import WARP_BORDERS, WARP_INTERPOLATIONS

POINT = "point"
NEIGHBOURHOOD = "neighbourhood"
GLOBAL = "global"
GEOMETRIC = "geometric"

U8 = (np.dtype(np.uint8),)
U8_U16 = (np.dtype(np.uint8), np.dtype(np.uint16))


@dataclass(frozen=True)
class Param:
    """One parameter of an op: its type, default, allowed values and meaning."""

    name: str
    type: type
    default: Any
    doc: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    odd: bool = False
    optional: bool = False  # default None means "not given"

    def convert(self, op: str, raw: Any) -> Any:
        """Turn ``raw`` (a string from a spec, or a JSON value) into a checked value."""
        if raw is None and self.optional:
            return None
        value = _coerce(op, self, raw)
        self._check(op, value)
        return value

    def _check(self, op: str, value: Any) -> None:
        where = f"{op}: {self.name}"
        if self.choices is not None and value not in self.choices:
            options = ", ".join(str(c) for c in self.choices)
            raise InvalidParameter(f"{where} must be one of {options}; got {value!r}")
        if self.minimum is not None and value < self.minimum:
            raise InvalidParameter(f"{where} must be >= {self.minimum}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise InvalidParameter(f"{where} must be <= {self.maximum}, got {value}")
        if self.odd and value % 2 == 0:
            raise InvalidParameter(f"{where} must be odd, got {value}")

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description for ``mpi-imgproc ops --json``."""
        out: dict[str, Any] = {
            "name": self.name,
            "type": self.type.__name__,
            "default": self.default,
            "doc": self.doc,
        }
        for key in ("minimum", "maximum", "choices"):
            if getattr(self, key) is not None:
                out[key] = list(self.choices) if key == "choices" else getattr(self, key)
        if self.odd:
            out["odd"] = True
        return out


def _coerce(op: str, param: Param, raw: Any) -> Any:
    where = f"{op}: {param.name}"
    if param.type is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise InvalidParameter(f"{where} must be true or false, got {raw!r}")
    if param.type is int:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise InvalidParameter(f"{where} must be an integer, got {raw!r}")
        try:
            return int(raw) if not isinstance(raw, str) else int(raw.strip())
        except (TypeError, ValueError, OverflowError):  # null, a list, an infinity
            raise InvalidParameter(f"{where} must be an integer, got {raw!r}") from None
    if param.type is float:
        if isinstance(raw, bool):  # JSON true is no number of degrees or strength
            raise InvalidParameter(f"{where} must be a number, got {raw!r}")
        try:
            value = float(raw)
        except (TypeError, ValueError, OverflowError):
            raise InvalidParameter(f"{where} must be a number, got {raw!r}") from None
        if not np.isfinite(value):
            raise InvalidParameter(f"{where} must be finite, got {raw!r}")
        return value
    return str(raw).strip().lower()


@dataclass(frozen=True)
class Op:
    """An operation: what it does to an image, its class, parameters and halo."""

    name: str
    kind: str
    doc: str
    func: Callable[..., np.ndarray]
    params: tuple[Param, ...] = ()
    halo: Callable[[Mapping[str, Any]], int] = field(default=lambda p: 0)
    depths: tuple[np.dtype, ...] = U8_U16
    channels: tuple[int, ...] = (1, 3, 4)
    # True for float kernels whose SIMD body and scalar tail round differently: the result of a
    # pixel then depends on its column within the tile, so tiles must span whole rows.
    full_rows: bool = False
    # Two-phase global ops: reduce(tile) -> statistic (summed over tiles), then
    # table(statistic, **params) -> a lookup table applied to every tile.
    reduce: Callable[[np.ndarray], np.ndarray] | None = None
    table: Callable[..., np.ndarray] | None = None
    # For ops whose output shape differs from their input's: (canonical input shape, bound
    # params) -> output shape.  None: the output has the input's shape.
    shape_rule: Callable[[tuple[int, ...], Mapping[str, Any]], tuple[int, ...]] | None = None
    # For geometric ops that only re-index pixels (crop, flip, quarter turns): (image, bound
    # params) -> the result as a NumPy view, equal to ``func``'s but made without a copy, so a
    # pipeline applies it where the image is and the next stage's tiles read through it.
    view: Callable[..., np.ndarray] | None = None
    # For ops that are a view for some parameters only (rotate: quarter turns): bound params ->
    # whether ``view`` applies.  None: whenever ``view`` is given.
    view_when: Callable[[Mapping[str, Any]], bool] | None = None

    def is_view(self, params: Mapping[str, Any]) -> bool:
        """Whether the op with these bound ``params`` only re-indexes pixels (see ``view``)."""
        return self.view is not None and (self.view_when is None or self.view_when(params))

    @property
    def tileable(self) -> bool:
        """Whether tiles (with a halo) give the same result as the whole image."""
        return self.kind in (POINT, NEIGHBOURHOOD)

    @property
    def two_phase(self) -> bool:
        """Whether the op is a global op with a reduce/apply split."""
        return self.reduce is not None

    def bind(self, raw: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Validate ``raw`` parameters (strings or JSON values) and fill in defaults."""
        raw = dict(raw or {})
        known = {p.name for p in self.params}
        unknown = sorted(set(raw) - known)
        if unknown:
            allowed = ", ".join(sorted(known)) or "none"
            raise InvalidParameter(
                f"{self.name}: unknown parameter {unknown[0]!r} (parameters: {allowed})"
                + did_you_mean(unknown[0], known)
            )
        values = {}
        for p in self.params:
            values[p.name] = p.convert(self.name, raw[p.name]) if p.name in raw else p.default
        _CROSS_CHECKS.get(self.name, lambda p: None)(values)
        return values

    def check_image(self, image: np.ndarray) -> None:
        """Raise UnsupportedImage if this op cannot handle ``image``'s depth or channels."""
        check_image(image)
        if image.dtype not in self.depths:
            depths = " or ".join(f"{d.itemsize * 8}-bit" for d in self.depths)
            raise UnsupportedImage(
                f"{self.name}: needs a {depths} image, got {image.dtype.itemsize * 8}-bit"
            )
        nch = channels(image)
        if nch not in self.channels:
            names = {1: "gray", 3: "BGR", 4: "BGRA"}
            wanted = " or ".join(names[c] for c in self.channels)
            hint = " (add grayscale first)" if self.channels == (1,) else ""
            raise UnsupportedImage(f"{self.name}: needs a {wanted} image, got {names[nch]}{hint}")

    def output_shape(self, shape: tuple[int, ...], params: Mapping[str, Any]) -> tuple[int, ...]:
        """The shape of the op's result for an input of ``shape``, without running it.

        ``shape`` is an image array's shape, ``(H, W)`` or ``(H, W, C)``; ``params`` are bound
        (see ``bind``).  The result is canonical: ``(H', W')`` when the output has one channel,
        ``(H', W', C')`` otherwise.  That is exactly the result array's shape for every input
        except an ``(H, W, 1)`` array, for which some kernels keep the unit axis and others drop
        it (the decoders never produce one).  Raises what ``run`` would raise for parameters
        that do not fit the image (a crop outside it) and UnsupportedImage for a shape that is
        no image; depth and channel support are not checked (``check_image`` does that).
        """
        shape = canonical_shape(shape)
        return shape if self.shape_rule is None else self.shape_rule(shape, params)

    def run(self, image: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
        """Apply the op with already-bound ``params`` to a whole image (or a tile)."""
        self.check_image(image)
        # Intel IPP replaces some OpenCV kernels (bilateral among them) for some image sizes
        # only, and rounds differently, so a tile could differ from the whole image.  The
        # switch is per thread in OpenCV, hence here, on every call (it costs under 1 µs).
        cv2.ipp.setUseIPP(False)
        return self.func(image, **params)

    def describe(self) -> dict[str, Any]:
        """A JSON-ready description: name, class, halo rule, parameters, depths."""
        defaults = {p.name: p.default for p in self.params}
        try:
            halo = self.halo(defaults)
        except (TypeError, KeyError):
            halo = None
        return {
            "name": self.name,
            "class": self.kind,
            "doc": self.doc,
            "halo_at_defaults": halo if self.tileable else None,
            "tiled": self.tileable or self.two_phase,
            "full_rows": self.full_rows,
            "depths": [f"uint{d.itemsize * 8}" for d in self.depths],
            "channels": list(self.channels),
            "params": [p.describe() for p in self.params],
        }


def channels(image: np.ndarray) -> int:
    """Number of channels of an OpenCV-style image (1 for a 2-D array)."""
    return 1 if image.ndim == 2 else image.shape[2]


def canonical_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """``shape`` as ``(H, W)`` for one channel (``(H, W, 1)`` too) or ``(H, W, C)``.

    Raises UnsupportedImage for a shape that is not a gray, BGR or BGRA image, or is empty, with
    ``check_image``'s messages.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3, 4)):
        raise UnsupportedImage(f"image must be gray, BGR or BGRA; got array shape {shape}")
    if shape[0] <= 0 or shape[1] <= 0:
        raise UnsupportedImage(f"image is empty: shape {shape}")
    return shape[:2] if len(shape) == 3 and shape[2] == 1 else shape


def _one_channel(shape: tuple[int, ...], params: Mapping[str, Any]) -> tuple[int, ...]:
    return shape[:2]


def check_image(image: np.ndarray) -> None:
    """Raise UnsupportedImage unless ``image`` is a gray, BGR or BGRA array of 8 or 16 bits."""
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
        raise UnsupportedImage(f"image must be gray, BGR or BGRA; got array shape {image.shape}")
    if image.dtype not in U8_U16:
        raise UnsupportedImage(f"image must be 8-bit or 16-bit; got {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise UnsupportedImage(f"image is empty: shape {image.shape}")


REGISTRY: dict[str, Op] = {}
_CROSS_CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {}


def _register(op: Op) -> Op:
    REGISTRY[op.name] = op
    return op


def get_op(name: str) -> Op:
    """The op called ``name``; UnknownOp lists the known names otherwise."""
    try:
        return REGISTRY[name.strip().lower()]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        hint = did_you_mean(name.strip().lower(), REGISTRY)
        raise UnknownOp(f"unknown op {name!r}; known ops: {known}{hint}") from None


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the known name closest to a misspelt one, else ``""``."""
    close = difflib.get_close_matches(str(name), list(known), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


# --------------------------------------------------------------------------- point ops


def _max_value(image: np.ndarray) -> int:
    return int(np.iinfo(image.dtype).max)


def _apply_lut(image: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Apply a per-value table to colour channels; an alpha channel is kept as it is."""
    if image.dtype == np.uint8:
        out = cv2.LUT(image, table.astype(np.uint8))
    else:
        out = table.astype(image.dtype)[image]
    if channels(image) == 4:
        out[..., 3] = image[..., 3]
    return out


def _values(image: np.ndarray) -> np.ndarray:
    return np.arange(_max_value(image) + 1, dtype=np.float64)


def _round_clip(values: np.ndarray, image: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, _max_value(image))


def grayscale(image: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luminosity, 0.299 R + 0.587 G + 0.114 B (OpenCV's BGR2GRAY)."""
    nch = channels(image)
    if nch == 1:
        return image.reshape(image.shape[:2]).copy()
    code = cv2.COLOR_BGR2GRAY if nch == 3 else cv2.COLOR_BGRA2GRAY
    return cv2.cvtColor(image, code)


def invert(image: np.ndarray) -> np.ndarray:
    """Colour inversion: max - value on every colour channel (alpha kept)."""
    values = _values(image)
    return _apply_lut(image, values[::-1].copy())


def brightness_contrast(image: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """``alpha * value + beta``, rounded to nearest and saturated (alpha is contrast)."""
    return _apply_lut(image, _round_clip(alpha * _values(image) + beta, image))


def gamma(image: np.ndarray, gamma: float) -> np.ndarray:
    """Gamma correction ``max * (value / max) ** (1 / gamma)``: gamma > 1 brightens."""
    top = _max_value(image)
    return _apply_lut(image, _round_clip(top * (_values(image) / top) ** (1.0 / gamma), image))


_THRESHOLD_TYPES = ("binary", "binary_inv", "trunc", "tozero", "tozero_inv")


def _threshold_table(values: np.ndarray, thresh: float, max_value: float, kind: str) -> np.ndarray:
    above = values > thresh
    if kind == "binary":
        return np.where(above, max_value, 0)
    if kind == "binary_inv":
        return np.where(above, 0, max_value)
    if kind == "trunc":
        return np.where(above, np.floor(thresh), values)
    if kind == "tozero":
        return np.where(above, values, 0)
    return np.where(above, 0, values)


def threshold(image: np.ndarray, value: float, max_value: int, type: str) -> np.ndarray:
    """Fixed threshold with OpenCV's semantics: ``binary`` gives max_value where pixel > value."""
    top = _max_value(image)
    if max_value > top:
        raise InvalidParameter(f"threshold: max_value must be <= {top} for this image")
    table = _threshold_table(_values(image), value, max_value, type)
    return _apply_lut(image, _round_clip(table, image))


_register(Op("grayscale", POINT, grayscale.__doc__ or "", grayscale, shape_rule=_one_channel))
_register(Op("invert", POINT, invert.__doc__ or "", invert))
_register(
    Op(
        "brightness_contrast",
        POINT,
        brightness_contrast.__doc__ or "",
        brightness_contrast,
        (
            Param("alpha", float, 1.0, "contrast gain", minimum=0.0, maximum=100.0),
            Param("beta", float, 0.0, "brightness offset", minimum=-65535.0, maximum=65535.0),
        ),
    )
)
_register(
    Op(
        "gamma",
        POINT,
        gamma.__doc__ or "",
        gamma,
        (Param("gamma", float, 2.2, "gamma; > 1 brightens", minimum=0.01, maximum=100.0),),
    )
)
_register(
    Op(
        "threshold",
        POINT,
        threshold.__doc__ or "",
        threshold,
        (
            Param("value", float, 127.0, "threshold", minimum=0.0, maximum=65535.0),
            Param("max_value", int, 255, "value given to pixels above", minimum=0, maximum=65535),
            Param("type", str, "binary", "OpenCV threshold type", choices=_THRESHOLD_TYPES),
        ),
    )
)

# ------------------------------------------------------------------- neighbourhood ops


def gaussian_blur(image: np.ndarray, ksize: int, sigma: float) -> np.ndarray:
    """Gaussian blur with a ksize×ksize kernel (sigma 0 derives it from ksize)."""
    return cv2.GaussianBlur(image, (ksize, ksize), sigma)


def box_blur(image: np.ndarray, ksize: int) -> np.ndarray:
    """Mean of a ksize×ksize window, rounded half up.

    The window sums are exact integers; the division is done once, in integers.  (OpenCV's
    ``blur`` divides some values of a row in float and the row's last few in double, so its
    result depends on the row's width and a tile would differ from the whole image.)
    """
    sums = cv2.boxFilter(image, cv2.CV_32S, (ksize, ksize), normalize=False).astype(np.int64)
    area = ksize * ksize
    return ((2 * sums + area) // (2 * area)).astype(image.dtype).reshape(image.shape)


def median_blur(image: np.ndarray, ksize: int) -> np.ndarray:
    """Median of a ksize×ksize window (16-bit images: ksize 3 or 5 only)."""
    if image.dtype == np.uint16 and ksize > 5:
        raise UnsupportedImage(f"median_blur: 16-bit images need ksize 3 or 5, got {ksize}")
    return cv2.medianBlur(image, ksize)


def bilateral(image: np.ndarray, d: int, sigma_color: float, sigma_space: float) -> np.ndarray:
    """Edge-preserving bilateral filter over a window of diameter d."""
    return cv2.bilateralFilter(image, d, sigma_color, sigma_space)


_LAPLACE4 = np.array([[0, -1, 0], [-1, 4, -1], [0, -1, 0]], dtype=np.float32)


def sharpen(image: np.ndarray, amount: float) -> np.ndarray:
    """Laplacian sharpening: value + amount * (4·value − the four neighbours), saturated."""
    # The integer kernel sums exactly in float32; the fractional amount is applied once, in
    # float64, so SIMD and scalar code paths (and so all tile layouts) round the same way.
    if image.dtype == np.uint8 and float(amount).is_integer():
        # An integer amount makes the formula an integer kernel (1 + 4·amount at the centre,
        # −amount at the four neighbours): every result is an exact integer below 2**16, so
        # OpenCV's 8-bit filter saturates it to the float64 formula's value, with no rounding
        # left to differ.  About ten times faster than the table below.
        kernel = _LAPLACE4 * np.float32(amount)
        kernel[1, 1] += 1
        return cv2.filter2D(image, -1, kernel).reshape(image.shape)
    if image.dtype == np.uint8:  # the same formula, looked up: 2-3x faster
        detail = cv2.filter2D(image, cv2.CV_16S, _LAPLACE4).reshape(image.shape)
        index = detail.astype(np.int32)
        index += _SHARPEN_REACH
        index <<= 8
        index += image
        return _sharpen_table(amount).take(index)
    detail = cv2.filter2D(image, cv2.CV_32F, _LAPLACE4)
    out = image + amount * detail.astype(np.float64).reshape(image.shape)
    return np.clip(np.rint(out), 0, _max_value(image)).astype(image.dtype)


_SHARPEN_REACH = 4 * 255  # |4·value − the four neighbours| of an 8-bit image


@lru_cache(maxsize=64)
def _sharpen_table(amount: float) -> np.ndarray:
    """Every 8-bit result of ``sharpen``'s float64 formula, at ``(detail + 1020) * 256 + value``
    (an integer detail is exact in 16 bits, and the formula's rounding is kept as it is)."""
    value = np.arange(256, dtype=np.float64)[None, :]
    detail = np.arange(-_SHARPEN_REACH, _SHARPEN_REACH + 1, dtype=np.float64)[:, None]
    return np.clip(np.rint(value + amount * detail), 0, 255).astype(np.uint8).ravel()


def _abs_saturate(parts: list[np.ndarray], like: np.ndarray) -> np.ndarray:
    if like.dtype == np.uint8 and all(p.dtype == np.int16 for p in parts):
        # Integers throughout: min(255, |a| + |b|) is the saturated sum of the saturated
        # absolute values, so OpenCV's 8-bit saturating kernels give the float64 formula's
        # result exactly (|-32768| included), several times faster.
        total8 = cv2.convertScaleAbs(parts[0])
        for part in parts[1:]:
            total8 = cv2.add(total8, cv2.convertScaleAbs(part))
        return total8
    total = np.zeros(parts[0].shape, np.float64)
    for part in parts:
        total += np.abs(part.astype(np.float64))  # abs(int16 -32768) would overflow
    return np.clip(np.rint(total), 0, _max_value(like)).astype(like.dtype)


def _gradient_depth(image: np.ndarray) -> int:
    # 16S holds every 8-bit derivative exactly; float32 holds 16-bit ones exactly (< 2**24).
    return cv2.CV_16S if image.dtype == np.uint8 else cv2.CV_32F


def sobel(image: np.ndarray, ksize: int) -> np.ndarray:
    """Sobel edge strength |d/dx| + |d/dy|, saturated to the image's depth."""
    depth = _gradient_depth(image)
    gx = cv2.Sobel(image, depth, 1, 0, ksize=ksize)
    gy = cv2.Sobel(image, depth, 0, 1, ksize=ksize)
    return _abs_saturate([gx, gy], image)


def laplacian(image: np.ndarray, ksize: int) -> np.ndarray:
    """Absolute Laplacian, saturated to the image's depth (ksize 1 is the 3×3 4-neighbour one)."""
    return _abs_saturate([cv2.Laplacian(image, _gradient_depth(image), ksize=ksize)], image)


_SHAPES = {"rect": cv2.MORPH_RECT, "ellipse": cv2.MORPH_ELLIPSE, "cross": cv2.MORPH_CROSS}


def _morph(fn: Callable, image: np.ndarray, ksize: int, iterations: int, shape: str) -> np.ndarray:
    kernel = cv2.getStructuringElement(_SHAPES[shape], (ksize, ksize))
    return fn(image, kernel, iterations=iterations)


def erode(image: np.ndarray, ksize: int, iterations: int, shape: str) -> np.ndarray:
    """Morphological erosion (minimum over the structuring element), repeated."""
    return _morph(cv2.erode, image, ksize, iterations, shape)


def dilate(image: np.ndarray, ksize: int, iterations: int, shape: str) -> np.ndarray:
    """Morphological dilation (maximum over the structuring element), repeated."""
    return _morph(cv2.dilate, image, ksize, iterations, shape)


def _ksize(default: int, maximum: int = 99, odd: bool = True, minimum: int = 1) -> Param:
    return Param("ksize", int, default, "kernel size", minimum=minimum, maximum=maximum, odd=odd)


def _half_ksize(p: Mapping[str, Any]) -> int:
    return p["ksize"] // 2


def _derivative_halo(p: Mapping[str, Any]) -> int:
    return max(1, p["ksize"] // 2)  # ksize 1 still uses a 3-tap kernel


_MORPH_PARAMS = (
    _ksize(3, maximum=51, odd=False),
    Param("iterations", int, 1, "times to repeat", minimum=1, maximum=50),
    Param("shape", str, "rect", "structuring element", choices=tuple(_SHAPES)),
)

_register(
    Op(
        "gaussian_blur",
        NEIGHBOURHOOD,
        gaussian_blur.__doc__ or "",
        gaussian_blur,
        (_ksize(5), Param("sigma", float, 0.0, "standard deviation; 0 = from ksize", 0.0, 100.0)),
        halo=_half_ksize,
    )
)
_register(
    Op(
        "box_blur",
        NEIGHBOURHOOD,
        box_blur.__doc__ or "",
        box_blur,
        (_ksize(5, odd=False),),
        halo=_half_ksize,
    )
)
_register(
    Op(
        "median_blur",
        NEIGHBOURHOOD,
        median_blur.__doc__ or "",
        median_blur,
        (_ksize(5, maximum=255, minimum=3),),
        halo=_half_ksize,
    )
)
_register(
    Op(
        "bilateral",
        NEIGHBOURHOOD,
        bilateral.__doc__ or "",
        bilateral,
        (
            Param("d", int, 9, "window diameter", minimum=1, maximum=31),
            Param("sigma_color", float, 75.0, "range sigma", minimum=0.01, maximum=10000.0),
            Param("sigma_space", float, 75.0, "spatial sigma", minimum=0.01, maximum=10000.0),
        ),
        halo=lambda p: max(1, p["d"] // 2),  # OpenCV uses a radius of at least 1
        depths=U8,
        channels=(1, 3),
        full_rows=True,
    )
)
_register(
    Op(
        "sharpen",
        NEIGHBOURHOOD,
        sharpen.__doc__ or "",
        sharpen,
        (Param("amount", float, 1.0, "strength", minimum=0.0, maximum=20.0),),
        halo=lambda p: 1,
    )
)
_derivative_ksize = Param("ksize", int, 3, "aperture", choices=(1, 3, 5, 7))
_register(
    Op(
        "sobel",
        NEIGHBOURHOOD,
        sobel.__doc__ or "",
        sobel,
        (_derivative_ksize,),
        halo=_derivative_halo,
    )
)
_register(
    Op(
        "laplacian",
        NEIGHBOURHOOD,
        laplacian.__doc__ or "",
        laplacian,
        (_derivative_ksize,),
        halo=_derivative_halo,
    )
)


def _morph_halo(p: Mapping[str, Any]) -> int:
    return (p["ksize"] // 2) * p["iterations"]


_register(Op("erode", NEIGHBOURHOOD, erode.__doc__ or "", erode, _MORPH_PARAMS, _morph_halo))
_register(Op("dilate", NEIGHBOURHOOD, dilate.__doc__ or "", dilate, _MORPH_PARAMS, _morph_halo))

# -------------------------------------------------------------------------- global ops


def histogram(tile: np.ndarray) -> np.ndarray:
    """Pixel counts per value (256 bins): the statistic that Otsu and equalisation reduce."""
    return np.bincount(tile.ravel(), minlength=256).astype(np.int64)


def otsu_level(hist: np.ndarray) -> float:
    """Otsu's threshold from a 256-bin histogram, computed as OpenCV's getThreshVal_Otsu_8u."""
    counts = [int(c) for c in hist]
    scale = 1.0 / sum(counts)
    # Integer sums are exact in float64, so this equals OpenCV's sequential double loop.
    mu = float(sum(i * c for i, c in enumerate(counts))) * scale
    mu1 = q1 = 0.0
    max_sigma = 0.0
    best = 0.0
    eps = float(np.finfo(np.float32).eps)  # OpenCV compares against FLT_EPSILON
    for i in range(256):
        p_i = counts[i] * scale
        mu1 *= q1
        q1 += p_i
        q2 = 1.0 - q1
        if min(q1, q2) < eps or max(q1, q2) > 1.0 - eps:
            continue
        mu1 = (mu1 + i * p_i) / q1
        mu2 = (mu - q1 * mu1) / q2
        sigma = q1 * q2 * (mu1 - mu2) * (mu1 - mu2)
        if sigma > max_sigma:
            max_sigma = sigma
            best = float(i)
    return best


def apply_table(tile: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Phase two of a two-phase global op: the table made from the whole image's statistic."""
    return _apply_lut(tile, table)


def otsu_table(hist: np.ndarray, max_value: int, invert: bool) -> np.ndarray:
    """The threshold table at Otsu's level for a histogram."""
    kind = "binary_inv" if invert else "binary"
    return _threshold_table(np.arange(256.0), otsu_level(hist), max_value, kind)


def otsu_threshold(image: np.ndarray, max_value: int, invert: bool) -> np.ndarray:
    """Binary threshold at Otsu's level, the one that best separates two classes of pixels."""
    return apply_table(image, otsu_table(histogram(image), max_value, invert))


def equalize_lut(hist: np.ndarray) -> np.ndarray:
    """The 256-entry table of OpenCV's equalizeHist for a histogram (float32 scale as in C++)."""
    lut = np.zeros(256, dtype=np.uint8)
    nonzero = np.flatnonzero(hist)
    total = int(hist.sum())
    first = int(nonzero[0]) if nonzero.size else 0
    if nonzero.size == 0 or hist[first] == total:
        lut[:] = first
        return lut
    scale = np.float32(255.0) / np.float32(total - int(hist[first]))
    sums = np.cumsum(hist[first + 1 :]).astype(np.float32)
    lut[first + 1 :] = np.clip(np.rint(sums * scale), 0, 255)
    return lut


def equalize_hist(image: np.ndarray) -> np.ndarray:
    """Histogram equalisation (as OpenCV's equalizeHist): spreads values over the full range."""
    return apply_table(image, equalize_lut(histogram(image)))


def canny(image: np.ndarray, low: float, high: float, aperture: int, l2: bool) -> np.ndarray:
    """Canny edges; hysteresis links edges across any distance, so it runs on the whole image."""
    return cv2.Canny(image, low, high, apertureSize=aperture, L2gradient=l2)


_register(
    Op(
        "otsu_threshold",
        GLOBAL,
        otsu_threshold.__doc__ or "",
        otsu_threshold,
        (
            Param("max_value", int, 255, "value given to pixels above", minimum=0, maximum=255),
            Param("invert", bool, False, "swap foreground and background"),
        ),
        depths=U8,
        channels=(1,),
        reduce=histogram,
        table=otsu_table,
    )
)
_register(
    Op(
        "equalize_hist",
        GLOBAL,
        equalize_hist.__doc__ or "",
        equalize_hist,
        depths=U8,
        channels=(1,),
        reduce=histogram,
        table=equalize_lut,
    )
)
_register(
    Op(
        "canny",
        GLOBAL,
        canny.__doc__ or "",
        canny,
        (
            Param("low", float, 100.0, "lower hysteresis threshold", minimum=0.0, maximum=1e6),
            Param("high", float, 200.0, "upper hysteresis threshold", minimum=0.0, maximum=1e6),
            Param("aperture", int, 3, "Sobel aperture", choices=(3, 5, 7)),
            Param("l2", bool, False, "use the L2 gradient norm"),
        ),
        depths=U8,
        shape_rule=_one_channel,  # a colour image gives one edge map
    )
)


def _check_canny(p: dict[str, Any]) -> None:
    if p["low"] > p["high"]:
        raise InvalidParameter(f"canny: low must be <= high, got low={p['low']} high={p['high']}")


_CROSS_CHECKS["canny"] = _check_canny

# ----------------------------------------------------------------------- geometric ops

INTERPOLATIONS = {
    "nearest": cv2.INTER_NEAREST,
    # OpenCV's bit-exact bilinear: coefficients in double precision, the same on every CPU,
    # and so cut into strips exactly (mpi_imgproc.chain); it differs from INTER_LINEAR by at
    # most 1 on some pixels.
    "linear": cv2.INTER_LINEAR_EXACT,
    "cubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


def resize_shape(height: int, width: int, p: Mapping[str, Any]) -> tuple[int, int]:
    """Output (height, width) of ``resize`` for an input of the given size."""
    if p["scale"] is not None:
        return max(1, round(height * p["scale"])), max(1, round(width * p["scale"]))
    w, h = p["width"], p["height"]
    if w and h:
        return h, w
    if w:
        return max(1, round(height * w / width)), w
    return h, max(1, round(width * h / height))


def resize(
    image: np.ndarray, scale: float | None, width: int, height: int, interpolation: str
) -> np.ndarray:
    """Resize by ``scale`` or to ``width``/``height`` (one of them alone keeps the aspect)."""
    p = {"scale": scale, "width": width, "height": height}
    out_h, out_w = resize_shape(image.shape[0], image.shape[1], p)
    return cv2.resize(image, (out_w, out_h), interpolation=INTERPOLATIONS[interpolation])


def _check_resize(p: dict[str, Any]) -> None:
    if p["scale"] is None and not (p["width"] or p["height"]):
        raise InvalidParameter("resize: give scale, or width and/or height")
    if p["scale"] is not None and (p["width"] or p["height"]):
        raise InvalidParameter("resize: give scale or width/height, not both")


def crop_box(height: int, width: int, p: Mapping[str, Any]) -> tuple[int, int, int, int]:
    """``(x0, y0, x1, y1)`` that ``crop`` cuts from an image of the given size (or why not)."""
    x, y, h, w = p["x"], p["y"], height, width
    if x >= w or y >= h:
        raise InvalidParameter(f"crop: origin ({x}, {y}) lies outside the {w}x{h} image")
    x1 = w if p["width"] == 0 else x + p["width"]
    y1 = h if p["height"] == 0 else y + p["height"]
    if x1 > w or y1 > h:
        raise InvalidParameter(
            f"crop: rectangle {x},{y} {x1 - x}x{y1 - y} extends past the {w}x{h} image"
        )
    return x, y, x1, y1


def crop(image: np.ndarray, x: int, y: int, width: int, height: int) -> np.ndarray:
    """The rectangle at (x, y) of the given size; width/height 0 extend to the image edge."""
    p = {"x": x, "y": y, "width": width, "height": height}
    x0, y0, x1, y1 = crop_box(image.shape[0], image.shape[1], p)
    return image[y0:y1, x0:x1].copy()


def crop_view(image: np.ndarray, x: int, y: int, width: int, height: int) -> np.ndarray:
    """``crop`` as a view."""
    x0, y0, x1, y1 = crop_box(image.shape[0], image.shape[1], locals())
    return image[y0:y1, x0:x1]


def _resize_rule(shape: tuple[int, ...], p: Mapping[str, Any]) -> tuple[int, ...]:
    return (*resize_shape(shape[0], shape[1], p), *shape[2:])


def _crop_rule(shape: tuple[int, ...], p: Mapping[str, Any]) -> tuple[int, ...]:
    x0, y0, x1, y1 = crop_box(shape[0], shape[1], p)
    return (y1 - y0, x1 - x0, *shape[2:])


def _rotate_rule(shape: tuple[int, ...], p: Mapping[str, Any]) -> tuple[int, ...]:
    return (*rotate_canvas(shape[0], shape[1], p["angle"]), *shape[2:])


_ROTATIONS = {90: cv2.ROTATE_90_CLOCKWISE, 180: cv2.ROTATE_180, 270: cv2.ROTATE_90_COUNTERCLOCKWISE}
ROTATE_BORDERS = tuple(WARP_BORDERS)
# Below this, a canvas side computed in floating point that should be a whole number is one:
# cos(90 degrees) is 6e-17, not 0.
_CANVAS_SLACK = 1e-6


WARP_SIDE_LIMIT = 32767  # cv2.remap (and a lanczos warpAffine) take sides below this


def quarter_turn(angle: float) -> int | None:
    """``angle`` as 0, 90, 180 or 270 clockwise degrees when it is a multiple of 90, else None."""
    turn = float(angle) % 360.0
    if turn == 360.0:  # a tiny negative angle: -1e-20 % 360 rounds up to 360
        turn = 0.0
    return int(turn) if turn % 90.0 == 0.0 else None


def rotate_canvas(height: int, width: int, angle: float) -> tuple[int, int]:
    """Output (height, width) of ``rotate``: the smallest canvas that holds the whole image.

    Quarter turns keep the size (90 and 270 swap it).  Other angles: with ``c = |cos a|`` and
    ``s = |sin a|``, width ``ceil(w*c + h*s - 1e-6)`` and height ``ceil(w*s + h*c - 1e-6)``
    (at least 1): the bounding box of the rotated ``w x h`` rectangle of pixel edges, which at
    90 degrees is exactly ``h x w``.
    """
    turn = quarter_turn(angle)
    if turn is not None:
        return (height, width) if turn in (0, 180) else (width, height)
    rad = math.radians(angle)
    c, s = abs(math.cos(rad)), abs(math.sin(rad))
    out_w = math.ceil(width * c + height * s - _CANVAS_SLACK)
    out_h = math.ceil(width * s + height * c - _CANVAS_SLACK)
    return max(1, out_h), max(1, out_w)


def rotate_matrix(shape: tuple[int, ...], out: tuple[int, ...], angle: float) -> np.ndarray:
    """The 2x3 matrix taking an output pixel ``(x', y')`` of ``rotate`` to its source ``(x, y)``.

    The input's centre ``((w-1)/2, (h-1)/2)`` goes to the canvas's centre ``((w'-1)/2,
    (h'-1)/2)``; with ``c = cos a`` and ``s = sin a`` (a clockwise on screen, y pointing down),
    ``x = cx + c*(x'-cx') + s*(y'-cy')`` and ``y = cy - s*(x'-cx') + c*(y'-cy')``, in double
    precision.  At 90 degrees this is the quarter turn ``out[i, j] = in[h-1-j, i]``.
    """
    rad = math.radians(angle)
    c, s = math.cos(rad), math.sin(rad)
    cy, cx = (shape[0] - 1) / 2, (shape[1] - 1) / 2
    oy, ox = (out[0] - 1) / 2, (out[1] - 1) / 2
    return np.array([[c, s, cx - c * ox - s * oy], [-s, c, cy + s * ox - c * oy]])


def rotate(
    image: np.ndarray, angle: float, interpolation: str, border: str, value: int
) -> np.ndarray:
    """Rotate clockwise by ``angle`` degrees about the centre, on a canvas that holds it all.

    Multiples of 90 degrees re-index the pixels (0 is a copy); other angles are OpenCV's
    ``warpAffine`` with ``interpolation``, filling the canvas outside the image by ``border``
    (``constant``: ``value`` on every channel, saturated to the image's range; ``replicate``:
    the nearest edge pixel).
    """
    turn = quarter_turn(angle)
    if turn == 0:
        return image.copy()
    if turn is not None:
        return cv2.rotate(image, _ROTATIONS[turn])
    out_h, out_w = rotate_canvas(image.shape[0], image.shape[1], angle)
    if interpolation == "lanczos" and max(*image.shape[:2], out_h, out_w) >= WARP_SIDE_LIMIT:
        raise UnsupportedImage(
            f"rotate: lanczos takes images and canvases under {WARP_SIDE_LIMIT} pixels a side "
            f"(OpenCV's limit), this one is {image.shape[1]}x{image.shape[0]} onto "
            f"{out_w}x{out_h}; use cubic"
        )
    matrix = rotate_matrix(image.shape, (out_h, out_w), angle)
    flags = WARP_INTERPOLATIONS[interpolation] | cv2.WARP_INVERSE_MAP
    border_mode = WARP_BORDERS[border]
    return cv2.warpAffine(
        image, matrix, (out_w, out_h), flags=flags, borderMode=border_mode, borderValue=(value,) * 4
    )


def rotate_view(
    image: np.ndarray, angle: float, interpolation: str, border: str, value: int
) -> np.ndarray:
    """``rotate`` by a quarter turn as a view (clockwise turns are negative turns for NumPy)."""
    turn = quarter_turn(angle)
    assert turn is not None, "only quarter turns are views"
    return image if turn == 0 else np.rot90(image, k=-turn // 90, axes=(0, 1))


_FLIPS = {"horizontal": 1, "vertical": 0, "both": -1}


def flip(image: np.ndarray, axis: str) -> np.ndarray:
    """Mirror left-right (horizontal), top-bottom (vertical) or both."""
    return cv2.flip(image, _FLIPS[axis])


def flip_view(image: np.ndarray, axis: str) -> np.ndarray:
    """``flip`` as a view."""
    rows = slice(None, None, -1) if axis in ("vertical", "both") else slice(None)
    cols = slice(None, None, -1) if axis in ("horizontal", "both") else slice(None)
    return image[rows, cols]


_register(
    Op(
        "resize",
        GEOMETRIC,
        resize.__doc__ or "",
        resize,
        (
            Param("scale", float, None, "factor", minimum=0.001, maximum=100.0, optional=True),
            Param("width", int, 0, "output width (0 = from height)", minimum=0, maximum=100000),
            Param("height", int, 0, "output height (0 = from width)", minimum=0, maximum=100000),
            Param("interpolation", str, "area", "method", choices=tuple(INTERPOLATIONS)),
        ),
        shape_rule=_resize_rule,
    )
)
_CROSS_CHECKS["resize"] = _check_resize
_register(
    Op(
        "crop",
        GEOMETRIC,
        crop.__doc__ or "",
        crop,
        (
            Param("x", int, 0, "left edge", minimum=0),
            Param("y", int, 0, "top edge", minimum=0),
            Param("width", int, 0, "width (0 = to the right edge)", minimum=0),
            Param("height", int, 0, "height (0 = to the bottom edge)", minimum=0),
        ),
        shape_rule=_crop_rule,
        view=crop_view,
    )
)
_register(
    Op(
        "rotate",
        GEOMETRIC,
        rotate.__doc__ or "",
        rotate,
        (
            Param("angle", float, 90.0, "clockwise degrees", minimum=-360.0, maximum=360.0),
            Param(
                "interpolation",
                str,
                "linear",
                "method for angles that are not multiples of 90",
                choices=tuple(WARP_INTERPOLATIONS),
            ),
            Param("border", str, "constant", "fill outside the image", choices=ROTATE_BORDERS),
            Param("value", int, 0, "fill value for border=constant", minimum=0, maximum=65535),
        ),
        shape_rule=_rotate_rule,
        view=rotate_view,
        view_when=lambda p: quarter_turn(p["angle"]) is not None,
    )
)
_register(
    Op(
        "flip",
        GEOMETRIC,
        flip.__doc__ or "",
        flip,
        (Param("axis", str, "horizontal", "mirror axis", choices=tuple(_FLIPS)),),
        view=flip_view,
    )
)

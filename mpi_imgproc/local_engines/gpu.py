"""GPU engine: runs tiled stages on a CUDA device with CuPy, bit-identical to the CPU engines.

Each tile is uploaded once, every step of the stage runs on the device, the halo is cropped
there and the result comes back once.  A step without a device kernel is run by the CPU op in
between (download, run, upload); stages with no device step at all -- the two phases of Otsu
and histogram equalisation, and whole-image stages such as Canny and the geometric ops -- run
on the CPU exactly as the sequential engine runs them.

The kernels do not approximate OpenCV: they repeat its arithmetic.  Every sum is a sum of
integers small enough to be exact in the float type used (float32 for 8-bit images, where no
intermediate reaches 2**24; float64 for 16-bit ones), so the order in which the device adds
them does not matter, and every rounding step copies the one OpenCV makes.

=====================  ===================================================================
op                     on the GPU engine
=====================  ===================================================================
grayscale              exact: OpenCV's 15-bit fixed-point BT.601 weights
invert                 exact: the CPU op's own lookup table, indexed on the device
brightness_contrast    exact: lookup table, as invert
gamma                  exact: lookup table, as invert
threshold              exact: lookup table, as invert
gaussian_blur          exact: OpenCV's fixed-point kernel (8 fraction bits for 8-bit images,
                       16 for 16-bit) and its round-half-up
box_blur               exact: integer window sums, one integer division rounding half up
median_blur            exact for ksize <= 15; CPU fallback above (OpenCV's histogram median
                       beats a per-pixel sort there)
bilateral              CPU fallback
sharpen                exact
sobel                  exact; CPU fallback for 16-bit images with ksize 7 (float32 rounding)
laplacian              exact; CPU fallback for 16-bit images with ksize 7 (float32 rounding)
erode                  exact, every shape: out-of-image pixels never win, as in OpenCV
dilate                 exact, every shape, as erode
otsu_threshold         CPU fallback (two-phase global op)
equalize_hist          CPU fallback (two-phase global op)
canny                  CPU fallback (whole-image stage)
resize                 CPU fallback (geometric, whole-image stage)
crop                   CPU fallback (geometric, whole-image stage)
rotate                 CPU fallback (a view, in a chain, or a whole-image stage)
flip                   CPU fallback (geometric, whole-image stage)
=====================  ===================================================================

"Exact" is by construction, and has been checked with NumPy and SciPy standing in for CuPy
and cupyx (``tests/test_gpu_engine.py``); it has not yet been measured on a GPU, where the same
tests compare the device with the sequential engine.  Images shaped ``(H, W, 1)`` run on the
CPU, so that their output shape follows OpenCV's.  CuPy is imported when the first engine is
made, never when this module is imported, so the package works without it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

from ..errors import EngineUnavailable
from ..ops import get_op
from ..pipeline import Stage, Step, TiledStage
from ..tiling import Box, crop_halo
from .base import Engine, process_tile

DeviceArray = Any  # a cupy.ndarray; typed loosely so that this module imports without CuPy

cp: Any = None  # the cupy module, bound by _load_cupy() when the first engine is made
ndi: Any = None  # cupyx.scipy.ndimage, bound with it

INSTALL_HINT = 'install it with: pip install -e ".[gpu]" (CuPy for CUDA 12, cupy-cuda12x)'

# The largest median window run on the device; a per-pixel sort of ksize**2 values loses to
# OpenCV's constant-time histogram median beyond it (a judgement, not yet measured).
MEDIAN_MAX_KSIZE = 15


def _load_cupy() -> None:
    """Import CuPy and cupyx, and check that a CUDA device is there; EngineUnavailable if not."""
    global cp, ndi
    try:
        import cupy
        import cupyx.scipy.ndimage as cupyx_ndimage
    except ImportError as exc:
        raise EngineUnavailable(
            f"engine 'gpu' needs CuPy, which cannot be imported ({exc}); {INSTALL_HINT}, "
            "or choose another engine (sequential, threads, processes)"
        ) from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - CUDARuntimeError when no driver is present
        raise EngineUnavailable(
            f"engine 'gpu': CuPy is installed but cannot reach a CUDA device ({exc}); check the "
            "NVIDIA driver and that the CuPy wheel matches its CUDA version"
        ) from None
    if count == 0:
        raise EngineUnavailable("engine 'gpu': CuPy is installed but sees no CUDA device")
    cp, ndi = cupy, cupyx_ndimage


def _device_name() -> str:
    """The current CUDA device's name and number, e.g. ``NVIDIA H100 80GB HBM3 (device 0)``."""
    device = cp.cuda.Device()
    name = cp.cuda.runtime.getDeviceProperties(device.id)["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    return f"{name} (device {device.id})"


# ------------------------------------------------------------------------- host <-> device


def _to_device(image: np.ndarray | DeviceArray) -> DeviceArray:
    """Upload a host array (tile regions are strided views, so make it contiguous first)."""
    return cp.asarray(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image


def _to_host(image: np.ndarray | DeviceArray) -> np.ndarray:
    """Download a device array; host arrays pass through."""
    if isinstance(image, np.ndarray):
        return image
    return cp.asnumpy(cp.ascontiguousarray(image))


# ------------------------------------------------------------------------- kernel helpers


def _top(image: DeviceArray) -> int:
    return int(np.iinfo(image.dtype).max)


def _exact_float(image: DeviceArray) -> Any:
    """The float type that holds every filter sum of ``image`` exactly (see the docstring)."""
    return cp.float32 if image.dtype == np.uint8 else cp.float64


def _window(image: DeviceArray, ksize: int) -> tuple[int, ...]:
    """A ksize x ksize window that never mixes channels."""
    return (ksize, ksize) if image.ndim == 2 else (ksize, ksize, 1)


def _separable(image: DeviceArray, kx: Sequence[float], ky: Sequence[float]) -> DeviceArray:
    """Correlate rows with ``kx``, then columns with ``ky``; borders as OpenCV's REFLECT_101."""
    work = image.astype(_exact_float(image))
    work = ndi.correlate1d(work, cp.asarray(kx, dtype=work.dtype), axis=1, mode="mirror")
    return ndi.correlate1d(work, cp.asarray(ky, dtype=work.dtype), axis=0, mode="mirror")


def _correlate(image: DeviceArray, kernel: np.ndarray) -> DeviceArray:
    """Correlate each channel with a 2-D kernel, REFLECT_101 borders, in an exact float type."""
    work = image.astype(_exact_float(image))
    weights = kernel if image.ndim == 2 else kernel[..., None]
    return ndi.correlate(work, cp.asarray(weights, dtype=work.dtype), mode="mirror")


def _round_saturate(values: DeviceArray, like: DeviceArray) -> DeviceArray:
    """Round half to even and saturate to ``like``'s depth, as OpenCV's saturate_cast does."""
    return cp.clip(cp.rint(values), 0, _top(like)).astype(like.dtype)


def _deriv_kernels(dx: int, dy: int, ksize: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's separable Sobel kernels (integers) for the given derivative orders."""
    kx, ky = cv2.getDerivKernels(dx, dy, ksize)
    return kx.ravel().astype(np.float64), ky.ravel().astype(np.float64)


# ------------------------------------------------------------------------------ point ops


@lru_cache(maxsize=64)
def _point_table(name: str, params: tuple[tuple[str, Any], ...], dtype: str) -> np.ndarray:
    """The CPU op applied to a ramp of every value: its own lookup table, bit for bit."""
    ramp = np.arange(np.iinfo(dtype).max + 1, dtype=dtype).reshape(1, -1)
    return get_op(name).run(ramp, dict(params)).ravel()


def _lookup_kernel(name: str) -> Callable[..., DeviceArray]:
    """A device kernel for a per-value op: index its table, keep any alpha channel."""

    def lookup(image: DeviceArray, **params: Any) -> DeviceArray:
        table = cp.asarray(_point_table(name, tuple(params.items()), image.dtype.str))
        out = table[image]
        if image.ndim == 3 and image.shape[2] == 4:
            out[..., 3] = image[..., 3]
        return out

    return lookup


def _grayscale(image: DeviceArray) -> DeviceArray:
    """BGR(A) to gray with the integer weights OpenCV's cvtColor uses (shift 15)."""
    if image.ndim == 2:
        return image.copy()
    b, g, r = (image[..., i].astype(cp.int64) for i in range(3))
    return ((b * 3735 + g * 19235 + r * 9798 + (1 << 14)) >> 15).astype(image.dtype)


# ----------------------------------------------------------------------- neighbourhood ops


def _fixed_gaussian_kernel(ksize: int, sigma: float, bits: int) -> np.ndarray:
    """OpenCV's fixed-point Gaussian: its exact kernel scaled by 2**bits, error-diffused.

    The integers sum to exactly ``2**bits``; the centre tap takes what the others leave.
    """
    exact = cv2.getGaussianKernel(ksize, sigma, cv2.CV_64F).ravel()
    taps = np.zeros(ksize, dtype=np.int64)
    error = 0.0
    for i in range(ksize // 2):
        scaled = float(exact[i]) * (1 << bits) + error
        taps[i] = taps[ksize - 1 - i] = round(scaled)  # half to even, as cvRound
        error = scaled - int(taps[i])
    taps[ksize // 2] = (1 << bits) - 2 * int(taps[: ksize // 2].sum())
    return taps.astype(np.float64)


def _gaussian_blur(image: DeviceArray, ksize: int, sigma: float) -> DeviceArray:
    """OpenCV's bit-exact GaussianBlur: integer taps, exact sums, one round-half-up shift."""
    bits = 8 if image.dtype == np.uint8 else 16
    taps = _fixed_gaussian_kernel(ksize, sigma, bits)
    sums = _separable(image, taps, taps).astype(cp.int64)
    return ((sums + (1 << (2 * bits - 1))) >> (2 * bits)).astype(image.dtype)


def _box_blur(image: DeviceArray, ksize: int) -> DeviceArray:
    """Mean of a ksize x ksize window: exact integer sums, one division rounding half up."""
    ones = np.ones(ksize)  # exact sums; uniform_filter would divide, and round, too early
    sums = _separable(image, ones, ones).astype(cp.int64)
    area = ksize * ksize
    return ((2 * sums + area) // (2 * area)).astype(image.dtype)


def _median_blur(image: DeviceArray, ksize: int) -> DeviceArray:
    """Median of a ksize x ksize window; OpenCV's medianBlur replicates the border."""
    return ndi.median_filter(image, size=_window(image, ksize), mode="nearest")


_LAPLACE4 = np.array([[0, -1, 0], [-1, 4, -1], [0, -1, 0]], dtype=np.float64)
_LAPLACE_3X3 = {
    1: np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float64),
    3: np.array([[2, 0, 2], [0, -8, 0], [2, 0, 2]], dtype=np.float64),
}


def _sharpen(image: DeviceArray, amount: float) -> DeviceArray:
    """value + amount * (4 value - four neighbours), in float64 as the CPU op computes it."""
    detail = _correlate(image, _LAPLACE4).astype(cp.float64)
    return _round_saturate(image + amount * detail, image)


def _sobel(image: DeviceArray, ksize: int) -> DeviceArray:
    """|d/dx| + |d/dy| with OpenCV's Sobel kernels, saturated to the image's depth."""
    gx = _separable(image, *_deriv_kernels(1, 0, ksize))
    gy = _separable(image, *_deriv_kernels(0, 1, ksize))
    return _round_saturate(cp.abs(gx) + cp.abs(gy), image)


def _laplacian(image: DeviceArray, ksize: int) -> DeviceArray:
    """|Laplacian| as OpenCV computes it: a 3x3 kernel for ksize 1 and 3, else d2x + d2y."""
    if ksize in _LAPLACE_3X3:
        total = _correlate(image, _LAPLACE_3X3[ksize])
    else:
        total = _separable(image, *_deriv_kernels(2, 0, ksize))
        total = total + _separable(image, *_deriv_kernels(0, 2, ksize))
    return _round_saturate(cp.abs(total), image)


_SHAPES = {"ellipse": cv2.MORPH_ELLIPSE, "cross": cv2.MORPH_CROSS}


def _morph(
    filter_fn: Callable[..., DeviceArray],
    image: DeviceArray,
    ksize: int,
    iterations: int,
    shape: str,
    border: int,
) -> DeviceArray:
    """Repeat a min or max filter; ``border`` pads with a value that never wins, as OpenCV does."""
    if shape == "rect":
        window: dict[str, Any] = {"size": _window(image, ksize)}
    else:
        element = cv2.getStructuringElement(_SHAPES[shape], (ksize, ksize)).astype(bool)
        element = element if image.ndim == 2 else element[..., None]
        window = {"footprint": cp.asarray(element)}
    for _ in range(iterations):
        image = filter_fn(image, mode="constant", cval=border, **window)
    return image


def _erode(image: DeviceArray, ksize: int, iterations: int, shape: str) -> DeviceArray:
    """Minimum over the structuring element, repeated; pixels outside the image are ignored."""
    return _morph(ndi.minimum_filter, image, ksize, iterations, shape, _top(image))


def _dilate(image: DeviceArray, ksize: int, iterations: int, shape: str) -> DeviceArray:
    """Maximum over the structuring element, repeated; pixels outside the image are ignored."""
    return _morph(ndi.maximum_filter, image, ksize, iterations, shape, 0)


# ------------------------------------------------------------------------ kernel registry


def _always(dtype: np.dtype, params: Mapping[str, Any]) -> bool:
    return True


@dataclass(frozen=True)
class DeviceKernel:
    """A device implementation of an op, and which of its cases it covers exactly.

    Cases it does not cover run on the CPU, so they also raise the CPU op's errors.
    """

    run: Callable[..., DeviceArray]
    covers: Callable[[np.dtype, Mapping[str, Any]], bool] = _always


def _median_covered(dtype: np.dtype, params: Mapping[str, Any]) -> bool:
    # OpenCV refuses 16-bit medians above ksize 5: leave those to the CPU op, which says so.
    limit = MEDIAN_MAX_KSIZE if dtype == np.uint8 else 5
    return params["ksize"] <= limit


def _sobel_covered(dtype: np.dtype, params: Mapping[str, Any]) -> bool:
    # ksize 7: OpenCV's 16-bit sums exceed float32's exact range, so they round there.
    return dtype == np.uint8 or params["ksize"] < 7


def _laplacian_covered(dtype: np.dtype, params: Mapping[str, Any]) -> bool:
    return dtype == np.uint8 or params["ksize"] < 7


DEVICE_KERNELS: dict[str, DeviceKernel] = {
    "grayscale": DeviceKernel(_grayscale),
    "invert": DeviceKernel(_lookup_kernel("invert")),
    "brightness_contrast": DeviceKernel(_lookup_kernel("brightness_contrast")),
    "gamma": DeviceKernel(_lookup_kernel("gamma")),
    "threshold": DeviceKernel(_lookup_kernel("threshold")),
    "gaussian_blur": DeviceKernel(_gaussian_blur),
    "box_blur": DeviceKernel(_box_blur),
    "median_blur": DeviceKernel(_median_blur, _median_covered),
    "sharpen": DeviceKernel(_sharpen),
    "sobel": DeviceKernel(_sobel, _sobel_covered),
    "laplacian": DeviceKernel(_laplacian, _laplacian_covered),
    "erode": DeviceKernel(_erode),
    "dilate": DeviceKernel(_dilate),
}


def device_kernel(step: Step, dtype: np.dtype) -> DeviceKernel | None:
    """The device kernel that runs ``step`` exactly on images of ``dtype``, or None (CPU)."""
    kernel = DEVICE_KERNELS.get(step.op.name)
    return kernel if kernel is not None and kernel.covers(dtype, step.params) else None


def _on_device(stage: TiledStage, pixels: np.ndarray) -> bool:
    """Whether any step of ``stage`` has a device kernel for ``pixels`` (else all run on CPU)."""
    if stage.whole:
        return False  # Canny and geometric ops: nothing to run on the device
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        return False  # OpenCV's own ops decide whether (H, W, 1) comes back 2-D
    return any(device_kernel(s, pixels.dtype) for s in stage.steps)


# -------------------------------------------------------------------------------- engine


class GpuEngine(Engine):
    """Runs tiled stages on one CUDA device through CuPy; tiles are processed one after another.

    ``workers`` is accepted for the common interface; the device supplies the parallelism, so
    the engine reports one worker.  It uses CuPy's current device: give each MPI rank its own
    GPU with ``CUDA_VISIBLE_DEVICES``.
    """

    name = "gpu"

    def __init__(self, workers: int | None = None):
        _load_cupy()  # first, so that a missing CuPy changes nothing
        super().__init__(1)
        self.device = _device_name()

    def process(self, stage: Stage, pixels: np.ndarray, margins: Box) -> np.ndarray:
        """One tile: on the device if any step of the stage has a kernel there."""
        if isinstance(stage, TiledStage) and _on_device(stage, pixels):
            return self._run_steps(stage.steps, pixels, margins)
        return process_tile(stage, pixels, margins)

    def _run_steps(self, steps: Sequence[Step], pixels: np.ndarray, margins: Box) -> np.ndarray:
        """Upload once, run every step (on the device where it can), crop, download once."""
        image: np.ndarray | DeviceArray = pixels
        for step in steps:
            image = self._run_step(step, image)
        return _to_host(crop_halo(image, margins))

    @staticmethod
    def _run_step(step: Step, image: np.ndarray | DeviceArray) -> np.ndarray | DeviceArray:
        """One step on the device if it has a kernel there, else by the CPU op on the host."""
        kernel = device_kernel(step, image.dtype)
        if kernel is None:
            return step.run(_to_host(image))
        image = _to_device(image)
        step.op.check_image(image)
        return kernel.run(image, **step.params)

    def close(self) -> None:
        """Give cached device memory back to the driver."""
        if cp is not None:
            cp.get_default_memory_pool().free_all_blocks()

    def describe(self) -> dict[str, object]:
        """Name, worker count and the CUDA device's name."""
        return {**super().describe(), "device": self.device}

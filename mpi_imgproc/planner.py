"""Where each image goes: to one worker whole, or cut into tiles — and why.

Cutting an image pays only when its compute time is large against the cost of moving its
pixels through rank 0 and the fixed cost of each task.  The model is deliberately simple:

* compute ≈ pixels × channels × Σ (per-op cost in ns per pixel-channel), measured roughly for
  OpenCV on one core;
* transfer ≈ pixels × channels × bytes per value × 2 (out and back) × 0.5 ns.

``auto`` tiles an image when its compute estimate is at least ``cutover_s`` and, for an encoded
image (which would have to be decoded on rank 0 and its raw pixels moved), four times its
transfer estimate; everything else goes whole (one task: the worker decodes, runs the whole
pipeline, encodes).  Raw pixels travel either way, so for them only the cut-over counts.

A raw-pixel image whose compute estimate is below both its transfer estimate and ``inline_s``
runs *inline* on rank 0, where its pixels already are: moving them to a worker and back would
cost more than the work (this is what keeps a small grayscale job's round trip short).

The strip height of a tiled image comes from the tile model of ``mpi-imgproc bench
--recommend`` (:func:`mpi_imgproc.metrics.recommend_tile`): per-task and per-byte costs on
rank 0 against the workers' compute.  ``--tile N`` forces tiles of N, ``--tile 0`` forces whole
images.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from .datapaths import read_beneath, use_beneath
from .imageio import decode, probe, read_bytes
from .metrics import TiledWork, recommend_tile
from .pipeline import Pipeline

# Each tile costs rank 0 a task record and a message, whatever its size: ``tile: 1`` on a
# 2000x2000 image would be four million of them.  Tiles are therefore at least as large as the
# pipeline's halo and at most this many per image (the result is the same for any tile size).
MAX_TILES_PER_IMAGE = 4096
DEFAULT_CUTOVER_S = 0.03
DEFAULT_INLINE_S = 0.01
TRANSFER_NS_PER_BYTE = 0.5


def op_cost_ns(name: str, params: Mapping[str, Any]) -> float:
    """Rough single-core cost of one op, in nanoseconds per pixel and channel.

    Measured with ``mpi-imgproc bench`` on one core of the development machine (see
    docs/benchmarks.md); only the ratio to the transfer cost and the cut-over matter.
    """
    k = params.get("ksize", 3) or 3
    if name == "gaussian_blur":
        return 0.11 * k
    if name == "median_blur":
        return 5.0 * k
    if name == "bilateral":
        return 0.22 * max(3, params["d"]) ** 2
    if name in ("erode", "dilate"):
        return 0.1 * k * params["iterations"]
    if name in ("sobel", "laplacian", "sharpen"):
        return 15.0  # OpenCV derivatives, then abs, sum and round in float64
    if name == "box_blur":
        return 6.0
    if name == "canny":
        return 4.0
    if name in ("resize", "otsu_threshold", "equalize_hist"):
        return 1.0
    return 0.3  # point ops, crop, rotate, flip


@dataclass
class ImageSource:
    """Where an image comes from: raw pixels, encoded file bytes, or a file."""

    name: str
    pixels: np.ndarray | None = None
    data: bytes | memoryview | None = None
    path: str | None = None
    root: str | None = None  # a by-reference file: opened only inside this folder
    probed: tuple[Any, ...] | None = field(default=None, repr=False)  # (probe(),) once known

    def encoded(self) -> bytes | memoryview:
        """The encoded file bytes (read from the file if need be; under ``root``, through an
        open checked to be inside it, see :mod:`mpi_imgproc.datapaths`)."""
        if self.data is not None:
            return self.data
        assert self.path is not None
        return read_beneath(self.root, self.path) if self.root else read_bytes(self.path)

    def decode(self) -> np.ndarray:
        """The pixels (decoded if need be)."""
        return self.pixels if self.pixels is not None else decode(self.encoded())

    def probe(self) -> tuple[int, int, int, int] | None:
        """(height, width, channels, bytes per value) without decoding; None if unknown.

        Read once: the pixel-limit check and the planner both ask, and a file's header is
        opened only the first time."""
        if self.pixels is not None:
            p = self.pixels
            return p.shape[0], p.shape[1], 1 if p.ndim == 2 else p.shape[2], p.dtype.itemsize
        if self.probed is None:
            self.probed = (use_beneath(self.root, self.path, probe) if self.data is None
                           else probe(self.data),)  # fmt: skip
        return self.probed[0]


@dataclass(frozen=True)
class Plan:
    """How one image is processed: ``whole`` or ``tiled`` (tile size, strips), and why."""

    path: str
    tile: int = 0
    strips: bool = False
    reason: str = ""


def estimate(pipeline: Pipeline, shape: tuple[int, int, int, int]) -> tuple[float, float]:
    """(compute seconds, transfer seconds) for an image of ``shape`` (h, w, channels, bytes)."""
    height, width, channels, nbytes = shape
    values = height * width * channels
    cost = sum(op_cost_ns(s.op.name, s.params) for s in pipeline.steps)
    return values * cost * 1e-9, values * nbytes * 2 * TRANSFER_NS_PER_BYTE * 1e-9


def plan_image(
    pipeline: Pipeline,
    source: ImageSource,
    tile: int | str,
    workers: int,
    cutover_s: float = DEFAULT_CUTOVER_S,
    inline_s: float = 0.0,
) -> Plan:
    """Decide whole, tiled or inline for one image (see the module docstring)."""
    if tile == 0:
        return Plan("whole", reason="--tile 0")
    shape = source.probe()
    if tile != "auto":
        return Plan("tiled", int(tile), reason=f"--tile {tile}")
    if shape is None:
        return Plan("whole", reason="size unknown before decoding")
    compute, transfer = estimate(pipeline, shape)
    megapixels = shape[0] * shape[1] / 1e6
    why = f"{megapixels:.2f} MP, est. compute {compute * 1e3:.1f} ms"
    if source.pixels is not None and compute < min(transfer, inline_s):
        return Plan(
            "inline",
            reason=f"{why}, less than moving its raw pixels to a worker "
            f"({transfer * 1e3:.1f} ms): run on rank 0",
        )
    if workers < 2:
        return Plan("whole", reason=f"{why}; one worker")
    if compute < cutover_s:
        return Plan("whole", reason=f"{why}, below the cut-over of {cutover_s * 1e3:g} ms")
    if source.pixels is None and compute < 4 * transfer:  # tiles would need decoding here
        return Plan("whole", reason=f"{why}, under 4x the transfer ({transfer * 1e3:.1f} ms)")
    cost = sum(op_cost_ns(s.op.name, s.params) for s in pipeline.steps)
    work = TiledWork(shape[0], shape[1], cost, shape[2], shape[3], pipeline.halo, full_rows=True)
    choice = recommend_tile(work, workers, workers)
    if choice.tile == 0:
        return Plan("whole", reason=f"{why}; the tile model predicts one task is fastest")
    return Plan(
        "tiled",
        choice.tile,
        strips=True,
        reason=f"{why}: strips of {choice.tile} rows, predicted {choice.predicted_s * 1e3:.0f} ms "
        f"against {choice.whole_s * 1e3:.0f} ms whole",
    )


def bound_tiles(plan: Plan, height: int, width: int, halo: int) -> Plan:
    """``plan`` with its tile size raised, if need be, to at least ``halo`` and to at most
    :data:`MAX_TILES_PER_IMAGE` tiles for an image of ``height`` x ``width``; the reason says so.
    """
    if plan.path != "tiled":
        return plan
    size = max(plan.tile, halo, 1)
    size = max(size, math.isqrt(height * width // MAX_TILES_PER_IMAGE))
    while math.ceil(height / size) * math.ceil(width / size) > MAX_TILES_PER_IMAGE:
        size += max(1, size // 16)
    if size == plan.tile:
        return plan
    why = f"tile raised to {size} (at least the halo of {halo}, at most "
    return replace(plan, tile=size, reason=f"{plan.reason}; {why}{MAX_TILES_PER_IMAGE} tiles)")

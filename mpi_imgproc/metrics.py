"""The arithmetic of benchmarks: medians, speedup, efficiency, scaling laws and a tile model.

Pure functions on numbers, with no I/O and no imports beyond NumPy, so that the tests can check
them on synthetic data and the scheduler can use the tile model without pulling in the bench.

Scaling laws, with ``s`` the serial fraction and ``N`` the cores used:

* Amdahl (fixed work): ``S(N) = 1 / (s + (1 - s) / N)``; the speedup can never pass ``1 / s``.
* Gustafson (work grows with ``N``): scaled speedup ``S(N) = N - s (N - 1)``.
* Karp–Flatt: the serial fraction one measured point implies.  If it grows with ``N``, the cost
  is overhead that grows with the machine (communication), not a fixed serial part.

The tile model predicts the wall time of one tiled image on the cluster from the op's cost per
value and two rank-0 constants (a fixed cost per task, a cost per byte moved), because rank 0
sends every tile and merges every result on its own: see :func:`predict_tile_time`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def median(values: Sequence[float]) -> float:
    """The median of a non-empty sequence (robust to one slow sample on a noisy machine)."""
    if not values:
        raise ValueError("median of no samples")
    return float(statistics.median(values))


def speedup(reference_s: float, measured_s: float) -> float:
    """How many times faster than the reference: ``reference_s / measured_s``."""
    if reference_s <= 0 or measured_s <= 0:
        raise ValueError(f"times must be positive, got {reference_s} and {measured_s}")
    return reference_s / measured_s


def efficiency(speedup_value: float, cores: int) -> float:
    """Speedup per core used: 1.0 is perfect scaling."""
    if cores < 1:
        raise ValueError(f"cores must be at least 1, got {cores}")
    return speedup_value / cores


def throughput(megapixels: float, seconds: float) -> float:
    """Megapixels per second."""
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    return megapixels / seconds


def cores_used(engine_workers: int, available: int) -> int:
    """Cores a run can really use: its engine workers, but never more than the machine has."""
    return max(1, min(engine_workers, available))


# -- Amdahl and Gustafson ---------------------------------------------------------------------


def amdahl_speedup(serial_fraction: float, cores: float) -> float:
    """Amdahl's law: the speedup of fixed work on ``cores`` cores."""
    return 1.0 / (serial_fraction + (1.0 - serial_fraction) / cores)


def gustafson_speedup(serial_fraction: float, cores: float) -> float:
    """Gustafson's law: the scaled speedup when the work grows with ``cores``."""
    return cores - serial_fraction * (cores - 1.0)


def karp_flatt(speedup_value: float, cores: float) -> float:
    """The serial fraction that one measured speedup on ``cores`` cores implies (NaN at 1 core)."""
    if cores <= 1:
        return math.nan
    return (1.0 / speedup_value - 1.0 / cores) / (1.0 - 1.0 / cores)


@dataclass(frozen=True)
class ScalingFit:
    """A fitted serial fraction, how well it fits, and from how many informative points."""

    law: str
    serial_fraction: float
    rmse: float  # of the speedups the fit predicts against the measured ones
    points: int

    def predict(self, cores: float) -> float:
        """The speedup the fitted law predicts on ``cores`` cores."""
        law = amdahl_speedup if self.law == "amdahl" else gustafson_speedup
        return law(self.serial_fraction, cores)

    @property
    def limit(self) -> float:
        """Amdahl's ceiling ``1 / s`` on the speedup of this work (inf for s <= 0)."""
        return 1.0 / self.serial_fraction if self.serial_fraction > 0 else math.inf


def _least_squares_slope(x: np.ndarray, y: np.ndarray) -> float:
    """The ``a`` minimising ``sum((y - a x)**2)``: a line through the origin."""
    return float(np.dot(x, y) / np.dot(x, x))


def _fit(law: str, cores: Sequence[float], speedups: Sequence[float]) -> ScalingFit:
    n, s = np.asarray(cores, float), np.asarray(speedups, float)
    if n.shape != s.shape or np.any(n < 1) or np.any(s <= 0):
        raise ValueError("need matching cores >= 1 and positive speedups")
    keep = n > 1  # one core says nothing about the serial fraction under either law
    if not np.any(keep):
        raise ValueError(f"{law} fit needs at least one point on more than one core")
    n, s = n[keep], s[keep]
    if law == "amdahl":  # 1/S - 1/N = f (1 - 1/N): linear in f
        fraction = _least_squares_slope(1 - 1 / n, 1 / s - 1 / n)
    else:  # N - S = f (N - 1)
        fraction = _least_squares_slope(n - 1, n - s)
    fit = ScalingFit(law, fraction, 0.0, int(n.size))
    residuals = s - np.array([fit.predict(c) for c in n])
    return ScalingFit(law, fraction, float(np.sqrt(np.mean(residuals**2))), int(n.size))


def amdahl_fit(cores: Sequence[float], speedups: Sequence[float]) -> ScalingFit:
    """Fit Amdahl's serial fraction to strong-scaling speedups (fixed work).

    Least squares on the linear form ``1/S - 1/N = f (1 - 1/N)``, which is exact for data that
    follow the law.  A fraction above 1 means the runs were slower than the reference (overhead
    beyond any serial part); below 0, superlinear (for example, tiles that fit in cache).
    """
    return _fit("amdahl", cores, speedups)


def gustafson_fit(cores: Sequence[float], scaled_speedups: Sequence[float]) -> ScalingFit:
    """Fit Gustafson's serial fraction to weak-scaling (scaled) speedups."""
    return _fit("gustafson", cores, scaled_speedups)


# -- the tile model ---------------------------------------------------------------------------

TILE_CANDIDATES = (0, 64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class TiledWork:
    """One image and the pipeline's cost, as the tile model sees them."""

    height: int
    width: int
    cost_ns: float  # single-core compute per value (pixel × channel), in nanoseconds
    channels: int = 3
    bytes_per_value: int = 1
    halo: int = 0
    full_rows: bool = False  # the stage cuts full-width strips of ``tile`` rows

    @property
    def values(self) -> int:
        return self.height * self.width * self.channels


@dataclass(frozen=True)
class TileModel:
    """Rank 0's costs: a fixed cost per task and a cost per byte it sends or receives.

    The defaults sit between the fits of ``mpi-imgproc bench --recommend`` on a 2-core virtual
    machine (MPICH, shared memory, 2 worker ranks): 0.2 to 1.8 ms per task and 0.6 to 1.5 ns
    per byte, varying with the op and with other load; see ``docs/benchmarks.md``.  Refit them
    on other hardware.
    """

    task_overhead_s: float = 4e-4
    transfer_ns_per_byte: float = 1.0


DEFAULT_TILE_MODEL = TileModel()


@dataclass(frozen=True)
class TileChoice:
    """The tile size the model picks (0: the whole image as one task) and its prediction."""

    tile: int
    predicted_s: float
    whole_s: float


def _axis(length: int, tile: int, halo: int) -> tuple[int, int]:
    """(tiles, summed region length) along one axis; regions are clipped to the image."""
    if tile <= 0 or tile >= length:
        return 1, length
    count = -(-length // tile)
    # Cores add up to the length; only the first and last few halos are clipped by the border,
    # so they are summed one by one and the rest are whole (the cost does not grow with the
    # number of tiles: a hostile 1 x 2**31 image must not stall the planner).
    whole_top = max(0, count - -(-halo // tile))
    top = sum(min(halo, i * tile) for i in range(count - whole_top)) + whole_top * halo
    whole_bottom = min(count, max(0, (length - halo) // tile))
    bottom = whole_bottom * halo + sum(
        max(0, min(halo, length - (i + 1) * tile)) for i in range(whole_bottom, count)
    )
    return count, length + top + bottom


def tile_geometry(work: TiledWork, tile: int) -> tuple[int, int]:
    """(number of tasks, values read including halos) for ``tile``."""
    rows, row_span = _axis(work.height, tile, work.halo)
    cols, col_span = (1, work.width) if work.full_rows else _axis(work.width, tile, work.halo)
    return rows * cols, row_span * col_span * work.channels


def predict_tile_time(
    work: TiledWork, tile: int, workers: int, cores: int, model: TileModel = DEFAULT_TILE_MODEL
) -> float:
    """Predicted seconds for one image on ``workers`` engine workers sharing ``cores`` cores.

    The run is bounded below by three things, and the largest one wins: the workers' compute in
    waves of ``workers`` tasks (a few large tiles leave workers idle); rank 0's own serial work
    (a fixed cost per task plus every byte out and back); and all of that CPU time shared by the
    cores (rank 0 competes with the workers when they oversubscribe the machine).  The first
    task's hand-out cannot overlap anything, so it is added on top.
    """
    tasks, read = tile_geometry(work, tile)
    compute = read * work.cost_ns * 1e-9
    moved = (read + work.values) * work.bytes_per_value
    rank0 = tasks * model.task_overhead_s + moved * model.transfer_ns_per_byte * 1e-9
    waves = math.ceil(tasks / max(1, workers)) * compute / tasks
    shared = (compute + rank0) / max(1, cores)
    return max(waves, rank0, shared) + rank0 / tasks


def recommend_tile(
    work: TiledWork,
    workers: int,
    cores: int,
    model: TileModel = DEFAULT_TILE_MODEL,
    candidates: Sequence[int] = TILE_CANDIDATES,
) -> TileChoice:
    """The candidate tile size with the smallest predicted time (0 = send the image whole).

    Sizes at least as large as the image are the whole image and are folded into 0; on equal
    predictions the larger tile wins (fewer tasks), and the whole image counts as the largest.
    """
    largest = max(work.height, work.width)
    sizes = {c if 0 < c < largest else 0 for c in candidates} | {0}
    times = {c: predict_tile_time(work, c, workers, cores, model) for c in sizes}
    tile = min(sizes, key=lambda c: (times[c], -(c or largest)))
    return TileChoice(tile, times[tile], times[0])


def fit_tile_model(
    work: TiledWork, measured: dict[int, float], workers: int, cores: int
) -> tuple[TileModel, float]:
    """Fit the two rank-0 constants to measured seconds per tile size; also the RMS log error.

    A grid search over a wide range of both constants, minimising squared log errors so that
    small and large times count alike.  ``work.cost_ns`` must be measured (single core).
    """
    if len(measured) < 2:
        raise ValueError("need measurements for at least two tile sizes")
    best = (math.inf, DEFAULT_TILE_MODEL)
    for overhead in np.logspace(-6, -2, 49):
        for per_byte in np.logspace(-2, 1.5, 43):
            model = TileModel(float(overhead), float(per_byte))
            error = sum(
                math.log(predict_tile_time(work, t, workers, cores, model) / s) ** 2
                for t, s in measured.items()
            )
            best = min(best, (error, model), key=lambda pair: pair[0])
    return best[1], math.sqrt(best[0] / len(measured))

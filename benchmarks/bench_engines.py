"""Benchmark the local engines against the ``sequential`` engine on two workloads.

Why: every speedup this project claims is "engine time versus the sequential engine, same
pipeline, same input, same run".  This script measures exactly that, and checks on the way that
every engine's output is bit-identical to the sequential engine's, since a fast wrong answer is
worth nothing.

The two workloads are the two ways work reaches a rank:

* ``tiled``: one large BGR image (default 8000×8000) cut into tiles with halos and run through
  :func:`mpi_imgproc.tiling.run_pipeline`; the engine parallelises across tiles.
* ``batch``: many small BGR images (default 500, sides 300–600 px), each run whole (no tiling) and
  handed to the engine in chunks, so the engine parallelises across images.

A "plain OpenCV" row (``cv2.GaussianBlur`` in a loop, one OpenCV thread) shows what the
package's own overhead costs on top of the bare library call.

Pools are started and warmed before timing; measurement rounds interleave the engines so that a
slow spell on a shared machine hits every engine rather than one.  Run it as a script::

    python benchmarks/bench_engines.py            # full run
    python benchmarks/bench_engines.py --quick    # smaller sizes, well under a minute
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from mpi_imgproc.errors import EngineUnavailable
from mpi_imgproc.local_engines import Engine, default_workers, get_engine
from mpi_imgproc.pipeline import Pipeline, ReduceStage
from mpi_imgproc.tiling import Box, run_pipeline

PIPELINE_SPEC = "gaussian_blur:ksize=9"
KSIZE = 9  # the plain-OpenCV reference must match PIPELINE_SPEC
SEED = 12345
BASELINE = "sequential"
OPENCV = "plain OpenCV"
ENGINE_NAMES = ("sequential", "threads", "processes", "gpu")
TARGETS = {"threads": 1.8, "processes": 1.7}  # speedup wanted on 2 cores
NO_MARGINS: Box = (0, 0, 0, 0)

Output = np.ndarray | list[np.ndarray]
Runner = Callable[[], Output]


@dataclass(frozen=True)
class Workload:
    """One case: its inputs and how big they are, for throughput figures."""

    case: str
    images: list[np.ndarray]
    tile: int  # tile size for ``tiled``; unused (0) for ``batch``

    @property
    def megapixels(self) -> float:
        return sum(im.shape[0] * im.shape[1] for im in self.images) / 1e6


@dataclass
class Row:
    """Timings of one engine on one case, and whether its output matched the baseline's."""

    engine: str
    case: str
    workers: int
    megapixels: float
    images: int
    seconds: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)  # minor page faults of this process
    exact: bool = True

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def make_big_image(size: int, seed: int) -> np.ndarray:
    """A ``size``×``size`` BGR uint8 noise image (blur cost does not depend on content)."""
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def make_small_images(count: int, low: int, high: int, seed: int) -> list[np.ndarray]:
    """``count`` BGR uint8 noise images with sides drawn uniformly from ``low``..``high``."""
    rng = np.random.default_rng(seed)
    sides = rng.integers(low, high + 1, size=(count, 2))
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sides]


def run_batch(
    engine: Engine, pipeline: Pipeline, images: Sequence[np.ndarray], chunk: int
) -> list[np.ndarray]:
    """Run every image whole through ``engine``, ``chunk`` images per ``Engine.run`` call.

    Handing the engine many images at once is what lets it work across images; chunking bounds
    how much it holds at a time (the processes engine copies a whole call into shared memory).
    """
    outputs: list[np.ndarray] = []
    for start in range(0, len(images), chunk):
        pieces = list(images[start : start + chunk])
        for stage in pipeline.stages:
            pieces = engine.run(stage, pieces, [NO_MARGINS] * len(pieces))
        outputs.extend(pieces)
    return outputs


def opencv_blur(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The bare library call, one image after another: the floor of the package's overhead.

    IPP is switched off as the package's ops switch it off (per thread), so that this row
    computes what the engines compute whichever engine last ran in this thread.
    """
    cv2.ipp.setUseIPP(False)
    return [cv2.GaussianBlur(im, (KSIZE, KSIZE), 0) for im in images]


def engine_runner(engine: Engine, pipeline: Pipeline, work: Workload, chunk: int) -> Runner:
    """The call to time for ``engine`` on ``work``: tiled for one image, batched for many."""
    if work.case == "tiled":
        return lambda: run_pipeline(pipeline, work.images[0], engine, work.tile)
    return lambda: run_batch(engine, pipeline, work.images, chunk)


def opencv_runner(work: Workload) -> Runner:
    """The plain-OpenCV call for ``work`` (the big image is blurred whole, not tiled)."""
    if work.case == "tiled":
        return lambda: opencv_blur(work.images)[0]
    return lambda: opencv_blur(work.images)


def same_output(a: Output, b: Output) -> bool:
    """True when two outputs (one array, or a list of arrays) are bit-identical."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b)
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def open_engines(names: Sequence[str], workers: int) -> dict[str, Engine]:
    """Create the engines that can run here; an unavailable one is reported and skipped."""
    engines: dict[str, Engine] = {}
    for name in names:
        try:
            engines[name] = get_engine(name, workers)
        except EngineUnavailable as exc:
            log(f"{name}: skipped ({exc})")
        except ImportError as exc:  # the engine's module (or its library) is not installed
            log(f"{name}: skipped (cannot import: {exc})")
    return engines


def warm_up(engine: Engine, pipeline: Pipeline, workers: int) -> None:
    """Start every pool worker and load the stage there, so start-up is never timed.

    Many small tiles at once make a pool that spawns on demand start all of its workers.
    """
    image = make_big_image(64 * max(2, workers), SEED)
    for _ in range(2):
        run_pipeline(pipeline, image, engine, 32)
        run_batch(engine, pipeline, make_small_images(4 * workers, 32, 64, SEED), 4 * workers)


def time_once(runner: Runner) -> tuple[float, int, Output]:
    """Seconds and minor page faults of one call, after a collection of the last call's garbage.

    Page faults are counted because first touches of fresh memory are a large, noisy part of
    these timings on virtual machines; only this process's faults are seen, not pool children's.
    """
    gc.collect()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    started = time.perf_counter()
    output = runner()
    seconds = time.perf_counter() - started
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, output


def measure(
    engines: dict[str, Engine],
    pipeline: Pipeline,
    workloads: Sequence[Workload],
    repeat: int,
    chunk: int,
) -> list[Row]:
    """Time every engine (and plain OpenCV) on every workload ``repeat`` times, interleaved.

    The sequential engine's output is recorded first; every output of every round, the untimed
    first one included, is compared with it.  The untimed round warms caches and allocator.
    """
    rows: list[Row] = []
    for work in workloads:
        runners = {name: engine_runner(e, pipeline, work, chunk) for name, e in engines.items()}
        runners[OPENCV] = opencv_runner(work)
        case_rows = {
            name: Row(
                name,
                work.case,
                engines[name].workers if name in engines else 1,
                work.megapixels,
                len(work.images),
            )
            for name in runners
        }
        reference = runners[BASELINE]()
        for round_ in range(repeat + 1):
            for name, runner in runners.items():  # the baseline first, then the others
                seconds, faults, output = time_once(runner)
                case_rows[name].exact &= same_output(output, reference)
                del output
                if round_ > 0:
                    case_rows[name].seconds.append(seconds)
                    case_rows[name].faults.append(faults)
                    log(f"{work.case:6} {name:12} round {round_}: {seconds:.3f} s")
        del reference
        rows.extend(case_rows.values())
    return rows


def speedup(row: Row, rows: Sequence[Row]) -> float:
    """Baseline median over this row's median, for the same case."""
    base = next(r for r in rows if r.engine == BASELINE and r.case == row.case)
    return base.median / row.median


def markdown_table(rows: Sequence[Row]) -> str:
    """The results as a Markdown table, one line per engine and case."""
    lines = [
        "| engine | case | workers | median s | min–max s | speedup | Mpixel/s | images/s "
        "| exact |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.engine} | {r.case} | {r.workers} | {r.median:.3f} "
            f"| {min(r.seconds):.3f}–{max(r.seconds):.3f} | {speedup(r, rows):.2f}× "
            f"| {r.megapixels / r.median:.1f} | {r.images / r.median:.1f} "
            f"| {'yes' if r.exact else 'no'} |"
        )
    return "\n".join(lines)


def target_report(rows: Sequence[Row], workers: int) -> list[str]:
    """One line per engine target: the speedup wanted, the one measured, met or missed."""
    lines = []
    for r in rows:
        if r.engine in TARGETS:
            want, got = TARGETS[r.engine], speedup(r, rows)
            verdict = "met" if got >= want else "MISSED"
            lines.append(f"- {r.engine} / {r.case}: {got:.3f}× (target ≥ {want}×) {verdict}")
    if lines and workers != 2:
        lines.append(f"- (targets are for 2 workers; this run used {workers})")
    return lines


def report_json(
    rows: Sequence[Row], settings: dict[str, Any], load: Sequence[float]
) -> dict[str, Any]:
    """Everything needed to compare two runs later: settings, machine, every timing."""
    return {
        "settings": settings,
        "machine": {
            "usable_cores": default_workers(),
            "cpu_count": os.cpu_count(),
            "load_average_at_start": list(load),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "opencv": cv2.__version__,
        },
        "results": [
            {
                "engine": r.engine,
                "case": r.case,
                "workers": r.workers,
                "seconds": r.seconds,
                "minor_faults": r.faults,
                "median_s": r.median,
                "speedup": speedup(r, rows),
                "mpixel_per_s": r.megapixels / r.median,
                "images_per_s": r.images / r.median,
                "exact": r.exact,
            }
            for r in rows
        ],
    }


def log(message: str) -> None:
    """Progress goes to stderr so that stdout holds only the table."""
    print(message, file=sys.stderr, flush=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` only changes the sizes that were not given."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3000×3000 and 100 images")
    parser.add_argument("--size", type=int, help="side of the tiled image (default 8000)")
    parser.add_argument("--count", type=int, help="images in the batch (default 500)")
    parser.add_argument("--min-side", type=int, default=300, help="smallest batch side (300)")
    parser.add_argument("--max-side", type=int, default=600, help="largest batch side (600)")
    parser.add_argument("--tile", type=int, default=1024, help="tile size, tiled case (1024)")
    parser.add_argument("--chunk", type=int, default=64, help="images per Engine.run (64)")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds; median (3)")
    parser.add_argument("--workers", type=int, help="engine workers (default: usable cores)")
    parser.add_argument(
        "--engines",
        default=",".join(ENGINE_NAMES),
        help="comma-separated engines; sequential is always run (default: all)",
    )
    parser.add_argument("--seed", type=int, default=SEED, help="input generator seed")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write results here")
    args = parser.parse_args(argv)
    args.size = args.size or (3000 if args.quick else 8000)
    args.count = args.count or (100 if args.quick else 500)
    args.workers = args.workers or default_workers()
    for name in ("size", "count", "min_side", "chunk", "repeat", "workers"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_side < args.min_side:
        parser.error("--max-side must be at least --min-side")
    unknown = set(args.engines.split(",")) - set(ENGINE_NAMES)
    if unknown:
        parser.error(f"--engines: unknown {', '.join(sorted(unknown))}; known: {ENGINE_NAMES}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the table and targets; exit 1 if any output was not exact."""
    args = parse_args(argv)
    pipeline = Pipeline.parse([PIPELINE_SPEC])
    if any(isinstance(s, ReduceStage) for s in pipeline.stages):
        raise SystemExit(f"{PIPELINE_SPEC}: run_batch cannot run a two-phase (reduce) stage")
    wanted = [BASELINE] + [n for n in args.engines.split(",") if n and n != BASELINE]
    cv2.setNumThreads(1)  # engines pin this too; the OpenCV row must not get more cores

    load = os.getloadavg()  # other work on a shared machine skews every timing; keep a note
    log(f"load average {load[0]:.2f}; generating inputs (seed {args.seed}) ...")
    workloads = [
        Workload("tiled", [make_big_image(args.size, args.seed)], args.tile),
        Workload(
            "batch", make_small_images(args.count, args.min_side, args.max_side, args.seed), 0
        ),
    ]
    engines = open_engines(wanted, args.workers)
    try:
        for engine in engines.values():
            log(f"warming up {engine.name} ({engine.workers} workers) ...")
            warm_up(engine, pipeline, engine.workers)
        rows = measure(engines, pipeline, workloads, args.repeat, args.chunk)
    finally:
        for engine in engines.values():
            engine.close()

    settings = {
        "pipeline": PIPELINE_SPEC,
        "size": args.size,
        "tile": args.tile,
        "count": args.count,
        "sides": [args.min_side, args.max_side],
        "chunk": args.chunk,
        "repeat": args.repeat,
        "workers": args.workers,
        "seed": args.seed,
    }
    print(
        f"{PIPELINE_SPEC}; tiled: {args.size}×{args.size} BGR, tile {args.tile}; "
        f"batch: {args.count} images {args.min_side}–{args.max_side} px, chunk {args.chunk}; "
        f"workers {args.workers}; median of {args.repeat}; load average at start {load[0]:.2f}\n"
    )
    print(markdown_table(rows))
    targets = target_report(rows, args.workers)
    if targets:
        print("\nTargets:\n" + "\n".join(targets))
    if args.json:
        args.json.write_text(json.dumps(report_json(rows, settings, load), indent=2) + "\n")
        log(f"wrote {args.json}")
    if not all(r.exact for r in rows):
        log("some outputs differ from the sequential engine's (exact: no)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

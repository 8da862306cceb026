"""``mpi-imgproc compare``: one set of images through every way this project can run them.

Methods, all on the same images and pipeline, in the same run:

=================  ==========================================================================
``sequential``     the ``sequential`` engine, one core: the reference of every speedup
``threads``        the ``threads`` engine (OpenCV releases the GIL)
``processes``      the ``processes`` engine (shared memory, forkserver)
``pool``           a plain ``multiprocessing.Pool.map`` of ``Pipeline.apply`` over the images,
                   pickled both ways: the baseline a user would write first
``opencv``         the bare OpenCV call in a loop, one thread, where the pipeline is one op
                   that maps to one call (what the package adds on top of the library)
``gpu``            the ``gpu`` engine, where CuPy and a device are there
``cluster-nN``     ``mpiexec -n N`` servers started here (or one running cluster for the web
                   page), fed through the :class:`~mpi_imgproc.client.Client`
``batch-nN``       with ``--batch``: ``mpiexec -n N python -m mpi_imgproc.batch`` over the
                   files, start-up included
=================  ==========================================================================

With ``--io`` (implied by ``--batch``) every method's timing includes reading the input files
and writing its outputs (in the inputs' formats, to a scratch folder): the batch-throughput
question.  Without it the images are decoded once and the methods time the pixels' work.

Every method runs once untimed (pools started, caches warm) and then ``repeat`` timed rounds;
local methods' rounds are interleaved, so a slow spell on a shared machine hits all of them.
Every output of every round is compared with the sequential output bit for bit; a method
that differs is reported as not exact (its time is still shown, marked).  Medians with
min–max are reported; speedup is the sequential median over the method's, efficiency the
speedup over the cores the method used.  Nothing is extrapolated: the cluster is reported at
the rank counts measured, and :func:`cluster_speedup` refuses any other.

The web page's compare view calls :func:`run_compare` and :func:`write_outputs` too.
"""

from __future__ import annotations

import argparse
import html
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EngineUnavailable, ImgprocError, describe
from .imageio import decode, encode, list_inputs, output_path, read_image, write_atomic, write_image
from .local_engines import default_workers, get_engine
from .metrics import efficiency, karp_flatt, median, speedup
from .pipeline import Pipeline, ReduceStage
from .report import _save_both, markdown_table, plot_job_ranks, write_csv, write_json
from .tiling import run_pipeline

LOCAL_METHODS = ("sequential", "threads", "processes", "pool", "opencv", "gpu")
SAMPLE_COLUMNS = ["method", "kind", "ranks", "cores", "round", "wall_s", "exact"]
SUMMARY_COLUMNS = [
    "method", "kind", "ranks", "cores", "samples", "median_s", "min_s", "max_s", "speedup",
    "speedup_min", "speedup_max", "efficiency", "images_per_s", "exact",
]  # fmt: skip
CHUNK = 16  # images per cluster job (Client.map's chunk)
LOCAL_TILE = 512  # tiles of one large image for the local engines (below: whole images)


class CompareError(ImgprocError):
    """A comparison that cannot run or a question it cannot answer from what it measured."""

    code = "compare_error"


@dataclass
class CompareSettings:
    """What to compare: the pipeline, methods, cluster rank counts, rounds and workers.

    ``server``: compare against this running cluster (one rank count, the web page's) instead
    of starting one per entry of ``ranks``.
    """

    pipeline: Pipeline
    methods: Sequence[str] = LOCAL_METHODS
    ranks: Sequence[int] = (2, 3)
    repeat: int = 3
    workers: int | None = None
    cluster_engine: str = "threads"
    tile: int | str = "auto"
    server: str | None = None
    batch: bool = False
    timeout: float = 600.0
    notes: list[str] = field(default_factory=list)


Progress = Callable[[str], None]


# -- what is measured --------------------------------------------------------------------------


@dataclass
class Workload:
    """The images of a comparison; with ``paths`` (``--io``) every method also reads them
    and writes its outputs under ``scratch`` inside its timing."""

    images: list[np.ndarray]
    names: list[str]
    paths: list[Path] | None = None
    scratch: Path | None = None
    across: bool = True  # local engines work across images (else across tiles)
    _rounds: int = 0

    @property
    def io(self) -> bool:
        """Methods read and write files."""
        return self.paths is not None

    def folder(self, method: str) -> Path:
        """A fresh output folder for one round of ``method`` (the previous one removed)."""
        assert self.scratch is not None
        for old in self.scratch.glob(f"{method}.*"):
            shutil.rmtree(old, ignore_errors=True)
        self._rounds += 1
        folder = self.scratch / f"{method}.{self._rounds}"
        folder.mkdir(parents=True)
        return folder

    def target(self, index: int, folder: Path) -> Path:
        """Where image ``index``'s output goes in ``folder`` (its input's name and format)."""
        assert self.paths is not None
        return output_path(self.paths[index], folder, "same")


Outcome = list[np.ndarray] | Path  # outputs in memory, or the folder they were written to
Runner = Callable[[], Outcome]


@dataclass
class Method:
    """One way to run the workload: its name, kind, cores used and the call to time."""

    name: str
    kind: str
    ranks: int
    cores: int
    run: Runner
    stats: dict[str, Any] = field(default_factory=dict)  # a cluster job's ``done`` stats


class Reference:
    """The sequential engine's outputs, and (``--io``) those outputs as their files decode."""

    def __init__(self, work: Workload, pipeline: Pipeline):
        with get_engine("sequential") as engine:
            self.outputs = run_local(engine, pipeline, work.images, work.across)
        self.files: list[np.ndarray] = []
        if work.io:
            assert work.paths is not None
            self.files = [
                decode(encode(out, path.suffix)) for out, path in zip(self.outputs, work.paths)
            ]
        self.work = work

    def equal(self, outcome: Outcome) -> bool:
        """Every output of ``outcome`` equals the reference, bit for bit."""
        if isinstance(outcome, Path):
            return all(
                np.array_equal(read_image(self.work.target(i, outcome)), expected)
                for i, expected in enumerate(self.files)
            )
        return len(outcome) == len(self.outputs) and all(
            np.array_equal(a, b) for a, b in zip(outcome, self.outputs)
        )


# -- local methods -----------------------------------------------------------------------------


def across_images(pipeline: Pipeline, count: int, workers: int) -> bool:
    """Whether the local engines work across whole images (enough of them to keep every
    worker busy, and no two-phase stage) rather than across tiles of each image."""
    return count >= workers and not any(isinstance(s, ReduceStage) for s in pipeline.stages)


def run_local(
    engine: Any, pipeline: Pipeline, images: Sequence[np.ndarray], across: bool
) -> list[np.ndarray]:
    """Every image through ``engine``: whole images handed to it together (``across``), or
    each image cut into tiles of ``LOCAL_TILE`` (one large image still keeps every worker
    busy).  Every engine, the sequential reference too, gets the same cut."""
    if across:
        pieces = list(images)
        for stage in pipeline.stages:
            pieces = engine.run(stage, pieces, [(0, 0, 0, 0)] * len(pieces))
        return [np.ascontiguousarray(p) for p in pieces]
    return [run_pipeline(pipeline, image, engine, LOCAL_TILE) for image in images]


_POOL_PIPELINE: Pipeline | None = None


def _pool_start(steps: list[Any]) -> None:
    import cv2

    global _POOL_PIPELINE
    cv2.setNumThreads(1)
    _POOL_PIPELINE = Pipeline.from_json(steps)


def _pool_apply(image: np.ndarray) -> np.ndarray:
    assert _POOL_PIPELINE is not None
    return _POOL_PIPELINE.apply(image)


def _pool_file(paths: tuple[Path, Path]) -> None:
    assert _POOL_PIPELINE is not None
    write_image(paths[1], _POOL_PIPELINE.apply(read_image(paths[0])))


class PoolMethod:
    """The plain ``multiprocessing.Pool`` baseline: images pickled to workers and back, or
    (``--io``) each worker reading and writing its files itself."""

    def __init__(self, pipeline: Pipeline, workers: int):
        context = multiprocessing.get_context("forkserver")
        self.workers = workers
        self.pool = context.Pool(workers, _pool_start, (pipeline.to_json(),))

    def __call__(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        return self.pool.map(_pool_apply, images, chunksize=1)

    def files(self, work: Workload) -> Path:
        """Every file of ``work`` read, processed and written by the workers."""
        assert work.paths is not None
        folder = work.folder("pool")
        pairs = [(p, work.target(i, folder)) for i, p in enumerate(work.paths)]
        self.pool.map(_pool_file, pairs, chunksize=max(1, len(pairs) // (4 * self.workers)))
        return folder

    def close(self) -> None:
        """Stop the workers."""
        self.pool.close()
        self.pool.join()


def _with_files(work: Workload, method: str, fn: Callable[[list], list]) -> Runner:
    """``fn`` over the images, with reading the inputs and writing the outputs timed too."""

    def run() -> Path:
        """One timed run of the method."""
        assert work.paths is not None
        folder = work.folder(method)
        outputs = fn([read_image(p) for p in work.paths])
        for i, out in enumerate(outputs):
            write_image(work.target(i, folder), out)
        return folder

    return run


def _opencv_call(pipeline: Pipeline) -> Callable[[np.ndarray], np.ndarray] | None:
    """The bare OpenCV call of a one-op pipeline (the bench's list), or None."""
    from .bench import _plain_opencv

    return _plain_opencv("+".join(step.spec() for step in pipeline.steps))


def local_methods(s: CompareSettings, work: Workload) -> tuple[list[Method], list[Any]]:
    """Each local method ready to time, and what to close afterwards."""
    from .bench import _opencv_loop

    workers = s.workers or default_workers()
    methods: list[Method] = []
    closers: list[Any] = []
    for name in s.methods:
        try:
            fn, cores, pool = _local_fn(name, s, workers, closers, work.across)
        except (EngineUnavailable, ImportError, CompareError) as exc:
            s.notes.append(f"{name}: not measured here ({describe(exc)})")
            continue
        if name == "opencv":
            call = _opencv_call(s.pipeline)
            fn = lambda images, call=call: _opencv_loop(call, images)  # noqa: E731
        if work.io:
            run = (lambda pool=pool: pool.files(work)) if pool else _with_files(work, name, fn)
        else:
            run = lambda fn=fn: fn(work.images)  # noqa: E731
        methods.append(Method(name, "local", 0, cores, run))
    return methods, closers


def _local_fn(
    name: str, s: CompareSettings, workers: int, closers: list[Any], across: bool
) -> tuple[Callable[[list], list], int, PoolMethod | None]:
    """(the function over images, cores it uses, the Pool if it is the Pool)."""
    if name == "pool":
        pool = PoolMethod(s.pipeline, workers)
        closers.append(pool)
        return pool, workers, pool
    if name == "opencv":
        if _opencv_call(s.pipeline) is None:
            raise CompareError("the pipeline is not one op with a single OpenCV call")
        return list, 1, None
    engine = get_engine(name, 1 if name == "sequential" else workers)
    closers.append(engine)
    cores = 1 if name == "sequential" else engine.workers
    return (lambda images: run_local(engine, s.pipeline, images, across)), cores, None


# -- the cluster and batch mode ----------------------------------------------------------------


def cluster_method(client: Any, s: CompareSettings, work: Workload) -> Method:
    """Jobs through a running cluster with ``Client.map`` (jobs of at most ``CHUNK`` images,
    a few in flight, each within the server's request limit): raw pixels both ways, or
    (``--io``) the files' bytes up and the encoded results written to files by the client.
    ``Method.stats`` keeps the ``done`` stats of the last job (for the per-rank plots)."""
    from .bench import ClusterShape

    info = client.info()
    shape = ClusterShape.from_info(info, default_workers())
    name = f"cluster-n{info['ranks']}"
    method = Method(name, "cluster", int(info["ranks"]), shape.cores_used, lambda: [])

    def items(sources: Sequence[Any], result: str) -> Iterator[Any]:
        """Each image's item as it completes; the first error ends the run."""
        with client.map(sources, s.pipeline, window=4, chunk=CHUNK, tile=s.tile,
                        result=result, timeout=s.timeout) as stream:  # fmt: skip
            for item in stream:
                if not item.ok:
                    code, message = item.error
                    raise CompareError(f"{name}: {item.name}: {code}: {message}")
                yield item
            method.stats = stream.jobs[-1].get("stats", {}) if stream.jobs else {}

    def in_memory() -> list[np.ndarray]:
        """The images as raw pixels; the results' pixels in input order."""
        outputs: list[Any] = [None] * len(work.images)
        for item in items(work.images, "raw"):
            outputs[item.index] = item.image()
        return outputs

    def with_files() -> Path:
        """The files' bytes; each encoded result written as it arrives."""
        assert work.paths is not None
        folder = work.folder(name)
        for item in items(work.paths, "same"):
            write_atomic(work.target(item.index, folder), item.event.frames[0])
        return folder

    method.run = with_files if work.io else in_memory
    return method


def batch_method(s: CompareSettings, work: Workload, ranks: int) -> Method:
    """``mpiexec -n RANKS python -m mpi_imgproc.batch`` over the files, start-up included
    (what a user waits for)."""
    from .launch import mpi_command

    assert work.paths is not None
    name = f"batch-n{ranks}"
    ops = [arg for step in s.pipeline.steps for arg in ("--op", step.spec())]
    inputs = [arg for path in work.paths for arg in ("--input", str(path))]

    def run() -> Path:
        """One timed run of the method."""
        folder = work.folder(name)
        cmd = mpi_command(ranks, "mpi_imgproc.batch", *inputs, "--output", str(folder), *ops)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=s.timeout)
        if done.returncode != 0:
            raise CompareError(f"{name}: exit {done.returncode}: {done.stderr.strip()[-300:]}")
        return folder

    return Method(name, "batch", ranks, default_workers() if ranks > 1 else 1, run)


def _errors(errors: dict[int, tuple[str, str]]) -> str:
    return "; ".join(dict.fromkeys(f"{c}: {m}" for c, m in errors.values())) or "no reason"


def _sample(method: Method, rnd: int, wall: float, exact: bool) -> dict[str, Any]:
    return {"method": method.name, "kind": method.kind, "ranks": method.ranks,
            "cores": method.cores, "round": rnd, "wall_s": round(wall, 6),
            "exact": exact}  # fmt: skip


def time_rounds(
    methods: Sequence[Method], reference: Reference, repeat: int, progress: Progress
) -> list[dict[str, Any]]:
    """One untimed round, then ``repeat`` timed ones, methods interleaved in each round."""
    samples = []
    for rnd in range(repeat + 1):
        for method in methods:
            progress(f"{method.name}: round {rnd} of {repeat}")
            started = time.perf_counter()
            outcome = method.run()
            wall = time.perf_counter() - started
            exact = reference.equal(outcome)
            if rnd:
                samples.append(_sample(method, rnd, wall, exact))
    return samples


# -- the comparison ----------------------------------------------------------------------------


def run_compare(
    images: Sequence[np.ndarray],
    names: Sequence[str],
    s: CompareSettings,
    progress: Progress = lambda message: None,
    paths: Sequence[Path] | None = None,
) -> dict[str, Any]:
    """Measure every method on ``images`` (read from ``paths`` by each method when given)
    and return samples, summary, findings and one cluster job's ``done`` stats."""
    import cv2

    if not images:
        raise CompareError("no images to compare")
    if not 1 <= s.repeat <= 50:
        raise CompareError(f"repeat must be 1..50; got {s.repeat}")
    cv2.setNumThreads(1)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="mpi-imgproc-compare-") as scratch:
        workers = s.workers or default_workers()
        across = across_images(s.pipeline, len(images), workers)
        work = Workload(list(images), list(names), across=across)
        if paths is not None:
            work.paths, work.scratch = [Path(p) for p in paths], Path(scratch)
        progress("sequential reference")
        reference = Reference(work, s.pipeline)
        # The clusters first: the processes engine leaves MPI4PY_RC_INITIALIZE=0 in this
        # process's environment, which servers started after it would inherit.
        samples, job_stats = _measure_clusters(s, work, reference, progress)
        methods, closers = local_methods(s, work)
        try:
            samples += time_rounds(methods, reference, s.repeat, progress)
        finally:
            for closer in closers:
                closer.close()
    summary = summarise(samples, len(images))
    pixels = sum(int(im.shape[0]) * int(im.shape[1]) for im in images)
    return {
        "pipeline": [step.spec() for step in s.pipeline.steps],
        "images": len(images),
        "names": list(names)[:50],
        "megapixels": round(pixels / 1e6, 3),
        "repeat": s.repeat,
        "io": work.io,
        "machine": {
            "cores": default_workers(),
            "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
        "local_cut": "whole images" if across else f"{LOCAL_TILE}-px tiles",
        "ranks_measured": sorted({r["ranks"] for r in summary if r["kind"] == "cluster"}),
        "samples": samples,
        "summary": summary,
        "job_stats": job_stats,
        "notes": s.notes,
        "findings": findings(summary, s.notes),
        "headline": headline(summary),
    }


def _measure_clusters(
    s: CompareSettings, work: Workload, reference: Reference, progress: Progress
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Samples of the cluster at each rank count (and batch mode with ``s.batch``), and the
    ``done`` stats of one job on the largest cluster measured."""
    from .client import Client
    from .launch import running_cluster

    samples: list[dict[str, Any]] = []
    job_stats: dict[str, Any] = {}
    if s.server:
        progress("cluster: the running one")
        with Client(s.server, timeout=60.0) as client:
            method = cluster_method(client, s, work)
            samples += time_rounds([method], reference, s.repeat, progress)
            job_stats = method.stats
        return samples, job_stats
    for ranks in sorted(set(s.ranks)):
        progress(f"cluster-n{ranks}: starting mpiexec -n {ranks}")
        try:
            with running_cluster(ranks, "--engine", s.cluster_engine) as cluster:
                with Client(cluster.address, timeout=60.0) as client:
                    method = cluster_method(client, s, work)
                    samples += time_rounds([method], reference, s.repeat, progress)
                    job_stats = method.stats
            if s.batch:
                samples += time_rounds([batch_method(s, work, ranks)], reference, s.repeat,
                                       progress)  # fmt: skip
        except (ImgprocError, RuntimeError, subprocess.TimeoutExpired) as exc:
            s.notes.append(f"-n {ranks}: not measured ({describe(exc)})")
    return samples, job_stats


def summarise(samples: Sequence[dict[str, Any]], images: int) -> list[dict[str, Any]]:
    """Median, min and max per method; speedups against the sequential median."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for row in samples:
        by_method.setdefault(row["method"], []).append(row)
    reference = by_method.get("sequential")
    ref = median([r["wall_s"] for r in reference]) if reference else None
    summary = []
    for method, rows in by_method.items():
        walls = [r["wall_s"] for r in rows]
        mid, low, high = median(walls), min(walls), max(walls)
        cores = rows[0]["cores"]
        ratio = speedup(ref, mid) if ref else None
        summary.append({
            "method": method, "kind": rows[0]["kind"], "ranks": rows[0]["ranks"],
            "cores": cores, "samples": len(rows), "median_s": mid, "min_s": low, "max_s": high,
            "speedup": ratio,
            "speedup_min": speedup(ref, high) if ref else None,
            "speedup_max": speedup(ref, low) if ref else None,
            "efficiency": efficiency(ratio, cores) if ratio else None,
            "images_per_s": images / mid if mid > 0 else None,
            "exact": all(r["exact"] for r in rows),
        })  # fmt: skip
    order = {m: i for i, m in enumerate(LOCAL_METHODS)}
    summary.sort(
        key=lambda r: (r["kind"] != "local", r["ranks"], r["kind"], order.get(r["method"], 0))
    )
    return summary


def cluster_speedup(summary: Sequence[dict[str, Any]], ranks: int) -> float:
    """The measured cluster speedup at ``ranks``; CompareError for a rank count not measured
    (a comparison reports what it ran, it does not predict)."""
    for row in summary:
        if row["kind"] == "cluster" and row["ranks"] == ranks:
            return row["speedup"]
    measured = sorted(r["ranks"] for r in summary if r["kind"] == "cluster")
    raise CompareError(
        f"-n {ranks} was not measured (measured: {', '.join(map(str, measured)) or 'none'}); "
        "run compare with --ranks including it instead of extrapolating"
    )


def headline(summary: Sequence[dict[str, Any]]) -> str:
    """One sentence: the fastest exact method and its speedup."""
    exact = [r for r in summary if r["exact"] and r["speedup"]]
    if not exact:
        return "no exact method was measured"
    best = max(exact, key=lambda r: r["speedup"])
    return (
        f"fastest: {best['method']}, {best['speedup']:.2f}× the sequential engine "
        f"({best['median_s']:.3f} s median on {_cores(best['cores'])}); every result "
        + ("equal to the sequential one" if all(r["exact"] for r in summary) else "NOT all equal")
    )


def _cores(n: int) -> str:
    return "1 core" if n == 1 else f"{n} cores"


def findings(summary: Sequence[dict[str, Any]], notes: Sequence[str]) -> list[str]:
    """Sentences from the measured figures: who wins and why, what the cluster's serial
    fraction looks like at the rank counts measured, what was not measured."""
    out = []
    rows = {r["method"]: r for r in summary}
    for method in ("threads", "processes", "pool"):
        row = rows.get(method)
        if row and row["speedup"]:
            out.append(
                f"{method}: {row['speedup']:.2f}× on {_cores(row['cores'])} "
                f"(efficiency {100 * row['efficiency']:.0f} %)."
            )
    if rows.get("pool") and rows.get("processes"):
        ratio = rows["processes"]["median_s"] / rows["pool"]["median_s"]
        why = (
            "it moves pixels through shared memory where the Pool pickles every image both ways"
            if ratio < 1
            else "its parent copies every image into shared memory and out again, and on few "
            "cores those copies take the cores the children compute on"
        )
        out.append(f"The processes engine took {ratio:.2f}× the plain Pool's time: {why}.")
    if rows.get("opencv") and rows["opencv"]["speedup"]:
        out.append(
            f"The bare OpenCV call (one thread, whole images, OpenCV's IPP on) ran at "
            f"{rows['opencv']['speedup']:.2f}× the sequential engine: the package's own cost "
            "(tiles and their halos where it cuts them; IPP switched off in the package's "
            "ops)."
        )
    for row in (r for r in summary if r["kind"] != "local" and r["speedup"]):
        serial = karp_flatt(row["speedup"], row["cores"]) if row["cores"] > 1 else None
        tail = (
            f"; serial fraction (Karp–Flatt) {serial:.2f}: by Amdahl's law no rank count "
            f"takes it past {1 / serial:.1f}× on this work"
            if serial is not None and 0 < serial < 1 and row["speedup"] > 1
            else "; slower than one process: messages and start-up outweigh the work"
            if row["speedup"] < 1
            else ""
        )
        out.append(f"{row['method']}: {row['speedup']:.2f}× on {_cores(row['cores'])}{tail}.")
    measured = sorted({r["ranks"] for r in summary if r["kind"] != "local"})
    if measured:
        out.append(
            f"The cluster was measured at -n {', '.join(map(str, measured))} only; nothing here "
            "is extrapolated beyond that."
        )
    above = [
        r["method"]
        for r in summary
        if r["efficiency"] and r["efficiency"] > 1.05 and r["method"] != "opencv"
    ]
    if above:
        out.append(
            f"Efficiency above 100 % ({', '.join(above)}): the sequential reference ran slower "
            "than its share (a busy machine, caches); repeat on an idle machine to trust it."
        )
    not_exact = [r["method"] for r in summary if not r["exact"]]
    if not_exact:
        out.append(f"NOT equal to the sequential output: {', '.join(not_exact)}.")
    return out + list(notes)


# -- files -------------------------------------------------------------------------------------


def write_outputs(result: dict[str, Any], out: Path) -> list[Path]:
    """CSV, JSON, plots (PNG and SVG), report.md and a self-contained report.html in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = [
        write_csv(result["samples"], SAMPLE_COLUMNS, out / "samples.csv"),
        write_csv(result["summary"], SUMMARY_COLUMNS, out / "summary.csv"),
        write_json(result, out / "compare.json"),
    ]
    plots = write_plots(result, out)
    (out / "report.md").write_text(markdown_report(result, [p.name for p in plots]))
    (out / "report.html").write_text(html_report(result, out, plots))
    return written + plots + [out / "report.md", out / "report.html"]


def write_plots(result: dict[str, Any], out: Path) -> list[Path]:
    """Time, speedup and efficiency per method with min–max bars; the cluster over the rank
    counts measured; per-rank utilisation and the task timeline of one cluster job."""
    import matplotlib

    matplotlib.use("Agg")
    summary = result["summary"]
    written: list[Path] = []
    for name, key, low, high, label in (
        ("time", "median_s", "min_s", "max_s", "seconds (median, min–max)"),
        ("speedup", "speedup", "speedup_min", "speedup_max", "× the sequential engine"),
        ("efficiency", "efficiency", None, None, "speedup / cores"),
    ):
        written += _bars(summary, key, low, high, label, out / name)
    cluster = sorted((r for r in summary if r["kind"] == "cluster"), key=lambda r: r["ranks"])
    if len(cluster) > 1:
        written += _scaling(cluster, out / "cluster_scaling")
    if result.get("job_stats", {}).get("ranks"):
        written += plot_job_ranks(result["job_stats"], out)
    return written


def _bars(
    summary: list, key: str, low: str | None, high: str | None, label: str, stem: Path
) -> list[Path]:
    import matplotlib.pyplot as plt

    rows = [r for r in summary if r.get(key) is not None]
    if not rows:
        return []
    values = [r[key] for r in rows]
    errors = None
    if low and high:
        errors = [[v - r[low] for v, r in zip(values, rows)],
                  [r[high] - v for v, r in zip(values, rows)]]  # fmt: skip
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(rows) + 1.4))
    colours = ["#2563eb" if r["exact"] else "#b42318" for r in rows]
    ax.barh([r["method"] for r in rows], values, xerr=errors, capsize=4, color=colours)
    if key in ("speedup", "efficiency"):
        ax.axvline(1.0, color="#888", linestyle="--", linewidth=1)
    ax.invert_yaxis()
    ax.set_xlabel(label)
    ax.set_title(f"{stem.name} per method (red: not equal to sequential)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    return _save_both(fig, stem)


def _scaling(cluster: list, stem: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 4.0))
    ranks = [r["ranks"] for r in cluster]
    values = [r["speedup"] for r in cluster]
    errors = [[v - r["speedup_min"] for v, r in zip(values, cluster)],
              [r["speedup_max"] - v for v, r in zip(values, cluster)]]  # fmt: skip
    ax.errorbar(ranks, values, yerr=errors, marker="o", capsize=4, label="measured")
    ax.set_xticks(ranks)
    ax.set_xlim(min(ranks) - 0.5, max(ranks) + 0.5)  # only where it was measured
    ax.set_xlabel("mpiexec -n (ranks; rank 0 serves)")
    ax.set_ylabel("× the sequential engine")
    ax.set_title("cluster speedup at the rank counts measured", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_both(fig, stem)


SUMMARY_TABLE = [
    ("method", "method", str),
    ("cores", "cores", str),
    ("median s", "median_s", lambda v: f"{v:.4f}"),
    ("min–max s", "min_s", None),
    ("speedup", "speedup", lambda v: "—" if v is None else f"{v:.2f}×"),
    ("efficiency", "efficiency", lambda v: "—" if v is None else f"{100 * v:.0f} %"),
    ("images/s", "images_per_s", lambda v: "—" if v is None else f"{v:.1f}"),
    ("equal", "exact", lambda v: "yes" if v else "**NO**"),
]


def _table_rows(summary: list) -> list[dict[str, Any]]:
    return [{**r, "min_s": f"{r['min_s']:.4f}–{r['max_s']:.4f}"} for r in summary]


def markdown_report(result: dict[str, Any], plots: Sequence[str]) -> str:
    """The report as Markdown: what ran, the table, the findings, the plots."""
    columns = [(h, k, fn or str) for h, k, fn in SUMMARY_TABLE]
    lines = [
        "# Method comparison",
        "",
        f"{result['images']} images ({result['megapixels']} Mpixel) through "
        f"`{' → '.join(result['pipeline'])}`, {result['repeat']} timed rounds after one "
        f"untimed; the local engines work across {result['local_cut']}"
        f"{'; every method reads the files and writes its outputs' if result['io'] else ''}"
        "; medians with min–max. Speedup: the sequential engine's median over the "
        "method's; efficiency: speedup over the cores the method used. Every output was "
        "compared with the sequential engine's, bit for bit.",
        "",
        f"**{result['headline']}**",
        "",
        _machine_line(result),
        "",
        markdown_table(_table_rows(result["summary"]), columns),
        "",
        "## Findings",
        "",
        *[f"- {line}" for line in result["findings"]],
        "",
    ]
    images = [p for p in plots if p.endswith(".png")]
    if images:
        lines += ["## Plots", "", *[f"![{Path(p).stem}]({p})" for p in images], ""]
    return "\n".join(lines)


def _machine_line(result: dict[str, Any]) -> str:
    """Cores and the load average before and after: other work on the machine shows here."""
    machine = result.get("machine", {})
    load = machine.get("load_average", [None, None])
    return (
        f"Machine: {machine.get('cores')} usable cores; load average {load[0]} at the start, "
        f"{load[1]} at the end (above the core count, other work shared the machine and "
        "every figure is worse and noisier)."
    )


def html_report(result: dict[str, Any], out: Path, plots: Sequence[Path]) -> str:
    """One HTML page with everything inside: the table, findings and the SVG plots inline."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _, _ in SUMMARY_TABLE)
    body = []
    for row in _table_rows(result["summary"]):
        cells = "".join(
            f"<td>{html.escape((fn or str)(row.get(k)))}</td>" for _, k, fn in SUMMARY_TABLE
        )
        body.append(f"<tr>{cells}</tr>")
    svgs = []
    for path in plots:
        if path.suffix == ".svg":
            text = path.read_text()
            svgs.append(f"<figure>{text[text.find('<svg'):]}<figcaption>"
                        f"{html.escape(path.stem)}</figcaption></figure>")  # fmt: skip
    findings_html = "".join(f"<li>{html.escape(f)}</li>" for f in result["findings"])
    pipeline = html.escape(" → ".join(result["pipeline"]))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Method comparison</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 1000px;
  padding: 0 1rem; color: #1d2330; }}
table {{ border-collapse: collapse; display: block; overflow-x: auto; }}
th, td {{ border-bottom: 1px solid #d5dae3; padding: .3rem .6rem; text-align: left; }}
figure {{ margin: 1rem 0; }} figure svg {{ max-width: 100%; height: auto; }}
</style></head><body>
<h1>Method comparison</h1>
<p>{result["images"]} images ({result["megapixels"]} Mpixel) through <code>{pipeline}</code>,
{result["repeat"]} timed rounds after one untimed; medians with min–max. Every output was
compared with the sequential engine's, bit for bit.</p>
<p><strong>{html.escape(result["headline"])}</strong></p>
<table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>
<h2>Findings</h2><ul>{findings_html}</ul>
<h2>Plots</h2>{"".join(svgs)}
</body></html>
"""


# -- the command -------------------------------------------------------------------------------


def load_inputs(
    folder: str, most: int = 10_000
) -> tuple[list[np.ndarray], list[str], list[Path], list[str]]:
    """The images of ``folder`` (decoded), their names and paths, and a note per file left
    out (unreadable, or not an image)."""
    found, skipped = list_inputs([folder])
    notes = [f"{p}: skipped ({why})" for p, why in skipped if not why.startswith("suffix")]
    images, names, paths = [], [], []
    for path in found[:most]:
        try:
            images.append(read_image(path))
        except ImgprocError as exc:
            notes.append(f"{path}: not read ({exc})")
            continue
        names.append(Path(path).name)
        paths.append(Path(path))
    return images, names, paths, notes


def add_compare_command(sub: argparse._SubParsersAction) -> None:
    """Register ``mpi-imgproc compare``."""
    from .cli import add_pipeline_options

    cmd = sub.add_parser(
        "compare",
        help="every method (sequential, threads, processes, Pool, GPU, the cluster) on a folder",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    cmd.add_argument("input_dir", metavar="INPUT_DIR", help="a folder of images")
    add_pipeline_options(cmd)
    cmd.add_argument("--out", required=True, help="folder for CSV, JSON, plots and reports")
    cmd.add_argument("--ranks", default="2,3", help="cluster rank counts to start and measure")
    cmd.add_argument("--repeat", type=int, default=3, help="timed rounds per method")
    cmd.add_argument("--methods", default=",".join(LOCAL_METHODS), help="local methods")
    cmd.add_argument("--workers", type=int, default=None, help="workers (default: cores)")
    cmd.add_argument("--engine", default="threads", help="the cluster ranks' engine")
    cmd.add_argument("--tile", default="auto", help="the cluster's tile size: auto or pixels")
    cmd.add_argument("--server", default=None, help="use this running cluster, not --ranks")
    cmd.add_argument(
        "--io", action="store_true", help="each method reads the files and writes its outputs"
    )
    cmd.add_argument(
        "--batch",
        action="store_true",
        help="also mpiexec -n N python -m mpi_imgproc.batch at each --ranks (implies --io)",
    )
    cmd.set_defaults(func=cmd_compare)


def settings_from_args(args: argparse.Namespace) -> CompareSettings:
    """CompareSettings from the command line, every value checked."""
    from .cli import pipeline_from_args

    try:
        ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    except ValueError:
        raise CompareError(
            f"--ranks must be whole numbers such as 1,2,4; got {args.ranks!r}"
        ) from None
    if not ranks or any(not 1 <= r <= 256 for r in ranks):
        raise CompareError(f"--ranks must be 1..256 each; got {args.ranks!r}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in LOCAL_METHODS]
    if unknown:
        raise CompareError(f"unknown --methods {unknown}; choose from {', '.join(LOCAL_METHODS)}")
    if "sequential" not in methods:
        methods.insert(0, "sequential")  # the reference of every speedup
    if args.tile != "auto" and not args.tile.isdigit():
        raise CompareError(f"--tile must be auto or whole pixels; got {args.tile!r}")
    tile = args.tile if args.tile == "auto" else int(args.tile)
    return CompareSettings(
        pipeline_from_args(args), methods, ranks, args.repeat, args.workers, args.engine, tile,
        args.server, args.batch,
    )  # fmt: skip


def cmd_compare(args: argparse.Namespace) -> int:
    """Load the folder, measure every method, write everything, print the headline."""
    settings = settings_from_args(args)
    if settings.batch and settings.server:
        raise CompareError("--batch starts its own mpiexec per --ranks; leave out --server")
    images, names, paths, notes = load_inputs(args.input_dir)
    settings.notes.extend(notes)
    if not images:
        raise CompareError(f"no readable image in {args.input_dir}")
    io = args.io or args.batch
    say = lambda message: print(f"compare: {message}", flush=True)  # noqa: E731
    result = run_compare(images, names, settings, say, paths if io else None)
    for path in write_outputs(result, Path(args.out)):
        print(f"wrote {path}")
    print(result["headline"])
    return 0 if all(r["exact"] for r in result["summary"]) else 1

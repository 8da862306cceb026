"""``mpi-imgproc bench``: scaling experiments on clusters the bench starts itself.

For each engine and rank count ``k`` the bench launches ``mpiexec -n k python -m
mpi_imgproc.server`` (through :mod:`mpi_imgproc.launch`, which kills the process group
whatever happens), drives it with :class:`mpi_imgproc.client.Client`, and stops it.  Four
experiments share those clusters:

* ``strong``: fixed work (one image of ``--size``) over every rank count;
* ``weak``: work that grows with the workers (one ``--weak-size`` image per worker rank);
* ``tiles``: tile sizes (and the server's ``auto``) on one image of ``--size``;
* ``sizes``: image sizes, to show where overhead dominates.

Every speedup is against the single-process reference measured in the same run: a loop of the
``sequential`` engine over the same images (and, where the op maps to one OpenCV call, plain
OpenCV), both with ``cv2.setNumThreads(1)``.  Every cluster result is compared with the
reference output bit for bit: a fast wrong answer is not a result.  Rounds interleave the cases
of a cluster, so a slow spell on a shared machine is spread over all of them.

``--recommend`` measures tile sizes and tiles in flight for one op and image size, fits the
tile model of :mod:`mpi_imgproc.metrics` to the measurements and prints the best choice.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .client import Client, JobResult, ServerError, ServerTimeout
from .errors import EngineUnavailable, ImgprocError
from .launch import mpiexec, running_cluster
from .local_engines import ENGINES, default_workers, get_engine
from .metrics import cores_used, median
from .report import (
    JOB_STAGES,
    headline,
    op_pipeline,
    recommendation,
    write_all,
    write_recommendation,
)
from .tiling import run_pipeline

EXPERIMENTS = ("strong", "weak", "tiles", "sizes")
FULL = {
    "ranks": "1,2,3,4",
    "engines": ",".join(ENGINES),
    "ops": ["grayscale", "gaussian_blur:ksize=9", "bilateral:d=9"],
    "size": "3000x3000",
    "weak_size": "1500x1500",
    "sizes": "500,1000,2000,4000",
    "tile": "256",
    "tiles": "64,128,256,512,1024,auto",
    "repeat": 3,
}
QUICK = {
    "ranks": "1,2,3",
    "engines": "sequential,threads",
    "ops": ["gaussian_blur:ksize=9", "bilateral:d=9"],
    "size": "1600x1600",
    "weak_size": "1000x1000",
    "sizes": "400,1600",
    "tile": "256",
    "tiles": "128,256,512,auto",
    "repeat": 2,
}
RECOMMEND = {"tiles": "0,64,128,256,512,1024,2048,auto", "in_flight": "1,2,4"}


class BenchError(ImgprocError):
    """A benchmark that cannot give a valid result (a failed job, an inexact output)."""

    code = "bench_error"


def log(message: str) -> None:
    """Progress goes to stderr; stdout keeps the summary."""
    print(message, file=sys.stderr, flush=True)


# -- what to measure -------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """``images`` noise images of ``height`` × ``width`` BGR pixels."""

    height: int
    width: int
    images: int = 1

    @property
    def megapixels(self) -> float:
        return self.height * self.width * self.images / 1e6


@dataclass(frozen=True)
class Case:
    """One measurement on a cluster: an experiment's op, workload and tile size."""

    experiment: str
    op: str
    workload: Workload
    tile: int | str


@dataclass(frozen=True)
class ClusterSpec:
    """How a cluster is started: engine, ranks and (if set) tasks in flight per worker."""

    engine: str
    ranks: int
    in_flight: int | None = None

    def args(self) -> list[str]:
        """Extra server arguments."""
        extra = ["--engine", self.engine]
        return extra + (["--in-flight", str(self.in_flight)] if self.in_flight else [])


@dataclass
class Settings:
    """Everything one bench run needs, from the command line."""

    out: Path
    ranks: list[int]
    engines: list[str]
    ops: list[str]
    size: Workload
    weak_size: Workload
    sizes: list[Workload]
    tile: int | str
    tiles: list[int | str]
    repeat: int
    experiments: list[str]
    in_flight: list[int] = field(default_factory=list)
    seed: int = 12345
    timeout: float = 300.0
    command: str = ""
    notes: list[str] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)


def sweep_ranks(ranks: Sequence[int], cores: int) -> int:
    """Ranks for the tile and size sweeps: the most worker ranks that do not outnumber cores."""
    fitting = [k for k in ranks if k - 1 <= cores]
    return max(fitting) if fitting else min(ranks)


def weak_workload(base: Workload, ranks: int) -> Workload:
    """One ``base`` image per worker rank (rank 0 alone counts as one worker)."""
    return Workload(base.height, base.width, max(1, ranks - 1))


def plan_cases(s: Settings, cores: int) -> dict[ClusterSpec, list[Case]]:
    """Cases per cluster, so that each cluster is started once for all of its cases."""
    plan: dict[ClusterSpec, list[Case]] = {}
    sweep = sweep_ranks(s.ranks, cores)
    for engine in s.engines:
        for k in s.ranks:
            cases = plan.setdefault(ClusterSpec(engine, k), [])
            for op in s.ops:
                cases.extend(_cases_for(s, op, k, sweep))
    return {spec: cases for spec, cases in plan.items() if cases}


def _cases_for(s: Settings, op: str, ranks: int, sweep: int) -> list[Case]:
    cases = []
    if "strong" in s.experiments:
        cases.append(Case("strong", op, s.size, s.tile))
    if "weak" in s.experiments:
        cases.append(Case("weak", op, weak_workload(s.weak_size, ranks), s.tile))
    if ranks == sweep and "tiles" in s.experiments:
        cases.extend(Case("tiles", op, s.size, t) for t in s.tiles)
    if ranks == sweep and "sizes" in s.experiments:
        cases.extend(Case("sizes", op, w, s.tile) for w in s.sizes)
    return cases


# -- inputs and the single-process reference -----------------------------------------------


class Inputs:
    """Deterministic noise images per workload, and the reference outputs per op."""

    def __init__(self, seed: int):
        self.seed = seed
        self._images: dict[Workload, list[np.ndarray]] = {}
        self.expected: dict[tuple[str, Workload], list[np.ndarray]] = {}

    def images(self, work: Workload) -> list[np.ndarray]:
        """The workload's images (made once; the same arrays for every engine)."""
        if work not in self._images:
            rng = np.random.default_rng([self.seed, work.height, work.width, work.images])
            shape = (work.height, work.width, 3)
            self._images[work] = [rng.integers(0, 256, shape, np.uint8) for _ in range(work.images)]
        return self._images[work]


def _plain_opencv(op: str) -> Callable[[np.ndarray], np.ndarray] | None:
    """The bare OpenCV call for a one-op pipeline, or None where there is no single call."""
    steps = op_pipeline(op).steps
    if len(steps) != 1:
        return None
    name, p = steps[0].op.name, steps[0].params
    calls: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "grayscale": lambda im: cv2.cvtColor(im, cv2.COLOR_BGR2GRAY),
        "gaussian_blur": lambda im: cv2.GaussianBlur(im, (p["ksize"],) * 2, p.get("sigma") or 0),
        "median_blur": lambda im: cv2.medianBlur(im, p["ksize"]),
        "bilateral": lambda im: cv2.bilateralFilter(im, p["d"], p["sigma_color"], p["sigma_space"]),
        "box_blur": lambda im: cv2.blur(im, (p["ksize"],) * 2),
    }
    return calls.get(name)


def reference_runners(op: str, images: list[np.ndarray]) -> dict[str, Callable[[], list]]:
    """The single-process loops for ``op``: ``sequential`` engine, and ``opencv`` if it maps."""
    pipeline = op_pipeline(op)
    engine = get_engine("sequential")
    runners = {"sequential": lambda: [run_pipeline(pipeline, im, engine, 0) for im in images]}
    plain = _plain_opencv(op)
    if plain is not None:
        runners["opencv"] = lambda: _opencv_loop(plain, images)
    return runners


def _opencv_loop(call: Callable[[np.ndarray], np.ndarray], images: list[np.ndarray]) -> list:
    """OpenCV as shipped: the package's ops switch IPP off per thread, so switch it back on."""
    cv2.ipp.setUseIPP(True)
    return [call(im) for im in images]


def measure_references(
    pairs: Iterable[tuple[str, Workload]], inputs: Inputs, repeat: int
) -> list[dict[str, Any]]:
    """Time the references of every (op, workload), interleaved; keep the sequential outputs."""
    cv2.setNumThreads(1)
    runners = {}
    for op, work in sorted(set(pairs), key=lambda p: (p[0], p[1].megapixels)):
        for name, run in reference_runners(op, inputs.images(work)).items():
            runners[(op, work, name)] = run
        inputs.expected[(op, work)] = runners[(op, work, "sequential")]()  # also a warm-up
    rows = []
    for rnd in range(repeat + 1):  # round 0 warms caches and is not recorded
        for (op, work, name), run in runners.items():
            started = time.perf_counter()
            run()
            seconds = time.perf_counter() - started
            if rnd:
                rows.append(reference_row(name, op, work, rnd, seconds))
        log(f"references: round {rnd} of {repeat} done")
    return rows


def reference_row(name: str, op: str, work: Workload, rnd: int, seconds: float) -> dict:
    """A sample of a single-process reference loop (one core)."""
    row = _row_base("reference", "reference", name, op, work, 0, rnd, seconds)
    row.update(ranks=0, workers=1, workers_per_rank=1, engine_workers=1, cores_used=1)
    row.update(oversubscribed=False, exact=True)
    return row


def _row_base(
    kind: str, experiment: str, engine: str, op: str, work: Workload, tile: Any, rnd: int, s: float
) -> dict[str, Any]:
    return {
        "kind": kind,
        "experiment": experiment,
        "engine": engine,
        "op": op,
        "tile": str(tile),
        "height": work.height,
        "width": work.width,
        "images": work.images,
        "megapixels": round(work.megapixels, 6),
        "round": rnd,
        "wall_s": round(s, 6),
    }


# -- clusters ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClusterShape:
    """What a started cluster really has: workers, engine workers, cores it can use."""

    workers: int
    workers_per_rank: int
    engine_workers: int
    cores_used: int
    oversubscribed: bool

    @classmethod
    def from_info(cls, info: dict[str, Any], available: int) -> ClusterShape:
        """From the server's ``info`` reply (its engines' real worker counts).

        Alone (``-n 1``), rank 0 runs one task at a time with its engine, so one engine
        worker is all it uses, whatever the engine has.
        """
        engine_workers = sum(int(e.get("workers", 1)) for e in info.get("engines") or [])
        engine_workers = 1 if int(info["ranks"]) == 1 else engine_workers or int(info["workers"])
        return cls(
            int(info["workers"]),
            int(info["workers_per_rank"]),
            engine_workers,
            cores_used(engine_workers, available),
            engine_workers > available,
        )


def run_job(client: Client, case: Case, images: list[np.ndarray], timeout: float) -> tuple:
    """Submit one case's images as raw pixels; (client wall seconds, the job's result)."""
    started = time.perf_counter()
    job = client.submit(images, op_pipeline(case.op), tile=case.tile)
    result = job.result(timeout=timeout)
    return time.perf_counter() - started, result


def check_result(case: Case, result: JobResult, expected: list[np.ndarray]) -> None:
    """Raise BenchError unless the job succeeded with outputs equal to the reference."""
    if not result.ok:
        errors = dict.fromkeys(f"{code}: {message}" for code, message in result.errors.values())
        why = "; ".join(errors)  # each distinct error once, in order
        raise BenchError(f"job {result.state}: {why or result.message}")
    if not all(np.array_equal(a, b) for a, b in zip(result.images, expected)):
        raise BenchError("the output differs from the sequential reference")


def cluster_row(
    spec: ClusterSpec, shape: ClusterShape, case: Case, rnd: int, wall: float, stats: dict
) -> dict[str, Any]:
    """A sample of a cluster case, with the job's own stage and per-rank stats."""
    ranks = list(stats.get("ranks", {}).values())
    busy = [r.get("busy_s", 0.0) for r in ranks] or [0.0]
    work = case.workload
    row = _row_base("cluster", case.experiment, spec.engine, case.op, work, case.tile, rnd, wall)
    row.update(
        ranks=spec.ranks,
        workers=shape.workers,
        workers_per_rank=shape.workers_per_rank,
        engine_workers=shape.engine_workers,
        cores_used=shape.cores_used,
        oversubscribed=shape.oversubscribed,
        in_flight=spec.in_flight or "",
        **{f"{stage}_s": stats.get(stage) for stage in JOB_STAGES},
        server_total_s=stats.get("total"),
        tasks=sum(int(r.get("tiles", 0)) for r in ranks),
        bytes_moved=sum(int(r.get("bytes", 0)) for r in ranks),
        busy_max_s=round(max(busy), 6),
        busy_mean_s=round(sum(busy) / shape.workers, 6),
        maxrss_mb=max((r.get("maxrss_mb", 0.0) for r in ranks), default=0.0),
        exact=True,
    )
    return row


def measure_cluster(
    spec: ClusterSpec, cases: list[Case], inputs: Inputs, s: Settings
) -> tuple[list[dict], dict]:
    """Start one cluster, warm every case up once (checked), then time ``repeat`` rounds.

    A case whose job fails or is not exact is dropped from later rounds and reported in the
    notes, so one broken engine or size does not cost the rest of a long sweep.
    """
    log(f"cluster: mpiexec -n {spec.ranks}, engine {spec.engine}, {len(cases)} cases")
    with running_cluster(spec.ranks, *spec.args()) as cluster:
        with Client(cluster.address, timeout=60.0) as client:
            info = client.info()
            shape = ClusterShape.from_info(info, default_workers())
            rows: list[dict] = []
            for rnd in range(s.repeat + 1):  # round 0: warm-up, checked but not recorded
                for case in list(cases):
                    try:
                        wall, stats = measure_case(client, case, inputs, s.timeout)
                    except (BenchError, ServerError, ServerTimeout) as exc:
                        cases.remove(case)
                        record_failure(s, spec, describe_case(spec, case), exc)
                        continue
                    if rnd:
                        rows.append(cluster_row(spec, shape, case, rnd, wall, stats))
                        info["_last_job_stats"] = stats
    return rows, info


def record_failure(s: Settings, spec: ClusterSpec, what: str, exc: BaseException) -> None:
    """Keep a failed case (or cluster) for the report, and say so now."""
    cluster = f"-n {spec.ranks} {spec.engine}"
    s.failures.append({"cluster": cluster, "case": what, "error": str(exc)})
    log(f"failed, not measured: {what}: {exc}")


def measure_case(client: Client, case: Case, inputs: Inputs, timeout: float) -> tuple:
    """One checked job: (client wall seconds, the job's stats)."""
    wall, result = run_job(client, case, inputs.images(case.workload), timeout)
    check_result(case, result, inputs.expected[(case.op, case.workload)])
    return wall, result.stats


def describe_case(spec: ClusterSpec, case: Case) -> str:
    """``-n 3 threads, strong bilateral:d=9 on 1× 3000x3000, tile 256`` for notes and logs."""
    w = case.workload
    return (
        f"-n {spec.ranks} {spec.engine}, {case.experiment} {case.op} on {w.images}× "
        f"{_size_text(w)}, tile {case.tile}"
    )


# -- the machine --------------------------------------------------------------------------------


def parallel_capacity(cores: int, rounds: int = 3) -> float:
    """Cores' worth of CPU this machine gives right now.

    ``cores`` threads run the same OpenCV work at once (OpenCV releases the GIL) against one
    thread alone; the ratio is ``cores`` on an idle machine and less when other work shares
    it.  Every speedup of the run is capped near this number, so the report states it.
    """
    cv2.setNumThreads(1)
    image = np.random.default_rng(0).integers(0, 256, (500, 500, 3), np.uint8)

    def work(_: int = 0) -> None:
        for _ in range(20):
            cv2.GaussianBlur(image, (9, 9), 0)

    ratios = []
    with ThreadPoolExecutor(cores) as pool:
        for _ in range(rounds):
            one = _seconds(work)
            many = _seconds(lambda: list(pool.map(work, range(cores))))
            ratios.append(cores * one / many)
    return round(median(ratios), 2)


def _seconds(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def gpu_status() -> tuple[bool, str]:
    """Whether the ``gpu`` engine can run here, and a line saying what was found."""
    try:
        engine = get_engine("gpu", 1)
    except (EngineUnavailable, ImportError) as exc:
        return False, f"none usable ({exc})"
    try:
        return True, str(engine.describe())
    finally:
        engine.close()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mpiexec_version() -> str:
    try:
        out = subprocess.run(
            [mpiexec(), "--version"], capture_output=True, text=True, timeout=20
        ).stdout
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    version = fields.get("    Version", fields.get("Version", "")).strip()
    return f"{out.splitlines()[0].strip()} {version}".strip() if out else "unknown"


def machine_info(server_info: dict[str, Any] | None, gpu: str) -> dict[str, Any]:
    """Cores, CPU, memory, MPI and library versions: what a reader needs to compare runs."""
    import psutil

    versions = (server_info or {}).get("versions", {})
    return {
        "cpu_count": os.cpu_count(),
        "usable_cores": default_workers(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "mpi_library": " ".join(versions.get("mpi", "unknown").split()),
        "mpiexec": _mpiexec_version(),
        "gpu": gpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


# -- the whole run ------------------------------------------------------------------------------


def usable_engines(names: Sequence[str], notes: list[str]) -> tuple[list[str], str]:
    """The engines that can run here (``gpu`` only with a device), and the GPU line."""
    has_gpu, gpu = gpu_status()
    if "gpu" in names and not has_gpu:
        notes.append(f"gpu engine not measured: {gpu}")
        names = [n for n in names if n != "gpu"]
    return list(names), gpu


def run_bench(s: Settings) -> dict[str, Any]:
    """Measure everything in ``s``; return settings, machine and every sample."""
    started = time.perf_counter()
    s.engines, gpu = usable_engines(s.engines, s.notes)
    load_start = os.getloadavg()[0]
    capacity_start = parallel_capacity(default_workers())
    plan = plan_cases(s, default_workers())
    inputs = Inputs(s.seed)
    pairs = [(c.op, c.workload) for cases in plan.values() for c in cases]
    samples = measure_references(pairs, inputs, s.repeat)
    info = None
    job_stats, most_ranks = None, 0
    for spec, cases in plan.items():
        try:
            rows, info = measure_cluster(spec, cases, inputs, s)
        except RuntimeError as exc:  # the server did not start: say so, measure the rest
            record_failure(s, spec, f"-n {spec.ranks} {spec.engine}, every case", exc)
            continue
        samples.extend(rows)
        last = info.pop("_last_job_stats", None)
        if last and spec.ranks >= most_ranks:  # the largest cluster's last job, for its plots
            job_stats, most_ranks = last, spec.ranks
    machine = machine_info(info, gpu)
    machine["load_average_at_start"] = round(load_start, 2)
    machine["parallel_capacity"] = [capacity_start, parallel_capacity(default_workers())]
    return {
        "command": s.command,
        "settings": settings_json(s),
        "machine": machine,
        "seconds": round(time.perf_counter() - started, 1),
        "samples": samples,
        "notes": s.notes,
        "failures": s.failures,
        "job_stats": job_stats,
    }


def settings_json(s: Settings) -> dict[str, Any]:
    """The settings as JSON (sizes as ``WxH``)."""
    return {
        "ranks": s.ranks,
        "engines": s.engines,
        "ops": s.ops,
        "size": _size_text(s.size),
        "weak_size_per_worker": _size_text(s.weak_size),
        "sizes": [_size_text(w) for w in s.sizes],
        "tile": s.tile,
        "tiles": s.tiles,
        "in_flight": s.in_flight,
        "repeat": s.repeat,
        "experiments": s.experiments,
        "seed": s.seed,
        "available_cores": default_workers(),
    }


# -- recommend --------------------------------------------------------------------------------


def run_recommend(s: Settings) -> dict[str, Any]:
    """Measure tile sizes × tiles in flight for one op and size; fit and apply the tile model."""
    op, engine, ranks = s.ops[0], s.engines[0], max(s.ranks)
    inputs = Inputs(s.seed)
    samples = measure_references([(op, s.size)], inputs, s.repeat)
    info: dict[str, Any] = {}
    cases = [Case("recommend", op, s.size, t) for t in s.tiles]
    for flight in s.in_flight:
        rows, info = measure_cluster(ClusterSpec(engine, ranks, flight), cases, inputs, s)
        samples.extend(rows)
    shape = ClusterShape.from_info(info, default_workers())
    size = s.size
    return {
        "command": s.command,
        "settings": settings_json(s),
        "machine": machine_info(info, gpu_status()[1]),
        "samples": samples,
        "recommendation": recommendation(
            samples, op, size.height, size.width, shape.engine_workers, default_workers()
        ),
    }


# -- the command line -----------------------------------------------------------------------


def parse_size(text: str) -> Workload:
    """``N`` (square) or ``WxH``: width first, as image sizes are usually written."""
    w, _, h = text.lower().partition("x")
    try:
        width, height = int(w), int(h or w)
    except ValueError:
        raise ImgprocError(f"size must be N or WxH (width x height), got {text!r}") from None
    if height < 1 or width < 1:
        raise ImgprocError(f"size must be positive, got {text!r}")
    return Workload(height, width)


def parse_tile(text: str) -> int | str:
    """A tile size: a non-negative integer or ``auto``."""
    if text == "auto":
        return text
    if not text.isdigit():
        raise ImgprocError(f"tile must be a non-negative integer or auto, got {text!r}")
    return int(text)


def parse_list(text: str, item: Callable[[str], Any]) -> list[Any]:
    """A comma-separated list."""
    return [item(part.strip()) for part in text.split(",") if part.strip()]


def add_bench_command(sub: argparse._SubParsersAction) -> None:
    """Register ``mpi-imgproc bench``."""
    p = sub.add_parser("bench", help="scaling experiments: speedup, efficiency, plots, report")
    p.add_argument("--quick", action="store_true", help="a small sweep, under a minute")
    p.add_argument("--recommend", action="store_true", help="measure and pick tile / in-flight")
    p.add_argument("--out", default="bench-out", metavar="DIR", help="output folder")
    p.add_argument("--ranks", help="mpiexec -n values (full: 1,2,3,4; --recommend: one)")
    p.add_argument("--engines", help="engines (default: all usable; --recommend: threads)")
    p.add_argument("--op", action="append", metavar="SPEC", help="op (a+b chains); repeatable")
    p.add_argument("--size", help="image WxH for strong scaling, tiles and --recommend")
    p.add_argument("--weak-size", help="image WxH per worker rank for weak scaling")
    p.add_argument("--sizes", help="image sizes for the size sweep, comma-separated")
    p.add_argument("--tile", help="tile size for strong, weak and sizes (int or auto)")
    p.add_argument("--tiles", help="tile sizes for the tile sweep (ints and auto)")
    p.add_argument("--in-flight", help="--recommend: tasks in flight per worker to try")
    p.add_argument("--repeat", type=int, help="timed rounds per case (median reported)")
    p.add_argument("--experiments", default=",".join(EXPERIMENTS), help="which experiments")
    p.add_argument("--seed", type=int, default=12345, help="seed of the generated images")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds allowed per job")
    nodes = p.add_argument_group("across simulated nodes (root: network namespaces)")
    nodes.add_argument("--nodes", type=int, metavar="K", help="scale over 1..K worker nodes")
    nodes.add_argument(
        "--link", default="1gbit,10gbit", help="link rates to shape every node's link to"
    )
    nodes.add_argument("--ranks-per-node", type=int, default=1, help="worker ranks per node")
    nodes.add_argument(
        "--batch-images", type=int, default=2000, help="JPEGs for the batch workload (0: none)"
    )
    p.set_defaults(func=cmd_bench)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Settings from the command line; ``--quick`` and ``--recommend`` change the defaults."""
    base: dict[str, Any] = dict(QUICK if args.quick else FULL)
    if args.recommend:  # one cluster with as many worker ranks as cores
        base.update(RECOMMEND, engines="threads", ranks=str(default_workers() + 1))

    def pick(name: str) -> Any:
        given = getattr(args, name)
        return base[name] if given is None else given

    settings = Settings(
        out=Path(args.out),
        ranks=parse_list(pick("ranks"), int),
        engines=parse_list(pick("engines"), str),
        ops=args.op or base["ops"],
        size=parse_size(pick("size")),
        weak_size=parse_size(pick("weak_size")),
        sizes=parse_list(pick("sizes"), parse_size),
        tile=parse_tile(pick("tile")),
        tiles=parse_list(pick("tiles"), parse_tile),
        repeat=pick("repeat"),
        experiments=parse_list(args.experiments, str),
        in_flight=parse_list(args.in_flight or base.get("in_flight", ""), int),
        seed=args.seed,
        timeout=args.timeout,
    )
    check_settings(settings)
    settings.command = reproduce_command(settings, args.recommend)
    return settings


def reproduce_command(s: Settings, recommend: bool) -> str:
    """The command with every setting spelled out, so that defaults changing later do not
    change what it measures."""
    words = ["mpi-imgproc", "bench", *(["--recommend"] if recommend else [])]
    words += ["--ranks", ",".join(map(str, s.ranks)), "--engines", ",".join(s.engines)]
    for op in s.ops:
        words += ["--op", op]
    words += ["--size", _size_text(s.size)]
    if recommend:
        words += ["--tiles", ",".join(map(str, s.tiles))]
        words += ["--in-flight", ",".join(map(str, s.in_flight))]
    else:
        words += ["--weak-size", _size_text(s.weak_size), "--tile", str(s.tile)]
        words += ["--sizes", ",".join(map(_size_text, s.sizes))]
        words += ["--tiles", ",".join(map(str, s.tiles)), "--experiments", ",".join(s.experiments)]
    words += ["--repeat", str(s.repeat), "--seed", str(s.seed), "--out", str(s.out)]
    return shlex.join(words)


def _size_text(w: Workload) -> str:
    """``WxH``, as ``parse_size`` reads it."""
    return f"{w.width}x{w.height}"


def check_settings(s: Settings) -> None:
    """Refuse settings that cannot run, naming the option."""
    if not s.ranks or min(s.ranks) < 1:
        raise ImgprocError("--ranks: give positive mpiexec -n values, e.g. 1,2,3")
    unknown = set(s.engines) - set(ENGINES)
    if unknown or not s.engines:
        raise ImgprocError(f"--engines: unknown {sorted(unknown)}; known: {', '.join(ENGINES)}")
    if set(s.experiments) - set(EXPERIMENTS) or not s.experiments:
        raise ImgprocError(f"--experiments: choose from {', '.join(EXPERIMENTS)}")
    if s.repeat < 1:
        raise ImgprocError("--repeat must be at least 1")
    for op in s.ops:
        op_pipeline(op)  # raises with the op and parameter named


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the sweep (or ``--recommend``, or ``--nodes``), write the files, print where."""
    if args.nodes is not None:
        from .bench_nodes import cmd_node_bench  # it builds on this module

        return cmd_node_bench(args)
    s = settings_from_args(args)
    s.out.mkdir(parents=True, exist_ok=True)
    if args.recommend:
        print(write_recommendation(run_recommend(s), s.out))
        return 0
    result = run_bench(s)
    written = write_all(result, s.out)
    print(headline(result))
    print(f"wrote {', '.join(str(p) for p in written)} in {result['seconds']:.0f} s")
    return 0

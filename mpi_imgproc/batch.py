"""HPC batch mode: ``mpiexec -n N python -m mpi_imgproc.batch --input DIR --output DIR --op ...``.

The same scheduler and workers as the server, over a folder (or glob) instead of a socket: no
ZeroMQ, nothing to connect to, made for ``sbatch``.  Every good image is written (atomically:
a temporary file, then a rename), every bad one is reported, and a summary JSON records each
image's status, error and timing.

* ``--shared-fs``: workers read their inputs and write their outputs themselves, so no pixels
  pass through rank 0 (large images that are tiled are still read and written by rank 0).
* ``--resume``: images whose output already exists are skipped — atomic writes mean an existing
  output is a complete one.
* SIGTERM (Slurm's ``scancel`` or time limit): no new work is handed out, images in flight are
  finished or dropped (never a partial file), the summary is written, and every rank exits
  within 20 s; ``--resume`` completes the rest later.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mpi4py import MPI

from .cli import add_pipeline_options, output_paths, pipeline_from_args
from .errors import ImgprocError, describe
from .imageio import FORMATS, expand_inputs, write_atomic
from .mpi_transport import Backoff, run_or_abort
from .planner import ImageSource
from .scheduler import ImageResult, ImageWork, Job, JobListener, Scheduler, output_format
from .server import add_cluster_options, make_backend, run_worker

Work = tuple[list[str], list[str], list[Path], list[tuple[str, Path]]]
DRAIN_SECONDS = 12.0  # after SIGTERM: time for images in flight to finish
STOP_SECONDS = 6.0  # then: time for the workers to leave


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The batch command line (``--op``, ``--format`` and ``--tile`` as in ``run``)."""
    parser = argparse.ArgumentParser(
        prog="mpiexec -n N python -m mpi_imgproc.batch",
        description="Process a folder of images on every rank of an MPI job (no server).",
    )
    parser.add_argument(
        "--input", action="append", required=True, help="folder or glob (repeatable)"
    )
    parser.add_argument("--output", required=True, help="output folder")
    add_pipeline_options(parser)
    parser.add_argument("--format", choices=FORMATS, default="same", help="output format")
    parser.add_argument("--shared-fs", action="store_true", help="workers do their own I/O")
    parser.add_argument("--resume", action="store_true", help="skip images already written")
    parser.add_argument("--summary", help="summary JSON (default OUTPUT/batch-summary.json)")
    add_cluster_options(parser)
    return parser.parse_args(argv)


class BatchRecorder(JobListener):
    """Writes results that come back to rank 0 and records every image's outcome."""

    def __init__(self, targets: list[Path], fmt: str):
        self.targets = targets
        self.format = fmt
        self.records: dict[int, dict[str, Any]] = {}
        self.finished_job = False

    def _record(self, image: ImageWork, status: str, **fields: Any) -> None:
        self.records[image.index] = {
            "status": status,
            "path": image.path,
            "reason": image.plan.reason if image.plan else None,
            "tiles": image.tiles_used,
            "seconds": round(time.perf_counter() - image.started_at, 6),
            **fields,
        }

    def image_done(self, job: Job, image: ImageWork, result: ImageResult) -> bool:
        target = self.targets[image.index]
        try:
            if result.written is None:
                data = result.encoded_as(output_format(self.format, image.name))
                write_atomic(target, data)  # no copy: the encoded buffer is written as it is
        except Exception as exc:  # noqa: BLE001 - an unwritable output fails that image only
            self._record(image, "failed", error=describe(exc))
            return False
        self._record(image, "ok")
        return True

    def image_failed(self, job: Job, image: ImageWork, code: str, message: str) -> None:
        self._record(image, "failed", error=message, code=code)

    def finished(self, job: Job) -> None:
        self.finished_job = True


def make_job(args: argparse.Namespace, files: list[str], targets: list[Path]) -> Job:
    """One job over every file still to do; workers get paths with ``--shared-fs``."""
    recorder = BatchRecorder(targets, args.format)
    job = Job("batch", pipeline_from_args(args), args.tile, recorder, output=args.format)
    job.shared_fs = args.shared_fs
    job.targets = lambda image: str(targets[image.index])
    job.images = [ImageWork(job, i, ImageSource(f, path=f)) for i, f in enumerate(files)]
    return job


class Interrupted:
    """Set by SIGTERM/SIGINT."""

    def __init__(self) -> None:
        self.flag = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._set)

    def _set(self, signum: int, frame: Any) -> None:
        self.flag = True


def drive(scheduler: Scheduler, job: Job, stop: Interrupted) -> bool:
    """Run the job to its end, or until interrupted and drained; True if interrupted."""
    backoff = Backoff(ceiling=0.005)
    recorder = job.listener
    assert isinstance(recorder, BatchRecorder)
    drain_until = None
    while not recorder.finished_job:
        if stop.flag and drain_until is None:
            scheduler.hold = True  # hand out nothing more; let what is in flight finish
            drain_until = time.monotonic() + DRAIN_SECONDS
        if drain_until is not None and (not scheduler.running or time.monotonic() > drain_until):
            scheduler.cancel(job, "interrupted (SIGTERM)")
            return True
        if scheduler.step():
            backoff.reset()
        else:
            backoff.sleep()
    return False


def summarise(
    args: argparse.Namespace,
    files: list[str],
    targets: list[Path],
    skipped: list[str],
    recorder: BatchRecorder,
    elapsed: float,
    interrupted: bool,
) -> dict[str, Any]:
    """The summary JSON: totals, images/s and one record per image."""
    images = [{"input": f, "output": str(t), "status": "skipped"} for f, t in skipped]
    for i, (source, target) in enumerate(zip(files, targets)):
        record = recorder.records.get(i, {"status": "not_done"})
        images.append({"input": source, "output": str(target), **record})
    counts = {
        s: sum(1 for r in images if r["status"] == s)
        for s in ("ok", "failed", "skipped", "not_done")
    }
    return {
        "command": " ".join(sys.argv),
        "ranks": MPI.COMM_WORLD.Get_size(),
        "interrupted": interrupted,
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(counts["ok"] / elapsed, 3) if elapsed > 0 else None,
        **counts,
        "total": len(images),
        "images": images,
    }


def list_work(args: argparse.Namespace) -> Work:
    """The input files, those still to do with their outputs, and those skipped (``--resume``).

    Raises ImgprocError when nothing matches or two inputs would write the same output.
    """
    all_files = expand_inputs(args.input)
    if not all_files:
        raise ImgprocError(f"no input files in {', '.join(args.input)}")
    all_targets = output_paths(all_files, args.output, args.format)
    skipped = [(f, t) for f, t in zip(all_files, all_targets) if args.resume and t.exists()]
    done = {f for f, _ in skipped}
    todo = [(f, t) for f, t in zip(all_files, all_targets) if f not in done]
    return all_files, [f for f, _ in todo], [t for _, t in todo], skipped


def run_rank0(comm: MPI.Comm, args: argparse.Namespace, work: Work) -> int:
    """List the work, run it over the workers, write the summary; exit code 1 if not all ok."""
    stop = Interrupted()
    backend, per_rank, _, _ = make_backend(comm, args)
    all_files, files, targets, skipped = work
    scheduler = Scheduler(backend, cutover_s=args.cutover_ms / 1e3)
    job = make_job(args, files, targets)
    print(
        f"batch: {len(all_files)} images ({len(skipped)} already done), "
        f"{comm.Get_size()} ranks, engine {args.engine} x{per_rank}",
        flush=True,
    )
    started = time.perf_counter()
    interrupted = False
    try:
        if files:
            scheduler.add(job)
            interrupted = drive(scheduler, job, stop)
    finally:
        backend.close(deadline=time.perf_counter() + STOP_SECONDS)
    elapsed = time.perf_counter() - started
    assert isinstance(job.listener, BatchRecorder)
    summary = summarise(args, files, targets, skipped, job.listener, elapsed, interrupted)
    path = Path(args.summary or Path(args.output) / "batch-summary.json")
    write_atomic(path, json.dumps(summary, indent=2).encode())
    for record in summary["images"]:
        if record["status"] == "failed":
            print(f"error: {record['input']}: {record['error']}", file=sys.stderr)
    print(
        f"batch: {summary['ok']} ok, {summary['failed']} failed, {summary['skipped']} skipped, "
        f"{summary['not_done']} not done in {elapsed:.2f} s "
        f"({summary['images_per_s']} images/s); summary: {path}",
        flush=True,
    )
    return 0 if summary["failed"] == 0 and summary["not_done"] == 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of every rank; any unhandled error aborts the whole MPI job."""
    comm = MPI.COMM_WORLD

    def body() -> int:
        args = parse_args(argv)
        work, error = None, None
        try:
            pipeline_from_args(args)
            if comm.Get_rank() == 0:
                work = list_work(args)
        except ImgprocError as exc:
            error = str(exc)
        errors = [e for e in comm.allgather(error) if e]  # a mistake ends every rank cleanly
        if errors:
            if comm.Get_rank() == 0:
                print(f"error: {errors[0]}", file=sys.stderr, flush=True)
            return 2
        if comm.Get_rank() == 0:
            return run_rank0(comm, args, work)
        run_worker(comm, args)
        return 0

    return run_or_abort(comm, body)


if __name__ == "__main__":
    sys.exit(main())

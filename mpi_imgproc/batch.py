"""HPC batch mode: ``mpiexec -n N python -m mpi_imgproc.batch --input DIR --output DIR --op ...``.

The same scheduler and workers as the server, over a folder (or glob) instead of a socket: no
ZeroMQ, nothing to connect to, made for ``sbatch``.  Every good image is written (atomically:
a temporary file, then a rename), every bad one is reported, and a summary JSON records each
image's status, error and timing.

* ``--shared-fs``: workers read their inputs and write their outputs themselves, so no pixels
  pass through rank 0 (large images that are tiled are still read and written by rank 0).
* ``--resume``: images whose output was written by an earlier run of the same pipeline and
  format are skipped — atomic writes mean an existing output is a complete one.  Each output's
  stamp (pipeline and format, and the sizes and times of its input and of itself) is kept in
  ``OUTPUT/batch-manifest.json``; an output without a matching stamp is computed again.
* SIGTERM (Slurm's ``scancel`` or time limit): no new work is handed out, images in flight are
  finished or dropped (never a partial file), the summary is written, and every rank exits
  within 20 s; ``--resume`` completes the rest later.
* Exit codes: 0 every image written, 1 finished but some inputs are bad, 2 a bad command line
  or input list, or the summary could not be written, 3 not finished (interrupted): run the
  same command again with ``--resume``.
* The summary keeps the earlier runs' summaries in ``previous_runs``, and lists the folder
  entries that are not images (``ignored``) with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mpi4py import MPI

from .cli import add_pipeline_options, output_paths, pipeline_from_args, refuse_overwriting_inputs
from .errors import ImgprocError, describe
from .imageio import FORMATS, list_inputs, not_regular, write_atomic
from .launch_check import refuse_mismatched_launch
from .mpi_transport import Backoff, run_or_abort
from .pipeline import Pipeline
from .planner import ImageSource
from .scheduler import ImageResult, ImageWork, Job, JobListener, Scheduler, output_format
from .server import add_cluster_options, make_backend, run_worker

DRAIN_SECONDS = 12.0  # after SIGTERM: time for images in flight to finish
STOP_SECONDS = 6.0  # then: time for the workers to leave
MANIFEST = "batch-manifest.json"
EXIT_OK, EXIT_BAD_INPUTS, EXIT_USAGE, EXIT_NOT_FINISHED = 0, 1, 2, 3


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
    parser.add_argument(
        "--resume", action="store_true", help="skip outputs this pipeline has already written"
    )
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


def make_job(
    args: argparse.Namespace, pipeline: Pipeline, files: list[str], targets: list[Path]
) -> Job:
    """One job over every file still to do; workers get paths with ``--shared-fs``."""
    recorder = BatchRecorder(targets, args.format)
    job = Job("batch", pipeline, args.tile, recorder, output=args.format)
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


@dataclass
class Work:
    """What rank 0 found: the inputs to run with their outputs, and every other input or entry."""

    stamp: str  # of the pipeline and format: see ``pipeline_stamp``
    files: list[str] = field(default_factory=list)
    targets: list[Path] = field(default_factory=list)
    skipped: list[tuple[str, Path]] = field(default_factory=list)  # done earlier (--resume)
    refused: list[tuple[str, Path, str]] = field(default_factory=list)  # not regular files
    ignored: list[tuple[str, str]] = field(default_factory=list)  # folder entries not read
    redone: int = 0  # outputs that exist but lack this pipeline's stamp: computed again
    manifest: dict[str, Any] = field(default_factory=dict)  # output name -> its stamp

    @property
    def total(self) -> int:
        return len(self.files) + len(self.skipped) + len(self.refused)


def pipeline_stamp(pipeline: Pipeline, fmt: str) -> str:
    """A short hash of the pipeline (every parameter spelled out) and the output format."""
    text = json.dumps({"pipeline": pipeline.to_json(), "format": fmt}, sort_keys=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def file_id(path: str | Path) -> list[int] | None:
    """``[size, mtime_ns]`` of a file, or None if it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def output_stamp(stamp: str, source: str, target: Path) -> dict[str, Any]:
    """The manifest entry of an output just written from ``source``."""
    return {
        "stamp": stamp,
        "input": os.path.realpath(source),
        "input_file": file_id(source),
        "output_file": file_id(target),
    }


def load_manifest(output: str) -> dict[str, Any]:
    """``OUTPUT/batch-manifest.json``'s outputs (name -> stamp); empty if none or unreadable."""
    try:
        data = json.loads((Path(output) / MANIFEST).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        print(f"batch: ignoring the unreadable {MANIFEST}: {exc}", file=sys.stderr, flush=True)
        return {}
    outputs = data.get("outputs") if isinstance(data, dict) else None
    return outputs if isinstance(outputs, dict) else {}


def list_work(args: argparse.Namespace, stamp: str) -> Work:
    """The inputs, those still to do with their outputs, and those skipped or refused.

    With ``--resume`` an input is skipped only if the manifest says its output was written from
    it, unchanged since, by this pipeline and format.  Files that earlier runs wrote into the
    input folder (``--output`` = ``--input``) are outputs, not inputs.  Raises ImgprocError when
    nothing matches, two inputs would write the same output, or an output is an input.
    """
    work = Work(stamp, manifest=load_manifest(args.output))
    found, work.ignored = list_inputs(args.input)
    ours = {
        os.path.realpath(Path(args.output) / name): entry.get("output_file")
        for name, entry in work.manifest.items()
    }
    all_files = []
    for f in found:
        if os.path.realpath(f) in ours and ours[os.path.realpath(f)] == file_id(f):
            work.ignored.append((f, f"an output of an earlier run (in {MANIFEST})"))
        else:
            all_files.append(f)
    if not all_files:
        raise ImgprocError(f"no input files in {', '.join(args.input)}")
    all_targets = output_paths(all_files, args.output, args.format)
    refuse_overwriting_inputs(all_files, all_targets)
    for source, target in zip(all_files, all_targets):
        kind = not_regular(source)  # refused here: reading a FIFO would block
        if kind is not None:
            work.refused.append((source, target, f"cannot read: {kind}"))
        elif args.resume and work.manifest.get(target.name) == output_stamp(stamp, source, target):
            work.skipped.append((source, target))
        else:
            if args.resume and target.exists():
                work.redone += 1
            work.files.append(source)
            work.targets.append(target)
    return work


def summarise(
    args: argparse.Namespace,
    pipeline: Pipeline,
    work: Work,
    recorder: BatchRecorder,
    elapsed: float,
    interrupted: bool,
) -> dict[str, Any]:
    """The summary JSON: totals, images/s, one record per image and the entries not read."""
    images = [{"input": f, "output": str(t), "status": "skipped"} for f, t in work.skipped]
    images += [
        {"input": f, "output": str(t), "status": "failed", "error": why}
        for f, t, why in work.refused
    ]
    for i, (source, target) in enumerate(zip(work.files, work.targets)):
        record = recorder.records.get(i, {"status": "not_done"})
        images.append({"input": source, "output": str(target), **record})
    counts = {
        s: sum(1 for r in images if r["status"] == s)
        for s in ("ok", "failed", "skipped", "not_done")
    }
    return {
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - elapsed)),
        "ranks": MPI.COMM_WORLD.Get_size(),
        "pipeline": pipeline.to_json(),
        "format": args.format,
        "stamp": work.stamp,
        "interrupted": interrupted,
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(counts["ok"] / elapsed, 3) if elapsed > 0 else None,
        **counts,
        "total": len(images),
        "redone": work.redone,
        "ignored": [{"path": p, "reason": why} for p, why in work.ignored],
        "images": images,
    }


def exit_code(summary: dict[str, Any]) -> int:
    """0 all written; 1 finished, some inputs bad; 3 not finished (interrupted): run again."""
    if summary["not_done"]:
        return EXIT_NOT_FINISHED
    return EXIT_BAD_INPUTS if summary["failed"] else EXIT_OK


def with_history(summary: dict[str, Any], path: Path) -> dict[str, Any]:
    """The summary, with the summaries of earlier runs at ``path`` in ``previous_runs``.

    An earlier file that is not a summary is moved aside (``.unreadable``), never lost."""
    try:
        text = path.read_text()
    except OSError:
        return summary  # none yet (or unreadable: writing it will say so)
    try:
        old = json.loads(text)
    except ValueError:
        old = None
    if not isinstance(old, dict) or "images" not in old:
        aside = path.with_name(path.name + ".unreadable")
        with contextlib.suppress(OSError):
            path.replace(aside)
            print(f"batch: {path} was not a summary; moved to {aside}", file=sys.stderr)
        return summary
    earlier = old.pop("previous_runs", [])
    return {**summary, "previous_runs": [*earlier, old]}


def save_records(
    path: Path, summary: dict[str, Any], args: argparse.Namespace, work: Work
) -> str | None:
    """Write the manifest and the summary; None, or why one of them could not be written.

    The manifest goes first and each is tried whatever became of the other: the manifest is
    what a later ``--resume`` needs, the summary what a person reads."""
    manifest = dict(work.manifest)
    for record in summary["images"]:
        name = Path(record["output"]).name
        if record["status"] == "ok":
            manifest[name] = output_stamp(work.stamp, record["input"], Path(record["output"]))
        elif record["status"] != "skipped":
            manifest.pop(name, None)  # attempted and not written: an old stamp no longer holds
    writes = (
        (Path(args.output) / MANIFEST, {"version": 1, "outputs": manifest}),
        (path, with_history(summary, path)),
    )
    problems = []
    for target, data in writes:
        try:
            write_atomic(target, json.dumps(data, indent=2).encode())
        except OSError as exc:
            problems.append(f"cannot write {target}: {exc.strerror or exc}")
    return "; ".join(problems) or None


def run_rank0(comm: MPI.Comm, args: argparse.Namespace, pipeline: Pipeline, work: Work) -> int:
    """Run the work over the workers, report every failure, write the summary; the exit code."""
    stop = Interrupted()
    backend, per_rank, _, _ = make_backend(comm, args)
    scheduler = Scheduler(backend, cutover_s=args.cutover_ms / 1e3)
    scheduler.stream_min_bytes = int(args.stream_min_mb * 2**20)  # --shared-fs JPEG/PNG
    job = make_job(args, pipeline, work.files, work.targets)
    print(
        f"batch: {work.total} images ({len(work.skipped)} already done, {work.redone} outputs "
        f"to redo), {comm.Get_size()} ranks, engine {args.engine} x{per_rank}",
        flush=True,
    )
    if work.ignored:
        names = ", ".join(Path(p).name for p, _ in work.ignored[:5])
        more = f" and {len(work.ignored) - 5} more" if len(work.ignored) > 5 else ""
        print(f"batch: {len(work.ignored)} entries not read ({names}{more}): see the summary")
    started = time.perf_counter()
    interrupted = False
    try:
        if work.files:
            scheduler.add(job)
            interrupted = drive(scheduler, job, stop)
    finally:
        backend.close(deadline=time.perf_counter() + STOP_SECONDS)
    elapsed = time.perf_counter() - started
    assert isinstance(job.listener, BatchRecorder)
    summary = summarise(args, pipeline, work, job.listener, elapsed, interrupted)
    for record in summary["images"]:
        if record["status"] == "failed":
            print(f"error: {record['input']}: {record['error']}", file=sys.stderr)
    path = Path(args.summary or Path(args.output) / "batch-summary.json")
    problem = save_records(path, summary, args, work)
    if problem is not None:
        above = " (listed above)" if summary["failed"] else ""
        print(
            f"error: {problem}; {summary['ok']} ok, {summary['failed']} failed{above}, "
            f"{summary['not_done']} not done",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_USAGE
    print(
        f"batch: {summary['ok']} ok, {summary['failed']} failed, {summary['skipped']} skipped, "
        f"{summary['not_done']} not done in {elapsed:.2f} s "
        f"({summary['images_per_s']} images/s); summary: {path}",
        flush=True,
    )
    return exit_code(summary)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of every rank; any unhandled error aborts the whole MPI job.  A launcher
    whose processes each see a world of one (a mismatched MPI) ends them with exit 2."""
    if refuse_mismatched_launch("error"):
        return EXIT_USAGE
    comm = MPI.COMM_WORLD

    def body() -> int:
        args = parse_args(argv)
        pipeline, work, error = None, None, None
        try:
            pipeline = pipeline_from_args(args)
            if comm.Get_rank() == 0:
                work = list_work(args, pipeline_stamp(pipeline, args.format))
        except ImgprocError as exc:
            error = str(exc)
        errors = [e for e in comm.allgather(error) if e]  # a mistake ends every rank cleanly
        if errors:
            if comm.Get_rank() == 0:
                print(f"error: {errors[0]}", file=sys.stderr, flush=True)
            return EXIT_USAGE
        if comm.Get_rank() == 0:
            assert pipeline is not None and work is not None
            return run_rank0(comm, args, pipeline, work)
        run_worker(comm, args)
        return 0

    return run_or_abort(comm, body)


if __name__ == "__main__":
    sys.exit(main())

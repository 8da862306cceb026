"""Client commands of ``mpi-imgproc``: ``submit``, ``status``, ``cancel``, ``info``, ``keys``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .client import DEFAULT_ADDRESS, Client, Event, Job, MapItem, MapStream
from .errors import ImgprocError, describe
from .imageio import encode, expand_inputs, write_atomic
from .pipeline import Pipeline
from .protocol import MAX_IMAGES_PER_REQUEST, tile_arg


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """``--server ADDR`` and ``--curve-keys DIR`` for every client command."""
    parser.add_argument("--server", default=DEFAULT_ADDRESS, help="server address")
    parser.add_argument("--curve-keys", metavar="DIR", help="key folder from `mpi-imgproc keys`")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for replies")


def _client(args: argparse.Namespace) -> Client:
    return Client(args.server, curve_keys=args.curve_keys, timeout=args.timeout)


JOB_ENDS = ("cancelled", "failed")  # MapItem error codes for images a job ended without


def _print_json(data: dict) -> None:
    data = {k: v for k, v in data.items() if k not in ("v", "req", "type")}
    print(json.dumps(data, indent=2))


class SubmitReport:
    """What ``submit`` tells its user while it runs, as each thing happens.

    Lines for people go to stderr above the progress bar (``tqdm.write``): each job's id and
    token as it is accepted (so that ``status`` and ``cancel`` can be used beside it; not with
    ``--quiet``) and each image's error.  With ``--json`` every event is also one JSON line on
    stdout for scripts: ``accepted``, ``result``, ``image_error``, ``done`` and, last,
    ``summary``.
    """

    def __init__(self, json_lines: bool = False, quiet: bool = False):
        self.json_lines, self.quiet = json_lines, quiet
        self.unfinished: dict[str, str] = {}  # job id -> token, until its ``done``

    def accepted(self, job_id: str, token: str, inputs: Sequence[str]) -> None:
        """A job was accepted by the server."""
        self.unfinished[job_id] = token
        if not self.quiet:
            first = inputs[0] if inputs else ""
            self.say(f"accepted: job {job_id} token {token} ({len(inputs)} images from {first})")
        self.emit("accepted", job=job_id, token=token, inputs=list(inputs))

    def result(self, job_id: str, source: str, target: Path, path: str) -> None:
        """An output was written."""
        self.emit("result", job=job_id, input=source, output=str(target), path=path)

    def image_error(self, job_id: str | None, source: str, message: str) -> None:
        """An input failed (unreadable, refused, or its result could not be written)."""
        self.say(f"error: {source}: {message}")
        self.emit("image_error", job=job_id, input=source, message=message)

    def done(self, job_id: str, state: str, stats: dict[str, Any]) -> None:
        """A job ended."""
        self.unfinished.pop(job_id, None)
        self.emit("done", job=job_id, state=state, stats=stats)

    def say(self, line: str) -> None:
        """One line for people, on stderr, above the progress bar."""
        tqdm.write(line, file=sys.stderr)

    def emit(self, event: str, **fields: Any) -> None:
        """One JSON line on stdout with ``--json``."""
        if self.json_lines:
            tqdm.write(json.dumps({"event": event, **fields}), file=sys.stdout)
            sys.stdout.flush()


class BatchSubmission:
    """Streams many files to the server in a bounded window of jobs and writes results as
    they arrive, so memory stays flat whatever the number of files.  What happens is told
    to ``report`` as it happens."""

    def __init__(
        self,
        client: Client,
        args: argparse.Namespace,
        pipeline: Pipeline,
        report: SubmitReport | None = None,
    ):
        from .cli import output_paths

        self.client, self.args, self.pipeline = client, args, pipeline
        self.report = report or SubmitReport(quiet=args.quiet)
        self.files: list[str] = args.files
        self.targets = output_paths(self.files, args.output, args.format)
        self.failed: list[str] = []
        self.written = 0
        self.paths: dict[str, int] = {}
        self.stats: list[dict] = []
        self.jobs: dict[str, list[int]] = {}  # job id -> indices of its files
        self.stopped: str | None = None  # why no more chunks are submitted
        self.bar = tqdm(total=len(self.files), unit="img", disable=args.quiet, leave=False)

    def run(self) -> None:
        """Stream the files through ``Client.map`` and handle each image as it completes.

        A job that ends cancelled or failed (the server shutting down, say) stops further
        submissions; so does a server that stops answering.  Leaving early (Ctrl-C) cancels
        the jobs in flight.
        """
        stream = self.client.map(
            self.files,
            self.pipeline,
            window=max(1, self.args.window),
            chunk=max(1, self.args.chunk),
            tile=self.args.tile,
            result=self.args.format,
            timeout=self.args.timeout,
            on_submit=self._accepted,
        )
        try:
            with stream:
                for item in stream:
                    self._handle(item)
                    self._finished(stream)
        except ImgprocError as exc:  # refused, timed out, or the server is gone
            self.stopped = str(exc)
        finally:
            self._finished(stream)
            self.bar.close()

    def _accepted(self, job: Job, indices: list[int]) -> None:
        self.jobs[job.id] = indices
        self.report.accepted(job.id, job.token, [self.files[i] for i in indices])

    def _fail(self, index: int, message: str, job_id: str | None = None) -> None:
        self.failed.append(f"{self.files[index]}: {message}")
        self.report.image_error(job_id, self.files[index], message)
        self.bar.update(1)

    def _handle(self, item: MapItem) -> None:
        """One image's outcome: write it, or report why there is none."""
        if item.ok:
            assert item.event is not None
            path = item.event.header.get("path", "whole")
            self.paths[path] = self.paths.get(path, 0) + 1
            problem = self._write(item.index, item.event)
            if problem is None:
                target = self.targets[item.index]
                self.report.result(item.job, self.files[item.index], target, path)
                self.bar.update(1)
            else:
                self._fail(item.index, problem, item.job)
        elif item.error[0] not in JOB_ENDS:  # an image its job ended without: see stopped
            self._fail(item.index, item.error[1], item.job)

    def _finished(self, stream: MapStream) -> None:
        """Record the jobs that ended since last time; one that did not end done stops."""
        for header in stream.jobs[len(self.stats) :]:
            job_id, state, stats = header["job"], header["state"], header.get("stats", {})
            self.jobs.pop(job_id, None)
            self.stats.append({"job": job_id, "state": state, **stats})
            self.report.done(job_id, state, stats)
            if state != "done":
                self.stopped = f"job {job_id} {state}: {header.get('message')}"
                stream.stop()

    def _write(self, index: int, event: Event) -> str | None:
        """Write one result; why it could not be written, or None."""
        target = self.targets[index]
        try:
            if event.header.get("encoding") == "raw":
                data = encode(event.image(), target.suffix)
            else:
                data = event.frames[0]  # the encoded file, written without a copy
            write_atomic(target, data)
        except Exception as exc:  # noqa: BLE001 - one unwritable result must not stop the rest
            return describe(exc)
        self.written += 1
        return None


def cmd_submit(args: argparse.Namespace) -> int:
    """Send files to the server, show progress, write results (with the inputs' stems).

    Exit codes: 0 every image written, 1 some failed or the run stopped early, 2 a bad
    command line or input list, an output that exists (without ``--overwrite`` or
    ``--skip-existing``), or no server answering; 130 interrupted (Ctrl-C): its jobs are
    cancelled and ``--stats-json`` is still written.
    """
    from .cli import output_paths, pipeline_from_args, refuse_overwriting_inputs

    pipeline = pipeline_from_args(args)
    files = expand_inputs(args.files)
    if not files:
        raise ImgprocError("no input files (check the paths, folders or globs)")
    targets = output_paths(files, args.output, args.format)
    refuse_overwriting_inputs(files, targets)
    args.files, skipped = inputs_to_write(files, targets, args.overwrite, args.skip_existing)
    report = SubmitReport(json_lines=args.json, quiet=args.quiet)
    if skipped:
        report.say(f"skipped {skipped} inputs whose output exists (--skip-existing)")
    started = time.perf_counter()
    interrupted = False
    if args.by_reference:
        return submit_by_reference(args, pipeline, report, skipped)
    with _client(args) as client:
        batch = None
        if args.files:
            client.info()  # nothing listening, or keys refused: exit 2 here, nothing sent
            batch = BatchSubmission(client, args, pipeline, report)
            try:
                batch.run()
            except KeyboardInterrupt:
                interrupted = True
                cancel_unfinished(client, report)
    stats = submit_stats(batch, len(args.files), skipped, time.perf_counter() - started)
    stats["interrupted"] = interrupted
    return finish_submit(args, report, batch, stats, interrupted)


def submit_by_reference(
    args: argparse.Namespace, pipeline: Pipeline, report: SubmitReport, skipped: int
) -> int:
    """Name the files to the server instead of sending them: it reads them from its
    ``--data-root`` (the same file system as here) and its workers write the results into
    ``-o`` there.  Jobs of at most 10,000 paths, one after the other."""
    files, written, failed = args.files, 0, 0
    bar = tqdm(total=len(files), unit="img", disable=args.quiet or args.json, leave=False)
    output = os.path.abspath(args.output)
    with _client(args) as client:
        for start in range(0, len(files), MAX_IMAGES_PER_REQUEST):
            chunk = files[start : start + MAX_IMAGES_PER_REQUEST]
            paths = [os.path.abspath(f) for f in chunk]
            job = client.submit_paths(paths, pipeline, output, result=args.format,
                                      overwrite=args.overwrite, tile=args.tile)  # fmt: skip
            report.accepted(job.id, job.token, chunk)
            for event in job.events(timeout=args.timeout):
                index = event.header.get("index")
                if event.type == "result":
                    written += 1
                    report.result(job.id, chunk[index], event.header["written"], "by reference")
                elif event.type == "image_error":
                    failed += 1
                    report.image_error(job.id, chunk[index], event.header["message"])
                bar.update(event.type in ("result", "image_error"))
    bar.close()
    out = sys.stderr if args.json else sys.stdout
    print(f"{written} of {len(files) + skipped} images written to {args.output}", file=out)
    return 0 if failed == 0 and written == len(files) else 1


def inputs_to_write(
    files: list[str], targets: list[Path], overwrite: bool, skip_existing: bool
) -> tuple[list[str], int]:
    """The inputs to send, and how many were skipped because their output exists.

    Without ``--overwrite`` or ``--skip-existing`` an existing output is an error naming the
    first one, raised before anything is sent.
    """
    exists = [target.exists() for target in targets]
    if skip_existing:
        return [f for f, e in zip(files, exists) if not e], sum(exists)
    if not overwrite and any(exists):
        first = exists.index(True)
        raise ImgprocError(
            f"{targets[first]} exists (the output of {files[first]}; {sum(exists)} of "
            f"{len(files)} outputs exist): add --overwrite to replace or --skip-existing to "
            "keep them"
        )
    return files, 0


def cancel_unfinished(client: Client, report: SubmitReport) -> None:
    """Cancel the jobs accepted and not yet done, quickly: the user has asked to stop."""
    client.timeout = min(client.timeout, 2.0)
    try:
        for job_id, token in list(report.unfinished.items()):
            try:
                client.cancel(job_id, token)
            except ImgprocError:
                pass  # the server is gone or the job ended: nothing left to cancel
    except KeyboardInterrupt:
        pass  # a second Ctrl-C: stop cancelling and leave


def submit_stats(
    batch: BatchSubmission | None, sent: int, skipped: int, elapsed: float
) -> dict[str, Any]:
    """The ``--stats-json`` document: totals, then every job's own stats and the paths."""
    written = batch.written if batch else 0
    jobs = batch.stats if batch else []
    return {
        "images": sent + skipped,
        "written": written,
        "failed": len(batch.failed) if batch else 0,
        "skipped": skipped,
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(written / elapsed, 3) if elapsed > 0 else None,
        "stages_s": summed_stages(jobs),
        "ranks": summed_ranks(jobs),
        "jobs": jobs,
        "paths": batch.paths if batch else {},
    }


def summed_stages(jobs: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds per stage (queue, decode, ..., encode), summed over the jobs."""
    totals: dict[str, float] = {}
    for job in jobs:
        for key, value in job.items():
            if isinstance(value, (int, float)) and key != "total":
                totals[key] = round(totals.get(key, 0.0) + value, 6)
    return totals


def summed_ranks(jobs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per worker rank: tiles, busy seconds, bytes and CPU seconds summed, and each rank's
    share of all the busy time (how evenly the work was spread)."""
    ranks: dict[str, dict[str, float]] = {}
    for job in jobs:
        for rank, fields in job.get("ranks", {}).items():
            mine = ranks.setdefault(rank, {})
            for key, value in fields.items():
                combine = max if key == "maxrss_mb" else sum  # peak memory is a peak, not a sum
                mine[key] = round(combine((mine.get(key, 0), value)), 6)
    busy = sum(r.get("busy_s", 0.0) for r in ranks.values())
    for r in ranks.values():
        r["busy_share"] = round(r.get("busy_s", 0.0) / busy, 4) if busy > 0 else 0.0
    return dict(sorted(ranks.items(), key=lambda item: int(item[0])))


def stats_table(stats: dict[str, Any]) -> str:
    """The ``--stats`` table: images, images/s, seconds per stage and per-rank busy share."""
    lines = [
        f"images     {stats['written']} written, {stats['failed']} failed, "
        f"{stats['skipped']} skipped in {stats['elapsed_s']:.2f} s "
        f"({stats['images_per_s'] or 0:.1f} images/s, {len(stats['jobs'])} jobs)",
        "paths      " + (", ".join(f"{k} {v}" for k, v in stats["paths"].items()) or "none"),
        "stage s    " + "  ".join(f"{k} {v:.3f}" for k, v in stats["stages_s"].items()),
        "rank  tiles  busy s  share  cpu s  MB moved",
    ]
    for rank, r in stats["ranks"].items():
        lines.append(
            f"{rank:>4}  {int(r.get('tiles', 0)):>5}  {r.get('busy_s', 0):>6.2f}  "
            f"{r['busy_share']:>5.0%}  {r.get('cpu_s', 0):>5.1f}  {r.get('bytes', 0) / 1e6:>8.1f}"
        )
    return "\n".join(lines)


def finish_submit(
    args: argparse.Namespace,
    report: SubmitReport,
    batch: BatchSubmission | None,
    stats: dict[str, Any],
    interrupted: bool,
) -> int:
    """Write ``--stats-json``, print ``--stats`` and the last line; the exit code."""
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(stats, indent=2))
    out = sys.stderr if args.json else sys.stdout  # with --json, stdout is JSON lines only
    if args.stats:
        print(stats_table(stats), file=out)
    totals = {k: stats[k] for k in ("images", "written", "failed", "skipped")}
    stopped = batch.stopped if batch else None
    report.emit("summary", **totals, interrupted=interrupted, stopped=stopped)
    if interrupted:
        print(f"interrupted: {stats['written']} of {stats['images']} written", file=sys.stderr)
        return 130
    if stopped:
        print(f"error: stopped early: {stopped}", file=sys.stderr)
    skipped = f" ({stats['skipped']} skipped: their output exists)" if stats["skipped"] else ""
    line = f"{stats['written']} of {stats['images']} images written to {args.output}{skipped}"
    print(line, file=out)
    return 0 if stats["written"] + stats["skipped"] == stats["images"] else 1


def cmd_status(args: argparse.Namespace) -> int:
    """Print a job's state."""
    with _client(args) as client:
        _print_json(client.status(args.job, args.token))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel a job."""
    with _client(args) as client:
        _print_json(client.cancel(args.job, args.token))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """Print ranks, hosts, engines, versions, queue and limits."""
    with _client(args) as client:
        _print_json(client.info())
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Make CURVE key pairs: the server's and one client's, in the layout both sides read."""
    import zmq.auth

    folder = Path(args.dir)
    (folder / "clients").mkdir(parents=True, exist_ok=True)
    old = os.umask(0o077)  # secret keys are born 0600: never readable by others, not even briefly
    try:
        if not (folder / "server.key_secret").exists():
            zmq.auth.create_certificates(folder, "server")
        public, _ = zmq.auth.create_certificates(folder, args.client)
        if args.client != "client":
            for ext in ("key", "key_secret"):
                shutil.copy(folder / f"{args.client}.{ext}", folder / f"client.{ext}")
    finally:
        os.umask(old)
    shutil.copy(public, folder / "clients" / Path(public).name)
    for secret in folder.glob("*.key_secret"):
        secret.chmod(0o600)
    for public_key in [*folder.glob("*.key"), *(folder / "clients").glob("*.key")]:
        public_key.chmod(0o644)
    print(f"server keys: {folder / 'server.key_secret'} (keep secret), {folder / 'server.key'}")
    print(f"client keys: {folder / 'client.key_secret'}; allowed: {folder / 'clients'}")
    return 0


def add_client_commands(sub: argparse._SubParsersAction) -> None:
    """Register the client commands on the ``mpi-imgproc`` parser."""
    from .cli import add_output_options, add_pipeline_options

    submit = sub.add_parser("submit", help="submit files to a server and write the results")
    submit.add_argument("files", nargs="+", metavar="FILE", help="files, folders or globs")
    add_output_options(submit)
    add_pipeline_options(submit)
    add_server_options(submit)
    submit.add_argument(
        "--tile", type=tile_arg, default="auto", help="tile size in pixels, 0 (whole) or auto"
    )
    submit.add_argument(
        "--stats", action="store_true", help="print a table: images/s, stage and rank times"
    )
    submit.add_argument("--stats-json", metavar="FILE", help="save every job's timings as JSON")
    submit.add_argument("--json", action="store_true", help="JSON lines of events on stdout")
    submit.add_argument(
        "--by-reference",
        action="store_true",
        help="send the paths, not the files: the server (--data-root) and its workers read "
        "and write them on a shared file system",
    )
    existing = submit.add_mutually_exclusive_group()
    existing.add_argument(
        "--overwrite", action="store_true", help="replace outputs that exist (default: refuse)"
    )
    existing.add_argument(
        "--skip-existing", action="store_true", help="skip inputs whose output exists"
    )
    submit.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no job lines")
    submit.add_argument("--chunk", type=int, default=16, help="images per job sent")
    submit.add_argument("--window", type=int, default=4, help="jobs in flight at once")
    submit.set_defaults(func=cmd_submit)

    for name, func, text in (
        ("status", cmd_status, "show a job's state"),
        ("cancel", cmd_cancel, "cancel a job"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("job", help="a job id (Job.id in the Python API; submit --stats lists)")
        cmd.add_argument(
            "--token", required=True, help="the job's secret token (Job.token; from accepted)"
        )
        add_server_options(cmd)
        cmd.set_defaults(func=func)

    info = sub.add_parser("info", help="show the server's ranks, hosts, engines and queue")
    add_server_options(info)
    info.set_defaults(func=cmd_info)

    keys = sub.add_parser("keys", help="make CURVE key pairs for --curve-keys")
    keys.add_argument("dir", help="folder for the keys")
    keys.add_argument("--client", default="client", help="name of the client key pair")
    keys.set_defaults(func=cmd_keys)

"""Client commands of ``mpi-imgproc``: ``submit``, ``status``, ``cancel``, ``info``, ``keys``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

from .client import DEFAULT_ADDRESS, Client, Event
from .errors import ImgprocError, describe
from .imageio import encode, expand_inputs, write_atomic
from .pipeline import Pipeline
from .protocol import tile_arg


def add_server_options(parser: argparse.ArgumentParser) -> None:
    """``--server ADDR`` and ``--curve-keys DIR`` for every client command."""
    parser.add_argument("--server", default=DEFAULT_ADDRESS, help="server address")
    parser.add_argument("--curve-keys", metavar="DIR", help="key folder from `mpi-imgproc keys`")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for replies")


def _client(args: argparse.Namespace) -> Client:
    return Client(args.server, curve_keys=args.curve_keys, timeout=args.timeout)


def _print_json(data: dict) -> None:
    data = {k: v for k, v in data.items() if k not in ("v", "req", "type")}
    print(json.dumps(data, indent=2))


class BatchSubmission:
    """Streams many files to the server in a bounded window of jobs and writes results as
    they arrive, so memory stays flat whatever the number of files."""

    def __init__(self, client: Client, args: argparse.Namespace, pipeline: Pipeline):
        from .cli import output_paths

        self.client, self.args, self.pipeline = client, args, pipeline
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
        """Submit chunks while the window has room; handle events until every job is done.

        A job that ends cancelled or failed (the server shutting down, say) stops further
        submissions; so does a server that stops answering.
        """
        chunk, window = max(1, self.args.chunk), max(1, self.args.window)
        starts = list(range(0, len(self.files), chunk))
        try:
            while (starts and not self.stopped) or self.jobs:
                while starts and not self.stopped and len(self.jobs) < window:
                    self._submit(starts.pop(0), chunk)
                for job, event in self.client.poll_events(timeout=self.args.timeout):
                    self._handle(job.id, event)
        except ImgprocError as exc:  # refused, timed out, or the server is gone
            self.stopped = str(exc)
        finally:
            self.bar.close()

    def _submit(self, start: int, chunk: int) -> None:
        indices = []
        for index in range(start, min(start + chunk, len(self.files))):
            if os.access(self.files[index], os.R_OK) and os.path.isfile(self.files[index]):
                indices.append(index)
            else:
                self.failed.append(f"{self.files[index]}: cannot read: no such readable file")
                self.bar.update(1)
        if indices:
            files = [self.files[i] for i in indices]
            fmt = self.args.format
            job = self.client.submit(files, self.pipeline, tile=self.args.tile, result=fmt)
            self.jobs[job.id] = indices

    def _handle(self, job_id: str, event: Event) -> None:
        header = event.header
        if event.type == "result":
            self._write(self.jobs[job_id][header["index"]], event)
            path = header.get("path", "whole")
            self.paths[path] = self.paths.get(path, 0) + 1
            self.bar.update(1)
        elif event.type == "image_error":
            index = self.jobs[job_id][header["index"]]
            self.failed.append(f"{self.files[index]}: {header['message']}")
            self.bar.update(1)
        elif event.type == "done":
            del self.jobs[job_id]
            self.stats.append({"job": job_id, "state": header["state"], **header.get("stats", {})})
            if header["state"] != "done":
                self.stopped = f"job {job_id} {header['state']}: {header.get('message')}"

    def _write(self, index: int, event: Event) -> None:
        target = self.targets[index]
        try:
            if event.header.get("encoding") == "raw":
                data = encode(event.image(), target.suffix)
            else:
                data = event.frames[0]  # the encoded file, written without a copy
            write_atomic(target, data)
            self.written += 1
        except Exception as exc:  # noqa: BLE001 - one unwritable result must not stop the rest
            self.failed.append(f"{self.files[index]}: {describe(exc)}")


def cmd_submit(args: argparse.Namespace) -> int:
    """Send files to the server, show progress, write results (with the inputs' stems)."""
    from .cli import pipeline_from_args

    pipeline = pipeline_from_args(args)
    args.files = expand_inputs(args.files)
    if not args.files:
        raise ImgprocError("no input files (check the paths, folders or globs)")
    with _client(args) as client:
        batch = BatchSubmission(client, args, pipeline)
        batch.run()
    for line in batch.failed:
        print(f"error: {line}", file=sys.stderr)
    if batch.stopped:
        print(f"error: stopped early: {batch.stopped}", file=sys.stderr)
    stats = {"jobs": batch.stats, "paths": batch.paths}
    if args.stats:
        print(json.dumps(stats, indent=2))
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(stats, indent=2))
    print(f"{batch.written} of {len(args.files)} images written to {args.output}")
    return 0 if batch.written == len(args.files) else 1


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
    submit.add_argument("--stats", action="store_true", help="print the job's timings")
    submit.add_argument("--stats-json", metavar="FILE", help="save the job's timings as JSON")
    submit.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
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

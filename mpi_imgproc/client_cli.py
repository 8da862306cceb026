"""Client commands of ``mpi-imgproc``: ``submit``, ``status``, ``cancel``, ``info``, ``keys``."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from tqdm import tqdm

from .client import DEFAULT_ADDRESS, Client
from .errors import describe
from .imageio import encode, write_atomic


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


def cmd_submit(args: argparse.Namespace) -> int:
    """Send files to the server, show progress, write results next to each other in OUTDIR."""
    from .cli import output_paths, pipeline_from_args

    pipeline = pipeline_from_args(args)
    targets = output_paths(args.files, args.output, args.format)
    tile = "auto" if args.tile in (None, "auto") else int(args.tile)
    failed = []
    with _client(args) as client:
        job = client.submit(args.files, pipeline, tile=tile)
        bar = tqdm(total=len(args.files), unit="img", desc=job.id, disable=args.quiet)
        for event in job.events():
            index = event.header.get("index")
            if event.type == "result":
                _write_result(event, targets[index], failed, args.files[index])
                bar.update(1)
            elif event.type == "image_error":
                failed.append(f"{args.files[index]}: {event.header['message']}")
                bar.update(1)
            elif event.type == "progress":
                bar.set_postfix(tiles=f"{event.header['tiles_done']}/{event.header['tiles_total']}")
        bar.close()
        result = job.result()
    for line in failed:
        print(f"error: {line}", file=sys.stderr)
    if result.state != "done":
        print(f"error: job {job.id} {result.state}: {result.message}", file=sys.stderr)
    if args.stats:
        print(json.dumps(result.stats, indent=2))
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(result.stats, indent=2))
    written = len(args.files) - len(failed)
    print(f"{written} of {len(args.files)} images written to {args.output} (job {job.id})")
    return 0 if result.state == "done" and not failed else 1


def _write_result(event, target: Path, failed: list[str], source: str) -> None:
    try:
        write_atomic(target, encode(event.image(), target.suffix))
    except Exception as exc:  # noqa: BLE001 - one unwritable result must not stop the rest
        failed.append(f"{source}: {describe(exc)}")


def cmd_status(args: argparse.Namespace) -> int:
    """Print a job's state."""
    with _client(args) as client:
        _print_json(client.status(args.job))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    """Cancel a job."""
    with _client(args) as client:
        _print_json(client.cancel(args.job))
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
    if not (folder / "server.key_secret").exists():
        zmq.auth.create_certificates(folder, "server")
    public, _ = zmq.auth.create_certificates(folder, args.client)
    shutil.copy(public, folder / "clients" / Path(public).name)
    if args.client != "client":
        for ext in ("key", "key_secret"):
            shutil.copy(folder / f"{args.client}.{ext}", folder / f"client.{ext}")
    print(f"server keys: {folder / 'server.key_secret'} (keep secret), {folder / 'server.key'}")
    print(f"client keys: {folder / 'client.key_secret'}; allowed: {folder / 'clients'}")
    return 0


def add_client_commands(sub: argparse._SubParsersAction) -> None:
    """Register the client commands on the ``mpi-imgproc`` parser."""
    from .cli import add_output_options, add_pipeline_options

    submit = sub.add_parser("submit", help="submit files to a server and write the results")
    submit.add_argument("files", nargs="+", metavar="FILE")
    add_output_options(submit)
    add_pipeline_options(submit)
    add_server_options(submit)
    submit.add_argument("--tile", default="auto", help="tile size in pixels, 0 (whole) or auto")
    submit.add_argument("--stats", action="store_true", help="print the job's timings")
    submit.add_argument("--stats-json", metavar="FILE", help="save the job's timings as JSON")
    submit.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    submit.set_defaults(func=cmd_submit)

    for name, func, text in (
        ("status", cmd_status, "show a job's state"),
        ("cancel", cmd_cancel, "cancel a job"),
    ):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("job")
        add_server_options(cmd)
        cmd.set_defaults(func=func)

    info = sub.add_parser("info", help="show the server's ranks, hosts, engines and queue")
    add_server_options(info)
    info.set_defaults(func=cmd_info)

    keys = sub.add_parser("keys", help="make CURVE key pairs for --curve-keys")
    keys.add_argument("dir", help="folder for the keys")
    keys.add_argument("--client", default="client", help="name of the client key pair")
    keys.set_defaults(func=cmd_keys)

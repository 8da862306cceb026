"""``mpi-imgproc web [--server ADDR] [--host 127.0.0.1] [--port 8050]``.

Kept apart from :mod:`.app` so that the command line loads without FastAPI installed (the
``web`` extra); the app is imported when the command runs.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

from ..connection import DEFAULT_ADDRESS
from ..errors import ImgprocError
from .jobs import MB, Limits


def add_web_command(sub: argparse._SubParsersAction) -> None:
    """Register ``mpi-imgproc web``."""
    web = sub.add_parser(
        "web",
        help="a page and a JSON API over a running cluster",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    web.add_argument("--server", default=DEFAULT_ADDRESS, help="the cluster's ZeroMQ address")
    web.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback)")
    web.add_argument("--port", type=int, default=8050, help="port to listen on")
    web.add_argument("--max-files", type=int, default=Limits.max_files, help="files per upload")
    web.add_argument("--max-file-mb", type=float, default=64.0, help="megabytes per file")
    web.add_argument("--max-request-mb", type=float, default=256.0, help="megabytes per upload")
    web.add_argument("--max-pixels", type=int, default=Limits.max_pixels, help="pixels per image")
    web.set_defaults(func=cmd_web)


def cmd_web(args: argparse.Namespace) -> int:
    """Serve the app with uvicorn until interrupted."""
    try:
        import uvicorn

        from .app import create_app
    except ImportError as exc:
        raise ImgprocError(
            f"the web app needs the web extra: pip install 'mpi_imgproc[web]' ({exc})"
        ) from None

    if not 1 <= args.max_files <= 10_000 or args.max_file_mb <= 0 or args.max_request_mb <= 0:
        raise ImgprocError("--max-files must be 1..10000, the sizes positive")
    limits = Limits(
        max_files=args.max_files,
        max_file_bytes=int(args.max_file_mb * MB),
        max_request_bytes=int(args.max_request_mb * MB),
        max_pixels=args.max_pixels,
    )
    app = create_app(args.server, limits)
    print(f"mpi_imgproc web on http://{args.host}:{args.port}/ (cluster {args.server})", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the kernel's pick)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@contextmanager
def running_web(server: str, *args: str, timeout: float = 30.0) -> Iterator[str]:
    """Start ``mpi-imgproc web --server SERVER ARGS`` on a free loopback port; yield its URL.

    The app answers ``/api/ops`` before this yields, and is stopped (then killed if it must
    be) on exit, so tests and scripts never leave it behind.
    """
    port = free_port()
    cmd = [sys.executable, "-m", "mpi_imgproc.cli", "web", "--server", server]
    proc = subprocess.Popen([*cmd, "--port", str(port), *args], start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/ops", timeout=2):
                    break
            except OSError as exc:
                if proc.poll() is not None or time.monotonic() > deadline:
                    why = f"exit {proc.poll()}, last error {exc}"
                    raise RuntimeError(f"mpi-imgproc web did not start ({why})") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

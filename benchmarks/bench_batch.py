"""Batch throughput: many small JPEGs resized to 256×256 (lanczos), three ways, one run.

1. ``loop``: a single-process sequential OpenCV loop (imread, resize, imwrite; one thread).
2. ``batch``: ``mpiexec -n N python -m mpi_imgproc.batch`` over the folder (and with
   ``--shared-fs``, where the workers read and write the files themselves).
3. ``server``: ``mpi-imgproc submit`` of the folder to a server on ``-n N``.

Images/s are computed from wall time, ``mpiexec`` start-up included (it is what a user waits
for); the batch summary's own rate (start-up excluded) is reported beside it.  Outputs of
every path are checked against the loop's, bit for bit.

Run: ``python benchmarks/bench_batch.py [--count 2000] [--ranks 3] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from mpi_imgproc.launch import mpi_command, running_cluster

OP = "resize:width=256,height=256,interpolation=lanczos"


def make_dataset(folder: Path, count: int) -> list[Path]:
    """Generate ``count`` JPEGs of 300–600 px with ``mpi-imgproc gen-dataset`` (cached)."""
    files = sorted(folder.glob("*.jpg"))
    if len(files) != count:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "mpi_imgproc.cli",
                "gen-dataset",
                str(folder),
                "--count",
                str(count),
                "--min-size",
                "300",
                "--max-size",
                "600",
                "--seed",
                "7",
            ],
            check=True,
            capture_output=True,
            timeout=600,
        )
        files = sorted(folder.glob("*.jpg"))
    return files


def sequential_loop(files: list[Path], out: Path) -> float:
    """The baseline: one process, one thread, plain OpenCV."""
    cv2.setNumThreads(1)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for path in files:
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        small = cv2.resize(image, (256, 256), interpolation=cv2.INTER_LANCZOS4)
        cv2.imwrite(str(out / path.name), small)
    return time.perf_counter() - started


def run_timed(cmd: list[str], timeout: float = 1200) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=False, capture_output=True, timeout=timeout)
    return time.perf_counter() - started


def batch_mode(folder: Path, out: Path, ranks: int, shared_fs: bool) -> tuple[float, float]:
    """Wall seconds, and the batch's own images/s from its summary."""
    cmd = mpi_command(
        ranks, "mpi_imgproc.batch", "--input", str(folder), "--output", str(out), "--op", OP
    )
    wall = run_timed(cmd + (["--shared-fs"] if shared_fs else []))
    summary = json.loads((out / "batch-summary.json").read_text())
    return wall, summary["images_per_s"]


def server_mode(folder: Path, out: Path, ranks: int) -> float:
    """Wall seconds of ``mpi-imgproc submit`` against a running server (start-up excluded)."""
    with running_cluster(ranks) as cluster:
        cmd = [
            sys.executable,
            "-m",
            "mpi_imgproc.cli",
            "submit",
            str(folder),
            "-o",
            str(out),
            "--op",
            OP,
            "--server",
            cluster.address,
            "--quiet",
            "--timeout",
            "300",
        ]
        return run_timed(cmd)


def mismatches(files: list[Path], reference: Path, other: Path) -> int:
    """Outputs that differ from the loop's (decoded pixels, since JPEG bytes may differ)."""
    bad = 0
    for path in files:
        a = cv2.imread(str(reference / path.name), cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(other / path.name), cv2.IMREAD_UNCHANGED)
        bad += a is None or b is None or not np.array_equal(a, b)
    return bad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--data", default=os.path.join(tempfile.gettempdir(), "imgproc-bench"))
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    folder = Path(args.data) / f"jpegs-{args.count}"
    files = make_dataset(folder, args.count)
    n = len(files)
    with tempfile.TemporaryDirectory() as tmp:
        outs = {name: Path(tmp) / name for name in ("loop", "batch", "shared", "server")}
        loop = sequential_loop(files, outs["loop"])
        batch, batch_rate = batch_mode(folder, outs["batch"], args.ranks, False)
        shared, shared_rate = batch_mode(folder, outs["shared"], args.ranks, True)
        server = server_mode(folder, outs["server"], args.ranks)
        results = {
            "images": n,
            "ranks": args.ranks,
            "cores": len(os.sched_getaffinity(0)),
            "loop_images_per_s": round(n / loop, 1),
            "batch_images_per_s_wall": round(n / batch, 1),
            "batch_images_per_s_own": batch_rate,
            "shared_fs_images_per_s_wall": round(n / shared, 1),
            "shared_fs_images_per_s_own": shared_rate,
            "server_images_per_s_wall": round(n / server, 1),
            "batch_over_loop": round(loop / batch, 2),
            "shared_fs_over_loop": round(loop / shared, 2),
            "server_over_batch": round(batch / server, 2),
            "mismatches": {
                k: mismatches(files, outs["loop"], outs[k]) for k in ("batch", "shared", "server")
            },
        }
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

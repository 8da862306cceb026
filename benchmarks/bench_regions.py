"""Large images by reference, and raw pixels from a same-host client, against one process.

One 8000×8000 BGR ``gaussian_blur:ksize=9`` (``--size`` to change), in one run:

* ``opencv``: one process loads the ``.npy``, blurs it with OpenCV (its own threads), saves it;
* ``opencv-tiff``: the same from the tiled zlib BigTIFF with ``cv2.imread``, saved with
  ``cv2.imwrite`` as an uncompressed TIFF (what the cluster writes), the baseline of
  ``regions-tiff``;
* ``regions-npy`` / ``regions-tiff``: ``mpiexec -n RANKS`` with ``--data-root``, the job names
  the file; workers read their strips (a tiled, zlib-compressed BigTIFF for ``tiff``) and write
  their rows of the output; rank 0 moves only task descriptions;
* ``opencv-memory``: ``cv2.GaussianBlur`` of the image already in memory (OpenCV's threads),
  the baseline of the raw-pixel rows;
* ``client-shm`` / ``client-shared-array`` / ``client-shared-out`` / ``client-tcp``:
  ``Client.submit`` of the array to the same cluster, from the submit to the result in hand:
  through shared memory (the array copied into a segment; or made with ``shm.shared_array``,
  so not copied; and with a ``shared_array`` as ``out``, reused from run to run, so the
  result needs no fresh segment either), or through the socket (``shared_memory=False``).

Every output is checked equal to the one-process result.  Ratios are against the one-process
run of the same formats.
Run: ``python benchmarks/bench_regions.py [--size 8000] [--ranks 3] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tifffile

from mpi_imgproc import shm
from mpi_imgproc.client import Client
from mpi_imgproc.launch import running_cluster

OPS = ["gaussian_blur:ksize=9"]


def by_reference(address: str, path: str, output: str) -> float:
    """Seconds from the submit to its ``done``."""
    with Client(address, timeout=60) as client:
        started = time.perf_counter()
        result = client.submit_paths([path], OPS, output, overwrite=True).result(timeout=600)
    if result.state != "done" or result.errors:
        raise RuntimeError(f"job {result.state}: {result.message or result.errors}")
    return time.perf_counter() - started


def raw_client(
    address: str, image: np.ndarray, shared: bool, expected: np.ndarray, out: Any = None
) -> float:
    """Seconds from the submit of raw pixels to the result in hand (checked afterwards)."""
    with Client(address, timeout=60, shared_memory=shared) as client:
        client.info()  # connected before the clock starts
        started = time.perf_counter()
        result = client.submit([image], OPS, out=None if out is None else [out]).result(timeout=600)
        took = time.perf_counter() - started
    if not result.ok or not np.array_equal(result.images[0], expected):
        raise RuntimeError(f"job {result.state}: {result.message or result.errors or 'differs'}")
    return took


def in_memory(image: np.ndarray) -> float:
    started = time.perf_counter()
    cv2.GaussianBlur(image, (9, 9), 0)
    return time.perf_counter() - started


def one_process(source: Path, target: Path) -> float:
    started = time.perf_counter()
    image = np.load(source)
    np.save(target, cv2.GaussianBlur(image, (9, 9), 0))
    return time.perf_counter() - started


def one_process_tiff(source: Path, target: Path) -> float:
    started = time.perf_counter()
    image = cv2.imread(str(source), cv2.IMREAD_UNCHANGED)
    blurred = cv2.GaussianBlur(image, (9, 9), 0)
    cv2.imwrite(str(target), blurred, [cv2.IMWRITE_TIFF_COMPRESSION, 1])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=8000)
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, (args.size, args.size, 3), np.uint8)
        np.save(root / "in.npy", image)
        tifffile.imwrite(
            root / "in.tif", image[..., ::-1], tile=(512, 512), compression="zlib", bigtiff=True
        )
        times = {
            "opencv": [one_process(root / "in.npy", root / "ref.npy") for _ in range(args.repeat)],
            "opencv-tiff": [
                one_process_tiff(root / "in.tif", root / "ref.tif") for _ in range(args.repeat)
            ],
        }
        expected = np.load(root / "ref.npy")
        assert np.array_equal(cv2.imread(str(root / "ref.tif"), cv2.IMREAD_UNCHANGED), expected)
        with running_cluster(args.ranks, "--data-root", str(root)) as cluster:
            for name, path in (("regions-npy", "in.npy"), ("regions-tiff", "in.tif")):
                times[name] = [
                    by_reference(cluster.address, path, "out") for _ in range(args.repeat)
                ]
            times["opencv-memory"] = [in_memory(image) for _ in range(args.repeat)]
            shared = shm.shared_array(image.shape, image.dtype)
            shared[...] = image
            out = shm.shared_array(image.shape, image.dtype)
            for name, pixels, through_shm, into in (
                ("client-shm", image, True, None),
                ("client-shared-array", shared, True, None),
                ("client-shared-out", shared, True, out),
                ("client-tcp", image, False, None),
            ):
                times[name] = [
                    raw_client(cluster.address, pixels, through_shm, expected, into)
                    for _ in range(args.repeat)
                ]
        assert np.array_equal(np.load(root / "out" / "in.npy"), expected)
        assert np.array_equal(
            cv2.imread(str(root / "out" / "in.tif"), cv2.IMREAD_UNCHANGED), expected
        )
    print(f"{args.size}x{args.size} BGR {OPS[0]}, -n {args.ranks}, median of {args.repeat}")
    for name, samples in times.items():
        median = statistics.median(samples)
        against = (
            "opencv-tiff" if "tiff" in name else "opencv-memory" if "client" in name else "opencv"
        )
        base = statistics.median(times[against])
        print(
            f"  {name:19s} {median:7.3f} s  ({min(samples):.3f}-{max(samples):.3f})"
            f"  {median / base:5.2f}x {against}"
        )


if __name__ == "__main__":
    main()

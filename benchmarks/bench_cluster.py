"""Cluster benchmarks, each a ratio or latency measured in one run (never a timed test).

1. ``latency``: median round trip of a 2000×2000 BGR ``grayscale`` job through the Python
   client (raw pixels both ways) against a server on ``-n 3``.  Goal ≤ 10 ms.
2. ``big``: one 8000×8000 ``gaussian_blur:ksize=9`` job through ``-n 3`` against OpenCV with
   2 threads on the same image in the same run; the ratio is cluster time / OpenCV time.

Run: ``python benchmarks/bench_cluster.py [--repeat N] [--quick] [--json FILE]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import cv2
import numpy as np

from mpi_imgproc.client import Client
from mpi_imgproc.launch import running_cluster
from mpi_imgproc.pipeline import Pipeline


def timed(fn, repeat: int) -> list[float]:
    """Wall seconds of ``repeat`` calls of ``fn`` (after one warm-up call)."""
    fn()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def latency(client: Client, size: int, repeat: int) -> dict:
    """Round trip of a small, cheap job: what a user waits for, end to end."""
    image = np.random.default_rng(0).integers(0, 256, (size, size, 3), np.uint8)
    expected = Pipeline.parse(["grayscale"]).apply(image)
    out: dict = {}

    def one() -> None:
        out["result"] = client.submit([image], ["grayscale"]).result(timeout=60)

    samples = timed(one, repeat)
    assert np.array_equal(out["result"].images[0], expected)
    return {
        "case": f"latency {size}x{size} grayscale",
        "median_ms": round(statistics.median(samples) * 1e3, 2),
        "min_ms": round(min(samples) * 1e3, 2),
        "samples": len(samples),
    }


def big_blur(client: Client, size: int, repeat: int, tile: int | str) -> dict:
    """One large neighbourhood job against OpenCV's own 2-thread blur of the same image."""
    image = np.random.default_rng(1).integers(0, 256, (size, size, 3), np.uint8)
    specs = ["gaussian_blur:ksize=9"]
    cv2.setNumThreads(2)
    opencv = timed(lambda: cv2.GaussianBlur(image, (9, 9), 0), repeat)
    out: dict = {}

    def one() -> None:
        out["result"] = client.submit([image], specs, tile=tile).result(timeout=600)

    cluster = timed(one, repeat)
    expected = Pipeline.parse(specs).apply(image)
    assert np.array_equal(out["result"].images[0], expected), "cluster result is not exact"
    c, o = statistics.median(cluster), statistics.median(opencv)
    return {
        "case": f"{size}x{size} gaussian_blur:ksize=9, tile {tile}",
        "cluster_s": round(c, 4),
        "opencv_2_threads_s": round(o, 4),
        "cluster_over_opencv": round(c / o, 2),
        "stats": out["result"].stats,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    repeat = 5 if args.quick else args.repeat
    big = 3000 if args.quick else 8000
    results = []
    with running_cluster(args.ranks) as cluster, Client(cluster.address, timeout=600) as client:
        results.append(latency(client, 2000, repeat))
        for tile in ("auto", 1024):
            results.append(big_blur(client, big, max(3, repeat // 5), tile))
    for r in results:
        print(json.dumps({k: v for k, v in r.items() if k != "stats"}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

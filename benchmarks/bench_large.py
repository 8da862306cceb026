"""Bounded memory on a large TIFF by reference: every rank's peak RSS while the cluster runs
``gaussian_blur:ksize=9`` then ``sobel`` on a big RGB BigTIFF, workers reading and writing
strips; and the output checked exact, strip by strip, against the whole-image reference.

Run: ``python benchmarks/bench_large.py [--size 16000] [--ranks 3]`` (``--size 40000`` is the
4.8 GB case; its whole-image reference needs about 40 GB of memory, so above ``--check-max``
pixels the check compares sample windows far from each other, computed whole on a crop that
contains their full halo).
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import tifffile

from mpi_imgproc.client import Client
from mpi_imgproc.launch import running_cluster
from mpi_imgproc.pipeline import Pipeline

OPS = ["gaussian_blur:ksize=9", "sobel"]


def write_input(path: Path, size: int) -> None:
    """A size x size RGB BigTIFF written in strips (never held whole)."""
    rng = np.random.default_rng(0)

    def strips():
        for y in range(0, size, 1024):
            rows = min(1024, size - y)
            ramp = np.linspace(0, 255, size, dtype=np.float32)[None, :, None]
            noise = rng.integers(0, 64, (rows, size, 3), np.uint8)
            yield (noise + ramp).astype(np.uint8)

    tifffile.imwrite(
        path,
        strips(),
        shape=(size, size, 3),
        dtype=np.uint8,
        bigtiff=True,
        photometric="rgb",
        rowsperstrip=1024,
    )


class PeakRss:
    """Samples the RSS of every rank of a cluster every 50 ms; keeps each one's peak."""

    def __init__(self, cluster, server_pid: int):
        self.ranks = cluster.ranks()
        self.server_pid = server_pid
        self.peak = {p.pid: 0 for p in self.ranks}
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while self.running:
            for p in self.ranks:
                try:
                    self.peak[p.pid] = max(self.peak[p.pid], p.memory_info().rss)
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.05)

    def stop(self) -> dict[str, float]:
        self.running = False
        self.thread.join()
        mib = {pid: rss / 2**20 for pid, rss in self.peak.items()}
        return {
            "rank0": mib[self.server_pid],
            "workers": [v for pid, v in mib.items() if pid != self.server_pid],
        }


def by_reference(address: str) -> float:
    """Seconds from the submit to its ``done``."""
    with Client(address, timeout=60) as client:
        started = time.perf_counter()
        job = client.submit_paths(["in.tif"], OPS, "out", overwrite=True)
        result = job.result(timeout=1800)
    if result.state != "done" or result.errors:
        raise RuntimeError(f"job {result.state}: {result.message or result.errors}")
    return time.perf_counter() - started


def check(root: Path, size: int, check_max: int) -> str:
    pipeline = Pipeline.parse(OPS)
    out = tifffile.memmap(root / "out" / "in.tif", mode="r")
    source = tifffile.memmap(root / "in.tif", mode="r")
    if size * size <= check_max:
        expected = pipeline.apply(np.ascontiguousarray(source[..., ::-1]))[..., ::-1]
        assert np.array_equal(out, expected)
        return "whole image"
    halo, step = pipeline.halo + 1, size // 5
    for y in range(0, size - 256, step):  # windows along the diagonal, borders included
        y0, x0 = max(0, y - halo), max(0, y - halo)
        crop = np.ascontiguousarray(source[y0 : y + 256 + halo, x0 : y + 256 + halo, ::-1])
        expected = pipeline.apply(crop)[y - y0 : y - y0 + 256, y - x0 : y - x0 + 256, ::-1]
        assert np.array_equal(out[y : y + 256, y : y + 256], expected), y
    return "5 windows of 256x256"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=16000)
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--check-max", type=int, default=20000 * 20000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        root = Path(folder)
        write_input(root / "in.tif", args.size)
        with running_cluster(args.ranks, "--data-root", str(root)) as cluster:
            peaks = PeakRss(cluster, cluster.rank0_pid)
            seconds = by_reference(cluster.address)
            rss = peaks.stop()
        checked = check(root, args.size, args.check_max)
    megapixels = args.size * args.size / 1e6
    print(
        f"{args.size}x{args.size} RGB BigTIFF, {' -> '.join(OPS)}, -n {args.ranks}: "
        f"{seconds:.1f} s, {megapixels / seconds:.1f} Mpixel/s; exact ({checked})"
    )
    workers = ", ".join(f"{v:.0f}" for v in rss["workers"])
    print(f"peak RSS: rank 0 {rss['rank0']:.0f} MiB, workers {workers} MiB")


if __name__ == "__main__":
    main()

"""Bounded memory on a large TIFF by reference: every rank's peak RSS while the cluster runs
``gaussian_blur:ksize=9`` then ``sobel`` on a big RGB BigTIFF, workers reading and writing
strips; and the output checked exact, strip by strip, against the whole-image reference.

Run: ``python benchmarks/bench_large.py [--size 16000] [--ranks 3]`` (``--size 40000`` is the
4.8 GB case; its whole-image reference needs about 40 GB of memory, so above ``--check-max``
pixels the check compares sample windows far from each other, computed whole on a crop that
contains their full halo).

``--task libvips`` runs the libvips benchmark's task instead, in one run, three ways: a
10000x10000 JPEG, crop 100 px off every side, resize to 90 % (linear), 3x3 sharpen, save as
JPEG (quality 95 everywhere) — by pyvips (``pip install pyvips[binary]``), by OpenCV in one
process with 2 threads, and by the cluster by reference (``submit --by-reference``); wall time
and peak RSS of each, as ratios.

``--task resize [--interpolation cubic|lanczos] --size 12000`` resizes a BigTIFF to 90 % by
reference, a ratio whose coordinates a window cannot reproduce in single precision, so the
cluster computes it row by row (inputs of 128 Mpixel and more), against OpenCV in one process.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import cv2
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


def by_reference(address: str, ops: list[str] = OPS) -> float:
    """Seconds from the submit to its ``done``."""
    with Client(address, timeout=60) as client:
        started = time.perf_counter()
        job = client.submit_paths(["in.tif"], ops, "out", overwrite=True)
        result = job.result(timeout=1800)
    if result.state != "done" or result.errors:
        raise RuntimeError(f"job {result.state}: {result.message or result.errors}")
    return time.perf_counter() - started


def cluster_run(root: Path, ranks: int, ops: list[str]) -> tuple[float, dict[str, Any]]:
    """Seconds of ``ops`` on ``root/in.tif`` by reference on a fresh ``-n ranks`` cluster,
    and every rank's peak RSS meanwhile."""
    with running_cluster(ranks, "--data-root", str(root)) as cluster:
        peaks = PeakRss(cluster, cluster.rank0_pid)
        seconds = by_reference(cluster.address, ops)
        return seconds, peaks.stop()


def check(root: Path, size: int, check_max: int, ops: list[str] = OPS) -> str:
    pipeline = Pipeline.parse(ops)
    source = tifffile.memmap(root / "in.tif", mode="r")
    if size * size <= check_max:  # read whole: a small output may be a compressed TIFF
        expected = pipeline.apply(np.ascontiguousarray(source[..., ::-1]))[..., ::-1]
        assert np.array_equal(tifffile.imread(root / "out" / "in.tif"), expected)
        return "whole image"
    out = tifffile.memmap(root / "out" / "in.tif", mode="r")
    halo, step = pipeline.halo + 1, size // 5
    for y in range(0, size - 256, step):  # windows along the diagonal, borders included
        y0, x0 = max(0, y - halo), max(0, y - halo)
        crop = np.ascontiguousarray(source[y0 : y + 256 + halo, x0 : y + 256 + halo, ::-1])
        expected = pipeline.apply(crop)[y - y0 : y - y0 + 256, y - x0 : y - x0 + 256, ::-1]
        assert np.array_equal(out[y : y + 256, y : y + 256], expected), y
    return "5 windows of 256x256"


LIBVIPS_OPS = ["crop:x=100,y=100,width=9800,height=9800", "resize:scale=0.9,interpolation=linear",
               "sharpen"]  # fmt: skip
PYVIPS_TASK = """
import pyvips, sys
im = pyvips.Image.new_from_file(sys.argv[1], access="sequential")
im = im.crop(100, 100, im.width - 200, im.height - 200).resize(0.9, kernel="linear")
mask = pyvips.Image.new_from_array([[0, -1, 0], [-1, 5, -1], [0, -1, 0]], scale=1)
im.conv(mask, precision="integer").write_to_file(sys.argv[2], Q=95)
"""
# The memory task's kernels in libvips (OpenCV's sigma for ksize 9 is 1.7); libvips' sobel
# rounds its own way, so this compares throughput, not pixels.
PYVIPS_MEMORY_TASK = """
import pyvips, sys
im = pyvips.Image.new_from_file(sys.argv[1], access="sequential", unlimited=True)
im = im.gaussblur(1.7, precision="integer").sobel()
im.tiffsave(sys.argv[2], bigtiff=True, tile=True)
"""
OPENCV_TASK = """
import cv2, numpy as np, sys
cv2.setNumThreads(2)
im = cv2.imread(sys.argv[1])[100:-100, 100:-100]
im = cv2.resize(im, None, fx=0.9, fy=0.9, interpolation=cv2.INTER_LINEAR_EXACT)
mask = np.array([[0, -1, 0], [-1, 5, -1], [0, -1, 0]], np.float32)
cv2.imwrite(sys.argv[2], cv2.filter2D(im, -1, mask))
"""


def write_jpeg(path: Path, size: int) -> None:
    """A size x size photo-like JPEG: smooth colour fields, edges and mild noise."""
    import cv2

    rng = np.random.default_rng(0)
    x = np.linspace(0, 60, size, dtype=np.float32)
    rows = []
    for y0 in range(0, size, 1000):
        y = x[y0 : y0 + 1000, None]
        base = np.stack([128 + 60 * np.sin(x[None, :] + y), 128 + 60 * np.cos(y * 0.7) + 0 * x,
                         (x[None, :] + y) * 2.1], axis=-1)  # fmt: skip
        rows.append((base + rng.normal(0, 6, base.shape)).clip(0, 255).astype(np.uint8))
    cv2.imwrite(str(path), np.concatenate(rows), [cv2.IMWRITE_JPEG_QUALITY, 90])


def timed_process(code: str, *args: str) -> tuple[float, float]:
    """(seconds, peak RSS in MiB, sampled every 20 ms) of ``python -c code args``."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args])
    watched, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)
    if proc.wait() != 0:
        raise RuntimeError(f"{code.split()[1]} task failed with status {proc.returncode}")
    return time.perf_counter() - started, peak / 2**20


def libvips_task(ranks: int, repeat: int) -> None:
    """The libvips benchmark's task three ways, best of ``repeat`` each, one run."""
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        root = Path(folder)
        write_jpeg(root / "in.jpg", 10000)
        (root / "out").mkdir()
        vips = min(timed_process(PYVIPS_TASK, str(root / "in.jpg"), str(root / "v.jpg"))
                   for _ in range(repeat))  # fmt: skip
        opencv = min(timed_process(OPENCV_TASK, str(root / "in.jpg"), str(root / "o.jpg"))
                     for _ in range(repeat))  # fmt: skip
        with running_cluster(ranks, "--data-root", str(root)) as cluster:
            runs = []
            for _ in range(repeat):
                peaks = PeakRss(cluster, cluster.rank0_pid)
                with Client(cluster.address, timeout=60) as client:
                    started = time.perf_counter()
                    job = client.submit_paths(["in.jpg"], LIBVIPS_OPS, "out", overwrite=True)
                    result = job.result(timeout=600)
                    runs.append((time.perf_counter() - started, peaks.stop(), result.stats))
                if result.state != "done" or result.errors:
                    raise RuntimeError(f"job {result.state}: {result.message or result.errors}")
        seconds, rss, stats = min(runs, key=lambda r: r[0])
        size = (root / "in.jpg").stat().st_size
        exact = check_jpeg(root / "in.jpg", root / "out" / "in.jpg")
    print(f"libvips task (10000x10000 JPEG{f', {size / 1e6:.0f} MB' if size else ''}, "
          f"{' -> '.join(LIBVIPS_OPS)}, JPEG out), best of {repeat}:")  # fmt: skip
    peak = max(rss["rank0"], *rss["workers"])
    print(f"  pyvips          {vips[0]:6.2f} s  peak {vips[1]:5.0f} MiB")
    print(f"  OpenCV 2 thr.   {opencv[0]:6.2f} s  peak {opencv[1]:5.0f} MiB")
    workers = ", ".join(f"{v:.0f}" for v in rss["workers"])
    print(f"  cluster -n {ranks}    {seconds:6.2f} s  rank 0 {rss['rank0']:.0f} MiB, "
          f"workers {workers} MiB")  # fmt: skip
    print(f"  cluster / pyvips {seconds / vips[0]:.2f}x time, {peak / vips[1]:.2f}x peak memory "
          f"per rank; cluster / OpenCV {seconds / opencv[0]:.2f}x")  # fmt: skip
    times = {k: v for k, v in stats.items() if isinstance(v, float) and v >= 0.005}
    print("  cluster stats: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))
    print(f"  paths: {stats.get('paths')}; output {exact}")


def check_jpeg(source: Path, written: Path) -> str:
    """The cluster's JPEG decodes to the pixels of OpenCV's own encoding of the pipeline
    applied whole to OpenCV's decoding of the input (so every pixel before encoding was
    exact, and the encoding is OpenCV's)."""
    expected = Pipeline.parse(LIBVIPS_OPS).apply(cv2.imread(str(source)))
    plain = cv2.imdecode(cv2.imencode(".jpg", expected)[1], cv2.IMREAD_COLOR)
    assert np.array_equal(cv2.imread(str(written)), plain), "the output differs"
    return "decodes exactly to OpenCV's encoding of the whole-image result"


OPENCV_RESIZE = """
import cv2, sys
cv2.setNumThreads(2)
im = cv2.imread(sys.argv[1], cv2.IMREAD_UNCHANGED)
h, w = im.shape[:2]
mode = {"cubic": cv2.INTER_CUBIC, "lanczos": cv2.INTER_LANCZOS4}[sys.argv[3]]
cv2.imwrite(sys.argv[2], cv2.resize(im, (w * 9 // 10, h * 9 // 10), interpolation=mode))
"""


def resize_task(size: int, ranks: int, interpolation: str) -> None:
    """A cubic or lanczos resize to 90 % (no power-of-two period: cut row by row) of a
    ``size``-square RGB BigTIFF by reference, against OpenCV in one process, one run."""
    ops = [f"resize:width={size * 9 // 10},height={size * 9 // 10},interpolation={interpolation}"]
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        root = Path(folder)
        write_input(root / "in.tif", size)
        opencv = timed_process(OPENCV_RESIZE, str(root / "in.tif"), str(root / "o.tif"),
                               interpolation)  # fmt: skip
        seconds, rss = cluster_run(root, ranks, ops)
        checked = check(root, size, 20000 * 20000, ops)
    workers = ", ".join(f"{v:.0f}" for v in rss["workers"])
    print(f"{size}x{size} RGB BigTIFF, {ops[0]}, -n {ranks}: {seconds:.1f} s; exact ({checked})")
    print(f"peak RSS: rank 0 {rss['rank0']:.0f} MiB, workers {workers} MiB")
    print(f"OpenCV in one process, 2 threads (imread, resize, imwrite): {opencv[0]:.1f} s, "
          f"peak {opencv[1]:.0f} MiB; cluster {seconds / opencv[0]:.2f}x its time")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["memory", "libvips", "resize"], default="memory")
    parser.add_argument("--interpolation", choices=["cubic", "lanczos"], default="cubic")
    parser.add_argument("--size", type=int, default=16000)
    parser.add_argument("--ranks", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--check-max", type=int, default=20000 * 20000)
    parser.add_argument("--no-pyvips", action="store_true", help="skip the pyvips comparison")
    args = parser.parse_args()
    if args.task == "libvips":
        libvips_task(args.ranks, args.repeat)
        return
    if args.task == "resize":
        resize_task(args.size, args.ranks, args.interpolation)
        return
    with tempfile.TemporaryDirectory(dir="/tmp") as folder:
        root = Path(folder)
        write_input(root / "in.tif", args.size)
        seconds, rss = cluster_run(root, args.ranks, OPS)
        checked = check(root, args.size, args.check_max)
        vips = None
        if not args.no_pyvips:
            vips = timed_process(PYVIPS_MEMORY_TASK, str(root / "in.tif"), str(root / "v.tif"))
    megapixels = args.size * args.size / 1e6
    print(
        f"{args.size}x{args.size} RGB BigTIFF, {' -> '.join(OPS)}, -n {args.ranks}: "
        f"{seconds:.1f} s, {megapixels / seconds:.1f} Mpixel/s; exact ({checked})"
    )
    workers = ", ".join(f"{v:.0f}" for v in rss["workers"])
    print(f"peak RSS: rank 0 {rss['rank0']:.0f} MiB, workers {workers} MiB")
    if vips is not None:
        print(
            f"pyvips, the same kernels (gaussblur sigma 1.7, sobel): {vips[0]:.1f} s, "
            f"{megapixels / vips[0]:.1f} Mpixel/s, peak {vips[1]:.0f} MiB; cluster throughput "
            f"{vips[0] / seconds:.2f}x pyvips'"
        )


if __name__ == "__main__":
    main()

"""Check a run's outputs against the local reference: ``mpi-imgproc verify``.

For every input (or a random sample) the expected output is recomputed in this process with
``Pipeline.apply`` on the decoded input, found by the same output-path rule as ``run`` and
``submit``, and compared with the file that is there.  The expected output is the reference as
it would be written: encoded with the output's encoder and decoded again.  For PNG and TIFF this
changes nothing; for JPEG it makes the comparison exact, because the same encoder given the same
pixels writes the same bytes — so any difference, lossy format or not, is a real one.

Inputs that cannot be decoded are listed apart: they say nothing about the processing.
"""

from __future__ import annotations

import argparse
import os
import random
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .cli import add_output_options, add_pipeline_options, output_paths, pipeline_from_args
from .errors import ImageReadError, ImgprocError, describe
from .imageio import decode, encode, expand_inputs, read_image
from .pipeline import Pipeline

MISMATCHES = ("missing", "differs")  # the statuses that make verify fail
_LABELS = {
    "differs": "differs",
    "missing": "missing",
    "unreadable": "unreadable input",
    "no_reference": "reference fails too (no output expected)",
}


@dataclass(frozen=True)
class Outcome:
    """The verdict on one input's output.

    ``status`` is ``ok``, ``differs``, ``missing`` (mismatches), ``unreadable`` (the input does
    not decode) or ``no_reference`` (the reference itself fails, so no output is right).
    """

    source: str
    target: Path
    status: str
    detail: str = ""

    def line(self) -> str:
        """One line for a person, naming the file and the cause."""
        if self.status in ("unreadable", "no_reference"):
            return f"{_LABELS[self.status]}: {self.source}: {self.detail}"
        detail = f": {self.detail}" if self.detail else ""
        return f"{_LABELS[self.status]}: {self.target} (input {self.source}){detail}"


def compare(expected: np.ndarray, actual: np.ndarray) -> str | None:
    """None if the arrays are identical, else what differs: shape, dtype or pixels."""
    if expected.shape != actual.shape or expected.dtype != actual.dtype:
        return f"shape {actual.shape} {actual.dtype}, expected {expected.shape} {expected.dtype}"
    diff = cv2.absdiff(expected, actual)
    per_pixel = diff if diff.ndim == 2 else diff.max(axis=2)
    count = int(np.count_nonzero(per_pixel))
    if count == 0:
        return None
    y, x = (int(v) for v in np.argwhere(per_pixel)[0])
    return (
        f"{count} of {per_pixel.size} pixels differ (first at y={y}, x={x}), "
        f"max abs diff {int(diff.max())}"
    )


def as_written(image: np.ndarray, target: Path) -> np.ndarray:
    """``image`` as it reads back once written to ``target`` (JPEG's loss included)."""
    return decode(encode(image, target.suffix))


def check_one(pipeline: Pipeline, source: str, target: Path) -> Outcome:
    """Recompute one output and compare it with the file at ``target``."""
    try:
        image = read_image(source)
    except ImageReadError as exc:
        return Outcome(source, target, "unreadable", str(exc))
    try:
        expected = as_written(pipeline.apply(image), target)
    except Exception as exc:  # noqa: BLE001 - the run fails on this image too
        if target.exists():
            return Outcome(
                source, target, "differs", f"exists, but the reference fails: {describe(exc)}"
            )
        return Outcome(source, target, "no_reference", describe(exc))
    if not target.exists():
        return Outcome(source, target, "missing")
    try:
        actual = read_image(target)
    except ImageReadError as exc:
        return Outcome(source, target, "differs", f"output unreadable: {exc}")
    problem = compare(expected, actual)
    return Outcome(source, target, "differs" if problem else "ok", problem or "")


def choose(count: int, sample: int | None, seed: int) -> list[int]:
    """Indices to check, in input order: all of them, or ``sample`` drawn with ``seed``."""
    if sample is None or sample >= count:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), sample))


def verify(
    pipeline: Pipeline, sources: Sequence[str], targets: Sequence[Path], workers: int | None
) -> list[Outcome]:
    """Check each source's output, in a thread pool (OpenCV releases the GIL)."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(lambda st: check_one(pipeline, *st), zip(sources, targets)))


def report(outcomes: list[Outcome], total: int, elapsed: float) -> int:
    """Print every problem and a summary line; 1 if any output is missing or differs."""
    for outcome in outcomes:
        if outcome.status != "ok":
            print(outcome.line())
    counts = Counter(o.status for o in outcomes)
    print(
        f"verify: checked {len(outcomes)} of {total} inputs: {counts['ok']} outputs match, "
        f"{counts['differs']} differ, {counts['missing']} missing; "
        f"{counts['unreadable']} inputs unreadable, {counts['no_reference']} failing in the "
        f"reference too; {elapsed:.2f} s"
    )
    return 1 if any(counts[s] for s in MISMATCHES) else 0


def cmd_verify(args: argparse.Namespace) -> int:
    """Recompute outputs with the local reference and report every mismatch."""
    pipeline = pipeline_from_args(args)
    if args.sample is not None and args.sample < 1:
        raise ImgprocError(f"verify: --sample must be >= 1, got {args.sample}")
    files = expand_inputs(args.input)
    if not files:
        raise ImgprocError(f"verify: no input files in {', '.join(args.input)}")
    targets = output_paths(files, args.output, args.format)
    chosen = choose(len(files), args.sample, args.seed)
    started = time.perf_counter()
    outcomes = verify(
        pipeline, [files[i] for i in chosen], [targets[i] for i in chosen], args.workers
    )
    return report(outcomes, len(files), time.perf_counter() - started)


def add_verify_command(sub: argparse._SubParsersAction) -> None:
    """Register ``verify`` on the ``mpi-imgproc`` parser."""
    cmd = sub.add_parser("verify", help="recompute outputs locally and report every mismatch")
    cmd.add_argument(
        "--input", action="append", required=True, help="folder, glob or file (repeatable)"
    )
    add_output_options(cmd)
    add_pipeline_options(cmd)
    which = cmd.add_mutually_exclusive_group()
    which.add_argument("--sample", type=int, metavar="N", help="check N random inputs")
    which.add_argument("--all", action="store_true", help="check every input (the default)")
    cmd.add_argument("--seed", type=int, default=0, help="seed of the --sample draw")
    cmd.add_argument("--workers", type=int, default=None, help="threads (default: cores)")
    cmd.set_defaults(func=cmd_verify)

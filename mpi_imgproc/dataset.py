"""Synthetic data sets for tests, demos and benchmarks: ``mpi-imgproc gen-dataset DIR``.

Images look like photos or scans — gradients, soft texture, shapes, text and sensor noise —
rather than pure noise, so that JPEG sizes and filter costs are like those of real collections.
Optional extras: large images (to exercise tiling), 16-bit and gray images, and bad files of
the kinds real collections contain (truncated JPEG, zero bytes, text with an image suffix, random
bytes).  A truncated JPEG matters most: OpenCV decodes it with only a warning, so only
``imageio.decode``'s own check stops it.

Every file is made from its own random generator seeded by ``(seed, kind, index)``, so a data
set is the same byte for byte whatever the number of threads; files are made in a thread pool
(OpenCV's drawing, filtering and encoding release the GIL).  ``dataset.json`` beside the files
lists each file with its kind, shape, size and, for a bad file, the error reading it must raise.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .errors import InvalidParameter
from .imageio import encode

IMAGE_FORMATS = ("jpg", "png", "tif")
MANIFEST = "dataset.json"
# Each bad-file kind: its suffix, and the start of the message ``imageio.read_image`` gives.
CORRUPTIONS: dict[str, tuple[str, str]] = {
    "truncated-jpeg": (".jpg", "truncated JPEG"),
    "empty": (".png", "empty file"),
    "text": (".jpg", "not an image"),
    "random-bytes": (".tif", "not an image"),
    "truncated-png": (".png", "truncated PNG"),
}
_GRID = 64  # backgrounds are made at this size, then stretched
_KIND_CODES = {"image": 0, "large": 1, "corrupt": 2}  # part of each file's seed
_FONTS = (
    cv2.FONT_HERSHEY_SIMPLEX,
    cv2.FONT_HERSHEY_DUPLEX,
    cv2.FONT_HERSHEY_COMPLEX,
    cv2.FONT_HERSHEY_TRIPLEX,
    cv2.FONT_HERSHEY_PLAIN,
)
_WORDS = (
    "invoice sample batch north river field report total page figure scan station node "
    "cluster image lens harbour winter 2024 0.75 A-17 survey plate archive index summary"
).split()


@dataclass(frozen=True)
class DatasetSpec:
    """What to generate; see ``mpi-imgproc gen-dataset --help`` for each field."""

    count: int = 100
    min_size: int = 300
    max_size: int = 600
    formats: tuple[str, ...] = ("jpg",)
    large: int = 0
    large_size: int = 4000
    corrupt: int = 0
    seed: int = 0
    gray: float = 0.15
    uint16: float = 0.0

    def validate(self) -> None:
        """Raise InvalidParameter naming the first bad field."""
        for name in ("count", "large", "corrupt"):
            if getattr(self, name) < 0:
                raise InvalidParameter(f"gen-dataset: --{name} must be >= 0")
        if not 1 <= self.min_size <= self.max_size:
            raise InvalidParameter(
                f"gen-dataset: need 1 <= --min-size <= --max-size, "
                f"got {self.min_size} and {self.max_size}"
            )
        if self.large_size < 16:
            raise InvalidParameter(
                f"gen-dataset: --large-size must be >= 16, got {self.large_size}"
            )
        unknown = sorted(set(self.formats) - set(IMAGE_FORMATS))
        if unknown or not self.formats:
            raise InvalidParameter(
                f"gen-dataset: --formats takes {','.join(IMAGE_FORMATS)}, got {','.join(unknown)}"
            )
        for name in ("gray", "uint16"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InvalidParameter(f"gen-dataset: --{name} is a fraction in [0, 1]")


@dataclass(frozen=True)
class PlannedFile:
    """One file to make: its name, kind (``image``, ``large`` or ``corrupt``) and index."""

    name: str
    kind: str
    index: int
    corruption: str | None = None


def plan(spec: DatasetSpec) -> list[PlannedFile]:
    """Every file of the data set, named by kind and index; formats and corruptions cycle."""
    fmts = spec.formats
    files = [
        PlannedFile(f"img{i:05d}.{fmts[i % len(fmts)]}", "image", i) for i in range(spec.count)
    ]
    files += [
        PlannedFile(f"large{i:03d}.{fmts[i % len(fmts)]}", "large", i) for i in range(spec.large)
    ]
    kinds = list(CORRUPTIONS)
    for i in range(spec.corrupt):
        kind = kinds[i % len(kinds)]
        name = f"corrupt-{kind}-{i:03d}{CORRUPTIONS[kind][0]}"
        files.append(PlannedFile(name, "corrupt", i, kind))
    return files


def file_rng(spec: DatasetSpec, planned: PlannedFile) -> np.random.Generator:
    """The file's own generator: the same bytes whatever order files are made in."""
    return np.random.default_rng([spec.seed, _KIND_CODES[planned.kind], planned.index])


def _background(rng: np.random.Generator, height: int, width: int, paper: bool) -> np.ndarray:
    """A linear colour gradient plus soft low-frequency texture (uint8 BGR).

    Made on a 64x64 grid and then stretched: a linear ramp stays linear under linear
    interpolation, and the full-size float arithmetic would cost more than the rest together.
    """
    low, high = (200, 256) if paper else (0, 256)
    start, end = rng.integers(low, high, 3), rng.integers(low, high, 3)
    angle = rng.uniform(0, 2 * np.pi)
    axis = np.linspace(0, 1, _GRID, dtype=np.float32)
    ramp = axis[None, :] * np.cos(angle) + axis[:, None] * np.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    spread = 12 if paper else 45
    coarse = rng.uniform(-spread, spread, (rng.integers(3, 9), rng.integers(3, 9), 3))
    texture = cv2.resize(coarse.astype(np.float32), (_GRID, _GRID), interpolation=cv2.INTER_CUBIC)
    grid = start.astype(np.float32) + ramp[..., None] * (end - start).astype(np.float32) + texture
    grid = np.clip(grid, 0, 255).astype(np.uint8)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_LINEAR)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))  # type: ignore[return-value]


def _draw_shapes(rng: np.random.Generator, image: np.ndarray, count: int) -> None:
    """Filled and outlined circles, rectangles, ellipses, lines and polygons, anti-aliased."""
    height, width = image.shape[:2]
    scale = min(height, width)
    for _ in range(count):
        kind = rng.integers(0, 5)
        colour, line = _colour(rng), cv2.LINE_AA
        thickness = -1 if rng.random() < 0.5 else int(rng.integers(1, max(2, scale // 60)))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        size = int(rng.integers(scale // 20, scale // 3 + 2))
        if kind == 0:
            cv2.circle(image, (x, y), size, colour, thickness, line)
        elif kind == 1:
            cv2.rectangle(image, (x, y), (x + size, y + size // 2), colour, thickness, line)
        elif kind == 2:
            angle = float(rng.uniform(0, 180))
            cv2.ellipse(
                image, (x, y), (size, size // 3 + 1), angle, 0, 360, colour, thickness, line
            )
        elif kind == 3:
            end = (int(rng.integers(0, width)), int(rng.integers(0, height)))
            cv2.line(image, (x, y), end, colour, max(thickness, 1), line)
        else:
            points = rng.integers(0, (width, height), (int(rng.integers(3, 7)), 2), dtype=np.int32)
            cv2.fillPoly(image, [points], colour, line)


def _draw_text(rng: np.random.Generator, image: np.ndarray, lines: int, ink: bool) -> None:
    """Lines of words with ``cv2.putText``: dark ink on paper, or any colour on a photo."""
    height, width = image.shape[:2]
    scale = max(0.3, min(height, width) / 500)
    step = max(12, int(height / (lines + 1)))
    for row in range(lines):
        words = " ".join(rng.choice(_WORDS, int(rng.integers(2, 7))))
        colour = tuple(int(c) for c in rng.integers(0, 70, 3)) if ink else _colour(rng)
        font = int(rng.choice(_FONTS))
        origin = (int(rng.integers(0, max(1, width // 4))), step * (row + 1))
        size = float(scale * rng.uniform(0.6, 1.4))
        cv2.putText(image, words, origin, font, size, colour, max(1, int(scale * 1.5)), cv2.LINE_AA)


def _add_noise(rng: np.random.Generator, image: np.ndarray, bits: int) -> np.ndarray:
    """Sensor-like noise of +-2**(bits-1), from raw random bytes (the cheapest source)."""
    noise = np.frombuffer(rng.bytes(image.size), np.uint8).reshape(image.shape)
    noise = noise & np.uint8((1 << bits) - 1)
    half = float(1 << (bits - 1))
    return cv2.subtract(cv2.add(image, noise), (half, half, half, 0))


def synth_image(
    rng: np.random.Generator, height: int, width: int, gray: bool = False, deep: bool = False
) -> np.ndarray:
    """A photo- or scan-like BGR (or gray) image of 8 (or 16) bits."""
    paper = rng.random() < 0.3
    image = _background(rng, height, width, paper)
    _draw_shapes(rng, image, int(rng.integers(1, 4) if paper else rng.integers(3, 12)))
    _draw_text(rng, image, int(rng.integers(8, 25) if paper else rng.integers(1, 4)), ink=paper)
    if rng.random() < 0.5:  # a soft lens
        image = cv2.GaussianBlur(image, (0, 0), float(rng.uniform(0.5, 1.5)))
    image = _add_noise(rng, image, int(rng.integers(2, 5)))
    if gray:
        image = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if deep:  # spread to 16 bits, with low bits that are not all zero
        low = rng.integers(0, 256, image.shape, dtype=np.uint16)
        image = image.astype(np.uint16) * 256 + low
    return image


def corrupt_bytes(rng: np.random.Generator, kind: str) -> bytes:
    """The content of a bad file of ``kind`` (see ``CORRUPTIONS``)."""
    if kind == "empty":
        return b""
    if kind == "text":
        return ("This is a note saved with an image suffix.\n" * 20).encode()
    if kind == "random-bytes":
        return rng.integers(0, 256, int(rng.integers(500, 20000)), dtype=np.uint8).tobytes()
    fmt = "jpg" if kind == "truncated-jpeg" else "png"
    whole = encode(synth_image(rng, 240, 320), fmt)
    return whole[: int(len(whole) * rng.uniform(0.3, 0.8))]


def _image_for(spec: DatasetSpec, planned: PlannedFile, rng: np.random.Generator) -> np.ndarray:
    """Pick size, gray and depth for one image and synthesize it."""
    if planned.kind == "large":
        long_side = spec.large_size
        short_side = int(long_side * rng.uniform(0.6, 1.0))
        height, width = (short_side, long_side) if rng.random() < 0.5 else (long_side, short_side)
    else:
        height, width = (int(v) for v in rng.integers(spec.min_size, spec.max_size + 1, 2))
    gray = rng.random() < spec.gray
    deep = not planned.name.endswith(".jpg") and rng.random() < spec.uint16
    return synth_image(rng, height, width, gray, deep)


def make_file(folder: Path, spec: DatasetSpec, planned: PlannedFile) -> dict[str, Any]:
    """Write one planned file; returns its manifest entry."""
    rng = file_rng(spec, planned)
    entry: dict[str, Any] = {"name": planned.name, "kind": planned.kind}
    if planned.corruption:
        data = corrupt_bytes(rng, planned.corruption)
        entry["corruption"] = planned.corruption
        entry["expected_error"] = CORRUPTIONS[planned.corruption][1]
    else:
        image = _image_for(spec, planned, rng)
        data = encode(image, Path(planned.name).suffix)
        entry["shape"] = list(image.shape)
        entry["dtype"] = str(image.dtype)
    (folder / planned.name).write_bytes(data)
    entry["bytes"] = len(data)
    return entry


def generate(
    folder: str | Path, spec: DatasetSpec, workers: int | None = None
) -> list[dict[str, Any]]:
    """Write the data set and its ``dataset.json``; returns the manifest's file entries."""
    spec.validate()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    planned = plan(spec)
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        entries = list(pool.map(lambda p: make_file(folder, spec, p), planned))
    manifest = {"spec": asdict(spec), "files": entries}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return entries


def summarize(entries: list[dict[str, Any]]) -> list[str]:
    """Lines for a person: counts and bytes per kind and format."""
    groups: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    for entry in entries:
        key = entry["kind"]
        if key != "corrupt":
            key += " " + Path(entry["name"]).suffix.lstrip(".")
        groups[key] += 1
        sizes[key] += entry["bytes"]
    lines = [f"  {key:<12} {groups[key]:>6} files {sizes[key] / 1e6:>10.2f} MB" for key in groups]
    kinds = Counter(e["corruption"] for e in entries if e["kind"] == "corrupt")
    if kinds:
        lines.append("  bad files: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    return lines


def parse_formats(text: str) -> tuple[str, ...]:
    """``--formats``: a comma list such as ``jpg,png`` (checked by ``DatasetSpec.validate``)."""
    return tuple(f.strip().lower().lstrip(".") for f in text.split(",") if f.strip())


def cmd_gen_dataset(args: argparse.Namespace) -> int:
    """Generate the data set and print what was written."""
    spec = DatasetSpec(**{f.name: getattr(args, f.name) for f in fields(DatasetSpec)})
    started = time.perf_counter()
    entries = generate(args.dir, spec, args.workers)
    elapsed = time.perf_counter() - started
    total = sum(e["bytes"] for e in entries)
    print(f"wrote {len(entries)} files, {total / 1e6:.2f} MB, to {args.dir} in {elapsed:.2f} s")
    print("\n".join(summarize(entries)))
    print(f"manifest: {Path(args.dir) / MANIFEST}")
    return 0


def add_dataset_command(sub: argparse._SubParsersAction) -> None:
    """Register ``gen-dataset`` on the ``mpi-imgproc`` parser."""
    gen = sub.add_parser("gen-dataset", help="write a synthetic, photo-like data set")
    gen.add_argument("dir", metavar="DIR", help="folder to write (created if missing)")
    gen.add_argument("--count", type=int, default=100, help="number of ordinary images")
    gen.add_argument("--min-size", type=int, default=300, help="smallest width or height")
    gen.add_argument("--max-size", type=int, default=600, help="largest width or height")
    gen.add_argument(
        "--formats", type=parse_formats, default=("jpg",), help="jpg,png,tif or some (cycled)"
    )
    gen.add_argument("--large", type=int, default=0, metavar="K", help="also K large images")
    gen.add_argument("--large-size", type=int, default=4000, help="long side of large images")
    gen.add_argument("--corrupt", type=int, default=0, metavar="K", help="also K bad files")
    gen.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    gen.add_argument("--gray", type=float, default=0.15, help="fraction of gray images")
    gen.add_argument(
        "--uint16", type=float, default=0.0, help="fraction of png/tif images made 16-bit"
    )
    gen.add_argument("--workers", type=int, default=None, help="threads (default: cores)")
    gen.set_defaults(func=cmd_gen_dataset)

"""Whole-image tasks: one image, the whole pipeline, on one worker.

Small images are cheaper to send whole than to cut: the worker decodes, runs the pipeline
(``Pipeline.apply``, the reference itself, so the result is exact by definition) and encodes,
and rank 0 only moves bytes.  The input is raw pixels, encoded file bytes, or — on a shared
file system — a path the worker reads itself; the output likewise: raw pixels, encoded bytes,
or a file the worker writes (atomically).

A task is a JSON-ready ``spec`` plus at most one buffer; the same function runs it on a worker
rank and on rank 0 when it runs alone.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LimitExceeded
from .imageio import decode, encode, read_image, write_atomic
from .pipeline import Pipeline

PIXELS, ENCODED, PATH = "pixels", "encoded", "path"


def as_buffer(data: bytes | memoryview) -> np.ndarray:
    """Encoded bytes as a 1-D uint8 array, the form MPI sends (no copy)."""
    return np.frombuffer(data, dtype=np.uint8)


def check_pixel_limit(shape: tuple[int, ...], max_pixels: int) -> None:
    """Raise LimitExceeded for an image with more than ``max_pixels`` pixels."""
    if shape[0] * shape[1] > max_pixels:
        raise LimitExceeded(
            f"{shape[1]}x{shape[0]} has more than the server's limit of {max_pixels} pixels "
            "(--max-pixels)"
        )


def run_image_task(
    spec: dict[str, Any], payload: np.ndarray | None
) -> tuple[np.ndarray | None, dict]:
    """Run one whole-image task; returns the result buffer (or None) and header fields.

    ``spec``: ``pipeline`` (JSON list), ``input`` (pixels | encoded | path), ``output``
    (pixels | encoded | path), ``format`` (an encoding, for encoded/path output), and the
    ``source``/``target`` paths for path input/output.
    """
    pipeline = Pipeline.from_json(spec["pipeline"])
    started = time.perf_counter()
    if spec["input"] == PATH:
        image = read_image(spec["source"])
    elif spec["input"] == ENCODED:
        assert payload is not None
        image = decode(payload.data)
    else:
        assert payload is not None
        image = payload
    if "max_pixels" in spec:
        check_pixel_limit(image.shape, spec["max_pixels"])
    decoded = time.perf_counter()
    result = pipeline.apply(image)
    fields: dict[str, Any] = {"out_shape": list(result.shape), "out_dtype": str(result.dtype)}
    fields["decode_s"] = decoded - started if spec["input"] != PIXELS else 0.0
    if spec["output"] == PIXELS:
        return np.ascontiguousarray(result), fields
    encoding = time.perf_counter()
    data = encode(result, spec["format"])
    fields["encode_s"] = time.perf_counter() - encoding
    if spec["output"] == ENCODED:
        return as_buffer(data), fields
    write_atomic(Path(spec["target"]), data)
    fields["written"] = spec["target"]
    fields["bytes"] = len(data)
    return None, fields

"""Whole-image tasks: one image, the whole pipeline, on one worker.

Small images are cheaper to send whole than to cut: the worker decodes, runs the pipeline
(``Pipeline.apply``, the reference itself, so the result is exact by definition) and encodes,
and rank 0 only moves bytes.  The input is raw pixels, encoded file bytes, or — on a shared
file system — a path the worker reads itself; the output likewise: raw pixels, encoded bytes,
or a file the worker writes (atomically).

A task is a JSON-ready ``spec`` plus at most one buffer; the same function runs it on a worker
rank and on rank 0 when it runs alone.

With ``max_pixels`` in the spec, the limit holds before the memory is spent: an encoded image's
size is read from its header and checked, with every op's output size, before it is decoded;
raw pixels are checked, with every op's output size, before the pipeline runs.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .datapaths import read_beneath, use_beneath, write_beneath
from .imageio import decode, encode, probe, read_bytes, write_atomic
from .pipeline import Pipeline
from .pipeline import check_pixel_limit as _check_pixels

PIXELS, ENCODED, PATH = "pixels", "encoded", "path"


def as_buffer(data: bytes | memoryview) -> np.ndarray:
    """Encoded bytes as a 1-D uint8 array, the form MPI sends (no copy)."""
    return np.frombuffer(data, dtype=np.uint8)


def check_pixel_limit(shape: tuple[int, ...], max_pixels: int) -> None:
    """Raise LimitExceeded for an image with more than ``max_pixels`` pixels.

    The image alone; ``Pipeline.check_pixel_limit`` also checks every op's output.
    """
    _check_pixels(shape, max_pixels)


def _probed_shape(data: bytes) -> tuple[int, ...] | None:
    """The array shape ``decode`` will give ``data``, from its header; None if unknown."""
    probed = probe(data)
    if probed is None:
        return None
    height, width, channels, _ = probed
    return (height, width) if channels == 1 else (height, width, channels)


def run_image_task(
    spec: dict[str, Any], payload: np.ndarray | None
) -> tuple[np.ndarray | None, dict]:
    """Run one whole-image task; returns the result buffer (or None) and header fields.

    ``spec``: ``pipeline`` (JSON list), ``input`` (pixels | encoded | path), ``output``
    (pixels | encoded | path), ``format`` (an encoding, for encoded/path output), and the
    ``source``/``target`` paths for path input/output.
    """
    pipeline = Pipeline.from_json(spec["pipeline"])
    max_pixels = spec.get("max_pixels")
    started = time.perf_counter()
    if spec["input"] in (PATH, ENCODED):
        if spec["input"] == PATH:
            root = spec.get("root")  # a job by reference: the open is checked again
            data = read_beneath(root, spec["source"]) if root else read_bytes(spec["source"])
        else:
            assert payload is not None
            data = payload.tobytes() if isinstance(payload, np.ndarray) else bytes(payload)
        if max_pixels is not None:
            shape = _probed_shape(data)  # refuse before decoding, when the header tells
            if shape is not None:
                pipeline.check_pixel_limit(shape, max_pixels)
        image = decode(data)
    else:
        assert payload is not None
        image = payload
    if max_pixels is not None:
        pipeline.check_pixel_limit(image.shape, max_pixels)
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
    if spec.get("root"):
        write_beneath(spec["root"], spec["target"], data)
    else:
        write_atomic(Path(spec["target"]), data)
    fields["written"] = spec["target"]
    fields["bytes"] = len(data)
    return None, fields


def run_region_tasks(engine: Any, headers: list[dict[str, Any]]) -> list[Any]:
    """Region tasks of one stage: each reads its region of ``source`` (never the whole image),
    runs the stage, and writes its core into ``target``; None or the exception, per task.

    The regions go through the engine as one batch, so its workers share them; a batch that
    fails is run again task by task to find which one.
    """
    from .pipeline import stage_from_text
    from .regionio import open_region
    from .shm import SegmentReader, write_rows

    stage = stage_from_text(headers[0]["stage"])
    readers: dict[str, Any] = {}

    def reader(h: dict[str, Any]) -> Any:
        if h["source"] not in readers:
            if "source_layout" in h:  # a same-host client's segment, held by rank 0
                readers[h["source"]] = SegmentReader(h["source"], h["source_layout"])
            else:
                opener = partial(open_region, name=h["source"])
                readers[h["source"]] = use_beneath(h.get("root"), h["source"], opener)
        return readers[h["source"]]

    def run(batch: list[dict[str, Any]]) -> None:
        regions = [reader(h).read(*h["region"]) for h in batch]
        results = engine.run(stage, regions, [tuple(h["margins"]) for h in batch])
        for h, result in zip(batch, results):
            y0, x0 = h["core"][0], h["core"][2]
            if "target_layout" in h:
                write_rows(h["target"], h["target_layout"], y0, x0, result)
                continue
            writer = partial(_write_core, core=h["core"], block=result)
            use_beneath(h.get("root"), h["target"], writer, entry=True)

    try:
        try:
            run(headers)
            return [None] * len(headers)
        except Exception:  # noqa: BLE001 - find the failing task by running them one by one
            pass
        outcomes: list[Any] = []
        for header in headers:
            try:
                run([header])
                outcomes.append(None)
            except Exception as exc:  # noqa: BLE001 - reported to rank 0 as this task's error
                # Without its traceback: that holds this frame, and so the open readers.
                outcomes.append(exc.with_traceback(None))
        return outcomes
    finally:  # a segment's descriptor pins the client's memory: never left to the collector
        for opened in readers.values():
            if hasattr(opened, "close"):
                opened.close()


def _write_core(path: str, core: Any, block: Any) -> None:
    from .regionio import write_region

    write_region(path, core[0], core[2], block)

"""Split images into tiles with halos, crop the halos back off, merge, and run pipelines tiled.

A tile has a *core* (the pixels it is responsible for) and a *region*: the core grown by the
halo on every side and clipped to the image.  The region is what an op sees.  Inner edges get
real neighbour pixels; at the true image border the region simply stops, so OpenCV's own border
rule (BORDER_REFLECT_101 for most filters) sees exactly what it sees on the whole image.  That
is why tiled results are bit-identical to whole-image results — including tiles smaller than
the halo, where the region simply spans several tiles' cores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .pipeline import Pipeline, ReduceStage, Stage, ViewStage, crop_halo

__all__ = [
    "Box",
    "Merger",
    "Tile",
    "crop_halo",
    "output_like",
    "run_pipeline",
    "run_stage",
    "split_with_halo",
    "tile_grid",
]

if TYPE_CHECKING:
    from .chain import ChainStage
    from .local_engines import Engine

Box = tuple[int, int, int, int]  # y0, y1, x0, x1 (half-open)


@dataclass(frozen=True)
class Tile:
    """One tile: the core it produces and the region (core plus halo) it reads."""

    index: int
    core: Box
    region: Box

    @property
    def margins(self) -> Box:
        """Halo widths (top, bottom, left, right) to crop off the region's result."""
        cy0, cy1, cx0, cx1 = self.core
        ry0, ry1, rx0, rx1 = self.region
        return cy0 - ry0, ry1 - cy1, cx0 - rx0, rx1 - cx1

    def region_of(self, image: np.ndarray) -> np.ndarray:
        """The region as a view into ``image`` (no copy)."""
        y0, y1, x0, x1 = self.region
        return image[y0:y1, x0:x1]


def tile_grid(height: int, width: int, tile_size: int, full_rows: bool = False) -> list[Box]:
    """Core boxes of a grid of ``tile_size`` squares; the last row and column may be smaller.

    ``tile_size <= 0`` means one tile covering the whole image; ``full_rows`` makes strips of
    ``tile_size`` rows that span the whole width.
    """
    if tile_size <= 0:
        return [(0, height, 0, width)]
    step_x = width if full_rows else tile_size
    return [
        (y, min(y + tile_size, height), x, min(x + step_x, width))
        for y in range(0, height, tile_size)
        for x in range(0, width, step_x)
    ]


def split_with_halo(
    height: int, width: int, tile_size: int, halo: int, full_rows: bool = False
) -> list[Tile]:
    """Tiles covering a ``height`` × ``width`` image, each with ``halo`` pixels of context."""
    tiles = []
    for i, (y0, y1, x0, x1) in enumerate(tile_grid(height, width, tile_size, full_rows)):
        region = (
            max(0, y0 - halo),
            min(height, y1 + halo),
            max(0, x0 - halo),
            min(width, x1 + halo),
        )
        tiles.append(Tile(i, (y0, y1, x0, x1), region))
    return tiles


class Merger:
    """Assembles tile results, in any arrival order, into one output image.

    The output is allocated from the first result (its dtype and channel count may differ from
    the input's, e.g. after ``grayscale``).  A single whole-image tile is taken as it is, since
    geometric ops change its shape.
    """

    def __init__(self, height: int, width: int, tiles: Sequence[Tile]):
        self.height, self.width = height, width
        self.single = len(tiles) == 1 and tiles[0].core == (0, height, 0, width)
        self.output: np.ndarray | None = None

    def place(self, tile: Tile, result: np.ndarray) -> None:
        """Write one tile's cropped result into the output (nothing to copy if the result was
        received straight into it, see ``view_for``)."""
        if self.single:
            self.output = result
            return
        if self.output is None:
            self.output = np.empty((self.height, self.width) + result.shape[2:], result.dtype)
        y0, y1, x0, x1 = tile.core
        if not np.may_share_memory(result, self.output):
            self.output[y0:y1, x0:x1] = result

    def view_for(self, tile: Tile, shape: Sequence[int], dtype: str) -> np.ndarray | None:
        """The tile's core in the output, to receive a result of ``shape``/``dtype`` into
        directly; None where that is not possible (one tile, another dtype, not contiguous)."""
        if self.single:
            return None
        if self.output is None:
            self.output = np.empty((self.height, self.width, *shape[2:]), np.dtype(dtype))
        y0, y1, x0, x1 = tile.core
        view = self.output[y0:y1, x0:x1]
        fits = view.shape == tuple(shape) and view.dtype == np.dtype(dtype)
        return view if fits and view.flags.c_contiguous else None


def output_like(stage: Stage, image: np.ndarray) -> np.ndarray:
    """An empty output for a tiled stage over ``image``: same height and width, with the dtype
    and channels the stage produces (found by running it on a 4×4 corner)."""
    height, width = image.shape[:2]
    probe = stage.process(image[: min(height, 4), : min(width, 4)])
    return np.empty((height, width) + probe.shape[2:], probe.dtype)


def run_stage(stage: Stage, image: np.ndarray, engine: Engine, tile_size: int) -> np.ndarray:
    """Run one stage over ``image`` in tiles through ``engine`` and return the merged result.

    Tile results are written straight into the output by the engine's workers (``run_into``),
    so the merge is spread over the workers and costs no extra copy.
    """
    height, width = image.shape[:2]
    if isinstance(stage, ViewStage):
        return stage.process(image)
    from .chain import ChainStage  # here: chain.py builds on this module

    if isinstance(stage, ChainStage):
        return _run_chain(stage, image, engine, tile_size)
    if isinstance(stage, ReduceStage):
        parts = split_with_halo(height, width, tile_size, 0)
        stats = engine.run(stage, [t.region_of(image) for t in parts], [t.margins for t in parts])
        stage = stage.applier(np.sum(stats, axis=0))
    size = 0 if stage.whole else tile_size
    tiles = split_with_halo(height, width, size, stage.halo, stage.full_rows)
    pieces, margins = [t.region_of(image) for t in tiles], [t.margins for t in tiles]
    if len(tiles) == 1:
        return engine.run(stage, pieces, margins)[0]
    out = output_like(stage, image)
    cores = [out[y0:y1, x0:x1] for y0, y1, x0, x1 in (t.core for t in tiles)]
    engine.run_into(stage, pieces, margins, cores)
    return out


def _run_chain(stage: ChainStage, image: np.ndarray, engine: Engine, tile_size: int) -> np.ndarray:
    """A chain's output strips, each from its own input window, assembled."""
    tiles = stage.tiles(tile_size)
    pieces = [t.region_of(image) for t in tiles]
    results = engine.run(stage, pieces, [stage.placement(t) for t in tiles])
    if len(tiles) == 1:
        return results[0]
    out = np.empty(stage.output_shape[:2] + results[0].shape[2:], results[0].dtype)
    for tile, result in zip(tiles, results):
        y0, y1, x0, x1 = tile.core
        out[y0:y1, x0:x1] = result
    return out


def run_pipeline(
    pipeline: Pipeline, image: np.ndarray, engine: Engine, tile_size: int
) -> np.ndarray:
    """Run every stage of ``pipeline`` tiled; bit-identical to ``pipeline.apply(image)``."""
    for stage in pipeline.stages_for(image.shape):
        image = run_stage(stage, image, engine, tile_size)
    return np.ascontiguousarray(image)  # a trailing view (flip, crop) becomes an image

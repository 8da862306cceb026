"""Tiling is exact: for every CPU op and pipeline, any image and tile size and every CPU engine,
the tiled result is bit-identical to the pipeline run on the whole image in one call."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import random_image
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from strategies import images, pipelines, tile_sizes

from mpi_imgproc.errors import ImgprocError
from mpi_imgproc.local_engines import get_engine
from mpi_imgproc.pipeline import Pipeline, TiledStage
from mpi_imgproc.tiling import Merger, run_pipeline, split_with_halo, tile_grid

FAST = settings(
    max_examples=int(os.environ.get("EXACTNESS_EXAMPLES", 150)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@pytest.fixture(scope="module")
def engines():
    made = {name: get_engine(name, 2) for name in ("sequential", "threads", "processes")}
    yield made
    for engine in made.values():
        engine.close()


def assert_tiled_equals_whole(specs, image, tile, engine):
    try:
        pipeline = Pipeline.parse(specs)
        expected = pipeline.apply(image)
    except ImgprocError as exc:  # an invalid combination must fail the same way when tiled
        with pytest.raises(type(exc)):
            run_pipeline(Pipeline.parse(specs), image, engine, tile)
        return
    out = run_pipeline(pipeline, image, engine, tile)
    assert out.dtype == expected.dtype and out.shape == expected.shape
    assert np.array_equal(out, expected), f"{specs} tile={tile} shape={image.shape}"


@FAST
@given(specs=pipelines, image=images(), tile=tile_sizes)
def test_sequential_engine_tiled_equals_whole(engines, specs, image, tile):
    assert_tiled_equals_whole(specs, image, tile, engines["sequential"])


@FAST
@given(specs=pipelines, image=images(), tile=tile_sizes)
def test_threads_engine_tiled_equals_whole(engines, specs, image, tile):
    assert_tiled_equals_whole(specs, image, tile, engines["threads"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=pipelines, image=images(max_side=40), tile=st.one_of(st.just(0), st.integers(4, 40)))
def test_processes_engine_tiled_equals_whole(engines, specs, image, tile):
    assert_tiled_equals_whole(specs, image, tile, engines["processes"])


@pytest.mark.parametrize("tile", [1, 2, 3, 7, 100])
def test_tiles_smaller_than_the_halo_are_exact(engines, tile):
    image = random_image(np.random.default_rng(7), 23, 31, 3)
    specs = ["gaussian_blur:ksize=15", "median_blur:ksize=7", "dilate:ksize=5,iterations=3"]
    assert_tiled_equals_whole(specs, image, tile, engines["sequential"])


def test_strips_without_halo_leave_seams_and_halos_remove_them():
    """The old server's bug: strips with no overlap are wrong near every cut; a halo of r − 1
    is still wrong; a halo of r is exact."""
    image = random_image(np.random.default_rng(3), 200, 200, 1)
    pipeline = Pipeline.parse(["box_blur:ksize=25"])
    expected = pipeline.apply(image)
    stage = pipeline.stages[0]
    assert isinstance(stage, TiledStage) and stage.halo == 12

    def tiled(halo: int) -> np.ndarray:
        tiles = split_with_halo(200, 200, 50, halo)
        merger = Merger(200, 200, tiles)
        for t in tiles:
            top, bottom, left, right = t.margins
            result = stage.process(t.region_of(image))
            merger.place(t, result[top : result.shape[0] - bottom, left : result.shape[1] - right])
        return merger.output

    wrong_rows = np.any(tiled(0) != expected, axis=1).sum()
    assert wrong_rows > 0
    assert not np.array_equal(tiled(11), expected)
    assert np.array_equal(tiled(12), expected)


def test_grid_covers_the_image_once_including_leftover_rows():
    cover = np.zeros((103, 57), int)
    for y0, y1, x0, x1 in tile_grid(103, 57, 10):
        cover[y0:y1, x0:x1] += 1
    assert (cover == 1).all()
    assert tile_grid(5, 5, 0) == [(0, 5, 0, 5)]


def test_regions_are_views_not_copies():
    image = np.zeros((30, 30), np.uint8)
    tile = split_with_halo(30, 30, 10, 2)[4]
    assert np.shares_memory(tile.region_of(image), image)

"""Chains (crop, flip, rotations, resize and tiled ops in one tiled pass) are exact.

Every chain's output, cut into strips as small as one row, equals ``Pipeline.apply`` on the
whole image bit for bit; the resizes are drawn with ratios whose period is short enough to be
chained, rotations with every interpolation and border, and the tests check that they were
chained and cut into several strips (a chain that silently fell back to a whole-image stage
would prove nothing).
"""

from __future__ import annotations

import math
import os
from unittest.mock import patch

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpi_imgproc import chain as chain_module
from mpi_imgproc.chain import ChainStage, resize_cut, resize_period, rotation_cut
from mpi_imgproc.errors import ImgprocError, UnsupportedImage
from mpi_imgproc.local_engines import get_engine
from mpi_imgproc.pipeline import Pipeline, stage_from_json
from mpi_imgproc.tiling import run_pipeline

MODES = ["nearest", "linear", "area", "cubic", "lanczos"]
# out/in ratios with short periods; cubic and lanczos are aligned at power-of-two periods and
# computed row by row at the others
RATIOS = [(1, 2), (1, 3), (2, 3), (3, 4), (9, 10), (11, 10), (3, 2), (2, 1), (5, 2), (4, 1)]
VIEWS = [
    "flip:axis=horizontal",
    "flip:axis=vertical",
    "flip:axis=both",
    "rotate:angle=90",
    "rotate:angle=180",
    "rotate:angle=270",
]
FILTERS = ["sharpen", "gaussian_blur:ksize=5", "sobel:ksize=3", "erode:ksize=3", "invert"]


@pytest.fixture(autouse=True)
def small_images_chain():
    """Rotations and row-by-row resizes of small images are chained here: by default only
    inputs of 128 Mpixel and more are (a cost rule, tested on its own), and the strips must be
    exact at any size."""
    with (
        patch.object(chain_module, "MIN_CHAINED_ROTATION_PIXELS", 0),
        patch.object(chain_module, "MIN_ROW_BY_ROW_PIXELS", 0),
    ):
        yield


@st.composite
def chains(draw):
    """(image, specs): an odd-sized image whose size fits the drawn ratio, and a chain."""
    p, q = draw(st.sampled_from(RATIOS))
    mode = draw(st.sampled_from(MODES))
    periods = draw(st.integers(3, 40 // q + 3))
    height = q * periods
    width = draw(st.integers(3, 41))
    channels = draw(st.sampled_from([1, 3]))
    shape = (height, width) if channels == 1 else (height, width, channels)
    image = draw(st.integers(0, 2**32 - 1).map(lambda s: np.random.default_rng(s)))
    pixels = image.integers(0, 256, shape, dtype=np.uint8)
    out_w = max(1, width * p // q)
    resize = f"resize:height={p * periods},width={out_w},interpolation={mode}"
    before = draw(st.lists(st.sampled_from(["flip:axis=both", "rotate:angle=180", *FILTERS]),
                           max_size=2))  # fmt: skip
    after = draw(st.lists(st.sampled_from(VIEWS + FILTERS), max_size=2))
    return pixels, [*before, resize, *after]


def _specs(stage: ChainStage) -> list[str]:
    return [f"resize:height={s.params['height']},width={s.params['width']},"
            f"interpolation={s.params['interpolation']}" if s.op.name == "resize" else ""
            for s in stage.steps]  # fmt: skip


def _check(pixels: np.ndarray, specs: list[str], tile: int, engine: str = "sequential") -> None:
    pipeline = Pipeline.parse(specs)
    expected = pipeline.apply(pixels)
    with get_engine(engine, 2) as eng:
        got = run_pipeline(pipeline, pixels, eng, tile)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert np.array_equal(got, expected), f"{specs} tile={tile}"


@settings(
    max_examples=int(os.environ.get("CHAIN_EXAMPLES", "120")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(chains(), st.integers(1, 9))
def test_chained_resize_equals_the_whole_image(chain, tile):
    pixels, specs = chain
    stages = Pipeline.parse(specs).stages_for(pixels.shape)
    resize = next(s for s in specs if s.startswith("resize"))
    mode = resize.rsplit("=", 1)[1]
    out_rows = int(resize.split("height=")[1].split(",")[0])
    out_cols = int(resize.split("width=")[1].split(",")[0])
    in_shape = Pipeline.parse(specs[: specs.index(resize)] or ["invert"]).output_shape(pixels.shape)
    if resize_cut(in_shape, (out_rows, out_cols), mode) is not None:
        (chain,) = [s for s in stages if isinstance(s, ChainStage) and resize in _specs(s)]
        assert len(chain.tiles(tile)) > 1 or out_rows <= 16 * max(tile, chain.min_rows())
    _check(pixels, specs, tile)


ONE_PASS = {
    "resize": ((220, 130, 3), np.uint8, ["crop:x=10,y=10,width=110,height=200",
                                         "resize:scale=0.9,interpolation=linear", "sharpen"]),
    "rotate": ((230, 170, 4), np.uint16, ["crop:x=5,y=7,width=150,height=200",
                                          "rotate:angle=-7.5,interpolation=lanczos", "sharpen"]),
}  # fmt: skip


@pytest.mark.parametrize("engine", ["threads", "processes"])
@pytest.mark.parametrize("case", ONE_PASS)
def test_crop_geometry_sharpen_is_one_tiled_pass(engine, case):
    """The libvips benchmark's pipeline, and a deskew in its place: one chain, many strips,
    exact on every engine."""
    shape, dtype, specs = ONE_PASS[case]
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)
    (stage,) = Pipeline.parse(specs).stages_for(pixels.shape)
    assert isinstance(stage, ChainStage) and len(stage.tiles(16)) > 5
    assert stage_from_json(stage.to_json()) == stage
    _check(pixels, specs, 16, engine)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ratio", [(9, 10), (11, 10), (1, 3), (7, 4), (5, 7), (10, 7), (5, 14),
                                   (3, 13)])  # fmt: skip
def test_resize_strips_are_exact_at_large_coordinates(mode, ratio):
    """Tall, narrow images: strips far from row 0, where coordinates are large."""
    p, q = ratio
    height = q * (30000 // q)
    pixels = np.random.default_rng(3).integers(0, 256, (height, 5, 3), dtype=np.uint8)
    specs = [f"resize:height={height * p // q},width=4,interpolation={mode}"]
    _check(pixels, specs, 997)


@pytest.mark.parametrize("rows", [(700, 500), (1000, 1429), (997, 13), (1201, 4000), (3, 1000)])
@pytest.mark.parametrize("cols", [(41, 29), (29, 41), (17, 17)])
def test_nearest_strips_gather_through_opencvs_own_maps(rows, cols):
    """Any sizes, no period: strips of a nearest resize index the rows OpenCV picks."""
    (h, out_h), (w, out_w) = rows, cols
    pixels = np.random.default_rng(h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    specs = [f"resize:height={out_h},width={out_w},interpolation=nearest", "flip:axis=both"]
    (stage,) = Pipeline.parse(specs).stages_for(pixels.shape)
    assert isinstance(stage, ChainStage)
    _check(pixels, specs, 7)


def test_an_enlarging_area_resize_runs_whole_and_exact():
    specs = ["resize:height=1000,width=40,interpolation=area", "sharpen"]
    pixels = np.random.default_rng(2).integers(0, 256, (700, 40, 3), dtype=np.uint8)
    stages = Pipeline.parse(specs).stages_for(pixels.shape)
    assert not any(isinstance(s, ChainStage) and len(s.steps) > 1 for s in stages)
    _check(pixels, specs, 16)


def test_halos_before_a_resize_make_strips_taller_not_reads_larger():
    specs = ["gaussian_blur:ksize=99", "resize:scale=0.5,interpolation=area"]
    (stage,) = Pipeline.parse(specs).stages_for((400, 300, 3))
    tiles = stage.tiles(1)
    read = sum((t.region[1] - t.region[0]) * (t.region[3] - t.region[2]) for t in tiles)
    assert read <= 3 * 400 * 300 and len(tiles) > 1


def test_single_precision_modes_without_a_short_period_go_row_by_row_on_large_images():
    """cubic/lanczos at a ratio of 9/10 would round differently in an aligned window: large
    inputs compute each row on its own, smaller ones run whole (cheaper)."""
    assert resize_period(1000, 900, "cubic") is None
    assert resize_period(1000, 500, "lanczos") == (1, 2)
    assert resize_period(1000, 999, "linear") is None  # period of 999 rows: too long
    specs = ["resize:scale=0.9,interpolation=cubic", "sharpen"]
    with patch.object(chain_module, "MIN_ROW_BY_ROW_PIXELS", 2**27):
        medium = Pipeline.parse(specs).stages_for((6000, 5000, 3))
        large = Pipeline.parse(specs).stages_for((12000, 11200))
    assert [type(s).__name__ for s in medium] == ["WholeStage", "TiledStage"]
    assert [type(s).__name__ for s in large] == ["ChainStage"]
    assert resize_cut((12000, 11200), (10800, 10080), "lanczos") == "rows"
    # the same width and a ratio this close to 1: the top window would be half the image
    assert resize_cut((100000, 1400), (99999, 1400), "lanczos") is None
    assert resize_cut((100000, 1400), (99999, 1401), "lanczos") == "rows"


@pytest.mark.parametrize("mode", ["cubic", "lanczos"])
@pytest.mark.parametrize("shape", [(301, 2011, 4), (411, 3001)])
def test_row_by_row_resizes_of_wide_images_are_exact(mode, shape):
    """Wide rows run OpenCV's vector loops and their tails; 16-bit BGRA and 8-bit gray."""
    dtype = np.uint16 if len(shape) == 3 else np.uint8
    pixels = np.random.default_rng(5).integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)
    specs = ["crop:x=3,y=2,width=1900,height=290", f"resize:scale=0.87,interpolation={mode}",
             "gaussian_blur:ksize=3"]  # fmt: skip
    (stage,) = Pipeline.parse(specs).stages_for(pixels.shape)
    assert isinstance(stage, ChainStage) and stage.links[1]._cut == "rows"
    _check(pixels, specs, 13, "threads")


def test_a_quarter_turn_after_a_resize_starts_a_new_chain():
    """Otherwise every strip of the turned image would need every row of the resize."""
    specs = ["resize:scale=0.5,interpolation=area", "rotate:angle=90", "sharpen"]
    stages = Pipeline.parse(specs).stages_for((64, 48, 3))
    assert [len(s.steps) for s in stages if isinstance(s, ChainStage)] == [1, 2]
    pixels = np.random.default_rng(1).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    _check(pixels, specs, 5)


@pytest.mark.parametrize(
    "specs",
    [
        ["flip:axis=both"],
        ["gamma", "flip:axis=vertical"],
        ["rotate:angle=90", "sharpen"],
        ["crop:x=1,y=1", "resize:scale=0.5,interpolation=nearest"],
        ["resize:scale=0.5,interpolation=area", "flip:axis=horizontal"],
    ],
)
def test_a_unit_channel_axis_comes_out_as_the_whole_image_shapes_it(specs):
    """(H, W, 1) arrays: views and gathers shape their result as OpenCV's kernels do."""
    pixels = np.random.default_rng(0).integers(0, 256, (10, 6, 1), dtype=np.uint8)
    for tile in (1, 3, 100):
        _check(pixels, specs, tile)


# ------------------------------------------------------------------ rotation by any angle


def test_by_default_only_large_images_chain_a_rotation():
    specs = ["sharpen", "rotate:angle=2", "sharpen"]
    with patch.object(chain_module, "MIN_CHAINED_ROTATION_PIXELS", 2**27):
        medium = Pipeline.parse(specs).stages_for((6000, 5000, 3))
        large = Pipeline.parse(specs).stages_for((12000, 11200))
    assert [type(s).__name__ for s in medium] == ["TiledStage", "WholeStage", "TiledStage"]
    assert [type(s).__name__ for s in large] == ["ChainStage"]


ROTATE_MODES = ["nearest", "linear", "cubic", "lanczos"]
ROTATE_NEIGHBOURS = ["crop:x=1,y=1", "gaussian_blur:ksize=3", "sharpen", "flip:axis=both",
                     "rotate:angle=180", "invert"]  # fmt: skip


@st.composite
def rotations(draw):
    """(image, specs, rotate spec): an odd-sized gray, BGR or BGRA image of 8 or 16 bits, and a
    rotation by an angle that is no quarter turn, with steps before and after it."""
    height, width = draw(st.integers(3, 41)), draw(st.integers(3, 41))
    channels = draw(st.sampled_from([1, 3, 4]))
    dtype = draw(st.sampled_from([np.uint8, np.uint16]))
    shape = (height, width) if channels == 1 else (height, width, channels)
    rng = draw(st.integers(0, 2**32 - 1).map(lambda s: np.random.default_rng(s)))
    pixels = rng.integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)
    angle = draw(st.one_of(
        st.floats(-360, 360, allow_nan=False).map(lambda a: round(a, 4)),
        st.sampled_from([45.0, -45.0, 0.5, -0.25, 89.99, 90.01, 135.0, 359.9]),
    ).filter(lambda a: a % 90 != 0))  # fmt: skip
    mode = draw(st.sampled_from(ROTATE_MODES))
    border = draw(st.sampled_from(["constant", "replicate"]))
    value = draw(st.sampled_from([0, 77, 255, 300, 65535]))
    rotate = f"rotate:angle={angle},interpolation={mode},border={border},value={value}"
    before = draw(st.lists(st.sampled_from(ROTATE_NEIGHBOURS), max_size=2))
    after = draw(st.lists(st.sampled_from(ROTATE_NEIGHBOURS + ["rotate:angle=90"]), max_size=2))
    return pixels, [*before, rotate, *after], rotate


@settings(
    max_examples=int(os.environ.get("CHAIN_EXAMPLES", "120")) * 2,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(rotations(), st.integers(1, 9))
def test_chained_rotation_equals_the_whole_image(chain, tile):
    """Strips are exact at any angle: the skew limit (a cost rule, tested below) is lifted so
    that steep rotations of these small images are chained too."""
    pixels, specs, rotate = chain
    with patch.object(chain_module, "MAX_ROTATION_SKEW", math.inf):
        _chained_rotation_equals_the_whole_image(pixels, specs, rotate, tile)


def _chained_rotation_equals_the_whole_image(pixels, specs, rotate, tile):
    pipeline = Pipeline.parse(specs)
    try:
        pipeline.output_shape(pixels.shape)
    except ImgprocError as exc:  # e.g. crops past a 1x1 canvas: tiled and whole refuse alike
        with pytest.raises(type(exc)) as whole:
            pipeline.apply(pixels)
        with get_engine("sequential", 2) as eng, pytest.raises(type(exc)) as tiled:
            run_pipeline(pipeline, pixels, eng, tile)
        assert str(tiled.value) == str(whole.value) == str(exc)
        return
    stages = pipeline.stages_for(pixels.shape)
    step = Pipeline.parse([rotate]).steps[0]
    if rotation_cut(step.params):
        (stage,) = [s for s in stages if isinstance(s, ChainStage) and step in s.steps]
        assert len(stage.tiles(tile)) > 1 or stage.output_shape[0] <= tile
    else:
        assert not any(isinstance(s, ChainStage) and step in s.steps for s in stages)
    _check(pixels, specs, tile)


def test_which_rotations_are_cut_into_strips():
    """Cubic with a replicated border runs whole: OpenCV's bicubic kernel then depends on the
    source's size for taps far outside it, so a window differs from the whole image."""

    def cut(spec):
        return rotation_cut(Pipeline.parse([spec]).steps[0].params)

    for mode in ("nearest", "linear", "lanczos"):
        assert cut(f"rotate:angle=30,interpolation={mode},border=replicate")
        assert cut(f"rotate:angle=30,interpolation={mode},border=constant")
    assert cut("rotate:angle=30,interpolation=cubic,border=constant")
    assert not cut("rotate:angle=30,interpolation=cubic,border=replicate")
    specs = ["sharpen", "rotate:angle=30,interpolation=cubic,border=replicate", "sharpen"]
    pixels = np.random.default_rng(4).integers(0, 256, (40, 30, 3), dtype=np.uint8)
    stages = Pipeline.parse(specs).stages_for(pixels.shape)
    assert [type(s).__name__ for s in stages] == ["TiledStage", "WholeStage", "TiledStage"]
    _check(pixels, specs, 4)


@pytest.mark.parametrize("angle", [1.0, -4.0, 89.0, 179.0])
def test_a_rotation_of_a_medium_image_reads_a_bounded_window_per_strip(angle):
    """A strip of a rotated image reads the bounding box of a tilted band: strips grow (as for
    halos) until the windows together read at most three times the input, and stay several,
    each window a small part of the input."""
    shape = (1000, 800, 3)
    (stage,) = Pipeline.parse([f"rotate:angle={angle}"]).stages_for(shape)
    tiles = stage.tiles(64)
    sizes = [(t.region[1] - t.region[0]) * (t.region[3] - t.region[2]) for t in tiles]
    assert sum(sizes) <= 3 * shape[0] * shape[1] and len(tiles) >= 3
    assert max(sizes) <= shape[0] * shape[1] / 3
    assert all(t.region[1] <= shape[0] and t.region[3] <= shape[1] for t in tiles)


@pytest.mark.parametrize("angle", [15.0, 45.0, -60.0, 100.0])
def test_a_steep_rotation_of_a_large_image_runs_whole(angle):
    """Its strips' windows would hold most of the image, at several times the memory of the
    whole-image warp: it runs as one stage (with the ops around it still chained)."""
    shape = (6000, 5000)
    specs = ["sharpen", f"rotate:angle={angle}", "sharpen"]
    stages = Pipeline.parse(specs).stages_for(shape)
    assert [type(s).__name__ for s in stages] == ["TiledStage", "WholeStage", "TiledStage"]


def test_sides_past_opencvs_remap_limit_run_whole_and_lanczos_says_why():
    wide = np.random.default_rng(3).integers(0, 256, (6, 32800), dtype=np.uint8)
    specs = ["rotate:angle=0.003,interpolation=nearest", "invert"]
    assert [type(s).__name__ for s in Pipeline.parse(specs).stages_for(wide.shape)] == [
        "WholeStage",
        "TiledStage",
    ]
    _check(wide, specs, 4)
    with pytest.raises(UnsupportedImage, match="lanczos takes images and canvases under 32767"):
        Pipeline.parse(["rotate:angle=0.003,interpolation=lanczos"]).apply(wide)


@pytest.mark.parametrize("angle", [-1e-20, -1e-14, -0.0, 1e-300])
def test_a_tiny_angle_is_no_turn_at_all(angle):
    pixels = np.random.default_rng(5).integers(0, 256, (5, 3, 3), dtype=np.uint8)
    specs = ["crop:x=1", f"rotate:angle={angle!r}", "invert"]
    out = Pipeline.parse(specs).apply(pixels)
    assert out.shape[:2] == (5, 2)
    _check(pixels, specs, 1)


def test_a_quarter_turn_after_a_rotation_starts_a_new_chain():
    """A rotation computes whole rows: a turn after it would make every strip redo it all."""
    specs = ["rotate:angle=20", "rotate:angle=90", "sharpen"]
    stages = Pipeline.parse(specs).stages_for((50, 40, 3))
    assert [len(s.steps) for s in stages if isinstance(s, ChainStage)] == [1, 2]
    pixels = np.random.default_rng(5).integers(0, 256, (50, 40, 3), dtype=np.uint8)
    _check(pixels, specs, 3)


def test_a_rotation_of_a_unit_channel_axis_comes_out_as_the_whole_image_shapes_it():
    pixels = np.random.default_rng(0).integers(0, 256, (10, 6, 1), dtype=np.uint8)
    for tile in (1, 3, 100):
        _check(pixels, ["rotate:angle=33", "gamma"], tile)

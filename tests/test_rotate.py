"""rotate: quarter turns re-index, any other angle warps onto a canvas that holds it all."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from mpi_imgproc.ops import quarter_turn, rotate_canvas, rotate_matrix
from mpi_imgproc.pipeline import Pipeline, ViewStage, WholeStage, parse_spec


def _image(shape, dtype=np.uint8, seed=0):
    return np.random.default_rng(seed).integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)


@pytest.mark.parametrize(("angle", "k"), [(90, -1), (180, 2), (270, 1), (-90, 1), (-270, -1),
                                          (450 - 360, -1), (90.0, -1)])  # fmt: skip
def test_quarter_turns_are_numpy_turns_and_views(angle, k):
    image = _image((5, 8, 3))
    spec = f"rotate:angle={angle}"
    assert np.array_equal(Pipeline.parse([spec]).apply(image), np.rot90(image, k))
    (stage,) = Pipeline.parse([spec]).stages
    assert isinstance(stage, ViewStage)


@pytest.mark.parametrize("angle", [0, 360, -360, 0.0])
def test_a_whole_turn_is_the_identity(angle):
    image = _image((5, 8, 3))
    out = Pipeline.parse([f"rotate:angle={angle}"]).apply(image)
    assert np.array_equal(out, image) and out is not image


def test_any_other_angle_is_no_view_and_runs_as_its_own_stage():
    (stage,) = Pipeline.parse(["rotate:angle=30"]).stages
    assert isinstance(stage, WholeStage)
    assert quarter_turn(30.0) is None and quarter_turn(-180.0) == 180


CANVASES = [(90, (8, 5)), (45, (10, 10)), (30, (9, 10)), (-30, (9, 10)), (0.01, (6, 9)),
            (150, (9, 10))]  # fmt: skip


@pytest.mark.parametrize(("angle", "size"), CANVASES)
def test_the_canvas_holds_the_whole_rotated_image(angle, size):
    assert rotate_canvas(5, 8, angle) == size
    step = parse_spec(f"rotate:angle={angle}")
    image = _image((5, 8, 4))
    assert step.run(image).shape == (*size, 4) == step.op.output_shape(image.shape, step.params)


def test_the_warp_formulas_give_the_quarter_turn_at_90_degrees():
    """The canvas and centre formulas, used at 90 degrees as for any angle, make the quarter
    turn: the same size, and every output pixel on its source pixel."""
    image = _image((7, 12, 3), np.uint16)
    assert rotate_canvas(7, 12, 90 + 1e-12) == (12, 7)
    m = rotate_matrix(image.shape, (12, 7), 90.0)
    flags = cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP
    assert np.array_equal(cv2.warpAffine(image, m, (7, 12), flags=flags), np.rot90(image, -1))


def test_constant_border_fills_the_corners_with_value_and_replicate_with_edges():
    image = np.full((9, 9, 3), 40, np.uint8)
    filled = Pipeline.parse(["rotate:angle=45,value=200"]).apply(image)
    assert tuple(filled[0, 0]) == (200, 200, 200) and tuple(filled[6, 6]) == (40, 40, 40)
    edges = Pipeline.parse(["rotate:angle=45,border=replicate"]).apply(image)
    assert (edges == 40).all()


def test_value_saturates_to_an_8_bit_image():
    out = Pipeline.parse(["rotate:angle=45,value=65535"]).apply(np.zeros((5, 5), np.uint8))
    assert out[0, 0] == 255

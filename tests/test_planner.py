"""The cost model that sends an image whole, tiled or inline — and says why."""

from __future__ import annotations

import cv2
import numpy as np

from mpi_imgproc.pipeline import Pipeline
from mpi_imgproc.planner import ImageSource, plan_image

BLUR = Pipeline.parse(["gaussian_blur:ksize=9"])
GRAY = Pipeline.parse(["grayscale"])


def raw(height: int, width: int) -> ImageSource:
    return ImageSource("x", pixels=np.zeros((height, width, 3), np.uint8))


def test_small_images_go_whole_and_large_ones_are_cut_into_strips():
    small = plan_image(BLUR, raw(400, 500), "auto", workers=4)
    assert small.path == "whole" and "below the cut-over" in small.reason
    large = plan_image(BLUR, raw(6000, 6000), "auto", workers=4)
    assert large.path == "tiled" and large.strips and 0 < large.tile < 6000
    assert "predicted" in large.reason


def test_a_cheap_raw_image_runs_inline_where_its_pixels_are():
    plan = plan_image(GRAY, raw(2000, 2000), "auto", workers=2, inline_s=0.01)
    assert plan.path == "inline" and "rank 0" in plan.reason
    assert plan_image(GRAY, raw(2000, 2000), "auto", workers=2, inline_s=0.0).path == "whole"


def test_encoded_images_are_tiled_only_when_compute_dwarfs_moving_raw_pixels():
    data = cv2.imencode(".png", np.zeros((3000, 3000, 3), np.uint8))[1].tobytes()
    encoded = ImageSource("x.png", data=data)
    assert plan_image(BLUR, encoded, "auto", workers=4).path == "whole"
    heavy = Pipeline.parse(["bilateral:d=15"])
    assert plan_image(heavy, encoded, "auto", workers=4).path == "tiled"


def test_explicit_tile_sizes_override_the_model():
    assert plan_image(BLUR, raw(10, 10), 4, workers=2).path == "tiled"
    assert plan_image(BLUR, raw(9000, 9000), 0, workers=2).path == "whole"


def test_an_undecodable_file_goes_whole_so_a_worker_reports_it():
    plan = plan_image(BLUR, ImageSource("x.jpg", data=b"junk"), "auto", workers=4)
    assert plan.path == "whole" and "unknown" in plan.reason

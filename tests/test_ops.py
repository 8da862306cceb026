"""Ops: parameters are validated up front with errors that name the op, the parameter and why;
each op does what its name says, as OpenCV does it."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from conftest import random_image

from mpi_imgproc.errors import InvalidParameter, InvalidPipeline, UnknownOp, UnsupportedImage
from mpi_imgproc.ops import GEOMETRIC, GLOBAL, NEIGHBOURHOOD, POINT, REGISTRY, get_op
from mpi_imgproc.pipeline import Pipeline, parse_spec

REQUIRED = {
    POINT: {"grayscale", "invert", "brightness_contrast", "gamma", "threshold"},
    NEIGHBOURHOOD: {
        "gaussian_blur",
        "box_blur",
        "median_blur",
        "bilateral",
        "sharpen",
        "sobel",
        "laplacian",
        "erode",
        "dilate",
    },
    GLOBAL: {"otsu_threshold", "equalize_hist", "canny"},
    GEOMETRIC: {"resize", "crop", "rotate", "flip"},
}


def test_registry_has_every_required_op_with_its_class():
    assert len(REGISTRY) >= 18
    for kind, names in REQUIRED.items():
        for name in names:
            assert REGISTRY[name].kind == kind, name


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("gaussian_blur:ksize=4", "gaussian_blur: ksize must be odd, got 4"),
        ("gaussian_blur:ksize=abc", "gaussian_blur: ksize must be an integer, got 'abc'"),
        ("median_blur:ksize=1", "median_blur: ksize must be >= 3, got 1"),
        ("erode:iterations=0", "erode: iterations must be >= 1, got 0"),
        ("rotate:angle=400", "rotate: angle must be <= 360.0, got 400.0"),
        ("rotate:angle=-5000", "rotate: angle must be >= -360.0, got -5000.0"),
        ("rotate:angle=nan", "rotate: angle must be finite, got 'nan'"),
        ("rotate:angle=inf", "rotate: angle must be finite, got 'inf'"),
        ("rotate:angle=ten", "rotate: angle must be a number, got 'ten'"),
        ("rotate:angle=30,interpolation=area", "rotate: interpolation must be one of nearest, li"),
        ("rotate:angle=30,border=reflect", "rotate: border must be one of constant, replicate"),
        ("rotate:value=-1", "rotate: value must be >= 0, got -1"),
        ("rotate:value=70000", "rotate: value must be <= 65535, got 70000"),
        ("rotate:value=1.5", "rotate: value must be an integer, got '1.5'"),
        ("resize:interpolation=bogus", "resize: interpolation must be one of"),
        ("resize", "resize: give scale, or width and/or height"),
        ("resize:scale=2,width=10", "resize: give scale or width/height, not both"),
        ("canny:low=200,high=100", "canny: low must be <= high"),
        ("gamma:gamma=nan", "gamma: gamma must be finite"),
        ("otsu_threshold:invert=maybe", "otsu_threshold: invert must be true or false"),
        ("invert:strength=2", "invert: unknown parameter 'strength' (parameters: none)"),
        ("box_blur:ksize=3,colour=1", "box_blur: unknown parameter 'colour' (parameters: ksize)"),
    ],
)
def test_bad_parameters_are_named_with_op_and_reason(spec, message):
    with pytest.raises(
        InvalidParameter, match="^" + message.replace("(", r"\(").replace(")", r"\)")
    ):
        parse_spec(spec)


def test_a_json_boolean_is_no_number():
    """JSON ``true`` would otherwise pass as 1 (one degree, an amount of 1)."""
    for op, param in (("rotate", "angle"), ("sharpen", "amount"), ("gamma", "gamma")):
        with pytest.raises(InvalidParameter, match=f"^{op}: {param} must be a number, got True"):
            Pipeline.from_json([{"op": op, "params": {param: True}}])


def test_unknown_op_lists_known_names():
    with pytest.raises(UnknownOp, match="unknown op 'blurr'; known ops: .*gaussian_blur"):
        parse_spec("blurr")


def test_malformed_spec_is_an_invalid_pipeline():
    with pytest.raises(InvalidPipeline, match="expected key=value"):
        parse_spec("gaussian_blur:ksize")


def test_json_pipeline_accepts_strings_and_objects():
    p = Pipeline.from_json(["grayscale", {"op": "gaussian_blur", "params": {"ksize": 9}}])
    assert [s.op.name for s in p.steps] == ["grayscale", "gaussian_blur"]
    assert p.steps[1].params == {"ksize": 9, "sigma": 0.0}
    assert Pipeline.from_json(p.to_json()).to_json() == p.to_json()


def test_global_op_on_colour_image_says_to_add_grayscale(rng):
    image = random_image(rng, 10, 10, 3)
    with pytest.raises(
        UnsupportedImage, match=r"otsu_threshold: needs a gray image, got BGR \(add"
    ):
        Pipeline.parse(["otsu_threshold"]).apply(image)


def test_sixteen_bit_image_where_opencv_lacks_support_is_a_clear_error(rng):
    image = random_image(rng, 10, 10, 1, np.uint16)
    with pytest.raises(UnsupportedImage, match="bilateral: needs a 8-bit image, got 16-bit"):
        Pipeline.parse(["bilateral"]).apply(image)
    with pytest.raises(UnsupportedImage, match="median_blur: 16-bit images need ksize 3 or 5"):
        Pipeline.parse(["median_blur:ksize=7"]).apply(image)


def test_crop_outside_the_image_names_the_rectangle(rng):
    with pytest.raises(InvalidParameter, match="crop: rectangle 5,5 10x10 extends past the 8x8"):
        Pipeline.parse(["crop:x=5,y=5,width=10,height=10"]).apply(random_image(rng, 8, 8))


def test_grayscale_is_bt601_luminosity(rng):
    image = random_image(rng, 31, 17, 3)
    b, g, r = (image[..., i].astype(np.float64) for i in range(3))
    expected = 0.299 * r + 0.587 * g + 0.114 * b
    out = get_op("grayscale").run(image, {})
    assert out.shape == (31, 17)
    assert np.abs(out - expected).max() <= 1.0
    assert np.array_equal(out, cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))


def test_invert_keeps_alpha(rng):
    image = random_image(rng, 9, 9, 4)
    out = Pipeline.parse(["invert"]).apply(image)
    assert np.array_equal(out[..., :3], 255 - image[..., :3])
    assert np.array_equal(out[..., 3], image[..., 3])


@pytest.mark.parametrize("seed", range(20))
def test_otsu_and_equalisation_match_opencv(seed):
    rng = np.random.default_rng(seed)
    gray = rng.integers(0, 256, (int(rng.integers(1, 90)), int(rng.integers(1, 90))), np.uint8)
    gray = (gray // int(rng.integers(1, 40))).astype(np.uint8)  # few levels: ties and gaps
    _, otsu = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    assert np.array_equal(Pipeline.parse(["otsu_threshold"]).apply(gray), otsu)
    assert np.array_equal(Pipeline.parse(["equalize_hist"]).apply(gray), cv2.equalizeHist(gray))


@pytest.mark.parametrize(
    ("spec", "shape"),
    [
        ("resize:scale=0.5", (20, 30)),
        ("resize:width=15", (10, 15)),
        ("resize:width=7,height=9,interpolation=lanczos", (9, 7)),
        ("rotate:angle=90", (60, 40)),
        ("crop:x=10,y=5,width=20", (35, 20)),
    ],
)
def test_geometric_ops_give_the_expected_shape(rng, spec, shape):
    assert Pipeline.parse([spec]).apply(random_image(rng, 40, 60, 3)).shape[:2] == shape


def test_threshold_matches_opencv_for_every_type(rng):
    gray = random_image(rng, 25, 25, 1)
    types = {
        "binary": cv2.THRESH_BINARY,
        "binary_inv": cv2.THRESH_BINARY_INV,
        "trunc": cv2.THRESH_TRUNC,
        "tozero": cv2.THRESH_TOZERO,
        "tozero_inv": cv2.THRESH_TOZERO_INV,
    }
    for name, code in types.items():
        _, expected = cv2.threshold(gray, 100.5, 200, code)
        out = Pipeline.parse([f"threshold:value=100.5,max_value=200,type={name}"]).apply(gray)
        assert np.array_equal(out, expected), name


def test_halo_of_chained_ops_adds_up():
    p = Pipeline.parse(["gaussian_blur:ksize=9", "erode:ksize=5,iterations=2", "sobel:ksize=1"])
    assert p.halo == 4 + 4 + 1


@pytest.mark.parametrize("amount", [0.0, 0.37, 0.5, 1.0, 2.3, 4.0, 7.0, 20.0])
@pytest.mark.parametrize("shape", [(37, 53), (41, 29, 3), (16, 17, 4)])
def test_sharpen_looks_up_exactly_what_its_float64_formula_gives(rng, amount, shape):
    """The 8-bit paths (an integer kernel for integer amounts, else a table) against the
    formula they stand for, on every value and edge."""
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    image[:4] = 0
    image[-4:] = 255  # the largest details, both signs
    detail = cv2.filter2D(
        image, cv2.CV_32F, np.array([[0, -1, 0], [-1, 4, -1], [0, -1, 0]], np.float32)
    )
    expected = np.clip(np.rint(image + amount * detail.astype(np.float64).reshape(shape)), 0, 255)
    got = get_op("sharpen").run(image, {"amount": amount})
    assert got.dtype == np.uint8 and np.array_equal(got, expected.astype(np.uint8))


def _abs_sum_reference(parts, like):
    total = sum(np.abs(p.astype(np.float64)) for p in parts)
    return np.clip(np.rint(total), 0, 255).astype(like.dtype)


@pytest.mark.parametrize("ksize", [1, 3, 5, 7])
@pytest.mark.parametrize("shape", [(41, 37), (23, 29, 3)])
def test_8_bit_edges_saturate_exactly_as_their_float64_formula(rng, ksize, shape):
    """sobel and laplacian add saturated absolute values in 8 bits; the float64 sum is the
    definition (16-bit gradients that saturate at ksize 7 included)."""
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    image[::5] = 255
    image[1::5] = 0  # the steepest edges, both signs
    gx = cv2.Sobel(image, cv2.CV_16S, 1, 0, ksize=ksize)
    gy = cv2.Sobel(image, cv2.CV_16S, 0, 1, ksize=ksize)
    sobel = get_op("sobel").run(image, {"ksize": ksize})
    assert np.array_equal(sobel, _abs_sum_reference([gx, gy], image))
    lap = cv2.Laplacian(image, cv2.CV_16S, ksize=ksize)
    laplacian = get_op("laplacian").run(image, {"ksize": ksize})
    assert np.array_equal(laplacian, _abs_sum_reference([lap], image))

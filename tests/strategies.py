"""Hypothesis strategies: random images, tile sizes and pipelines of 1–4 ops (every CPU op)."""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from mpi_imgproc.ops import REGISTRY

odd = st.integers(0, 12).map(lambda k: 2 * k + 1)
real = st.floats(0, 4, allow_nan=False).map(lambda v: round(v, 2))


def _spec(name: str, **params: object) -> str:
    given = ",".join(f"{k}={v}" for k, v in params.items())
    return f"{name}:{given}" if given else name


OP_SPECS = {
    "grayscale": st.just("grayscale"),
    "invert": st.just("invert"),
    "brightness_contrast": st.builds(
        lambda a, b: _spec("brightness_contrast", alpha=a, beta=b), real, st.integers(-80, 80)
    ),
    "gamma": st.builds(
        lambda g: _spec("gamma", gamma=g), st.floats(0.2, 4).map(lambda v: round(v, 2))
    ),
    "threshold": st.builds(
        lambda v, t: _spec("threshold", value=v, type=t),
        st.floats(0, 255).map(lambda v: round(v, 1)),
        st.sampled_from(["binary", "binary_inv", "trunc", "tozero", "tozero_inv"]),
    ),
    "gaussian_blur": st.builds(lambda k, s: _spec("gaussian_blur", ksize=k, sigma=s), odd, real),
    "box_blur": st.builds(lambda k: _spec("box_blur", ksize=k), st.integers(1, 31)),
    "median_blur": st.builds(lambda k: _spec("median_blur", ksize=k), st.sampled_from([3, 5, 7])),
    "bilateral": st.builds(
        lambda d, c: _spec("bilateral", d=d, sigma_color=c, sigma_space=c),
        st.integers(1, 9),
        st.floats(1, 150).map(lambda v: round(v, 1)),
    ),
    "sharpen": st.builds(lambda a: _spec("sharpen", amount=a), real),
    "sobel": st.builds(lambda k: _spec("sobel", ksize=k), st.sampled_from([1, 3, 5, 7])),
    "laplacian": st.builds(lambda k: _spec("laplacian", ksize=k), st.sampled_from([1, 3, 5, 7])),
    "erode": st.builds(
        lambda k, i, s: _spec("erode", ksize=k, iterations=i, shape=s),
        st.integers(1, 5),
        st.integers(1, 3),
        st.sampled_from(["rect", "ellipse", "cross"]),
    ),
    "dilate": st.builds(
        lambda k, i, s: _spec("dilate", ksize=k, iterations=i, shape=s),
        st.integers(1, 5),
        st.integers(1, 3),
        st.sampled_from(["rect", "ellipse", "cross"]),
    ),
    "otsu_threshold": st.builds(lambda inv: _spec("otsu_threshold", invert=inv), st.booleans()),
    "equalize_hist": st.just("equalize_hist"),
    "canny": st.builds(
        lambda lo, span: _spec("canny", low=lo, high=lo + span),
        st.integers(0, 150),
        st.integers(0, 150),
    ),
    "resize": st.one_of(
        st.builds(
            lambda s, i: _spec("resize", scale=s, interpolation=i),
            st.floats(0.3, 2.5).map(lambda v: round(v, 2)),
            st.sampled_from(["nearest", "linear", "cubic", "area", "lanczos"]),
        ),
        st.builds(lambda w: _spec("resize", width=w), st.integers(1, 50)),
    ),
    "crop": st.builds(
        lambda x, y, w, h: _spec("crop", x=x, y=y, width=w, height=h),
        st.integers(0, 4),
        st.integers(0, 4),
        st.integers(0, 8),
        st.integers(0, 8),
    ),
    "rotate": st.one_of(
        st.builds(lambda a: _spec("rotate", angle=a), st.sampled_from([90, 180, 270, -90, 0])),
        st.builds(
            lambda a, i, b: _spec("rotate", angle=a, interpolation=i, border=b),
            st.floats(-360, 360).map(lambda v: round(v, 2)),
            st.sampled_from(["nearest", "linear", "cubic", "lanczos"]),
            st.sampled_from(["constant", "replicate"]),
        ),
    ),
    "flip": st.builds(
        lambda a: _spec("flip", axis=a), st.sampled_from(["horizontal", "vertical", "both"])
    ),
}
assert set(OP_SPECS) == set(REGISTRY), "every registered op needs a strategy"

op_spec = st.sampled_from(sorted(OP_SPECS)).flatmap(lambda name: OP_SPECS[name])
pipelines = st.lists(op_spec, min_size=1, max_size=4)


@st.composite
def images(draw: st.DrawFn, max_side: int = 64) -> np.ndarray:
    """Gray, BGR or BGRA; 8 or 16 bits; sizes from 1×1 through odd and very thin ones."""
    height = draw(st.integers(1, max_side))
    width = draw(st.integers(1, max_side))
    channels = draw(st.sampled_from([1, 3, 4]))
    dtype = draw(st.sampled_from([np.uint8, np.uint8, np.uint16]))
    seed = draw(st.integers(0, 2**32 - 1))
    shape = (height, width) if channels == 1 else (height, width, channels)
    top = np.iinfo(dtype).max
    rng = np.random.default_rng(seed)
    levels = draw(st.sampled_from([2, 16, top + 1]))  # flat areas as well as pure noise
    return (rng.integers(0, levels, shape) * (top // max(1, levels - 1))).astype(dtype)


tile_sizes = st.one_of(st.just(0), st.integers(1, 40))

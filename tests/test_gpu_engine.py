"""The GPU engine gives the sequential engine's bits, op by op, tiled, and with CPU fallbacks.

The comparisons run twice: on a CUDA device through CuPy (skipped where there is none), and
with NumPy and SciPy standing in for CuPy and cupyx (skipped without SciPy).  The stand-in
checks the engine's arithmetic -- fixed-point Gaussian taps, OpenCV's division rules, borders
-- anywhere; only the device run shows that CuPy's kernels add and round the same way.
"""

from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from mpi_imgproc.errors import EngineUnavailable, InvalidParameter, UnsupportedImage
from mpi_imgproc.local_engines import gpu, process_tile
from mpi_imgproc.local_engines.sequential import SequentialEngine
from mpi_imgproc.ops import REGISTRY
from mpi_imgproc.pipeline import Pipeline, TiledStage, parse_spec
from mpi_imgproc.tiling import run_pipeline

ROOT = Path(__file__).resolve().parents[1]

THRESHOLD_TYPES = ("binary", "binary_inv", "trunc", "tozero", "tozero_inv")

# Every case that the engine runs on the device (checked by test_cases_run_on_the_device).
DEVICE_CASES_8BIT = [
    "grayscale",
    "invert",
    "brightness_contrast:alpha=1.3,beta=-20.5",
    "gamma:gamma=0.45",
    "gamma:gamma=2.2",
    *(f"threshold:value=100.5,max_value=200,type={t}" for t in THRESHOLD_TYPES),
    "gaussian_blur:ksize=3",
    "gaussian_blur:ksize=5",
    "gaussian_blur:ksize=9,sigma=1.5",
    "gaussian_blur:ksize=15,sigma=4",
    "gaussian_blur:ksize=21",
    *(f"box_blur:ksize={k}" for k in (1, 2, 3, 4, 5, 16, 17, 24)),
    *(f"median_blur:ksize={k}" for k in (3, 5, 7, 15)),
    "sharpen:amount=0.5",
    "sharpen:amount=1",
    "sharpen:amount=3.3",
    *(f"sobel:ksize={k}" for k in (1, 3, 5)),
    *(f"laplacian:ksize={k}" for k in (1, 3, 5, 7)),
    *(
        f"{op}:{params}"
        for op in ("erode", "dilate")
        for params in (
            "ksize=3",
            "ksize=4,iterations=2",
            "ksize=5,shape=ellipse",
            "ksize=4,shape=ellipse,iterations=2",
            "ksize=3,shape=cross,iterations=3",
        )
    ),
]

DEVICE_CASES_16BIT = [
    "grayscale",
    "invert",
    "gamma:gamma=0.45",
    "brightness_contrast:alpha=0.7,beta=1000",
    "threshold:value=30000,max_value=60000,type=trunc",
    "gaussian_blur:ksize=3",
    "gaussian_blur:ksize=9,sigma=2",
    *(f"box_blur:ksize={k}" for k in (2, 3, 17)),
    "median_blur:ksize=3",
    "median_blur:ksize=5",
    "sharpen:amount=1.5",
    "sobel:ksize=3",
    "sobel:ksize=5",
    "laplacian:ksize=1",
    "laplacian:ksize=5",
    "erode:ksize=4,iterations=2",
    "dilate:ksize=5,shape=ellipse",
]

# Cases the engine hands to the CPU op (see the table in the gpu module's docstring).
CPU_FALLBACK_CASES = [
    ("bilateral:d=5", np.uint8),
    ("median_blur:ksize=21", np.uint8),
    ("sobel:ksize=7", np.uint16),
    ("laplacian:ksize=7", np.uint16),
]


def random_image(dtype: type, channels: int, shape: tuple[int, int] = (37, 53)) -> np.ndarray:
    """A reproducible random image; odd sizes exercise OpenCV's SIMD tails."""
    rng = np.random.default_rng(channels * 7 + np.dtype(dtype).itemsize)
    full = shape if channels == 1 else (*shape, channels)
    return rng.integers(0, np.iinfo(dtype).max + 1, full, dtype=dtype)


def run_step(engine: object, spec: str, image: np.ndarray) -> np.ndarray:
    """``spec`` as a one-step tiled stage on one whole-image tile."""
    stage = TiledStage((parse_spec(spec),))
    return engine.run(stage, [image], [(0, 0, 0, 0)])[0]  # type: ignore[attr-defined]


def assert_same_as_sequential(engine: object, spec: str, image: np.ndarray) -> None:
    expected = run_step(SequentialEngine(), spec, image)
    got = run_step(engine, spec, image)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    diff = np.abs(got.astype(np.int64) - expected.astype(np.int64))
    differ = np.count_nonzero(diff)
    assert np.array_equal(got, expected), f"{spec}: {differ} pixels differ, by up to {diff.max()}"


def install_numpy_stand_in(
    monkeypatch: pytest.MonkeyPatch, ndimage: types.ModuleType | None = None
) -> None:
    """Make ``import cupy`` give NumPy and ``cupyx.scipy.ndimage`` give SciPy's ndimage."""
    ndimage = ndimage or pytest.importorskip("scipy.ndimage")
    cupy = types.ModuleType("cupy")
    cupy.__getattr__ = lambda name: getattr(np, name)  # type: ignore[method-assign]
    cupy.asnumpy = np.asarray  # type: ignore[attr-defined]
    cupy.cuda = SimpleNamespace(  # type: ignore[attr-defined]
        runtime=SimpleNamespace(
            getDeviceCount=lambda: 1,
            getDeviceProperties=lambda device: {"name": b"NumPy stand-in"},
        ),
        Device=lambda: SimpleNamespace(id=0),
    )
    cupy.get_default_memory_pool = lambda: SimpleNamespace(  # type: ignore[attr-defined]
        free_all_blocks=lambda: None
    )
    cupyx = types.ModuleType("cupyx")
    cupyx_scipy = types.ModuleType("cupyx.scipy")
    cupyx_scipy.ndimage = ndimage  # type: ignore[attr-defined]
    cupyx.scipy = cupyx_scipy  # type: ignore[attr-defined]
    modules = {"cupy": cupy, "cupyx": cupyx, "cupyx.scipy": cupyx_scipy}
    for name, module in {**modules, "cupyx.scipy.ndimage": ndimage}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(gpu, "cp", gpu.cp)  # restored after the test
    monkeypatch.setattr(gpu, "ndi", gpu.ndi)


@pytest.fixture(params=["cuda", "numpy-stand-in"])
def engine(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """A GpuEngine on a CUDA device, or on NumPy/SciPy standing in for CuPy."""
    if request.param == "cuda":
        pytest.importorskip("cupy")
        try:
            made = gpu.GpuEngine()
        except EngineUnavailable as exc:
            pytest.skip(str(exc))
    else:
        install_numpy_stand_in(monkeypatch)
        made = gpu.GpuEngine()
    yield made
    made.close()


# ----------------------------------------------------------------- runs without CuPy too


def run_without_cupy(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter where ``import cupy`` fails."""
    prelude = "import sys; sys.modules['cupy'] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, cwd=ROOT
    )


def test_module_imports_without_cupy():
    result = run_without_cupy("import mpi_imgproc.local_engines.gpu")
    assert result.returncode == 0, result.stderr


def test_get_engine_without_cupy_raises_engine_unavailable_with_install_hint():
    code = (
        "from mpi_imgproc.errors import EngineUnavailable\n"
        "from mpi_imgproc.local_engines import get_engine\n"
        "try:\n"
        "    get_engine('gpu')\n"
        "except EngineUnavailable as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    print('no error')\n"
    )
    result = run_without_cupy(code)
    assert result.returncode == 0, result.stderr
    message = result.stdout
    assert "CuPy" in message and 'pip install -e ".[gpu]"' in message, message
    assert "cupy-cuda12x" in message, message


def test_no_device_raises_engine_unavailable(monkeypatch: pytest.MonkeyPatch):
    install_numpy_stand_in(monkeypatch, ndimage=types.ModuleType("ndimage"))
    monkeypatch.setattr(sys.modules["cupy"].cuda.runtime, "getDeviceCount", lambda: 0)
    with pytest.raises(EngineUnavailable, match="no CUDA device"):
        gpu.GpuEngine()


def test_every_op_has_a_row_in_the_support_tables():
    doc_text = (ROOT / "docs" / "gpu.md").read_text()
    module_rows = {line.split()[0] for line in (gpu.__doc__ or "").splitlines() if line.strip()}
    doc_rows = {line.split("|")[1].strip(" `") for line in doc_text.splitlines() if "|" in line}
    missing = {name for name in REGISTRY if name not in module_rows or name not in doc_rows}
    assert not missing, f"ops without a row in the gpu support tables: {sorted(missing)}"


def test_device_kernels_name_registered_ops():
    assert set(gpu.DEVICE_KERNELS) <= set(REGISTRY)


@pytest.mark.parametrize("spec", DEVICE_CASES_8BIT)
def test_8bit_cases_run_on_the_device(spec: str):
    assert gpu.device_kernel(parse_spec(spec), np.dtype(np.uint8)) is not None


@pytest.mark.parametrize("spec", DEVICE_CASES_16BIT)
def test_16bit_cases_run_on_the_device(spec: str):
    assert gpu.device_kernel(parse_spec(spec), np.dtype(np.uint16)) is not None


@pytest.mark.parametrize(("spec", "dtype"), CPU_FALLBACK_CASES)
def test_fallback_cases_run_on_the_cpu(spec: str, dtype: type):
    assert gpu.device_kernel(parse_spec(spec), np.dtype(dtype)) is None


# --------------------------------------------------------- needs CuPy (or the stand-in)


@pytest.mark.gpu
@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("spec", DEVICE_CASES_8BIT)
def test_8bit_ops_are_bit_identical_to_sequential(engine, spec: str, channels: int):
    assert_same_as_sequential(engine, spec, random_image(np.uint8, channels))


@pytest.mark.gpu
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("spec", DEVICE_CASES_16BIT)
def test_16bit_ops_are_bit_identical_to_sequential(engine, spec: str, channels: int):
    assert_same_as_sequential(engine, spec, random_image(np.uint16, channels))


@pytest.mark.gpu
@pytest.mark.parametrize(("spec", "dtype"), CPU_FALLBACK_CASES)
def test_cpu_fallback_steps_are_bit_identical_to_sequential(engine, spec: str, dtype: type):
    assert_same_as_sequential(engine, spec, random_image(dtype, 3))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (2, 3), (5, 2)])
@pytest.mark.parametrize(
    "spec", ["gaussian_blur:ksize=9", "box_blur:ksize=6", "median_blur:ksize=5", "sobel:ksize=5"]
)
def test_tiny_images_reflect_like_opencv(engine, spec: str, shape: tuple[int, int]):
    assert_same_as_sequential(engine, spec, random_image(np.uint8, 3, shape))


@pytest.mark.gpu
@pytest.mark.parametrize("tile_size", [0, 16, 29])
def test_tiled_pipeline_mixing_device_and_cpu_steps_matches_sequential(engine, tile_size: int):
    pipeline = Pipeline.parse(
        [
            "gaussian_blur:ksize=5",
            "bilateral:d=5",
            "box_blur:ksize=17",
            "sharpen:amount=0.7",
            "grayscale",
            "otsu_threshold",
            "dilate:ksize=3,shape=cross",
            "rotate:angle=90",
            "median_blur:ksize=3",
        ]
    )
    image = random_image(np.uint8, 3, (61, 75))
    expected = run_pipeline(pipeline, image, SequentialEngine(), tile_size)
    assert np.array_equal(run_pipeline(pipeline, image, engine, tile_size), expected)


@pytest.mark.gpu
def test_gray_with_a_channel_axis_runs_on_the_cpu(engine):
    image = random_image(np.uint8, 1)[..., None]
    stage = TiledStage((parse_spec("gaussian_blur:ksize=3"),))
    expected = process_tile(stage, image, (0, 0, 0, 0))
    got = engine.run(stage, [image], [(0, 0, 0, 0)])[0]
    assert got.shape == expected.shape and np.array_equal(got, expected)


@pytest.mark.gpu
def test_cpu_errors_surface_unchanged(engine):
    with pytest.raises(InvalidParameter, match="max_value must be <= 255"):
        run_step(engine, "threshold:max_value=300", random_image(np.uint8, 1))
    with pytest.raises(UnsupportedImage, match="16-bit images need ksize 3 or 5"):
        run_step(engine, "median_blur:ksize=7", random_image(np.uint16, 1))
    with pytest.raises(UnsupportedImage, match="gray, BGR or BGRA"):
        run_step(engine, "invert", np.zeros((4, 4, 2), np.uint8))


@pytest.mark.gpu
def test_describe_names_the_device(engine):
    info = engine.describe()
    assert info["engine"] == "gpu" and info["workers"] == 1 and info["device"]

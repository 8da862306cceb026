"""``mpi-imgproc gen-dataset``: the files asked for, photo-like, the same for the same seed, and
bad files that really fail to read with the error each kind promises."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from mpi_imgproc.dataset import CORRUPTIONS, MANIFEST, DatasetSpec, generate
from mpi_imgproc.errors import ImageReadError
from mpi_imgproc.imageio import read_image

pytestmark = pytest.mark.timeout(60)
SPEC = DatasetSpec(
    count=9, min_size=40, max_size=90, formats=("jpg", "png", "tif"), corrupt=5, seed=7
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dataset")
    generate(folder, SPEC, workers=2)
    return folder


def files_by_kind(folder: Path) -> dict[str, list[dict]]:
    entries = json.loads((folder / MANIFEST).read_text())["files"]
    kinds: dict[str, list[dict]] = {}
    for entry in entries:
        kinds.setdefault(entry["kind"], []).append(entry)
    return kinds


def test_writes_the_requested_counts_and_cycles_the_formats(dataset):
    kinds = files_by_kind(dataset)
    assert len(kinds["image"]) == 9 and len(kinds["corrupt"]) == 5
    suffixes = sorted(p.suffix for p in dataset.glob("img*"))
    assert suffixes == [".jpg"] * 3 + [".png"] * 3 + [".tif"] * 3
    assert {e["corruption"] for e in kinds["corrupt"]} == set(CORRUPTIONS)


def test_images_decode_with_sizes_within_bounds(dataset):
    for path in sorted(dataset.glob("img*")):
        image = read_image(path)
        assert 40 <= image.shape[0] <= 90 and 40 <= image.shape[1] <= 90, path.name


def test_images_look_like_photos_not_noise(tmp_path):
    generate(tmp_path, DatasetSpec(count=4, min_size=300, max_size=300, gray=0.0))
    for path in tmp_path.glob("img*.jpg"):
        image = read_image(path).astype(np.int16)
        assert path.stat().st_size / image[..., 0].size < 1.5  # noise takes ~3 bytes a pixel
        assert np.abs(np.diff(image, axis=1)).mean() < 20  # neighbours are alike


def test_same_seed_gives_the_same_bytes_and_another_seed_does_not(tmp_path):
    spec = DatasetSpec(count=4, min_size=40, max_size=60, formats=("jpg", "png"), corrupt=5)
    generate(tmp_path / "a", spec, workers=1)
    generate(tmp_path / "b", spec, workers=2)
    generate(tmp_path / "c", replace(spec, seed=1))
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "img00000.jpg").read_bytes() != (
        tmp_path / "c" / "img00000.jpg"
    ).read_bytes()


def test_every_bad_file_fails_to_read_with_its_promised_error(dataset):
    for entry in files_by_kind(dataset)["corrupt"]:
        with pytest.raises(ImageReadError, match=entry["expected_error"]):
            read_image(dataset / entry["name"])


def test_opencv_alone_accepts_the_truncated_jpeg(dataset):
    path = next(dataset.glob("corrupt-truncated-jpeg-*"))
    assert cv2.imread(str(path)) is not None  # why imageio checks for the end marker


def test_uint16_fraction_makes_png_and_tif_16_bit(tmp_path):
    generate(
        tmp_path, DatasetSpec(count=3, min_size=40, max_size=60, formats=("png", "tif"), uint16=1)
    )
    assert {read_image(p).dtype for p in tmp_path.glob("img*")} == {np.dtype(np.uint16)}


def test_cli_prints_what_it_wrote_and_rejects_bad_sizes(tmp_path):
    cli = [sys.executable, "-m", "mpi_imgproc.cli", "gen-dataset", str(tmp_path / "d")]
    small = ["--min-size", "30", "--max-size", "40"]
    good = subprocess.run(
        [*cli, "--count", "3", *small, "--large", "1", "--large-size", "200", "--corrupt", "2"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert good.returncode == 0, good.stderr
    assert "wrote 6 files" in good.stdout and "large jpg" in good.stdout
    assert max(read_image(tmp_path / "d" / "large000.jpg").shape[:2]) == 200
    bad = subprocess.run(
        [*cli, "--min-size", "50", "--max-size", "40"], capture_output=True, text=True, timeout=30
    )
    assert bad.returncode == 2 and "--min-size" in bad.stderr

"""DICOM inputs: decoded by pydicom as stored (first frame, unsigned 8 or 16 bits, gray or
RGB), through the same paths as any other image; what is not taken is refused with a reason.
The files are made here with pydicom itself."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from cluster import running_cluster
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from mpi_imgproc.client import Client
from mpi_imgproc.errors import ImageReadError
from mpi_imgproc.imageio import decode, output_path, probe
from mpi_imgproc.pipeline import Pipeline


def dicom(frames: np.ndarray, photometric: str = "MONOCHROME2", signed: int = 0,
          rle: bool = False) -> bytes:  # fmt: skip
    """A DICOM file of ``frames`` ((H, W) or (H, W, 3), or a stack of them with 4 axes)."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # secondary capture
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, generate_uid()
    many = frames.ndim == 4 or (frames.ndim == 3 and photometric.startswith("MONO"))
    one = frames[0] if many else frames
    ds.Rows, ds.Columns = one.shape[:2]
    ds.SamplesPerPixel = 1 if one.ndim == 2 else 3
    if one.ndim == 3:
        ds.PlanarConfiguration = 0
    if many:
        ds.NumberOfFrames = len(frames)
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = ds.BitsStored = frames.dtype.itemsize * 8
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, signed
    ds.PixelData = frames.tobytes()
    if rle:
        ds.compress(RLELossless)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


RNG = np.random.default_rng(11)
GRAY16 = RNG.integers(0, 4096, (301, 207), dtype=np.uint16)  # 12 bits stored in 16, as CT/MR
RGB8 = RNG.integers(0, 256, (120, 90, 3), dtype=np.uint8)


@pytest.mark.parametrize("rle", [False, True])
def test_dicom_decodes_as_stored_gray_or_bgr(rle):
    assert np.array_equal(decode(dicom(GRAY16, rle=rle)), GRAY16)
    assert np.array_equal(decode(dicom(RGB8, "RGB", rle=rle)), RGB8[..., ::-1])
    assert probe(dicom(GRAY16)) == (301, 207, 1, 2)
    stack = np.stack([GRAY16, GRAY16 // 2, GRAY16 // 3])
    assert np.array_equal(decode(dicom(stack)), GRAY16)  # the first frame
    assert output_path("scan.dcm", "out", "same").name == "scan.png"


def test_dicom_that_is_not_taken_is_refused_with_a_reason():
    cases = {
        "signed": (dicom(GRAY16.astype(np.int16), signed=1), "signed"),
        "32-bit": (dicom(GRAY16.astype(np.uint32)), "32 bits"),
        "truncated": (dicom(GRAY16)[:-5000], "cannot decode DICOM pixels"),
        "header": (dicom(GRAY16)[:200], "cannot read DICOM header"),
    }
    for name, (data, why) in cases.items():
        with pytest.raises(ImageReadError, match=why):
            decode(data)
        # a header that says what is not taken gives no size; damaged pixels still have one
        assert (probe(data) is None) == (name != "truncated"), name


@pytest.mark.timeout(120)
def test_dicom_files_go_through_the_cluster_like_any_image(tmp_path):
    """Uploaded from paths and by reference: exact results, written as PNG for "same"."""
    (tmp_path / "a.dcm").write_bytes(dicom(GRAY16))
    (tmp_path / "b.dcm").write_bytes(dicom(RGB8, "RGB", rle=True))
    (tmp_path / "bad.dcm").write_bytes(dicom(GRAY16.astype(np.int16), signed=1))
    ops = ["gaussian_blur:ksize=5", "sharpen"]
    expected = [
        Pipeline.parse(ops).apply(x) for x in (GRAY16, np.ascontiguousarray(RGB8[..., ::-1]))
    ]
    with running_cluster(3, "--data-root", str(tmp_path)) as cluster:
        with Client(cluster.address, timeout=30) as client:
            paths = [tmp_path / n for n in ("a.dcm", "b.dcm", "bad.dcm")]
            uploaded = client.submit(paths, ops).result(timeout=60)
            by_reference = client.submit_paths(["a.dcm", "b.dcm", "bad.dcm"], ops, "out",
                                               result="same").result(timeout=60)  # fmt: skip
    for outcome in (uploaded, by_reference):
        assert outcome.state == "done" and set(outcome.errors) == {2}
        assert outcome.errors[2][0] == "image_read_error" and "signed" in outcome.errors[2][1]
    for got, want in zip(uploaded.images, expected):
        assert np.array_equal(got, want)
    for name, want in zip(("a.png", "b.png"), expected):
        assert np.array_equal(cv2.imread(str(tmp_path / "out" / name), cv2.IMREAD_UNCHANGED), want)

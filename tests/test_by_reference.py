"""Jobs by reference: files named under the server's --data-root, read and written by workers,
every path confined to the root."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import cv2
import numpy as np
import pytest
import zmq
from cluster import mpi_command, running_cluster
from conftest import random_image, write_images

from mpi_imgproc.errors import ImageReadError
from mpi_imgproc.pipeline import Pipeline
from mpi_imgproc.protocol import decode_reply

pytestmark = pytest.mark.timeout(120)
BLUR = ["gaussian_blur:ksize=5"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_images(root / "in", 3, size=(60, 80))
    cv2.imwrite(str(root / "in" / "big.png"), random_image(np.random.default_rng(1), 300, 260))
    return root


@pytest.fixture(scope="module")
def server(root):
    with running_cluster(3, "--data-root", str(root)) as cluster:
        yield cluster


@pytest.fixture
def dealer(server):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.address)
    yield sock
    sock.close()


def run(sock, **submit) -> tuple[dict, list[tuple[dict, list]]]:
    """Submit by reference; the accepted reply (or error) and every job message until done."""
    header = {"v": 2, "type": "submit", "pipeline": BLUR, "result": "png", **submit}
    sock.send_multipart([json.dumps(header).encode()])
    assert sock.poll(20000)
    first = json.loads(sock.recv_multipart()[0])
    messages: list[tuple[dict, list]] = []
    while first["type"] == "accepted" and (not messages or messages[-1][0]["type"] != "done"):
        assert sock.poll(30000), "no reply"
        head, *frames = sock.recv_multipart()
        decode_reply(head)
        messages.append((json.loads(head), frames))
    return first, messages


def by_type(messages, kind: str) -> list[dict]:
    return [h for h, _ in messages if h["type"] == kind]


def test_workers_read_and_write_the_files_and_results_name_them(root, dealer):
    paths = ["in/img000.png", "in/img001.png", str(root / "in" / "big.png")]
    accepted, messages = run(dealer, paths=paths, output="out1", tile=64)
    assert accepted["images"] == 3
    results = by_type(messages, "result")
    assert sorted(r["written"] for r in results) == [
        "out1/big.png",
        "out1/img000.png",
        "out1/img001.png",
    ]
    assert all(frames == [] for h, frames in messages if h["type"] == "result")
    assert {r["path"] for r in results} == {"tiled"}  # the big one was tiled, rank 0 wrote it
    for name in ("img000.png", "img001.png", "big.png"):
        source = cv2.imread(str(root / "in" / name), cv2.IMREAD_UNCHANGED)
        written = cv2.imread(str(root / "out1" / name), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(written, Pipeline.parse(BLUR).apply(source))
    assert not [f for f in os.listdir(root / "out1") if f.endswith(".part")]


def test_paths_that_leave_the_root_fail_alone(root, dealer, tmp_path):
    outside = tmp_path / "secret.png"
    cv2.imwrite(str(outside), np.zeros((5, 5), np.uint8))
    (root / "in" / "link.png").unlink(missing_ok=True)
    (root / "in" / "link.png").symlink_to(outside)
    fifo = root / "in" / "fifo.png"
    if not fifo.exists():
        os.mkfifo(fifo)
    paths = [
        "../" * 6 + str(outside).lstrip("/"),
        str(outside),
        "in/link.png",
        "in/fifo.png",
        "in/none.png",
        "in/img002.png",
    ]
    _, messages = run(dealer, paths=paths, output="out2", tile=0)
    errors = {e["index"]: e for e in by_type(messages, "image_error")}
    assert set(errors) == {0, 1, 2, 3, 4}
    assert all(e["code"] == "path_refused" for e in errors.values())
    assert "outside the server's data root" in errors[2]["message"]
    assert "not a regular file" in errors[3]["message"]
    assert [r["written"] for r in by_type(messages, "result")] == ["out2/img002.png"]
    assert not (tmp_path / "out2").exists()


def test_outputs_never_overwrite_inputs_or_existing_files_unless_asked(root, dealer):
    _, messages = run(dealer, paths=["in/img000.png"], output="in", result="same")
    assert "would overwrite it" in by_type(messages, "image_error")[0]["message"]
    run(dealer, paths=["in/img001.png"], output="out3")
    _, again = run(dealer, paths=["in/img001.png"], output="out3")
    assert "exists" in by_type(again, "image_error")[0]["message"]
    _, forced = run(dealer, paths=["in/img001.png"], output="out3", overwrite=True)
    assert by_type(forced, "result")[0]["written"] == "out3/img001.png"


def test_two_jobs_never_write_one_output_at_once(root, server):
    """The second job's image is refused while the first job writes the same output; once
    the first is done, an overwrite goes ahead."""
    from mpi_imgproc.client import Client

    slow = ["bilateral:d=15", "bilateral:d=15"]
    with Client(server.address, timeout=30) as client:
        first = client.submit_paths(["in/big.png"], slow, "dup", overwrite=True)
        second = client.submit_paths(["in/big.png"], BLUR, "dup", overwrite=True).result(60)
        code, message = second.errors[0]
        assert code == "path_refused" and "being written by another job" in message
        assert first.result(timeout=60).ok
        assert client.submit_paths(["in/big.png"], BLUR, "dup", overwrite=True).result(60).ok


def test_an_output_outside_the_root_is_refused(dealer):
    reply, _ = run(dealer, paths=["in/img000.png"], output="../elsewhere")
    assert reply["type"] == "error" and reply["code"] == "path_refused"


def test_a_server_without_a_data_root_takes_no_paths():
    with running_cluster(2) as plain:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(plain.address)
        reply, _ = run(sock, paths=["/etc/passwd"], output="/tmp")
        sock.close(linger=0)
    assert reply["code"] == "by_reference_disabled"


def test_a_missing_data_root_ends_the_server_with_one_line(tmp_path):
    cmd = mpi_command(
        2,
        "mpi_imgproc.server",
        "--bind",
        "tcp://127.0.0.1:*",
        "--data-root",
        str(tmp_path / "nope"),
    )
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no such folder" in done.stderr, done.stderr


@pytest.fixture(scope="module")
def region_inputs(root):
    """A striped, a tiled (zlib) and an uncompressed TIFF, OpenCV's own (LZW, its default:
    decoded through imagecodecs), a tiled zstd TIFF, and a .npy, of one image."""
    import tifffile

    image = random_image(np.random.default_rng(7), 700, 530, 3, np.uint16)
    rgb = image[..., ::-1]
    folder = root / "regions"
    folder.mkdir()
    tifffile.imwrite(folder / "strips.tif", rgb, rowsperstrip=37, compression="zlib")
    tifffile.imwrite(folder / "tiles.tif", rgb, tile=(64, 128), compression="zlib")
    tifffile.imwrite(folder / "plain.tif", rgb)
    assert cv2.imwrite(str(folder / "opencv.tif"), image)
    tifffile.imwrite(folder / "zstd.tif", rgb, tile=(128, 64), compression="zstd")
    np.save(folder / "raw.npy", image)
    return image, [f"regions/{name}" for name in (*TIFFS, "raw.npy")]


TIFFS = ("strips.tif", "tiles.tif", "plain.tif", "opencv.tif", "zstd.tif")


CHAIN = [
    "crop:x=5,y=9,width=500,height=600",
    "resize:scale=0.9,interpolation=linear",
    "sharpen",
    "rotate:angle=180",
]  # fmt: skip - one chain: every strip from its own input window


@pytest.mark.parametrize("tile", ["auto", 61])  # one strip, or twelve (strips of `tile` rows)
@pytest.mark.parametrize("ops", [BLUR, ["median_blur:ksize=5", "sharpen", "grayscale"], CHAIN])
def test_region_formats_are_read_and_written_by_regions_exactly(
    root, dealer, region_inputs, ops, tile
):
    image, paths = region_inputs
    out = f"out-regions-{ops[0].split(':')[0]}-{len(ops)}-{tile}"
    _, messages = run(dealer, paths=paths, output=out, result="same", pipeline=ops, tile=tile)
    results = by_type(messages, "result")
    assert not by_type(messages, "image_error") and len(results) == len(paths)
    assert {r["path"] for r in results} == {"regions"}
    strips = -(-Pipeline.parse(ops).output_shape(image.shape)[0] // 61) if tile == 61 else 1
    assert {r["tiles"] for r in results} == {strips}
    expected = Pipeline.parse(ops).apply(image)
    for name in TIFFS:
        written = cv2.imread(str(root / out / name), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(written, expected), name
    assert np.array_equal(np.load(root / out / "raw.npy"), expected)
    assert not [f for f in os.listdir(root / out) if ".part" in f]


def _submit_quietly(sock, **submit) -> dict:
    header = {"v": 2, "type": "submit", "result": "png", **submit}
    sock.send_multipart([json.dumps(header).encode()])
    assert sock.poll(20000)
    return json.loads(sock.recv_multipart()[0])


def _rest(sock) -> list[tuple[dict, list]]:
    messages: list[tuple[dict, list]] = []
    while not messages or messages[-1][0]["type"] != "done":
        assert sock.poll(60000), "no reply"
        head, *frames = sock.recv_multipart()
        messages.append((json.loads(head), frames))
    return messages


@pytest.mark.parametrize("tile", [0, 64])
def test_a_symlink_or_fifo_swapped_in_after_the_check_is_refused(root, dealer, tmp_path, tile):
    """Paths are checked at submit and used later: every open is checked again."""
    busy = root / "busy"
    write_images(busy, 4, size=(900, 900))
    outside = tmp_path / "secret.png"
    cv2.imwrite(str(outside), np.full((9, 9), 200, np.uint8))
    victims = [root / "in" / f"swap{tile}-{i}.png" for i in range(2)]
    for victim in victims:
        cv2.imwrite(str(victim), np.zeros((20, 20), np.uint8))
    paths = [f"busy/img00{i}.png" for i in range(4)] + [str(v) for v in victims]
    accepted = _submit_quietly(
        dealer,
        pipeline=["bilateral:d=15"],
        paths=paths,
        output=f"swapped{tile}",
        tile=tile,
        overwrite=True,
    )
    assert accepted["type"] == "accepted"
    victims[0].unlink()
    victims[0].symlink_to(outside)  # now a link out of the root
    victims[1].unlink()
    os.mkfifo(victims[1])  # now a FIFO that would block a reader
    messages = _rest(dealer)
    errors = {h["index"]: h for h, _ in messages if h["type"] == "image_error"}
    assert set(errors) == {4, 5}, errors
    assert all(e["code"] == "path_refused" for e in errors.values())
    assert not (root / f"swapped{tile}" / f"swap{tile}-0.png").exists()


def test_an_output_folder_swapped_for_a_link_out_of_the_root_gets_nothing(root, dealer, tmp_path):
    busy = root / "busy2"
    write_images(busy, 5, size=(900, 900))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    accepted = _submit_quietly(
        dealer,
        pipeline=["bilateral:d=15"],
        output="moved",
        paths=[f"busy2/img00{i}.png" for i in range(5)],
        tile=0,
    )
    assert accepted["type"] == "accepted"
    (root / "moved").rename(root / "moved.orig")
    (root / "moved").symlink_to(outside)
    messages = _rest(dealer)
    assert not list(outside.iterdir())
    results = [h for h, _ in messages if h["type"] == "result"]
    errors = [h for h, _ in messages if h["type"] == "image_error"]
    assert len(results) + len(errors) == 5 and errors
    assert all(e["code"] == "path_refused" for e in errors)


def test_cli_submit_by_reference_names_files_and_the_workers_write_them(root, server, tmp_path):
    import sys

    outside = tmp_path / "outside.png"
    cv2.imwrite(str(outside), np.zeros((8, 8), np.uint8))
    inputs = [str(root / "in" / "img000.png"), str(root / "in" / "img001.png"), str(outside)]
    cmd = [
        sys.executable,
        "-m",
        "mpi_imgproc.cli",
        "submit",
        "--by-reference",
        *inputs,
        "-o",
        str(root / "cli-out"),
        "--op",
        "invert",
        "--server",
        server.address,
        "-q",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert done.returncode == 1, done.stderr  # the outside file fails, alone
    assert "outside the server's data root" in done.stderr
    assert "2 of 3 images written" in done.stdout
    for name in ("img000.png", "img001.png"):
        source = cv2.imread(str(root / "in" / name), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(
            cv2.imread(str(root / "cli-out" / name), cv2.IMREAD_UNCHANGED), 255 - source
        )


def test_the_python_client_submits_by_reference_and_names_what_was_written(root, server):
    from mpi_imgproc.client import Client

    with Client(server.address, timeout=20) as client:
        job = client.submit_paths(["in/img000.png", "in/img002.png"], ["invert"], "py-out")
        result = job.result(timeout=60)
    assert result.ok and result.images == [None, None]
    assert result.written == {0: "py-out/img000.png", 1: "py-out/img002.png"}


# -- JPEG and PNG streamed by rank 0 (mpi_imgproc.streamio) ---------------------------------

STREAMED = [
    "crop:x=3,y=5,width=400,height=300",
    "resize:scale=0.9,interpolation=linear",
    "sharpen",
]  # fmt: skip - one chain: 300 rows to 270 has a period of 9 rows


@pytest.fixture(scope="module")
def streaming(tmp_path_factory):
    """A server that streams every JPEG and PNG by reference (--stream-min-mb 0), with inputs."""
    root = tmp_path_factory.mktemp("streamed")
    rng = np.random.default_rng(11)
    image = random_image(rng, 331, 413, 3)
    cv2.imwrite(str(root / "photo.jpg"), cv2.GaussianBlur(image, (0, 0), 2))
    cv2.imwrite(str(root / "scan.png"), image)
    cv2.imwrite(str(root / "gray.png"), image[..., 1])
    data = (root / "photo.jpg").read_bytes()
    (root / "cut.jpg").write_bytes(data[: len(data) // 3])
    with running_cluster(3, "--data-root", str(root), "--stream-min-mb", "0") as cluster:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(cluster.address)
        yield root, sock
        sock.close()


def _leftovers(folder) -> list[str]:
    return [f for f in os.listdir(folder) if ".part" in f]


@pytest.mark.parametrize("tile", ["auto", 40])  # one strip, or several
@pytest.mark.parametrize("source", ["photo.jpg", "scan.png", "gray.png"])
def test_jpeg_and_png_are_decoded_and_encoded_strip_by_strip_exactly(streaming, source, tile):
    root, sock = streaming
    out = f"out-{source.replace('.', '-')}-{tile}"
    _, messages = run(sock, paths=[source], output=out, result="png", pipeline=STREAMED, tile=tile)
    (result,) = by_type(messages, "result")
    assert result["path"] == "regions" and not by_type(messages, "image_error")
    assert (result["tiles"] > 1) == (tile == 40)
    decoded = cv2.imread(str(root / source), cv2.IMREAD_UNCHANGED)
    expected = Pipeline.parse(STREAMED).apply(decoded)
    written = cv2.imread(str(root / out / result["written"].split("/")[-1]), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(written, expected)
    assert not _leftovers(root / out) and not _leftovers(root)


def test_a_streamed_jpeg_output_is_opencvs_encoding_of_the_whole_result(streaming):
    """Byte for byte cv2.imencode of the whole-image result, with the encoder's restart
    interval (tests/test_streamio.py checks the encoder itself on many shapes)."""
    from mpi_imgproc import streamio

    root, sock = streaming
    _, messages = run(
        sock, paths=["scan.png"], output="out-jpeg", result="jpg", pipeline=BLUR, tile=48
    )
    (result,) = by_type(messages, "result")
    assert result["path"] == "regions" and result["tiles"] == 7  # the workers' strips
    expected = Pipeline.parse(BLUR).apply(cv2.imread(str(root / "scan.png")))
    rows = streamio.jpeg_block_rows(
        expected.shape, streamio.ENCODE_BLOCK_BYTES // expected[0].nbytes
    )
    interval = rows // 16 * -(-expected.shape[1] // 16)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95, cv2.IMWRITE_JPEG_RST_INTERVAL, interval]
    written = (root / "out-jpeg" / "scan.jpg").read_bytes()
    assert written == cv2.imencode(".jpg", expected, params)[1].tobytes()
    assert not _leftovers(root / "out-jpeg")


def test_a_truncated_jpeg_fails_alone_and_leaves_nothing_behind(streaming):
    root, sock = streaming
    _, messages = run(sock, paths=["cut.jpg", "photo.jpg"], output="out-cut", result="png",
                      pipeline=BLUR)  # fmt: skip
    (error,) = by_type(messages, "image_error")
    assert error["index"] == 0 and error["code"] == "image_read_error", error
    assert [r["index"] for r in by_type(messages, "result")] == [1]
    assert not _leftovers(root / "out-cut") and not _leftovers(root)
    assert sorted(os.listdir(root / "out-cut")) == ["photo.png"]


def test_a_cancelled_stream_leaves_no_scratch_file(streaming):
    """Cancelled while rank 0 decodes and the workers compute: every scratch file goes."""
    root, sock = streaming
    big = random_image(np.random.default_rng(3), 1500, 1400, 3)
    cv2.imwrite(str(root / "big.png"), big)
    header = {"v": 2, "type": "submit", "result": "png", "paths": ["big.png"], "tile": 300,
              "output": "out-cancel", "pipeline": ["bilateral:d=9"] * 4}  # fmt: skip
    sock.send_multipart([json.dumps(header).encode()])
    assert sock.poll(20000)
    accepted = json.loads(sock.recv_multipart()[0])
    cancel = {"v": 2, "type": "cancel", "job": accepted["job"], "token": accepted["token"]}
    sock.send_multipart([json.dumps(cancel).encode()])
    messages = []
    while not messages or messages[-1]["type"] != "done":
        assert sock.poll(30000), "no reply"
        messages.append(json.loads(sock.recv_multipart()[0]))
    assert messages[-1]["state"] == "cancelled" and messages[-1]["ok"] == 0
    assert not _leftovers(root / "out-cancel") and not _leftovers(root)


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_region_files_swap_red_and_blue_only(channels, dtype):
    """TIFF is RGB(A), the project BGR(A): the swap (through cvtColor, for speed) must be the
    plain reversal of the first three channels, for strided input and empty strips too."""
    from mpi_imgproc.regionio import swap_red_blue

    rng = np.random.default_rng(channels)
    block = rng.integers(0, np.iinfo(dtype).max + 1, (9, 11, channels), dtype=dtype)
    order = [2, 1, 0, 3][:channels] if channels > 1 else [0]
    for view in (block, block[1:8, ::2], block[:0]):
        got = swap_red_blue(view)
        expected = view[..., order] if channels > 1 else view
        assert got.dtype == view.dtype and np.array_equal(got, expected)
        if channels > 1:
            assert got.flags.c_contiguous and not np.shares_memory(got, view)


@pytest.mark.parametrize("channels", [1, 3, 4])
@pytest.mark.parametrize("suffix", [".tif", ".npy"])
def test_big_endian_region_files_are_read_in_native_order(tmp_path, channels, suffix):
    """A big-endian ("MM") 16-bit TIFF is memory-mapped in its file's byte order, and so is a
    big-endian .npy: a region read gives the pixels, in native order, as OpenCV reads them."""
    import tifffile

    from mpi_imgproc.regionio import open_region

    rng = np.random.default_rng(channels)
    shape = (40, 50) if channels == 1 else (40, 50, channels)
    pixels = rng.integers(0, 65536, shape, dtype=np.uint16)  # in the file's order (RGB(A))
    path = tmp_path / f"be{suffix}"
    if suffix == ".tif":
        extra = {"extrasamples": ["unassalpha"]} if channels == 4 else {}
        photometric = "minisblack" if channels == 1 else "rgb"
        tifffile.imwrite(path, pixels, byteorder=">", photometric=photometric, **extra)
    else:
        np.save(path, pixels.astype(">u2"))
    expected = pixels if channels == 1 or suffix == ".npy" else pixels[..., [2, 1, 0, 3][:channels]]
    got = open_region(str(path)).read(3, 37, 5, 45)
    assert got.dtype == np.dtype(np.uint16) and got.dtype.isnative
    assert np.array_equal(got, expected[3:37, 5:45])


@pytest.mark.parametrize("extra", ["unassalpha", "assocalpha", "unspecified"])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_an_alpha_tiff_reads_the_same_uploaded_or_by_regions(tmp_path, extra, dtype):
    """OpenCV premultiplies the colours of an 8-bit TIFF with unassociated alpha (the kind
    region outputs are); the decoder reads it as stored instead, as the region reader does,
    so a file gives the same pixels whichever way it goes."""
    import tifffile

    from mpi_imgproc.imageio import decode
    from mpi_imgproc.regionio import open_region

    rgba = np.random.default_rng(3).integers(0, np.iinfo(dtype).max + 1, (31, 23, 4), dtype)
    path = tmp_path / "alpha.tif"
    tifffile.imwrite(path, rgba, photometric="rgb", extrasamples=[extra], compression="zlib")
    stored = rgba[..., [2, 1, 0, 3]]
    assert np.array_equal(decode(path.read_bytes()), stored)
    assert np.array_equal(open_region(str(path)).read(0, 31, 0, 23), stored)


def _region(path) -> Any:
    from mpi_imgproc.regionio import open_region

    return open_region(str(path))


def test_a_region_input_truncated_under_its_reader_is_an_error_not_a_crash(tmp_path):
    """Region files are read with pread, not through a map: a file cut short while a worker
    reads it (a `cp` over it) is an ImageReadError, where a mapped read dies of SIGBUS."""
    import tifffile

    image = np.random.default_rng(1).integers(0, 256, (300, 200, 3), np.uint8)
    np.save(tmp_path / "in.npy", image)
    tifffile.imwrite(tmp_path / "in.tif", image)
    for name in ("in.npy", "in.tif"):
        reader = _region(tmp_path / name)
        assert np.array_equal(reader.read(0, 300, 0, 200)[..., ::-1 if name == "in.tif" else 1],
                              image)  # fmt: skip
        os.truncate(tmp_path / name, 4096)
        with pytest.raises(ImageReadError, match="file ends before byte"):
            reader.read(100, 200, 0, 200)
        reader.close()


def test_tiffs_whose_stored_samples_are_not_their_pixels_are_read_whole(tmp_path):
    """Palette, inverted gray, CMYK, rotated by a tag, 12-bit, one strip for a large image:
    a region read would differ from OpenCV's decoding (or decode the whole strip per task),
    so such files have no region access and go the whole way, as a JPEG does."""
    import tifffile

    rng = np.random.default_rng(2)
    gray = rng.integers(0, 256, (64, 48), np.uint8)
    cases = {
        "palette": dict(data=gray, photometric="palette",
                        colormap=rng.integers(0, 65536, (3, 256), np.uint16)),
        "miniswhite": dict(data=gray, photometric="miniswhite"),
        "cmyk": dict(data=rng.integers(0, 256, (64, 48, 4), np.uint8), photometric="separated"),
        "rotated": dict(data=gray, extratags=[(274, "H", 1, 3, True)]),
        "one strip": dict(data=np.zeros((9000, 8000), np.uint8), rowsperstrip=9000,
                          compression="zlib"),
    }  # fmt: skip
    for name, kwargs in cases.items():
        tifffile.imwrite(tmp_path / f"{name}.tif", kwargs.pop("data"), **kwargs)
        assert _region(tmp_path / f"{name}.tif") is None, name
    tifffile.imwrite(tmp_path / "plain.tif", gray, rowsperstrip=7, compression="zlib")
    assert np.array_equal(_region(tmp_path / "plain.tif").read(3, 50, 5, 40), gray[3:50, 5:40])


def test_damaged_region_files_fail_with_a_reason(tmp_path):
    import tifffile

    image = np.random.default_rng(3).integers(0, 256, (64, 64, 3), np.uint8)
    ok, jpeg = cv2.imencode(".jpg", image)
    jpeg = bytearray(jpeg)
    sof = jpeg.find(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = (40000).to_bytes(2, "big") * 2  # a 40000x40000 frame
    tifffile.imwrite(tmp_path / "bomb.tif", shape=(64, 64, 3), dtype=np.uint8,
                     photometric="ycbcr", compression="jpeg", rowsperstrip=64,
                     data=iter([bytes(jpeg)]))  # fmt: skip
    with pytest.raises(ImageReadError, match="declares 40000x40000"):
        _region(tmp_path / "bomb.tif").read(0, 16, 0, 64)
    (tmp_path / "header.tif").write_bytes(b"II*\x00")
    (tmp_path / "nopage.tif").write_bytes(b"II*\x00\x00\x00\x00\x00")
    np.save(tmp_path / "empty.npy", np.zeros((0, 10, 3), np.uint8))
    np.save(tmp_path / "fortran.npy", np.asfortranarray(image[..., 0]))
    damaged = {"header.tif": "cannot read for regions", "nopage.tif": "cannot read for regions",
               "empty.npy": "image is empty", "fortran.npy": "Fortran-ordered"}  # fmt: skip
    for name, why in damaged.items():
        with pytest.raises(ImageReadError, match=why):
            _region(tmp_path / name)
    os.mkfifo(tmp_path / "fifo.tif")
    with pytest.raises(ImageReadError, match="not a regular file"):  # at once, not a hang
        _region(tmp_path / "fifo.tif")


def test_sparse_tiles_read_as_zeros(tmp_path):
    """Tiles with no data (offset and count 0, as GDAL writes them) are zeros, as OpenCV
    decodes them."""
    import tifffile

    tiles = iter([np.full((16, 16), 7, np.uint8), None, None, np.full((16, 16), 9, np.uint8)])
    tifffile.imwrite(tmp_path / "sparse.tif", tiles, shape=(32, 32), dtype=np.uint8,
                     tile=(16, 16))  # fmt: skip
    got = _region(tmp_path / "sparse.tif").read(0, 32, 0, 32)
    assert (got[:16, :16] == 7).all() and (got[16:, 16:] == 9).all()
    assert (got[:16, 16:] == 0).all() and (got[16:, :16] == 0).all()

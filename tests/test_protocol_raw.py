"""Drive the server with raw pyzmq, from the frame tables of docs/protocol.md alone.

Every message the server sends is also checked against the reply schemas of
``mpi_imgproc.protocol``: the server must send exactly what the document promises.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import zmq
from cluster import running_cluster

from mpi_imgproc.protocol import decode_reply

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def server():
    with running_cluster(2) as cluster:
        yield cluster


@pytest.fixture
def dealer(server):
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.address)
    yield sock
    sock.close()


def send(sock, header: dict, *frames: bytes) -> None:
    sock.send_multipart([json.dumps(header).encode(), *frames])


def receive(sock, timeout_ms: int = 20000) -> tuple[dict, list[bytes]]:
    assert sock.poll(timeout_ms), "no reply"
    header, *frames = sock.recv_multipart()
    decode_reply(header)  # raises if the server strays from its schema
    return json.loads(header), frames


def submit(sock, header: dict, *data: bytes) -> dict:
    """A submit declaring ``data``'s sizes, then one upload per image: the ``accepted``."""
    for desc, frame in zip(header["images"], data):
        desc.setdefault("size", len(frame))
    send(sock, {"v": 2, "type": "submit", **header})
    accepted, _ = receive(sock)
    assert accepted["type"] == "accepted", accepted
    for index, frame in enumerate(data):
        ticket = {"job": accepted["job"], "token": accepted["token"]}
        send(sock, {"v": 2, "type": "upload", **ticket, "index": index}, frame)
    return accepted


def until_done(sock) -> list[tuple[dict, list[bytes]]]:
    messages = []
    while not messages or messages[-1][0]["type"] != "done":
        messages.append(receive(sock))
    return messages


def test_submit_raw_pixels_frame_by_frame(dealer):
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    accepted = submit(
        dealer,
        {
            "req": "r1",
            "pipeline": [{"op": "grayscale", "params": {}}],
            "images": [{"name": "a", "encoding": "raw", "shape": [2, 3, 3], "dtype": "uint8"}],
        },
        pixels.tobytes(),
    )
    assert accepted["req"] == "r1" and accepted["images"] == 1 and len(accepted["token"]) >= 22
    seen = []
    for header, frames in until_done(dealer):
        assert header["v"] == 2 and header["job"] == accepted["job"]
        seen.append(header["type"])
        if header["type"] == "result":
            assert header["encoding"] == "raw" and header["shape"] == [2, 3]
            out = np.frombuffer(frames[0], dtype=header["dtype"]).reshape(header["shape"])
            assert np.array_equal(out, cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY))
        if header["type"] == "done":
            assert header["state"] == "done" and header["ok"] == 1 and header["failed"] == 0
            assert header["cancelled"] == 0
            stages = {"queue", "decode", "split", "send", "compute", "receive", "merge", "encode"}
            assert stages | {"total", "ranks"} <= set(header["stats"])
    assert "progress" in seen and "result" in seen


def test_encoded_file_bytes_in_png_out(dealer):
    image = np.full((8, 9, 3), 40, np.uint8)
    png = cv2.imencode(".png", image)[1].tobytes()
    header = {
        "pipeline": ["invert"],
        "result": "png",
        "images": [{"name": "x.png", "encoding": "file"}],
    }
    submit(dealer, header, png)
    results = [(h, f) for h, f in until_done(dealer) if h["type"] == "result"]
    assert results[0][0]["encoding"] == "png"
    out = cv2.imdecode(np.frombuffer(results[0][1][0], np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(out, 255 - image)


def _header(**fields) -> bytes:
    return json.dumps({"v": 2, **fields}).encode()


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([b"not json"], "malformed"),
        ([b"[1, 2]"], "malformed"),
        ([_header(v=99, type="info")], "unsupported_version"),
        ([_header(type="dance")], "unknown_type"),
        ([_header(type="submit", pipeline=["invert"], images=[{"name": "a"}])], "malformed"),
        (
            [_header(type="submit", pipeline=["invert"], tile=-3, images=[{"size": 1}])],
            "malformed",
        ),
        ([_header(type="submit", pipeline="invert", images=[{"size": 1}])], "malformed"),
        ([_header(type="submit", pipeline=["invert"], images=[{"size": 1}]), b"x"], "malformed"),
        ([_header(type="submit", pipeline=["blurr"], images=[{"size": 1}])], "unknown_op"),
        ([_header(type="cancel", job="j0", token="t")], "unknown_job"),
        ([_header(type="status", job="j0")], "malformed"),
    ],
)
def test_malformed_messages_get_an_error_naming_the_cause(dealer, frames, code):
    dealer.send_multipart(frames)
    header, _ = receive(dealer)
    assert header["type"] == "error" and header["code"] == code and header["message"]


def test_errors_echo_req_whenever_it_can_be_read(dealer):
    send(dealer, {"v": 2, "type": "status", "req": "q7", "job": ["a", "list"], "token": "t"})
    header, _ = receive(dealer)
    assert header["type"] == "error" and header["req"] == "q7" and "$.job" in header["message"]


def test_undecodable_image_is_an_image_error_not_a_request_error(dealer):
    header = {"pipeline": ["invert"], "images": [{"name": "junk.jpg", "encoding": "file"}]}
    submit(dealer, header, b"\xff\xd8\xff junk")
    messages = until_done(dealer)
    errors = [h for h, _ in messages if h["type"] == "image_error"]
    assert errors[0]["name"] == "junk.jpg" and errors[0]["code"] == "image_read_error"
    assert messages[-1][0]["failed"] == 1


def test_upload_of_another_size_than_declared_fails_that_image(dealer):
    header = {"pipeline": ["invert"], "images": [{"name": "a.png", "size": 10}]}
    submit(dealer, header, b"123")
    errors = [h for h, _ in until_done(dealer) if h["type"] == "image_error"]
    assert errors[0]["code"] == "malformed" and "declared 10" in errors[0]["message"]


def test_heartbeat_and_info(dealer):
    send(dealer, {"v": 2, "type": "heartbeat", "req": "hb"})
    assert receive(dealer)[0] == {"v": 2, "type": "heartbeat", "req": "hb"}
    send(dealer, {"v": 2, "type": "info"})
    info, _ = receive(dealer)
    assert info["type"] == "info" and info["ranks"] == 2 and info["versions"]["protocol"] == "2"
    assert info["heartbeat_s"] == info["client_timeout"] / 3


def test_progress_false_means_no_progress_messages(dealer):
    pixels = np.zeros((4, 5), np.uint8)
    header = {
        "pipeline": ["invert"],
        "progress": False,
        "images": [{"name": "a", "encoding": "raw", "shape": [4, 5], "dtype": "uint8"}],
    }
    submit(dealer, header, pixels.tobytes())
    assert [h["type"] for h, _ in until_done(dealer)] == ["result", "done"]


def test_crop_flip_and_quarter_turns_cost_no_task_of_their_own(dealer):
    from mpi_imgproc.pipeline import Pipeline

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (300, 410, 3), np.uint8)
    specs = [
        "crop:x=7,y=11,width=350,height=250",
        "sharpen",
        "rotate:angle=90",
        "median_blur:ksize=5",
        "flip:axis=both",
    ]
    header = {
        "pipeline": specs,
        "tile": 64,
        "images": [{"name": "a", "encoding": "raw", "shape": list(image.shape), "dtype": "uint8"}],
    }
    submit(dealer, header, image.tobytes())
    results = [(h, f) for h, f in until_done(dealer) if h["type"] == "result"]
    out_header, frames = results[0]
    out = np.frombuffer(frames[0], np.uint8).reshape(out_header["shape"])
    assert np.array_equal(out, Pipeline.parse(specs).apply(image))
    # One chain (mpi_imgproc.chain): the views fuse with the filters, and each of the output's
    # 64-row strips is one task computed from its own input window.
    (chain,) = Pipeline.parse(specs).stages_for(image.shape)
    assert out_header["tiles"] == len(chain.tiles(64)) == -(-350 // 64)

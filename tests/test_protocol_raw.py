"""Drive the server with raw pyzmq, from the frame tables of docs/protocol.md alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import zmq
from cluster import running_cluster

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
    return json.loads(header), frames


def test_submit_raw_pixels_frame_by_frame(dealer):
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    send(
        dealer,
        {
            "v": 1,
            "type": "submit",
            "req": "r1",
            "pipeline": [{"op": "grayscale", "params": {}}],
            "images": [{"name": "a", "encoding": "raw", "shape": [2, 3, 3], "dtype": "uint8"}],
        },
        pixels.tobytes(),
    )
    accepted, _ = receive(dealer)
    assert accepted["type"] == "accepted" and accepted["req"] == "r1" and accepted["images"] == 1
    seen = []
    while True:
        header, frames = receive(dealer)
        assert header["v"] == 1 and header["job"] == accepted["job"]
        seen.append(header["type"])
        if header["type"] == "result":
            assert header["encoding"] == "raw" and header["shape"] == [2, 3]
            out = np.frombuffer(frames[0], dtype=header["dtype"]).reshape(header["shape"])
            import cv2

            assert np.array_equal(out, cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY))
        if header["type"] == "done":
            assert header["state"] == "done" and header["ok"] == 1 and header["failed"] == 0
            stages = {"queue", "decode", "split", "send", "compute", "receive", "merge", "encode"}
            assert stages | {"total", "ranks"} <= set(header["stats"])
            break
    assert "progress" in seen and "result" in seen


def test_encoded_file_bytes_in_png_out(dealer):
    import cv2

    image = np.full((8, 9, 3), 40, np.uint8)
    png = cv2.imencode(".png", image)[1].tobytes()
    send(
        dealer,
        {
            "v": 1,
            "type": "submit",
            "pipeline": ["invert"],
            "result": "png",
            "images": [{"name": "x.png", "encoding": "file"}],
        },
        png,
    )
    while True:
        header, frames = receive(dealer)
        if header["type"] == "result":
            assert header["encoding"] == "png"
            out = cv2.imdecode(np.frombuffer(frames[0], np.uint8), cv2.IMREAD_UNCHANGED)
            assert np.array_equal(out, 255 - image)
        if header["type"] == "done":
            break


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([b"not json"], "malformed"),
        ([b"[1, 2]"], "malformed"),
        ([json.dumps({"v": 99, "type": "info"}).encode()], "unsupported_version"),
        ([json.dumps({"v": 1, "type": "dance"}).encode()], "unknown_type"),
        (
            [
                json.dumps(
                    {"v": 1, "type": "submit", "pipeline": ["invert"], "images": [{"name": "a"}]}
                ).encode()
            ],
            "malformed",
        ),
        (
            [
                json.dumps(
                    {
                        "v": 1,
                        "type": "submit",
                        "pipeline": ["invert"],
                        "tile": -3,
                        "images": [{"name": "a"}],
                    }
                ).encode(),
                b"x",
            ],
            "invalid_parameter",
        ),
        (
            [
                json.dumps(
                    {"v": 1, "type": "submit", "pipeline": "invert", "images": [{"name": "a"}]}
                ).encode(),
                b"x",
            ],
            "invalid_pipeline",
        ),
        ([json.dumps({"v": 1, "type": "cancel", "job": "j0"}).encode()], "unknown_job"),
    ],
)
def test_malformed_messages_get_an_error_naming_the_cause(dealer, frames, code):
    dealer.send_multipart(frames)
    header, _ = receive(dealer)
    assert header["type"] == "error" and header["code"] == code and header["message"]


def test_undecodable_image_is_an_image_error_not_a_request_error(dealer):
    send(
        dealer,
        {
            "v": 1,
            "type": "submit",
            "pipeline": ["invert"],
            "images": [{"name": "junk.jpg", "encoding": "file"}],
        },
        b"\xff\xd8\xff junk",
    )
    types = []
    while True:
        header, _ = receive(dealer)
        types.append(header["type"])
        if header["type"] == "image_error":
            assert header["name"] == "junk.jpg" and header["code"] == "image_read_error"
        if header["type"] == "done":
            assert header["failed"] == 1
            break
    assert types[0] == "accepted"


def test_heartbeat_and_info(dealer):
    send(dealer, {"v": 1, "type": "heartbeat", "req": "hb"})
    assert receive(dealer)[0] == {"v": 1, "type": "heartbeat", "req": "hb"}
    send(dealer, {"v": 1, "type": "info"})
    info, _ = receive(dealer)
    assert info["type"] == "info" and info["ranks"] == 2 and info["versions"]["protocol"] == "1"


def test_progress_false_means_no_progress_messages(dealer):
    pixels = np.zeros((4, 5), np.uint8)
    send(
        dealer,
        {
            "v": 1,
            "type": "submit",
            "pipeline": ["invert"],
            "progress": False,
            "images": [{"name": "a", "encoding": "raw", "shape": [4, 5], "dtype": "uint8"}],
        },
        pixels.tobytes(),
    )
    types = []
    while not types or types[-1] != "done":
        types.append(receive(dealer)[0]["type"])
    assert types == ["accepted", "result", "done"]

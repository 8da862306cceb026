"""Hypothesis sends generated requests to a live server; after each one, the server must still
answer another client and compute a normal job exactly."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import zmq
from cluster import running_cluster
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mpi_imgproc.client import Client
from mpi_imgproc.protocol import REQUEST_TYPES

pytestmark = pytest.mark.timeout(300)
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))

json_leaf = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
shapes = st.lists(st.integers(-3, 2**33) | st.booleans() | st.none(), min_size=0, max_size=4)
descs = st.fixed_dictionaries(
    {},
    optional={
        "name": json_value,
        "size": st.integers(-2, 2**40) | json_value,
        "encoding": st.sampled_from(["file", "raw", "jpeg"]) | json_value,
        "shape": shapes | json_value,
        "dtype": st.sampled_from(["uint8", "uint16", "float64", "<u2"]) | json_value,
    },
)
ops = st.sampled_from(["invert", "gaussian_blur", "resize", "crop", "median_blur", "nope"])
pipeline_items = st.text(max_size=30) | st.fixed_dictionaries(
    {"op": ops | json_value},
    optional={
        "params": st.dictionaries(st.sampled_from(["ksize", "scale", "x", "width"]), json_value)
    },
)
headers = st.fixed_dictionaries(
    {"v": st.sampled_from([2, 2, 2, 1, "2", None]), "type": st.sampled_from([*REQUEST_TYPES, "x"])},
    optional={
        "req": json_value,
        "job": json_value,
        "token": json_value,
        "index": json_value,
        "pipeline": st.lists(pipeline_items, max_size=3) | json_value,
        "images": st.lists(descs, max_size=3) | json_value,
        "tile": st.integers(-2, 2**66) | json_value,
        "result": st.sampled_from(["raw", "png", "gif"]) | json_value,
        "progress": json_value,
        "extra": json_value,
    },
)


@pytest.fixture(scope="module")
def server():
    with running_cluster(2, "--max-request-mb", "4") as cluster:
        yield cluster


def test_generated_requests_never_stop_the_server(server):
    ctx = zmq.Context.instance()
    attacker = ctx.socket(zmq.DEALER)
    attacker.setsockopt(zmq.LINGER, 0)
    attacker.connect(server.address)
    image = np.arange(5 * 7 * 3, dtype=np.uint8).reshape(5, 7, 3)
    with Client(server.address, timeout=10) as good:

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        )
        @given(header=headers, frames=st.lists(st.binary(max_size=64), max_size=2))
        def attack(header, frames):
            attacker.send_multipart([json.dumps(header).encode(), *frames])
            while attacker.poll(20):  # read whatever it answers; it must be JSON
                reply = json.loads(attacker.recv_multipart()[0])
                assert isinstance(reply, dict) and "type" in reply
            assert good.info()["ranks"] == 2
            result = good.submit([image], ["invert"], tile=3).result(timeout=10)
            assert np.array_equal(result.images[0], 255 - image)

        attack()
    attacker.close()

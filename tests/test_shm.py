"""Raw pixels through shared memory between a same-host client and the cluster (mpi_imgproc.shm):
segments checked like any hostile input, results exact, the server unharmed by forged ones."""

from __future__ import annotations

import gc
import json
import os
import re
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest
import zmq
from cluster import running_cluster
from conftest import random_image

from mpi_imgproc import shm
from mpi_imgproc.client import Client, RequestTooLarge, ServerError
from mpi_imgproc.connection import shares_memory
from mpi_imgproc.pipeline import Pipeline
from mpi_imgproc.protocol import MAX_IMAGES_PER_REQUEST, decode_reply

pytestmark = pytest.mark.skipif(shm.host_identity() is None, reason="no memfd/proc here")


def ref_of(segment: shm.Segment, **change) -> SimpleNamespace:
    return SimpleNamespace(**{**segment.ref(), **change})


# -- the segment checks, in one process ----------------------------------------------------------


def test_attach_reads_and_writes_the_client_segments():
    image = random_image(np.random.default_rng(0), 37, 29)
    source, result = shm.Segment.holding(image), shm.Segment((37, 29, 3), np.uint8)
    inp = shm.attach(ref_of(source), image.shape, "uint8", False, "segment")
    out = shm.attach(ref_of(result), image.shape, "uint8", True, "result_segment")
    np.testing.assert_array_equal(inp.pixels(), image)
    out.write(255 - image)
    np.testing.assert_array_equal(result.array, 255 - image)
    with pytest.raises(shm.SegmentRefused, match="result is"):
        out.write(image[:, :3])
    inp.close(), out.close()


GENERIC = "not a segment of this client"


def test_attach_refuses_a_forged_reference_saying_nothing_about_what_is_there():
    segment = shm.Segment.holding(np.zeros((8, 8), np.uint8))
    messages = set()
    for change in ({"nonce": "00" * 16}, {"fd": 999_999}, {"pid": 2**22 - 1}):
        with pytest.raises(shm.SegmentRefused, match=GENERIC) as refused:
            shm.attach(ref_of(segment, **change), (8, 8), "uint8", False, "segment")
        messages.add(str(refused.value))
    assert len(messages) == 1  # a wrong nonce, no such descriptor, no such process: alike
    with pytest.raises(shm.SegmentRefused, match="hex"):
        shm.attach(ref_of(segment, nonce="zz"), (8, 8), "uint8", False, "segment")


def test_attach_refuses_anything_but_a_sealed_full_memfd_of_the_size():
    segment = shm.Segment.holding(np.zeros((8, 8), np.uint8))
    with pytest.raises(shm.SegmentRefused, match="has 128 bytes; \\[9, 8\\] uint8 needs 136"):
        shm.attach(ref_of(segment), (9, 8), "uint8", False, "segment")
    with pytest.raises(shm.SegmentRefused, match="uint16 needs 192"):
        shm.attach(ref_of(segment), (8, 8), "uint16", False, "segment")
    sparse = shm.Segment((64, 64), np.uint8)  # its pixels never written: pages rank 0 would pay
    with pytest.raises(shm.SegmentRefused, match="holes"):
        shm.attach(ref_of(sparse), (64, 64), "uint8", False, "segment")
    shm.attach(ref_of(sparse), (64, 64), "uint8", True, "result_segment").close()  # results: fine
    nonce = "ab" * 16
    reader, writer = os.pipe()  # opening a FIFO could block or steal its data: never opened
    messages = set()
    with tempfile.TemporaryFile() as plain:
        os.ftruncate(plain.fileno(), shm.HEADER + 64)
        os.pwrite(plain.fileno(), shm.MAGIC + bytes.fromhex(nonce), 0)
        for fd in (reader, plain.fileno(), os.open("/dev/null", os.O_RDONLY)):
            ref = SimpleNamespace(pid=os.getpid(), fd=fd, nonce=nonce)
            with pytest.raises(shm.SegmentRefused, match=GENERIC) as refused:
                shm.attach(ref, (8, 8), "uint8", False, "segment")
            messages.add(str(refused.value))
    assert len(messages) == 1  # a pipe, a file and a device all read the same
    unsealed = os.memfd_create("unsealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(unsealed, shm.HEADER + 64)
    os.pwrite(unsealed, shm.MAGIC + bytes.fromhex(nonce) + bytes(shm.HEADER + 40), 0)
    ref = SimpleNamespace(pid=os.getpid(), fd=unsealed, nonce=nonce)
    with pytest.raises(shm.SegmentRefused, match="sealed against shrinking"):
        shm.attach(ref, (8, 8), "uint8", False, "segment")
    os.close(reader), os.close(writer), os.close(unsealed)


def _descriptors() -> int:
    gc.collect()  # segments of earlier tests
    return len(os.listdir("/proc/self/fd"))


def test_mapped_arrays_hold_no_descriptor_and_unmap_with_the_last_view():
    before = _descriptors()
    segments = [shm.Segment.holding(np.full((16, 16), i, np.uint8)) for i in range(50)]
    arrays = [segment.array for segment in segments]
    for segment in segments:
        segment.close()
    assert _descriptors() == before  # Python's mmap would keep a duplicate each
    views = [a[2:5] for a in arrays]
    del arrays, segments
    assert [int(v[0, 0]) for v in views] == list(range(50))  # still mapped through the views


def test_a_worker_never_follows_a_reused_descriptor_into_another_segment():
    image = random_image(np.random.default_rng(1), 20, 16, channels=1)
    first = shm.Segment.holding(image)
    attached = shm.attach(ref_of(first), image.shape, "uint8", True, "segment")
    path, layout = attached.path, attached.layout()
    np.testing.assert_array_equal(
        shm.SegmentReader(path, layout).read(3, 9, 2, 11), image[3:9, 2:11]
    )
    shm.write_rows(path, layout, 4, 0, np.zeros((2, 16), np.uint8))
    shm.write_rows(path, layout, 7, 5, np.ones((3, 4), np.uint8))  # not full rows: row by row
    expected = image.copy()
    expected[4:6], expected[7:10, 5:9] = 0, 1
    np.testing.assert_array_equal(first.array, expected)
    other = shm.Segment((20, 16), np.uint8)
    again = shm.attach(ref_of(other), (20, 16), "uint8", True, "segment")
    number = attached.fd
    attached.close()
    os.dup2(again.fd, number)  # rank 0 reused the number for another job's segment
    with pytest.raises(shm.SegmentRefused, match="lacks the nonce"):
        shm.SegmentReader(path, layout)
    with pytest.raises(shm.SegmentRefused, match="lacks the nonce"):
        shm.write_rows(path, layout, 0, 0, np.zeros((1, 16), np.uint8))
    os.close(number), again.close()


def test_a_shared_array_is_its_segment_and_views_are_not():
    array = shm.shared_array((5, 6, 3), np.uint16)
    assert shm.owner_of(array) is not None and shm.owner_of(array).array.shape == (5, 6, 3)
    assert shm.owner_of(array[1:]) is None and shm.owner_of(array + 1) is None
    assert shm.owner_of(np.zeros(3)) is None


def test_the_client_uses_segments_only_for_a_server_that_can_open_them():
    here = shm.host_identity()
    assert shares_memory({"shm": {"host": here, "uid": os.geteuid()}})
    assert shares_memory({"shm": {"host": here, "uid": 0}})
    assert not shares_memory({"shm": {"host": "elsewhere", "uid": os.geteuid()}})
    assert not shares_memory({"shm": {"host": here, "uid": os.geteuid() + 1}})
    assert not shares_memory({"shm": None}) and not shares_memory({})


# -- through a real cluster ------------------------------------------------------------------------

PIPELINES = {
    "tiled": ["gaussian_blur:ksize=9", "sobel"],
    "chain": [
        "crop:x=3,y=5,width=80,height=54",
        "resize:scale=0.5,interpolation=linear",
        "sharpen",
    ],
    "global": ["grayscale", "equalize_hist", "box_blur:ksize=3"],
}


@pytest.fixture(scope="module")
def server():
    with running_cluster(3) as cluster:
        yield cluster


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", PIPELINES)
@pytest.mark.parametrize("channels, dtype", [(3, np.uint8), (1, np.uint16)])
def test_arrays_go_through_shared_memory_and_come_back_exact(server, kind, channels, dtype):
    if kind == "global" and dtype == np.uint16:
        pytest.skip("equalize_hist takes 8-bit images")
    rng = np.random.default_rng(7)
    images = [
        random_image(rng, 411, 397, channels, dtype),
        random_image(rng, 64, 90, channels, dtype),  # under SHARED_MIN_BYTES: the socket
    ]
    pipeline = Pipeline.parse(PIPELINES[kind])
    with Client(server.address, timeout=30) as client:
        job = client.submit(images, pipeline)
        results = [e for e in job.events(timeout=60) if e.type == "result"]
        outcome = job.result(timeout=60)
    assert outcome.ok, outcome.errors
    assert [e.header["encoding"] for e in sorted(results, key=lambda e: e.header["index"])] == [
        "shm",
        "raw",
    ]
    assert all(not e.header.get("written") for e in results)
    for image, got in zip(images, outcome.images):
        np.testing.assert_array_equal(got, pipeline.apply(image))
    shared = next(e for e in results if e.header["encoding"] == "shm")
    assert (shared.header["path"] == "regions") == (kind != "global")


@pytest.mark.timeout(120)
def test_a_shared_array_is_sent_without_a_copy_and_sockets_stay_an_option(server):
    image = random_image(np.random.default_rng(3), 320, 300)
    shared = shm.shared_array(image.shape, image.dtype)
    shared[...] = image
    pipeline = Pipeline.parse(["median_blur:ksize=5"])
    with Client(server.address, timeout=30) as client:
        job = client.submit([shared, shared], pipeline)  # the same segment twice, read-only
        outcome = job.result(timeout=60)
        assert outcome.ok, outcome.errors
        for got in outcome.images:
            np.testing.assert_array_equal(got, pipeline.apply(image))
        np.testing.assert_array_equal(shared, image)  # the input is untouched
        again = client.submit([shared], pipeline).result(timeout=60)  # its fd is still open
        np.testing.assert_array_equal(again.images[0], pipeline.apply(image))
    with Client(server.address, timeout=30, shared_memory=False) as client:
        job = client.submit([image], pipeline)
        encodings = {e.header["encoding"] for e in job.events(timeout=60) if e.type == "result"}
        assert encodings == {"raw"}
        np.testing.assert_array_equal(job.result(timeout=60).images[0], pipeline.apply(image))


def _memfds() -> int:
    """Shared-memory segments this process holds open."""
    fds = os.listdir("/proc/self/fd")
    return sum(os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:") for fd in fds
               if os.path.exists(f"/proc/self/fd/{fd}"))  # fmt: skip


@pytest.mark.timeout(120)
def test_results_land_in_the_callers_out_arrays_job_after_job(server):
    """A shared_array ``out`` is written by the workers themselves: no segment is made for
    the result, job after job, and the result is ``out`` itself; small images too."""
    rng = np.random.default_rng(5)
    pipeline = Pipeline.parse(["gaussian_blur:ksize=9", "crop:x=2,y=3,width=300,height=250"])
    blur = Pipeline.parse(["gaussian_blur:ksize=9"])
    images = [random_image(rng, 333, 317) for _ in range(3)]
    source = shm.shared_array(images[0].shape, images[0].dtype)
    out = shm.shared_array((250, 300, 3), np.uint8)
    small, small_out = random_image(rng, 40, 30, 1), shm.shared_array((40, 30), np.uint8)
    with Client(server.address, timeout=30) as client:
        client.info()
        held = _memfds()
        for image in images:
            source[...] = image
            job = client.submit([source, small], blur, out=[None, small_out])
            job.result(timeout=60)
            job = client.submit([source], pipeline, out=[out])
            assert _memfds() == held  # neither the input nor the result needed a segment
            (event,) = [e for e in job.events(timeout=60) if e.type == "result"]
            assert np.shares_memory(event.frames[0], out)  # it came in out's own pages
            outcome = job.result(timeout=60)
            assert outcome.ok, outcome.errors
            assert outcome.images[0] is out
            np.testing.assert_array_equal(out, pipeline.apply(image))
        np.testing.assert_array_equal(small_out, blur.apply(small))


@pytest.mark.timeout(120)
def test_an_out_array_that_cannot_take_the_result_is_refused_before_anything_is_sent(server):
    image = random_image(np.random.default_rng(6), 330, 300)
    pipeline = Pipeline.parse(["sharpen"])
    shared = shm.shared_array(image.shape, image.dtype)
    shared[...] = image
    out, other = (shm.shared_array(image.shape, image.dtype) for _ in range(2))
    refused = {
        "plain": ([image], [np.zeros(image.shape, np.uint8)], "made by mpi_imgproc.shm"),
        "a view": ([image], [out[:]], "made by mpi_imgproc.shm"),
        "shape": ([image[:, 1:]], [out], "the result is (330, 299, 3)"),
        "dtype": ([image.astype(np.uint16)], [out], "uint16; out is"),
        "itself": ([shared], [shared], "out[0] is also image[0]"),
        "a view of itself": ([shared.view(np.ndarray)], [shared], "out[0] is also image[0]"),
        "another image": ([image, shared], [shared, None], "out[0] is also image[1]"),
        "twice": ([image, image], [out, out], "out[0] is also out[1]"),
        "count": ([image, image], [out], "out has 1 arrays for 2 images"),
        "not a list": ([image], out, "out is a list"),
        "a path": (["/nonexistent.png"], [out], "out is for array images"),
        "a unit axis": ([image[..., :1]], [out], "unit channel axis"),
    }
    with Client(server.address, timeout=30) as client:
        for images, outs, message in refused.values():
            with pytest.raises(ValueError, match=re.escape(message)):
                client.submit(images, pipeline, out=outs)
        with pytest.raises(ValueError, match="raw results"):
            client.submit([image], pipeline, result="png", out=[out])
        slow = Pipeline.parse(["median_blur:ksize=31"] * 20)  # long enough to ask thrice
        job = client.submit([shared], slow, out=[out])
        for images, outs in (([image], [out]), ([out], [other]), ([out[10:20]], None)):
            with pytest.raises(ValueError, match="the out of an unfinished job"):
                client.submit(images, pipeline, out=outs)  # out, or a view of it, as input
        (item,) = client.map([out[5:]], pipeline, timeout=60)
        assert item.error[0] == "in_use" and "unfinished job" in item.error[1]
        assert job.result(timeout=60).ok
        outcome = client.submit([image], pipeline, out=[out]).result(timeout=60)  # free again
        np.testing.assert_array_equal(out, pipeline.apply(image))
        assert outcome.ok
        # a submit the server refuses, or one never sent, unmarks its out at once
        with pytest.raises(ServerError, match="tile"):
            client.submit([image], pipeline, tile=-3, out=[out])
        many = MAX_IMAGES_PER_REQUEST + 1
        with pytest.raises(RequestTooLarge):
            client.submit([image] * many, pipeline, out=[out] + [None] * (many - 1))
        assert client.submit([image], pipeline, out=[out]).result(timeout=60).ok
        # an image that ends without its result leaves its out marked: a task may still write
        job = client.submit([image], slow, out=[other])
        job.cancel()
        assert job.result(timeout=60).state == "cancelled"
        with pytest.raises(ValueError, match="ended without its result"):
            client.submit([image], pipeline, out=[other])
    with Client(server.address, timeout=30, shared_memory=False) as client:
        with pytest.raises(ValueError, match="needs a server on this host"):
            client.submit([image], pipeline, out=[out])


def test_a_renewed_segment_refuses_its_old_nonce():
    """What keeps a late task of an earlier job out of a reused ``out``."""
    segment = shm.Segment((4, 5, 3), np.uint8)
    old = segment.ref()
    segment.renew()
    with pytest.raises(shm.SegmentRefused):
        shm.attach(ref_of(segment, nonce=old["nonce"]), (4, 5, 3), "uint8", True, "result")
    shm.attach(ref_of(segment), (4, 5, 3), "uint8", True, "result").close()
    segment.close()


def _submit(sock: zmq.Socket, images: list[dict], **extra) -> tuple[dict, list[dict]]:
    header = {"v": 2, "type": "submit", "pipeline": ["invert"], "images": images, **extra}
    sock.send_multipart([json.dumps(header).encode()])
    assert sock.poll(20000)
    first = json.loads(sock.recv_multipart()[0])
    messages: list[dict] = []
    while first["type"] == "accepted" and (not messages or messages[-1]["type"] != "done"):
        assert sock.poll(30000), "no reply"
        head, *_ = sock.recv_multipart()
        decode_reply(head)
        messages.append(json.loads(head))
    return first, messages


def _desc(source: shm.Segment, result: shm.Segment, **change) -> dict:
    desc = {"name": "x", "size": source.array.nbytes, "encoding": "shm"}
    desc.update(shape=list(source.shape), dtype=str(source.dtype))
    desc.update(segment=source.ref(), result_segment=result.ref())
    return {**desc, **change}


@pytest.mark.timeout(120)
def test_forged_segments_fail_alone_and_the_server_goes_on(server):
    """Each forged image fails with shm_refused, naming the field and why; the good image
    of the same job comes back exact; malformed descriptors are refused whole."""
    image = random_image(np.random.default_rng(5), 40, 30)
    good = (shm.Segment.holding(image), shm.Segment(image.shape, image.dtype))
    victim = shm.Segment.holding(image)  # another client's segment: its nonce is secret
    small = shm.Segment((40, 29, 3), np.uint8)
    reader, writer = os.pipe()
    pipe_ref = {"pid": os.getpid(), "fd": reader, "nonce": "ab" * 16}
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.address)
    try:
        forged = [
            _desc(*good),
            _desc(*good, segment={**victim.ref(), "nonce": "00" * 16}),
            _desc(*good, result_segment=small.ref()),
            _desc(*good, segment=pipe_ref),
            _desc(*good, segment={**good[0].ref(), "pid": 2**22}),
        ]
        first, messages = _submit(sock, forged)
        assert first["type"] == "accepted", first
        errors = {m["index"]: m for m in messages if m["type"] == "image_error"}
        assert set(errors) == {1, 2, 3, 4} and {m["code"] for m in errors.values()} == {
            "shm_refused"
        }
        assert "images[1].segment" in errors[1]["message"] and GENERIC in errors[1]["message"]
        assert "images[2].result_segment" in errors[2]["message"]
        assert "bytes" in errors[2]["message"]  # the client's own segment: it may know why
        assert errors[3]["message"] == errors[4]["message"].replace("[4]", "[3]")  # all alike
        assert GENERIC in errors[4]["message"]
        np.testing.assert_array_equal(good[1].array, 255 - image)
        for bad, why in [
            ({"segment": None}, "needs segment and result_segment"),
            ({"encoding": "raw"}, "segments are for shm images only"),
            ({"segment": {**good[0].ref(), "nonce": "ab"}}, "nonce"),
        ]:
            first, _ = _submit(sock, [_desc(*good, **bad)])
            assert first["type"] == "error" and why in first["message"], first
        first, _ = _submit(sock, [_desc(*good)], result="png")
        assert first["type"] == "error" and "raw results" in first["message"]
    finally:
        sock.close()
        os.close(reader), os.close(writer)
    with Client(server.address, timeout=30) as client:  # still serving
        assert client.submit([image], ["invert"]).result(timeout=60).ok


@pytest.mark.timeout(120)
def test_map_and_the_async_client_use_shared_memory_too(server):
    import asyncio

    from mpi_imgproc.aio import AsyncClient

    rng = np.random.default_rng(11)
    images = [random_image(rng, 400 + 7 * i, 361, 3 + i % 2) for i in range(7)]
    pipeline = Pipeline.parse(["sharpen", "crop:x=1,y=2"])
    with Client(server.address, timeout=30) as client:
        items = list(client.map(images, pipeline, window=2, chunk=3, timeout=60))
    assert sorted(item.index for item in items) == list(range(7))
    assert {item.event.header["encoding"] for item in items} == {"shm"}
    for item in items:
        assert item.ok, item.error
        np.testing.assert_array_equal(item.image(), pipeline.apply(images[item.index]))

    async def main():
        async with AsyncClient(server.address) as client:
            job = await client.submit(images[:2], pipeline)
            encodings = [e.header["encoding"] async for e in job.events(60) if e.type == "result"]
            return encodings, await job.result(timeout=60)

    encodings, outcome = asyncio.run(main())
    assert encodings == ["shm", "shm"] and outcome.ok
    for image, got in zip(images, outcome.images):
        np.testing.assert_array_equal(got, pipeline.apply(image))


def _segments_held_by_the_server() -> dict[int, list[str]]:
    """Segments (memfds) that the server's processes (rank 0 and the workers) hold open."""
    held: dict[int, list[str]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if b"mpi_imgproc.server" not in fh.read() or int(pid) == os.getpid():
                    continue
            links = [os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        held[int(pid)] = [link for link in links if link.startswith("/memfd:mpi_imgproc")]
    return {pid: links for pid, links in held.items() if links}


@pytest.mark.timeout(120)
def test_no_server_process_keeps_a_segment_once_its_images_end(server):
    """Done, failed (a task error) and cancelled images: rank 0 and every worker let go of
    the client's segments, so its memory is not pinned."""
    import time

    image = random_image(np.random.default_rng(9), 900, 700)
    with Client(server.address, timeout=30) as client:
        assert client.submit([image] * 2, ["gaussian_blur:ksize=5"]).result(timeout=60).ok
        for _ in range(3):
            job = client.submit([image] * 4, ["bilateral:d=9", "sharpen"])
            next(e for e in job.events(timeout=60) if e.type in ("progress", "result"))
            job.cancel()
        deep = random_image(np.random.default_rng(9), 900, 700, 3, np.uint16)
        failed = client.submit([deep], ["median_blur:ksize=7"]).result(timeout=60)  # in tasks
        assert failed.errors[0][0] == "unsupported_image"
        deadline = time.monotonic() + 20
        while _segments_held_by_the_server() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _segments_held_by_the_server() == {}


@pytest.mark.timeout(120)
def test_gray_arrays_with_a_channel_axis_keep_their_shape_and_the_probe_tells(server):
    image = random_image(np.random.default_rng(4), 83, 71, 1)[..., None]  # (h, w, 1)
    pipeline = Pipeline.parse(["sharpen", "crop:x=3,y=4"])
    outcomes = []
    for shared in (True, False):
        with Client(server.address, timeout=30, shared_memory=shared) as client:
            outcomes.append(client.submit([image], pipeline).result(timeout=60))
    assert outcomes[0].images[0].shape == outcomes[1].images[0].shape
    np.testing.assert_array_equal(outcomes[0].images[0], outcomes[1].images[0])
    with Client(server.address, timeout=30) as client:
        probe = shm.Segment.holding(np.zeros((1, 1), np.uint8))
        assert client.info(probe=probe.ref())["shm_probe"] is True
        assert client.info(probe={**probe.ref(), "nonce": "00" * 16})["shm_probe"] is False
        assert "shm_probe" not in client.info()


@pytest.mark.timeout(120)
def test_results_left_in_a_gone_clients_segments_reach_the_process_that_attaches(server):
    """The job ends while its submitter is gone: its results wait in the outbox, naming the
    submitter's segments; a new client attaching gets them as raw frames, exact."""
    import time

    image = random_image(np.random.default_rng(12), 600, 600)
    pipeline = Pipeline.parse(["bilateral:d=15"])  # about 0.15 s an image: it ends after close
    first = Client(server.address, timeout=30)
    job = first.submit([image] * 3, pipeline)
    ticket = (job.id, job.token)
    first.close(linger=0)
    with Client(server.address, timeout=30) as second:
        deadline = time.monotonic() + 30
        while second.status(*ticket)["state"] != "done" and time.monotonic() < deadline:
            time.sleep(0.1)
        attached = second.attach(*ticket)
        events = list(attached.events(timeout=60))
        outcome = attached.result(timeout=60)
    assert {e.header["encoding"] for e in events if e.type == "result"} == {"raw"}
    assert outcome.ok and len(outcome.images) == 3
    for got in outcome.images:
        np.testing.assert_array_equal(got, pipeline.apply(image))

"""The model server over real sockets on 127.0.0.1: round trips against the engine, load, bad
input, queue behaviour (deadline, queue full, latest-only, same-frame batching) and a fuzz."""

from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from typing import Any

import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lisa_agent import AsyncLisaClient, LisaClient
from lisa_agent.benchmarks.server import EchoBackend, synthetic_frame
from lisa_agent.errors import (
    Code,
    DeadlineExceededError,
    InvalidArgumentError,
    InvalidImageError,
    InvalidQueryError,
    LisaError,
    ServerBusyError,
    SupersededError,
)
from lisa_agent.geometry import Intrinsics, mask_target
from lisa_agent.result import SegmentationResult
from lisa_agent.serving.codecs import decode_image, encode_image
from lisa_agent.serving.framing import ERROR_CODES, PROTOCOL_VERSION, Limits, build_header
from lisa_agent.serving.security import create_keypair
from lisa_agent.serving.server import LisaServer

ANY_PORT = "tcp://127.0.0.1:*"


# ------------------------------------------------------------------------------------- helpers


class RawPeer:
    """A DEALER socket speaking the protocol by hand (for malformed messages)."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.connect(endpoint)

    def send(self, frames: list[bytes], delimiter: bool = True) -> None:
        self.sock.send_multipart(([b""] if delimiter else []) + frames)

    def recv(self, timeout: float = 10.0) -> tuple[dict[str, Any], list[bytes]]:
        assert self.sock.poll(timeout * 1000), "no reply from the server"
        frames = self.sock.recv_multipart()
        if frames[0] == b"":
            frames = frames[1:]
        return json.loads(frames[0]), frames

    def ask(self, frames: list[bytes], delimiter: bool = True) -> dict[str, Any]:
        self.send(frames, delimiter)
        return self.recv()[0]

    def close(self) -> None:
        self.sock.close(0)


def segment_msg(rid: str, image: np.ndarray, query: str = "the cup", **fields: Any) -> list[bytes]:
    spec, data = encode_image(image)
    return [build_header(rid, "segment", query=query, image=spec, **fields), data]


def wait_until(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.005)


def same_result(remote: SegmentationResult, local: SegmentationResult) -> None:
    assert remote.text == local.text
    assert remote.image_size == local.image_size
    assert remote.masks.shape == local.masks.shape
    np.testing.assert_array_equal(remote.masks, local.masks)
    for r, loc in zip(remote.instances, local.instances, strict=True):
        assert r.bbox == loc.bbox and r.area == loc.area
        assert r.score == pytest.approx(loc.score, abs=1e-4)


@pytest.fixture(scope="module")
def engine(tiny_segmenter):
    return tiny_segmenter


@pytest.fixture(scope="module")
def engine_server(engine):
    with LisaServer(engine, ANY_PORT, max_queue=32) as server:
        yield server


@pytest.fixture(scope="module")
def echo_server():
    with LisaServer(EchoBackend(), ANY_PORT, max_queue=8, limits=Limits(max_side=1024, max_frame_bytes=1 << 20)) as s:
        yield s


# ------------------------------------------------------------------------- round trips (real engine)


@pytest.mark.parametrize("encoding", ["raw", "jpeg", "png"])
def test_round_trip_equals_in_process_engine(engine, engine_server, encoding):
    image = synthetic_frame(96, 128, seed=3)
    with LisaClient(engine_server.endpoint, timeout=30, retries=0) as client:
        remote = client.segment(image, "the round red object", encoding=encoding, frame_id=f"rt-{encoding}")
    spec, data = encode_image(image, encoding)
    local = engine.segment(decode_image(spec, data), "the round red object")  # what the server saw
    assert len(local) >= 1  # the tiny model always emits one [SEG] in fast mode
    same_result(remote, local)
    assert remote.frame_id == f"rt-{encoding}" and remote.mode == "fast"
    assert {"server_queue", "server_decode", "client_roundtrip"} <= set(remote.timings_ms)


def test_async_client_round_trip_equals_in_process_engine(engine, engine_server):
    image = synthetic_frame(96, 128, seed=7)

    async def ask() -> list[SegmentationResult]:
        async with AsyncLisaClient(engine_server.endpoint, timeout=30, retries=0) as client:
            info = await client.info()
            assert info["protocol_version"] == PROTOCOL_VERSION
            return [await client.segment(image, q, frame_id="async") for q in ("the cup", "the knife")]

    remote = asyncio.run(asyncio.wait_for(ask(), 60))
    for result, query in zip(remote, ("the cup", "the knife"), strict=True):
        assert isinstance(result, SegmentationResult)
        same_result(result, engine.segment(image, query))


def test_chat_mode_logits_and_depth_round_trip(engine, engine_server):
    image = synthetic_frame(96, 128, seed=4)
    depth = np.full((96, 128), 800, np.uint16)
    depth[40:70, 50:100] = 650
    intr = [100.0, 100.0, 64.0, 48.0]
    with LisaClient(engine_server.endpoint, timeout=30, retries=0) as client:
        chat = client.segment(image, "what is there?", mode="chat", max_new_tokens=6)
        fast = client.segment(image, "the cup", return_logits=True, depth=depth, intrinsics=intr)
    same_result(chat, engine.segment(image, "what is there?", mode="chat", max_new_tokens=6))
    local = engine.segment(image, "the cup", return_logits=True)
    same_result(fast, local)
    np.testing.assert_allclose(fast.logits, local.logits, rtol=1e-5, atol=1e-5)
    assert fast.targets is not None and len(fast.targets) == len(fast)
    target = mask_target(depth.astype(np.float32) / 1000, fast.masks[0], Intrinsics(*intr))
    assert fast.targets[0].depth_m == pytest.approx(target.depth_m, abs=1e-4)
    assert fast.targets[0].point == pytest.approx(target.point, abs=1e-3)
    # the JSON form carries the target next to each mask; without depth there is none
    assert fast.to_dict()["masks"][0]["target"]["depth_m"] == pytest.approx(target.depth_m, abs=1e-4)
    assert chat.targets is None and all(m["target"] is None for m in chat.to_dict()["masks"])


def test_queued_queries_on_one_frame_run_as_one_batch_with_the_same_answers(engine):
    gate = threading.Event()
    calls: list[int] = []

    class Gated:  # the real engine behind a gate, recording batch sizes
        def info(self):
            return engine.info()

        def segment(self, image, query, **kw):
            gate.wait(30)
            calls.append(1)
            return engine.segment(image, query, **kw)

        def segment_batch(self, image, queries, **kw):
            calls.append(len(queries))
            return engine.segment_batch(image, queries, **kw)

    image = synthetic_frame(96, 128, seed=5)
    queries = ["the cup", "something to cut with", "the red ball"]
    with LisaServer(Gated(), ANY_PORT) as server:
        peer = RawPeer(server.endpoint)
        peer.send(segment_msg("first", synthetic_frame(96, 128, seed=6)))
        wait_until(lambda: server.health()["busy"])
        for k, q in enumerate(queries):
            peer.send(segment_msg(f"q{k}", image, q))
        wait_until(lambda: server.health()["queue_depth"] == 3)
        gate.set()
        replies = {}
        for _ in range(4):
            reply, _ = peer.recv(30)
            replies[reply["id"]] = reply
        peer.close()
    assert calls == [1, 3]  # the three queries on one frame: one segment_batch call
    for k, q in enumerate(queries):
        assert replies[f"q{k}"]["ok"]
        same_result(SegmentationResult.from_dict(replies[f"q{k}"]["result"]), engine.segment(image, q))


def test_load_8_clients_x_10_each_request_answered_once(engine_server):
    n_clients, n_requests, window = 8, 10, 4  # 8 x 4 in flight fits the queue of 32: nothing refused
    seen: dict[int, list[str]] = {k: [] for k in range(n_clients)}
    failures: list[BaseException] = []

    def run(k: int) -> None:
        frame = synthetic_frame(48, 64, seed=k)
        try:
            peer = RawPeer(engine_server.endpoint)
            sent = 0
            while len(seen[k]) < n_requests:
                while sent < n_requests and sent - len(seen[k]) < window:  # keep `window` requests in flight
                    peer.send(segment_msg(f"c{k}-{sent}", frame, f"object {sent % 3}", timeout_ms=120_000))
                    sent += 1
                reply, _ = peer.recv(120)
                assert reply["ok"], reply
                seen[k].append(reply["id"])
            assert not peer.sock.poll(200), "a request was answered twice"
            peer.close()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not failures, failures
    for k in range(n_clients):
        assert sorted(seen[k]) == sorted(f"c{k}-{i}" for i in range(n_requests))


def test_info_and_health(engine_server, engine):
    with LisaClient(engine_server.endpoint, timeout=10, retries=0) as client:
        info = client.info()
        health = client.health()
    assert info["protocol_version"] == PROTOCOL_VERSION
    assert {k: info[k] for k in ("model", "dtype", "device")} == {k: engine.info()[k] for k in ("model", "dtype",
                                                                                                 "device")}
    assert info["limits"]["max_side"] == Limits().max_side
    assert health["status"] == "ok" and health["max_queue"] == 32


def test_engine_errors_keep_their_type_through_the_wire(engine_server):
    with LisaClient(engine_server.endpoint, timeout=10, retries=0) as client:
        frame = synthetic_frame(48, 64)
        with pytest.raises(InvalidImageError, match=r"does not match.*\(server\)"):
            client.segment(frame, "x", depth=np.zeros((24, 32), np.uint16))  # depth not aligned
        with pytest.raises(InvalidArgumentError, match="forced answer"):  # raised by the engine itself
            client.segment(frame, "x", answer="   ")
        with pytest.raises(InvalidArgumentError, match="mode must be one of"):  # the client's own check, the same rule
            client.segment(frame, "x", mode="psychic")
        with pytest.raises(InvalidArgumentError, match=r"options.max_new_tokens .* on this server.*\(server\)"):
            client.segment(frame, "x", mode="chat", max_new_tokens=2000)  # the library allows it, the server not
        assert client.health()["status"] == "ok"


# ---------------------------------------------------------------------------------- bad input


BAD = {
    "truncated multipart": lambda img: segment_msg("t", img)[:1],
    "surplus frame": lambda img: segment_msg("t", img) + [b"x"],
    "non-JSON header": lambda img: [b"\x00not json", img.tobytes()],
    "header not an object": lambda img: [b"[1,2,3]"],
    "unknown version": lambda img: [json.dumps({"v": 7, "id": "t", "op": "health"}).encode()],
    "unknown op": lambda img: [build_header("t", "teleport")],
    "wrong shape": lambda img: [build_header("t", "segment", query="q",
                                             image={"format": "raw", "shape": [64, 48, 3], "dtype": "uint8"}),
                                img.tobytes()[:-3]],
    "wrong dtype": lambda img: [build_header("t", "segment", query="q",
                                             image={"format": "raw", "shape": [48, 64, 3], "dtype": "float32"}),
                                img.astype(np.float32).tobytes()],
    "undecodable JPEG": lambda img: [build_header("t", "segment", query="q", image={"format": "jpeg"}),
                                     encode_image(img, "jpeg")[1][:150]],
    "frame over the byte limit": lambda img: segment_msg("t", np.zeros((700, 600, 3), np.uint8)),
    "image side over the limit": lambda img: segment_msg("t", np.zeros((40, 1100, 3), np.uint8)),
    "empty query": lambda img: segment_msg("t", img, query="   "),
    "bad option": lambda img: segment_msg("t", img, options={"mode": "fast", "max_new_tokens": -1}),
}
EXPECTED = {
    "truncated multipart": Code.BAD_REQUEST, "surplus frame": Code.BAD_REQUEST,
    "non-JSON header": Code.BAD_REQUEST, "header not an object": Code.BAD_REQUEST,
    "unknown version": Code.UNSUPPORTED_VERSION, "unknown op": Code.UNKNOWN_OP,
    "wrong shape": Code.INVALID_IMAGE, "wrong dtype": Code.INVALID_IMAGE, "undecodable JPEG": Code.INVALID_IMAGE,
    "frame over the byte limit": Code.TOO_LARGE, "image side over the limit": Code.TOO_LARGE,
    "empty query": Code.INVALID_QUERY, "bad option": Code.INVALID_ARGUMENT,
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gets_a_typed_error_and_the_server_keeps_serving(echo_server, case):
    img = synthetic_frame(48, 64)
    peer = RawPeer(echo_server.endpoint)
    reply = peer.ask(BAD[case](img))
    peer.close()
    assert reply["ok"] is False
    assert reply["error"]["code"] == EXPECTED[case]
    assert len(reply["error"]["message"]) > 10
    if case not in ("non-JSON header", "header not an object"):
        assert reply["id"] == "t"
    with LisaClient(echo_server.endpoint, timeout=10, retries=0) as client:
        assert client.health()["status"] == "ok"
        assert client.segment(img, "the cup").text == "Sure, [SEG]."


def test_message_without_delimiter_and_empty_message_are_answered(echo_server):
    peer = RawPeer(echo_server.endpoint)
    reply = peer.ask([build_header("nd", "health")], delimiter=False)
    assert reply["ok"] and reply["id"] == "nd"
    reply = peer.ask([])  # just the delimiter: no header at all
    assert reply["ok"] is False and reply["error"]["code"] == Code.BAD_REQUEST
    peer.close()


def test_backend_crash_becomes_internal_error_and_serving_goes_on():
    class Flaky(EchoBackend):
        def segment(self, image, query, **kw):
            if query == "boom":
                raise RuntimeError("CUDA exploded")
            if query == "typed":
                raise InvalidQueryError("the engine refused it")
            return super().segment(image, query, **kw)

    with LisaServer(Flaky(), ANY_PORT) as server, LisaClient(server.endpoint, timeout=10, retries=0) as client:
        img = synthetic_frame(48, 64)
        with pytest.raises(LisaError) as info:
            client.segment(img, "boom")
        assert info.value.code == Code.INTERNAL and "CUDA exploded" in str(info.value)
        with pytest.raises(InvalidQueryError, match="refused"):
            client.segment(img, "typed")
        assert client.segment(img, "fine").text == "Sure, [SEG]."
        assert server.health()["replies"][Code.INTERNAL] == 1


json_leaf = st.none() | st.booleans() | st.integers(-5, 5000) | st.text(max_size=8)
fuzz_headers = st.one_of(
    st.binary(max_size=80),
    st.fixed_dictionaries({}, optional={
        "v": st.sampled_from([2, 1, "2"]), "id": st.one_of(st.text(max_size=6), st.integers(), st.none()),
        "op": st.sampled_from(["segment", "info", "health", "x"]), "query": json_leaf,
        "image": st.one_of(json_leaf, st.fixed_dictionaries({
            "format": st.sampled_from(["raw", "jpeg", "png", "tiff"]),
            "shape": st.lists(st.integers(-1, 70), max_size=4), "dtype": st.sampled_from(["uint8", "int8"])})),
        "options": st.one_of(json_leaf, st.dictionaries(st.sampled_from(
            ["mode", "max_new_tokens", "frame_id", "latest_only", "answer", "zzz"]), json_leaf, max_size=3)),
        "timeout_ms": json_leaf, "depth": json_leaf,
    }).map(lambda d: json.dumps(d).encode()),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(header=fuzz_headers, frames=st.lists(st.binary(max_size=300), max_size=3), delimiter=st.booleans())
def test_fuzz_every_message_gets_ok_or_a_typed_error(echo_server, header, frames, delimiter):
    peer = RawPeer(echo_server.endpoint)
    try:
        peer.send([header, *frames], delimiter)
        reply, _ = peer.recv(10)
        assert isinstance(reply["ok"], bool)
        if not reply["ok"]:
            assert reply["error"]["code"] in ERROR_CODES, reply
        reply = peer.ask([build_header("alive", "health")])
        assert reply["ok"] and reply["id"] == "alive"
    finally:
        peer.close()


# ------------------------------------------------------------------- deadline, queue full, latest only


@pytest.fixture
def gated():
    gate = threading.Event()
    backend = EchoBackend(gate=gate)
    with LisaServer(backend, ANY_PORT, max_queue=2) as server:
        peer = RawPeer(server.endpoint)
        yield server, backend, gate, peer
        gate.set()
        peer.close()


def open_gate_when(gate: threading.Event, predicate) -> threading.Thread:
    """Open ``gate`` (release the worker) once ``predicate()`` holds, from a helper thread."""

    def run() -> None:
        wait_until(predicate, 30)
        gate.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def hold_worker(server, peer) -> None:
    peer.send(segment_msg("hold", synthetic_frame(48, 64, seed=9), options={"stream": "other"}))
    wait_until(lambda: server.health()["busy"])


def test_request_past_its_deadline_is_answered_not_run(gated):
    server, backend, gate, peer = gated
    hold_worker(server, peer)
    peer.send(segment_msg("late", synthetic_frame(48, 64), "expired query", timeout_ms=20))
    peer.send(segment_msg("patient", synthetic_frame(48, 64), "patient query", timeout_ms=60_000))
    wait_until(lambda: server.health()["queue_depth"] == 2)
    time.sleep(0.1)  # "late" expires while the worker is held
    gate.set()
    replies = {r["id"]: r for r in (peer.recv()[0] for _ in range(3))}
    assert replies["late"]["error"]["code"] == Code.DEADLINE_EXCEEDED
    assert replies["hold"]["ok"] and replies["patient"]["ok"]
    assert "expired query" not in [q for q, _ in backend.calls]


def test_full_queue_answers_queue_full_at_once(gated):
    server, backend, gate, peer = gated
    hold_worker(server, peer)
    for rid in ("a", "b"):
        peer.send(segment_msg(rid, synthetic_frame(48, 64)))
    wait_until(lambda: server.health()["queue_depth"] == 2)
    peer.send(segment_msg("c", synthetic_frame(48, 64)))
    reply, _ = peer.recv()  # answered while the worker is still held
    assert reply["id"] == "c" and reply["error"]["code"] == Code.QUEUE_FULL
    gate.set()
    assert sorted(peer.recv()[0]["id"] for _ in range(3)) == ["a", "b", "hold"]


def test_latest_only_supersedes_older_queued_frames_of_the_same_stream(gated):
    server, backend, gate, peer = gated
    hold_worker(server, peer)
    opts = {"latest_only": True, "stream": "cam0"}
    peer.send(segment_msg("f1", synthetic_frame(48, 64, seed=1), options=dict(opts, frame_id=1)))
    wait_until(lambda: server.health()["queue_depth"] == 1)
    peer.send(segment_msg("f2", synthetic_frame(48, 64, seed=2), options=dict(opts, frame_id=2)))
    reply, _ = peer.recv()
    assert reply["id"] == "f1" and reply["error"]["code"] == Code.SUPERSEDED
    gate.set()
    assert sorted(r["id"] for r in (peer.recv()[0] for _ in range(2))) == ["f2", "hold"]
    assert len(backend.calls) == 2 and backend.calls[1][1] == "2"  # f1 never ran


def test_client_raises_typed_queue_errors(gated):
    server, backend, gate, peer = gated
    hold_worker(server, peer)
    with LisaClient(server.endpoint, timeout=5, retries=0) as client:
        seen_queued: list[float] = []

        def expired() -> bool:  # "late" has sat in the queue for 0.1 s, twice its deadline
            if not seen_queued and server.health()["queue_depth"] == 1:
                seen_queued.append(time.monotonic())
            return bool(seen_queued) and time.monotonic() - seen_queued[0] > 0.1

        open_gate_when(gate, expired)
        with pytest.raises(DeadlineExceededError):
            client.segment(synthetic_frame(48, 64), "late", deadline_s=0.05)
        gate.clear()
        hold_worker(server, peer)
        holders = [RawPeer(server.endpoint) for _ in range(2)]
        for k, h in enumerate(holders):
            h.send(segment_msg(f"fill{k}", synthetic_frame(48, 64)))
        wait_until(lambda: server.health()["queue_depth"] == 2)
        with pytest.raises(ServerBusyError):
            client.segment(synthetic_frame(48, 64), "one too many")
        gate.set()
        for h in holders:
            assert h.recv()[0]["ok"]
            h.close()


def test_stopping_answers_queued_requests_and_finishes_the_running_one(gated):
    server, backend, gate, peer = gated
    hold_worker(server, peer)
    for rid in ("a", "b"):
        peer.send(segment_msg(rid, synthetic_frame(48, 64)))
    wait_until(lambda: server.health()["queue_depth"] == 2)
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    first = {r["id"]: r for r in (peer.recv()[0] for _ in range(2))}  # while the model is still busy
    assert {k: v["error"]["code"] for k, v in first.items()} == {"a": Code.SHUTTING_DOWN, "b": Code.SHUTTING_DOWN}
    gate.set()
    last, _ = peer.recv()
    assert last["id"] == "hold" and last["ok"]
    stopper.join(10)
    assert not stopper.is_alive()


def test_client_raises_superseded_when_its_stream_moves_on(tmp_path):
    """Two sockets of one caller (one CurveZMQ key: the key is who calls) and one camera stream: the newer
    frame supersedes the older one still queued."""
    server_public, server_secret = create_keypair(tmp_path / "server", "server")
    client_public, client_secret = create_keypair(tmp_path / "clients", "robot")
    allow = tmp_path / "allow"
    allow.mkdir()
    shutil.copy(client_public, allow / "robot.key")
    keys = {"curve_server_key": server_public, "curve_client_keys": client_secret}
    gate = threading.Event()
    with LisaServer(EchoBackend(gate=gate), ANY_PORT, max_queue=2, curve_secret=server_secret,
                    curve_allow=allow) as server:
        holder = LisaClient(server.endpoint, timeout=10, retries=0, **keys)
        hold = threading.Thread(target=holder.segment, args=(synthetic_frame(48, 64, seed=9), "hold"))
        hold.start()
        wait_until(lambda: server.health()["busy"])
        first = LisaClient(server.endpoint, timeout=10, retries=0, **keys)
        second = LisaClient(server.endpoint, timeout=10, retries=0, **keys)
        second.stream = first.stream  # two sockets, one camera stream
        outcome: list[BaseException] = []

        def old_frame() -> None:
            try:
                first.segment(synthetic_frame(48, 64, seed=1), "cup", frame_id=1, latest_only=True)
            except BaseException as exc:  # noqa: BLE001
                outcome.append(exc)

        t = threading.Thread(target=old_frame)
        t.start()
        wait_until(lambda: server.health()["queue_depth"] == 1)
        open_gate_when(gate, lambda: server.health()["replies"].get(Code.SUPERSEDED) == 1)
        result = second.segment(synthetic_frame(48, 64, seed=2), "cup", frame_id=2, latest_only=True)
        t.join(10)
        hold.join(10)
        for client in (first, second, holder):
            client.close()
    assert result.frame_id == "2"
    assert len(outcome) == 1 and isinstance(outcome[0], SupersededError) and outcome[0].code == Code.SUPERSEDED


def test_default_bind_is_loopback_and_non_loopback_needs_curve():
    assert LisaServer.__init__.__defaults__[0] == "tcp://127.0.0.1:5557"
    with pytest.raises(InvalidArgumentError, match="refusing to bind"):
        LisaServer(EchoBackend(), "tcp://0.0.0.0:5557")


def test_serve_command_refuses_non_loopback_bind_before_loading(capsys):
    from lisa_agent.cli import main

    assert main(["serve", "--model", "does-not-exist", "--bind", "tcp://0.0.0.0:5557"]) == 1
    err = capsys.readouterr().err
    assert "refusing to bind tcp://0.0.0.0:5557 without CurveZMQ" in err and "--insecure" in err


@st.composite
def near_valid_segment(draw):
    """A correct segment request with one or two things broken (or none)."""
    h, w = draw(st.integers(8, 40)), draw(st.integers(8, 40))
    image = np.full((h, w, 3), draw(st.integers(0, 255)), np.uint8)
    spec, data = encode_image(image, draw(st.sampled_from(["raw", "jpeg", "png"])))
    header: dict[str, Any] = {"v": 2, "id": "n", "op": "segment", "query": draw(st.sampled_from(["cup", "", " "])),
                              "image": spec, "options": {"mode": draw(st.sampled_from(["fast", "chat", "x"]))}}
    if draw(st.booleans()):
        header["image"] = dict(spec, shape=draw(st.lists(st.integers(0, 50), min_size=2, max_size=4)))
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(data)))
        data = data[:cut]
    frames = [json.dumps(header).encode(), data]
    if draw(st.booleans()):
        frames = frames[: draw(st.integers(1, 2))] + draw(st.lists(st.binary(max_size=20), max_size=2))
    return frames


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(frames=near_valid_segment())
def test_fuzz_near_valid_segment_requests(echo_server, frames):
    peer = RawPeer(echo_server.endpoint)
    try:
        reply = peer.ask(frames)
        assert reply["id"] == "n"
        if reply["ok"]:
            assert reply["result"]["text"] == "Sure, [SEG]."
        else:
            assert reply["error"]["code"] in ERROR_CODES, reply
        assert peer.ask([build_header("alive", "health")])["ok"]
    finally:
        peer.close()

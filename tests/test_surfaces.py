"""Hardening the new surfaces (issue 23): a caller's mistake never counts as a model fault, no web page drives
the robot's camera through any door, tracking sessions belong to their caller, every door bounds what a
client can make it hold. One test (or more) per row of the issue's table (``test_<row>_...``), then the
hypothesis fuzzers of the console API and the Ray Serve ingress (nested JSON, unicode, sizes).

Everything is real and on 127.0.0.1: the engine (the tiny random-weight checkpoint) or the model-free
``EchoBackend``, the ZeroMQ server over sockets, the console's aiohttp server over HTTP and WebSocket, the
Foxglove live view over WebSocket. The Ray Serve replica runs in this process (``LisaDeployment``'s class
driven with starlette requests, as Serve's proxy drives it); the only thing patched is a Ray warning that
needs a replica context (``_BatchQueue._warn_if_max_batch_size_exceeds_max_ongoing_requests``).
tests/test_ray.py checks the same rules through a real cluster's HTTP proxy.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import websockets
from helpers import http_call, random_frame, ws_handshake
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server import RawPeer, segment_msg

from lisa_agent.benchmarks.server import EchoBackend, synthetic_frame
from lisa_agent.cli import main
from lisa_agent.console.core import ConsoleCore
from lisa_agent.console.sources import SyntheticSource
from lisa_agent.console.web import ConsoleServer
from lisa_agent.errors import Code, ImageTooLargeError, InvalidArgumentError, InvalidQueryError
from lisa_agent.images import decode_image_bytes
from lisa_agent.integrations.foxglove import FoxglovePublisher
from lisa_agent.options import QueryOptions, TrackOptions
from lisa_agent.result import SegmentationResult
from lisa_agent.serving.execution import TrackSessions
from lisa_agent.serving.framing import ERROR_CODES, Limits, build_header
from lisa_agent.serving.http_transport import encode_http_request, max_body_bytes
from lisa_agent.serving.server import LisaServer

ANY_PORT = "tcp://127.0.0.1:*"
TRACK = {"tracker": "flow", "reason_every": 10, "reason_period_s": None, "min_confidence": 0.0}  # the schedule decides
DEEP = 30_000  # levels of nesting: far beyond what json.loads survives (~1000)


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "the condition") -> None:
    """Wait for an event (``predicate()`` true); ``timeout`` only bounds a test that would otherwise hang."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"{what} did not happen within {timeout:g} s"
        time.sleep(0.01)


def png_claiming(width: int, height: int, pixels: bool = True) -> bytes:
    """A PNG whose IHDR says ``width`` x ``height`` (with a tiny IDAT, or the header alone)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    if pixels:
        out += chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    return out


# ----------------------------------------------------------------------------------------- the doors
@pytest.fixture(scope="module")
def zmq_engine(tiny_segmenter) -> Iterator[LisaServer]:
    with LisaServer(tiny_segmenter, ANY_PORT, max_queue=16) as server:
        yield server


def ask(endpoint: str, frames: list[bytes]) -> dict[str, Any]:
    peer = RawPeer(endpoint)
    try:
        return peer.ask(frames)
    finally:
        peer.close()


def console_call(port: int, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """(status, the reply's JSON, or its bytes when it is not JSON)."""
    status, _, payload = http_call(port, method, path, body, raw=raw, headers=headers, timeout=120)
    if isinstance(payload, bytes):
        with contextlib.suppress(ValueError):
            return status, json.loads(payload)
    return status, payload


@pytest.fixture(scope="module")
def console(tiny_segmenter) -> Iterator[SimpleNamespace]:
    """The console over the tiny engine on loopback (the door of the issue's reproductions)."""
    core = ConsoleCore(tiny_segmenter, SyntheticSource(size=(96, 128), fps=20.0), query=QueryOptions(mode="fast"), model_name="tiny")
    server = ConsoleServer(core, port=0).start_in_thread()
    core.wait_for_frame(30.0)
    try:
        yield SimpleNamespace(core=core, server=server, port=server.port)
    finally:
        server.stop_thread()
        core.close()


_REPLICA_LOOP: list[asyncio.AbstractEventLoop] = []


class Replica:
    """A Ray Serve replica of :class:`~lisa_agent.serving.ray_replica.LisaDeployment` in this process, driven by
    starlette requests (as Serve's proxy drives a replica) on one event loop kept for the whole session:
    ``serve.batch`` keeps one batch queue per decorated method, bound to the loop that first used it."""

    def __init__(self, backend_factory: Callable[[], Any], **settings: Any) -> None:
        from lisa_agent.serving import ray_replica

        self.deployment = ray_replica.LisaDeployment.func_or_class(settings=settings, backend_factory=backend_factory)
        if not _REPLICA_LOOP:
            _REPLICA_LOOP.append(asyncio.new_event_loop())
        self.loop = _REPLICA_LOOP[0]
        self.reads = 0  # body chunks the replica took from the connection

    def post(self, body: bytes | list[bytes], headers: dict[str, str] | None = None, *, method: str = "POST",
             client: tuple[str, int] = ("127.0.0.1", 40000)) -> tuple[int, dict[str, Any]]:
        from starlette.requests import Request

        chunks = [body] if isinstance(body, bytes) else list(body)
        sent = {"host": "127.0.0.1:8000", "content-type": "application/json"}
        if isinstance(body, bytes):
            sent["content-length"] = str(len(body))
        sent.update({k.lower(): v for k, v in (headers or {}).items()})
        sent = {k: v for k, v in sent.items() if v is not None}

        async def receive() -> dict[str, Any]:
            if not chunks:
                await asyncio.sleep(3600)  # a client that sends nothing more
            self.reads += 1
            return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

        scope = {"type": "http", "method": method, "path": "/lisa", "raw_path": b"/lisa", "query_string": b"",
                 "root_path": "", "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in sent.items()],
                 "client": client, "server": ("127.0.0.1", 8000), "scheme": "http", "http_version": "1.1"}
        response = self.loop.run_until_complete(
            asyncio.wait_for(self.deployment(Request(scope, receive)), 120))
        return response.status_code, json.loads(response.body)

    def health(self) -> dict[str, Any]:
        return self.deployment.health()

    def close(self) -> None:
        self.deployment.worker.close()


@pytest.fixture
def replica(monkeypatch) -> Iterator[Callable[..., Replica]]:
    from ray.serve import batching

    # serve.batch asks for the replica's context only to warn about its settings
    monkeypatch.setattr(batching._BatchQueue, "_warn_if_max_batch_size_exceeds_max_ongoing_requests",
                        lambda self: None)
    made: list[Replica] = []

    def make(backend_factory: Callable[[], Any] = EchoBackend, **settings: Any) -> Replica:
        made.append(Replica(backend_factory, **settings))
        return made[-1]

    yield make
    for r in made:
        r.close()


def http_segment(rid: str, image: np.ndarray, query: str = "the cup", **fields: Any) -> bytes:
    return encode_http_request(segment_msg(rid, image, query, **fields))


# ------------------------------------------------------------------ 1. "<image>" in a query: the caller's mistake
QUERY_WITH_PLACEHOLDER = "the <image> on the left"


def test_1_an_image_placeholder_in_the_query_is_invalid_query_for_the_engine_and_zeromq(tiny_segmenter, zmq_engine):
    frame = random_frame(64, 80, seed=1)
    with pytest.raises(InvalidQueryError, match="must not contain '<image>'"):
        tiny_segmenter.segment(frame, QUERY_WITH_PLACEHOLDER)
    reply = ask(zmq_engine.endpoint, segment_msg("img", frame, QUERY_WITH_PLACEHOLDER))
    assert reply["id"] == "img" and reply["error"]["code"] == Code.INVALID_QUERY, reply
    assert "<image>" in reply["error"]["message"] and zmq_engine.health()["replies"].get(Code.INTERNAL, 0) == 0
    answer = ask(zmq_engine.endpoint, segment_msg("ans", frame, "the cup", options={"answer": "Sure <image> [SEG]."}))
    assert answer["error"]["code"] == Code.INVALID_ARGUMENT and "<image>" in answer["error"]["message"]


def test_1_an_image_placeholder_in_the_instruction_is_a_400_on_the_console(console):
    status, error = console_call(console.port, "POST", "/api/instruction", {"text": QUERY_WITH_PLACEHOLDER})
    assert (status, error["error"]["code"]) == (400, "invalid_query"), error
    assert console.core.state()["error"] is None  # nothing failed: the caller was told what to fix


def test_1_an_image_placeholder_never_counts_toward_a_ray_replicas_health(tiny_segmenter, replica):
    ray = replica(lambda: tiny_segmenter)
    frame = random_frame(64, 80, seed=1)
    for k in range(5):  # more than max_consecutive_failures (3)
        status, reply = ray.post(http_segment(f"r{k}", frame, QUERY_WITH_PLACEHOLDER))
        assert (status, reply["error"]["code"]) == (400, Code.INVALID_QUERY), reply
    ray.deployment.check_health()  # healthy: nothing the caller sent is a model fault
    assert ray.post(http_segment("fine", frame, "the cup"))[0] == 200


class FailsOnBoom(EchoBackend):
    """A model whose device fails on "boom" and that refuses "typo" as the engine refuses a bad query."""

    def segment(self, image: Any, query: str, **kw: Any) -> SegmentationResult:
        if query == "boom":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if query == "typo":
            raise InvalidQueryError("the query does not fit the prompt")
        return super().segment(image, query, **kw)


def test_1_caller_mistakes_between_model_faults_neither_count_nor_clear_the_count(replica):
    ray = replica(FailsOnBoom, max_consecutive_failures=3)
    frame = synthetic_frame(48, 64)
    codes = [ray.post(http_segment(f"q{k}", frame, q))[1]["error"]["code"]
             for k, q in enumerate(["boom", "boom", "typo", "typo", "boom"])]
    assert codes == [Code.INTERNAL, Code.INTERNAL, Code.INVALID_QUERY, Code.INVALID_QUERY, Code.INTERNAL]
    with pytest.raises(RuntimeError, match="the last 3 model calls failed"):
        ray.deployment.check_health()  # three device faults in a row: the typos in between change nothing
    assert ray.post(http_segment("ok", frame, "the cup"))[0] == 200
    ray.deployment.check_health()  # a model call that worked clears the count


# ------------------------------------------------------------------ 2. the Foxglove live view
FOX = ["foxglove.sdk.v1", "foxglove.websocket.v1"]


async def _fox_open(url: str, headers: dict[str, str] | None = None) -> str:
    """The first control message's op, or the refusal's HTTP status as ``HTTP <status>``."""
    try:
        async with websockets.connect(url, subprotocols=FOX, additional_headers=headers) as ws:
            return str(json.loads(await asyncio.wait_for(ws.recv(), 30))["op"])
    except websockets.InvalidStatus as exc:
        return f"HTTP {exc.response.status_code}"


def _upgrade_status(port: int, host: str) -> int:
    """The status of a WebSocket upgrade request to 127.0.0.1:``port`` sent with ``Host: host``."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall((f"GET / HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                      "Sec-WebSocket-Protocol: foxglove.sdk.v1\r\n\r\n").encode())
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(1024)
            assert chunk, "the connection closed without an answer"
            head += chunk
    return int(head.split()[1])


def test_2_the_foxglove_live_view_refuses_other_sites_and_rebinding_and_serves_the_apps():
    fox = FoxglovePublisher(port=0, origins=["http://localhost:8080"])  # a self-hosted Lichtblick, say
    try:
        url = f"ws://127.0.0.1:{fox.port}"
        assert asyncio.run(_fox_open(url)) == "serverInfo"  # the desktop apps and scripts send no Origin
        assert asyncio.run(_fox_open(url, {"Origin": "https://app.foxglove.dev"})) == "serverInfo"
        assert asyncio.run(_fox_open(url, {"Origin": "http://localhost:8080"})) == "serverInfo"
        assert asyncio.run(_fox_open(url, {"Origin": "http://evil.example"})) == "HTTP 403"
        assert asyncio.run(_fox_open(url, {"Origin": "null"})) == "HTTP 403"
        assert _upgrade_status(fox.port, f"evil.example:{fox.port}") == 403  # DNS rebinding
        assert _upgrade_status(fox.port, f"localhost:{fox.port}") == 101
        # the SDK's own server behind the gate speaks TLS with a certificate no browser trusts
        inner = f"ws://127.0.0.1:{fox._server.port}"
        with pytest.raises((websockets.InvalidHandshake, OSError)):
            asyncio.run(_fox_open(inner, {"Origin": "http://evil.example"}))
    finally:
        fox.close()


def test_2_a_foxglove_bind_beyond_loopback_needs_insecure_and_the_command_says_so_before_loading(capsys):
    with pytest.raises(InvalidArgumentError, match="refusing to serve the Foxglove live view on 0.0.0.0"):
        FoxglovePublisher(port=0, host="0.0.0.0")
    fox = FoxglovePublisher(port=0, host="0.0.0.0", insecure=True)
    try:
        assert asyncio.run(_fox_open(f"ws://127.0.0.1:{fox.port}")) == "serverInfo"
    finally:
        fox.close()
    assert main(["console", "--model", "/nonexistent/model", "--foxglove-port", "0", "--foxglove-bind",
                 "0.0.0.0"]) == 1
    err = capsys.readouterr().err
    assert "refusing to serve the Foxglove live view on 0.0.0.0" in err and "--insecure" in err
    assert "/nonexistent/model" not in err  # refused before the model would load


# ------------------------------------------------------------------ 3. tracking sessions belong to their caller
def _track_msg(rid: str, image: np.ndarray, stream: str | None = "cam0", **options: Any) -> list[bytes]:
    opts = {"track": TRACK, **options}
    if stream is not None:
        opts["stream"] = stream
    return segment_msg(rid, image, "the knife", options=opts)


def test_3_another_connection_naming_the_same_stream_gets_its_own_session(tiny_segmenter, zmq_engine):
    knife, grey = random_frame(96, 128, seed=4), np.full((96, 128, 3), 128, np.uint8)
    a, b = RawPeer(zmq_engine.endpoint), RawPeer(zmq_engine.endpoint)
    try:
        first = a.ask(_track_msg("a1", knife))
        stolen = b.ask(_track_msg("b1", grey))  # same stream name, another caller
        again = a.ask(_track_msg("a2", knife))
    finally:
        a.close()
        b.close()
    assert first["result"]["track"]["source"] == "reasoned"
    assert stolen["result"]["track"]["source"] == "reasoned"  # not A's masks "tracked" onto B's frame
    tiny_segmenter.clear_cache()
    expected = tiny_segmenter.segment(grey, "the knife").to_dict()["masks"]
    assert [m["rle"] for m in stolen["result"]["masks"]] == [m["rle"] for m in expected]
    assert again["result"]["track"]["source"] == "tracked"  # A's own session went on undisturbed


def test_3_latest_only_of_one_caller_never_supersedes_anothers_frames():
    gate = threading.Event()
    with LisaServer(EchoBackend(gate=gate), ANY_PORT, max_queue=4) as server:
        holder, a, b = (RawPeer(server.endpoint) for _ in range(3))
        try:
            holder.send(segment_msg("hold", synthetic_frame(48, 64, seed=9)))
            wait_until(lambda: server.health()["busy"])
            opts = {"latest_only": True, "stream": "cam0"}
            a.send(segment_msg("a1", synthetic_frame(48, 64, seed=1), options=opts))
            wait_until(lambda: server.health()["queue_depth"] == 1)
            b.send(segment_msg("b1", synthetic_frame(48, 64, seed=2), options=opts))
            wait_until(lambda: server.health()["queue_depth"] == 2)
            a.send(segment_msg("a2", synthetic_frame(48, 64, seed=3)))  # A's own stream without a name...
            a.send(segment_msg("a3", synthetic_frame(48, 64, seed=5), options={"latest_only": True}))
            superseded = a.recv()[0]  # ...and its newer frame supersedes it: A's default stream is A's own
            gate.set()
            replies = {r["id"]: r for r in (a.recv()[0], a.recv()[0], b.recv()[0])}
        finally:
            gate.set()
            for peer in (holder, a, b):
                peer.close()
        assert superseded["id"] == "a2" and superseded["error"]["code"] == Code.SUPERSEDED
        message = superseded["error"]["message"]
        assert "peer:" not in message and "default:" not in message and "cam0" not in message  # no stream names
        assert replies["a1"]["ok"] and replies["b1"]["ok"] and replies["a3"]["ok"]
        assert server.health()["replies"][Code.SUPERSEDED] == 1


def test_3_on_ray_a_session_belongs_to_the_session_id_that_made_it(tiny_segmenter, replica):
    ray = replica(lambda: tiny_segmenter)
    knife, grey = random_frame(96, 128, seed=4), np.full((96, 128, 3), 128, np.uint8)

    def track(rid: str, image: np.ndarray, session: str) -> dict[str, Any]:
        status, reply = ray.post(encode_http_request(_track_msg(rid, image)), {"x-session-id": session})
        assert status == 200, reply
        return reply["result"]

    assert track("a1", knife, "robot-a")["track"]["source"] == "reasoned"
    assert track("b1", grey, "robot-b")["track"]["source"] == "reasoned"  # same stream name, another caller
    assert track("a2", knife, "robot-a")["track"]["source"] == "tracked"
    assert ray.health()["track_sessions"] == 2


# ------------------------------------------------------------------ 4. the Ray ingress's Host / Origin / content type
def test_4_the_ray_ingress_refuses_rebinding_other_sites_and_form_posts(replica):
    ray = replica()
    body = http_segment("g", synthetic_frame(48, 64))
    assert ray.post(body)[0] == 200
    refused = {
        "rebinding": ({"host": "evil.example:8000"}, 403, Code.FORBIDDEN_HOST),
        "other site": ({"origin": "http://evil.example"}, 403, Code.CROSS_ORIGIN),
        "null origin": ({"origin": "null"}, 403, Code.CROSS_ORIGIN),
        "text/plain": ({"content-type": "text/plain"}, 415, Code.UNSUPPORTED_MEDIA_TYPE),
        "form": ({"content-type": "application/x-www-form-urlencoded"}, 415, Code.UNSUPPORTED_MEDIA_TYPE),
        "no type": ({"content-type": None}, 415, Code.UNSUPPORTED_MEDIA_TYPE),
    }
    for case, (headers, status, code) in refused.items():
        got, reply = ray.post(body, headers)
        assert (got, reply["ok"], reply["error"]["code"]) == (status, False, code), case
    assert ray.post(body, {"host": "localhost:8000"})[0] == 200
    assert ray.post(body, {"content-type": "application/json; charset=utf-8"})[0] == 200
    assert ray.health()["replies"]["ok"] == 3  # nothing refused ran
    network = replica(allowed_hosts=["*"])  # a proxy listening on a network (`--http-host 0.0.0.0 --insecure`)
    assert network.post(body, {"host": "gpu-head:8000"})[0] == 200
    assert network.post(body, {"host": "gpu-head:8000", "origin": "http://evil.example"})[0] == 403


# ------------------------------------------------------------------ 5. is in tests/test_console.py (a process)
# ------------------------------------------------------------------ 6. the Ray ingress bounds a body before reading it
def test_6_ray_refuses_a_body_on_its_content_length_before_reading_it(replica):
    limits = Limits(max_frame_bytes=1 << 20)
    ray = replica(max_frame_bytes=limits.max_frame_bytes)
    huge = str(100 * max_body_bytes(limits))
    status, reply = ray.post([b"{" * 1024] * 4, {"content-length": huge})
    assert (status, reply["error"]["code"]) == (413, Code.TOO_LARGE) and ray.reads == 0  # not one byte read
    assert huge in reply["error"]["message"]
    # streamed without a Content-Length (chunked): refused once past the limit, the rest never read
    ray.reads = 0
    chunk = b" " * (256 * 1024)
    count = max_body_bytes(limits) // len(chunk) + 20
    status, reply = ray.post([chunk] * count, {"content-length": None})
    assert (status, reply["error"]["code"]) == (413, Code.TOO_LARGE)
    assert ray.reads <= max_body_bytes(limits) // len(chunk) + 1 < count
    status, reply = ray.post(b'{"header": {"v": 2, "id": 1, "op": "health"}}', {"content-length": "12x"})
    assert (status, reply["error"]["code"]) == (400, Code.BAD_REQUEST)
    assert ray.post(http_segment("fits", synthetic_frame(48, 64)))[0] == 200


# ------------------------------------------------------------------ 7. sessions: a periodic sweep and a byte budget
def test_7_tracking_sessions_together_stay_within_a_byte_budget():
    frame = synthetic_frame(256, 256)
    probe = TrackSessions(EchoBackend())
    probe.process("a", "s", "the cup", as_frame(frame), TrackOptions(**TRACK), QueryOptions(max_new_tokens=8))
    one = probe.nbytes
    assert one >= frame.nbytes  # the frame it tracks from, at least
    sessions = TrackSessions(EchoBackend(), max_bytes=int(2.5 * one))
    for k in range(4):
        sessions.process("a", f"cam{k}", "the cup", as_frame(frame), TrackOptions(**TRACK), QueryOptions(max_new_tokens=8))
    assert len(sessions) == 2 and sessions.nbytes <= 2.5 * one
    tracked = sessions.process("a", "cam3", "the cup", as_frame(frame), TrackOptions(**TRACK), QueryOptions(max_new_tokens=8))
    assert tracked.track is not None and tracked.track.source == "tracked"  # the newest were kept
    first = sessions.process("a", "cam0", "the cup", as_frame(frame), TrackOptions(**TRACK), QueryOptions(max_new_tokens=8))
    assert first.track is not None and first.track.source == "reasoned"  # the oldest had gone


def as_frame(image: np.ndarray) -> Any:
    from lisa_agent.frames import Frame

    return Frame(image)


def test_7_idle_sessions_are_swept_without_another_tracked_request():
    with LisaServer(EchoBackend(), ANY_PORT, track_idle_s=0.2) as server:
        reply = ask(server.endpoint, _track_msg("t", synthetic_frame(48, 64)))
        assert reply["ok"] and server.health()["track_sessions"] == 1 and server.health()["track_bytes"] > 0
        wait_until(lambda: server.health()["track_sessions"] == 0, what="the idle session's sweep")
        assert server.health()["track_bytes"] == 0


def test_7_a_ray_replica_sweeps_idle_sessions_at_its_health_checks(replica):
    ray = replica(track_idle_s=0.05)
    status, _ = ray.post(encode_http_request(_track_msg("t", synthetic_frame(48, 64))))
    assert status == 200 and ray.health()["track_sessions"] == 1
    seen = time.monotonic()
    wait_until(lambda: time.monotonic() - seen > 0.1, what="the session's idle time")
    ray.deployment.check_health()  # Serve calls it every health_check_period_s
    wait_until(lambda: ray.health()["track_sessions"] == 0, what="the sweep on the model thread")


# ------------------------------------------------------------------ 8. deeply nested JSON
def test_8_deeply_nested_json_is_a_bad_request_at_every_door(zmq_engine, console, replica):
    nested = "[" * DEEP + "]" * DEEP
    header = ('{"v": 2, "id": "deep", "op": "segment", "query": ' + nested + "}").encode()
    reply = ask(zmq_engine.endpoint, [header, b"x"])
    assert reply["error"]["code"] == Code.BAD_REQUEST and "nested too deeply" in reply["error"]["message"]
    assert zmq_engine.health()["replies"].get(Code.INTERNAL, 0) == 0
    shallow = ('{"v": 2, "id": "d", "op": "info", "options": ' + "[" * 40 + "]" * 40 + "}").encode()
    assert ask(zmq_engine.endpoint, [shallow])["error"]["code"] == Code.BAD_REQUEST  # deeper than any header
    status, error = console_call(console.port, "POST", "/api/instruction", raw=('{"text": ' + nested + "}").encode(),
                                 headers={"Content-Type": "application/json"})
    assert (status, error["error"]["code"]) == (400, "invalid_argument"), error
    ray = replica()
    status, reply = ray.post(('{"header": {"v": 2, "id": 1, "op": "health", "x": ' + nested + "}}").encode())
    assert (status, reply["error"]["code"]) == (400, Code.BAD_REQUEST)
    status, reply = ray.post(('{"header": {"v": 2, "id": 1, "op": "health"}, "frames": ' + nested + "}").encode())
    assert (status, reply["error"]["code"]) == (400, Code.BAD_REQUEST)


# ------------------------------------------------------------------ 9. stalled connections
TCP_ESTABLISHED = 1  # tcp_info.tcpi_state (Linux): CLOSE_WAIT after the peer's FIN, CLOSE after its RST


def _closed_by_server(sock: socket.socket, timeout: float = 60.0) -> bool:
    """Wait until the server has closed (FIN) or reset (RST) the connection (True), or ``timeout`` passes
    (False), without reading from it: a client that stalled stays stalled (reading would also let a server's
    close that waits for its send buffer go out)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] != TCP_ESTABLISHED:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize("bind", ["127.0.0.1", "0.0.0.0"])
def test_9_the_console_closes_connections_that_never_finish_their_request_head(bind):
    core = ConsoleCore(EchoBackend(), SyntheticSource(size=(64, 80), fps=5.0), query=QueryOptions(mode="fast"))
    server = ConsoleServer(core, host=bind, port=0, header_timeout_s=0.3).start_in_thread()
    try:
        slow = socket.create_connection(("127.0.0.1", server.port))
        slow.sendall(b"GET /api/state HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # ... and nothing more
        assert _closed_by_server(slow), "a connection with an unfinished request head was kept open"
        slow.close()
        token = {"Authorization": f"Bearer {server.token}"} if server.token else {}
        assert console_call(server.port, "GET", "/api/state", headers=token)[0] == 200  # others are served
    finally:
        server.stop_thread()
        core.close()



def test_9_the_console_drops_a_websocket_client_that_stopped_reading():
    core = ConsoleCore(EchoBackend(), SyntheticSource(size=(480, 640), fps=30.0), query=QueryOptions(mode="fast"))
    server = ConsoleServer(core, port=0, ws_send_timeout_s=0.5, ws_heartbeat_s=600).start_in_thread()
    try:
        # takes the upgrade, then never reads: the kernel's buffers fill (a few MB), then the console's
        stuck = ws_handshake(server.port, receive_buffer=4096)
        wait_until(lambda: server.websocket_clients == 1, what="the client's registration")
        assert _closed_by_server(stuck, 300), "the stalled client's connection is still open"
        wait_until(lambda: server.websocket_clients == 0, what="the stalled client's removal")
        stuck.close()
        healthy = asyncio.run(_frames(f"ws://127.0.0.1:{server.port}/ws", 3))
        assert healthy == 3  # a client that reads is served as before
    finally:
        server.stop_thread()
        core.close()


async def _frames(url: str, n: int) -> int:
    got = 0
    async with websockets.connect(url, max_size=None) as ws:
        while got < n:
            if isinstance(await asyncio.wait_for(ws.recv(), 60), bytes):
                got += 1
    return got


def test_9_the_foxglove_gate_closes_connections_that_never_finish_their_request_head():
    fox = FoxglovePublisher(port=0, header_timeout_s=0.3)
    try:
        slow = socket.create_connection(("127.0.0.1", fox.port))
        slow.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
        assert _closed_by_server(slow)
        slow.close()
        assert asyncio.run(_fox_open(f"ws://127.0.0.1:{fox.port}")) == "serverInfo"
    finally:
        fox.close()


# ------------------------------------------------------------------ 10. a frame-size change inside a tracked stream
def test_10_a_new_frame_size_restarts_the_tracked_session(tiny_segmenter, zmq_engine):
    big, small = random_frame(96, 128, seed=6), random_frame(64, 80, seed=7)
    peer = RawPeer(zmq_engine.endpoint)
    try:
        first = peer.ask(_track_msg("s1", big, stream="resized"))
        resized = peer.ask(_track_msg("s2", small, stream="resized"))
        after = peer.ask(_track_msg("s3", small, stream="resized"))
    finally:
        peer.close()
    assert first["result"]["track"]["source"] == "reasoned"
    assert resized["result"]["track"]["source"] == "reasoned" and resized["result"]["image_size"] == [64, 80]
    tiny_segmenter.clear_cache()
    expected = tiny_segmenter.segment(small, "the knife").to_dict()["masks"]
    assert [m["rle"] for m in resized["result"]["masks"]] == [m["rle"] for m in expected]
    assert after["result"]["track"]["source"] == "tracked"  # and tracking goes on at the new size


# ------------------------------------------------------------------ 11. arguments before the model; PNG bombs
@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def test_11_bad_console_arguments_are_refused_before_the_model_loads(capsys, taken_port):
    base = ["console", "--model", "/nonexistent/model"]
    cases = [
        (["--token", "short"], "token must be at least 12"),
        (["--bind", "203.0.113.7"], "cannot listen on 203.0.113.7:0"),  # not an address of this machine
        (["--bind", "no-such-host.invalid"], "is not an address of this machine"),
        (["--port", str(taken_port)], f"cannot listen on 127.0.0.1:{taken_port}"),
        (["--port", "0", "--foxglove-port", str(taken_port)], f"cannot listen on 127.0.0.1:{taken_port}"),
    ]
    for flags, message in cases:
        assert main([*base, "--port", "0", *flags] if "--port" not in flags else [*base, *flags]) == 1, flags
        err = capsys.readouterr().err
        assert message in err and "/nonexistent/model" not in err, (flags, err)


def test_11_a_png_whose_header_claims_100000x100000_is_too_large(zmq_engine):
    for pixels in (True, False):
        data = png_claiming(100_000, 100_000, pixels)
        with pytest.raises(ImageTooLargeError, match="100000x100000 pixels") as exc:
            decode_image_bytes(data, max_side=4096)
        assert exc.value.code == "too_large"
        header = build_header("bomb", "segment", query="the cup", image={"format": "png", "dtype": "uint8"})
        reply = ask(zmq_engine.endpoint, [header, data])
        assert reply["error"]["code"] == Code.TOO_LARGE and "100000x100000" in reply["error"]["message"], reply


# ----------------------------------------------------------------------------------------- fuzzers
def _unicode_text(max_size: int) -> st.SearchStrategy[str]:
    return st.text(st.characters(exclude_categories=()), max_size=max_size)  # lone surrogates included


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**20, 10**20) | st.floats(allow_nan=False) | _unicode_text(40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_unicode_text(8), children, max_size=4),
    max_leaves=20,
)


def _nest(value: Any, depth: int) -> str:
    return "[" * depth + json.dumps(value) + "]" * depth


def dumps_json(value: Any) -> bytes:
    return json.dumps(value).encode()  # ensure_ascii: lone surrogates travel as \ud800 escapes


console_bodies = st.one_of(
    st.fixed_dictionaries({}, optional={"text": st.one_of(_unicode_text(2100), json_values),
                                        "mode": st.one_of(st.sampled_from(["fast", "chat", "reference"]), json_values),
                                        "index": json_values, "point": json_values, "on": json_values,
                                        "extra": json_values}).map(dumps_json),
    json_values.map(dumps_json),
    st.builds(lambda v, d: ('{"text": ' + _nest(v, d) + "}").encode(), json_values, st.integers(1, 5000)),
    st.integers(60_000, 70_000).map(lambda n: json.dumps({"text": "x" * n}).encode()),  # around the 64 KB limit
    st.binary(max_size=200),
)
CONSOLE_CODES = {"invalid_query", "invalid_argument", "too_large", "unknown_target", "no_frame", "busy", "superseded",
                 "unsupported_media_type", "not_found", "method_not_allowed"}


@pytest.fixture(scope="module")
def echo_console() -> Iterator[ConsoleServer]:
    core = ConsoleCore(EchoBackend(), SyntheticSource(size=(64, 80), fps=20.0), query=QueryOptions(mode="fast"),
                       track=TrackOptions(tracker="none"))
    server = ConsoleServer(core, port=0).start_in_thread()
    core.wait_for_frame(30.0)
    try:
        yield server
    finally:
        server.stop_thread()
        core.close()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(path=st.sampled_from(["/api/instruction", "/api/target", "/api/continuous"]), body=console_bodies,
       content_type=st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain"]))
def test_fuzz_every_console_request_gets_json_or_a_4xx_and_the_console_keeps_serving(echo_console, path, body,
                                                                                      content_type):
    status, reply = console_call(echo_console.port, "POST", path, raw=body, headers={"Content-Type": content_type})
    assert status == 200 or 400 <= status < 500, (status, reply)
    if status != 200:
        assert reply["error"]["code"] in CONSOLE_CODES and "\n" not in reply["error"]["message"], reply
    assert console_call(echo_console.port, "GET", "/api/state")[0] == 200


header_values = st.fixed_dictionaries({}, optional={
    "v": st.sampled_from([2, 1, "2"]), "id": st.one_of(_unicode_text(130), st.integers(), st.none()),
    "op": st.sampled_from(["segment", "info", "health", "x"]), "query": st.one_of(_unicode_text(4100), json_values),
    "image": st.one_of(json_values, st.fixed_dictionaries({
        "format": st.sampled_from(["raw", "jpeg", "png", "tiff"]),
        "shape": st.lists(st.integers(-1, 70), max_size=4), "dtype": st.sampled_from(["uint8", "int8"])})),
    "options": st.one_of(json_values, st.dictionaries(st.sampled_from(
        ["mode", "stream", "track", "latest_only", "answer", "frame_id", "zzz"]), json_values, max_size=3)),
    "timeout_ms": json_values, "depth": json_values,
})
ray_bodies = st.one_of(
    st.builds(lambda h, f: dumps_json({"header": h, "frames": f}), header_values,
              st.one_of(st.lists(st.binary(max_size=300).map(lambda b: base64.b64encode(b).decode()), max_size=3),
                        json_values)),
    st.builds(lambda h, d: ('{"header": ' + json.dumps(h)[:-1] + (", " if len(h) else "") + '"x": '
                            + _nest(0, d) + "}}").encode(), header_values, st.integers(1, 5000)),
    json_values.map(dumps_json),
    st.binary(max_size=300),
)


@pytest.fixture
def fuzz_replica(replica: Callable[..., Replica]) -> Replica:
    """One replica for all of a fuzzer run's examples (a function-scoped fixture is made once per test)."""
    return replica(max_side=256, max_frame_bytes=1 << 16)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(body=ray_bodies, headers=st.fixed_dictionaries({}, optional={
    "content-type": st.sampled_from(["application/json", "text/plain", "application/json; charset=utf-8"]),
    "origin": st.sampled_from(["http://evil.example", "null", "http://127.0.0.1:8000"]),
    "host": st.sampled_from(["127.0.0.1:8000", "localhost", "evil.example", "[::1]:8000"]),
    "x-session-id": _unicode_text(20).filter(lambda t: t.isprintable() and t.isascii())}))
def test_fuzz_every_ray_ingress_request_gets_a_protocol_reply_and_the_replica_stays_healthy(fuzz_replica, body,
                                                                                           headers):
    ray = fuzz_replica
    status, reply = ray.post(body, headers)
    assert isinstance(reply["ok"], bool) and reply["v"] == 2
    if reply["ok"]:
        assert status == 200
    else:
        assert reply["error"]["code"] in ERROR_CODES and status != 500, (status, reply)
    ray.deployment.check_health()

"""The teleoperation console (``lisa-agent console``): the page, its API and WebSocket, the token, Foxglove, MCAP.

Every part is real. The fast tests serve the console from aiohttp on loopback over the real engine with
the tiny RANDOM-weight checkpoint (its masks prove plumbing: schema, envelope, targets, frames) and the
synthetic source, and talk to it with plain HTTP, raw sockets and the ``websockets`` package. The slow
tests use the bundled trained ``tabletop-tiny`` on the synthetic scene the demo shows (test scene 2, on
which it finds the knife, IoU ~0.83 in every phase of the camera's motion): Debian's chromium driven by
Selenium through chromedriver types the instruction and clicks the row, a Foxglove WebSocket protocol
client (written here on ``websockets``, decoding the advertised protobuf schemas) asks through the
client-publish channel, and ``lisa-agent console`` runs as a process and records MCAP.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest
import websockets
from helpers import assert_result_schema, http_call, ws_handshake
from PIL import Image

from lisa_agent.console.core import MAX_INSTRUCTION_CHARS, ConsoleCore
from lisa_agent.console.sources import SyntheticSource, parse_source
from lisa_agent.console.web import ConsoleServer, is_loopback
from lisa_agent.encoders import rle_to_mask
from lisa_agent.errors import InvalidArgumentError
from lisa_agent.integrations.foxglove import FoxglovePublisher
from lisa_agent.labels import mask_labels
from lisa_agent.options import QueryOptions

QUERY = "grab something to cut with"
ENVELOPE = {"request", "origin", "frame_seq", "labels", "declined", "message", "latency_ms", "target", "model_ms"}
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------- clients
def call(server: ConsoleServer, method: str, path: str, body: Any = None, *, raw: bytes | None = None,
         headers: dict[str, str] | None = None, timeout: float = 180.0) -> tuple[int, dict[str, str], Any]:
    """One HTTP request to the console on 127.0.0.1: (status, headers, JSON body or bytes)."""
    return http_call(server.port, method, path, body, raw=raw, headers=headers, timeout=timeout)


def ws_url(server: ConsoleServer, query: str = "") -> str:
    return f"ws://127.0.0.1:{server.port}/ws{query}"


async def ws_collect(url: str, *, want_frames: int = 1, until: Any = None, timeout: float = 120.0,
                     headers: dict[str, str] | None = None, action: Any = None) -> SimpleNamespace:
    """Connect, then read until ``want_frames`` binary frames arrived and ``until(messages)`` holds for the
    JSON messages; ``action`` runs in a thread once the console has greeted this client (it is registered
    for every broadcast from then on). ``timeout`` only bounds a test that would otherwise hang."""
    frames: list[bytes] = []
    messages: list[dict] = []
    task = None
    async with websockets.connect(url, additional_headers=headers, max_size=None) as ws:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                msg = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break
            if isinstance(msg, bytes):
                frames.append(msg)
            else:
                messages.append(json.loads(msg))
                if action is not None and task is None and messages[-1]["type"] == "hello":
                    task = asyncio.get_running_loop().run_in_executor(None, action)
            if len(frames) >= want_frames and (until is None or until(messages)) and (action is None or task):
                break
        result = await task if task is not None else None
    return SimpleNamespace(frames=frames, messages=messages, action=result)


def decode_jpeg(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


class FoxgloveClient:
    """Enough of the Foxglove WebSocket protocol (as the Foxglove app speaks it) for the tests: read the
    server's info and channel advertisements, subscribe, advertise a client channel and publish on it, and
    decode the protobuf messages of subscribed channels from the schemas the server advertised."""

    SUBPROTOCOLS = ["foxglove.sdk.v1", "foxglove.websocket.v1"]

    def __init__(self, url: str) -> None:
        self.url = url
        self.ws: Any = None
        self.info: dict = {}
        self.channels: dict[str, dict] = {}  # topic -> advertised channel
        self.statuses: list[dict] = []
        self._subscriptions: dict[int, dict] = {}
        self._next_id = 1
        self._classes: dict[int, Any] = {}

    async def __aenter__(self) -> FoxgloveClient:
        self.ws = await websockets.connect(self.url, subprotocols=self.SUBPROTOCOLS, max_size=None)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()

    def _control(self, msg: dict) -> None:
        if msg["op"] == "serverInfo":
            self.info = msg
        elif msg["op"] == "advertise":
            for channel in msg["channels"]:
                self.channels[channel["topic"]] = channel
        elif msg["op"] == "status":
            self.statuses.append(msg)

    async def wait_channels(self, topics: set[str], timeout: float = 10.0) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        while not topics <= set(self.channels):
            msg = await asyncio.wait_for(self.ws.recv(), max(0.05, deadline - time.monotonic()))
            if isinstance(msg, str):
                self._control(json.loads(msg))
        return self.channels

    async def subscribe(self, topic: str) -> int:
        sub = self._next_id
        self._next_id += 1
        channel = self.channels[topic]
        self._subscriptions[sub] = channel
        await self.ws.send(json.dumps({"op": "subscribe", "subscriptions": [{"id": sub, "channelId": channel["id"]}]}))
        return sub

    async def advertise(self, topic: str, encoding: str = "json", schema_name: str = "std_msgs/String") -> int:
        channel_id = 100 + self._next_id
        self._next_id += 1
        await self.ws.send(json.dumps({"op": "advertise", "channels": [
            {"id": channel_id, "topic": topic, "encoding": encoding, "schemaName": schema_name}]}))
        return channel_id

    async def publish(self, channel_id: int, payload: bytes) -> None:
        await self.ws.send(bytes([0x01]) + struct.pack("<I", channel_id) + payload)

    async def next_message(self, timeout: float) -> tuple[str, int, Any]:
        """The next message on a subscription: (topic, log time ns, decoded message or JSON)."""
        deadline = time.monotonic() + timeout
        while True:
            msg = await asyncio.wait_for(self.ws.recv(), max(0.05, deadline - time.monotonic()))
            if isinstance(msg, str):
                self._control(json.loads(msg))
                continue
            if msg[0] != 0x01:  # only MessageData is expected here
                continue
            sub, log_time = struct.unpack_from("<IQ", msg, 1)
            channel = self._subscriptions[sub]
            return channel["topic"], log_time, self.decode(channel, msg[13:])

    def decode(self, channel: dict, payload: bytes) -> Any:
        if channel["encoding"] == "json":
            return json.loads(payload)
        assert channel["encoding"] == "protobuf", channel
        cls = self._classes.get(channel["id"])
        if cls is None:
            from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

            files = descriptor_pb2.FileDescriptorSet.FromString(base64.b64decode(channel["schema"]))
            pool = descriptor_pool.DescriptorPool()
            for proto in files.file:
                pool.Add(proto)
            cls = message_factory.GetMessageClass(pool.FindMessageTypeByName(channel["schemaName"]))
            self._classes[channel["id"]] = cls
        return cls.FromString(payload)


def annotation_polygons(annotations: Any) -> list[np.ndarray]:
    """The LINE_LOOP polygons of a decoded foxglove.ImageAnnotations, each K x 2 (x, y)."""
    return [np.array([[p.x, p.y] for p in a.points], np.float64) for a in annotations.points if a.type == 2]


def polygons_mask(polygons: list[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    canvas = np.zeros(size, np.uint8)
    cv2.fillPoly(canvas, [np.round(p - 0.5).astype(np.int32) for p in polygons], 1)
    return canvas > 0


# ----------------------------------------------------------------------------------------- fast: pieces
@pytest.mark.parametrize("text,count,labels", [
    ("Sure, the knife [SEG] .", 1, ["knife"]),
    ("Sure, [SEG].", 1, ["mask 1"]),
    ("Sure, the segmentation result is [SEG] .", 1, ["mask 1"]),
    ("the red mug [SEG] and the spoon [SEG] .", 2, ["red mug", "spoon"]),
    ("It is a pair of scissors [SEG].", 1, ["pair of scissors"]),
    ("Sorry, there is no hammer in this image.", 0, []),
    ("Sure, [SEG]", 2, ["mask 1", "mask 2"]),
])
def test_mask_labels_name_what_the_answer_names(text, count, labels):
    assert mask_labels(text, count) == labels


def test_source_specs_are_parsed_or_refused_with_the_accepted_forms():
    assert parse_source("synthetic") == ("synthetic", "")
    assert parse_source("synthetic:7") == ("synthetic", "7")
    assert parse_source("camera:0") == ("camera", "0")
    assert parse_source("video:/tmp/run.mp4") == ("video", "/tmp/run.mp4")
    assert parse_source("ros:/camera/color/image_raw") == ("ros", "/camera/color/image_raw")
    assert parse_source("server:tcp://127.0.0.1:5557") == ("server", "tcp://127.0.0.1:5557")
    assert parse_source("server:http://10.0.0.2:8000/lisa") == ("server", "http://10.0.0.2:8000/lisa")
    for bad in ("webcam", "camera:front", "camera:", "video:", "server:127.0.0.1:5557", "synthetic:x", ""):
        with pytest.raises(InvalidArgumentError, match="synthetic|camera|server|needs"):
            parse_source(bad)
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1") and is_loopback("[::1]")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("robot.local")


def test_synthetic_source_is_the_demo_scene_slowly_moving_with_ground_truth_and_depth():
    from lisa_agent.data.tabletop import render_scene, split_seed

    source = SyntheticSource(fps=10.0)
    scene = render_scene(split_seed("test", 2), size=(480, 640))
    first = source.render(0)
    assert np.abs(first.rgb.astype(int) - scene.image.astype(int)).mean() < 3.0  # frame 0: the demo scene + noise
    truth0 = {o.category: o.mask for o in source.ground_truth(0)}
    assert set(truth0) == {o.category for o in scene.objects} and "knife" in truth0
    np.testing.assert_array_equal(truth0["knife"], next(o.mask for o in scene.objects if o.category == "knife"))
    np.testing.assert_array_equal(source.render(123).rgb, source.render(123).rgb)  # deterministic
    later = {o.category: o.mask for o in source.ground_truth(100)}
    moved = np.linalg.norm(np.argwhere(later["knife"]).mean(0) - np.argwhere(truth0["knife"]).mean(0))
    assert 1.0 < moved < 30.0  # the camera moved, slowly: the knife's centre, 10 s later
    frame = source.render(100)
    assert frame.depth is not None and frame.intrinsics is not None
    knife_depth = frame.depth_m()[later["knife"]]
    assert np.nanmedian(knife_depth) < np.nanmedian(frame.depth_m()[~later["knife"]])  # objects stand on the table
    clock = [1000.0]  # the source's own clock: pacing is checked against it, not against the wall
    paced = SyntheticSource(fps=10.0, clock=lambda: clock[0])
    assert [paced.read(timeout=1.0).seq for _ in range(3)] == [0, 1, 2]  # the frames due, one after another
    assert paced.read(timeout=0.01) is None  # frame 3 is due 0.1 s after frame 2's time: not within 0.01 s
    clock[0] += 2.0  # a slow machine: two seconds went by
    assert paced.read(timeout=1.0).seq == 20  # the frame due now; the ones missed are skipped


# ----------------------------------------------------------------------------------------- fast: served console
@pytest.fixture(scope="module")
def tiny_console(tiny_segmenter) -> Iterator[SimpleNamespace]:
    """The console over the tiny random-weight engine and a small synthetic scene, served on loopback."""
    core = ConsoleCore(tiny_segmenter, SyntheticSource(size=(120, 160), fps=20.0), query=QueryOptions(mode="fast"), model_name="tiny")
    server = ConsoleServer(core, port=0).start_in_thread()
    core.wait_for_frame(10.0)
    try:
        yield SimpleNamespace(core=core, server=server)
    finally:
        server.stop_thread()
        core.close()


def test_instruction_returns_the_result_schema_and_the_state_and_target_follow(tiny_console):
    server = tiny_console.server
    status, _, page = call(server, "GET", "/")
    assert status == 200 and b"LISA console" in page and b"/static/console.js" in page
    status, headers, script = call(server, "GET", "/static/console.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript") and b"decodeRle" in script
    assert "script-src 'self'" in headers["content-security-policy"]
    status, _, answer = call(server, "POST", "/api/instruction", {"text": "  the red   block ", "mode": "fast"})
    assert status == 200, answer
    assert_result_schema(answer)
    assert ENVELOPE <= set(answer) and answer["origin"] == "instruction" and answer["query"] == "the red block"
    assert answer["mode"] == "fast" and answer["text"] == "Sure, [SEG]." and answer["labels"] == ["mask 1"]
    assert answer["image_size"] == [120, 160] and answer["frame_id"] == "synthetic_camera_optical_frame"
    assert answer["masks"][0]["target"] is not None  # the synthetic frames come with depth and intrinsics
    assert abs(answer["model_ms"] - answer["timings_ms"]["total"]) <= 0.1 and answer["target"] is None
    assert answer["latency_ms"] >= answer["model_ms"] * 0.5
    status, _, state = call(server, "GET", "/api/state")
    assert status == 200 and state["instruction"] == "the red block" and state["mode"] == "fast"
    assert state["last_result"]["request"] == answer["request"] and state["target"] is None
    assert_result_schema(state["last_result"])
    shown = call(server, "GET", "/api/state")[2]["last_result"]  # the masks now: tracked to the newest frame
    mask = rle_to_mask(shown["masks"][0]["rle"])
    if mask.any():  # random weights: a mask of something; choose it by the pixel deepest inside it
        inside = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 3)[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(inside)), mask.shape)
        status, _, state = call(server, "POST", "/api/target", {"point": [int(x), int(y)]})
        assert status == 200 and state["target"]["index"] == 0 and state["target"]["request"] == answer["request"]
    status, _, state = call(server, "POST", "/api/target", {"index": None})
    assert status == 200 and state["target"] is None
    status, _, state = call(server, "POST", "/api/target", {"index": 0})
    assert status == 200 and state["target"]["index"] == 0 and state["target"]["label"] == "mask 1"
    assert state["target"]["bbox"] == answer["masks"][0]["bbox"] and "last_result" not in state
    status, headers, jpeg = call(server, "GET", "/api/frame.jpg")
    assert status == 200 and headers["content-type"] == "image/jpeg" and decode_jpeg(jpeg).shape == (120, 160, 3)


def test_websocket_pushes_jpeg_frames_results_and_state(tiny_console):
    server = tiny_console.server

    def ask() -> Any:  # once the console has greeted the client
        return call(server, "POST", "/api/instruction", {"text": "the blue cup", "mode": "fast"})

    def answered(messages: list[dict]) -> bool:
        return any(m["type"] == "result" and m["result"]["query"] == "the blue cup" for m in messages)

    got = asyncio.run(ws_collect(ws_url(server), want_frames=3, until=answered, action=ask))
    status, _, answer = got.action
    assert status == 200
    assert got.messages[0]["type"] == "hello" and "source" in got.messages[0]["state"]
    assert all(decode_jpeg(f).shape == (120, 160, 3) for f in got.frames[:3])
    results = [m["result"] for m in got.messages if m["type"] == "result"]
    assert any(r["request"] == answer["request"] and r["origin"] == "instruction" for r in results)
    for r in results:
        assert_result_schema(r)
        if r["origin"] == "tracked":  # after an answer, its masks follow the frames (no further model call)
            assert r["track"]["source"] == "tracked" and r["track"]["age_frames"] >= 1
    assert any(m["type"] == "state" and m["state"]["busy"] for m in got.messages)  # the page can say "thinking"



def _read_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed")
        out += chunk
    return out


def _leave_mid_frame(port: int) -> None:
    """A WebSocket client that reads the start of a binary (JPEG) frame and vanishes (TCP reset)."""
    sock = ws_handshake(port)
    while True:
        first, second = _read_exact(sock, 2)
        length = second & 0x7F
        if length == 126:
            length = struct.unpack(">H", _read_exact(sock, 2))[0]
        elif length == 127:
            length = struct.unpack(">Q", _read_exact(sock, 8))[0]
        if first & 0x0F == 0x2:  # binary: read half of it, then reset the connection
            _read_exact(sock, max(1, length // 2))
            break
        _read_exact(sock, length)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def test_bad_input_gets_json_errors_and_the_console_keeps_serving(tiny_console):
    server = tiny_console.server
    json_headers = {"Content-Type": "application/json"}
    cases = [
        ("/api/instruction", {"text": ""}, 400, "invalid_query"),
        ("/api/instruction", {"text": " \n\t "}, 400, "invalid_query"),
        ("/api/instruction", {"text": "x" * (MAX_INSTRUCTION_CHARS + 1)}, 400, "invalid_query"),
        ("/api/instruction", {"text": 42}, 400, "invalid_query"),
        ("/api/instruction", {"mode": "fast"}, 400, "invalid_argument"),
        ("/api/instruction", {"text": "a cup", "mode": "reference"}, 400, "invalid_argument"),
        ("/api/instruction", {"text": "a cup", "extra": 1}, 400, "invalid_argument"),
        ("/api/instruction", ["grab", "it"], 400, "invalid_argument"),
        ("/api/target", {"index": 99}, 404, "unknown_target"),
        ("/api/target", {"index": -1}, 404, "unknown_target"),
        ("/api/target", {"index": "0"}, 404, "unknown_target"),
        ("/api/target", {"point": [1e9, 5]}, 404, "unknown_target"),
        ("/api/target", {"point": "middle"}, 404, "unknown_target"),
        ("/api/target", {}, 400, "invalid_argument"),
        ("/api/continuous", {"on": "yes"}, 400, "invalid_argument"),
    ]
    for path, body, want, code in cases:
        status, _, error = call(server, "POST", path, body)
        assert (status, error["error"]["code"]) == (want, code), (path, body, error)
        assert error["error"]["message"] and "\n" not in error["error"]["message"]
    raw_cases = [
        (b'{"text": "a cup"', json_headers, 400, "invalid_argument"),  # malformed JSON
        (b"\xff\xfe{}", json_headers, 400, "invalid_argument"),  # not UTF-8
        (b'{"text": "a cup"}', {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
        (json.dumps({"text": "y" * 70_000}).encode(), json_headers, 413, "too_large"),
    ]
    for raw, headers, want, code in raw_cases:
        status, _, error = call(server, "POST", "/api/instruction", raw=raw, headers=headers)
        assert (status, error["error"]["code"]) == (want, code), (raw[:40], error)
    assert call(server, "GET", "/api/nothing")[0] == 404 and call(server, "GET", "/static/../web.py")[0] == 404
    assert call(server, "DELETE", "/api/state")[0] == 405
    # WebSocket clients that misbehave: one vanishes mid-frame, one sends half a frame, one never reads
    _leave_mid_frame(server.port)
    half = ws_handshake(server.port)
    half.sendall(bytes([0x81, 0xFE]))  # a masked text frame header, cut short
    half.close()
    stuck = ws_handshake(server.port)
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        got = asyncio.run(ws_collect(ws_url(server), want_frames=5, timeout=20))
        assert len(got.frames) >= 5  # the others do not hold up a healthy client
        status, _, answer = call(server, "POST", "/api/instruction", {"text": "the cup", "mode": "fast"})
        assert status == 200 and answer["query"] == "the cup"
        status, _, state = call(server, "GET", "/api/state")
        assert status == 200 and state["error"] is None
    finally:
        stuck.close()


def test_loopback_console_refuses_other_hosts_and_other_sites(tiny_console):
    server = tiny_console.server
    status, _, error = call(server, "GET", "/api/state", headers={"Host": "attacker.example:80"})
    assert (status, error["error"]["code"]) == (403, "forbidden_host")  # DNS rebinding finds nothing
    status, _, error = call(server, "POST", "/api/instruction", {"text": "a cup"},
                            headers={"Origin": "http://attacker.example"})
    assert (status, error["error"]["code"]) == (403, "cross_origin")
    origin = f"http://127.0.0.1:{server.port}"
    assert call(server, "GET", "/api/state", headers={"Origin": origin})[0] == 200
    with pytest.raises(websockets.InvalidStatus) as refused:
        asyncio.run(ws_collect(ws_url(server), headers={"Origin": "http://attacker.example"}))
    assert refused.value.response.status_code == 403


def test_non_loopback_bind_needs_the_token_on_every_request_and_websocket(tiny_console):
    server = ConsoleServer(tiny_console.core, host="0.0.0.0", port=0).start_in_thread()
    try:
        token = server.token
        assert server.require_token and token and len(token) >= 24 and f"?token={token}" in server.url
        for method, path, body in (("GET", "/", None), ("GET", "/static/console.js", None), ("GET", "/api/state", None),
                                   ("GET", "/api/frame.jpg", None), ("POST", "/api/instruction", {"text": "a cup"}),
                                   ("POST", "/api/target", {"index": 0}), ("POST", "/api/continuous", {"on": True})):
            status, _, error = call(server, method, path, body)
            assert (status, error["error"]["code"]) == (401, "unauthorized"), (method, path)
            assert call(server, method, path, body, headers={"Authorization": "Bearer wrong-token-123"})[0] == 401
        for query in ("", "?token=wrong-token-123"):
            with pytest.raises(websockets.InvalidStatus) as refused:
                asyncio.run(ws_collect(ws_url(server, query)))
            assert refused.value.response.status_code == 401
        assert tiny_console.core.state()["continuous"] is False  # nothing got through
        status, _, _ = call(server, "GET", "/api/state", headers={"Authorization": f"Bearer {token}"})
        assert status == 200
        status, headers, page = call(server, "GET", f"/?token={token}")
        assert status == 200 and b"LISA console" in page
        cookie = headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        status, _, state = call(server, "GET", "/api/state", headers={"Cookie": cookie.split(";")[0]})
        assert status == 200 and "source" in state
        status, _, answer = call(server, "POST", "/api/instruction", {"text": "a cup", "mode": "fast"},
                                 headers={"X-Lisa-Token": token})
        assert status == 200 and answer["query"] == "a cup"
        got = asyncio.run(ws_collect(ws_url(server, f"?token={token}"), want_frames=1))
        assert got.messages[0]["type"] == "hello" and got.frames
    finally:
        server.stop_thread()
    with pytest.raises(InvalidArgumentError, match="token"):
        ConsoleServer(tiny_console.core, host="0.0.0.0", token="short")


def test_session_recorded_to_mcap_with_foxglove_schemas(tiny_console, tmp_path):
    from mcap.reader import make_reader

    path = tmp_path / "session.mcap"
    recorder = FoxglovePublisher(record=path)
    core = tiny_console.core
    later = threading.Semaphore(0)
    core.add_listener(recorder.console_listener)
    core.add_listener(lambda kind, _: later.release() if kind == "frame" else None)
    try:
        answer = core.ask("the green bottle", "fast")
        assert all(later.acquire(timeout=120) for _ in range(2))  # a few frames more
    finally:
        core.remove_listener(recorder.console_listener)
        recorder.close()
    with open(path, "rb") as f:
        reader = make_reader(f)
        summary = reader.get_summary()
        schemas = {c.topic: summary.schemas[c.schema_id].name for c in summary.channels.values()}
        assert schemas["/lisa/image"] == "foxglove.CompressedImage"
        assert schemas["/lisa/annotations"] == "foxglove.ImageAnnotations"
        assert schemas["/lisa/targets"] == "foxglove.SceneUpdate"
        assert schemas["/lisa/answer"] == "lisa.Answer" and schemas["/lisa/request"] == "lisa.Request"
        messages: dict[str, list] = {}
        client = FoxgloveClient("")
        for schema, channel, message in reader.iter_messages():
            advertised = {"id": channel.id, "encoding": channel.message_encoding, "schemaName": schema.name if schema
                          else "", "schema": base64.b64encode(schema.data).decode() if schema else ""}
            messages.setdefault(channel.topic, []).append(client.decode(advertised, message.data))
    assert len(messages["/lisa/image"]) >= 2 and messages["/lisa/image"][0].format == "jpeg"
    assert decode_jpeg(messages["/lisa/image"][0].data).shape == (120, 160, 3)
    assert any(r["data"] == "the green bottle" for r in messages["/lisa/request"])
    assert any(a["request"] == answer.request and a["data"] == "Sure, [SEG]." for a in messages["/lisa/answer"])
    results = [r for r in messages["/lisa/result"] if r["request"] == answer.request]
    assert results and results[0]["labels"] == ["mask 1"]
    assert_result_schema(results[0])
    for drawn in messages["/lisa/annotations"]:
        for polygon in annotation_polygons(drawn):
            assert (polygon >= 0).all() and (polygon[:, 0] <= 160).all() and (polygon[:, 1] <= 120).all()
    spheres = [e.spheres[0].pose.position for u in messages["/lisa/targets"] for e in u.entities]
    assert spheres and all(0.6 < s.z < 0.8 for s in spheres)  # the synthetic table is 0.75 m away


def test_console_command_refuses_a_bad_source_before_loading_a_model(capsys):
    from lisa_agent.cli import main

    assert main(["console", "--source", "webcam"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("lisa-agent console: error: unknown source 'webcam'") and "\n" not in err


# ----------------------------------------------------------------------------------------- slow: trained model
@pytest.fixture(scope="module")
def live() -> Iterator[SimpleNamespace]:
    """The console over the bundled trained model on the demo's scene, with a Foxglove server."""
    from lisa_agent import LisaSegmenter

    engine = LisaSegmenter.from_pretrained("tabletop-tiny", dtype="fp32", device="cpu")
    source = SyntheticSource()  # test scene 2: the bundled model finds the knife in it
    core = ConsoleCore(engine, source, query=QueryOptions(mode="chat"), model_name="tabletop-tiny")
    foxglove = FoxglovePublisher(port=0, on_instruction=lambda text: core.ask(text))
    core.add_listener(foxglove.console_listener)
    server = ConsoleServer(core, port=0).start_in_thread()
    core.wait_for_frame(10.0)
    try:
        yield SimpleNamespace(core=core, server=server, source=source, foxglove=foxglove)
    finally:
        server.stop_thread()
        core.close()
        foxglove.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator[Any]:
    """Debian's chromium, headless, through chromedriver (installed by scripts/test.sh)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not binary or not driver:
        message = "chromium and chromium-driver are not installed (scripts/test.sh installs them with apt-get)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,760",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(options=options, service=Service(driver))
    drv.set_page_load_timeout(60)
    try:
        yield drv
    finally:
        drv.quit()


def _severe_console_errors(drv: Any) -> list[dict]:
    return [e for e in drv.get_log("browser") if e["level"] == "SEVERE" and "favicon" not in e["message"]]


@pytest.mark.slow
def test_browser_asks_sees_the_knife_and_chooses_it(live, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(live.server.url)
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "link").text == "live"
                                     and "frames" in d.find_element(By.ID, "frameinfo").text)
    box = browser.find_element(By.ID, "instruction")
    box.send_keys(QUERY, Keys.ENTER)
    WebDriverWait(browser, 240).until(lambda d: d.find_element(By.ID, "overlay").get_attribute("data-request")
                                      and d.find_elements(By.CSS_SELECTOR, "#masks tbody tr"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#masks tbody tr")
    assert len(rows) == 1 and "knife" in rows[0].text, [r.text for r in rows]
    assert "knife" in browser.find_element(By.ID, "answer").text
    assert re.search(r"last answer \d+ ms", browser.find_element(By.ID, "latency").text)
    request, seq, picture = browser.execute_script(  # one turn of the page's event loop: masks and their frame
        "const o = document.getElementById('overlay');"
        "return [Number(o.dataset.request), Number(o.dataset.frameSeq), o.toDataURL('image/png')];")
    drawn = np.asarray(Image.open(io.BytesIO(base64.b64decode(picture.split(",", 1)[1]))).convert("RGBA"))[..., 3] > 0
    knife = next(o.mask for o in live.source.ground_truth(seq) if o.category == "knife")
    assert drawn.shape == knife.shape and iou(drawn, knife) >= 0.5, iou(drawn, knife)
    browser.find_element(By.CSS_SELECTOR, "#masks tbody tr").click()
    deadline = time.monotonic() + 120  # bounds a hang only: the click's POST is the event awaited
    state = call(live.server, "GET", "/api/state")[2]
    while state["target"] is None and time.monotonic() < deadline:
        time.sleep(0.1)
        state = call(live.server, "GET", "/api/state")[2]
    assert state["target"]["index"] == 0 and state["target"]["label"] == "knife"
    assert state["target"]["request"] == request and state["target"]["target"]["point"] is not None
    WebDriverWait(browser, 10).until(lambda d: "chosen" in d.find_element(By.CSS_SELECTOR, "#masks tbody tr")
                                     .get_attribute("class") and "knife" in d.find_element(By.ID, "target").text)
    browser.save_screenshot(str(tmp_path / "console.png"))
    assert (tmp_path / "console.png").stat().st_size > 10_000
    try:  # a phone held upright: the layout stacks, nothing runs off the side, the controls stay usable
        browser.set_window_size(390, 844)
        WebDriverWait(browser, 10).until(lambda d: d.execute_script("return window.innerWidth") <= 400)
        assert browser.execute_script("return document.documentElement.scrollWidth <= window.innerWidth + 1")
        live_view, box = browser.find_element(By.ID, "overlay"), browser.find_element(By.ID, "instruction")
        assert box.is_displayed() and box.size["width"] >= 250
        assert box.location["y"] >= live_view.location["y"] + live_view.size["height"] - 1  # stacked below
        browser.save_screenshot(str(tmp_path / "console-phone.png"))
    finally:
        browser.set_window_size(1280, 760)
    assert not _severe_console_errors(browser)


@pytest.mark.slow
def test_browser_on_a_non_loopback_bind_is_refused_without_the_token(live, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    server = ConsoleServer(live.core, host="0.0.0.0", port=0).start_in_thread()
    try:
        plain = f"http://127.0.0.1:{server.port}/"
        browser.get(plain)
        assert "unauthorized" in browser.find_element(By.TAG_NAME, "body").text
        browser.get(f"{plain}?token={server.token}")  # sets the console's cookie; the page drops it from the URL
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "link").text == "live")
        assert "token" not in browser.current_url
        browser.refresh()  # the cookie alone lets the page and its WebSocket in
        WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "link").text == "live"
                                         and "frames" in d.find_element(By.ID, "frameinfo").text)
    finally:
        server.stop_thread()


@pytest.mark.slow
def test_foxglove_client_asks_on_the_instruction_channel_and_gets_annotations(live):
    size = live.source.size
    before = live.core.state()["request"]

    async def session() -> tuple[dict, Any, list[str]]:
        async with FoxgloveClient(f"ws://127.0.0.1:{live.foxglove.port}") as fox:
            await fox.wait_channels({"/lisa/image", "/lisa/annotations", "/lisa/result", "/lisa/answer"})
            assert "clientPublish" in fox.info["capabilities"] and "json" in fox.info["supportedEncodings"]
            annotations_sub = await fox.subscribe("/lisa/annotations")
            await fox.subscribe("/lisa/result")
            await fox.subscribe("/lisa/image")
            channel = await fox.advertise("/lisa/instruction")  # handled before the next message on this socket
            await fox.publish(channel, json.dumps({"data": QUERY}).encode())
            result, annotations, seen = None, {}, set()
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline:
                topic, log_time, message = await fox.next_message(deadline - time.monotonic())
                seen.add(topic)
                if topic == "/lisa/annotations":
                    annotations[log_time] = message
                elif topic == "/lisa/result" and message["request"] > before and message["origin"] == "instruction":
                    result = message
                if result is not None:
                    stamp = result["stamp"]["sec"] * 10**9 + result["stamp"]["nanosec"]
                    if stamp in annotations:
                        assert annotations_sub
                        return result, annotations[stamp], sorted(seen)
            raise AssertionError(f"no annotations for the answer (result: {result is not None}, topics: {seen})")

    result, annotations, topics = asyncio.run(session())
    assert "/lisa/image" in topics
    assert result["labels"] == ["knife"] and result["query"] == QUERY
    assert_result_schema(result)
    ts = annotations.timestamp
    assert ts.seconds * 10**9 + ts.nanos == result["stamp"]["sec"] * 10**9 + result["stamp"]["nanosec"]
    polygons = annotation_polygons(annotations)
    assert polygons, "no polygon outlines"
    for polygon in polygons:
        assert len(polygon) >= 3
        assert (polygon >= 0).all() and (polygon[:, 0] <= size[1]).all() and (polygon[:, 1] <= size[0]).all()
    assert [t.text for t in annotations.texts][0].startswith("1 knife")
    assert len(annotations.circles) == 1  # the centroid
    knife = next(o.mask for o in live.source.ground_truth(result["frame_seq"]) if o.category == "knife")
    assert iou(polygons_mask(polygons, size), knife) >= 0.5


@pytest.mark.slow
@pytest.mark.parametrize("stop, code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)], ids=["ctrl-c", "sigterm"])
def test_console_command_serves_records_and_stops_on_ctrl_c(tiny_checkpoint, tmp_path, stop, code):
    """Ctrl-C, and SIGTERM as a service manager sends it, both stop the console with a complete recording."""
    from mcap.reader import make_reader

    record = tmp_path / "run.mcap"
    cmd = [sys.executable, "-m", "lisa_agent.cli", "console", "--source", "synthetic", "--model", str(tiny_checkpoint),
           "--device", "cpu", "--port", "0", "--size", "120x160", "--mode", "fast", "--foxglove-port", "0",
           "--record", str(record)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    errors: list[str] = []
    stderr = threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
    stderr.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # until the console says where it serves (or the process ends)
            lines.append(line)
            if line.startswith("open http://"):
                break
        url = next((m.group(1) for m in (re.search(r"^open (http://\S+)", x) for x in lines) if m), None)
        assert url, (lines, errors)
        threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()  # type: ignore[arg-type]
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        server = SimpleNamespace(port=port)
        # the page serves before the source's first frame: wait for the frame, as the page does
        while call(server, "GET", "/api/state")[2]["counts"]["frames"] == 0:
            assert proc.poll() is None, (lines, errors)
            time.sleep(0.05)
        status, _, answer = call(server, "POST", "/api/instruction", {"text": "the yellow mug"})
        assert status == 200 and answer["mode"] == "fast"
        assert any(line.startswith("Foxglove: ws://127.0.0.1:") for line in lines)
        proc.send_signal(stop)
        assert proc.wait(600) == code  # the exit is the event: the bound only stops a hung process
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)
    stderr.join(60)  # the pipe's end: everything the process wrote has been read
    assert any(line.startswith("recorded ") for line in errors), errors
    with open(record, "rb") as f:  # a complete MCAP: its summary (written at close) is there
        topics = {c.topic for c in make_reader(f).get_summary().channels.values()}
    assert {"/lisa/image", "/lisa/annotations", "/lisa/answer", "/lisa/request"} <= topics


def test_static_assets_ship_with_the_package():
    from lisa_agent.console.web import ASSETS, STATIC_DIR

    for name in ASSETS:
        assert (STATIC_DIR / name).is_file(), name
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"console/static/*"' in pyproject  # package data: pip installs the page with the library
    html = (STATIC_DIR / "index.html").read_text()
    assert "http://" not in html and "https://" not in html  # no CDN: every asset is local

"""The MCP server (``lisa-agent mcp``): tools, resources, errors and transports, all real.

The SDK's own clients talk to it: ``mcp.Client(server)`` in process, its streamable-HTTP client over a real
socket, and (slow) its stdio client launching ``python -m lisa_agent.cli mcp`` as a process. The model is the
bundled trained ``tabletop-tiny`` on the synthetic scene the demo shows (test scene 2, in which it finds the
knife, IoU ~0.83 in every phase of the camera's motion), so the answers are checked against the rendered
ground truth, not just their shape. Waits end at events (a frame, an answer); none asserts a duration.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx2
import jsonschema
import numpy as np
import pytest
from helpers import assert_result_schema, http_call, iou
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from PIL import Image

from lisa_agent.console.sources import SyntheticSource
from lisa_agent.encoders import rle_to_mask
from lisa_agent.errors import InvalidArgumentError
from lisa_agent.integrations.langchain import LisaExplainTool, LisaSegmentTool
from lisa_agent.integrations.mcp import FRAME_URI, RESULT_URI, build_server
from lisa_agent.integrations.mcp_http import MCPHttpServer
from lisa_agent.integrations.tool_io import EXPLAIN_DESCRIPTION, QUERY_HELP, SEGMENT_DESCRIPTION
from lisa_agent.integrations.tool_session import MAX_INLINE_IMAGE_BYTES, ToolSession
from lisa_agent.result import RESULT_SCHEMA_PATH

QUERY = "grab something to cut with"
REPO = Path(__file__).resolve().parents[1]
TOOLS = {"look", "segment_objects", "explain_objects", "track"}

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def engine() -> Any:
    from lisa_agent import LisaSegmenter

    return LisaSegmenter.from_pretrained("tabletop-tiny", dtype="fp32", device="cpu")


@pytest.fixture(scope="module")
def live(engine: Any) -> Iterator[SimpleNamespace]:
    """A session over the trained model and the demo's scene (480x640, moving slowly), with its MCP server."""
    source = SyntheticSource(fps=5.0)
    session = ToolSession(engine, source, model_name="tabletop-tiny").start()
    session.latest(30.0)
    try:
        yield SimpleNamespace(session=session, source=source, server=build_server(session))
    finally:
        session.close()


def decode(content: Any) -> np.ndarray:
    """An MCP image content block -> HxWx3 uint8 RGB."""
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(content.data))).convert("RGB"))


def knife(source: SyntheticSource, seq: int) -> np.ndarray:
    return next(o.mask for o in source.ground_truth(seq) if o.category == "knife")


def error_of(result: Any) -> dict[str, str]:
    """The tool error's ``{"code", "message", "advice"}``; the text the model reads is the same sentence."""
    assert result.is_error, result
    error = result.structured_content["error"]
    assert error["message"].rstrip(". ") in result.content[0].text and error["advice"] in result.content[0].text
    return dict(error)


async def assert_finds_the_knife(client: Client, source: SyntheticSource, min_iou: float = 0.6,
                                 **arguments: Any) -> dict[str, Any]:
    """segment_objects(QUERY) answers with one mask on the knife of the frame it names (IoU with the rendered truth
    at least ``min_iou``; the model's own is ~0.83); returns its structured content."""
    result = await client.call_tool("segment_objects", {"instruction": QUERY, **arguments})
    assert not result.is_error, result.content
    answer = assert_result_schema(result.structured_content)
    assert answer["query"] == QUERY and len(answer["masks"]) == 1 and answer["labels"] == ["mask 1"]
    assert answer["frame_seq"] is not None
    truth = knife(source, answer["frame_seq"])
    assert iou(rle_to_mask(answer["masks"][0]["rle"]), truth) >= min_iou
    text, overlay = result.content
    assert text.text.startswith(f'Found 1 object for "{QUERY}" in camera frame {answer["frame_seq"]}')
    assert overlay.mime_type == "image/jpeg" and decode(overlay).shape == (480, 640, 3)
    return answer


# ----------------------------------------------------------------------------------------- in process
async def test_tools_speak_the_langchain_tools_words_and_publish_the_result_schema(live):
    async with Client(live.server) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == TOOLS
    # one wording source: the LangChain tools describe themselves with the same text
    assert tools["segment_objects"].description == SEGMENT_DESCRIPTION == LisaSegmentTool.model_fields["description"].default
    assert tools["explain_objects"].description == EXPLAIN_DESCRIPTION == LisaExplainTool.model_fields["description"].default
    segment = tools["segment_objects"]
    assert segment.input_schema["required"] == ["instruction"]
    assert segment.input_schema["properties"]["instruction"]["description"] == QUERY_HELP
    assert set(segment.input_schema["properties"]) == {"instruction", "frame_seq", "image", "mode"}
    schema = json.loads(RESULT_SCHEMA_PATH.read_text())
    for name in ("segment_objects", "explain_objects"):
        published = tools[name].output_schema
        jsonschema.Draft202012Validator.check_schema(published)
        assert published["required"] == schema["required"] and set(published["properties"]) == set(schema["properties"])
    assert tools["look"].annotations.read_only_hint and not tools["track"].annotations.read_only_hint


async def test_look_returns_the_frame_as_a_png_with_its_number(live):
    async with Client(live.server) as client:
        result = await client.call_tool("look", {})
    assert not result.is_error, result.content
    image, text = result.content
    seen = result.structured_content
    frame = live.session.frame(seen["frame_seq"]).frame
    assert image.mime_type == "image/png" and np.array_equal(decode(image), frame.rgb)  # lossless: the very frame
    assert seen["image_size"] == [480, 640] and seen["frame_id"] == "synthetic_camera_optical_frame"
    assert seen["stamp"] == pytest.approx(frame.stamp.seconds) and f"Camera frame {seen['frame_seq']} " in text.text


async def test_segment_objects_finds_the_knife_on_the_newest_a_named_and_an_inline_frame(live):
    async with Client(live.server) as client:
        newest = await assert_finds_the_knife(client, live.source)
        assert newest["track"] is None and newest["image"] == f"camera frame {newest['frame_seq']}"
        assert newest["masks"][0]["target"] is not None  # the synthetic frames come with depth and intrinsics
        looked = (await client.call_tool("look", {})).structured_content["frame_seq"]
        named = await assert_finds_the_knife(client, live.source, frame_seq=looked)
        assert named["frame_seq"] == looked
        # an image passed inline (the frame of the demo's scene, as a PNG data URI): no frame number, same knife
        png = io.BytesIO()
        Image.fromarray(live.source.render(0).rgb).save(png, format="PNG")
        uri = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        inline = await client.call_tool("segment_objects", {"instruction": QUERY, "image": uri})
        answer = assert_result_schema(inline.structured_content)
        assert answer["frame_seq"] is None and answer["image"] == "the image passed inline"
        assert iou(rle_to_mask(answer["masks"][0]["rle"]), knife(live.source, 0)) >= 0.6
        latest = json.loads((await client.read_resource(RESULT_URI)).contents[0].text)
        assert latest["image"] == "the image passed inline" and assert_result_schema(latest)["masks"] == answer["masks"]
        frame = (await client.read_resource(FRAME_URI)).contents[0]
        assert frame.mime_type == "image/png" and Image.open(io.BytesIO(base64.b64decode(frame.blob))).size == (640, 480)


async def test_explain_objects_answers_in_chat_mode_with_its_masks(live):
    async with Client(live.server) as client:
        result = await client.call_tool("explain_objects", {"instruction": "What here could I cut bread with?"})
    assert not result.is_error, result.content
    answer = assert_result_schema(result.structured_content)
    assert answer["mode"] == "chat" and result.content[0].text.startswith("LISA answered: ")


async def test_track_follows_the_knife_and_segment_objects_reports_the_tracked_masks(live):
    async with Client(live.server) as client:
        started = await client.call_tool("track", {"instruction": QUERY})
        assert not started.is_error, started.content
        assert started.structured_content["tracking"] and started.structured_content["instruction"] == QUERY
        first = assert_result_schema(started.structured_content["result"])
        tracked = await assert_finds_the_knife(client, live.source, min_iou=0.5)  # carried by optical flow
        assert tracked["track"] is not None and tracked["frame_seq"] >= first["frame_seq"]
        # the age counts the frames since the reasoning step the masks come from: 0 exactly when reasoned
        assert (tracked["track"]["source"] == "reasoned") == (tracked["track"]["age_frames"] == 0), tracked["track"]
        other = await client.call_tool("segment_objects", {"instruction": "the yellow mug"})  # not the tracked one
        assert not other.is_error and other.structured_content["track"] is None
        state = await client.call_tool("track", {})  # neither: what is tracked, nothing changed
        assert state.structured_content["tracking"] and state.structured_content["instruction"] == QUERY
        stopped = await client.call_tool("track", {"stop": True})
        assert not stopped.is_error and not stopped.structured_content["tracking"]
        fresh = await assert_finds_the_knife(client, live.source)
        assert fresh["track"] is None


async def test_bad_inputs_are_tool_errors_in_the_library_vocabulary_and_the_server_keeps_serving(engine, tmp_path):
    allowed, elsewhere = tmp_path / "allowed", tmp_path / "elsewhere"
    allowed.mkdir()
    elsewhere.mkdir()
    source = SyntheticSource(fps=5.0)
    for folder in (allowed, elsewhere):
        Image.fromarray(source.render(0).rgb).save(folder / "scene.png")
    session = ToolSession(engine, source, image_folders=[allowed]).start()
    try:
        async with Client(build_server(session)) as client:
            async def good() -> None:  # after every refusal, a good call is answered
                result = await client.call_tool("segment_objects", {"instruction": QUERY,
                                                                    "image": str(allowed / "scene.png")})
                assert not result.is_error and iou(rle_to_mask(result.structured_content["masks"][0]["rle"]),
                                                   knife(source, 0)) >= 0.6

            await good()
            assert error_of(await client.call_tool("segment_objects", {"instruction": "   "}))["code"] == "invalid_query"
            huge = "data:image/png;base64," + "A" * (50 * 1024 * 1024)  # refused by its size, before decoding
            error = error_of(await client.call_tool("segment_objects", {"instruction": QUERY, "image": huge}))
            assert error["code"] == "too_large" and str(MAX_INLINE_IMAGE_BYTES) in error["message"]
            await good()
            error = error_of(await client.call_tool("segment_objects", {"instruction": QUERY,
                                                                        "image": str(elsewhere / "scene.png")}))
            assert error["code"] == "invalid_image" and "outside the folders" in error["message"]
            error = error_of(await client.call_tool("segment_objects", {"instruction": QUERY,
                                                                        "image": "http://127.0.0.1:9/x.png"}))
            assert error["code"] == "invalid_image" and "not enabled" in error["message"]
            error = error_of(await client.call_tool("segment_objects", {"instruction": QUERY, "frame_seq": 10**9}))
            assert error["code"] == "invalid_argument" and f"frame {10**9} is not one of" in error["message"]
            error = error_of(await client.call_tool("segment_objects", {"instruction": QUERY, "frame_seq": 0,
                                                                        "image": str(allowed / "scene.png")}))
            assert error["code"] == "invalid_argument"
            assert error_of(await client.call_tool("track", {"instruction": ""}))["code"] == "invalid_query"
            # the SDK's own refusals (the schema, the tool's name) speak the same vocabulary
            error = error_of(await client.call_tool("segment_objects", {"instruction": 3}))
            assert error["code"] == "invalid_argument" and "instruction" in error["message"]
            error = error_of(await client.call_tool("segment_objects", {"instruction": QUERY, "mode": "psychic"}))
            assert error["code"] == "invalid_argument" and "mode" in error["message"]
            error = error_of(await client.call_tool("grab", {"instruction": QUERY}))
            assert error["code"] == "unknown_op" and "segment_objects" in error["message"]
            await good()
    finally:
        session.close()


async def test_without_a_camera_look_says_so_and_inline_images_still_work(engine):
    session = ToolSession(engine, None).start()
    try:
        async with Client(build_server(session)) as client:
            assert error_of(await client.call_tool("look", {}))["code"] == "no_frame"
            assert error_of(await client.call_tool("track", {"instruction": QUERY}))["code"] == "source_error"
            png = io.BytesIO()
            Image.fromarray(SyntheticSource().render(0).rgb).save(png, format="PNG")
            uri = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
            result = await client.call_tool("segment_objects", {"instruction": QUERY, "image": uri})
            assert not result.is_error and result.structured_content["frame_seq"] is None
    finally:
        session.close()


# ----------------------------------------------------------------------------------------- HTTP
def _mcp_post(port: int, headers: dict[str, str]) -> tuple[int, Any]:
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {}}
    status, _, payload = http_call(port, "POST", "/mcp", body,
                                   headers={"Accept": "application/json, text/event-stream", **headers})
    return status, payload


async def test_http_on_loopback_serves_this_machine_and_refuses_other_hosts_and_sites(live):
    http = MCPHttpServer(build_server(live.session), port=0).start_in_thread()
    try:
        assert not http.require_token and http.url == f"http://127.0.0.1:{http.port}/mcp"
        async with Client(http.url) as client:
            assert {t.name for t in (await client.list_tools()).tools} == TOOLS
            await assert_finds_the_knife(client, live.source)
            assert error_of(await client.call_tool("segment_objects", {"instruction": ""}))["code"] == "invalid_query"
            assert error_of(await client.call_tool("segment_objects", {}))["code"] == "invalid_argument"
            await assert_finds_the_knife(client, live.source)  # still serving
        status, payload = _mcp_post(http.port, {"Host": "evil.example"})  # DNS rebinding
        assert status == 403 and payload["error"]["code"] == "forbidden_host"
        status, payload = _mcp_post(http.port, {"Origin": "https://evil.example"})
        assert status == 403 and payload["error"]["code"] == "cross_origin"
    finally:
        http.stop_thread()


async def test_http_on_other_addresses_needs_the_token_on_every_request(live):
    with pytest.raises(InvalidArgumentError, match="token must be at least 12"):
        MCPHttpServer(build_server(live.session), host="0.0.0.0", port=0, token="short")
    http = MCPHttpServer(build_server(live.session), host="0.0.0.0", port=0).start_in_thread()
    try:
        assert http.require_token and len(http.token or "") >= 12  # none given: one generated (printed by the command)
        for headers in ({}, {"Authorization": "Bearer wrong-token-123456"}, {"Authorization": f"Basic {http.token}"}):
            status, payload = _mcp_post(http.port, headers)
            assert status == 401 and payload["error"]["code"] == "unauthorized", headers
        client_http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {http.token}"},
                                         timeout=httpx2.Timeout(30.0, read=300.0))
        url = f"http://127.0.0.1:{http.port}/mcp"
        async with client_http, Client(streamable_http_client(url, http_client=client_http)) as client:
            result = await client.call_tool("look", {})
            assert not result.is_error and result.structured_content["image_size"] == [480, 640]
    finally:
        http.stop_thread()


def test_command_refuses_a_weak_token_and_a_bad_source_before_loading_a_model(capsys, monkeypatch):
    from lisa_agent.cli import main

    def no_model(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was opened before the arguments were refused")

    monkeypatch.setattr("lisa_agent.backend.open_backend", no_model)

    assert main(["mcp", "--transport", "http", "--bind", "0.0.0.0", "--token", "short"]) == 1
    assert "token must be at least 12" in capsys.readouterr().err
    assert main(["mcp", "--source", "webcam"]) == 1
    assert "unknown source 'webcam'" in capsys.readouterr().err
    assert main(["mcp", "--mode", "reference"]) == 1
    assert "--mode must be one of fast, chat" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- stdio, as hosts launch it
@pytest.mark.slow
async def test_stdio_session_lists_the_tools_and_answers(tmp_path):
    """What a desktop host does: launch ``lisa-agent mcp`` and talk to it over its stdin/stdout."""
    params = StdioServerParameters(command=sys.executable, cwd=str(tmp_path),
                                   args=["-m", "lisa_agent.cli", "mcp", "--source", "synthetic", "--fps", "5",
                                         "--model", "tabletop-tiny", "--device", "cpu"],
                                   env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
    with open(tmp_path / "stderr.txt", "w") as errlog:
        from mcp.client.stdio import stdio_client

        async with Client(stdio_client(params, errlog=errlog)) as client:
            assert {t.name for t in (await client.list_tools()).tools} == TOOLS
            assert error_of(await client.call_tool("segment_objects", {}))["code"] == "invalid_argument"
            await assert_finds_the_knife(client, SyntheticSource())
    assert "lisa-agent mcp: synthetic tabletop" in (tmp_path / "stderr.txt").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("stop, code", [(signal.SIGINT, 130), (signal.SIGTERM, 0)], ids=["ctrl-c", "sigterm"])
async def test_http_command_serves_until_ctrl_c_or_sigterm(tmp_path, stop, code):
    cmd = [sys.executable, "-m", "lisa_agent.cli", "mcp", "--transport", "http", "--port", "0", "--source", "synthetic",
           "--size", "120x160", "--model", "tabletop-tiny", "--device", "cpu"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        url = next((line.split()[2] for line in proc.stdout if line.startswith("MCP endpoint ")), None)  # it listens
        assert url, proc.wait(60)
        async with Client(url) as client:
            result = await client.call_tool("look", {})
            assert not result.is_error and result.structured_content["image_size"] == [120, 160]
        proc.send_signal(stop)
        assert proc.wait(600) == code  # the exit is the event: the bound only stops a hung process
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(60)


@pytest.mark.slow
def test_command_without_the_sdk_says_which_extra_to_install(tmp_path):
    """With ``mcp`` not importable, the command fails with one line naming the extra (exit 1), not a traceback."""
    (tmp_path / "mcp").mkdir()
    (tmp_path / "mcp" / "__init__.py").write_text("raise ImportError('no mcp here')\n")
    env = {"PYTHONPATH": f"{tmp_path}:{REPO}", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "lisa_agent.cli", "mcp", "--source", "none"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "pip install 'lisa-agent[mcp]'" in proc.stderr, proc.stderr


class _FastCamera:
    """A camera far faster than any caller (each read is a new numbered frame at once); ``passed(n)`` is set once
    frame ``n`` was read. A stand-in for a 30 Hz camera, which the MCP tests' synthetic source (5 Hz) is not."""

    def __init__(self) -> None:
        import threading

        self.seq = -1
        self._passed: dict[int, threading.Event] = {}
        self._lock = threading.Lock()

    def passed(self, n: int) -> Any:
        import threading

        with self._lock:
            event = self._passed.setdefault(n, threading.Event())
            if self.seq >= n:
                event.set()
            return event

    def read(self, timeout: float = 1.0) -> Any:
        from lisa_agent.console.sources import SourceFrame
        from lisa_agent.frames import Frame

        with self._lock:
            self.seq += 1
            for n, event in self._passed.items():
                if self.seq >= n:
                    event.set()
        pixels = np.full((8, 8, 3), self.seq % 256, np.uint8)
        return SourceFrame(self.seq, Frame(pixels))

    def describe(self) -> str:
        return "a fast test camera"

    def close(self) -> None:
        return None


def test_a_frame_handed_out_stays_nameable_however_fast_the_camera_runs(engine):
    """``look`` then ``segment_objects(frame_seq=...)``: the host's model thinks for seconds meanwhile, a 30 Hz camera
    moves on by a hundred frames; the frame it was given is still there (the last 16 handed out are kept), frames
    nobody was given are not, and the error names what is kept."""
    camera = _FastCamera()
    session = ToolSession(engine, camera).start()
    try:
        looked = session.latest(30.0)
        assert camera.passed(looked.seq + 500).wait(60)
        assert session.frame(looked.seq) is looked
        with pytest.raises(InvalidArgumentError, match=f"frame {looked.seq + 1} is not one of") as info:
            session.frame(looked.seq + 1)  # never handed out
        assert str(looked.seq) in str(info.value)
        handed = {looked.seq: looked}
        while len(handed) < 17:  # 16 more handed out: the first is forgotten, the others stay
            assert camera.passed(max(handed) + 2).wait(60)  # read and stored: the pump holds the next one
            got = session.latest(30.0)
            handed[got.seq] = got
        with pytest.raises(InvalidArgumentError, match="is not one of"):
            session.frame(looked.seq)
        assert all(session.frame(seq) is got for seq, got in handed.items() if seq != looked.seq)
    finally:
        session.close()

"""The doors with a reasoner behind them, unchanged: the LangChain tool, the MCP server (in process, the SDK's
own client) and the web console answer with the reasoner's masks, its boxes and points and its reasoning; the ZeroMQ server's test is
in test_reasoner_backend.py. The reasoner is the tiny random-weight one of the tests, so its generation is replaced
by a forced answer (the tokens a trained model would write); everything else is the real path. What a door adds
(text, schema, frame numbers) is checked against what the reasoner itself returns for the same frame."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from helpers import assert_result_schema, force_generation

from lisa_agent.backend import open_backend
from lisa_agent.encoders import rle_to_mask

#: A VisionReasoner answer with one object, the box (840 x 840 square) in the middle of the frame.
ANSWER = ('<think>A knife cuts; the mug does not.</think><answer>[{"bbox_2d": [300,300,540,560], '
          '"point_2d": [420,430]}]</answer>')
QUERY = "grab something to cut with"

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def reasoner(tmp_path_factory) -> Any:
    from lisa_agent.reasoner.tiny import make_tiny_reasoner, make_tiny_sam2

    root = tmp_path_factory.mktemp("doors")
    folder, sam = make_tiny_reasoner(root / "VisionReasoner-tiny"), make_tiny_sam2(root / "sam2")
    return open_backend(str(folder), sam_model=str(sam), device="cpu")


def frame() -> np.ndarray:
    from lisa_agent.data.tabletop import render_scene

    return render_scene(5, (240, 320)).image


def expected_box(h: int, w: int) -> list[int]:
    """ANSWER's box in frame pixels (VisionReasoner's rounding)."""
    return [int(300 * w / 840 + 0.5), int(300 * h / 840 + 0.5), int(540 * w / 840 + 0.5), int(560 * h / 840 + 0.5)]


def test_the_langchain_tool_answers_with_the_reasoners_mask_and_reasoning(reasoner, monkeypatch):
    from langchain_core.messages import ToolMessage

    from lisa_agent.integrations.langchain import LisaSegmentTool

    force_generation(reasoner, monkeypatch, ANSWER)
    rgb = frame()
    direct = reasoner.segment(rgb, QUERY)
    tool = LisaSegmentTool(backend=reasoner, image_source=lambda: (rgb, 1732650000.25))
    msg = tool.invoke({"name": tool.name, "args": {"query": QUERY}, "id": "call-1", "type": "tool_call"})
    assert isinstance(msg, ToolMessage) and msg.status != "error", msg.content
    result = assert_result_schema(msg.artifact["result"])
    assert len(result["masks"]) == 1 and result["masks"][0]["prompts"][0]["box"] == expected_box(240, 320)
    assert np.array_equal(rle_to_mask(result["masks"][0]["rle"]), direct.masks[0])
    assert result["reasoning"]["think"] == "A knife cuts; the mug does not." and result["text"] == direct.text
    assert msg.content.startswith(f'Found 1 object for "{QUERY}" in the newest camera frame (320x240 px, stamp '
                                  f"1732650000.250). The reasoner answered: {direct.text!r}.")  # not "LISA answered"
    assert result["stamp"] == {"sec": 1732650000, "nanosec": 250000000}


def test_the_langchain_tool_says_plainly_when_the_reasoner_finds_nothing(reasoner, monkeypatch):
    from lisa_agent.integrations.langchain import LisaSegmentTool

    force_generation(reasoner, monkeypatch, "<think>No blade here.</think><answer>[]</answer>")
    rgb = frame()
    tool = LisaSegmentTool(backend=reasoner, image_source=lambda: rgb)
    msg = tool.invoke({"name": tool.name, "args": {"query": QUERY}, "id": "call-2", "type": "tool_call"})
    result = msg.artifact["result"]
    assert result["masks"] == [] and result["reasoning"]["status"] == "empty"
    assert f'No object matched "{QUERY}"' in msg.content
    assert f'The reasoner answered: \'Nothing in this frame matches "{QUERY}"' in msg.content


async def test_mcp_segment_objects_answers_with_the_reasoners_mask(reasoner, monkeypatch):
    from mcp import Client

    from lisa_agent.console.sources import SyntheticSource
    from lisa_agent.integrations.mcp import build_server
    from lisa_agent.integrations.tool_session import ToolSession

    force_generation(reasoner, monkeypatch, ANSWER)
    session = ToolSession(reasoner, SyntheticSource(fps=5.0), model_name="VisionReasoner-tiny").start()
    try:
        session.latest(30.0)
        async with Client(build_server(session)) as client:
            result = await client.call_tool("segment_objects", {"instruction": QUERY})
            assert not result.is_error, result.content
            answer = assert_result_schema(result.structured_content)
            seen = session.frame(answer["frame_seq"]).frame
            direct = reasoner.segment(seen.rgb, QUERY)
            assert len(answer["masks"]) == 1 and answer["masks"][0]["prompts"][0]["box"] == expected_box(480, 640)
            assert np.array_equal(rle_to_mask(answer["masks"][0]["rle"]), direct.masks[0])
            assert answer["reasoning"]["status"] == "ok" and answer["text"] == direct.text
            assert result.content[0].text.startswith(f'Found 1 object for "{QUERY}" in camera frame')
    finally:
        session.close()


def test_the_console_answers_an_instruction_with_the_reasoners_mask_and_reasoning(reasoner, monkeypatch):
    """The web console's ``POST /api/instruction`` with a reasoner behind it: the result schema with the reasoner's
    box, reasoning and mask on the frame it answered; its overlay frame is served."""
    from helpers import http_call

    from lisa_agent.console.core import ConsoleCore
    from lisa_agent.console.sources import SyntheticSource
    from lisa_agent.console.web import ConsoleServer
    from lisa_agent.options import QueryOptions

    force_generation(reasoner, monkeypatch, ANSWER)
    core = ConsoleCore(reasoner, SyntheticSource(size=(120, 160), fps=20.0), query=QueryOptions(mode="fast"),
                       model_name="VisionReasoner-tiny")
    server = ConsoleServer(core, port=0).start_in_thread()
    try:
        core.wait_for_frame(10.0)
        status, _, answer = http_call(server.port, "POST", "/api/instruction", {"text": QUERY, "mode": "fast"},
                                      timeout=180.0)
        assert status == 200, answer
        assert_result_schema(answer)
        assert answer["query"] == QUERY and answer["image_size"] == [120, 160]
        assert answer["masks"][0]["prompts"][0]["box"] == expected_box(120, 160)
        assert answer["reasoning"]["think"] == "A knife cuts; the mug does not." and answer["reasoning"]["status"] == "ok"
        status, headers, jpeg = http_call(server.port, "GET", "/api/frame.jpg", timeout=60.0)
        assert status == 200 and headers["content-type"] == "image/jpeg" and jpeg[:2] == b"\xff\xd8"
    finally:
        server.stop_thread()
        core.close()

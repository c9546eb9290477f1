"""LisaSegmentTool / LisaExplainTool on the tiny LISA checkpoint: content, artifact, images, depth, errors.

The backend is the real engine (``tiny_segmenter``, random weights): these tests check that what
the tool reports (text for the model, masks in the artifact) is exactly what the engine returned
for the same frame and query, that every image form the model may name reaches the engine as the
same pixels, and that every failure becomes an actionable message instead of an exception.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import assert_result_schema, serve_png
from langchain_core.messages import ToolMessage

from lisa_agent.encoders import image_to_png, rle_to_mask
from lisa_agent.geometry import Intrinsics, Target, depth_to_meters, mask_target
from lisa_agent.integrations.images import ImageAccess, load_image
from lisa_agent.integrations.langchain import LisaExplainTool, LisaSegmentTool, describe_result, lisa_tools
from lisa_agent.options import QueryOptions
from lisa_agent.result import SegmentationResult

QUERY = "something to cut with"


def _frame() -> np.ndarray:
    """A fixed 96x128 RGB frame with some structure (a dark handle, a bright blade)."""
    img = np.full((96, 128, 3), 150, dtype=np.uint8)
    img[40:52, 20:60] = (60, 40, 30)
    img[42:50, 60:110] = (220, 220, 230)
    img[70:90, 5:30] = (30, 120, 200)
    return img


def _call(tool: Any, args: dict[str, Any]) -> ToolMessage:
    """Invoke as an agent would: with a ToolCall, so the reply is a ToolMessage with the artifact."""
    msg = tool.invoke({"name": tool.name, "args": args, "id": "call-1", "type": "tool_call"})
    assert isinstance(msg, ToolMessage)
    return msg


async def _acall(tool: Any, args: dict[str, Any]) -> ToolMessage:
    msg = await tool.ainvoke({"name": tool.name, "args": args, "id": "call-1", "type": "tool_call"})
    assert isinstance(msg, ToolMessage)
    return msg


@pytest.fixture
def frame() -> np.ndarray:
    return _frame()


@pytest.fixture
def tool(tiny_segmenter: Any, frame: np.ndarray) -> LisaSegmentTool:
    return LisaSegmentTool(backend=tiny_segmenter, image_source=lambda: (frame, 1732650000.25))


def _assert_matches_engine(msg: ToolMessage, expected: Any) -> None:
    """The tool's content and artifact report exactly the engine's result for the same input."""
    assert msg.status == "success", msg.content
    art = msg.artifact
    result = assert_result_schema(art["result"])  # the one result schema, as every door emits it
    assert result["text"] == expected.text
    assert result["image_size"] == list(expected.image_size)
    np.testing.assert_array_equal(art["masks"], expected.masks)
    assert len(result["masks"]) == len(expected.instances)
    for k, (obj, inst) in enumerate(zip(result["masks"], expected.instances, strict=True)):
        assert obj["bbox"] == list(inst.bbox)
        assert obj["area"] == inst.area
        np.testing.assert_array_equal(rle_to_mask(obj["rle"]), expected.masks[k])
    assert art["segmentation"].text == expected.text
    found = [i for i in expected.instances if i.area > 0]
    if msg.name == "explain_objects":
        assert msg.content.startswith(f"LISA answered: {expected.text.strip()!r}.\nIt points at {len(found)} object")
    elif found:
        assert msg.content.startswith(f"Found {len(found)} object")
    else:
        assert msg.content.startswith("No object matched")
    for inst in found:
        assert f"[{', '.join(str(v) for v in inst.bbox)}]" in msg.content
        assert f"{100.0 * inst.area / (expected.image_size[0] * expected.image_size[1]):.1f}" in msg.content


def test_camera_frame_result_matches_engine(tool: LisaSegmentTool, tiny_segmenter: Any, frame: np.ndarray) -> None:
    msg = _call(tool, {"query": QUERY})
    expected = tiny_segmenter.segment(frame, QUERY, mode="fast")
    _assert_matches_engine(msg, expected)
    assert len(expected.instances) == 1  # fast mode forces exactly one [SEG]
    assert f'"{QUERY}" in the newest camera frame (128x96 px, stamp 1732650000.250)' in msg.content
    assert expected.text in msg.content
    art = msg.artifact
    result = art["result"]
    assert result["stamp"] == {"sec": 1732650000, "nanosec": 250_000_000}  # the camera's stamp, carried over
    assert result["mode"] == "fast" and result["query"] == QUERY
    assert art["masks"].dtype == bool and art["masks"].shape == (1, 96, 128)
    assert art["tool_ms"]["total"] >= art["tool_ms"]["image"] >= 0 and "total" in result["timings_ms"]


def test_invoke_without_tool_call_returns_the_text(tool: LisaSegmentTool) -> None:
    text = tool.invoke({"query": QUERY})  # no ToolCall: LangChain returns the content only
    assert isinstance(text, str)
    assert text.startswith(("Found 1 object", "No object matched"))


@pytest.mark.parametrize("form", ["path", "file_url", "data_uri", "http_url"])
def test_named_image_reaches_the_engine_unchanged(
    form: str, tiny_segmenter: Any, frame: np.ndarray, tmp_path: Path, http_image: str
) -> None:
    png = tmp_path / "frame.png"
    png.write_bytes(image_to_png(frame))
    ref = {
        "path": str(png),
        "file_url": png.as_uri(),
        "data_uri": "data:image/png;base64," + base64.b64encode(image_to_png(frame)).decode(),
        "http_url": http_image,
    }[form]
    # A camera with another frame is configured: the named image must win.
    other = np.zeros_like(frame)
    tool = LisaSegmentTool(backend=tiny_segmenter, image_source=lambda: other, image_folders=[tmp_path],
                           image_hosts=["127.0.0.1"])
    msg = _call(tool, {"query": QUERY, "image": ref})
    _assert_matches_engine(msg, tiny_segmenter.segment(frame, QUERY, mode="fast"))
    assert "camera" not in msg.content


def test_load_image_converts_gray_and_rgba_to_rgb(tmp_path: Path) -> None:
    from PIL import Image

    gray = np.arange(20 * 30, dtype=np.uint8).reshape(20, 30)
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    access = ImageAccess.of([tmp_path])
    g = load_image(str(tmp_path / "g.png"), access=access)
    a = load_image(str(tmp_path / "a.png"), access=access)
    assert g.shape == (20, 30, 3) and g.dtype == np.uint8
    np.testing.assert_array_equal(g[..., 1], gray)
    assert a.shape == (20, 30, 3) and (a[..., 0] == 200).all() and (a[..., 1:] == 0).all()


def test_depth_and_intrinsics_give_a_3d_point(tiny_segmenter: Any, frame: np.ndarray) -> None:
    depth = np.full(frame.shape[:2], 750, dtype=np.uint16)  # millimetres
    depth[:, 64:] = 0  # no reading on the right half
    intr = (100.0, 110.0, 64.0, 48.0)
    tool = LisaSegmentTool(backend=tiny_segmenter, image_source=lambda: frame, depth_source=lambda: depth,
                           intrinsics=intr)
    msg = _call(tool, {"query": QUERY})
    mask = tiny_segmenter.segment(frame, QUERY).masks[0]
    target = mask_target(depth_to_meters(depth), mask, Intrinsics(*intr))
    entry = assert_result_schema(msg.artifact["result"])["masks"][0]["target"]
    if target is None:  # the random mask fell entirely on the right half
        assert entry is None and "no valid depth" in msg.content
    else:
        assert entry["point"] == pytest.approx(list(target.point), abs=1e-4)
        assert entry["point"][2] == pytest.approx(0.75) and entry["depth_m"] == pytest.approx(0.75)
        x, y, _ = msg.artifact["segmentation"].targets[0].point
        assert f"3D point (x={x:.3f}, y={y:.3f}, z=0.750) m in the camera frame" in msg.content


def test_depth_of_another_size_is_reported_not_used(tiny_segmenter: Any, frame: np.ndarray) -> None:
    tool = LisaSegmentTool(backend=tiny_segmenter, image_source=lambda: frame,
                           depth_source=lambda: np.ones((48, 64), np.float32), intrinsics=(100, 100, 64, 48))
    msg = _call(tool, {"query": QUERY})
    assert msg.status == "success"
    assert "3D points unavailable or partial: depth image is 48x64 but the colour image is 96x128" in msg.content
    result = assert_result_schema(msg.artifact["result"])
    assert all(m["target"] is None for m in result["masks"]) and "48x64" in result["depth_note"]


@pytest.mark.parametrize(("depth_stamp", "refused"), [(1732650000.45, True), (1732650000.05, True),
                                                      (1732650000.27, False)])
def test_depth_from_another_instant_is_refused(tiny_segmenter: Any, frame: np.ndarray, depth_stamp: float,
                                              refused: bool) -> None:
    """Colour stamped 1732650000.25; depth 200 ms later or earlier is another instant (tolerance 50 ms):
    no 3D point, and the text says why. Depth 20 ms later is the same instant."""
    depth = np.full(frame.shape[:2], 750, dtype=np.uint16)
    tool = LisaSegmentTool(backend=tiny_segmenter, image_source=lambda: (frame, 1732650000.25),
                           depth_source=lambda: (depth, depth_stamp), intrinsics=(100.0, 110.0, 64.0, 48.0),
                           depth_tolerance_s=0.05)
    msg = _call(tool, {"query": QUERY})
    assert msg.status == "success"
    result = assert_result_schema(msg.artifact["result"])
    if refused:
        assert all(m["target"] is None for m in result["masks"])
        side = "after" if depth_stamp > 1732650000.25 else "before"
        assert f"depth image is from 0.200 s {side} the colour frame (tolerance 0.05 s)" in result["depth_note"]
        assert result["depth_note"] in msg.content and "3D point (x=" not in msg.content
    else:
        assert result["depth_note"] is None
        assert result["masks"][0]["target"]["point"][2] == pytest.approx(0.75)
        assert "3D point (x=" in msg.content


def test_failing_depth_source_still_gives_the_2d_answer(tiny_segmenter: Any, frame: np.ndarray) -> None:
    def broken_depth() -> np.ndarray:
        raise TimeoutError("no depth frame for 2 s")

    tool = LisaSegmentTool(backend=tiny_segmenter, image_source=lambda: frame, depth_source=broken_depth,
                           intrinsics=(100, 100, 64, 48))
    msg = _call(tool, {"query": QUERY})
    _assert_matches_engine(msg, tiny_segmenter.segment(frame, QUERY))
    assert ("3D points unavailable or partial: the depth source failed (TimeoutError: no depth frame for 2 s)."
            in msg.content)


def test_no_match_says_so_plainly(tiny_segmenter: Any, frame: np.ndarray) -> None:
    # The engine's fast mode with a forced answer without [SEG]: the real engine, no test double.
    tool = LisaSegmentTool(backend=tiny_segmenter, image_source=lambda: frame,
                           query_options=QueryOptions(answer="Sorry, nothing matches."))
    msg = _call(tool, {"query": "a unicorn"})
    assert msg.status == "success"
    assert msg.content.startswith('No object matched "a unicorn" in the newest camera frame (128x96 px)')
    assert "Sorry, nothing matches." in msg.content
    assert msg.artifact["masks"].shape == (0, 96, 128) and msg.artifact["result"]["masks"] == []


def test_explain_tool_runs_chat_mode(tiny_segmenter: Any, frame: np.ndarray) -> None:
    seg_tool, explain = lisa_tools(tiny_segmenter, image_source=lambda: frame,
                                   query_options=QueryOptions(max_new_tokens=8))
    assert isinstance(explain, LisaExplainTool) and explain.name == "explain_objects"
    assert seg_tool.name == "segment_objects"
    assert "mode" not in explain.tool_call_schema.model_json_schema()["properties"]
    msg = _call(explain, {"query": "What here could cut a rope, and why?"})
    expected = tiny_segmenter.segment(frame, "What here could cut a rope, and why?", mode="chat", max_new_tokens=8)
    assert msg.artifact["result"]["mode"] == "chat"
    _assert_matches_engine(msg, expected)


def test_describe_result_numbers_objects_as_the_artifact_does() -> None:
    masks = np.zeros((3, 20, 40), dtype=bool)
    masks[0, 2:6, 3:13] = True  # 40 px = 5% of 800
    masks[2, 10:20, 30:40] = True  # mask 1 stays empty
    result = SegmentationResult.from_masks(masks, [0.9, 0.1, 0.8], text="[SEG] [SEG] [SEG]", query="tools",
                                           mode="chat", image_size=(20, 40),
                                           targets=[Target(0.5, (0.1, 0.2, 0.5), (7.5, 3.5), 40), None, None])
    text = describe_result(result, source="the newest camera frame")
    lines = text.splitlines()
    assert lines[0] == "Found 2 objects for \"tools\" in the newest camera frame (40x20 px). LISA answered: " \
                       "'[SEG] [SEG] [SEG]'."
    assert lines[1] == "1 of LISA's 3 mask(s) came out empty."
    assert lines[2] == ("Object 1: bbox [x1, y1, x2, y2] = [3, 2, 12, 5] px, 5.0% of the image, centroid "
                        "(x=7.5, y=3.5) px, mask score 0.90, 3D point (x=0.100, y=0.200, z=0.500) m in the "
                        "camera frame.")
    assert lines[3].startswith("Object 3: bbox [x1, y1, x2, y2] = [30, 10, 39, 19] px, 12.5% of the image")
    short = describe_result(result, source="x", max_listed=1)
    assert "Object 3" not in short and short.endswith("1 more object(s) are in the artifact only.")


def test_schema_tells_the_model_what_to_pass(tool: LisaSegmentTool) -> None:
    schema = tool.tool_call_schema.model_json_schema()
    assert schema["required"] == ["query"]
    props = schema["properties"]
    assert "something to cut with" in props["query"]["description"]
    assert "data URI" in props["image"]["description"] and "camera frame" in props["image"]["description"]
    assert {"enum": ["fast", "chat"], "type": "string"} in props["mode"]["anyOf"]
    assert tool.response_format == "content_and_artifact" and tool.handle_tool_error is True


@pytest.mark.anyio
async def test_async_path_gives_the_same_answer(tool: LisaSegmentTool, tiny_segmenter: Any,
                                                frame: np.ndarray) -> None:
    sync_msg = _call(tool, {"query": QUERY})
    async_msg = await _acall(tool, {"query": QUERY})
    assert async_msg.content == sync_msg.content
    np.testing.assert_array_equal(async_msg.artifact["masks"], sync_msg.artifact["masks"])
    _assert_matches_engine(async_msg, tiny_segmenter.segment(frame, QUERY))


@pytest.mark.anyio
async def test_async_backend_is_awaited(tiny_segmenter: Any, frame: np.ndarray) -> None:
    class AsyncEngine:  # the shape of AsyncLisaClient: an awaitable segment() with the same signature
        def __init__(self) -> None:
            self.calls = 0

        async def segment(self, image: np.ndarray, query: str, options: Any = None, **kw: Any) -> Any:
            self.calls += 1
            return tiny_segmenter.segment(image, query, options, **kw)

        async def info(self) -> dict[str, Any]:
            return tiny_segmenter.info()

    backend = AsyncEngine()
    tool = LisaSegmentTool(backend=tiny_segmenter, async_backend=backend, image_source=lambda: frame)
    msg = await _acall(tool, {"query": QUERY})
    assert backend.calls == 1
    _assert_matches_engine(msg, tiny_segmenter.segment(frame, QUERY))
    # An async-only backend still serves sync invoke (the coroutine runs to completion).
    only_async = LisaSegmentTool(backend=backend, image_source=lambda: frame)
    _assert_matches_engine(_call(only_async, {"query": QUERY}), tiny_segmenter.segment(frame, QUERY))
    assert backend.calls == 2


# ---- errors: always a ToolMessage with status "error" and advice, never an exception ----


@pytest.mark.parametrize(
    ("args", "source", "needle"),
    [
        ({"query": QUERY, "image": "missing.png"}, True, "does not exist"),
        ({"query": QUERY, "image": "UNREADABLE"}, True, "is not a readable image"),
        ({"query": QUERY, "image": "data:image/png;base64,%%%"}, True, "not valid base64"),
        ({"query": QUERY, "image": "ftp://example.org/a.png"}, True, "unsupported image scheme"),
        ({"query": QUERY}, False, "no camera configured: pass `image`"),
        ({"query": "   "}, True, "Invalid query: query is empty"),
        ({}, True, 'Call the tool with {"query":'),
        ({"query": QUERY, "mode": "slow"}, True, "Invalid arguments (mode"),
    ],
    ids=["missing-file", "not-an-image", "bad-data-uri", "bad-scheme", "no-image-no-camera", "empty-query",
         "missing-query", "bad-mode"],
)
def test_errors_become_actionable_messages(
    args: dict[str, Any], source: bool, needle: str, tiny_segmenter: Any, frame: np.ndarray, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "UNREADABLE").write_text("this is not a PNG")
    tool = LisaSegmentTool(backend=tiny_segmenter, image_source=(lambda: frame) if source else None,
                           image_folders=[tmp_path])
    msg = _call(tool, args)
    assert msg.status == "error"
    assert needle in msg.content
    assert "Traceback" not in msg.content and msg.artifact is None


def test_camera_without_a_frame_yet(tiny_segmenter: Any) -> None:
    msg = _call(LisaSegmentTool(backend=tiny_segmenter, image_source=lambda: None), {"query": QUERY})
    assert msg.status == "error" and "has not delivered a frame yet" in msg.content


def test_camera_failure_is_reported(tiny_segmenter: Any) -> None:
    def broken() -> np.ndarray:
        raise RuntimeError("USB camera disconnected")

    msg = _call(LisaSegmentTool(backend=tiny_segmenter, image_source=broken), {"query": QUERY})
    assert msg.status == "error" and "USB camera disconnected" in msg.content


def test_server_down_is_reported(frame: np.ndarray) -> None:
    from lisa_agent.serving.client import LisaClient

    port = _closed_port()
    client = LisaClient(f"tcp://127.0.0.1:{port}", timeout=0.3, retries=1)
    try:
        msg = _call(LisaSegmentTool(backend=client, image_source=lambda: frame), {"query": QUERY})
    finally:
        client.close()
    assert msg.status == "error"
    assert msg.content.startswith("Unavailable: no reply from the LISA server")  # errors.describe_error's words
    assert "retrying now will not help" in msg.content and "Traceback" not in msg.content


def test_construction_rejects_a_backend_without_segment() -> None:
    with pytest.raises(ValueError, match="backend must have a segment"):
        LisaSegmentTool(backend=object())
    with pytest.raises(ValueError, match="intrinsics"):
        LisaSegmentTool(backend=_NullBackend(), intrinsics=(0.0, 1.0, 2.0, 3.0))


def test_backend_returning_garbage_is_reported(frame: np.ndarray) -> None:
    msg = _call(LisaSegmentTool(backend=_NullBackend(), image_source=lambda: frame), {"query": QUERY})
    assert msg.status == "error" and "returned NoneType, not a SegmentationResult" in msg.content


class _NullBackend:
    """A misconfigured backend (returns nothing): checks the tool's guard, not the engine."""

    def segment(self, image: np.ndarray, query: str, options: Any = None, **kw: Any) -> None:
        return None

    def info(self) -> dict[str, Any]:
        return {}


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def http_image(frame: np.ndarray) -> Iterator[str]:
    """An http:// URL on 127.0.0.1 serving the frame as PNG (stops after the test)."""
    with serve_png(image_to_png(frame)) as url:
        yield f"{url}/frame.png"


@pytest.fixture
def lisa_server(tiny_segmenter: Any) -> Iterator[str]:
    """A real `lisa-agent serve` server (ZeroMQ, 127.0.0.1, free port) around the tiny engine."""
    from lisa_agent.serving.server import LisaServer

    with LisaServer(tiny_segmenter, bind="tcp://127.0.0.1:*") as server:
        yield server.endpoint


@pytest.mark.anyio
async def test_remote_backends_through_the_model_server(lisa_server: str, tiny_segmenter: Any,
                                                        frame: np.ndarray) -> None:
    from lisa_agent.serving.client import AsyncLisaClient, LisaClient

    sync_client = LisaClient(lisa_server, timeout=30.0)
    async_client = AsyncLisaClient(lisa_server, timeout=30.0)
    try:
        tool = LisaSegmentTool(backend=sync_client, async_backend=async_client, image_source=lambda: frame)
        expected = tiny_segmenter.segment(frame, QUERY, mode="fast")
        sync_msg = _call(tool, {"query": QUERY})
        async_msg = await _acall(tool, {"query": QUERY})
        _assert_matches_engine(sync_msg, expected)
        _assert_matches_engine(async_msg, expected)
        assert "client_roundtrip" in async_msg.artifact["result"]["timings_ms"]
        # The async client alone serves both paths.
        only_async = LisaSegmentTool(backend=async_client, image_source=lambda: frame)
        _assert_matches_engine(await _acall(only_async, {"query": QUERY}), expected)
    finally:
        sync_client.close()
        async_client.close()

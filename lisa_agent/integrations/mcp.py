"""LISA as an MCP server: any MCP host (desktop assistants, IDE agents, agent SDKs) can see the robot's camera
and get masks.

Built on the official ``mcp`` Python SDK 2.x (:class:`mcp.server.MCPServer`). :func:`build_server` declares,
over a :class:`~lisa_agent.integrations.tool_session.ToolSession`:

- ``look()``: the newest camera frame as a PNG image, with its number (``frame_seq``) and stamp;
- ``segment_objects(instruction, frame_seq?, image?, mode?)``: masks for an implicit instruction on the newest
  frame, a recent frame by number, or an image passed as a data URI (files and URLs only where allowed);
  content: a short text (:func:`~lisa_agent.integrations.tool_io.describe_result`) and the overlay (JPEG);
  structured content: the result schema (``docs/result.md``: masks as COCO RLE, boxes, scores, 3D targets
  when there is depth) plus the envelope keys ``frame_seq``, ``image``, ``labels``, ``tool_ms``;
- ``explain_objects(instruction, frame_seq?, image?)``: the chat-mode answer with its masks;
- ``track(instruction?, stop?)``: start or stop following an instruction on every frame (neither: say what is
  tracked); ``segment_objects`` with the same instruction then answers with the masks tracked to the newest
  frame, and their age.

Resources: ``lisa://frame/latest`` (PNG) and ``lisa://result/latest`` (the result schema, JSON).

Descriptions come from :mod:`lisa_agent.integrations.tool_io`, the wording the LangChain tools use. Every
failure is a tool error (``isError``) whose text is the library's one sentence (``Title: message. Advice``,
:func:`lisa_agent.errors.describe_error`) and whose structured content is ``{"error": {"code", "message",
"advice"}}``; the server keeps serving. Transports: :mod:`lisa_agent.integrations.mcp_http` (streamable HTTP
with the console's access rule) or ``server.run("stdio")``.

Example::

    from mcp import Client
    from lisa_agent import open_backend
    from lisa_agent.console.sources import open_source
    from lisa_agent.integrations.mcp import build_server
    from lisa_agent.integrations.tool_session import ToolSession

    session = ToolSession(open_backend("tabletop-tiny"), open_source("synthetic")).start()
    async with Client(build_server(session)) as client:
        result = await client.call_tool("segment_objects", {"instruction": "grab something to cut with"})

Requires the ``mcp`` SDK (``pip install 'lisa-agent[mcp]'``).
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ResourceError
from mcp.types import CallToolResult, ImageContent, TextContent, ToolAnnotations
from pydantic import BaseModel, Field, RootModel, ValidationError

from .. import __version__
from ..errors import Code, InvalidArgumentError, LisaError, describe_error
from ..images import encode_image_bytes
from ..labels import mask_labels
from ..result import RESULT_SCHEMA_PATH
from .tool_io import (
    EXPLAIN_DESCRIPTION,
    EXPLAIN_IMAGE_HELP,
    EXPLAIN_QUERY_HELP,
    FRAME_SEQ_HELP,
    IMAGE_HELP,
    LOOK_DESCRIPTION,
    MODE_HELP,
    QUERY_HELP,
    SEGMENT_DESCRIPTION,
    TRACK_DESCRIPTION,
    TRACK_INSTRUCTION_HELP,
    TRACK_STOP_HELP,
    describe_result,
)
from .tool_session import ToolAnswer, ToolSession

log = logging.getLogger("lisa_agent.mcp")

__all__ = ["FRAME_URI", "RESULT_URI", "LookOutput", "ResultOutput", "TrackOutput", "build_server"]

FRAME_URI = "lisa://frame/latest"
RESULT_URI = "lisa://result/latest"
#: JPEG quality of the overlay image a segmentation answer carries.
OVERLAY_QUALITY = 85
#: How long a call waits for the camera's first frame (seconds).
FRAME_WAIT_S = 10.0


@functools.lru_cache(maxsize=1)
def result_schema() -> dict[str, Any]:
    """The result schema (``lisa_agent/schemas/result.schema.json``) as the tools publish it: the same schema
    with its ``$defs`` references written out in place (the SDK's schema generator resolves only its own)."""
    schema: dict[str, Any] = json.loads(Path(RESULT_SCHEMA_PATH).read_text())
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                rest = {k: inline(v) for k, v in node.items() if k != "$ref"}
                return {**inline(defs[ref.removeprefix("#/$defs/")]), **rest}
            return {k: inline(v) for k, v in node.items()}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    out: dict[str, Any] = inline(schema)
    return out


class ResultOutput(RootModel[dict[str, Any]]):
    """Structured content of ``segment_objects`` and ``explain_objects``: the result schema and envelope keys.

    Its JSON schema is read from the result schema's file (one declaration, ``docs/result.md``), never copied."""

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: Any, handler: Any) -> dict[str, Any]:
        return dict(result_schema())


class LookOutput(BaseModel):
    """Structured content of ``look``: which frame the image is."""

    frame_seq: int = Field(description="The source's number of the frame; pass it to segment_objects.")
    stamp: float | None = Field(description="When the frame was taken, seconds since the epoch (or null).")
    frame_id: str | None = Field(description="The camera's coordinate frame name, or null.")
    image_size: list[int] = Field(description="[H, W] of the frame, pixels.")
    source: str = Field(description="The frame source, in words.")


class TrackOutput(BaseModel):
    """Structured content of ``track``: what is tracked now and, when it starts, the first masks."""

    tracking: bool = Field(description="Whether an instruction is being tracked now.")
    instruction: str | None = Field(description="The tracked instruction, or null.")
    mode: str | None = Field(description="How LISA answers it (fast or chat), or null.")
    options: dict[str, Any] = Field(description="The tracking options (tracker, reason_every, reason_period_s, "
                                                "min_confidence).")
    result: dict[str, Any] | None = Field(description="The first masks (the result schema), or null.")


Instruction = Annotated[str, Field(description=QUERY_HELP)]
FrameSeq = Annotated[int | None, Field(description=FRAME_SEQ_HELP)]
Image = Annotated[str | None, Field(description=IMAGE_HELP)]
Mode = Annotated[Literal["fast", "chat"] | None, Field(description=MODE_HELP)]


def build_server(session: ToolSession, *, name: str = "lisa-agent") -> MCPServer:
    """The MCP server over ``session`` (started by the caller): the four tools and the two resources.

    Run it with ``server.run("stdio")``, over HTTP with :class:`lisa_agent.integrations.mcp_http.MCPHttpServer`, or
    in process with ``mcp.Client(server)``.
    """
    server: MCPServer = MCPServer(
        name, version=__version__, log_level="WARNING",  # the SDK calls logging.basicConfig at this level
        middleware=[VocabularyMiddleware()],
        instructions=(f"LISA reasoning segmentation ({session.model_name or 'model'}; frames: "
                      f"{session.source_name}). Call look to see the scene, segment_objects to find what an "
                      "instruction refers to (implicit ones too, e.g. 'something to cut with'), explain_objects "
                      "for a reasoned answer, track to follow one object on every frame."))
    reads = ToolAnnotations(read_only_hint=True, open_world_hint=False)

    @server.tool(name="look", description=LOOK_DESCRIPTION, annotations=reads)
    async def look() -> Annotated[CallToolResult, LookOutput]:
        return await _answer(functools.partial(_look, session))

    @server.tool(name="segment_objects", description=SEGMENT_DESCRIPTION, annotations=reads)
    async def segment_objects(instruction: Instruction, frame_seq: FrameSeq = None, image: Image = None,
                              mode: Mode = None) -> Annotated[CallToolResult, ResultOutput]:
        return await _answer(functools.partial(_segment, session, instruction, frame_seq, image, mode, explain=False))

    @server.tool(name="explain_objects", description=EXPLAIN_DESCRIPTION, annotations=reads)
    async def explain_objects(instruction: Annotated[str, Field(description=EXPLAIN_QUERY_HELP)],
                              frame_seq: FrameSeq = None,
                              image: Annotated[str | None, Field(description=EXPLAIN_IMAGE_HELP)] = None,
                              ) -> Annotated[CallToolResult, ResultOutput]:
        return await _answer(functools.partial(_segment, session, instruction, frame_seq, image, "chat", explain=True))

    @server.tool(name="track", description=TRACK_DESCRIPTION,
                 annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, open_world_hint=False))
    async def track(instruction: Annotated[str | None, Field(description=TRACK_INSTRUCTION_HELP)] = None,
                    stop: Annotated[bool, Field(description=TRACK_STOP_HELP)] = False,
                    mode: Mode = None) -> Annotated[CallToolResult, TrackOutput]:
        return await _answer(functools.partial(_track, session, instruction, stop, mode))

    @server.resource(FRAME_URI, name="latest_frame", mime_type="image/png",
                     description="The newest camera frame (PNG).")
    async def latest_frame() -> bytes:
        return await _resource(lambda: encode_image_bytes(session.latest(FRAME_WAIT_S).frame.rgb, "png"))

    @server.resource(RESULT_URI, name="latest_result", mime_type="application/json",
                     description="The newest answer (the result schema, JSON): of a tool call, or the tracked masks.")
    async def latest_result() -> str:
        return await _resource(functools.partial(_latest_result_json, session))

    return server


class VocabularyMiddleware:
    """The SDK's own tool refusals (arguments that do not fit the schema, an unknown tool) in the library's
    vocabulary too: ``invalid_argument`` / ``unknown_op`` with the code's advice, and the structured error, like
    every refusal of the tools themselves (a ``ServerMiddleware`` of the SDK)."""

    async def __call__(self, ctx: Any, call_next: Any) -> Any:
        result = await call_next(ctx)
        if getattr(ctx, "method", None) != "tools/call":
            return result
        if isinstance(result, dict) and (result.get("isError") is not True or result.get("structuredContent")):
            return result  # an answer, or one of the tools' own errors (the wire form): nothing to read
        try:  # the handler's result, as a model or in its wire form
            seen = result if isinstance(result, CallToolResult) else CallToolResult.model_validate(result)
        except ValidationError:
            return result
        if not seen.is_error or seen.structured_content is not None:
            return result
        said = " ".join(b.text for b in seen.content if isinstance(b, TextContent))
        lines = [line.strip() for line in said.splitlines()
                 if line.strip() and not line.strip().startswith("For further information")]
        text = " ".join(lines).removeprefix("Error executing tool ").strip()
        if text.lower().startswith("unknown tool"):
            error = LisaError(f"{text}; the tools are look, segment_objects, explain_objects and track",
                              code=Code.UNKNOWN_OP)
        else:
            error = InvalidArgumentError(f"the arguments do not fit the tool's schema: {text[:1000]}")
        out = tool_error(error)
        out.meta = seen.meta
        return out


# ---------------------------------------------------------------------- tool bodies (run in a worker thread)
async def _answer(work: Callable[[], CallToolResult]) -> CallToolResult:
    """Run ``work`` (blocking: model calls, decoding) in a worker thread; any failure becomes a tool error."""
    try:
        return await anyio.to_thread.run_sync(work)
    except Exception as exc:
        return tool_error(exc)


def tool_error(exc: BaseException) -> CallToolResult:
    """``isError`` result in the library's vocabulary: the sentence for the model, the error object for programs."""
    if not isinstance(exc, LisaError):
        log.error("MCP tool failed", exc_info=exc)
    info = describe_error(exc)
    return CallToolResult(content=[TextContent(type="text", text=info.sentence())],
                          structured_content={"error": info.to_dict()}, is_error=True)


async def _resource(work: Callable[[], Any]) -> Any:
    try:
        return await anyio.to_thread.run_sync(work)
    except ResourceError:
        raise
    except Exception as exc:
        if not isinstance(exc, LisaError):
            log.error("MCP resource failed", exc_info=exc)
        raise ResourceError(describe_error(exc).sentence()) from None


def _image(data: bytes, mime: str) -> ImageContent:
    return ImageContent(type="image", data=base64.b64encode(data).decode("ascii"), mime_type=mime)


def _look(session: ToolSession) -> CallToolResult:
    got = session.latest(FRAME_WAIT_S)
    frame = got.frame
    h, w = frame.size
    stamp = None if frame.stamp is None else frame.stamp.seconds
    out = LookOutput(frame_seq=got.seq, stamp=stamp, frame_id=frame.frame_id, image_size=[h, w],
                     source=session.source_name)
    text = (f"Camera frame {got.seq} ({w}x{h} px" + ("" if stamp is None else f", stamp {stamp:.3f}") +
            f") from {session.source_name}.")
    return CallToolResult(content=[_image(encode_image_bytes(frame.rgb, "png"), "image/png"),
                                   TextContent(type="text", text=text)],
                          structured_content=out.model_dump(mode="json"))


def answer_dict(answer: ToolAnswer, total_ms: float | None = None) -> dict[str, Any]:
    """The result schema plus the MCP envelope keys (``frame_seq``, ``image``, ``labels``, ``tool_ms``)."""
    out = answer.result.to_dict()
    out.update({"frame_seq": answer.frame_seq, "image": answer.source,
                "labels": mask_labels(answer.result.text, len(answer.result)),
                "tool_ms": {"image": round(answer.load_ms, 3)} | ({} if total_ms is None else
                                                                  {"total": round(total_ms, 3)})})
    return out


def _segment(session: ToolSession, instruction: str, frame_seq: int | None, image: str | None, mode: str | None,
             *, explain: bool) -> CallToolResult:
    t0 = time.perf_counter()
    answer = session.segment(instruction, frame_seq=frame_seq, image=image, mode=mode, wait_s=FRAME_WAIT_S)
    result = answer.result
    text = describe_result(result, source=answer.source, explain=explain)
    if answer.frame_seq is not None:
        text += f"\n(frame_seq {answer.frame_seq})"
    overlay = result.overlay(answer.frame.rgb, mask_labels(result.text, len(result)))
    return CallToolResult(content=[TextContent(type="text", text=text),
                                   _image(encode_image_bytes(overlay, "jpeg", OVERLAY_QUALITY), "image/jpeg")],
                          structured_content=answer_dict(answer, (time.perf_counter() - t0) * 1000.0))


def _track(session: ToolSession, instruction: str | None, stop: bool, mode: str | None) -> CallToolResult:
    if stop or instruction is None:  # stop, or (neither) say what is tracked
        before = session.tracking()["instruction"]
        if stop:
            session.track(None)
            text = f"Stopped tracking {before!r}." if before else "Nothing was being tracked."
        else:
            text = f"Tracking {before!r}." if before else "Nothing is being tracked; pass an instruction to start."
        state = session.tracking()
        out = TrackOutput(tracking=state["instruction"] is not None, instruction=state["instruction"],
                          mode=state["mode"], options=state["options"], result=None)
        return CallToolResult(content=[TextContent(type="text", text=text)],
                              structured_content=out.model_dump(mode="json"))
    answer = session.track(instruction, mode=mode)
    assert answer is not None
    state = session.tracking()
    text = (f"Tracking {state['instruction']!r} on every frame now; segment_objects with this instruction answers "
            "with the masks of the newest frame.\n" + describe_result(answer.result, source=answer.source))
    out = TrackOutput(tracking=True, instruction=state["instruction"], mode=state["mode"], options=state["options"],
                      result=answer_dict(answer))
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=out.model_dump(mode="json"))


def _latest_result_json(session: ToolSession) -> str:
    answer = session.last_answer()
    if answer is None:
        raise ResourceError("No answer yet: call segment_objects first.")
    return json.dumps(answer_dict(answer), allow_nan=False)

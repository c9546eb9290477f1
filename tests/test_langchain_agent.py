"""A real LangChain agent loop (``langchain.agents.create_agent``, a LangGraph graph) calling LISA.

The chat model is scripted, the rest is real: the agent binds the LISA tools, the model asks for
``segment_objects`` with the user's request, LangGraph's tool node runs the tool on the tiny LISA
checkpoint, the ToolMessage goes back to the model, and the model's final answer is built from
the tool's text.

Target check: the agent runs the bundled trained ``tabletop-tiny`` model on a held-out tabletop scene, and the
mask it received must be the knife (IoU with the rendered ground truth), exactly the engine's own mask for that
frame and query, with the knife's box in the tool's text and in the model's final answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from langchain.agents import create_agent
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool

from lisa_agent.integrations.langchain import lisa_tools
from lisa_agent.options import QueryOptions

REQUEST = "Grab something to cut with."
TOOL_QUERY = "something to cut with"
BBOX = re.compile(r"bbox \[x1, y1, x2, y2\] = (\[\d+, \d+, \d+, \d+\])")


class ScriptedToolCaller(BaseChatModel):
    """A chat model that follows a two-step script, like a real tool-calling model would.

    Turn 1 (last message from the user): call ``segment_objects`` with ``query``.
    Turn 2 (last message a ToolMessage): answer in words, using the bbox named in the tool's text,
    or relay the tool's message when nothing was found or the tool failed.
    Records the tool schemas it was bound to and every message list it saw.
    """

    query: str = TOOL_QUERY
    bound_tools: list[dict[str, Any]] = []
    transcripts: list[list[BaseMessage]] = []

    @property
    def _llm_type(self) -> str:
        return "scripted-tool-caller"

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:
        schemas = [convert_to_openai_tool(t) for t in tools]
        self.bound_tools.extend(schemas)
        return self.bind(tools=schemas, **kwargs)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self.transcripts.append(list(messages))
        last = messages[-1]
        if isinstance(last, ToolMessage):
            match = BBOX.search(str(last.content))
            if last.status == "error":
                text = f"I could not look: {last.content}"
            elif match:
                text = f"I will grab the object at bbox {match.group(1)} (pixels); it is what I can cut with."
            else:
                text = f"I found nothing to cut with. The vision tool said: {last.content}"
            message = AIMessage(content=text)
        else:
            names = [t["function"]["name"] for t in kwargs.get("tools", [])]
            assert "segment_objects" in names, f"the agent did not bind segment_objects: {names}"
            message = AIMessage(content="", tool_calls=[
                {"name": "segment_objects", "args": {"query": self.query}, "id": "call-1", "type": "tool_call"}])
        return ChatResult(generations=[ChatGeneration(message=message)])


def _scene() -> np.ndarray:
    """The frame the robot's camera delivers: a table with a knife (dark handle, bright blade) and a cup."""
    img = np.full((120, 160, 3), 140, dtype=np.uint8)
    img[60:70, 30:70] = (50, 35, 25)
    img[61:69, 70:125] = (225, 225, 235)
    img[20:50, 110:140] = (200, 60, 50)
    return img


@pytest.fixture(scope="module")
def tabletop() -> tuple[Any, np.ndarray, np.ndarray]:
    """The bundled trained model, a held-out tabletop scene with a knife, and the knife's rendered mask."""
    from lisa_agent import LisaSegmenter
    from lisa_agent.data.tabletop import render_scene, split_seed

    scene = render_scene(split_seed("test", 2), size=(480, 640))
    knife = next(o.mask for o in scene.objects if o.category == "knife")
    return LisaSegmenter.from_pretrained("tabletop-tiny", device="cpu"), scene.image, knife


def _agent(tools: list[BaseTool]) -> tuple[Any, ScriptedToolCaller]:
    model = ScriptedToolCaller(bound_tools=[], transcripts=[])
    return create_agent(model, tools, system_prompt="You control a robot arm with a camera."), model


def _tool_messages(messages: list[BaseMessage]) -> list[ToolMessage]:
    return [m for m in messages if isinstance(m, ToolMessage)]


def _assert_grab_run(messages: list[BaseMessage], model: ScriptedToolCaller, segmenter: Any,
                     frame: np.ndarray, knife: np.ndarray) -> None:
    # The agent offered both LISA tools, with the schema the model reads.
    names = {t["function"]["name"] for t in model.bound_tools}
    assert {"segment_objects", "explain_objects"} <= names
    seg_schema = next(t for t in model.bound_tools if t["function"]["name"] == "segment_objects")
    assert seg_schema["function"]["parameters"]["required"] == ["query"]

    # The model asked for the tool with the query, and the tool ran once with it.
    calls = [c for m in messages if isinstance(m, AIMessage) for c in m.tool_calls]
    assert calls == [{"name": "segment_objects", "args": {"query": TOOL_QUERY}, "id": "call-1",
                      "type": "tool_call"}]
    (tool_msg,) = _tool_messages(messages)
    assert tool_msg.status == "success" and tool_msg.tool_call_id == "call-1"
    assert tool_msg.artifact["result"]["query"] == TOOL_QUERY

    # The mask the agent got is the knife, and exactly the engine's own answer for this frame and query.
    (mask,) = tool_msg.artifact["masks"]
    assert mask.shape == frame.shape[:2] and mask.dtype == bool
    iou = float((mask & knife).sum() / (mask | knife).sum())
    assert iou >= 0.6, f"the agent's mask is not the knife (IoU {iou:.2f})"
    expected = segmenter.segment(frame, TOOL_QUERY, mode="fast")
    np.testing.assert_array_equal(mask, expected.masks[0])
    # The content names the knife's bbox, as the engine computed it for this frame; the artifact carries it.
    box = "[" + ", ".join(str(v) for v in expected.instances[0].bbox) + "]"
    assert f"bbox [x1, y1, x2, y2] = {box}" in tool_msg.content
    assert tool_msg.artifact["result"]["masks"][0]["bbox"] == list(expected.instances[0].bbox)

    # The model saw the tool's text and produced the final answer from it.
    assert model.transcripts[-1][-1].content == tool_msg.content
    final = messages[-1]
    assert isinstance(final, AIMessage) and not final.tool_calls
    assert final.content == f"I will grab the object at bbox {box} (pixels); it is what I can cut with."


def test_agent_grabs_something_to_cut_with(tabletop: tuple[Any, np.ndarray, np.ndarray]) -> None:
    segmenter, frame, knife = tabletop
    agent, model = _agent(lisa_tools(segmenter, image_source=lambda: frame))
    state = agent.invoke({"messages": [HumanMessage(REQUEST)]})
    messages = state["messages"]
    assert isinstance(messages[0], HumanMessage) and messages[0].content == REQUEST
    _assert_grab_run(messages, model, segmenter, frame, knife)


@pytest.mark.anyio
async def test_agent_async_loop(tabletop: tuple[Any, np.ndarray, np.ndarray]) -> None:
    segmenter, frame, knife = tabletop
    agent, model = _agent(lisa_tools(segmenter, image_source=lambda: frame))
    state = await agent.ainvoke({"messages": [HumanMessage(REQUEST)]})
    _assert_grab_run(state["messages"], model, segmenter, frame, knife)


def test_agent_hears_a_tool_error_instead_of_crashing(tiny_segmenter: Any) -> None:
    agent, model = _agent(lisa_tools(tiny_segmenter, image_source=lambda: None))  # camera not ready
    state = agent.invoke({"messages": [HumanMessage(REQUEST)]})
    (tool_msg,) = _tool_messages(state["messages"])
    assert tool_msg.status == "error" and tool_msg.artifact is None
    assert "has not delivered a frame yet" in tool_msg.content
    assert state["messages"][-1].content == f"I could not look: {tool_msg.content}"


def test_agent_is_told_plainly_when_nothing_matches(tiny_segmenter: Any) -> None:
    frame = _scene()
    # The real engine with fast mode's forced answer set to one without [SEG].
    tools = lisa_tools(tiny_segmenter, image_source=lambda: frame,
                       query_options=QueryOptions(answer="Sorry, there is nothing to cut with."))
    agent, model = _agent(tools)
    state = agent.invoke({"messages": [HumanMessage(REQUEST)]})
    (tool_msg,) = _tool_messages(state["messages"])
    assert tool_msg.content.startswith(f'No object matched "{TOOL_QUERY}"')
    assert state["messages"][-1].content.startswith(
        "I found nothing to cut with. The vision tool said: No object matched")


def test_example_agent_script_runs_with_a_scripted_model(
    tiny_segmenter: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """examples/agent.py end to end, with its chat model and LISA backend swapped for test ones."""
    import importlib.util
    from pathlib import Path

    from lisa_agent.encoders import image_to_png

    path = Path(__file__).resolve().parents[1] / "examples" / "agent.py"
    spec = importlib.util.spec_from_file_location("lisa_example_agent", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setattr(example, "make_chat_model", lambda: ScriptedToolCaller(bound_tools=[], transcripts=[]))
    monkeypatch.setattr(example, "make_backend", lambda args: tiny_segmenter)
    frame = _scene()
    (tmp_path / "table.png").write_bytes(image_to_png(frame))
    overlay = tmp_path / "overlay.png"
    rc = example.main(["--image", str(tmp_path / "table.png"), "--model", "unused", "--overlay", str(overlay)])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"-> segment_objects({{'query': '{TOOL_QUERY}'}})" in out
    assert "<- segment_objects [success]" in out
    assert out.strip().splitlines()[-1].startswith("agent: I ")
    from PIL import Image

    assert Image.open(overlay).size == (frame.shape[1], frame.shape[0])

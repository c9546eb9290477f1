"""An LLM agent that answers "Grab something to cut with." by asking LISA where that is.

The chat model plans; LISA (the ``segment_objects`` tool) finds the object in the camera image
and reports its bounding box, size, centroid (and 3D point with depth). Here the "camera" is an
image file, so the example runs anywhere; on a robot, pass the ROS camera adapter instead.

Chat model (chosen by environment variables):

    LISA_LLM_PROVIDER   "ollama" or "openai" (default: openai when OPENAI_API_KEY is set, else ollama)
    LISA_LLM_MODEL      model name (default: qwen2.5:7b for Ollama, gpt-4o-mini for OpenAI);
                        it must support tool calling
    OLLAMA_BASE_URL     Ollama server (default http://localhost:11434)
    OPENAI_API_KEY      for OpenAI (read by langchain-openai)

LISA backend (command-line options):

    --model ID_OR_DIR   run LISA in this process (Hub id such as xinlai/LISA-7B-v1, a local folder,
                        or tabletop-tiny, the default); --device / --dtype / ... are the engine's
                        options (lisa_agent.config.EngineConfig), as on every lisa-agent command
    --server ENDPOINT   use a running `lisa-agent serve` instead (tcp://127.0.0.1:5555, or http://HOST:8000/lisa
                        for `serve --engine ray`)

Examples::

    pip install "lisa-agent[langchain]" langchain-ollama      # or langchain-openai
    ollama pull qwen2.5:7b
    python examples/agent.py --model xinlai/LISA-7B-v1 --device cuda --dtype bf16 --image kitchen.jpg
    LISA_LLM_PROVIDER=openai python examples/agent.py --server tcp://127.0.0.1:5555 --image kitchen.jpg \\
        --overlay answer.png "Hand me something I can drink from."

Not run in CI: it needs a chat model server and real weights.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

DEFAULT_REQUEST = "Grab something to cut with."
SYSTEM_PROMPT = (
    "You plan actions for a robot arm that sees the table through a camera. Before you act on an "
    "object, locate it with the segment_objects tool: describe it in words (implicit descriptions "
    "such as 'something to cut with' are fine). Then say which object you will grab and where it is "
    "(bounding box and, when given, the 3D point). If nothing matches, say so; do not invent positions."
)


def make_chat_model() -> Any:
    """The tool-calling chat model named by LISA_LLM_PROVIDER / LISA_LLM_MODEL."""
    provider = os.environ.get("LISA_LLM_PROVIDER") or ("openai" if os.environ.get("OPENAI_API_KEY") else "ollama")
    provider = provider.strip().lower()
    if provider == "ollama":
        try:
            from langchain_ollama import ChatOllama
        except ImportError as exc:
            raise SystemExit("LISA_LLM_PROVIDER=ollama needs langchain-ollama: pip install langchain-ollama") from exc
        model = os.environ.get("LISA_LLM_MODEL", "qwen2.5:7b")
        base_url = os.environ.get("OLLAMA_BASE_URL", "http://localhost:11434")
        return ChatOllama(model=model, base_url=base_url, temperature=0)
    if provider == "openai":
        try:
            from langchain_openai import ChatOpenAI
        except ImportError as exc:
            raise SystemExit("LISA_LLM_PROVIDER=openai needs langchain-openai: pip install langchain-openai") from exc
        if not os.environ.get("OPENAI_API_KEY"):
            raise SystemExit("LISA_LLM_PROVIDER=openai needs OPENAI_API_KEY in the environment")
        return ChatOpenAI(model=os.environ.get("LISA_LLM_MODEL", "gpt-4o-mini"), temperature=0)
    raise SystemExit(f"LISA_LLM_PROVIDER must be 'ollama' or 'openai'; got {provider!r}")


def make_backend(args: argparse.Namespace) -> Any:
    """LisaSegmenter in this process (--model) or LisaClient to a running server (--server)."""
    if args.server:
        from lisa_agent import LisaClient

        return LisaClient(args.server)
    from lisa_agent import LisaSegmenter
    from lisa_agent.config import engine_config_from_args

    config = engine_config_from_args(args)
    print(f"loading {config.describe()} ...", file=sys.stderr)
    return LisaSegmenter.from_config(config)


def main(argv: list[str] | None = None) -> int:
    from lisa_agent.config import add_engine_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("request", nargs="?", default=DEFAULT_REQUEST, help=f"what to ask (default: {DEFAULT_REQUEST!r})")
    parser.add_argument("--image", required=True, help="the camera frame: an image file, http(s) URL or data URI")
    parser.add_argument("--server", help="endpoint of a running `lisa-agent serve`, e.g. tcp://127.0.0.1:5555 "
                                         "or http://HOST:8000/lisa (Ray Serve; instead of loading --model here)")
    parser.add_argument("--overlay", help="write the masks over the frame to this PNG file")
    add_engine_arguments(parser)
    args = parser.parse_args(argv)

    from langchain.agents import create_agent
    from langchain_core.messages import AIMessage, ToolMessage

    from lisa_agent.errors import LisaError
    from lisa_agent.integrations.images import ImageAccess, load_image
    from lisa_agent.integrations.langchain import lisa_tools

    try:
        frame = load_image(args.image, access=ImageAccess.anything())  # typed by the operator, not the model
        segmenter = make_backend(args)
    except LisaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    camera = lambda: frame  # noqa: E731  (a ROS camera adapter on a robot)
    agent = create_agent(make_chat_model(), lisa_tools(segmenter, image_source=camera),
                         system_prompt=SYSTEM_PROMPT)

    state = agent.invoke({"messages": [("user", args.request)]})
    last_artifact = None
    for message in state["messages"]:
        if isinstance(message, AIMessage) and message.tool_calls:
            for call in message.tool_calls:
                print(f"-> {call['name']}({call['args']})")
        elif isinstance(message, ToolMessage):
            print(f"<- {message.name} [{message.status}]\n{message.content}\n")
            last_artifact = message.artifact or last_artifact
    print(f"agent: {state['messages'][-1].content}")

    if args.overlay and last_artifact is not None:
        from PIL import Image

        Image.fromarray(last_artifact["segmentation"].overlay(last_artifact["frame"])).save(args.overlay)
        print(f"overlay written to {args.overlay}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

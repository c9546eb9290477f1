"""One vocabulary for every door: QueryOptions and TrackOptions declared once, exposed alike by the command line,
the wire protocol, the ROS node, the LangChain tool and the console; one error description; one place that picks
an in-process model or a server (open_backend)."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lisa_agent.cli import build_parser
from lisa_agent.console import CONSOLE_QUERY_DEFAULTS
from lisa_agent.errors import (
    CODES,
    Code,
    InvalidArgumentError,
    InvalidImageError,
    InvalidQueryError,
    LimitExceededError,
    LisaError,
    ServerBusyError,
    ServerUnavailableError,
    describe_error,
    error_from_dict,
)
from lisa_agent.options import (
    INTERACTIVE_MODES,
    MODES,
    QueryOptions,
    TrackOptions,
    flag,
    query_options_from_args,
    track_options_from_args,
)
from lisa_agent.serving.codecs import encode_image
from lisa_agent.serving.framing import build_header, encode_reply
from lisa_agent.serving.protocol import OPTION_KEYS, parse_request

QUERY = {f.name for f in fields(QueryOptions)}
TRACK = {f.name for f in fields(TrackOptions)}
DEMO_DEFAULTS = {"mode": "chat"}

#: command -> (smallest argv, query fields left out, track fields exposed, the command's stated query defaults)
COMMANDS: dict[str, tuple[list[str], set[str], set[str], dict[str, Any]]] = {
    "segment": (["--image", "x.png", "--query", "q"], {"return_logits"}, set(), {}),
    "bag": (["in", "--image-topic", "/t", "--query", "q", "--out", "o"], {"return_logits"}, set(), {}),
    "demo": ([], {"return_logits", "answer"}, set(), DEMO_DEFAULTS),
    "eval-video": (["--data", "d"], {"return_logits", "answer"}, TRACK, {}),
    "console": ([], {"return_logits", "answer"}, TRACK, CONSOLE_QUERY_DEFAULTS),
    "mcp": ([], {"return_logits", "answer"}, TRACK, {}),
}


def _flags(command: str) -> tuple[argparse.ArgumentParser, list[argparse.Action]]:
    parser = build_parser([command])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return parser, sub._actions


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_exposes_exactly_the_query_and_track_fields_with_the_library_defaults(command):
    argv, left_out, track_fields, stated = COMMANDS[command]
    parser, actions = _flags(command)
    query = {a.dest.removeprefix("query_") for a in actions if a.dest.startswith("query_")}
    track = {a.dest.removeprefix("track_") for a in actions if a.dest.startswith("track_")}
    assert query == QUERY - left_out
    assert track == track_fields
    for action in actions:
        for prefix in ("query_", "track_"):
            if action.dest.startswith(prefix):
                assert action.option_strings == [flag(action.dest.removeprefix(prefix))]
    args = parser.parse_args([command, *argv])
    # the library's defaults, or the ones the command states (and says why in its help)
    assert query_options_from_args(args) == QueryOptions().replace(**stated)
    assert track_options_from_args(args) == TrackOptions()


def test_flags_reach_the_options_and_bad_values_are_refused_naming_the_flag(capsys):
    argv = ["eval-video", "--data", "d", "--mode", "chat", "--max-new-tokens", "8", "--tracker", "sam",
            "--reason-every", "3", "--reason-period-s", "0", "--min-confidence", "0.25"]
    args = build_parser(argv).parse_args(argv)
    assert query_options_from_args(args) == QueryOptions(mode="chat", max_new_tokens=8)
    assert track_options_from_args(args) == TrackOptions(tracker="sam", reason_every=3, reason_period_s=None,
                                                         min_confidence=0.25)
    for bad in (["--tracker", "kalman"], ["--reason-every", "often"], ["--mode", "psychic"]):
        argv = ["eval-video", "--data", "d", *bad]
        with pytest.raises(SystemExit) as exc:
            build_parser(argv).parse_args(argv)
        assert exc.value.code == 2 and bad[0] in capsys.readouterr().err


@pytest.mark.parametrize(("cls", "values", "message"), [
    (QueryOptions, {"mode": "psychic"}, "mode must be one of fast, chat, reference"),
    (QueryOptions, {"max_new_tokens": 0}, "max_new_tokens must be a whole number in"),
    (QueryOptions, {"max_new_tokens": True}, "max_new_tokens must be a whole number in"),
    (QueryOptions, {"answer": "  "}, "answer .the forced answer. must be a non-empty string"),
    (QueryOptions, {"answer": "<image> [SEG]"}, "must not contain '<image>'"),
    (QueryOptions, {"return_logits": "yes"}, "return_logits must be true or false"),
    (TrackOptions, {"tracker": "kalman"}, "tracker must be one of flow, sam, none"),
    (TrackOptions, {"reason_every": 0}, "reason_every must be a whole number in"),
    (TrackOptions, {"reason_period_s": -1.0}, "reason_period_s must be a positive"),
    (TrackOptions, {"reason_period_s": float("nan")}, "reason_period_s must be a positive"),
    (TrackOptions, {"min_confidence": 1.5}, "min_confidence must be a number in"),
])
def test_bad_options_are_refused_at_construction_naming_the_field(cls, values, message):
    with pytest.raises(InvalidArgumentError, match=message):
        cls(**values)


def test_text_and_json_forms_round_trip_and_unknown_fields_are_refused():
    for q in (QueryOptions(), QueryOptions(mode="chat", max_new_tokens=7, answer="[SEG].", return_logits=True)):
        assert QueryOptions.from_texts(q.to_texts()) == q and QueryOptions.from_mapping(q.to_dict()) == q
    for t in (TrackOptions(), TrackOptions(tracker="none", reason_every=1, reason_period_s=None, min_confidence=0)):
        assert TrackOptions.from_texts(t.to_texts()) == t and TrackOptions.from_mapping(t.to_dict()) == t
    assert TrackOptions(reason_period_s=0).reason_period_s is None  # 0 means "no time limit" in every door
    assert TrackOptions.from_texts({"reason_period_s": "off"}).reason_period_s is None
    with pytest.raises(InvalidArgumentError, match="unknown query options"):
        QueryOptions.from_texts({"colour": "red"})
    with pytest.raises(InvalidArgumentError, match="unknown tracking options"):
        TrackOptions.from_mapping({"tracker": "flow", "speed": 3})
    assert QueryOptions.of(None, mode="chat") == QueryOptions(mode="chat")
    assert QueryOptions.of(QueryOptions(max_new_tokens=5), answer=None) == QueryOptions(max_new_tokens=5)


def _segment_request(options: dict[str, Any]) -> Any:
    spec, data = encode_image(np.zeros((16, 16, 3), np.uint8))
    return parse_request([build_header("r", "segment", query="q", image=spec, options=options), data])


def test_the_wire_protocol_reads_the_same_options_with_the_same_defaults():
    assert set(QueryOptions.field_names()) <= OPTION_KEYS and "track" in OPTION_KEYS
    plain = _segment_request({})
    assert plain.query_options == QueryOptions() and plain.track is None
    tracked = _segment_request({"mode": "chat", "max_new_tokens": 9, "track": {}})
    assert tracked.query_options == QueryOptions(mode="chat", max_new_tokens=9) and tracked.track == TrackOptions()
    from lisa_agent.errors import ProtocolError

    with pytest.raises(ProtocolError, match="options.mode must be one of") as exc:
        _segment_request({"mode": "psychic"})
    assert exc.value.code == Code.INVALID_ARGUMENT
    with pytest.raises(ProtocolError, match="options.track.reason_every") as exc:
        _segment_request({"track": {"reason_every": 0}})
    with pytest.raises(ProtocolError, match="unknown options.track fields"):
        _segment_request({"track": {"speed": 1}})


def test_the_ros_node_declares_the_query_and_track_fields_with_their_defaults():
    """A real rclpy node (a model-free backend): its query and tracking parameters are the fields."""
    import rclpy

    from lisa_agent.benchmarks.server import EchoBackend
    from ros_nodes import parameters
    from ros_nodes.lisa_node import LisaNode

    assert set(parameters.QUERY_PARAMETERS) == QUERY - {"return_logits"}
    assert set(parameters.TRACK_PARAMETERS) == TRACK
    context = rclpy.Context()
    rclpy.init(context=context, domain_id=92)
    node = LisaNode("vocabulary_probe", backend=EchoBackend(), context=context)
    try:
        assert parameters.query_options(node) == QueryOptions()
        assert parameters.track_options(node) == TrackOptions()
        assert parameters.validate({"reason_period_s": 0.0, "mode": "chat"}) is None
        assert "tracker must be one of" in parameters.validate({"tracker": "kalman"})
        assert "mode must be one of" in parameters.validate({"mode": "psychic"})
    finally:
        node.destroy_node()
        rclpy.shutdown(context=context)


def test_the_launch_file_passes_the_query_and_track_fields_through(monkeypatch):
    from test_ros_package import _load_launch_with_stand_ins

    module = _load_launch_with_stand_ins(monkeypatch)
    assert {name for name, _, _ in module.QUERY_ARGUMENTS} == QUERY - {"return_logits"}
    assert {name for name, _, _ in module.TRACK_ARGUMENTS} == TRACK
    params = module.node_parameters({name: default for name, default, _ in module.ARGUMENTS})
    assert QueryOptions.from_texts({k: v for k, v in params.items() if k in QUERY}) == QueryOptions()
    assert TrackOptions.from_texts({k: v for k, v in params.items() if k in TRACK}) == TrackOptions()


def test_the_tool_offers_the_interactive_modes_and_takes_the_option_types():
    from lisa_agent.benchmarks.server import EchoBackend
    from lisa_agent.integrations.langchain import LisaExplainTool, LisaSegmentTool

    tool = LisaSegmentTool(backend=EchoBackend())
    schema = tool.tool_call_schema.model_json_schema()["properties"]["mode"]
    offered = {choice for option in schema.get("anyOf", [schema]) for choice in option.get("enum", [])}
    assert offered == set(INTERACTIVE_MODES)
    assert tool.query_options == QueryOptions() and tool.track is None
    assert LisaExplainTool(backend=EchoBackend()).query_options == QueryOptions(mode="chat")
    with pytest.raises(ValueError, match="query_options.mode must be one of fast, chat"):
        LisaSegmentTool(backend=EchoBackend(), query_options=QueryOptions(mode="reference"))


def test_the_console_reads_instructions_into_the_same_options():
    from lisa_agent.benchmarks.server import EchoBackend
    from lisa_agent.console.core import ConsoleCore
    from lisa_agent.console.sources import SyntheticSource

    core = ConsoleCore(EchoBackend(), SyntheticSource(size=(64, 80)))
    try:
        assert core.query == QueryOptions().replace(**CONSOLE_QUERY_DEFAULTS) and core.track == TrackOptions()
        assert core.check_instruction("the cup", None) == ("the cup", QueryOptions(mode="chat"))
        assert core.check_instruction("the cup", "fast")[1] == QueryOptions(mode="fast")
        assert core.state(include_result=False)["limits"]["modes"] == list(INTERACTIVE_MODES)
        with pytest.raises(InvalidArgumentError, match="mode must be one of fast, chat"):
            core.check_instruction("the cup", "reference")
    finally:
        core.close()


def test_a_stream_uses_the_track_options_defaults():
    from lisa_agent.benchmarks.server import EchoBackend
    from lisa_agent.tracking import FlowTracker, StreamSegmenter

    stream = StreamSegmenter(EchoBackend())
    assert stream.options == TrackOptions() and stream.query == QueryOptions()
    assert isinstance(stream.tracker, FlowTracker)
    assert set(MODES) - set(INTERACTIVE_MODES) == {"reference"}
    with pytest.raises(InvalidArgumentError, match="a stream's mode must be one of fast, chat"):
        StreamSegmenter(EchoBackend(), query=QueryOptions(mode="reference"))


# ---------------------------------------------------------------------- errors


def test_every_error_class_and_code_has_one_description():
    import lisa_agent.errors as errors

    classes = [v for v in vars(errors).values() if isinstance(v, type) and issubclass(v, LisaError)]
    assert len(classes) >= 20
    codes = {v for k, v in vars(Code).items() if k.isupper()}
    assert codes == set(CODES)
    for cls in classes:
        assert isinstance(cls.code, str) and cls.code in CODES, cls
    # every LisaError the library defines lives in lisa_agent.errors (one vocabulary)
    root = Path(errors.__file__).parent
    import ast

    for path in root.rglob("*.py"):
        if path.name == "errors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(b) for b in node.bases}
                assert not bases & {"LisaError", "ValueError", "Exception"} or node.name.startswith("_"), \
                    f"{path.relative_to(root)}: {node.name} declares an error outside lisa_agent.errors"


@pytest.mark.parametrize(("exc", "code", "status"), [
    (InvalidQueryError("query is empty"), "invalid_query", 400),
    (InvalidImageError("not an image"), "invalid_image", 400),
    (LimitExceededError("three masks"), "too_large", 413),
    (ServerBusyError("queue full"), "queue_full", 503),
    (ServerUnavailableError("no reply"), "unavailable", 503),
    (RuntimeError("CUDA exploded"), "internal", 500),
])
def test_one_error_reads_the_same_through_every_door(exc, code, status):
    from langchain_core.tools import ToolException

    from lisa_agent.benchmarks.server import EchoBackend
    from lisa_agent.integrations.langchain import LisaSegmentTool

    info = describe_error(exc)
    assert (info.code, info.status) == (code, status) and info.advice
    # the wire protocol
    reply = json.loads(encode_reply("r", error=exc)[0])
    assert reply["error"] == info.to_dict()
    again = error_from_dict(reply["error"])
    assert describe_error(again).code == code and again.remote
    # the LangChain tool: its ToolException is the description's sentence
    tool = LisaSegmentTool(backend=EchoBackend())
    with pytest.raises(ToolException) as raised, tool._tool_errors():
        raise exc
    assert str(raised.value) == info.sentence() and str(raised.value).startswith(info.title)
    # the console's API: the same code and the code's HTTP status
    from lisa_agent.console.http import error_response

    response = error_response(info.code, info.message, info.advice)
    assert response.status == status and json.loads(response.text)["error"] == info.to_dict()


# ---------------------------------------------------------------------- open_backend


def test_open_backend_picks_a_client_by_the_address_and_a_model_otherwise(tiny_checkpoint):
    from lisa_agent.backend import SegmentBackend, is_server_address, open_backend
    from lisa_agent.engine.segmenter import LisaSegmenter
    from lisa_agent.serving.client import LisaClient

    for address in ("tcp://127.0.0.1:9", "ipc:///tmp/lisa-none", "http://127.0.0.1:9/lisa", "HTTPS://host/lisa"):
        assert is_server_address(address)
    assert not is_server_address(str(tiny_checkpoint)) and not is_server_address("xinlai/LISA-7B-v1")
    client = open_backend("tcp://127.0.0.1:9", timeout=0.2, retries=0)  # connects lazily: nothing is sent
    try:
        assert isinstance(client, LisaClient) and isinstance(client, SegmentBackend)
        assert client.endpoint == "tcp://127.0.0.1:9" and client.timeout == 0.2
    finally:
        client.close()  # type: ignore[attr-defined]
    with pytest.raises(InvalidArgumentError, match="do not apply to the model server"):
        open_backend("tcp://127.0.0.1:9", dtype="bf16")
    engine = open_backend(str(tiny_checkpoint), device="cpu")
    assert isinstance(engine, LisaSegmenter) and isinstance(engine, SegmentBackend)
    result = engine.segment(np.full((32, 32, 3), 90, np.uint8), "the cup", options=QueryOptions(mode="fast"))
    assert result.mode == "fast"

"""EngineConfig: one declaration of the engine's options, validated at construction, exposed alike by
every door (the model-loading commands, ``serve``, the ROS node's parameters, the launch file)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from lisa_agent.cli import build_parser
from lisa_agent.config import EngineConfig, engine_config_from_args
from lisa_agent.errors import InvalidArgumentError
from lisa_agent.options import flag

FIELDS = {f.name for f in fields(EngineConfig)}
REPO = Path(__file__).resolve().parents[1]

#: command -> the smallest argv that parses, and the engine fields it deliberately leaves out
COMMANDS = {
    "segment": (["--image", "x.png", "--query", "q"], set()),
    "eval": (["--data", "d"], set()),
    "demo": ([], set()),
    "bag": (["in", "--image-topic", "/t", "--query", "q", "--out", "o"], set()),
    "serve": ([], set()),
    "bench": ([], set()),
    "mcp": ([], set()),
    # calibrate-gate reads the presence scores with the gate off: it has no --presence-threshold
    "calibrate-gate": (["--data", "d"], {"presence_threshold"}),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_model_command_exposes_exactly_the_engine_fields_with_their_defaults(command):
    argv, left_out = COMMANDS[command]
    parser = build_parser([command])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    engine = {a.dest.removeprefix("engine_") for a in sub._actions if a.dest.startswith("engine_")}
    assert engine == FIELDS - left_out
    for action in sub._actions:
        if action.dest.startswith("engine_"):
            assert action.option_strings == [flag(action.dest.removeprefix("engine_"))]
    args = parser.parse_args([command, *argv])
    assert engine_config_from_args(args) == EngineConfig()  # the library's defaults, not the command's own


def test_flags_reach_the_config_and_bad_values_are_refused_by_the_parser(capsys):
    argv = ["segment", "--image", "x", "--query", "q", "--model", "some/model", "--device", "cuda:1", "--dtype", "bf16",
            "--quantization", "4bit", "--mask-tta", "hflip", "--presence-threshold", "0.3", "--cache-frames", "8",
            "--vision-tower", "/clip", "--template", "llava_llama_2", "--sam-attention", "sdpa"]
    config = engine_config_from_args(build_parser(argv).parse_args(argv))
    assert config == EngineConfig(model="some/model", device="cuda:1", dtype="bf16", quantization="4bit",
                                  mask_tta="hflip", presence_threshold=0.3, cache_frames=8, vision_tower="/clip",
                                  template="llava_llama_2", sam_attention="sdpa")
    for bad in (["--mask-tta", "sideways"], ["--dtype", "fp8"], ["--presence-threshold", "high"],
                ["--cache-frames", "many"]):
        argv = ["segment", "--image", "x", "--query", "q", *bad]
        with pytest.raises(SystemExit) as exc:
            build_parser(argv).parse_args(argv)
        assert exc.value.code == 2
        assert bad[0] in capsys.readouterr().err


@pytest.mark.parametrize(("options", "message"), [
    ({"device": "gpu"}, "unknown device 'gpu'"),
    ({"dtype": "fp8"}, "unknown dtype 'fp8'"),
    ({"quantization": "2bit"}, "unknown quantization '2bit'"),
    ({"mask_tta": "rotate"}, "mask_tta must be one of checkpoint, off, hflip, flips; got 'rotate'"),
    ({"presence_threshold": 1.5}, "presence_threshold must be"),
    ({"presence_threshold": "high"}, "presence_threshold must be"),
    ({"sam_attention": "flash"}, "sam_attention must be one of auto, sdpa, original"),
    ({"template": "vicuna"}, "unknown conversation template 'vicuna'"),
    ({"cache_frames": 0}, "cache_frames must be a whole number >= 1"),
    ({"model": "  "}, "model must name"),
])
def test_bad_options_are_refused_at_construction_naming_the_option(options, message):
    with pytest.raises(InvalidArgumentError, match=message.replace("(", r"\(").replace(")", r"\)")):
        EngineConfig(**options)


def test_aliases_normalise_and_the_text_form_round_trips():
    import torch

    config = EngineConfig(dtype=torch.bfloat16, device=torch.device("cpu"), quantization="none",
                          presence_threshold="off", vision_tower="", template="")
    assert (config.dtype, config.device, config.quantization, config.presence_threshold) == ("bf16", "cpu", None, None)
    assert config.vision_tower is None and config.template is None
    assert EngineConfig(dtype="bfloat16").dtype == "bf16"
    for c in (EngineConfig(), config, EngineConfig(presence_threshold=0.25, cache_frames=2, mask_tta="flips")):
        assert EngineConfig.from_texts(c.to_texts()) == c
    # what YAML makes of a bare `off` in a ROS parameter or launch argument
    assert EngineConfig.from_texts({"presence_threshold": False}).presence_threshold is None
    with pytest.raises(InvalidArgumentError, match="unknown engine options"):
        EngineConfig.from_texts({"colour": "red"})


def test_the_launch_file_declares_the_engine_fields_with_their_defaults(monkeypatch):
    from test_ros_package import _load_launch_with_stand_ins

    module = _load_launch_with_stand_ins(monkeypatch)
    engine = {name: default for name, default, _ in module.ENGINE_ARGUMENTS}
    assert set(engine) == FIELDS
    assert EngineConfig.from_texts(engine) == EngineConfig()
    params = module.node_parameters({name: default for name, default, _ in module.ARGUMENTS})
    assert EngineConfig.from_texts({k: v for k, v in params.items() if k in FIELDS}) == EngineConfig()


def test_the_ros_node_declares_the_engine_fields_with_their_defaults():
    """A real rclpy node (no model loaded: a model-free backend): its engine parameters are the fields."""
    import rclpy

    from lisa_agent.benchmarks.server import EchoBackend
    from ros_nodes import parameters
    from ros_nodes.lisa_node import LisaNode

    context = rclpy.Context()
    rclpy.init(context=context, domain_id=91)
    node = LisaNode("config_probe", backend=EchoBackend(), context=context)
    try:
        declared = {name for name in FIELDS if node.has_parameter(name)}
        assert declared == FIELDS
        assert parameters.engine_config(node) == EngineConfig()
        for name in FIELDS:
            assert node.describe_parameter(name).read_only
    finally:
        node.destroy_node()
        rclpy.shutdown(context=context)


def test_the_ros_node_and_the_command_line_start_without_torch():
    """The doors translate; the engine alone picks the device (nothing in ros_nodes imports torch)."""
    code = ("import sys; import ros_nodes.lisa_node, ros_nodes.console_source; from lisa_agent.cli import build_parser; "
            "[build_parser([c]) for c in ('segment', 'serve', 'bag', 'bench')]; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)

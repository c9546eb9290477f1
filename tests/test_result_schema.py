"""One result schema (lisa_agent/schemas/result.schema.json, docs/result.md) for every door. The ROS
node's ``~/result`` is validated in test_ros_node.py, the bag tool's in test_bag.py and the LangChain
tool's artifact in test_langchain_tool.py; the command line and the server here."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import assert_result_schema, random_frame
from PIL import Image

from lisa_agent.cli import main
from lisa_agent.frames import Frame
from lisa_agent.geometry import Intrinsics
from lisa_agent.result import SegmentationResult


def test_segment_json_is_the_result_schema(tiny_checkpoint, tmp_path, capsys):
    Image.fromarray(random_frame(60, 90, seed=4)).save(tmp_path / "frame.png")
    assert main(["segment", "--model", str(tiny_checkpoint), "--image", str(tmp_path / "frame.png"),
                 "--query", "the red mug", "--json"]) == 0
    out = assert_result_schema(json.loads(capsys.readouterr().out))
    assert out["frame_id"] == "frame.png" and out["stamp"] is None and len(out["masks"]) == 1


def test_the_server_reply_is_the_result_schema(tiny_segmenter):
    import zmq

    from lisa_agent.serving.codecs import encode_depth, encode_image
    from lisa_agent.serving.framing import build_header
    from lisa_agent.serving.server import LisaServer

    image = random_frame(48, 64, seed=5)
    spec, data = encode_image(image)
    dspec, ddata = encode_depth(np.full((48, 64), 900, np.uint16))
    options = {"frame_id": "cam", "stamp": {"sec": 7, "nanosec": 9}, "intrinsics": [50.0, 50.0, 32.0, 24.0]}
    with LisaServer(tiny_segmenter, "tcp://127.0.0.1:*") as server:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.linger = 0
        sock.connect(server.endpoint)
        try:
            sock.send_multipart([b"", build_header("r1", "segment", query="the cup", image=spec, depth=dspec,
                                                   options=options), data, ddata])
            assert sock.poll(30_000)
            reply = json.loads(sock.recv_multipart()[1])
        finally:
            sock.close(0)
    assert reply["ok"], reply
    result = assert_result_schema(reply["result"])
    assert result["frame_id"] == "cam" and result["stamp"] == {"sec": 7, "nanosec": 9}
    assert {"server_queue", "server_decode"} <= set(result["timings_ms"])
    local = tiny_segmenter.segment(Frame(image, depth=np.full((48, 64), 900, np.uint16),
                                         intrinsics=Intrinsics(50.0, 50.0, 32.0, 24.0)), "the cup")
    assert result["masks"][0]["target"] == local.to_dict()["masks"][0]["target"]


def test_a_result_survives_its_json_round_trip(tiny_segmenter):
    depth = np.full((48, 64), 0.8, np.float32)
    result = tiny_segmenter.segment(Frame(random_frame(48, 64, seed=6), frame_id="f", stamp=3.5, depth=depth,
                                          intrinsics=(40.0, 40.0, 32.0, 24.0)), "the cup")
    d = assert_result_schema(result.to_dict())
    back = SegmentationResult.from_dict(d)
    assert back.to_dict() == d
    np.testing.assert_array_equal(back.masks, result.masks)
    assert back.targets[0].point == pytest.approx(result.targets[0].point, abs=1e-4)

"""The Segment action, the Segment service and ``~/segmentation`` of ``lisa_node``, over real DDS.

``lisa_interfaces`` is built with colcon in this test run (conftest's ``ros_workspace``); ``lisa_node`` (the
bundled ``tabletop-tiny`` model, CPU) and the action client (tests/ros_action_client.py) each run in their own
process with the workspace sourced, as a ROS user runs them. No timings are asserted: every wait ends at an
event, within generous bounds for loaded CI machines.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from ros_helpers import REPO, NodeProcess, ros_env, sourced

pytestmark = pytest.mark.slow  # colcon build, a lisa_node process and client processes over real DDS

DOMAIN = 92
CLIENT = Path(__file__).with_name("ros_action_client.py")
TIMEOUT = 180.0


@pytest.fixture(scope="module")
def action_node(ros_workspace, tmp_path_factory):
    logs = tmp_path_factory.mktemp("ros_action")
    params = {"model": "tabletop-tiny", "device": "cpu", "dtype": "fp32", "camera_qos": "reliable",
              "image_topic": "/camera/image"}
    node = NodeProcess(params, DOMAIN, logs / "lisa_node.log",
                       command=sourced(ros_workspace, [sys.executable, "-m", "ros_nodes.lisa_node"], source_tree=True))
    try:
        yield SimpleNamespace(process=node, workspace=ros_workspace, logs=logs)
    finally:
        code = node.stop()
        assert code == 0, node.log()[-3000:]


def run_client(node: SimpleNamespace, scenario: str) -> dict:
    """Run one scenario of tests/ros_action_client.py in its own process; its JSON report."""
    assert node.process.alive(), node.process.log()[-3000:]
    done = subprocess.run(sourced(node.workspace, [sys.executable, str(CLIENT), scenario, "--timeout", str(TIMEOUT)],
                                  source_tree=True),
                          cwd=REPO, env=ros_env(DOMAIN), capture_output=True, text=True, timeout=TIMEOUT * 4)
    assert done.returncode == 0, (f"client {scenario} failed:\n{done.stderr[-3000:]}\n"
                                  f"node log:\n{node.process.log()[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_goal_on_the_camera_frame_finds_the_knife_with_feedback_and_the_typed_topic(action_node):
    out = run_client(action_node, "knife")
    assert (out["status"], out["code"]) == ("SUCCEEDED", "ok")
    # every stage reported, in order (a stage may repeat while it lasts)
    stages = [s for s in dict.fromkeys(out["feedback"]) if s != "queued"]
    assert stages == ["waiting_for_frame", "encoding", "reasoning", "decoding"], out["feedback"]
    assert out["instances"] == 1 and out["iou"] >= 0.6, out
    assert out["mask_encoding"] == "mono8" and out["mask_size"] == [240, 320]  # full frame, not cropped
    assert out["frame_id"] == "camera_color_optical_frame" and out["result_json_masks"] == 1
    assert out["topic_equal"], "~/segmentation must carry the action's answer for the same frame"


def test_cancel_while_waiting_for_a_frame_returns_canceled(action_node):
    out = run_client(action_node, "cancel")
    assert set(out["feedback_before_cancel"]) == {"waiting_for_frame"}  # repeated each second while waiting
    assert (out["status"], out["code"]) == ("CANCELED", "canceled")


def test_bad_goals_abort_with_the_library_codes_and_the_node_keeps_serving(action_node):
    out = run_client(action_node, "bad_goals")
    expected = {"no_frame": "no_frame", "malformed_image": "invalid_image", "bad_encoding": "invalid_image",
                "empty_instruction": "invalid_query", "too_long": "too_large", "bad_mode": "invalid_argument"}
    for name, code in expected.items():
        assert (out[name]["status"], out[name]["code"]) == ("ABORTED", code), (name, out[name])
        assert out[name]["message"] and out[name]["advice"], name
    assert "/camera/image" in out["no_frame"]["message"]
    assert (out["good_after"]["status"], out["good_after"]["code"]) == ("SUCCEEDED", "ok")
    assert out["good_after"]["instances"] == 1
    assert action_node.process.alive()


def test_preempt_policy_supersedes_the_running_goal(action_node):
    out = run_client(action_node, "preempt")
    assert (out["first"]["status"], out["first"]["code"]) == ("ABORTED", "superseded")
    assert (out["second"]["status"], out["second"]["code"]) == ("SUCCEEDED", "ok")


def test_segment_service(action_node):
    out = run_client(action_node, "service")
    assert out == {"code": "ok", "instances": 1, "bad_code": "invalid_query"}


def test_goal_with_depth_gets_the_knifes_target_and_grasp_pose(action_node):
    """Depth + CameraInfo in the goal: the knife's 3D target and the library's grasp of the returned mask, whose
    long axis in the image agrees with the knife's known pose (the tabletop's rendered depth; the mask is the
    model's, IoU ~0.8)."""
    out = run_client(action_node, "grasp")
    assert (out["status"], out["code"]) == ("SUCCEEDED", "ok")
    assert out["has_target"] and out["has_grasp"] and 0.4 < out["depth_m"] < 1.0
    assert out["grasp_frame"] == "camera_color_optical_frame" and 0 < out["width_m"] < 0.1
    assert out["library_angle_diff"] < 0.01 and out["position_vs_target"] < 1e-4  # the library's grasp, typed
    assert out["angle_error_deg"] < 10, out  # the model's knife mask (IoU ~0.8) still gives the knife's axis

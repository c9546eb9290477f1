"""An action client of ``lisa_node`` in its own process (tests/test_ros_action.py runs it after sourcing the
colcon workspace that holds ``lisa_interfaces``). Usage::

    python tests/ros_action_client.py SCENARIO [--node /lisa_node] [--timeout 120]

Scenarios: ``knife`` (publish a tabletop frame as the camera; goal without image; feedback, result, the typed
topic's message for the same frame, IoU with the knife), ``cancel`` (goal waiting for a frame that never comes,
canceled), ``bad_goals`` (no frame, malformed image, empty instruction, bad mode, then a good goal with its own
image), ``preempt`` (action_policy preempt: a second goal supersedes the first), ``service`` (the Segment
service), ``grasp`` (a goal with depth and CameraInfo: 3D target and grasp pose of the knife). Prints one JSON line (the last line of stdout) with what happened.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any

import numpy as np
import rclpy
from action_msgs.msg import GoalStatus
from lisa_interfaces.action import Segment
from lisa_interfaces.msg import Segmentation
from lisa_interfaces.srv import Segment as SegmentService
from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from rclpy.action import ActionClient
from rclpy.executors import MultiThreadedExecutor
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image

from lisa_agent.data.tabletop import render_scene, split_seed
from ros_nodes.conversions import image_to_array, to_image_msg

RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
#: A held-out tabletop scene with a knife (and no scissors) on which tabletop-tiny finds it (IoU 0.81).
KNIFE_SCENE = ("test", 969)
SIZE = (240, 320)
STATUS = {GoalStatus.STATUS_SUCCEEDED: "SUCCEEDED", GoalStatus.STATUS_CANCELED: "CANCELED",
          GoalStatus.STATUS_ABORTED: "ABORTED"}


def knife_scene() -> Any:
    return render_scene(split_seed(*KNIFE_SCENE), size=SIZE)


def rgb_msg(rgb: np.ndarray, frame_id: str = "camera_color_optical_frame") -> Image:
    msg = to_image_msg(rgb, "rgb8")
    ns = time.time_ns()
    msg.header.frame_id = frame_id
    msg.header.stamp.sec, msg.header.stamp.nanosec = ns // 10**9, ns % 10**9
    return msg


class Client:
    """A node with the action client, a camera publisher and a ``~/segmentation`` subscription."""

    def __init__(self, node_ns: str) -> None:
        rclpy.init()
        self.node = rclpy.create_node("segment_client")
        self.ns = node_ns
        self.action = ActionClient(self.node, Segment, f"{node_ns}/segment")
        self.camera = self.node.create_publisher(Image, "/camera/image", RELIABLE)
        self.typed: list[Any] = []
        self.node.create_subscription(Segmentation, f"{node_ns}/segmentation", self.typed.append, RELIABLE)
        self.executor = MultiThreadedExecutor(num_threads=2)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        self.thread.join(5.0)
        self.node.destroy_node()
        rclpy.try_shutdown()

    def wait(self, future: Any, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while not future.done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"no answer within {timeout:.0f} s")
            time.sleep(0.01)
        return future.result()

    def send(self, goal: Any, timeout: float, feedback: list[str] | None = None) -> Any:
        """Send ``goal``; returns its accepted goal handle (raises when rejected)."""
        def on_feedback(msg: Any) -> None:
            if feedback is not None:
                feedback.append(msg.feedback.stage)
        handle = self.wait(self.action.send_goal_async(goal, feedback_callback=on_feedback), timeout)
        if not handle.accepted:
            raise RuntimeError("goal rejected")
        return handle

    def outcome(self, handle: Any, timeout: float) -> dict[str, Any]:
        res = self.wait(handle.get_result_async(), timeout)
        r = res.result
        return {"status": STATUS.get(res.status, str(res.status)), "code": r.code, "message": r.message,
                "advice": r.advice, "instances": len(r.segmentation.instances)}, r

    def set_parameter(self, name: str, value: str, timeout: float) -> None:
        client = self.node.create_client(SetParameters, f"{self.ns}/set_parameters")
        assert client.wait_for_service(timeout_sec=timeout)
        param = Parameter(name=name, value=ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=value))
        reply = self.wait(client.call_async(SetParameters.Request(parameters=[param])), timeout)
        assert reply.results[0].successful, reply.results[0].reason


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def knife(c: Client, timeout: float) -> dict[str, Any]:
    scene = knife_scene()
    truth = next(o.mask for o in scene.objects if o.category == "knife")
    frame = rgb_msg(scene.image)
    stop = threading.Event()

    def camera() -> None:  # a camera at ~10 Hz, fresh stamps
        while not stop.is_set():
            c.camera.publish(rgb_msg(scene.image))
            time.sleep(0.1)
    threading.Thread(target=camera, daemon=True).start()
    try:
        feedback: list[str] = []
        handle = c.send(Segment.Goal(instruction="grab something to cut with", max_age_s=5.0, frame_timeout_s=60.0),
                        timeout, feedback)
        out, result = c.outcome(handle, timeout)
    finally:
        stop.set()
    seg = result.segmentation
    out["feedback"] = feedback
    if seg.instances:
        inst = seg.instances[0]
        mask = image_to_array(inst.mask) > 0
        out.update(iou=_iou(mask, truth), label=inst.label, mask_encoding=inst.mask.encoding,
                   mask_size=[inst.mask.height, inst.mask.width], frame_id=seg.header.frame_id,
                   answer=seg.answer, result_json_masks=len(json.loads(seg.result_json)["masks"]))
        # the typed topic's message for the same frame equals the action's result
        deadline = time.monotonic() + timeout
        stamp = (seg.header.stamp.sec, seg.header.stamp.nanosec)
        match = None
        while match is None and time.monotonic() < deadline:
            match = next((m for m in list(c.typed) if (m.header.stamp.sec, m.header.stamp.nanosec) == stamp), None)
            time.sleep(0.05)
        out["topic_equal"] = match is not None and _same(match, seg)
    del frame
    return out


def _same(a: Any, b: Any) -> bool:
    """Two Segmentation messages say the same (everything but latency)."""
    if (a.answer, a.instruction, a.mode, a.source, len(a.instances)) != (b.answer, b.instruction, b.mode, b.source,
                                                                        len(b.instances)):
        return False
    for x, y in zip(a.instances, b.instances, strict=True):
        if (x.label, x.score, x.area, bytes(x.mask.data)) != (y.label, y.score, y.area, bytes(y.mask.data)):
            return False
    return json.loads(a.result_json)["masks"] == json.loads(b.result_json)["masks"]


def cancel(c: Client, timeout: float) -> dict[str, Any]:
    feedback: list[str] = []
    # no camera frame can be 1 microsecond old: the goal waits for one until canceled
    handle = c.send(Segment.Goal(instruction="the knife", max_age_s=1e-6, frame_timeout_s=600.0), timeout, feedback)
    deadline = time.monotonic() + timeout
    while "waiting_for_frame" not in feedback and time.monotonic() < deadline:
        time.sleep(0.02)
    seen = list(feedback)
    c.wait(handle.cancel_goal_async(), timeout)
    out, _ = c.outcome(handle, timeout)
    out["feedback_before_cancel"] = seen
    return out


def bad_goals(c: Client, timeout: float) -> dict[str, Any]:
    scene = knife_scene()
    image = rgb_msg(scene.image)
    short = rgb_msg(scene.image)
    short.data = bytes(short.data)[: len(short.data) // 2]  # half the rows missing
    odd = rgb_msg(scene.image)
    odd.encoding = "yuv422_weird"
    goals = {
        "no_frame": Segment.Goal(instruction="the knife", max_age_s=1e-6, frame_timeout_s=1.0),
        "malformed_image": Segment.Goal(instruction="the knife", image=short),
        "bad_encoding": Segment.Goal(instruction="the knife", image=odd),
        "empty_instruction": Segment.Goal(instruction="   ", image=image),
        "too_long": Segment.Goal(instruction="knife " * 1000, image=image),
        "bad_mode": Segment.Goal(instruction="the knife", mode="telepathy", image=image),
        "good_after": Segment.Goal(instruction="grab something to cut with", image=image),
    }
    out = {}
    for name, goal in goals.items():
        out[name], _ = c.outcome(c.send(goal, timeout), timeout)
    return out


def preempt(c: Client, timeout: float) -> dict[str, Any]:
    c.set_parameter("action_policy", "preempt", timeout)
    try:
        first_feedback: list[str] = []
        first = c.send(Segment.Goal(instruction="the knife", max_age_s=1e-6, frame_timeout_s=600.0), timeout,
                       first_feedback)
        deadline = time.monotonic() + timeout
        while "waiting_for_frame" not in first_feedback and time.monotonic() < deadline:
            time.sleep(0.02)
        second = c.send(Segment.Goal(instruction="grab something to cut with", image=rgb_msg(knife_scene().image)),
                        timeout)
        out_first, _ = c.outcome(first, timeout)
        out_second, _ = c.outcome(second, timeout)
    finally:
        c.set_parameter("action_policy", "queue", timeout)
    return {"first": out_first, "second": out_second}


def grasp(c: Client, timeout: float) -> dict[str, Any]:
    """A goal with its own image, aligned depth and CameraInfo (the tabletop's rendered depth): 3D target and
    grasp pose of the knife; its long axis's image angle against the knife's drawn angle, and against the
    library's grasp of the same mask."""
    from sensor_msgs.msg import CameraInfo

    from lisa_agent.data.tabletop_depth import render_depth
    from lisa_agent.geometry import depth_to_meters, mask_grasp

    scene = knife_scene()
    depth, camera = render_depth(scene)
    image = rgb_msg(scene.image)
    depth_msg = to_image_msg(depth, "16UC1")
    depth_msg.header = image.header
    k = camera.intrinsics
    info = CameraInfo(header=image.header, height=SIZE[0], width=SIZE[1], distortion_model="plumb_bob")
    info.k = [k.fx, 0.0, k.cx, 0.0, k.fy, k.cy, 0.0, 0.0, 1.0]
    out, result = c.outcome(c.send(Segment.Goal(instruction="grab something to cut with", image=image,
                                                depth=depth_msg, camera_info=info), timeout), timeout)
    if result.segmentation.instances:
        inst = result.segmentation.instances[0]
        knife = next(o for o in scene.objects if o.category == "knife")
        diff = abs(inst.grasp_angle_deg - knife.angle) % 180.0
        # the library's grasp of the returned mask on the same depth: the message carries exactly it
        mask = image_to_array(inst.mask) > 0
        library = mask_grasp(depth_to_meters(depth), mask, camera.intrinsics)
        p = inst.grasp.pose.position
        out.update(has_target=inst.has_target, has_grasp=inst.has_grasp, depth_m=inst.depth_m,
                   grasp_frame=inst.grasp.header.frame_id, width_m=inst.grasp_width_m,
                   angle_error_deg=min(diff, 180.0 - diff),
                   library_angle_diff=abs(library.angle_deg - inst.grasp_angle_deg) if library else None,
                   position_vs_target=abs(p.z - inst.target.point.z) + abs(p.x - inst.target.point.x))
    return out


def service(c: Client, timeout: float) -> dict[str, Any]:
    client = c.node.create_client(SegmentService, f"{c.ns}/segment")
    assert client.wait_for_service(timeout_sec=timeout)
    request = SegmentService.Request(instruction="grab something to cut with", image=rgb_msg(knife_scene().image))
    reply = c.wait(client.call_async(request), timeout)
    bad = c.wait(client.call_async(SegmentService.Request(instruction="")), timeout)
    return {"code": reply.code, "instances": len(reply.segmentation.instances), "bad_code": bad.code}


SCENARIOS = {"knife": knife, "cancel": cancel, "bad_goals": bad_goals, "preempt": preempt, "service": service,
             "grasp": grasp}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--node", default="/lisa_node")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    c = Client(args.node)
    try:
        if not c.action.wait_for_server(timeout_sec=args.timeout):
            raise SystemExit(f"no Segment action server at {args.node}/segment within {args.timeout:.0f} s")
        out = SCENARIOS[args.scenario](c, args.timeout)
    finally:
        c.close()
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()

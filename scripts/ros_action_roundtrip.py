"""Goal round trip of lisa_node: the Segment action vs the instruction topic, on one tabletop frame.

Starts ``lisa_node`` (``--model``, default the bundled ``tabletop-tiny``, CPU fp32) in its own process, plays a
camera publishing a held-out tabletop frame, then times N requests each way from this process:

* action: ``send_goal`` (newest camera frame) -> result received;
* topic: a String on ``~/instruction`` -> the ``~/segmentation`` message of that request.

Both answer the same frame with the same model; the difference is the interface. Needs the colcon workspace
with ``lisa_interfaces`` sourced (docs/ros.md)::

    source ws/install/setup.bash
    ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST ROS_DOMAIN_ID=95 python scripts/ros_action_roundtrip.py --n 20
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import rclpy
from lisa_interfaces.action import Segment
from lisa_interfaces.msg import Segmentation
from rclpy.action import ActionClient
from rclpy.executors import MultiThreadedExecutor
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image
from std_msgs.msg import String

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lisa_agent.data.tabletop import render_scene, split_seed  # noqa: E402
from ros_nodes.conversions import to_image_msg  # noqa: E402

RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20, help="requests each way")
    parser.add_argument("--model", default="tabletop-tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args()

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    node_proc = subprocess.Popen([sys.executable, "-m", "ros_nodes.lisa_node", "--ros-args", "-p", f"model:={args.model}",
                                  "-p", f"device:={args.device}", "-p", f"dtype:={args.dtype}", "-p",
                                  "camera_qos:=reliable", "-p", "image_topic:=/camera/image", "-p",
                                  "publish_overlay:=false"], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
    rclpy.init()
    node = rclpy.create_node("roundtrip_client")
    action = ActionClient(node, Segment, "/lisa_node/segment")
    camera = node.create_publisher(Image, "/camera/image", RELIABLE)
    instruction = node.create_publisher(String, "/lisa_node/instruction", RELIABLE)
    typed: list[tuple[float, Segmentation]] = []
    cond = threading.Condition()

    def on_typed(msg: Segmentation) -> None:
        with cond:
            typed.append((time.perf_counter(), msg))
            cond.notify_all()
    node.create_subscription(Segmentation, "/lisa_node/segmentation", on_typed, RELIABLE)
    executor = MultiThreadedExecutor(num_threads=2)
    executor.add_node(node)
    threading.Thread(target=executor.spin, daemon=True).start()
    scene = render_scene(split_seed("test", 969), size=(240, 320))

    count = [0]

    def frame() -> Image:
        """The scene with one pixel changed per request: new pixels, so the engine encodes every frame (no
        feature-cache hit), as with a live camera."""
        count[0] += 1
        rgb = scene.image.copy()
        rgb[0, 0] = (count[0] % 256, count[0] // 256 % 256, 7)
        msg = to_image_msg(rgb, "rgb8")
        ns = time.time_ns()
        msg.header.frame_id = "camera_color_optical_frame"
        msg.header.stamp.sec, msg.header.stamp.nanosec = ns // 10**9, ns % 10**9
        return msg

    try:
        if not action.wait_for_server(timeout_sec=300):
            raise SystemExit("lisa_node's Segment action did not come up")
        while instruction.get_subscription_count() == 0 or camera.get_subscription_count() == 0:
            time.sleep(0.05)
        action_ms, topic_ms = [], []
        for _ in range(args.n + 2):  # two warm-up rounds each way
            camera.publish(frame())
            time.sleep(0.05)
            t0 = time.perf_counter()
            handle = action.send_goal_async(Segment.Goal(instruction="grab something to cut with", max_age_s=5.0))
            while not handle.done():
                time.sleep(0.0005)
            result = handle.result().get_result_async()
            while not result.done():
                time.sleep(0.0005)
            action_ms.append((time.perf_counter() - t0) * 1000)
            assert result.result().result.code == "ok", result.result().result.message

            msg = frame()
            camera.publish(msg)
            time.sleep(0.05)
            with cond:
                since = len(typed)
            t0 = time.perf_counter()
            instruction.publish(String(data="grab something to cut with"))
            with cond:
                while not any(m.header.stamp == msg.header.stamp for _, m in typed[since:]):
                    if not cond.wait(60):
                        raise SystemExit("no ~/segmentation for the topic request within 60 s")
                t1 = next(t for t, m in typed[since:] if m.header.stamp == msg.header.stamp)
            topic_ms.append((t1 - t0) * 1000)
        action_ms, topic_ms = action_ms[2:], topic_ms[2:]
        report = {"n": args.n, "model": args.model, "device": args.device, "dtype": args.dtype,
                  "action_median_ms": round(statistics.median(action_ms), 1),
                  "topic_median_ms": round(statistics.median(topic_ms), 1),
                  "action_p90_ms": round(sorted(action_ms)[int(0.9 * (len(action_ms) - 1))], 1),
                  "topic_p90_ms": round(sorted(topic_ms)[int(0.9 * (len(topic_ms) - 1))], 1)}
        print(json.dumps(report))
    finally:
        executor.shutdown(timeout_sec=2.0)
        node.destroy_node()
        rclpy.try_shutdown()
        node_proc.send_signal(signal.SIGINT)
        node_proc.wait(20)


if __name__ == "__main__":
    main()

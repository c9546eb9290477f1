"""A behaviour-tree-style caller of lisa_node's Segment action (plain rclpy): tick -> RUNNING / SUCCESS / FAILURE.

A behaviour tree leaf (BehaviorTree.ROS2's RosActionNode, a py_trees behaviour) does the same: send the goal on
its first tick, report RUNNING while feedback comes, then SUCCESS with the grasp pose or FAILURE with the
error's code, and cancel when the tree halts it. Run it next to a running node (workspace sourced)::

    python examples/segment_action_client.py "grab something to cut with"
"""

from __future__ import annotations

import sys
import time

import rclpy
from action_msgs.msg import GoalStatus
from lisa_interfaces.action import Segment
from rclpy.action import ActionClient
from rclpy.node import Node


class SegmentLeaf:
    """One behaviour-tree leaf: ``tick()`` returns ``RUNNING``, ``SUCCESS`` or ``FAILURE``; ``halt()`` cancels."""

    def __init__(self, node: Node, instruction: str, action: str = "/lisa_node/segment") -> None:
        self.node, self.instruction = node, instruction
        self.client = ActionClient(node, Segment, action)
        self.goal_future = self.result_future = self.handle = None
        self.stage, self.result = "", None

    def tick(self) -> str:
        if self.goal_future is None:  # first tick: send the goal (the newest camera frame, at most 1 s old)
            goal = Segment.Goal(instruction=self.instruction, max_age_s=1.0, frame_timeout_s=10.0)
            self.goal_future = self.client.send_goal_async(goal, feedback_callback=self._feedback)
            return "RUNNING"
        if self.handle is None:
            if not self.goal_future.done():
                return "RUNNING"
            self.handle = self.goal_future.result()
            if not self.handle.accepted:
                return "FAILURE"
            self.result_future = self.handle.get_result_async()
        if not self.result_future.done():
            return "RUNNING"
        response = self.result_future.result()
        self.result = response.result
        return "SUCCESS" if response.status == GoalStatus.STATUS_SUCCEEDED and self.result.segmentation.instances \
            else "FAILURE"

    def halt(self) -> None:
        if self.handle is not None:
            self.handle.cancel_goal_async()

    def _feedback(self, msg: Segment.Impl.FeedbackMessage) -> None:
        self.stage = msg.feedback.stage


def main() -> int:
    rclpy.init()
    node = rclpy.create_node("segment_leaf")
    leaf = SegmentLeaf(node, " ".join(sys.argv[1:]) or "grab something to cut with")
    if not leaf.client.wait_for_server(timeout_sec=30.0):
        print("no Segment action server at /lisa_node/segment")
        return 1
    status = "RUNNING"
    while status == "RUNNING":  # the tree's tick loop
        rclpy.spin_once(node, timeout_sec=0.1)
        status = leaf.tick()
        print(f"\r{status:8s} {leaf.stage:20s}", end="", flush=True)
        time.sleep(0.05)
    result = leaf.result
    if result is None:  # the server refused the goal (action_policy queue: one runs and one waits already)
        print(f"\n{status}: goal rejected")
        node.destroy_node()
        rclpy.try_shutdown()
        return 2
    print(f"\n{status}: code {result.code} {result.message}".rstrip())
    for inst in result.segmentation.instances if status == "SUCCESS" else []:
        p, q = inst.grasp.pose.position, inst.grasp.pose.orientation
        grasp = (f"grasp at ({p.x:.3f}, {p.y:.3f}, {p.z:.3f}) m, quaternion ({q.x:.3f}, {q.y:.3f}, {q.z:.3f}, "
                 f"{q.w:.3f}), open {inst.grasp_width_m * 100:.1f} cm" if inst.has_grasp else "no depth: no grasp")
        print(f"  {inst.label}: score {inst.score:.2f}, {inst.area} px; {grasp}")
    node.destroy_node()
    rclpy.try_shutdown()
    return 0 if status == "SUCCESS" else 2


if __name__ == "__main__":
    sys.exit(main())

"""The console's ``--source ros:TOPIC``: a ROS 2 image topic as a :class:`lisa_agent.console.sources.FrameSource`.

The ROS side provides it to the library through the ``lisa_agent.frame_sources`` entry point (``ros =
ros_nodes.console_source:open_ros_source``, declared for pip in pyproject.toml and for colcon in setup.py), so
``lisa_agent`` never imports ROS itself.
"""

from __future__ import annotations

import time

from lisa_agent.console.sources import SourceFrame
from lisa_agent.errors import LisaError
from lisa_agent.frames import Frame, Stamp

from .camera_source import RosCameraSource


class RosTopicSource:
    """A ROS 2 image topic (sensor_msgs Image, or CompressedImage for a topic ending in ``/compressed``) read by a
    :class:`~ros_nodes.camera_source.RosCameraSource` in its own rclpy context."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self._camera = RosCameraSource(topic, compressed=topic.rstrip("/").endswith("/compressed"))
        self._taken = 0

    def read(self, timeout: float = 1.0) -> SourceFrame | None:
        deadline = time.monotonic() + timeout
        while self._camera.frames_received <= self._taken:
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.005)
        self._taken = self._camera.frames_received
        try:
            latest = self._camera.latest_frame()
        except LisaError:  # an undecodable frame: skip it
            return None
        if latest is None:
            return None
        frame = Frame(latest.image, frame_id=latest.frame_id or None, stamp=Stamp(latest.sec, latest.nanosec))
        return SourceFrame(self._taken - 1, frame)

    def describe(self) -> str:
        return f"ROS 2 topic {self.topic}"

    def close(self) -> None:
        self._camera.close()


def open_ros_source(topic: str) -> RosTopicSource:
    """The ``ros`` frame source of ``lisa-agent console --source ros:TOPIC`` (the entry point's factory)."""
    return RosTopicSource(topic)

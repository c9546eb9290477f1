"""A ROS 2 camera as the image source of the LangChain tool: "segment what the camera sees now".

::

    from lisa_agent.integrations.langchain import lisa_tools
    from ros_nodes.camera_source import RosCameraSource

    camera = RosCameraSource("/camera/color/image_raw", depth_topic="/camera/aligned_depth_to_color/image_raw",
                             camera_info_topic="/camera/color/camera_info")
    tools = lisa_tools(segmenter, image_source=camera, depth_source=camera.latest_depth,
                       intrinsics=camera.intrinsics)
    ...
    camera.close()

The source runs its own rclpy context, node and executor in a daemon thread, so it works beside
(or without) the caller's own ROS setup. Callbacks only keep the newest message; decoding happens
when the tool asks. Calling the source returns ``(frame, stamp)``: an HxWx3 uint8 RGB array and
the header stamp in seconds (float), or ``(None, None)`` before the first frame.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from lisa_agent.errors import InvalidArgumentError

from .conversions import camera_info_intrinsics, compressed_to_rgb, image_to_array, image_to_rgb


@dataclass(frozen=True)
class CameraFrame:
    """One decoded frame: ``image`` HxWx3 uint8 RGB, ``stamp`` seconds, ``frame_id`` of its header."""

    image: np.ndarray
    stamp: float
    frame_id: str
    sec: int
    nanosec: int


class RosCameraSource:
    """Newest camera frame on demand.

    Args:
        image_topic: sensor_msgs/Image topic (rgb8, bgr8, rgba8, bgra8, mono8), or the
            sensor_msgs/CompressedImage topic with ``compressed=True``.
        compressed: subscribe to CompressedImage (JPEG/PNG).
        depth_topic: optional aligned depth (16UC1 mm or 32FC1 m), served by :meth:`latest_depth`.
        camera_info_topic: optional CameraInfo, served by :meth:`intrinsics`.
        qos: ``best_effort`` (what cameras publish) or ``reliable``.
        domain_id: DDS domain (default: ``ROS_DOMAIN_ID`` from the environment).
        node_name: name of the source's node.
    """

    def __init__(self, image_topic: str, *, compressed: bool = False, depth_topic: str | None = None,
                 camera_info_topic: str | None = None, qos: str = "best_effort", domain_id: int | None = None,
                 node_name: str = "lisa_camera_source") -> None:
        if qos not in ("best_effort", "reliable"):
            raise InvalidArgumentError(f"qos must be 'best_effort' or 'reliable'; got {qos!r}")
        reliability = ReliabilityPolicy.RELIABLE if qos == "reliable" else ReliabilityPolicy.BEST_EFFORT
        profile = QoSProfile(depth=1, reliability=reliability, history=HistoryPolicy.KEEP_LAST)
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._image: Any = None
        self._depth: Any = None
        self._info: Any = None
        self._decoded: tuple[int, CameraFrame] | None = None
        self._count = 0
        self.context = rclpy.Context()
        if domain_id is None:
            rclpy.init(context=self.context)
        else:
            rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node(node_name, context=self.context)
        kind = CompressedImage if compressed else Image
        self.node.create_subscription(kind, image_topic, self._on_image, profile)
        if depth_topic:
            self.node.create_subscription(Image, depth_topic, self._on_depth, profile)
        if camera_info_topic:
            self.node.create_subscription(CameraInfo, camera_info_topic, self._on_info, profile)
        self._executor = SingleThreadedExecutor(context=self.context)
        self._executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, name=f"{node_name}-spin", daemon=True)
        self._thread.start()

    # callbacks: store only
    def _on_image(self, msg: Any) -> None:
        with self._arrived:
            self._image = msg
            self._count += 1
            self._arrived.notify_all()

    def _on_depth(self, msg: Any) -> None:
        with self._lock:
            self._depth = msg

    def _on_info(self, msg: Any) -> None:
        with self._lock:
            self._info = msg

    def _spin(self) -> None:
        try:
            self._executor.spin()
        except Exception:  # noqa: BLE001 - the context was shut down under the executor
            pass

    @property
    def frames_received(self) -> int:
        with self._lock:
            return self._count

    def latest_frame(self) -> CameraFrame | None:
        """The newest frame, decoded (cached until a newer one arrives), or None before the first.

        Raises:
            InvalidImageError: the newest frame cannot be decoded (unsupported encoding, bad data).
        """
        with self._lock:
            msg, count, cached = self._image, self._count, self._decoded
        if msg is None:
            return None
        if cached is not None and cached[0] == count:
            return cached[1]
        image = compressed_to_rgb(msg) if isinstance(msg, CompressedImage) else image_to_rgb(msg)
        sec, nanosec = int(msg.header.stamp.sec), int(msg.header.stamp.nanosec)
        frame = CameraFrame(image=image, stamp=sec + nanosec * 1e-9, frame_id=str(msg.header.frame_id),
                            sec=sec, nanosec=nanosec)
        with self._lock:
            self._decoded = (count, frame)
        return frame

    def latest(self) -> tuple[np.ndarray | None, float | None]:
        """``(frame, stamp)``: newest HxWx3 uint8 RGB frame and its stamp in seconds; (None, None) before one."""
        frame = self.latest_frame()
        return (None, None) if frame is None else (frame.image, frame.stamp)

    __call__ = latest

    def latest_depth(self) -> tuple[np.ndarray | None, float | None]:
        """``(depth, stamp)``: newest depth image as sent (HxW uint16 mm or float32 m); (None, None) before one."""
        with self._lock:
            msg = self._depth
        if msg is None:
            return None, None
        return image_to_array(msg), int(msg.header.stamp.sec) + int(msg.header.stamp.nanosec) * 1e-9

    def intrinsics(self) -> Any:
        """:class:`lisa_agent.geometry.Intrinsics` from the newest CameraInfo, or None before one."""
        with self._lock:
            msg = self._info
        return None if msg is None else camera_info_intrinsics(msg)[0]

    def wait_for_frame(self, timeout: float = 5.0) -> CameraFrame:
        """Block until a frame has arrived (or raise TimeoutError) and return the newest."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while self._image is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no frame within {timeout} s")
                self._arrived.wait(left)
        frame = self.latest_frame()
        assert frame is not None
        return frame

    def close(self) -> None:
        """Stop the executor thread and shut the source's context down."""
        self._executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._thread.join(2.0)

    def __enter__(self) -> RosCameraSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""What ``lisa_node`` publishes for one answered frame, each message stamped with the source frame's header.

``~/mask`` (mono8, value k+1 inside mask k), ``~/overlay`` (rgb8) and ``~/overlay/compressed`` (JPEG;
both rendered only when someone subscribes), ``~/answer`` (String), ``~/result`` (String: the result
schema plus the node's envelope, :func:`ros_nodes.outputs.result_json`), ``~/target_point``
(PointStamped, the first mask's 3D point when there is one), ``~/markers`` (MarkerArray) and
``~/detections`` (vision_msgs/Detection2DArray, only where vision_msgs is installed). With the node's
``foxglove_port`` set, the same frame and result also go to a Foxglove live view
(:class:`lisa_agent.integrations.foxglove.FoxglovePublisher`: the frame, the masks as ImageAnnotations, the answer,
the result and the 3D targets).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from geometry_msgs.msg import PointStamped
from rclpy.node import Node
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String
from visualization_msgs.msg import MarkerArray

from lisa_agent.frames import Stamp
from lisa_agent.labels import answer_message, is_declined, mask_labels
from lisa_agent.result import SegmentationResult

from . import outputs
from .conversions import encode_jpeg, to_image_msg
from .parameters import RELIABLE


class ResultPublisher:
    """The node's output publishers (created on ``node`` at construction) and how one frame's result goes out."""

    def __init__(self, node: Node) -> None:
        self.mask = node.create_publisher(Image, "~/mask", RELIABLE)
        self.overlay = node.create_publisher(Image, "~/overlay", RELIABLE)
        self.overlay_jpeg = node.create_publisher(CompressedImage, "~/overlay/compressed", RELIABLE)
        self.answer = node.create_publisher(String, "~/answer", RELIABLE)
        self.result = node.create_publisher(String, "~/result", RELIABLE)
        self.point = node.create_publisher(PointStamped, "~/target_point", RELIABLE)
        self.markers = node.create_publisher(MarkerArray, "~/markers", RELIABLE)
        self.detections = None
        #: a lisa_agent.integrations.foxglove.FoxglovePublisher when the node's foxglove_port is set
        self.foxglove: Any = None
        if outputs.HAVE_VISION_MSGS:
            self.detections = node.create_publisher(outputs.Detection2DArray, "~/detections", RELIABLE)

    def publish(self, result: SegmentationResult, rgb: np.ndarray, source_header: Any, report: outputs.FrameReport,
                *, overlay: bool, depth_missing: str | None = None, result_json: str | None = None) -> None:
        """Publish every output of ``result`` (computed on ``rgb``, HxWx3 uint8) with ``source_header``
        (``result_json``: the ``~/result`` text when the caller made it already, :func:`outputs.result_json`)."""
        header = outputs.copy_header(source_header)
        self.mask.publish(to_image_msg(result.label_mask(), "mono8", header))
        if overlay:
            raw = self.overlay.get_subscription_count() > 0
            jpeg = self.overlay_jpeg.get_subscription_count() > 0
            if raw or jpeg:
                picture = result.overlay(rgb)
                if raw:
                    self.overlay.publish(to_image_msg(picture, "rgb8", header))
                if jpeg:
                    msg = CompressedImage(header=header, format="jpeg")
                    msg.data = encode_jpeg(picture)
                    self.overlay_jpeg.publish(msg)
        self.answer.publish(outputs.answer_msg(result))
        point = outputs.first_point(result)
        if point is not None:
            self.point.publish(outputs.point_msg(header, point))
        self.markers.publish(outputs.markers_msg(header, result))
        if self.detections is not None:
            self.detections.publish(outputs.detections_msg(header, result))
        if result_json is None:
            result_json = outputs.result_json(result, report, depth_missing=depth_missing)
        self.result.publish(String(data=result_json))
        if self.foxglove is not None:
            self._publish_foxglove(result, rgb, source_header, report)

    def _publish_foxglove(self, result: SegmentationResult, rgb: np.ndarray, source_header: Any,
                          report: outputs.FrameReport) -> None:
        """The frame and its result on the Foxglove live view, stamped with the source frame's stamp."""
        stamp = Stamp(int(source_header.stamp.sec), int(source_header.stamp.nanosec))
        self.foxglove.publish_image(encode_jpeg(rgb), stamp, str(source_header.frame_id))
        self.foxglove.publish_result(result, mask_labels(result.text, len(result)), request=report.request,
                                     declined=is_declined(result), message=answer_message(result),
                                     latency_ms=report.latency_ms,
                                     envelope={"request": report.request, "frame_seq": report.frame_seq,
                                               "latency_ms": round(report.latency_ms, 3)})

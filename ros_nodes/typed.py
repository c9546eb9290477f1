"""Typed ``lisa_interfaces`` messages of a result: a ``Segmentation`` with one ``Instance`` per mask.

Pure builders (no node): :func:`segmentation_msg` turns a :class:`~lisa_agent.result.SegmentationResult` and
the source frame's header into what ``~/segmentation`` publishes and the ``Segment`` action returns. Each
instance's mask is a mono8 image of the full source frame (255 inside), so it lines up with the colour and
the aligned depth image; its 3D target (``PointStamped``) and grasp (``PoseStamped``) are in the source
header's frame (the camera optical frame). This module imports ``lisa_interfaces``: it exists where the
interfaces are built (``colcon build``, see docs/ros.md); the node runs without it (no action, no typed topic).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from geometry_msgs.msg import PoseStamped
from lisa_interfaces.msg import Instance, Segmentation
from sensor_msgs.msg import RegionOfInterest

from lisa_agent.labels import mask_labels
from lisa_agent.result import SegmentationResult

from .conversions import to_image_msg
from .outputs import copy_header, point_msg, schema_json


def instance_msgs(result: SegmentationResult, header: Any) -> list[Any]:
    """One ``lisa_interfaces/Instance`` per mask of ``result`` (masks N x H x W bool), stamped with ``header``."""
    labels = mask_labels(result.text, len(result.instances))
    confidence = result.track.confidence if result.track is not None else ()
    out = []
    for k, inst in enumerate(result.instances):
        msg = Instance()
        msg.label = labels[k] if k < len(labels) else f"mask {k}"
        msg.score = float(inst.score)
        x1, y1, x2, y2 = (int(v) for v in inst.bbox)
        msg.bbox = RegionOfInterest(x_offset=max(x1, 0), y_offset=max(y1, 0), width=max(x2 - x1 + 1, 0),
                                    height=max(y2 - y1 + 1, 0))
        msg.area = int(inst.area)
        msg.centroid_u, msg.centroid_v = float(inst.centroid[0]), float(inst.centroid[1])
        msg.mask = to_image_msg(np.asarray(result.masks[k], dtype=np.uint8) * 255, "mono8", copy_header(header))
        msg.confidence = float(confidence[k]) if k < len(confidence) else 1.0
        target = result.targets[k] if result.targets is not None and k < len(result.targets) else None
        if target is not None:
            msg.depth_m = float(target.depth_m)
            if target.point is not None:
                msg.has_target = True
                msg.target = point_msg(header, target.point)
            grasp = target.grasp
            if grasp is not None:
                msg.has_grasp = True
                msg.grasp = PoseStamped(header=copy_header(header))
                pos, q = msg.grasp.pose.position, msg.grasp.pose.orientation
                pos.x, pos.y, pos.z = (float(c) for c in grasp.position)
                q.x, q.y, q.z, q.w = (float(c) for c in grasp.quaternion)
                msg.grasp_width_m, msg.grasp_length_m = float(grasp.width_m), float(grasp.length_m)
                msg.grasp_angle_deg, msg.grasp_elongation = float(grasp.angle_deg), float(grasp.elongation)
        out.append(msg)
    return out


def segmentation_msg(result: SegmentationResult, header: Any, *, latency_ms: float = 0.0,
                     inference_ms: float | None = None, result_json: str | None = None) -> Any:
    """The ``lisa_interfaces/Segmentation`` of one answered frame.

    Args:
        result: the engine's result (its ``query``, ``mode``, ``text``, masks, targets, ``track``).
        header: the source frame's ``std_msgs/Header`` (copied).
        latency_ms: source stamp (or arrival) to now.
        inference_ms: the model call as the caller timed it (default: the engine's ``timings_ms["total"]``).
        result_json: the result schema text to carry (default: :func:`~ros_nodes.outputs.schema_json`).
    """
    msg = Segmentation()
    msg.header = copy_header(header)
    msg.instruction, msg.mode, msg.answer = str(result.query), str(result.mode), str(result.text)
    msg.instances = instance_msgs(result, header)
    track = result.track
    msg.source = "reasoned" if track is None else str(track.source)
    msg.age_frames = 0 if track is None else int(track.age_frames)
    msg.age_s = 0.0 if track is None else float(track.age_s)
    total = result.timings_ms.get("total", 0.0) if inference_ms is None else inference_ms
    msg.inference_ms = float(total) if math.isfinite(total) else 0.0
    msg.latency_ms = float(latency_ms)
    msg.depth_note = result.depth_note or ""
    msg.result_json = result_json if result_json is not None else schema_json(result)
    return msg

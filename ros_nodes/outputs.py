"""Messages the node publishes for one answered frame, each stamped with the source frame's header.

Pure builders: they take a ``SegmentationResult`` (its 3D ``targets`` computed by the engine) and
return message objects; :class:`ros_nodes.publishing.ResultPublisher` publishes them. ``vision_msgs`` is not on PyPI, so :func:`detections_msg` exists
only where that package is importable (:data:`HAVE_VISION_MSGS`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from geometry_msgs.msg import PointStamped
from std_msgs.msg import ColorRGBA, Header, String
from visualization_msgs.msg import Marker, MarkerArray

from lisa_agent.encoders import PALETTE
from lisa_agent.result import SegmentationResult

try:  # not on PyPI; present in a ROS distro with ros-<distro>-vision-msgs
    from vision_msgs.msg import Detection2D, Detection2DArray, ObjectHypothesisWithPose

    HAVE_VISION_MSGS = True
except ImportError:  # pragma: no cover - depends on the installation
    HAVE_VISION_MSGS = False


@dataclass
class FrameReport:
    """Timing and bookkeeping of one answered frame, carried into the result JSON.

    Times in milliseconds: ``latency_ms`` from the source stamp (or, for an unstamped frame, from
    its arrival) to publishing; ``queue_ms`` from arrival to the start of inference;
    ``inference_ms`` the model call.
    """

    request: int
    frame_seq: int
    latency_ms: float
    queue_ms: float
    inference_ms: float
    counters: dict[str, int] = field(default_factory=dict)


def copy_header(header: Any) -> Header:
    """A copy of a std_msgs/Header (stamp and frame_id) for an output message."""
    out = Header()
    out.stamp.sec, out.stamp.nanosec = int(header.stamp.sec), int(header.stamp.nanosec)
    out.frame_id = str(header.frame_id)
    return out


def result_json(result: SegmentationResult, report: FrameReport, *, depth_missing: str | None = None) -> str:
    """The ``~/result`` JSON text: the result schema (``docs/result.md``, masks without RLE: the
    ``~/mask`` image carries them, value k+1 for ``masks[k]``; ``stamp`` and ``frame_id`` are the
    source header's) plus the node's envelope keys: ``request``, ``frame_seq``, ``latency_ms``,
    ``queue_ms``, ``inference_ms``, the node's frame counters, and ``depth_missing`` (why the node
    gave the engine no depth although 3D targets are configured, else null).
    """
    payload = {
        **result.to_dict(include_rle=False),
        "depth_missing": depth_missing,
        "request": report.request,
        "frame_seq": report.frame_seq,
        "latency_ms": round(report.latency_ms, 2),
        "queue_ms": round(report.queue_ms, 2),
        "inference_ms": round(report.inference_ms, 2),
        **report.counters,
    }
    return json.dumps(_clean(payload), allow_nan=False)


def schema_json(result: SegmentationResult) -> str:
    """The result schema of ``result`` as strict JSON text (masks without RLE; non-finite numbers null)."""
    return json.dumps(_clean(result.to_dict(include_rle=False)), allow_nan=False)


def answer_msg(result: SegmentationResult) -> String:
    return String(data=str(result.text))


def point_msg(header: Any, point: tuple[float, float, float]) -> PointStamped:
    """geometry_msgs/PointStamped of a target's ``point`` (metres, camera optical frame) in the source frame."""
    msg = PointStamped()
    msg.header = copy_header(header)
    msg.point.x, msg.point.y, msg.point.z = (float(c) for c in point)
    return msg


def first_point(result: SegmentationResult) -> tuple[float, float, float] | None:
    """The 3D point of the first mask, when it has one (what ``~/target_point`` publishes)."""
    if result.targets and result.targets[0] is not None:
        return result.targets[0].point
    return None


def markers_msg(header: Any, result: SegmentationResult, *, lifetime_s: float = 0.0) -> MarkerArray:
    """RViz markers: a DELETEALL, then per mask with a 3D point a sphere and a text label."""
    out = MarkerArray()
    clear = Marker()
    clear.header = copy_header(header)
    clear.ns = "lisa"
    clear.action = Marker.DELETEALL
    out.markers.append(clear)
    for k, target in enumerate(result.targets or []):
        if target is None or target.point is None:
            continue
        r, g, b = (c / 255.0 for c in PALETTE[k % len(PALETTE)])
        sphere = Marker()
        sphere.header = copy_header(header)
        sphere.ns, sphere.id, sphere.type, sphere.action = "lisa", 2 * k, Marker.SPHERE, Marker.ADD
        sphere.pose.position.x, sphere.pose.position.y, sphere.pose.position.z = (float(c) for c in target.point)
        sphere.pose.orientation.w = 1.0
        sphere.scale.x = sphere.scale.y = sphere.scale.z = 0.04
        sphere.color = ColorRGBA(r=r, g=g, b=b, a=0.9)
        _set_lifetime(sphere, lifetime_s)
        label = Marker()
        label.header = copy_header(header)
        label.ns, label.id, label.type, label.action = "lisa", 2 * k + 1, Marker.TEXT_VIEW_FACING, Marker.ADD
        label.pose.position.x, label.pose.position.y = sphere.pose.position.x, sphere.pose.position.y
        label.pose.position.z = sphere.pose.position.z
        label.pose.position.y -= 0.05  # optical frame: y points down, so this is above the sphere
        label.pose.orientation.w = 1.0
        label.scale.z = 0.04
        label.color = ColorRGBA(r=1.0, g=1.0, b=1.0, a=1.0)
        label.text = f"{k + 1}: {result.query[:40]}"
        _set_lifetime(label, lifetime_s)
        out.markers.extend([sphere, label])
    return out


def detections_msg(header: Any, result: SegmentationResult) -> Any:
    """vision_msgs/Detection2DArray (only where vision_msgs is installed): one box per instance."""
    if not HAVE_VISION_MSGS:
        raise RuntimeError("vision_msgs is not installed")
    out = Detection2DArray()
    out.header = copy_header(header)
    for k, inst in enumerate(result.instances):
        x1, y1, x2, y2 = inst.bbox
        if x2 < x1:
            continue
        det = Detection2D()
        det.header = copy_header(header)
        det.id = str(k + 1)
        det.bbox.center.position.x = (x1 + x2) / 2.0
        det.bbox.center.position.y = (y1 + y2) / 2.0
        det.bbox.size_x, det.bbox.size_y = float(x2 - x1 + 1), float(y2 - y1 + 1)
        hyp = ObjectHypothesisWithPose()
        hyp.hypothesis.class_id = result.query[:64]
        hyp.hypothesis.score = float(inst.score)
        det.results.append(hyp)
        out.detections.append(det)
    return out


def _set_lifetime(marker: Marker, seconds: float) -> None:
    marker.lifetime.sec = int(seconds)
    marker.lifetime.nanosec = int((seconds - int(seconds)) * 1e9)


def _clean(value: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value

"""Pairing a colour frame with the depth image closest in time and the camera's intrinsics (no node state).

The node keeps the last depth images (``(stamp_ns, sensor_msgs/Image)``) and the last CameraInfo; for each
frame it answers, :func:`attach_depth` picks the depth image nearest the frame's stamp and hands both to the
engine, which refuses depth further than ``sync_tolerance`` from the colour stamp (``frame.depth_tolerance_s``).
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from lisa_agent.errors import LisaError
from lisa_agent.frames import Frame, Stamp

from .conversions import camera_info_intrinsics, depth_to_meters_array


def attach_depth(frame: Frame, info: Any, candidates: Sequence[tuple[int, Any]], tolerance_s: float,
                 logger: Any = None) -> tuple[Frame, str | None]:
    """``frame`` with the depth image of ``candidates`` closest in time to it (with that image's stamp) and
    ``info``'s intrinsics scaled to the frame's size; or ``frame`` unchanged and why, when there is nothing
    to attach.

    Args:
        frame: the colour frame (HxWx3 uint8, stamped).
        info: the last ``sensor_msgs/CameraInfo`` or None.
        candidates: ``(stamp_ns, sensor_msgs/Image)`` depth images (16UC1 mm or 32FC1 m).
        tolerance_s: the engine's ``depth_tolerance_s`` for this frame (the node's ``sync_tolerance``).
        logger: where to warn (throttled) about an unusable depth image.
    """
    if info is None:
        return frame, "no CameraInfo received yet"
    if not candidates:
        return frame, "no depth image received yet"
    stamp_ns = frame.stamp.ns if frame.stamp is not None else 0
    depth_ns, depth_msg = min(candidates, key=lambda item: abs(item[0] - stamp_ns))
    try:
        depth = depth_to_meters_array(depth_msg)
        intrinsics, info_size = camera_info_intrinsics(info)
    except LisaError as exc:
        if logger is not None:
            logger.warning(f"depth unusable: {exc}", throttle_duration_sec=5.0)
        return frame, f"depth unusable: {exc}"
    size = frame.size
    if info_size[0] and info_size[1] and info_size != size:
        intrinsics = intrinsics.scaled(size[1] / info_size[1], size[0] / info_size[0])
    return replace(frame, depth=depth, depth_stamp=Stamp(depth_ns // 10**9, depth_ns % 10**9),
                   intrinsics=intrinsics, depth_tolerance_s=tolerance_s), None


def throttled_warning(logger: Any, note: str, last: tuple[str, float]) -> tuple[str, float]:
    """Warn why 3D targets are missing: a new kind of reason at once, the same kind (numbers aside) at most every
    5 s. ``last`` is the previous ``(kind, monotonic time)``; returns the new one."""
    now = time.monotonic()
    kind = re.sub(r"[0-9.]+", "#", note)
    if kind != last[0] or now - last[1] >= 5.0:
        logger.warning(f"3D targets: {note}")
        return kind, now
    return last

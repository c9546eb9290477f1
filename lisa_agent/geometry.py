"""Camera geometry for masks: median depth inside a mask and pinhole deprojection (pure numpy).

Conventions: pixel coordinates ``(u, v)`` = (column, row), pixel centres at integer coordinates
(the ROS ``CameraInfo`` convention); camera frame ``x`` right, ``y`` down, ``z`` forward (the ROS
optical frame), in metres.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InvalidArgumentError, InvalidImageError

if TYPE_CHECKING:  # pragma: no cover
    from .frames import Frame

#: Depths outside this range (metres) are treated as invalid (sensor zeros, saturation, noise).
MIN_DEPTH_M = 0.05
MAX_DEPTH_M = 50.0


@dataclass(frozen=True)
class Intrinsics:
    """Pinhole intrinsics in pixels: focal lengths ``fx``, ``fy`` and principal point ``cx``, ``cy``."""

    fx: float
    fy: float
    cx: float
    cy: float

    def __post_init__(self) -> None:
        for name in ("fx", "fy"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise InvalidArgumentError(f"intrinsics: {name} must be a positive focal length in pixels; got {value}")
        for name in ("cx", "cy"):
            if not math.isfinite(getattr(self, name)):
                raise InvalidArgumentError(f"intrinsics: {name} must be finite; got {getattr(self, name)}")

    @classmethod
    def from_k(cls, k: Sequence[float]) -> Intrinsics:
        """From a row-major 3x3 camera matrix ``K`` (9 numbers, as in ``sensor_msgs/CameraInfo.k``)."""
        values = [float(v) for v in np.asarray(k, dtype=np.float64).reshape(-1)]
        if len(values) != 9:
            raise InvalidArgumentError(f"K must have 9 entries (row-major 3x3); got {len(values)}")
        return cls(fx=values[0], fy=values[4], cx=values[2], cy=values[5])

    def scaled(self, sx: float, sy: float) -> Intrinsics:
        """Intrinsics for the same camera resized by ``sx`` horizontally and ``sy`` vertically."""
        return Intrinsics(fx=self.fx * sx, fy=self.fy * sy, cx=(self.cx + 0.5) * sx - 0.5,
                          cy=(self.cy + 0.5) * sy - 0.5)


def check_depth(depth: Any) -> np.ndarray:
    """``depth`` as an HxW array, or :class:`~lisa_agent.errors.InvalidImageError`: the one rule for depth in
    every door. Accepted: HxW (or HxWx1) ``uint16`` millimetres, or ``float32`` / ``float64`` metres."""
    depth = np.asarray(depth)
    if depth.ndim == 3 and depth.shape[2] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2 or depth.dtype not in (np.uint16, np.float32, np.float64):
        raise InvalidImageError("depth must be an HxW uint16 (millimetres) or float32 (metres) array; got "
                                f"shape {tuple(depth.shape)}, dtype {depth.dtype}")
    return depth


def depth_to_meters(depth: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Convert a depth image to float32 metres with invalid pixels as NaN.

    Args:
        depth: HxW ``uint16`` in millimetres (ROS ``16UC1``; 0 = no reading) or HxW ``float32`` /
            ``float64`` in metres (ROS ``32FC1``; 0, NaN or inf = no reading); see :func:`check_depth`.
        scale: metres per unit, overriding the dtype's default (0.001 for uint16, 1 for floats).

    Returns:
        HxW float32 metres; NaN where the sensor has no reading (0, negative, NaN or inf).
    """
    depth = check_depth(depth)
    if scale is None:
        scale = 0.001 if depth.dtype == np.uint16 else 1.0
    out = depth.astype(np.float32, copy=True)
    if scale != 1.0:
        out *= np.float32(scale)
    out[~np.isfinite(out) | (out <= 0)] = np.nan
    return out



def deproject(u: float, v: float, z: float, intrinsics: Intrinsics) -> tuple[float, float, float]:
    """The 3D point (x, y, z) in metres, camera optical frame, seen at pixel (u, v) at depth ``z``."""
    return ((u - intrinsics.cx) * z / intrinsics.fx, (v - intrinsics.cy) * z / intrinsics.fy, z)


def project(point: Sequence[float], intrinsics: Intrinsics) -> tuple[float, float]:
    """The pixel (u, v) where the camera-frame point (x, y, z), z > 0, is seen."""
    x, y, z = (float(c) for c in point)
    if z <= 0:
        raise InvalidArgumentError(f"point must be in front of the camera (z > 0); got z={z}")
    return (intrinsics.fx * x / z + intrinsics.cx, intrinsics.fy * y / z + intrinsics.cy)


@dataclass(frozen=True)
class Target:
    """Where a mask's object is: its median depth and, with intrinsics, the 3D point.

    Attributes:
        depth_m: median valid depth inside the mask, metres.
        point: (x, y, z) metres in the camera optical frame (x right, y down, z forward): ``depth_m``
            deprojected at ``pixel``; None when the camera intrinsics are unknown.
        pixel: (u, v) centroid of the mask pixels that have a valid depth.
        valid_pixels: how many mask pixels had a valid depth.
    """

    depth_m: float
    point: tuple[float, float, float] | None
    pixel: tuple[float, float]
    valid_pixels: int

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the result schema's ``target``): lengths rounded to 0.1 mm, pixels to 0.01 px."""
        return {"depth_m": round(self.depth_m, 4),
                "point": None if self.point is None else [round(float(c), 4) for c in self.point],
                "pixel": [round(self.pixel[0], 2), round(self.pixel[1], 2)],
                "valid_pixels": int(self.valid_pixels)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Target:
        point = d.get("point")
        return cls(depth_m=float(d["depth_m"]),
                   point=None if point is None else (float(point[0]), float(point[1]), float(point[2])),
                   pixel=(float(d["pixel"][0]), float(d["pixel"][1])), valid_pixels=int(d["valid_pixels"]))


def mask_target(depth_m: np.ndarray, mask: np.ndarray, intrinsics: Intrinsics | None, *,
                min_depth: float = MIN_DEPTH_M, max_depth: float = MAX_DEPTH_M) -> Target | None:
    """The target of one mask: its median valid depth, deprojected at the centroid of its valid pixels.

    Args:
        depth_m: HxW float32 metres, NaN where invalid, aligned with the mask (same camera and size).
        mask: HxW bool.
        intrinsics: of the camera the depth and mask are in; None: depth only (``point`` None).

    Returns:
        The target, or None when the mask is empty or no mask pixel has a valid depth.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != depth_m.shape:
        raise InvalidArgumentError(f"mask {mask.shape} and depth {depth_m.shape} must have the same HxW size")
    valid = mask & np.isfinite(depth_m) & (depth_m >= min_depth) & (depth_m <= max_depth)
    count = int(valid.sum())
    if count == 0:
        return None
    z = float(np.median(depth_m[valid]))
    vs, us = np.nonzero(valid)
    u, v = float(us.mean()), float(vs.mean())
    point = None if intrinsics is None else deproject(u, v, z, intrinsics)
    return Target(depth_m=z, point=point, pixel=(u, v), valid_pixels=count)


def frame_targets(frame: Frame, masks: np.ndarray) -> tuple[list[Target | None] | None, str | None]:
    """The targets of ``masks`` (N x H x W bool) in ``frame``, and a note when some or all are missing.

    Returns ``(None, None)`` for a frame without depth. Depth that does not fit the frame is refused
    (``(None, reason)``): another size than the colour image, or a stamp further than
    ``frame.depth_tolerance_s`` from the colour frame's (checked when both are stamped). Otherwise
    one target per mask (None where the mask has no valid depth), with a note naming what is missing.
    """
    if frame.depth is None:
        return None, None
    dh, dw = frame.depth.shape
    h, w = frame.size
    if (dh, dw) != (h, w):
        return None, (f"depth image is {dh}x{dw} but the colour image is {h}x{w}: depth must be aligned to the "
                      "colour camera, so no 3D targets")
    if frame.stamp is not None and frame.depth_stamp is not None:
        skew = frame.stamp.seconds_to(frame.depth_stamp)
        if abs(skew) > frame.depth_tolerance_s:
            return None, (f"depth image is from {abs(skew):.3f} s {'after' if skew > 0 else 'before'} the colour "
                          f"frame (tolerance {frame.depth_tolerance_s:g} s): not the same instant, so no 3D targets")
    depth_m = frame.depth_m()
    assert depth_m is not None
    targets = [mask_target(depth_m, m, frame.intrinsics) for m in np.asarray(masks, dtype=bool)]
    notes = []
    missing = sum(1 for t, m in zip(targets, masks, strict=True) if t is None and m.any())
    if missing:
        notes.append(f"{missing} mask(s) have no valid depth inside, so no target")
    if frame.intrinsics is None and any(t is not None for t in targets):
        notes.append("no camera intrinsics: depth only, no 3D point")
    return targets, "; ".join(notes) or None

"""Camera geometry for masks: median depth inside a mask, pinhole deprojection and a grasp pose (pure numpy).

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


#: Fewest valid 3D points a grasp is computed from (fewer: no grasp).
MIN_GRASP_POINTS = 20
#: At most this many points enter the principal-axis fit (an even subsample of larger masks).
MAX_GRASP_POINTS = 20_000


@dataclass(frozen=True)
class Grasp:
    """A parallel-gripper grasp pose of one mask, in the camera optical frame (x right, y down, z forward).

    The gripper frame (its axes are the columns of the rotation ``quaternion`` describes): ``z`` the approach
    direction, along the camera ray through ``position`` (from the camera towards the object); ``x`` the
    object's long axis (the first principal axis of the mask's 3D points, made perpendicular to ``z``);
    ``y = z x x`` the closing direction: the fingers close across the long axis.

    Attributes:
        position: (x, y, z) metres: where the gripper's fingertips meet (the target's 3D point).
        quaternion: (x, y, z, w) unit quaternion of the gripper frame (the ``geometry_msgs/Pose`` order).
        axis: (x, y, z) unit vector of the object's long axis in 3D (the first principal axis; its sign
            agrees with the gripper's ``x``, which points to the image's right, or down when vertical).
        angle_deg: the long axis's angle in the image, degrees in [0, 180), from +u (right) towards +v
            (down): the angle of a line, so 0 and 180 are the same.
        width_m: the object's extent across the long axis (the finger opening it needs), metres
            (2nd to 98th percentile of the points along ``y``).
        length_m: its extent along the long axis, metres (same percentiles).
        elongation: sqrt of the ratio of the first to the second principal variance (1 = round: the axis is
            then arbitrary; a knife or pen is 4 or more).
    """

    position: tuple[float, float, float]
    quaternion: tuple[float, float, float, float]
    axis: tuple[float, float, float]
    angle_deg: float
    width_m: float
    length_m: float
    elongation: float

    def rotation(self) -> np.ndarray:
        """3x3 rotation matrix whose columns are the gripper's x (long axis), y (closing), z (approach)."""
        return quaternion_to_matrix(self.quaternion)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the result schema's ``target.grasp``): metres to 0.1 mm, unit vectors to 1e-5."""
        return {"position": [round(float(c), 4) for c in self.position],
                "quaternion": [round(float(c), 5) for c in self.quaternion],
                "axis": [round(float(c), 5) for c in self.axis],
                "angle_deg": round(float(self.angle_deg), 2), "width_m": round(float(self.width_m), 4),
                "length_m": round(float(self.length_m), 4), "elongation": round(float(self.elongation), 3)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Grasp:
        def vec(key: str) -> Any:
            return tuple(float(c) for c in d[key])
        return cls(position=vec("position"), quaternion=vec("quaternion"), axis=vec("axis"),
                   angle_deg=float(d["angle_deg"]), width_m=float(d["width_m"]), length_m=float(d["length_m"]),
                   elongation=float(d["elongation"]))


def matrix_to_quaternion(r: np.ndarray) -> tuple[float, float, float, float]:
    """(x, y, z, w) unit quaternion of a 3x3 rotation matrix (Shepperd's method, w >= 0)."""
    m = np.asarray(r, dtype=np.float64)
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    if trace > 0:
        s = math.sqrt(trace + 1.0) * 2
        q = (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, 0.25 * s
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2]) * 2
        q = 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s, (m[2, 1] - m[1, 2]) / s
    elif m[1, 1] > m[2, 2]:
        s = math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2]) * 2
        q = (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s, (m[0, 2] - m[2, 0]) / s
    else:
        s = math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1]) * 2
        q = (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s, (m[1, 0] - m[0, 1]) / s
    arr = np.array(q, dtype=np.float64)
    arr /= np.linalg.norm(arr)
    if arr[3] < 0:
        arr = -arr
    return (float(arr[0]), float(arr[1]), float(arr[2]), float(arr[3]))


def quaternion_to_matrix(q: Sequence[float]) -> np.ndarray:
    """3x3 rotation matrix of an (x, y, z, w) quaternion."""
    x, y, z, w = (float(c) for c in q)
    n = x * x + y * y + z * z + w * w
    s = 2.0 / n if n > 0 else 0.0
    return np.array([[1 - s * (y * y + z * z), s * (x * y - z * w), s * (x * z + y * w)],
                     [s * (x * y + z * w), 1 - s * (x * x + z * z), s * (y * z - x * w)],
                     [s * (x * z - y * w), s * (y * z + x * w), 1 - s * (x * x + y * y)]])


def mask_points(depth_m: np.ndarray, mask: np.ndarray, intrinsics: Intrinsics) -> np.ndarray:
    """N x 3 float64 camera-frame points (metres) of the mask pixels with a valid depth, each deprojected
    at its own depth (an even subsample of at most :data:`MAX_GRASP_POINTS`)."""
    valid = np.asarray(mask, dtype=bool) & np.isfinite(depth_m) & (depth_m >= MIN_DEPTH_M) & (depth_m <= MAX_DEPTH_M)
    vs, us = np.nonzero(valid)
    if len(us) > MAX_GRASP_POINTS:
        keep = np.linspace(0, len(us) - 1, MAX_GRASP_POINTS).astype(np.int64)
        vs, us = vs[keep], us[keep]
    z = depth_m[vs, us].astype(np.float64)
    return np.stack([(us - intrinsics.cx) * z / intrinsics.fx, (vs - intrinsics.cy) * z / intrinsics.fy, z], axis=1)


def mask_grasp(depth_m: np.ndarray, mask: np.ndarray, intrinsics: Intrinsics,
               position: Sequence[float] | None = None) -> Grasp | None:
    """A parallel-gripper grasp of the object under ``mask`` (see :class:`Grasp` for the frame).

    The mask's pixels with a valid depth are deprojected at their own depths; points further than
    max(2 cm, 4 x the median absolute deviation) from the median depth are dropped (mask edges bleeding onto
    the table or the background); the long axis is the first principal axis of the rest.

    Args:
        depth_m: HxW float32 metres, NaN where invalid (:func:`depth_to_meters`), aligned with ``mask``.
        mask: HxW bool.
        intrinsics: of the depth camera.
        position: where to put the grasp (default: the points' median, per axis).

    Returns:
        The grasp, or None with fewer than :data:`MIN_GRASP_POINTS` valid points.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != depth_m.shape:
        raise InvalidArgumentError(f"mask {mask.shape} and depth {depth_m.shape} must have the same HxW size")
    pts = mask_points(depth_m, mask, intrinsics)
    if len(pts) < MIN_GRASP_POINTS:
        return None
    med = float(np.median(pts[:, 2]))
    mad = float(np.median(np.abs(pts[:, 2] - med)))
    inliers = pts[np.abs(pts[:, 2] - med) <= max(0.02, 4.0 * 1.4826 * mad)]
    if len(inliers) >= MIN_GRASP_POINTS:
        pts = inliers
    pos = np.median(pts, axis=0) if position is None else np.asarray(position, dtype=np.float64)
    centred = pts - pts.mean(axis=0)
    eigval, eigvec = np.linalg.eigh(centred.T @ centred / len(pts))  # ascending
    long_axis = eigvec[:, 2]
    approach = pos / max(float(np.linalg.norm(pos)), 1e-9)  # the camera ray through the grasp point
    x = long_axis - approach * float(long_axis @ approach)
    if float(np.linalg.norm(x)) < 1e-6:  # the long axis points along the ray: any axis across it
        x = np.cross(approach, [0.0, 1.0, 0.0] if abs(approach[1]) < 0.9 else [1.0, 0.0, 0.0])
    x /= np.linalg.norm(x)
    if x[0] < 0 or (abs(x[0]) < 1e-9 and x[1] < 0):  # one sign per line: towards image right (or down)
        x = -x
    if float(long_axis @ x) < 0:
        long_axis = -long_axis
    y = np.cross(approach, x)
    rot = np.stack([x, y, approach], axis=1)
    along, across = centred @ x, centred @ y
    # the long axis in the image: project a point a few centimetres along it
    u0, v0 = project(pos.tolist(), intrinsics)
    u1, v1 = project((pos + long_axis * max(float(np.ptp(along)), 1e-3) * 0.25).tolist(), intrinsics)
    angle = math.degrees(math.atan2(v1 - v0, u1 - u0)) % 180.0
    second = max(float(eigval[1]), 1e-12)
    return Grasp(position=(float(pos[0]), float(pos[1]), float(pos[2])), quaternion=matrix_to_quaternion(rot),
                 axis=(float(long_axis[0]), float(long_axis[1]), float(long_axis[2])), angle_deg=angle,
                 width_m=float(np.percentile(across, 98) - np.percentile(across, 2)),
                 length_m=float(np.percentile(along, 98) - np.percentile(along, 2)),
                 elongation=math.sqrt(max(float(eigval[2]), 0.0) / second))


@dataclass(frozen=True)
class Target:
    """Where a mask's object is: its median depth and, with intrinsics, the 3D point and a grasp pose.

    Attributes:
        depth_m: median valid depth inside the mask, metres.
        point: (x, y, z) metres in the camera optical frame (x right, y down, z forward): ``depth_m``
            deprojected at ``pixel``; None when the camera intrinsics are unknown.
        pixel: (u, v) centroid of the mask pixels that have a valid depth.
        valid_pixels: how many mask pixels had a valid depth.
        grasp: a parallel-gripper grasp pose from the principal axes of the mask's 3D points
            (:func:`mask_grasp`); None without intrinsics or with too few valid points.
    """

    depth_m: float
    point: tuple[float, float, float] | None
    pixel: tuple[float, float]
    valid_pixels: int
    grasp: Grasp | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the result schema's ``target``): lengths rounded to 0.1 mm, pixels to 0.01 px;
        ``grasp`` is :meth:`Grasp.to_dict` or null."""
        return {"depth_m": round(self.depth_m, 4),
                "point": None if self.point is None else [round(float(c), 4) for c in self.point],
                "pixel": [round(self.pixel[0], 2), round(self.pixel[1], 2)],
                "valid_pixels": int(self.valid_pixels),
                "grasp": None if self.grasp is None else self.grasp.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Target:
        point = d.get("point")
        grasp = d.get("grasp")
        return cls(depth_m=float(d["depth_m"]),
                   point=None if point is None else (float(point[0]), float(point[1]), float(point[2])),
                   pixel=(float(d["pixel"][0]), float(d["pixel"][1])), valid_pixels=int(d["valid_pixels"]),
                   grasp=None if grasp is None else Grasp.from_dict(grasp))


def mask_target(depth_m: np.ndarray, mask: np.ndarray, intrinsics: Intrinsics | None, *,
                min_depth: float = MIN_DEPTH_M, max_depth: float = MAX_DEPTH_M) -> Target | None:
    """The target of one mask: its median valid depth, deprojected at the centroid of its valid pixels.

    Args:
        depth_m: HxW float32 metres, NaN where invalid, aligned with the mask (same camera and size).
        mask: HxW bool.
        intrinsics: of the camera the depth and mask are in; None: depth only (``point`` None).

    Returns:
        The target, or None when the mask is empty or no mask pixel has a valid depth. With intrinsics
        it carries a grasp pose (:func:`mask_grasp`) at ``point``.
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
    grasp = None
    if intrinsics is not None and point is not None:
        grasp = mask_grasp(depth_m, valid, intrinsics, position=point)
    return Target(depth_m=z, point=point, pixel=(u, v), valid_pixels=count, grasp=grasp)


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

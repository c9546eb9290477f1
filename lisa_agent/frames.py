"""What every door hands the engine: a :class:`Frame` (pixels, id, stamp, optional depth + intrinsics).

Also the validation of its pieces (:func:`check_image`, :func:`check_query`; depth:
:func:`lisa_agent.geometry.check_depth`) and the exact time type :class:`Stamp`. What takes a Frame is a
backend (:mod:`lisa_agent.backend`).

Pure numpy: nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .errors import InvalidArgumentError, InvalidImageError, InvalidQueryError
from .geometry import Intrinsics, check_depth, depth_to_meters

#: The prompt's image placeholder (LLaVA's): a query or a forced answer may not contain it.
IMAGE_TOKEN = "<image>"
#: Frames larger than this many pixels on a side are refused (a 16k x 16k frame is a mistake).
MAX_SIDE = 8192
#: Frames smaller than this on a side cannot be segmented meaningfully.
MIN_SIDE = 8
#: Colour and depth stamps further apart than this (seconds) are not the same instant: no 3D targets.
DEPTH_TOLERANCE_S = 0.05
#: Longest ``frame_id`` kept (ROS frame ids and camera names are short).
MAX_FRAME_ID_CHARS = 256


def check_image(image: object, *, max_side: int = MAX_SIDE) -> np.ndarray:
    """Return ``image`` as a C-contiguous HxWx3 uint8 RGB array, or raise :class:`InvalidImageError`.

    Accepts exactly HxWx3 ``uint8`` arrays (any strides). Refuses grayscale (HxW), RGBA (HxWx4),
    float images, empty arrays and frames with a side outside ``[MIN_SIDE, max_side]``: each with a
    message that names the problem and how to convert.
    """
    if not isinstance(image, np.ndarray):
        raise InvalidImageError(
            f"image must be a numpy array of shape HxWx3, dtype uint8 (RGB); got {type(image).__name__}"
        )
    if image.size == 0:
        raise InvalidImageError(f"image is empty (shape {tuple(image.shape)})")
    if image.ndim == 2:
        raise InvalidImageError(
            f"image has shape {tuple(image.shape)} (grayscale HxW); expected HxWx3 RGB: "
            "use np.repeat(image[..., None], 3, axis=2)"
        )
    if image.ndim != 3 or image.shape[2] != 3:
        hint = " (RGBA? drop alpha with image[..., :3])" if image.ndim == 3 and image.shape[2] == 4 else ""
        raise InvalidImageError(f"image has shape {tuple(image.shape)}; expected HxWx3 RGB{hint}")
    if image.dtype != np.uint8:
        raise InvalidImageError(
            f"image has dtype {image.dtype}; expected uint8 in [0, 255] "
            "(for float images in [0, 1] use (image * 255).round().astype(np.uint8))"
        )
    h, w = image.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise InvalidImageError(f"image is {h}x{w}; each side must be at least {MIN_SIDE} pixels")
    if max(h, w) > max_side:
        raise InvalidImageError(f"image is {h}x{w}; each side must be at most {max_side} pixels")
    return np.ascontiguousarray(image)


def check_query(query: object) -> str:
    """Return the stripped query, or raise :class:`InvalidQueryError` if it is not a non-empty string of valid
    Unicode, or holds the prompt's image placeholder (``<image>``: a caller's text, never a model fault)."""
    if not isinstance(query, str):
        raise InvalidQueryError(f"query must be a string; got {type(query).__name__}")
    text = query.strip()
    if not text:
        raise InvalidQueryError("query is empty: say what to segment, e.g. 'something to cut with'")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidQueryError(f"query is not valid Unicode text (a lone surrogate at character {exc.start})") from None
    if IMAGE_TOKEN in text:
        raise InvalidQueryError(f"query must not contain {IMAGE_TOKEN!r}: that is where the prompt puts the image "
                                "itself; describe what to segment in words")
    return text


@dataclass(frozen=True, order=True)
class Stamp:
    """An exact time: whole seconds and nanoseconds (ROS ``builtin_interfaces/Time``; 0 <= nanosec < 1e9)."""

    sec: int
    nanosec: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.sec, bool) or not isinstance(self.sec, int) or not 0 <= self.sec < 2**63 // 10**9:
            raise InvalidArgumentError(f"stamp sec must be a non-negative whole number; got {self.sec!r}")
        if isinstance(self.nanosec, bool) or not isinstance(self.nanosec, int) or not 0 <= self.nanosec < 10**9:
            raise InvalidArgumentError(f"stamp nanosec must be a whole number in [0, 1e9); got {self.nanosec!r}")

    @classmethod
    def of(cls, value: Any) -> Stamp | None:
        """A stamp from None, a Stamp, seconds (float or int), ``(sec, nanosec)``, ``{"sec", "nanosec"}``
        or any object with ``sec`` and ``nanosec`` attributes (a ROS ``Time`` message)."""
        if value is None or isinstance(value, Stamp):
            return value
        if isinstance(value, dict):
            return cls(value.get("sec"), value.get("nanosec", 0))  # type: ignore[arg-type]
        if hasattr(value, "sec") and hasattr(value, "nanosec"):
            return cls(int(value.sec), int(value.nanosec))
        if isinstance(value, tuple) and len(value) == 2:
            return cls(*value)
        if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            seconds = float(value)
            if not math.isfinite(seconds) or seconds < 0:
                raise InvalidArgumentError(f"stamp must be a finite, non-negative number of seconds; got {value!r}")
            sec = math.floor(seconds)  # split first: seconds * 1e9 would lose the nanoseconds of today's epoch
            nanosec = round((seconds - sec) * 1e9)
            return cls(sec + 1, 0) if nanosec >= 10**9 else cls(sec, nanosec)
        raise InvalidArgumentError(f"stamp must be seconds, (sec, nanosec) or a Time message; got {value!r}")

    @property
    def ns(self) -> int:
        """Nanoseconds since the epoch of the stamp's clock."""
        return self.sec * 10**9 + self.nanosec

    def seconds_to(self, later: Stamp) -> float:
        """Seconds from this stamp to ``later`` (negative when ``later`` is earlier), exact to the nanosecond."""
        return (later.ns - self.ns) / 1e9

    @property
    def seconds(self) -> float:
        return self.ns / 1e9

    def to_dict(self) -> dict[str, int]:
        return {"sec": self.sec, "nanosec": self.nanosec}

    def __str__(self) -> str:
        return f"{self.sec}.{self.nanosec:09d}"


@dataclass(frozen=True, eq=False)
class Frame:
    """One camera frame as the engine takes it.

    Attributes:
        rgb: HxWx3 uint8 RGB pixels (validated by :func:`check_image`).
        frame_id: the caller's name for the frame (a ROS ``header.frame_id``, a camera name, a file);
            carried into the result. Not a cache key: features are cached by content.
        stamp: when the frame was taken (:class:`Stamp`; seconds or a ROS ``Time`` are converted).
        depth: optional HxW depth aligned with ``rgb`` (same camera, same size): ``uint16``
            millimetres or ``float32`` / ``float64`` metres, 0 / NaN / inf where there is no reading.
        depth_scale: metres per depth unit, overriding the dtype's default.
        intrinsics: pinhole intrinsics of the camera (:class:`~lisa_agent.geometry.Intrinsics` or
            ``(fx, fy, cx, cy)`` pixels); without them targets carry depth only, no 3D point.
        depth_stamp: when the depth was taken; with ``stamp``, depth more than ``depth_tolerance_s``
            away from the colour frame is refused (no targets, a note saying why).
        depth_tolerance_s: seconds between colour and depth stamps still treated as the same instant.
    """

    rgb: np.ndarray
    frame_id: str | None = None
    stamp: Stamp | None = None
    depth: np.ndarray | None = None
    depth_scale: float | None = None
    intrinsics: Intrinsics | None = None
    depth_stamp: Stamp | None = None
    depth_tolerance_s: float = DEPTH_TOLERANCE_S

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("rgb", check_image(self.rgb))
        if self.frame_id is not None:
            if not isinstance(self.frame_id, (str, int)) or isinstance(self.frame_id, bool):
                raise InvalidArgumentError(f"frame_id must be a string or None; got {type(self.frame_id).__name__}")
            text = str(self.frame_id)
            if len(text) > MAX_FRAME_ID_CHARS:
                raise InvalidArgumentError(f"frame_id is {len(text)} chars; at most {MAX_FRAME_ID_CHARS}")
            put("frame_id", text)
        put("stamp", Stamp.of(self.stamp))
        put("depth_stamp", Stamp.of(self.depth_stamp))
        if self.depth is not None:
            put("depth", check_depth(self.depth))
        if self.depth_scale is not None:
            scale = self.depth_scale
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
                raise InvalidArgumentError(f"depth_scale must be a positive number of metres per unit; got {scale!r}")
            put("depth_scale", float(scale))
        if self.intrinsics is not None and not isinstance(self.intrinsics, Intrinsics):
            put("intrinsics", intrinsics_of(self.intrinsics))
        tol = self.depth_tolerance_s
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol < 0:
            raise InvalidArgumentError(f"depth_tolerance_s must be a non-negative number of seconds; got {tol!r}")

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the frame."""
        h, w = self.rgb.shape[:2]
        return int(h), int(w)

    def depth_m(self) -> np.ndarray | None:
        """The depth as HxW float32 metres, NaN where there is no reading; None without depth."""
        if self.depth is None:
            return None
        return depth_to_meters(self.depth, self.depth_scale)

    def describe(self) -> str:
        """``frame_id @ stamp`` (``?`` for what is unknown), for logs and messages."""
        return f"{self.frame_id or '?'} @ {self.stamp if self.stamp is not None else '?'}"


def intrinsics_of(value: Any) -> Intrinsics:
    """Intrinsics from an :class:`Intrinsics`, or ``(fx, fy, cx, cy)`` in pixels."""
    if isinstance(value, Intrinsics):
        return value
    try:
        values = [float(v) for v in value]
    except (TypeError, ValueError, OverflowError):
        raise InvalidArgumentError(f"intrinsics must be (fx, fy, cx, cy) in pixels; got {value!r}") from None
    if len(values) != 4:
        raise InvalidArgumentError(f"intrinsics must be (fx, fy, cx, cy) in pixels; got {len(values)} numbers")
    try:
        return Intrinsics(*values)
    except ValueError as exc:
        raise InvalidArgumentError(str(exc)) from None


def as_frame(image: Frame | np.ndarray, frame_id: str | int | None = None) -> Frame:
    """``image`` as a :class:`Frame`: an HxWx3 uint8 array is wrapped (with ``frame_id``); a Frame is
    returned as it is (``frame_id``, when given, replaces its own)."""
    if isinstance(image, Frame):
        return image if frame_id is None else replace(image, frame_id=str(frame_id))
    return Frame(image, frame_id=None if frame_id is None else str(frame_id))


__all__: Sequence[str] = (
    "DEPTH_TOLERANCE_S", "IMAGE_TOKEN", "MAX_SIDE", "MIN_SIDE", "Frame", "Stamp", "as_frame", "check_image",
    "check_query", "intrinsics_of",
)

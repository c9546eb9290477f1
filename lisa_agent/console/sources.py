"""Where the console's frames come from: ``--source synthetic|camera:N|video:FILE|ros:TOPIC|server:ENDPOINT``.

Every source hands out :class:`SourceFrame` (its own frame number and a :class:`~lisa_agent.frames.Frame`
with a stamp, and depth with intrinsics where it has them) from :meth:`FrameSource.read`, which blocks
until the next frame is due (sources pace themselves: a camera by its driver, a video file by its frame
rate, the synthetic scene by ``fps``).

:class:`SyntheticSource` is a rendered tabletop scene (:func:`lisa_agent.data.tabletop.render_scene`)
seen by a camera that slowly pans and zooms while the light breathes, with a depth image and intrinsics
(the table 0.75 m below the camera, objects a few centimetres above it): it works offline on a fresh
machine, and :meth:`SyntheticSource.ground_truth` gives every object's visible mask in any of its frames.
Frame 0 is exactly the tabletop scene of ``lisa-agent demo`` (test scene 2 by default) plus sensor noise.

``ros:TOPIC`` reads a sensor_msgs Image (or CompressedImage when the topic ends in ``/compressed``)
through the frame source the ROS side provides (:data:`SOURCE_ENTRY_POINTS`: ``ros_nodes`` registers
``ros = ros_nodes.console_source:open_ros_source``, by pip and by colcon alike); this package itself never
imports ROS, by any means.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from ..errors import InvalidArgumentError, SourceError
from ..frames import Frame, Stamp
from ..geometry import Intrinsics

#: Source kinds of ``--source`` (``server:`` is the synthetic scene answered by a model server).
SOURCE_KINDS = ("synthetic", "camera", "video", "ros", "server")
#: The synthetic scene: test scene 2, the one ``lisa-agent demo`` shows (the bundled model gets it right).
DEFAULT_SYNTHETIC_SEED = 2
DEFAULT_SIZE = (480, 640)
#: Depth of the synthetic table (metres from the camera, which looks straight down) and of object tops.
TABLE_DEPTH_M = 0.75
OBJECT_HEIGHT_M = 0.03


#: The entry-point group through which other packages provide frame sources (``name = module:factory``, the
#: factory taking the source's argument, e.g. the topic of ``ros:TOPIC``, and returning a :class:`FrameSource`).
SOURCE_ENTRY_POINTS = "lisa_agent.frame_sources"


@dataclass(frozen=True)
class SourceFrame:
    """One frame of a source: ``seq`` counts the source's frames from 0; ``frame`` is what the engine takes."""

    seq: int
    frame: Frame


class FrameSource(Protocol):
    """What the console reads frames from."""

    def read(self, timeout: float = 1.0) -> SourceFrame | None:
        """The next frame (blocking until it is due), or None when none came within ``timeout`` seconds."""
        ...

    def describe(self) -> str:
        """One line naming the source, for the page and logs."""
        ...

    def close(self) -> None:
        """Release the device, file or node."""
        ...


@dataclass(frozen=True)
class TruthObject:
    """An object of the synthetic scene as it appears in one frame: names and its visible mask (HxW bool)."""

    name: str  # "green knife"
    category: str  # "knife"
    colour: str
    mask: np.ndarray


class SyntheticSource:
    """A slowly changing tabletop scene, rendered on demand: deterministic for each frame number.

    Args:
        seed: the scene (a test-split index, as ``lisa-agent demo --seed``).
        size: (H, W) of the frames.
        fps: frames per second handed out by :meth:`read`.
        period_s: seconds of one loop of the camera's motion (a pan and a zoom of at most 8%).
        depth: attach a depth image (float32 metres) and intrinsics to every frame.
        clock: monotonic seconds (tests may pass their own).
    """

    def __init__(self, seed: int = DEFAULT_SYNTHETIC_SEED, *, size: tuple[int, int] = DEFAULT_SIZE, fps: float = 10.0,
                 period_s: float = 60.0, depth: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        from ..data.tabletop import render_scene, split_seed

        if not (math.isfinite(fps) and 0 < fps <= 120):
            raise InvalidArgumentError(f"fps must be in (0, 120]; got {fps!r}")
        if not (math.isfinite(period_s) and period_s > 0):
            raise InvalidArgumentError(f"period_s must be a positive number of seconds; got {period_s!r}")
        h, w = int(size[0]), int(size[1])
        if min(h, w) < 64 or max(h, w) > 2048:
            raise InvalidArgumentError(f"synthetic frames must be between 64 and 2048 pixels a side; got {h}x{w}")
        self.seed = int(seed)
        self.size = (h, w)
        self.fps = float(fps)
        self.period_s = float(period_s)
        self.with_depth = bool(depth)
        self._clock = clock
        self.scene = render_scene(split_seed("test", self.seed), size=(h, w))
        self._image = self.scene.image.astype(np.float32)
        self._depth = np.full((h, w), TABLE_DEPTH_M, np.float32)
        for obj in self.scene.objects:
            self._depth[obj.mask] = TABLE_DEPTH_M - OBJECT_HEIGHT_M
        self._noise = [np.random.default_rng([self.seed, 5, k]).normal(0.0, 2.0, (h, w, 3)).astype(np.float32)
                       for k in range(4)]
        self._focal = 0.9 * w  # a ~58 degree horizontal field of view
        self._start = clock()
        self._next = 0

    # ------------------------------------------------------------------ the camera's motion
    def camera(self, seq: int) -> tuple[np.ndarray, float, float]:
        """Frame ``seq``'s view: the 2x3 affine scene -> frame, the zoom, and the light's gain."""
        h, w = self.size
        u = 2.0 * math.pi * (seq / self.fps) / self.period_s
        zoom = 1.0 + 0.04 * (1.0 - math.cos(u))  # 1.0 .. 1.08; frame 0 is the scene itself
        reach_x, reach_y = (w - w / zoom) / 2.0, (h - h / zoom) / 2.0  # the view never leaves the scene
        cx = w / 2.0 + 0.9 * reach_x * math.sin(u)
        cy = h / 2.0 + 0.9 * reach_y * math.cos(u)
        matrix = np.array([[zoom, 0.0, w / 2.0 - zoom * cx], [0.0, zoom, h / 2.0 - zoom * cy]], np.float32)
        gain = 1.0 - 0.06 * (1.0 - math.cos(2.0 * u))
        return matrix, zoom, gain

    def render(self, seq: int, stamp: Stamp | None = None) -> Frame:
        """Frame ``seq`` (deterministic pixels; ``stamp`` as given)."""
        if seq < 0:
            raise InvalidArgumentError(f"frame numbers start at 0; got {seq}")
        h, w = self.size
        matrix, zoom, gain = self.camera(seq)
        pixels = cv2.warpAffine(self._image, matrix, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        pixels = pixels * gain + self._noise[seq % len(self._noise)]
        rgb = np.clip(pixels, 0, 255).astype(np.uint8)
        if not self.with_depth:
            return Frame(rgb, frame_id="synthetic_camera_optical_frame", stamp=stamp)
        depth = cv2.warpAffine(self._depth, matrix, (w, h), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT)
        focal = self._focal * zoom
        intrinsics = Intrinsics(fx=focal, fy=focal, cx=(w - 1) / 2.0, cy=(h - 1) / 2.0)
        return Frame(rgb, frame_id="synthetic_camera_optical_frame", stamp=stamp, depth=depth,
                     intrinsics=intrinsics, depth_stamp=stamp)

    def ground_truth(self, seq: int) -> list[TruthObject]:
        """Every object's visible mask in frame ``seq`` (in drawing order)."""
        h, w = self.size
        matrix, _, _ = self.camera(seq)
        out = []
        for obj in self.scene.objects:
            mask = cv2.warpAffine(obj.mask.astype(np.uint8), matrix, (w, h), flags=cv2.INTER_NEAREST) > 0
            out.append(TruthObject(obj.name(), obj.category, obj.colour, mask))
        return out

    # ------------------------------------------------------------------ FrameSource
    def read(self, timeout: float = 1.0) -> SourceFrame | None:
        due = self._start + self._next / self.fps
        wait = due - self._clock()
        if wait > timeout:
            time.sleep(max(0.0, timeout))
            return None
        if wait > 0:
            time.sleep(wait)
        else:  # behind (a slow machine): skip to the frame due now
            self._next = max(self._next, int((self._clock() - self._start) * self.fps))
        seq = self._next
        self._next += 1
        return SourceFrame(seq, self.render(seq, Stamp.of(time.time())))

    def describe(self) -> str:
        objects = ", ".join(o.name() for o in self.scene.objects)
        return f"synthetic tabletop (test scene {self.seed}, {self.size[0]}x{self.size[1]}, {objects})"

    def close(self) -> None:
        return None


class CaptureSource:
    """An OpenCV capture: a camera (``camera:N``) in a reader thread, or a video file (``video:FILE``)
    paced by its frame rate and looped at its end."""

    def __init__(self, target: int | str, *, loop: bool = True) -> None:
        self.target = target
        self.is_file = isinstance(target, str)
        if self.is_file and not Path(str(target)).is_file():
            raise SourceError(f"video file {str(target)!r} does not exist")
        self._cap = cv2.VideoCapture(target)
        if not self._cap.isOpened():
            what = f"video file {target!r}" if self.is_file else f"camera {target}"
            raise SourceError(f"cannot open {what} with OpenCV")
        fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if math.isfinite(fps) and 1.0 <= fps <= 240.0 else 10.0
        self.loop = loop
        self._seq = 0
        self._lock = threading.Condition()
        self._latest: tuple[int, np.ndarray, float] | None = None
        self._taken = -1
        self._stop = False
        self._next_due = time.monotonic()
        self._thread: threading.Thread | None = None
        if not self.is_file:
            self._thread = threading.Thread(target=self._grab, name="lisa-console-camera", daemon=True)
            self._thread.start()

    def _read_rgb(self) -> np.ndarray | None:
        ok, bgr = self._cap.read()
        if not ok and self.is_file and self.loop:
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            ok, bgr = self._cap.read()
        if not ok or bgr is None or bgr.ndim != 3:
            return None
        return np.ascontiguousarray(bgr[:, :, 2::-1]) if bgr.shape[2] >= 3 else None

    def _grab(self) -> None:
        while not self._stop:
            rgb = self._read_rgb()
            if rgb is None:
                time.sleep(0.05)
                continue
            with self._lock:
                self._latest = (self._seq, rgb, time.time())
                self._seq += 1
                self._lock.notify_all()

    def read(self, timeout: float = 1.0) -> SourceFrame | None:
        if self.is_file:
            wait = self._next_due - time.monotonic()
            if wait > timeout:
                time.sleep(max(0.0, timeout))
                return None
            time.sleep(max(0.0, wait))
            self._next_due = max(self._next_due + 1.0 / self.fps, time.monotonic() - 1.0)
            rgb = self._read_rgb()
            if rgb is None:
                return None
            seq = self._seq
            self._seq += 1
            return SourceFrame(seq, Frame(rgb, frame_id=Path(str(self.target)).name, stamp=Stamp.of(time.time())))
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._latest is None or self._latest[0] <= self._taken:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop:
                    return None
                self._lock.wait(left)
            seq, rgb, stamp = self._latest
            self._taken = seq
        return SourceFrame(seq, Frame(rgb, frame_id=f"camera{self.target}", stamp=Stamp.of(stamp)))

    def describe(self) -> str:
        return f"video file {self.target}" if self.is_file else f"camera {self.target} (OpenCV)"

    def close(self) -> None:
        self._stop = True
        if self._thread is not None:
            self._thread.join(2.0)
        self._cap.release()


def parse_source(spec: str) -> tuple[str, str]:
    """``(kind, argument)`` of a ``--source`` value, or InvalidArgumentError naming the accepted forms."""
    text = str(spec).strip()
    kind, _, arg = text.partition(":")
    kind = kind.strip().lower()
    forms = "synthetic, camera:N, video:FILE, ros:TOPIC or server:tcp://HOST:PORT"
    if kind not in SOURCE_KINDS:
        raise InvalidArgumentError(f"unknown source {text!r}; use {forms}")
    if kind == "synthetic":
        if arg.strip() and not arg.strip().isdigit():
            raise InvalidArgumentError(f"synthetic takes an optional scene number (synthetic:2); got {text!r}")
        return kind, arg.strip()
    if not arg.strip():
        raise InvalidArgumentError(f"source {kind}: needs its argument; use {forms}")
    if kind == "camera" and not arg.strip().isdigit():
        raise InvalidArgumentError(f"camera:N takes a camera index (camera:0); got {text!r}")
    if kind == "server" and not arg.strip().startswith(("tcp://", "ipc://", "http://", "https://")):
        raise InvalidArgumentError(f"server: takes a model server endpoint (server:tcp://127.0.0.1:5557, or a Ray Serve deployment's server:http://127.0.0.1:8000/lisa); got {text!r}")
    if kind == "ros" and not arg.strip().startswith("/") and not arg.strip()[0].isalpha():
        raise InvalidArgumentError(f"ros: takes a topic name (ros:/camera/color/image_raw); got {text!r}")
    return kind, arg.strip()


def open_source(spec: str, *, fps: float = 10.0, size: tuple[int, int] = DEFAULT_SIZE) -> FrameSource:
    """The frame source named by ``spec`` (``server:`` sources are the synthetic scene; the model is the server's)."""
    kind, arg = parse_source(spec)
    if kind in ("synthetic", "server"):
        seed = int(arg) if kind == "synthetic" and arg else DEFAULT_SYNTHETIC_SEED
        return SyntheticSource(seed, size=size, fps=fps)
    if kind == "camera":
        return CaptureSource(int(arg))
    if kind == "video":
        return CaptureSource(os.path.expanduser(arg))
    return _provided_source(kind, arg)


def _provided_source(kind: str, arg: str) -> FrameSource:
    """The source another package provides for ``kind`` (an entry point of :data:`SOURCE_ENTRY_POINTS`)."""
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group=SOURCE_ENTRY_POINTS) if ep.name == kind]
    if not found:
        raise SourceError(f"--source {kind}:{arg} needs the package that provides {kind!r} frame sources (for ros: "
                          "lisa-agent's ros_nodes, installed with pip install 'lisa-agent[ros]' or colcon, and rclpy)")
    try:
        factory = found[0].load()
    except ImportError as exc:
        raise SourceError(f"--source {kind}:{arg} cannot load its provider {found[0].value}: {exc}") from None
    source: FrameSource = factory(arg)
    return source

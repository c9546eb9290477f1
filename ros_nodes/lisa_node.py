"""``lisa_node``: camera frames + a natural-language instruction in; masks, answer and 3D target out.

Run::

    python -m ros_nodes.lisa_node --ros-args -p model:=tabletop-tiny -p image_topic:=/camera/color/image_raw
    ros2 run lisa_agent lisa_node --ros-args -p server:=tcp://127.0.0.1:5557
    ros2 topic pub --once /lisa_node/instruction std_msgs/String "{data: 'grab something to cut with'}"

Subscriptions: ``image_topic`` (sensor_msgs/Image rgb8, bgr8, rgba8, bgra8, mono8, any row padding;
or sensor_msgs/CompressedImage on ``<image_topic>/compressed`` with ``compressed:=true``), optional
``depth_topic`` (16UC1 mm or 32FC1 m, aligned with the colour image) + ``camera_info_topic``, and
``instruction_topic`` (std_msgs/String; empty or "stop" ends a continuous request).

Publications, in the node's namespace, each stamped with the source frame's header: ``~/mask``
(mono8, value k+1 inside instance k), ``~/overlay`` (rgb8) and ``~/overlay/compressed`` (JPEG),
``~/answer`` (String), ``~/result`` (String, JSON; see :func:`ros_nodes.outputs.result_json`),
``~/target_point`` (PointStamped), ``~/markers`` (MarkerArray), ``~/detections``
(vision_msgs/Detection2DArray, only where vision_msgs is installed), and ``/diagnostics``.

Threading: callbacks only store the newest message; one worker thread takes the newest frame when
a request is pending, so inference never blocks the executor and a slow model never works through
a backlog (replaced frames are counted as dropped).
"""

from __future__ import annotations

import collections
import dataclasses
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import PointStamped
from rcl_interfaces.msg import ParameterDescriptor, SetParametersResult
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import String
from visualization_msgs.msg import MarkerArray

from lisa_agent.errors import InvalidImageError, InvalidQueryError, LisaError
from lisa_agent.geometry import mask_target_point

from . import outputs
from .backend import BackendConfig, load_backend, resolve_device
from .conversions import (
    MalformedImageError,
    UnsupportedEncodingError,
    camera_info_intrinsics,
    compressed_to_rgb,
    depth_to_meters_array,
    encode_jpeg,
    image_to_rgb,
    to_image_msg,
)

STOP_WORDS = frozenset({"stop", "cancel", "halt"})
MODES = ("fast", "chat")
CAMERA_QOS = ("best_effort", "reliable")

#: name -> (default, description, read_only). Topics, QoS and the model are fixed at start; the
#: rest may be changed at run time with ``ros2 param set``.
PARAMETERS: dict[str, tuple[Any, str, bool]] = {
    "image_topic": ("/camera/color/image_raw", "colour image topic (sensor_msgs/Image)", True),
    "compressed": (False, "subscribe to sensor_msgs/CompressedImage on <image_topic>/compressed", True),
    "depth_topic": ("", "aligned depth image (16UC1 mm or 32FC1 m); empty: no 3D target", True),
    "camera_info_topic": ("", "CameraInfo of the depth image (intrinsics K); empty: no 3D target", True),
    "instruction_topic": ("~/instruction", "std_msgs/String instructions; empty or 'stop' ends continuous mode", True),
    "camera_qos": ("best_effort", "QoS of the camera subscriptions: best_effort (sensor data) or reliable", True),
    "model": ("tabletop-tiny", "Hub id, local checkpoint folder or 'tabletop-tiny'", True),
    "vision_tower": ("", "CLIP vision tower id or folder (empty: the checkpoint's own)", True),
    "device": ("auto", "torch device: auto, cpu, cuda, cuda:1, ...", True),
    "dtype": ("auto", "auto, fp32, bf16 or fp16", True),
    "quantization": ("", "LLM quantization: empty, 8bit or 4bit (CUDA only)", True),
    "mask_tta": ("checkpoint", "mask test-time augmentation: checkpoint (its own; off for published LISA), off, "
                 "hflip or flips (mirrored and upside-down views too: top-down cameras)", True),
    "server": ("", "model server endpoint (tcp://host:port); when set, used instead of 'model'", True),
    "server_timeout": (10.0, "seconds to wait for the model server per request", True),
    "mode": ("fast", "fast (teacher-forced answer, one pass) or chat (generated answer)", False),
    "max_new_tokens": (32, "answer length limit in chat mode", False),
    "continuous": (False, "keep segmenting new frames with the last instruction until 'stop'", False),
    "max_rate": (5.0, "continuous mode: at most this many frames per second (0: as fast as possible)", False),
    "publish_overlay": (True, "publish ~/overlay and ~/overlay/compressed (rendered only with subscribers)", False),
    "sync_tolerance": (0.05, "seconds between colour and depth stamps still treated as the same instant", False),
}


@dataclass
class _Frame:
    msg: Any  # sensor_msgs Image or CompressedImage
    seq: int  # arrival counter
    received_ns: int  # node clock at arrival


@dataclass
class _Request:
    text: str
    seq: int
    continuous: bool
    last_frame_seq: int = -1  # frames with seq <= this are not eligible for this request


class LisaNode(Node):
    """The LISA node. Construct, then :meth:`load_backend` (slow), :meth:`start`, spin, :meth:`stop`.

    Args:
        backend: an object with ``segment(image, query, *, mode, frame_id, ...)`` to use instead of
            loading one from the parameters (tests, or sharing one engine between nodes).
        **kwargs: passed to :class:`rclpy.node.Node` (``parameter_overrides``, ``context``, ...).
    """

    def __init__(self, node_name: str = "lisa_node", *, backend: Any = None, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        for name, (default, description, read_only) in PARAMETERS.items():
            self.declare_parameter(name, default, ParameterDescriptor(description=description, read_only=read_only))
        self._check(self._validate({name: self.get_parameter(name).value for name in PARAMETERS}))
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self._backend = backend
        self._cond = threading.Condition()
        self._frame: _Frame | None = None
        self._frame_taken = True
        self._request: _Request | None = None
        self._request_seq = 0
        self._frame_seq = 0
        self._bad_frame_seq = -1
        self._depth: collections.deque[tuple[int, Any]] = collections.deque(maxlen=30)
        self._camera_info: Any = None
        self._stopping = False
        self._worker: threading.Thread | None = None
        self._counts = {"frames_received": 0, "frames_processed": 0, "frames_dropped": 0, "frames_bad": 0,
                        "requests": 0, "errors": 0}
        self._latency = collections.deque(maxlen=50)
        self._last_latency_ms = float("nan")
        self._state = "loading" if backend is None else "ready"

        camera_qos = self._camera_qos(self.get_parameter("camera_qos").value)
        image_topic = str(self.get_parameter("image_topic").value)
        if self.get_parameter("compressed").value:
            if not image_topic.endswith("/compressed"):
                image_topic = image_topic.rstrip("/") + "/compressed"
            self.create_subscription(CompressedImage, image_topic, self.image_callback, camera_qos)
        else:
            self.create_subscription(Image, image_topic, self.image_callback, camera_qos)
        self._image_topic = image_topic
        depth_topic = str(self.get_parameter("depth_topic").value)
        info_topic = str(self.get_parameter("camera_info_topic").value)
        if depth_topic:
            self.create_subscription(Image, depth_topic, self.depth_callback, camera_qos)
        if info_topic:
            self.create_subscription(CameraInfo, info_topic, self.camera_info_callback, camera_qos)
        if bool(depth_topic) != bool(info_topic):
            self.get_logger().warning("3D targets need both depth_topic and camera_info_topic; only one is set")
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
        self.create_subscription(String, str(self.get_parameter("instruction_topic").value),
                                 self.instruction_callback, reliable)

        self._pub_mask = self.create_publisher(Image, "~/mask", reliable)
        self._pub_overlay = self.create_publisher(Image, "~/overlay", reliable)
        self._pub_overlay_jpeg = self.create_publisher(CompressedImage, "~/overlay/compressed", reliable)
        self._pub_answer = self.create_publisher(String, "~/answer", reliable)
        self._pub_result = self.create_publisher(String, "~/result", reliable)
        self._pub_point = self.create_publisher(PointStamped, "~/target_point", reliable)
        self._pub_markers = self.create_publisher(MarkerArray, "~/markers", reliable)
        self._pub_detections = None
        if outputs.HAVE_VISION_MSGS:
            self._pub_detections = self.create_publisher(outputs.Detection2DArray, "~/detections", reliable)
        self._pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", reliable)
        self.create_timer(1.0, self.diagnostics_callback)

    # ------------------------------------------------------------------ setup
    def backend_config(self) -> BackendConfig:
        p = self.get_parameter
        return BackendConfig(model=str(p("model").value), vision_tower=str(p("vision_tower").value),
                             device=str(p("device").value), dtype=str(p("dtype").value),
                             quantization=str(p("quantization").value), mask_tta=str(p("mask_tta").value),
                             server=str(p("server").value),
                             server_timeout=float(p("server_timeout").value))

    def load_backend(self) -> None:
        """Load the model (or connect to the server) named by the parameters. Slow; not in a callback."""
        if self._backend is not None:
            return
        config = self.backend_config()
        if not config.server:
            device, dtype = resolve_device(config.device, config.dtype)
            config = dataclasses.replace(config, device=device, dtype=dtype)
        self.get_logger().info(f"loading {config.describe()} ...")
        t0 = time.perf_counter()
        self._backend = load_backend(config)
        self._state = "ready"
        self.get_logger().info(f"ready in {time.perf_counter() - t0:.1f} s: {config.describe()}; images on "
                               f"{self._image_topic}, instructions on "
                               f"{self.resolve_topic_name(str(self.get_parameter('instruction_topic').value))}")

    def start(self) -> None:
        """Start the inference worker thread (after :meth:`load_backend`)."""
        if self._backend is None:
            raise RuntimeError("load_backend() must run before start()")
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="lisa-inference", daemon=True)
            self._worker.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the worker thread (it finishes the frame it is on)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join(timeout)

    @property
    def counters(self) -> dict[str, int]:
        with self._cond:
            return dict(self._counts)

    # ------------------------------------------------------------------ callbacks (cheap, never block)
    def image_callback(self, msg: Any) -> None:
        now = self.get_clock().now().nanoseconds
        with self._cond:
            self._frame_seq += 1
            self._counts["frames_received"] += 1
            if self._frame is not None and not self._frame_taken and self._request is not None:
                self._counts["frames_dropped"] += 1
            self._frame = _Frame(msg=msg, seq=self._frame_seq, received_ns=now)
            self._frame_taken = False
            self._cond.notify_all()

    def depth_callback(self, msg: Image) -> None:
        with self._cond:
            self._depth.append((_stamp_ns(msg.header), msg))

    def camera_info_callback(self, msg: CameraInfo) -> None:
        with self._cond:
            self._camera_info = msg

    def instruction_callback(self, msg: String) -> None:
        text = str(msg.data).strip()
        with self._cond:
            active = self._request
            if not text or text.lower() in STOP_WORDS:
                self._request = None
                self._cond.notify_all()
        if not text:
            stopped = f"; stopped request {active.seq} ({active.text!r})" if active else ""
            self.get_logger().warning(f"empty instruction: nothing to segment{stopped}. Publish what to look "
                                      "for, e.g. 'something to cut with'; 'stop' ends continuous mode")
            return
        if text.lower() in STOP_WORDS:
            self.get_logger().info(f"stop: {'request ' + str(active.seq) + ' ended' if active else 'nothing running'}")
            return
        continuous = bool(self.get_parameter("continuous").value)
        with self._cond:
            self._request_seq += 1
            self._counts["requests"] += 1
            self._request = _Request(text=text, seq=self._request_seq, continuous=continuous)
            self._cond.notify_all()
        self.get_logger().info(f"request {self._request_seq}: {text!r} ({'continuous' if continuous else 'once'})")

    def diagnostics_callback(self) -> None:
        with self._cond:
            counts = dict(self._counts)
            latencies = list(self._latency)
            request = self._request
        status = DiagnosticStatus()
        status.name = f"{self.get_name()}: inference"
        status.hardware_id = self.get_fully_qualified_name()
        ok = self._state == "ready"
        status.level = DiagnosticStatus.OK if ok else DiagnosticStatus.WARN
        status.message = self._state
        values = {**{k: str(v) for k, v in counts.items()},
                  "state": self._state,
                  "request": "" if request is None else request.text,
                  "last_latency_ms": f"{self._last_latency_ms:.1f}",
                  "mean_latency_ms": f"{(sum(latencies) / len(latencies)) if latencies else float('nan'):.1f}"}
        status.values = [KeyValue(key=k, value=v) for k, v in values.items()]
        out = DiagnosticArray()
        out.header.stamp = self.get_clock().now().to_msg()
        out.status = [status]
        self._pub_diag.publish(out)

    # ------------------------------------------------------------------ worker
    def _work(self) -> None:
        last_start = 0.0
        while True:
            with self._cond:
                job = None
                while not self._stopping:
                    req, frame = self._request, self._frame
                    if (req is not None and frame is not None and frame.seq > req.last_frame_seq
                            and frame.seq != self._bad_frame_seq):
                        rate = float(self.get_parameter("max_rate").value)
                        wait = (last_start + 1.0 / rate - time.monotonic()) if (req.continuous and rate > 0) else 0
                        if wait <= 0:
                            job = (req, frame)
                            break
                        self._cond.wait(wait)
                    else:
                        self._cond.wait(0.5)
                if self._stopping:
                    return
                req, frame = job
                self._frame_taken = True
                req.last_frame_seq = frame.seq
                if not req.continuous:
                    self._request = None
            last_start = time.monotonic()
            try:
                outcome = self._answer(req, frame)
            except Exception:  # keep serving whatever happens to one frame
                if not self.context.ok():
                    # SIGINT shut the context down while this frame was in inference: its publishers are
                    # gone with it, so the result cannot be published; that is shutdown, not a failure
                    self._stopping = True
                    return
                outcome = "error"
                self.get_logger().error(f"request {req.seq}: unexpected failure on frame {frame.seq}:\n"
                                        f"{traceback.format_exc()}")
            with self._cond:
                if outcome == "ok":
                    self._counts["frames_processed"] += 1
                elif outcome == "bad_frame":
                    self._counts["frames_bad"] += 1
                    self._bad_frame_seq = frame.seq  # not retried by later requests
                    if not req.continuous and self._request is None:
                        self._request = req  # a once request waits for the next usable frame
                else:
                    self._counts["errors"] += 1

    def _decode(self, msg: Any) -> Any:
        return compressed_to_rgb(msg) if isinstance(msg, CompressedImage) else image_to_rgb(msg)

    def _answer(self, req: _Request, frame: _Frame) -> str:
        """Segment one frame for one request and publish everything; returns ok / bad_frame / error."""
        header = frame.msg.header
        log = self.get_logger()
        try:
            rgb = self._decode(frame.msg)
        except (UnsupportedEncodingError, MalformedImageError) as exc:
            log.warning(f"frame {frame.seq} ({_fmt_stamp(header)}) skipped: {exc}")
            return "bad_frame"
        t0 = time.perf_counter()
        queue_ms = (self.get_clock().now().nanoseconds - frame.received_ns) / 1e6
        try:
            result = self._backend.segment(
                rgb, req.text, mode=str(self.get_parameter("mode").value),
                max_new_tokens=int(self.get_parameter("max_new_tokens").value),
                frame_id=f"{header.frame_id}@{_stamp_ns(header)}#{frame.seq}")
        except InvalidImageError as exc:
            log.warning(f"frame {frame.seq} ({_fmt_stamp(header)}) skipped: {exc}")
            return "bad_frame"
        except InvalidQueryError as exc:
            log.warning(f"request {req.seq} {req.text!r} refused: {exc}")
            with self._cond:
                if self._request is req:
                    self._request = None
            return "error"
        except LisaError as exc:
            log.warning(f"request {req.seq} failed on frame {frame.seq}: {type(exc).__name__}: {exc}")
            return "error"
        inference_ms = (time.perf_counter() - t0) * 1000.0
        h, w = rgb.shape[:2]
        if not result.image_size or tuple(result.image_size) == (0, 0):
            result.image_size = (h, w)
        points, depth_note = self._targets(header, result, (h, w))
        self._publish(req, frame, rgb, result, points, depth_note, queue_ms, inference_ms)
        return "ok"

    def _targets(self, header: Any, result: Any, size: tuple[int, int]) -> tuple[list[Any], str | None]:
        """Per-mask 3D points from the depth image closest in time to ``header`` (None where unknown)."""
        if not self.get_parameter("depth_topic").value or not self.get_parameter("camera_info_topic").value:
            return [], "no depth configured"
        if not len(result.masks):
            return [], "no mask"
        stamp = _stamp_ns(header)
        with self._cond:
            info = self._camera_info
            candidates = list(self._depth)
        if info is None:
            return [], "no CameraInfo received yet"
        if not candidates:
            return [], "no depth image received yet"
        depth_stamp, depth_msg = min(candidates, key=lambda item: abs(item[0] - stamp))
        tolerance_ns = float(self.get_parameter("sync_tolerance").value) * 1e9
        if abs(depth_stamp - stamp) > tolerance_ns:
            note = f"no depth image within {tolerance_ns / 1e9:.3f} s of the colour frame"
            self.get_logger().warning(note, throttle_duration_sec=5.0)
            return [], note
        try:
            depth = depth_to_meters_array(depth_msg)
            intrinsics, info_size = camera_info_intrinsics(info)
        except (UnsupportedEncodingError, MalformedImageError, ValueError) as exc:
            self.get_logger().warning(f"depth unusable: {exc}", throttle_duration_sec=5.0)
            return [], f"depth unusable: {exc}"
        if depth.shape != size:
            note = (f"depth image is {depth.shape[0]}x{depth.shape[1]} but the colour image is {size[0]}x{size[1]}; "
                    "publish depth aligned to the colour camera (e.g. aligned_depth_to_color)")
            self.get_logger().warning(note, throttle_duration_sec=5.0)
            return [], note
        if info_size[0] and info_size[1] and info_size != size:
            intrinsics = intrinsics.scaled(size[1] / info_size[1], size[0] / info_size[0])
        return [mask_target_point(depth, m, intrinsics) for m in result.masks], None

    def _publish(self, req: _Request, frame: _Frame, rgb: Any, result: Any, points: list[Any],
                 depth_note: str | None, queue_ms: float, inference_ms: float) -> None:
        header = outputs.copy_header(frame.msg.header)
        now_ns = self.get_clock().now().nanoseconds
        stamp_ns = _stamp_ns(header)
        latency_ms = (now_ns - (stamp_ns if stamp_ns > 0 else frame.received_ns)) / 1e6
        with self._cond:
            self._latency.append(latency_ms)
            self._last_latency_ms = latency_ms
            counters = dict(self._counts)
        counters["frames_processed"] += 1  # this one
        report = outputs.FrameReport(request=req.seq, frame_seq=frame.seq, latency_ms=latency_ms,
                                     queue_ms=queue_ms, inference_ms=inference_ms, counters=counters)
        self._pub_mask.publish(to_image_msg(outputs.label_mask(result, rgb.shape[:2]), "mono8", header))
        if self.get_parameter("publish_overlay").value:
            raw = self._pub_overlay.get_subscription_count() > 0
            jpeg = self._pub_overlay_jpeg.get_subscription_count() > 0
            if raw or jpeg:
                overlay = result.overlay(rgb)
                if raw:
                    self._pub_overlay.publish(to_image_msg(overlay, "rgb8", header))
                if jpeg:
                    msg = CompressedImage(header=header, format="jpeg")
                    msg.data = encode_jpeg(overlay)
                    self._pub_overlay_jpeg.publish(msg)
        self._pub_answer.publish(outputs.answer_msg(result))
        if points and points[0] is not None:
            self._pub_point.publish(outputs.point_msg(header, points[0]))
        self._pub_markers.publish(outputs.markers_msg(header, result, points))
        if self._pub_detections is not None:
            self._pub_detections.publish(outputs.detections_msg(header, result))
        self._pub_result.publish(String(data=outputs.result_json(result, header, report, points,
                                                                 depth_note=depth_note)))
        log = self.get_logger()
        summary = (f"request {req.seq} frame {frame.seq} ({_fmt_stamp(header)}): {len(result.instances)} mask(s), "
                   f"latency {latency_ms:.0f} ms (inference {inference_ms:.0f} ms), dropped "
                   f"{counters['frames_dropped']}")
        if req.continuous:
            log.info(summary, throttle_duration_sec=5.0)
        else:
            log.info(f"{summary}: {result.text!r}")

    # ------------------------------------------------------------------ parameters
    @staticmethod
    def _camera_qos(name: str) -> QoSProfile:
        if name == "reliable":
            return QoSProfile(depth=2, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
        return QoSProfile(depth=2, reliability=ReliabilityPolicy.BEST_EFFORT, history=HistoryPolicy.KEEP_LAST)

    @staticmethod
    def _validate(values: dict[str, Any]) -> str | None:
        """An error message for invalid parameter values, or None."""
        if "mode" in values and values["mode"] not in MODES:
            return f"mode must be one of {MODES}; got {values['mode']!r}"
        if "camera_qos" in values and values["camera_qos"] not in CAMERA_QOS:
            return f"camera_qos must be one of {CAMERA_QOS}; got {values['camera_qos']!r}"
        if "max_rate" in values and not float(values["max_rate"]) >= 0:
            return f"max_rate must be >= 0 (0: unlimited); got {values['max_rate']}"
        if "sync_tolerance" in values and not float(values["sync_tolerance"]) >= 0:
            return f"sync_tolerance must be >= 0 seconds; got {values['sync_tolerance']}"
        if "max_new_tokens" in values and int(values["max_new_tokens"]) < 1:
            return f"max_new_tokens must be >= 1; got {values['max_new_tokens']}"
        return None

    @staticmethod
    def _check(error: str | None) -> None:
        if error:
            raise ValueError(error)

    def _on_set_parameters(self, params: list[Any]) -> SetParametersResult:
        error = self._validate({p.name: p.value for p in params})
        return SetParametersResult(successful=error is None, reason=error or "")


def _stamp_ns(header: Any) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


def _fmt_stamp(header: Any) -> str:
    return f"{header.frame_id or '?'} @ {int(header.stamp.sec)}.{int(header.stamp.nanosec):09d}"


def main(args: list[str] | None = None) -> int:
    """Entry point of ``ros2 run lisa_agent lisa_node`` and ``python -m ros_nodes.lisa_node``."""
    rclpy.init(args=args)
    node = None
    code = 0
    try:
        node = LisaNode()
        node.load_backend()
        node.start()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (LisaError, ValueError) as exc:
        if node is not None:
            node.get_logger().fatal(f"{exc}")
        else:
            print(f"lisa_node: {exc}", file=sys.stderr)
        code = 1
    finally:
        if node is not None:
            node.stop()
            node.destroy_node()
        rclpy.try_shutdown()
    if code:
        sys.stderr.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())

"""``lisa_node``: camera frames + a natural-language instruction in; masks, answer and 3D target out.

Run::

    python -m ros_nodes.lisa_node --ros-args -p model:=tabletop-tiny -p image_topic:=/camera/color/image_raw
    ros2 run lisa_agent lisa_node --ros-args -p server:=tcp://127.0.0.1:5557
    ros2 topic pub --once /lisa_node/instruction std_msgs/String "{data: 'grab something to cut with'}"

Subscriptions: ``image_topic`` (sensor_msgs/Image rgb8, bgr8, rgba8, bgra8, mono8, any row padding;
or sensor_msgs/CompressedImage on ``<image_topic>/compressed`` with ``compressed:=true``), optional
``depth_topic`` (16UC1 mm or 32FC1 m, aligned with the colour image) + ``camera_info_topic``, and
``instruction_topic`` (std_msgs/String; empty or "stop" ends a continuous request).

Publications (:mod:`ros_nodes.publishing`), in the node's namespace, each stamped with the source
frame's header: ``~/mask``, ``~/overlay``, ``~/overlay/compressed``, ``~/answer``, ``~/result`` (the
library's result schema plus the node's envelope), ``~/target_point``, ``~/markers``,
``~/detections``, ``~/segmentation`` (typed ``lisa_interfaces/Segmentation``); and ``/diagnostics``. Where
``lisa_interfaces`` is built, the node also serves the ``Segment`` action and service on ``~/segment``
(:mod:`ros_nodes.action_server`). With ``foxglove_port`` set, the same outputs also go to a
Foxglove live view (:class:`lisa_agent.integrations.foxglove.FoxglovePublisher`, foxglove-sdk) that takes
instructions from Foxglove's Publish panel (``/lisa/instruction``, ``{"data": "..."}``). Parameters:
:mod:`ros_nodes.parameters` (the engine's come from :class:`lisa_agent.config.EngineConfig`).

The node translates: each frame becomes a :class:`lisa_agent.frames.Frame` (pixels, the header's
frame_id and stamp, the depth image closest in time with its own stamp, intrinsics from CameraInfo);
the engine computes the 3D targets and refuses depth from another instant (``sync_tolerance``).

Threading: callbacks only store the newest message; one worker thread takes the newest frame when
a request is pending, so inference never blocks the executor and a slow model never works through
a backlog (replaced frames are counted as dropped). The Segment action runs on a companion node with its own
executor thread (:mod:`ros_nodes.action_server`), so a goal waiting for a frame never blocks the camera
callbacks; the model is shared between the worker and the action under ``engine_lock``.
"""

from __future__ import annotations

import collections
import faulthandler
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import SetParametersResult
from rclpy.executors import ExternalShutdownException
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import String

from lisa_agent.backend import SegmentBackend, open_backend
from lisa_agent.errors import LisaError
from lisa_agent.noise import quiet_library_noise

from . import parameters
from .publishing import ResultPublisher
from .worker import TopicWorker, _Arrival, _Request, _stamp_ns

STOP_WORDS = frozenset({"stop", "cancel", "halt"})
#: Parameters of the node, re-exported for launch files and tests (:mod:`ros_nodes.parameters`).
NODE_PARAMETERS = parameters.NODE_PARAMETERS
ENGINE_PARAMETERS = parameters.ENGINE_PARAMETERS
QUERY_PARAMETERS = parameters.QUERY_PARAMETERS
TRACK_PARAMETERS = parameters.TRACK_PARAMETERS


class LisaNode(TopicWorker):
    """The LISA node. Construct, then :meth:`load_backend` (slow), :meth:`start`, spin, :meth:`stop`.

    Args:
        backend: a :class:`~lisa_agent.frames.SegmentBackend` to use instead of loading one from the
            parameters (tests, or sharing one engine between nodes).
        interfaces: subscribe and create the outputs now (:meth:`open_interfaces`); the lifecycle node opens
            them on ``activate`` instead.
        **kwargs: passed to :class:`rclpy.node.Node` (``parameter_overrides``, ``context``, ...).
    """

    def __init__(self, node_name: str = "lisa_node", *, backend: SegmentBackend | None = None,
                 interfaces: bool = True, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        parameters.declare(self)
        self.add_on_set_parameters_callback(self._on_set_parameters)

        self._backend = backend
        #: held around every model call (the topic worker's and the action's)
        self.engine_lock = threading.Lock()
        self._cond = threading.Condition()
        self._frame: _Arrival | None = None
        self._frame_taken = True
        self._request: _Request | None = None
        self._request_seq = 0
        self._frame_seq = 0
        self._bad_frame_seq = -1
        self._depth: collections.deque[tuple[int, Any]] = collections.deque(maxlen=30)
        self._camera_info: Any = None
        self._depth_warned: tuple[str, float] = ("", 0.0)  # last depth warning and when (monotonic s)
        self._stopping = False
        self._worker: threading.Thread | None = None
        self._counts = {"frames_received": 0, "frames_processed": 0, "frames_dropped": 0, "frames_bad": 0,
                        "requests": 0, "errors": 0}
        self._latency: collections.deque[float] = collections.deque(maxlen=50)
        self._last_latency_ms = float("nan")
        self._state = "loading" if backend is None else "ready"
        self._image_topic = ""
        self._outputs: Any = None
        self._foxglove: Any = None
        self.segment_server: Any = None  # the Segment action, from start() (once the model is loaded)
        self._opened: list[Any] = []  # subscriptions and publishers of open_interfaces()
        self._pub_diag = self.create_publisher(DiagnosticArray, "/diagnostics", parameters.RELIABLE)
        self.create_timer(1.0, self.diagnostics_callback)
        if interfaces:
            self.open_interfaces()

    def open_interfaces(self) -> None:
        """Subscribe to the camera, depth, CameraInfo and instruction topics and create the outputs (and the
        Foxglove view when ``foxglove_port`` is set)."""
        before = {id(e) for e in (*self.subscriptions, *self.publishers)}
        camera_qos = parameters.camera_qos(self.get_parameter("camera_qos").value)
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
        self.create_subscription(String, str(self.get_parameter("instruction_topic").value),
                                 self.instruction_callback, parameters.RELIABLE)
        self._outputs = ResultPublisher(self)
        self._foxglove = self._start_foxglove()
        self._opened = [e for e in (*self.subscriptions, *self.publishers) if id(e) not in before]

    def close_interfaces(self) -> None:
        """Undo :meth:`open_interfaces` and stop serving the Segment action (after :meth:`stop`)."""
        if self.segment_server is not None:
            self.segment_server.close()
            self.segment_server = None
        if self._foxglove is not None:
            self._foxglove.close()
            self._foxglove = None
        for entity in self._opened:
            if entity in self.subscriptions:
                self.destroy_subscription(entity)
            else:
                self.destroy_publisher(entity)
        self._opened = []
        with self._cond:
            self._frame, self._request, self._camera_info = None, None, None
            self._depth.clear()

    # ------------------------------------------------------------------ setup
    def load_backend(self) -> None:
        """Load the model (or connect to the server) named by the parameters. Slow; not in a callback."""
        if self._backend is not None:
            return
        server = str(self.get_parameter("server").value)
        config = parameters.engine_config(self)
        what = f"server {server}" if server else f"model {config.describe()}"
        self.get_logger().info(f"loading {what} ...")
        t0 = time.perf_counter()
        self._backend = open_backend(server or config.model, config=config,
                                     timeout=float(self.get_parameter("server_timeout").value))
        self._state = "ready"
        images = self._image_topic or str(self.get_parameter("image_topic").value)
        self.get_logger().info(f"ready in {time.perf_counter() - t0:.1f} s: {what}; images on "
                               f"{images}, instructions on "
                               f"{self.resolve_topic_name(str(self.get_parameter('instruction_topic').value))}")

    def _start_segment_server(self) -> Any:
        """The Segment action/service and ``~/segmentation`` (:mod:`ros_nodes.action_server`), or None (logged)
        where ``lisa_interfaces`` is not built."""
        try:
            from .action_server import SegmentServer
        except ImportError as exc:
            self.get_logger().warning(f"lisa_interfaces is not available ({exc}): no Segment action and no "
                                      "~/segmentation; build ros/lisa_interfaces with colcon and source the "
                                      "workspace (docs/ros.md)")
            return None
        return SegmentServer(self)

    # ------------------------------------------------------------------ what the action reads
    @property
    def backend(self) -> SegmentBackend | None:
        return self._backend

    @property
    def stopping(self) -> bool:
        return self._stopping or not self.context.ok()

    @property
    def image_topic(self) -> str:
        return self._image_topic

    def now_ns(self) -> int:
        return int(self.get_clock().now().nanoseconds)

    def newest_arrival(self) -> _Arrival | None:
        """The newest camera message (not decoded), or None before the first."""
        with self._cond:
            return self._frame

    def arrival_age_s(self, arrival: _Arrival) -> float:
        """Seconds from the message's source stamp (its arrival, when unstamped) to now."""
        stamp_ns = _stamp_ns(arrival.msg.header)
        return (self.now_ns() - (stamp_ns if stamp_ns > 0 else arrival.received_ns)) / 1e9

    def wait_for_frame(self, timeout: float) -> None:
        """Block until a camera message arrives (or ``timeout`` seconds pass)."""
        with self._cond:
            self._cond.wait(timeout)

    def _start_foxglove(self) -> Any:
        """The Foxglove live view when ``foxglove_port`` is set (ValueError when it cannot start), else None."""
        port = int(self.get_parameter("foxglove_port").value)
        if not port:
            return None
        host = str(self.get_parameter("foxglove_host").value)
        try:
            from lisa_agent.integrations.foxglove import FoxglovePublisher
        except ImportError as exc:
            raise ValueError(f"foxglove_port needs foxglove-sdk (pip install 'lisa-agent[console]'): {exc}") from None
        try:
            publisher = FoxglovePublisher(port=port, host=host, on_instruction=self._foxglove_instruction,
                                          name=self.get_fully_qualified_name(),
                                          insecure=bool(self.get_parameter("foxglove_insecure").value))
        except Exception as exc:  # the port is taken, the address is not this machine's, ...
            raise ValueError(f"foxglove_port {port}: the Foxglove server cannot start on {host}: {exc}") from None
        self._outputs.foxglove = publisher
        self.get_logger().info(f"Foxglove live view on ws://{host}:{publisher.port}; instructions from its Publish "
                               "panel on /lisa/instruction")
        return publisher

    def _foxglove_instruction(self, text: str) -> None:
        """An instruction typed in Foxglove: handled as one on the instruction topic."""
        self.instruction_callback(String(data=text))

    def start(self) -> None:
        """Start the inference worker thread and serve the Segment action (after :meth:`load_backend`)."""
        if self._backend is None:
            raise RuntimeError("load_backend() must run before start()")
        if self.segment_server is None:
            self.segment_server = self._start_segment_server()
        with self._cond:
            self._stopping = False
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
            self._worker = None
        if self._foxglove is not None:
            self._foxglove.close()
            self._foxglove = None

    def destroy_node(self) -> None:
        """Stop serving the action (its companion node's executor thread joins first), then destroy the node."""
        if self.segment_server is not None:
            self.segment_server.close()
            self.segment_server = None
        super().destroy_node()

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
            self._frame = _Arrival(msg=msg, seq=self._frame_seq, received_ns=now)
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
            stopped = f"; stopped request {active.seq} ({active.text[:200]!r})" if active else ""
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
        self.get_logger().info(f"request {self._request_seq}: {text[:200]!r} ({'continuous' if continuous else 'once'})")

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

    # ------------------------------------------------------------------ parameters
    def _on_set_parameters(self, params: list[Any]) -> SetParametersResult:
        error = parameters.validate({p.name: p.value for p in params})
        return SetParametersResult(successful=error is None, reason=error or "")


def run_node(name: str, make: Callable[[], Any], args: list[str] | None = None, *,
             start: Callable[[Any], None] | None = None) -> int:
    """Run the node ``make()`` builds (after ``rclpy.init(args)``) until Ctrl-C or shutdown, then stop and destroy it.

    ``start(node)`` runs before spinning (load the model, open the topics). Returns the exit status: 0, or 1 after
    a ``LisaError`` / ``ValueError`` (logged as fatal by the node, or printed as ``name: message`` when the node
    could not be built).
    """
    quiet_library_noise()
    faulthandler.enable()  # a crash in native code (rclpy, DDS, torch) prints every thread's Python stack
    rclpy.init(args=args)
    node = None
    code = 0
    try:
        node = make()
        if start is not None:
            start(node)
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except (LisaError, ValueError) as exc:
        if node is not None:
            node.get_logger().fatal(f"{exc}")
        else:
            print(f"{name}: {exc}", file=sys.stderr)
        code = 1
    finally:
        if node is not None:
            node.stop()
            node.destroy_node()
        rclpy.try_shutdown()
    if code:
        sys.stderr.flush()
    return code


def _load_and_start(node: LisaNode) -> None:
    node.load_backend()
    node.start()


def main(args: list[str] | None = None) -> int:
    """Entry point of ``ros2 run lisa_agent lisa_node`` and ``python -m ros_nodes.lisa_node``."""
    return run_node("lisa_node", LisaNode, args, start=_load_and_start)


if __name__ == "__main__":
    sys.exit(main())

"""``lisa_node``'s parameters: the node's own (topics, QoS, scheduling) and the library's, generated from
:class:`lisa_agent.config.EngineConfig` (how the model loads), :class:`lisa_agent.options.QueryOptions` (how it
answers: ``mode``, ``max_new_tokens``, ``answer``) and :class:`lisa_agent.options.TrackOptions` (with ``track``:
``tracker``, ``reason_every``, ``reason_period_s``, ``min_confidence``), so the names, defaults and help are the
library's.

The library's parameters are declared with dynamic typing and read back through ``from_texts``, so
``-p presence_threshold:=0.3``, ``-p reason_period_s:=0`` and the launch file's string arguments all work.
The engine's are read-only (the model loads once); the query's and tracking's may change at run time
(``ros2 param set``), checked by the same rules.
"""

from __future__ import annotations

from typing import Any

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

from lisa_agent.config import EngineConfig, engine_parameters
from lisa_agent.errors import InvalidArgumentError, LisaError
from lisa_agent.frames import DEPTH_TOLERANCE_S
from lisa_agent.options import QueryOptions, TrackOptions, parameters

CAMERA_QOS = ("best_effort", "reliable")
ACTION_POLICIES = ("queue", "preempt")

#: The node's own parameters: name -> (default, description, read_only). Topics, QoS and the backend
#: are fixed at start; the rest may be changed at run time with ``ros2 param set``.
NODE_PARAMETERS: dict[str, tuple[Any, str, bool]] = {
    "image_topic": ("/camera/color/image_raw", "colour image topic (sensor_msgs/Image)", True),
    "compressed": (False, "subscribe to sensor_msgs/CompressedImage on <image_topic>/compressed", True),
    "depth_topic": ("", "aligned depth image (16UC1 mm or 32FC1 m); empty: no 3D target", True),
    "camera_info_topic": ("", "CameraInfo of the depth image (intrinsics K); empty: no 3D target", True),
    "instruction_topic": ("~/instruction", "std_msgs/String instructions; empty or 'stop' ends continuous mode", True),
    "camera_qos": ("best_effort", "QoS of the camera subscriptions: best_effort (sensor data) or reliable", True),
    "server": ("", "model server endpoint (tcp://host:port, or http://host:8000/lisa for a Ray Serve deployment); when set, used instead of loading the model", True),
    "server_timeout": (10.0, "seconds to wait for the model server per request", True),
    "continuous": (False, "keep segmenting new frames with the last instruction until 'stop'", False),
    "max_rate": (5.0, "continuous mode: at most this many frames per second (0: as fast as possible)", False),
    "publish_overlay": (True, "publish ~/overlay and ~/overlay/compressed (rendered only with subscribers)", False),
    "sync_tolerance": (DEPTH_TOLERANCE_S, "seconds between colour and depth stamps still treated as the same "
                       "instant", False),
    "track": (False, "continuous mode: a tracker gives every camera frame a mask between reasoning steps (tracker, "
              "reason_every, reason_period_s, min_confidence); off: only the frames the model looked at get one; "
              "from the next instruction", False),
    "action_policy": ("queue", "Segment action: a goal arriving while one runs waits (queue: one may wait, a third "
                      "is rejected) or replaces it (preempt: the running goal ends with code superseded)", False),
    "action_max_age": (1.0, "Segment action without an image: the newest camera frame may be this old (seconds, "
                       "source stamp to now); a goal's max_age_s overrides it", False),
    "action_frame_timeout": (5.0, "Segment action without an image: wait this long for such a frame, then abort "
                             "with code no_frame; a goal's frame_timeout_s overrides it", False),
    "foxglove_port": (0, "Foxglove live view (foxglove-sdk WebSocket server) on this port: the answered frames, masks "
                      "as ImageAnnotations, answers and 3D targets; instructions from Foxglove's Publish panel on "
                      "/lisa/instruction ({\"data\": \"...\"}); 0: off", True),
    "foxglove_host": ("127.0.0.1", "address the Foxglove server binds (its protocol has no authentication: any "
                      "other than loopback needs foxglove_insecure)", True),
    "foxglove_insecure": (False, "allow a non-loopback foxglove_host (no authentication: trusted networks only)", True),
}

#: The engine's parameters, from :func:`lisa_agent.config.engine_parameters`: name -> (default, description).
ENGINE_PARAMETERS: dict[str, tuple[Any, str]] = {name: (default, description)
                                                 for name, default, description in engine_parameters()}
#: How the node's requests are answered (``return_logits`` is not for a topic): name -> (default, description).
QUERY_PARAMETERS: dict[str, tuple[Any, str]] = {
    name: (default, description) for name, default, description in parameters(QueryOptions, exclude=("return_logits",))}
#: How masks are tracked with ``track``: name -> (default, description).
TRACK_PARAMETERS: dict[str, tuple[Any, str]] = {
    name: (default, description) for name, default, description in parameters(TrackOptions)}


def declare(node: Node) -> None:
    """Declare every parameter on ``node`` and check the values it starts with (ValueError if unusable)."""
    for name, (default, description, read_only) in NODE_PARAMETERS.items():
        node.declare_parameter(name, default, ParameterDescriptor(description=description, read_only=read_only))
    for table, read_only in ((ENGINE_PARAMETERS, True), (QUERY_PARAMETERS, False), (TRACK_PARAMETERS, False)):
        for name, (default, description) in table.items():
            node.declare_parameter(name, default, ParameterDescriptor(description=description, read_only=read_only,
                                                                      dynamic_typing=True))
    names = [*NODE_PARAMETERS, *QUERY_PARAMETERS, *TRACK_PARAMETERS]
    error = validate({name: node.get_parameter(name).value for name in names})
    if error:
        raise InvalidArgumentError(error)
    engine_config(node)  # an unusable engine option fails now, naming itself


def engine_config(node: Node) -> EngineConfig:
    """The :class:`EngineConfig` the node's engine parameters give (raises InvalidArgumentError)."""
    return EngineConfig.from_texts({name: node.get_parameter(name).value for name in ENGINE_PARAMETERS})


def query_options(node: Node) -> QueryOptions:
    """The :class:`QueryOptions` the node's parameters give now."""
    return QueryOptions.from_texts({name: node.get_parameter(name).value for name in QUERY_PARAMETERS})


def track_options(node: Node) -> TrackOptions:
    """The :class:`TrackOptions` the node's parameters give now."""
    return TrackOptions.from_texts({name: node.get_parameter(name).value for name in TRACK_PARAMETERS})


def _check(cls: Any, values: dict[str, Any]) -> str | None:
    """An error message when ``values`` (some fields of ``cls``, as parameters give them) are unusable."""
    if not values:
        return None
    try:
        cls.from_texts(values)
    except LisaError as exc:
        return str(exc)
    return None


def validate(values: dict[str, Any]) -> str | None:
    """An error message for unusable values of the node's own parameters and the query's and tracking's (each
    checked by the library's own rules), or None."""
    for cls, table in ((QueryOptions, QUERY_PARAMETERS), (TrackOptions, TRACK_PARAMETERS)):
        error = _check(cls, {k: v for k, v in values.items() if k in table})
        if error:
            return error
    if "camera_qos" in values and values["camera_qos"] not in CAMERA_QOS:
        return f"camera_qos must be one of {CAMERA_QOS}; got {values['camera_qos']!r}"
    if "max_rate" in values and not float(values["max_rate"]) >= 0:
        return f"max_rate must be >= 0 (0: unlimited); got {values['max_rate']}"
    if "sync_tolerance" in values and not float(values["sync_tolerance"]) >= 0:
        return f"sync_tolerance must be >= 0 seconds; got {values['sync_tolerance']}"
    if "action_policy" in values and values["action_policy"] not in ACTION_POLICIES:
        return f"action_policy must be one of {ACTION_POLICIES}; got {values['action_policy']!r}"
    for name in ("action_max_age", "action_frame_timeout"):
        if name in values and not float(values[name]) > 0:
            return f"{name} must be > 0 seconds; got {values[name]}"
    if "foxglove_port" in values and not 0 <= int(values["foxglove_port"]) <= 65535:
        return f"foxglove_port must be in [0, 65535] (0: off); got {values['foxglove_port']}"
    return None


def camera_qos(name: str) -> QoSProfile:
    """The QoS of the camera subscriptions: ``reliable``, or best effort (what cameras publish)."""
    reliability = ReliabilityPolicy.RELIABLE if name == "reliable" else ReliabilityPolicy.BEST_EFFORT
    return QoSProfile(depth=2, reliability=reliability, history=HistoryPolicy.KEEP_LAST)


#: The QoS of the node's outputs and its instruction subscription.
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)

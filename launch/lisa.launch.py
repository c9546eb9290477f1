"""Launch ``lisa_node`` for one camera.

::

    ros2 launch lisa_agent lisa.launch.py camera:=/camera/color depth:=/camera/aligned_depth_to_color
    ros2 launch lisa_agent lisa.launch.py camera:=/camera/color server:=tcp://gpu-box:5557 continuous:=true
    ros2 topic pub --once /lisa/lisa_node/instruction std_msgs/String "{data: 'grab something to cut with'}"
    ros2 action send_goal /lisa/lisa_node/segment lisa_interfaces/action/Segment "{instruction: 'the knife'}"
    ros2 launch lisa_agent lisa.launch.py camera:=/camera/color lifecycle:=true   # then configure, activate

``camera`` is the camera namespace: the node reads ``<camera>/image_raw`` (or
``<camera>/image_raw/compressed`` with ``compressed:=true``) and ``<camera>/camera_info``;
``image_topic``/``camera_info_topic`` override them. ``depth`` is the depth namespace
(``<depth>/image_raw``; empty: no 3D target). The model's arguments (``model``, ``device``, ``dtype``,
``quantization``, ``mask_tta``, ...) are :class:`lisa_agent.config.EngineConfig`'s fields, the query's (``mode``,
``max_new_tokens``, ``answer``) :class:`lisa_agent.options.QueryOptions`' and, with ``track:=true``, the
tracking's (``tracker``, ``reason_every``, ``reason_period_s``, ``min_confidence``)
:class:`lisa_agent.options.TrackOptions`', with their defaults and help, passed to the node as text.
"""

from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from launch import LaunchDescription
from lisa_agent.config import engine_parameters
from lisa_agent.options import QueryOptions, TrackOptions, parameters

#: (name, default, description) of the launch arguments that are not the engine's.
NODE_ARGUMENTS = (
    ("camera", "/camera/color", "camera namespace: <camera>/image_raw and <camera>/camera_info"),
    ("image_topic", "", "colour image topic (default: <camera>/image_raw)"),
    ("compressed", "false", "read sensor_msgs/CompressedImage on <image_topic>/compressed"),
    ("depth", "", "aligned depth namespace: <depth>/image_raw (empty: no 3D target)"),
    ("camera_info_topic", "", "CameraInfo topic (default: <camera>/camera_info when depth is set)"),
    ("instruction_topic", "~/instruction", "std_msgs/String instructions"),
    ("camera_qos", "best_effort", "best_effort (cameras) or reliable"),
    ("server", "", "model server endpoint (tcp://HOST:PORT or a Ray Serve http:// address); when set, no model is loaded in the node"),
    ("continuous", "false", "keep segmenting new frames until 'stop'"),
    ("max_rate", "5.0", "continuous mode: frames per second at most"),
    ("publish_overlay", "true", "publish the overlay image for operators"),
    ("track", "false", "continuous mode: a tracker gives every camera frame a mask between reasoning steps"),
    ("foxglove_port", "0", "Foxglove live view on this port (loopback; instructions on /lisa/instruction); 0: off"),
    ("action_policy", "queue", "Segment action: a goal arriving while one runs waits (queue) or replaces it (preempt)"),
    ("action_max_age", "1.0", "Segment action without an image: the newest camera frame may be this old (s)"),
    ("action_frame_timeout", "5.0", "Segment action without an image: wait this long for such a frame (s)"),
    ("lifecycle", "false", "run lisa_lifecycle_node (a managed node: configure loads the model, activate serves)"),
    ("namespace", "lisa", "namespace of the node"),
    ("node_name", "lisa_node", "name of the node"),
)
#: The library's arguments (EngineConfig's, QueryOptions' and TrackOptions' fields as text), passed through to
#: the node, which reads them back with their own parsers.
ENGINE_ARGUMENTS = tuple((name, str(default), description) for name, default, description in engine_parameters())
QUERY_ARGUMENTS = tuple((name, str(default), description)
                        for name, default, description in parameters(QueryOptions, exclude=("return_logits",)))
TRACK_ARGUMENTS = tuple((name, str(default), description) for name, default, description in parameters(TrackOptions))
#: (name, default, description) of every launch argument.
ARGUMENTS = NODE_ARGUMENTS + QUERY_ARGUMENTS + TRACK_ARGUMENTS + ENGINE_ARGUMENTS

_BOOL = {"compressed", "continuous", "publish_overlay", "track"}
_FLOAT = {"max_rate", "action_max_age", "action_frame_timeout"}
_INT = {"foxglove_port"}
_PASSTHROUGH = ("instruction_topic", "camera_qos", "server", "action_policy",
                *(name for name, _, _ in QUERY_ARGUMENTS + TRACK_ARGUMENTS + ENGINE_ARGUMENTS))


def _as_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off", ""):
        return False
    raise ValueError(f"expected true or false; got {text!r}")


def node_parameters(values: dict) -> dict:
    """lisa_node parameters from the launch arguments' string values (topics derived from ``camera``)."""
    camera = values["camera"].rstrip("/")
    params = {name: values[name] for name in _PASSTHROUGH}
    params["image_topic"] = values["image_topic"] or f"{camera}/image_raw"
    depth = values["depth"].rstrip("/")
    params["depth_topic"] = f"{depth}/image_raw" if depth else ""
    params["camera_info_topic"] = values["camera_info_topic"] or (f"{camera}/camera_info" if depth else "")
    for name in _BOOL:
        params[name] = _as_bool(values[name])
    for name in _FLOAT:
        params[name] = float(values[name])
    for name in _INT:
        params[name] = int(values[name])
    return params


def _make_node(context, *args, **kwargs):
    values = {name: LaunchConfiguration(name).perform(context) for name, _, _ in ARGUMENTS}
    executable = "lisa_lifecycle_node" if _as_bool(values["lifecycle"]) else "lisa_node"
    return [Node(package="lisa_agent", executable=executable, name=values["node_name"],
                 namespace=values["namespace"], parameters=[node_parameters(values)], output="screen",
                 emulate_tty=True)]


def generate_launch_description() -> LaunchDescription:
    declared = [DeclareLaunchArgument(name, default_value=default, description=description)
                for name, default, description in ARGUMENTS]
    return LaunchDescription([*declared, OpaqueFunction(function=_make_node)])

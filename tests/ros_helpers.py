"""Test-side ROS 2 helpers: start ``lisa_node`` as its own process and talk to it over real DDS.

Every rclpy context here is created with an explicit domain id, and every subprocess inherits
``os.environ`` (``ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST`` from conftest) plus that domain id,
so discovery never leaves the machine and test modules do not hear each other.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PointStamped
from rcl_interfaces.msg import Log
from rclpy.executors import SingleThreadedExecutor
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header, String
from visualization_msgs.msg import MarkerArray

REPO = Path(__file__).resolve().parents[1]
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
ROSOUT = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST,
                    durability=DurabilityPolicy.VOLATILE)


def ros_env(domain_id: int) -> dict[str, str]:
    """os.environ with discovery pinned to this machine and the given domain id."""
    env = dict(os.environ)
    env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env["ROS_DOMAIN_ID"] = str(domain_id)
    env.setdefault("PYTHONUNBUFFERED", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


ROS_PACKAGES = ("lisa_interfaces", "lisa_agent")


def colcon_executable() -> str:
    path = Path(sys.executable).with_name("colcon")
    found = str(path) if path.exists() else shutil.which("colcon")
    assert found, ("colcon is a test dependency: pip install 'lisa-agent[test]' (colcon-common-extensions and the "
                   "rosidl generator wheels), then python scripts/fix_ros_wheels.py")
    return found


def colcon_build(ws: Path, packages: Sequence[str] = ROS_PACKAGES, timeout: float = 900.0) -> Path:
    """``colcon build`` of the repository's ROS packages (``ros/``) into workspace ``ws``; returns the install base.

    As a ROS user builds, with the PyPI wheels standing in for a ROS distro: ``AMENT_PREFIX_PATH`` is the venv
    (the wheels install their ``share/``, ``lib/`` and CMake files there), CMake runs this interpreter."""
    env = dict(os.environ)
    env["AMENT_PREFIX_PATH"] = os.pathsep.join(p for p in (sys.prefix, env.get("AMENT_PREFIX_PATH", "")) if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("PYTHONPATH", None)
    cmd = [colcon_executable(), "--log-base", str(ws / "log"), "build", "--base-paths", str(REPO),
           "--build-base", str(ws / "build"), "--install-base", str(ws / "install"),
           "--packages-select", *packages, "--event-handlers", "console_direct+",
           "--cmake-args", "-DBUILD_TESTING=OFF", f"-DPython3_EXECUTABLE={sys.executable}"]
    done = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"colcon build failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    for package in packages:
        assert f"Finished <<< {package}" in output, output[-3000:]
    return ws / "install"


def sourced(install: Path, argv: Sequence[str], *, source_tree: bool = False) -> list[str]:
    """A command running ``argv`` after sourcing the workspace's ``setup.bash`` (as a ROS user does: it sets
    ``LD_LIBRARY_PATH`` for the generated type support). ``source_tree``: the repository's own ``lisa_agent``
    and ``ros_nodes`` come first on the path (the code under test, not the installed copy)."""
    first = f'export PYTHONPATH="{REPO}${{PYTHONPATH:+:$PYTHONPATH}}" && ' if source_tree else ""
    return ["bash", "-c", f'source "{install}/setup.bash" && {first}exec "$0" "$@"', *argv]


def ros_args(params: dict[str, Any]) -> list[str]:
    """``--ros-args -p k:=v ...`` for a parameter dict (bools as true/false)."""
    args = ["--ros-args"]
    for key, value in params.items():
        text = str(value).lower() if isinstance(value, bool) else str(value)
        text = text or "''"  # `-p name:=` does not parse; an empty string is YAML ''
        args += ["-p", f"{key}:={text}"]
    return args


def stamp(sec: int, nanosec: int = 0, frame_id: str = "camera_color_optical_frame") -> Header:
    header = Header()
    header.stamp.sec, header.stamp.nanosec, header.frame_id = sec, nanosec, frame_id
    return header


def image_msg(rgb: np.ndarray, encoding: str, header: Header, *, pad: int = 0) -> Image:
    """A sensor_msgs/Image of an HxWx3 RGB array in ``encoding`` (rgb8, bgr8, mono8), rows padded by ``pad``."""
    if encoding == "rgb8":
        pixels = rgb
    elif encoding == "bgr8":
        pixels = rgb[:, :, ::-1]
    elif encoding == "mono8":
        pixels = rgb.mean(axis=2).astype(np.uint8)[:, :, None]
    else:
        raise ValueError(encoding)
    h, w, c = pixels.shape
    rows = np.zeros((h, w * c + pad), dtype=np.uint8)
    rows[:, : w * c] = pixels.reshape(h, w * c)
    rows[:, w * c:] = 0xAB  # padding bytes must be ignored
    msg = Image(header=header, height=h, width=w, encoding=encoding, is_bigendian=0, step=w * c + pad)
    msg.data = rows.tobytes()
    return msg


def camera_info_msg(header: Header, size: tuple[int, int], k: Sequence[float]) -> CameraInfo:
    msg = CameraInfo(header=header, height=size[0], width=size[1], distortion_model="plumb_bob")
    msg.k = [float(v) for v in k]
    msg.d = [0.0] * 5
    return msg


class Probe:
    """A test-side node (own context, own executor thread) that publishes inputs and records outputs.

    Args:
        domain_id: DDS domain of the node under test.
        node_ns: fully qualified name of the node under test (its private topics live under it).
        image_topic / depth_topic / info_topic / instruction_topic: where to publish inputs.
    """

    def __init__(self, domain_id: int, *, node_ns: str = "/lisa_node", image_topic: str = "/camera/image",
                 depth_topic: str = "/camera/depth", info_topic: str = "/camera/info",
                 instruction_topic: str | None = None, name: str = "lisa_probe") -> None:
        self.context = rclpy.Context()
        rclpy.init(context=self.context, domain_id=domain_id)
        self.node = rclpy.create_node(name, context=self.context)
        self.node_ns = node_ns
        self._cond = threading.Condition()
        self.received: dict[str, list[Any]] = {}
        self.pub_image = self.node.create_publisher(Image, image_topic, RELIABLE)
        self.pub_compressed = self.node.create_publisher(CompressedImage, image_topic + "/compressed", RELIABLE)
        self.pub_depth = self.node.create_publisher(Image, depth_topic, RELIABLE)
        self.pub_info = self.node.create_publisher(CameraInfo, info_topic, RELIABLE)
        self.pub_instruction = self.node.create_publisher(String, instruction_topic or f"{node_ns}/instruction",
                                                          RELIABLE)
        for key, kind in (("mask", Image), ("overlay", Image), ("answer", String), ("result", String),
                          ("target_point", PointStamped), ("markers", MarkerArray),
                          ("overlay/compressed", CompressedImage)):
            self._listen(key, kind, f"{node_ns}/{key}", RELIABLE)
        self._listen("diagnostics", DiagnosticArray, "/diagnostics", RELIABLE)
        self._listen("rosout", Log, "/rosout", ROSOUT)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _listen(self, key: str, kind: Any, topic: str, qos: QoSProfile) -> None:
        self.received[key] = []

        def callback(msg: Any, key: str = key) -> None:
            with self._cond:
                self.received[key].append((time.monotonic(), msg))
                self._cond.notify_all()

        self.node.create_subscription(kind, topic, callback, qos)

    def _spin(self) -> None:
        try:
            self.executor.spin()
        except Exception:  # context shut down
            pass

    def wait_for(self, key: str, predicate: Callable[[Any], bool] = lambda m: True, timeout: float = 30.0,
                 *, since: int = 0, poke: Callable[[], None] | None = None, poke_every: float = 0.5) -> Any:
        """The first message on ``key`` (index >= ``since``) satisfying ``predicate``.

        ``poke`` is called at once and every ``poke_every`` seconds while waiting (e.g. re-publish a
        frame and the instruction). Raises AssertionError after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        next_poke = 0.0
        while True:
            now = time.monotonic()
            if poke is not None and now >= next_poke:
                poke()
                next_poke = now + poke_every
            with self._cond:
                for _, msg in self.received[key][since:]:
                    if predicate(msg):
                        return msg
                if now > deadline:
                    got = len(self.received[key]) - since
                    raise AssertionError(f"no matching message on {key!r} within {timeout:.0f} s ({got} others)")
                self._cond.wait(min(0.05, max(0.0, deadline - now)))

    def count(self, key: str) -> int:
        with self._cond:
            return len(self.received[key])

    def messages(self, key: str, since: int = 0) -> list[Any]:
        with self._cond:
            return [m for _, m in self.received[key][since:]]

    def warnings(self, node_name: str = "lisa_node", since: int = 0) -> list[str]:
        """Texts of WARN-or-worse /rosout entries from ``node_name``."""
        return [m.msg for m in self.messages("rosout", since) if m.name.endswith(node_name) and m.level >= Log.WARN]

    def wait_ready(self, timeout: float = 120.0, node_name: str = "lisa_node",
                   process: NodeProcess | None = None) -> None:
        """Wait until the node reports ``ready`` on /diagnostics and has matched our publishers.

        With ``process``, fail at once (with its log) when it exits."""
        def ready(msg: DiagnosticArray) -> bool:
            return any(s.name.startswith(node_name) and s.message == "ready" for s in msg.status)

        deadline = time.monotonic() + timeout
        while True:
            try:
                self.wait_for("diagnostics", ready, 1.0)
                break
            except AssertionError:
                if process is not None and not process.alive():
                    raise AssertionError(f"{node_name} exited with {process.proc.returncode}:\n"
                                         f"{process.log()[-3000:]}") from None
                if time.monotonic() > deadline:
                    log = process.log()[-3000:] if process is not None else ""
                    raise AssertionError(f"{node_name} not ready within {timeout:.0f} s\n{log}") from None
        deadline = time.monotonic() + 60.0
        while self.pub_instruction.get_subscription_count() == 0 and time.monotonic() < deadline:
            time.sleep(0.05)

    def say(self, text: str) -> None:
        self.pub_instruction.publish(String(data=text))

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=1.0)
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self._thread.join(2.0)


class NodeProcess:
    """``lisa_node`` (or any command) as a subprocess; log in ``log_path``; stopped with SIGINT."""

    def __init__(self, params: dict[str, Any], domain_id: int, log_path: Path,
                 command: Sequence[str] | None = None, *, name: str | None = None,
                 env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        cmd = list(command or [sys.executable, "-m", "ros_nodes.lisa_node"]) + ros_args(params)
        if name:
            cmd += ["-r", f"__node:={name}"]
        self.proc = subprocess.Popen(cmd, cwd=cwd or REPO, env=env or ros_env(domain_id), stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        """SIGINT, then wait; returns the exit code (kills after ``timeout``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

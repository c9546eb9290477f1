"""The repository as ROS 2 packages: package.xml, the launch file, and a real ``colcon build``.

The root is no ROS package (colcon does not look inside a package for more packages): ``ros/lisa_agent``
(ament_python; symlinks to the root's Python packages and launch files) and ``ros/lisa_interfaces``
(ament_cmake + rosidl) sit side by side. ``colcon build`` runs here (colcon-common-extensions and the rosidl
wheels from PyPI) into a temporary workspace (the session fixture ``ros_workspace``); the installed
``lisa_node`` entry point is then started from the install tree, the way ``ros2 run lisa_agent lisa_node``
starts it, and must answer an instruction.
``launch``/``launch_ros`` are not on PyPI: the launch file is always compiled and checked with
stand-in launch classes; with the real packages it is also built by launch itself.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
import time
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from ros_helpers import REPO, NodeProcess, Probe, colcon_executable, image_msg, stamp

from ros_nodes.lisa_node import ENGINE_PARAMETERS, NODE_PARAMETERS, QUERY_PARAMETERS, TRACK_PARAMETERS

pytestmark = pytest.mark.slow  # colcon build and an installed node over real DDS

LAUNCH = REPO / "launch" / "lisa.launch.py"
ROS_PKG = REPO / "ros" / "lisa_agent"
INTERFACES = REPO / "ros" / "lisa_interfaces"
DOMAIN = 89
REQUIRED_ARGS = {"camera", "image_topic", "compressed", "depth", "camera_info_topic", "instruction_topic",
                 "camera_qos", "model", "device", "dtype", "quantization", "mask_tta", "server", "mode", "continuous",
                 "max_rate", "publish_overlay", "action_policy", "action_max_age", "action_frame_timeout", "lifecycle"}


def test_package_xml_is_format_3_ament_python_with_run_deps():
    root = ET.parse(ROS_PKG / "package.xml").getroot()
    assert root.tag == "package" and root.get("format") == "3"
    assert root.findtext("name") == "lisa_agent"
    assert root.find("export/build_type").text == "ament_python"
    deps = {e.text for e in root.findall("exec_depend")}
    assert {"rclpy", "sensor_msgs", "std_msgs", "geometry_msgs", "visualization_msgs", "diagnostic_msgs",
            "launch_ros"} <= deps
    import lisa_agent

    # one version (lisa_agent.__version__), read by pip (pyproject's dynamic version) and colcon (setup.py); ROS
    # tools read package.xml's copy without running Python, so it must say the same
    assert root.findtext("version") == lisa_agent.__version__
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'dynamic = ["version"]' in pyproject and 'version = { attr = "lisa_agent.__version__" }' in pyproject
    assert (ROS_PKG / "resource" / "lisa_agent").is_file()
    assert "lisa_interfaces" in deps  # the node serves the Segment action and publishes ~/segmentation
    # the package folder reaches the code through symlinks (one copy of the code, in the root)
    for name in ("lisa_agent", "ros_nodes", "launch"):
        assert (ROS_PKG / name).is_symlink() and (ROS_PKG / name).resolve() == REPO / name, name


def test_interfaces_package_is_ament_cmake_rosidl_with_the_same_version():
    root = ET.parse(INTERFACES / "package.xml").getroot()
    assert root.findtext("name") == "lisa_interfaces" and root.find("export/build_type").text == "ament_cmake"
    assert root.findtext("member_of_group") == "rosidl_interface_packages"
    assert root.findtext("version") == ET.parse(ROS_PKG / "package.xml").getroot().findtext("version")
    cmake = (INTERFACES / "CMakeLists.txt").read_text()
    for name in ("msg/Instance.msg", "msg/Segmentation.msg", "action/Segment.action", "srv/Segment.srv"):
        assert (INTERFACES / name).is_file() and f'"{name}"' in cmake, name


def test_colcon_finds_both_packages_in_a_workspace(tmp_path):
    """A ROS user clones the repository into ``src/``: ``colcon list`` must list both packages."""
    src = tmp_path / "ws" / "src"
    src.mkdir(parents=True)
    (src / "lisa-agent").symlink_to(REPO, target_is_directory=True)
    done = subprocess.run([colcon_executable(), "list", "--base-paths", str(src / "lisa-agent")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0]: line.split()[1] for line in done.stdout.splitlines() if line.strip()}
    assert set(listed) == {"lisa_agent", "lisa_interfaces"}, done.stdout


# ----------------------------------------------------------------------------------------- launch file
def launch_arguments() -> dict[str, str]:
    """ARGUMENTS of the launch file (loaded with stand-ins for launch/launch_ros): name -> default."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        module = _load_launch_with_stand_ins(monkeypatch)
    return {name: default for name, default, _ in module.ARGUMENTS}


def test_launch_file_compiles_and_declares_the_main_arguments():
    source = LAUNCH.read_text()
    compile(source, str(LAUNCH), "exec")
    tree = ast.parse(source)
    assert any(isinstance(n, ast.FunctionDef) and n.name == "generate_launch_description" for n in tree.body)
    args = launch_arguments()
    assert all(isinstance(v, str) for v in args.values())  # launch arguments are text
    assert REQUIRED_ARGS <= set(args), REQUIRED_ARGS - set(args)
    assert args["camera_qos"] == "best_effort" and args["mode"] == "fast"


class _Recorder:
    """Stand-in for a launch class: records its constructor arguments."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


class _Config:
    def __init__(self, name):
        self.name = name

    def perform(self, context):
        return context[self.name]


def _load_launch_with_stand_ins(monkeypatch):
    fakes = {
        "launch": types.SimpleNamespace(LaunchDescription=_Recorder),
        "launch.actions": types.SimpleNamespace(DeclareLaunchArgument=_Recorder, OpaqueFunction=_Recorder),
        "launch.substitutions": types.SimpleNamespace(LaunchConfiguration=_Config),
        "launch_ros": types.SimpleNamespace(),
        "launch_ros.actions": types.SimpleNamespace(Node=_Recorder),
    }
    for name, module in fakes.items():
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("lisa_launch_under_test", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("overrides,expect", [
    ({}, {"image_topic": "/camera/color/image_raw", "depth_topic": "", "camera_info_topic": "",
          "compressed": False, "continuous": False, "max_rate": 5.0}),
    ({"camera": "/rs/color/", "depth": "/rs/aligned_depth_to_color", "continuous": "true", "max_rate": "2",
      "compressed": "True", "server": "tcp://127.0.0.1:5557"},
     {"image_topic": "/rs/color/image_raw", "depth_topic": "/rs/aligned_depth_to_color/image_raw",
      "camera_info_topic": "/rs/color/camera_info", "compressed": True, "continuous": True, "max_rate": 2.0,
      "server": "tcp://127.0.0.1:5557"}),
    ({"image_topic": "/cam/raw", "camera_info_topic": "/cam/info", "depth": "/d"},
     {"image_topic": "/cam/raw", "camera_info_topic": "/cam/info", "depth_topic": "/d/image_raw"}),
])
def test_launch_file_maps_arguments_to_node_parameters(monkeypatch, overrides, expect):
    module = _load_launch_with_stand_ins(monkeypatch)
    description = module.generate_launch_description()
    entities = description.args[0]
    declared = {e.args[0]: e.kwargs["default_value"] for e in entities if "default_value" in e.kwargs}
    assert declared == launch_arguments()
    opaque = next(e for e in entities if "function" in e.kwargs)
    context = {**declared, **overrides}
    (node,) = opaque.kwargs["function"](context)
    assert (node.kwargs["package"], node.kwargs["executable"]) == ("lisa_agent", "lisa_node")
    (managed,) = opaque.kwargs["function"]({**context, "lifecycle": "true"})
    assert managed.kwargs["executable"] == "lisa_lifecycle_node"
    (params,) = node.kwargs["parameters"]
    for key, value in expect.items():
        assert params[key] == value, key
    # every parameter exists on the node, with the declared type (rclpy refuses a mismatch); the engine's
    # are declared with dynamic typing and take their text form
    library = {**ENGINE_PARAMETERS, **QUERY_PARAMETERS, **TRACK_PARAMETERS}
    for key, value in params.items():
        assert key in NODE_PARAMETERS or key in library, key
        if key in NODE_PARAMETERS:
            assert type(value) is type(NODE_PARAMETERS[key][0]), (key, value)
        else:
            assert isinstance(value, str), (key, value)


def test_launch_file_rejects_a_bad_boolean(monkeypatch):
    module = _load_launch_with_stand_ins(monkeypatch)
    context = {**launch_arguments(), "continuous": "maybe"}
    with pytest.raises(ValueError, match="true or false"):
        module.node_parameters(context)


def test_launch_file_with_real_launch_ros():
    try:
        import launch  # noqa: I001 - `launch` is also a folder of this repository
        import launch_ros  # noqa: F401
    except ImportError:
        pytest.skip("launch/launch_ros are not on PyPI and not installed here (they come with a ROS 2 distro); "
                    "the launch file was checked with stand-in classes above")
    spec = importlib.util.spec_from_file_location("lisa_launch_real", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    names = {a.name for a in description.get_launch_arguments()}
    assert REQUIRED_ARGS <= names
    context = launch.LaunchContext()
    for action in description.entities:
        if isinstance(action, launch.actions.DeclareLaunchArgument):
            action.execute(context)
    opaque = next(e for e in description.entities if isinstance(e, launch.actions.OpaqueFunction))
    (node,) = opaque.execute(context)
    assert node.node_package == "lisa_agent" and node.node_executable == "lisa_node"


# ----------------------------------------------------------------------------------------- colcon build
@pytest.fixture(scope="module")
def colcon_install(ros_workspace) -> Path:
    """The install base of the session's ``colcon build`` of both packages (conftest's ``ros_workspace``)."""
    return ros_workspace


def test_colcon_install_tree(colcon_install):
    pkg = colcon_install / "lisa_agent"
    node = pkg / "lib" / "lisa_agent" / "lisa_node"
    assert node.is_file() and os.access(node, os.X_OK)
    entry_points = "".join(p.read_text() for p in pkg.glob("lib/python3*/site-packages/*.egg-info/entry_points.txt"))
    assert "lisa_node = ros_nodes.lisa_node:main" in entry_points
    assert "lisa_lifecycle_node = ros_nodes.lisa_lifecycle_node:main" in entry_points
    assert os.access(pkg / "lib" / "lisa_agent" / "lisa_lifecycle_node", os.X_OK)
    assert (pkg / "share" / "lisa_agent" / "package.xml").read_text() == (ROS_PKG / "package.xml").read_text()
    assert (pkg / "share" / "lisa_agent" / "launch" / "lisa.launch.py").is_file()
    assert (pkg / "share" / "ament_index" / "resource_index" / "packages" / "lisa_agent").is_file()
    site = list(pkg.glob("lib/python3*/site-packages"))
    assert site and (site[0] / "ros_nodes" / "lisa_node.py").is_file()
    assert (site[0] / "lisa_agent" / "engine" / "segmenter.py").is_file()
    # the same package data as pip installs: the console's page and the result schema
    for name in ("index.html", "console.js", "console.css", "favicon.svg"):
        assert (site[0] / "lisa_agent" / "console" / "static" / name).is_file(), name
    assert (site[0] / "lisa_agent" / "schemas" / "result.schema.json").is_file()
    assert "lisa_agent.frame_sources" in entry_points and "ros = ros_nodes.console_source:open_ros_source" in entry_points
    assert (colcon_install / "setup.bash").is_file()
    interfaces = colcon_install / "lisa_interfaces"
    for name in ("msg/Instance.msg", "msg/Segmentation.msg", "action/Segment.action", "srv/Segment.srv"):
        assert (interfaces / "share" / "lisa_interfaces" / name).is_file(), name
    assert list(interfaces.glob("lib/python3*/site-packages/lisa_interfaces/action/_segment.py"))
    assert (interfaces / "share" / "ament_index" / "resource_index" / "packages" / "lisa_interfaces").is_file()


def test_the_interfaces_import_after_sourcing(colcon_install, tmp_path):
    probe = ("from lisa_interfaces.action import Segment; from lisa_interfaces.msg import Segmentation, Instance; "
             "from lisa_interfaces.srv import Segment as S; "
             "print(Segment.Goal(instruction='x').instruction, len(Segmentation().instances), S.Request().mode == '')")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AMENT_PREFIX_PATH")}
    out = subprocess.run(_sourced(colcon_install, f'"{sys.executable}" -c "{probe}"'), cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["x", "0", "True"]


def _sourced(install: Path, script: str) -> list[str]:
    """A bash command running ``script`` (with "$@") after sourcing the workspace, like a ROS user."""
    return ["bash", "-c", f'source "{install}/setup.bash" && {script}']


def test_ament_index_finds_the_installed_package(colcon_install, tmp_path):
    probe = ("import ament_index_python.packages as p, ros_nodes.lisa_node as n; "
             "print(p.get_package_share_directory('lisa_agent')); print(p.get_package_prefix('lisa_agent')); "
             "print(n.__file__)")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AMENT_PREFIX_PATH")}
    out = subprocess.run(_sourced(colcon_install, f'"{sys.executable}" -c "{probe}"'), cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    share, prefix, module = out.stdout.split()
    assert Path(share) == colcon_install / "lisa_agent" / "share" / "lisa_agent"
    assert Path(prefix) == colcon_install / "lisa_agent"
    assert Path(module).is_relative_to(colcon_install)  # the installed copy, not the source tree


def test_the_installed_tree_serves_the_console_page_and_validates_a_result(colcon_install, tmp_path):
    """A ROS install is a whole install: the console page and the result schema come from the colcon tree."""
    script = "\n".join([
        "import http.client, json, sys",
        "import jsonschema",
        "import lisa_agent, lisa_agent.result as r",
        "from lisa_agent.benchmarks.server import EchoBackend, synthetic_frame",
        "from lisa_agent.console.core import ConsoleCore",
        "from lisa_agent.console.sources import SyntheticSource",
        "from lisa_agent.console.web import ConsoleServer",
        "assert lisa_agent.__file__.startswith(sys.argv[1]), lisa_agent.__file__",
        "schema = json.loads(r.RESULT_SCHEMA_PATH.read_text())",
        "jsonschema.validate(EchoBackend().segment(synthetic_frame(64, 80), 'the cup').to_dict(), schema)",
        "core = ConsoleCore(EchoBackend(), SyntheticSource(size=(64, 80))).start()",
        "server = ConsoleServer(core, host='127.0.0.1', port=0)",
        "server.start_in_thread()",
        "try:",
        "    conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=60)",
        "    conn.request('GET', '/')",
        "    page = conn.getresponse()",
        "    body = page.read().decode()",
        "    print(page.status, 'console.js' in body)",
        "finally:",
        "    server.stop_thread()",
        "    core.close()",
    ])
    (tmp_path / "probe.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AMENT_PREFIX_PATH")}
    # -I-like isolation from the source tree: the editable install of the test venv is shadowed by the colcon tree
    # on PYTHONPATH (sourced), and the script runs outside the repository
    out = subprocess.run(_sourced(colcon_install, f'"{sys.executable}" -P probe.py "{colcon_install}"'), cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["200", "True"]


def test_installed_lisa_node_starts_and_answers(colcon_install, tiny_checkpoint, tmp_path):
    """What `ros2 run lisa_agent lisa_node` runs: <prefix>/lib/lisa_agent/lisa_node, from the install tree."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "AMENT_PREFIX_PATH")}
    env.update({"ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "ROS_DOMAIN_ID": str(DOMAIN)})
    executable = colcon_install / "lisa_agent" / "lib" / "lisa_agent" / "lisa_node"
    node = NodeProcess({"model": str(tiny_checkpoint), "camera_qos": "reliable", "image_topic": "/camera/image"},
                       DOMAIN, tmp_path / "node.log", command=_sourced(colcon_install, 'exec "$0" "$@"') +
                       [str(executable)], env=env, cwd=tmp_path)
    probe = Probe(DOMAIN, name="package_probe")
    try:
        probe.wait_ready(timeout=120, process=node)
        header = stamp(int(time.time()), 123, "installed_cam")
        rgb = np.zeros((40, 56, 3), np.uint8)
        rgb[10:30, 20:40] = (200, 30, 30)
        frame = image_msg(rgb, "rgb8", header)
        mask = probe.wait_for("mask", lambda m: m.header.frame_id == "installed_cam", 30,
                              poke=lambda: (probe.pub_image.publish(frame), probe.say("the red square")))
        assert (mask.height, mask.width, mask.encoding) == (40, 56, "mono8")
        assert (mask.header.stamp.sec, mask.header.stamp.nanosec) == (header.stamp.sec, 123)
    finally:
        probe.close()
        code = node.stop()
    assert code == 0, node.log()[-3000:]


def test_setup_py_leaves_pip_metadata_to_pyproject(tmp_path):
    """pip (PEP 517) builds the lisa-agent distribution of pyproject.toml; setup.py adds nothing there."""
    script = "import setuptools.build_meta as b, sys; print(b.prepare_metadata_for_build_wheel(sys.argv[1]))"
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    dist_info = tmp_path / done.stdout.strip().splitlines()[-1]
    metadata = (dist_info / "METADATA").read_text()
    assert "Name: lisa-agent" in metadata and "Provides-Extra: ros" in metadata
    entry_points = (dist_info / "entry_points.txt").read_text()
    assert "lisa-agent = lisa_agent.cli:main" in entry_points
    assert "lisa_node" not in entry_points  # the ROS entry point exists only in the colcon build

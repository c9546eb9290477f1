"""Package hygiene: nothing heavy at import, lisa_agent never imports ROS, the CLI lists its commands."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_light():
    code = ("import sys, lisa_agent, lisa_agent.cli; "
            "heavy = [m for m in ('torch', 'transformers', 'zmq', 'rclpy', 'segment_anything') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_library_never_imports_ros():
    offenders = []
    for path in (ROOT / "lisa_agent").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top in {"rclpy", "sensor_msgs", "std_msgs", "geometry_msgs", "visualization_msgs",
                           "ros_nodes", "launch", "launch_ros", "builtin_interfaces", "diagnostic_msgs"}:
                    offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert not offenders, offenders


def test_cli_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "lisa_agent.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for cmd in ("demo", "segment", "bench", "make-tiny", "make-data", "finetune", "eval", "serve", "bag"):
        assert cmd in out


def test_a_command_that_loads_the_model_prints_no_library_noise(tmp_path):
    """stderr carries what a user needs (nothing here), not other libraries' import-time chatter."""
    out = subprocess.run([sys.executable, "-m", "lisa_agent.cli", "demo", "--mode", "fast", "--out",
                          str(tmp_path / "overlay.png")], capture_output=True, text=True, check=True)
    assert "knife" in out.stdout
    assert "Enum subclass" not in out.stderr, out.stderr

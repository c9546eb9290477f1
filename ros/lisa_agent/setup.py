"""colcon / ament_python build of the ROS 2 package ``lisa_agent`` (``ros/lisa_agent`` of the repository).

colcon does not look inside a package's folder for more packages, so the repository root is no ROS
package: ``ros/lisa_agent`` (this package: ``package.xml``, this file, ``setup.cfg``, ``resource/`` and
symlinks to the root's ``lisa_agent``, ``ros_nodes`` and ``launch``) and ``ros/lisa_interfaces`` (the
messages, the action and the service, ament_cmake + rosidl) sit side by side, and ``colcon build`` in a
workspace whose ``src/`` holds the repository finds both. pip reads only the root's ``pyproject.toml``.

* colcon (``colcon build`` runs ``python setup.py ...`` directly): the ROS 2 package ``lisa_agent``
  with the ament index marker, ``package.xml`` and the launch files under ``share/lisa_agent``, and
  the ``lisa_node`` console script (installed to ``lib/lisa_agent`` by ``setup.cfg``) that
  ``ros2 run lisa_agent lisa_node`` starts. ``pyproject.toml`` is ignored on this path: setuptools
  would otherwise replace these entry points with the pip ones and hand colcon a metadata value
  (``python_requires`` as a ``SpecifierSet``) that colcon cannot parse.
"""

from __future__ import annotations

import re
from glob import glob
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.dist import Distribution

PACKAGE = "lisa_agent"
HERE = Path(__file__).resolve().parent
#: The repository root (pyproject.toml, the Python packages the symlinks here point to).
ROOT = HERE.parent.parent


def _pyproject_table(name: str) -> str:
    """The text of one ``[table]`` of pyproject.toml (this file runs without tomllib on Python 3.10)."""
    text = (ROOT / "pyproject.toml").read_text()
    match = re.search(rf"^\[{re.escape(name)}\]\n(.*?)(?=^\[|\Z)", text, re.MULTILINE | re.DOTALL)
    if not match:
        raise RuntimeError(f"pyproject.toml has no [{name}] table")
    return match.group(1)


#: The package data pip installs (pyproject.toml's [tool.setuptools.package-data]), the same for colcon.
PACKAGE_DATA = re.findall(r'"([^"]+)"', _pyproject_table("tool.setuptools.package-data").split("=", 1)[1])
#: The frame sources ros_nodes provides to the console (pyproject.toml's entry points), the same for colcon.
FRAME_SOURCES = {"lisa_agent.frame_sources": [
    f"{name.strip()} = {value.strip().strip(chr(34))}"
    for name, value in re.findall(r"^(\w+)\s*=\s*(.+)$", _pyproject_table('project.entry-points."lisa_agent.frame_sources"'),
                                  re.MULTILINE)]}


def _version() -> str:
    """The version: ``lisa_agent.__version__`` (its one source; pip reads it too, and a test holds package.xml
    to it)."""
    match = re.search(r'^__version__\s*=\s*"([^"]+)"', (ROOT / "lisa_agent" / "__init__.py").read_text(),
                      re.MULTILINE)
    if not match:
        raise RuntimeError("lisa_agent/__init__.py declares no __version__")
    return match.group(1)


class RosDistribution(Distribution):
    """A setuptools Distribution that reads setup.cfg but not pyproject.toml."""

    def _get_project_config_files(self, filenames):  # noqa: ANN001, ANN202 (setuptools internals)
        inifiles, _tomlfiles = super()._get_project_config_files(filenames)
        return inifiles, []


def _ros_setup() -> None:
    setup(
        distclass=RosDistribution,
        name=PACKAGE,
        version=_version(),
        packages=find_packages(include=["lisa_agent", "lisa_agent.*", "ros_nodes", "ros_nodes.*"]),
        package_data={"lisa_agent": PACKAGE_DATA},
        data_files=[
            ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
            (f"share/{PACKAGE}", ["package.xml"]),
            (f"share/{PACKAGE}/launch", sorted(glob("launch/*.launch.py"))),
        ],
        install_requires=["setuptools"],
        zip_safe=False,
        maintainer="lisa-agent maintainers",
        description="LISA reasoning segmentation node: camera frames + instruction -> masks and 3D targets",
        license="Apache-2.0",
        entry_points={
            "console_scripts": [
                "lisa_node = ros_nodes.lisa_node:main",
                "lisa_lifecycle_node = ros_nodes.lisa_lifecycle_node:main",
            ],
            **FRAME_SOURCES,
        },
    )


_ros_setup()

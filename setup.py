"""colcon / ament_python build of the ROS 2 package ``lisa_agent``.

Two front ends read this file:

* pip (PEP 517, ``setuptools.build_meta``): everything comes from ``pyproject.toml``; this file
  adds nothing, so ``pip install .`` builds the ``lisa-agent`` distribution as declared there.
* colcon (``colcon build`` runs ``python setup.py ...`` directly): the ROS 2 package ``lisa_agent``
  with the ament index marker, ``package.xml`` and the launch files under ``share/lisa_agent``, and
  the ``lisa_node`` console script (installed to ``lib/lisa_agent`` by ``setup.cfg``) that
  ``ros2 run lisa_agent lisa_node`` starts. ``pyproject.toml`` is ignored on this path: setuptools
  would otherwise replace these entry points with the pip ones and hand colcon a metadata value
  (``python_requires`` as a ``SpecifierSet``) that colcon cannot parse.
"""

from __future__ import annotations

import re
import sys
from glob import glob
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.dist import Distribution

PACKAGE = "lisa_agent"
HERE = Path(__file__).resolve().parent


def _version() -> str:
    """The version declared in pyproject.toml (one source of truth)."""
    match = re.search(r'^version\s*=\s*"([^"]+)"', (HERE / "pyproject.toml").read_text(), re.MULTILINE)
    if not match:
        raise RuntimeError("pyproject.toml declares no [project] version")
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
        package_data={"lisa_agent": ["py.typed", "assets/**/*"]},
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
            ],
        },
    )


if "setuptools.build_meta" in sys.modules:  # pip / build: pyproject.toml is the whole story
    setup()
else:  # colcon (or a direct `python setup.py ...`): the ROS 2 package
    _ros_setup()

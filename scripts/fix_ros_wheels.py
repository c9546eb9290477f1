"""Patch the PyPI ROS 2 generator wheels so colcon can build interface packages in this venv.

The wheels' exported CMake files (``*__rosidl_generator_pyExport.cmake`` under the venv's ``share/``) name
the wheel builder's Python and numpy include folders (``/opt/python/cp311-cp311/include/python3.11``, its
site-packages' ``numpy/_core/include``); CMake then stops with "includes non-existent path". This rewrites
them to this interpreter's (``sysconfig`` include folder, ``numpy.get_include()``). Idempotent; run it after
every install of the wheels (scripts/test.sh does).

Usage: python scripts/fix_ros_wheels.py            (the interpreter's own venv: sys.prefix)
"""

from __future__ import annotations

import re
import sys
import sysconfig
from pathlib import Path


def fix(prefix: Path) -> int:
    """Rewrite the include paths of the exported CMake files under ``prefix/share``; returns files changed."""
    import numpy

    python_include = sysconfig.get_paths()["include"]
    numpy_include = numpy.get_include()
    changed = 0
    for path in sorted((prefix / "share").glob("*/cmake/*__rosidl_generator_pyExport.cmake")):
        text = path.read_text()
        new = re.sub(r"/opt/python/[^;\"\s]*/include/python3\.\d+", python_include, text)
        new = re.sub(r"/opt/python/[^;\"\s]*/numpy/(?:_core|core)/include", numpy_include, new)
        if new != text:
            path.write_text(new)
            changed += 1
    return changed


def main() -> None:
    prefix = Path(sys.prefix)
    changed = fix(prefix)
    print(f"fix_ros_wheels: {changed} exported CMake file(s) rewritten under {prefix / 'share'}")


if __name__ == "__main__":
    main()

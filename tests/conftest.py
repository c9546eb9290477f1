"""Session-wide test setup.

DDS discovery must stay on this machine: these variables are set before anything imports rclpy,
and every subprocess a test starts inherits them. The Hub is unreachable here: offline mode
makes an unknown model id fail at once instead of after network timeouts.
"""

from __future__ import annotations

import os

os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
os.environ.setdefault("ROS_DOMAIN_ID", "87")
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny RANDOM-WEIGHT LISA checkpoint in the published layout (2-shard .bin, own CLIP folder)."""
    from lisa_agent.engine.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "lisa-tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_segmenter(tiny_checkpoint: Path):
    """The tiny checkpoint loaded through the public loader, fp32 on the CPU."""
    import torch

    from lisa_agent import LisaSegmenter

    torch.manual_seed(0)
    return LisaSegmenter.from_pretrained(tiny_checkpoint, dtype="fp32", device="cpu")


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Async tests run on asyncio only (trio, pulled in by selenium, is not a backend we support)."""
    return "asyncio"


@pytest.fixture(scope="session")
def ros_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``colcon build`` of ``ros/lisa_interfaces`` and ``ros/lisa_agent`` into a temporary workspace, once per
    session; returns its install base (source ``<install>/setup.bash`` to use the interfaces)."""
    from ros_helpers import colcon_build

    return colcon_build(tmp_path_factory.mktemp("colcon_ws"))

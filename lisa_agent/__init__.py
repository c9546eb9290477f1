"""lisa-agent: LISA reasoning segmentation for robots and LLM agents.

Public entry points (imported lazily, so ``import lisa_agent`` loads no model and no torch)::

    from lisa_agent import LisaSegmenter, LisaClient, SegmentationResult
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "LisaSegmenter": ("lisa_agent.engine.segmenter", "LisaSegmenter"),
    "Conversation": ("lisa_agent.engine.segmenter", "Conversation"),
    "SegmentationResult": ("lisa_agent.result", "SegmentationResult"),
    "MaskInstance": ("lisa_agent.result", "MaskInstance"),
    "LisaClient": ("lisa_agent.serving.client", "LisaClient"),
    "AsyncLisaClient": ("lisa_agent.serving.client", "AsyncLisaClient"),
}

if TYPE_CHECKING:  # pragma: no cover
    from .engine.segmenter import Conversation, LisaSegmenter
    from .result import MaskInstance, SegmentationResult
    from .serving.client import AsyncLisaClient, LisaClient

__all__ = ["AsyncLisaClient", "Conversation", "LisaClient", "LisaSegmenter", "MaskInstance", "SegmentationResult"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lisa_agent' has no attribute {name!r}")
